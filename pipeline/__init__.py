"""The IDM pipeline: params, DVC stage entry points, MLflow tracking and Prefect flows."""
