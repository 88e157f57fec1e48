"""Test-wide settings: no telemetry, a private MLflow store, small helper fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Under pytest-xdist each worker shares the cores with the others: one thread per process
# (and per subprocess it starts) unless the caller chose; set before torch is imported.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
# No test downloads metric weights from the internet; the tests of that code unset this.
os.environ["IDM_OFFLINE"] = "1"

from tests.helpers import make_image_folder  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _private_mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Never write to the project's mlflow.db from tests."""
    store = tmp_path_factory.mktemp("mlflow")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A folder of small images in several modes: RGB, greyscale, RGBA, palette, 16-bit, JPEG."""
    return make_image_folder(tmp_path / "images")


# Flow, registry and serve tests: one Prefect test server and one MLflow template database per session.
from tests.conftest_prefect import mlflow_store, mlflow_template, prefect_harness  # noqa: E402, F401
