"""MLflow "model from code" entry: MLflow runs this file to build the pyfunc (no pickling)."""

from mlflow.models import set_model

from pipeline.mlflow_model import IDMPyfunc

set_model(IDMPyfunc())
