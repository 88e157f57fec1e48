"""Fixtures for the flow, registry and serve tests.

Imported by tests/conftest.py so the session fixtures exist once per test session:
a Prefect test server (slow to start, so one per session and only when a flow test
asks for it) and an initialised MLflow database that each test copies (creating the
schema takes seconds; copying the file takes milliseconds).
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from PIL import Image

from tests.helpers import photo

ROOT = Path(__file__).resolve().parent.parent

# Prefect reads its settings when first imported: a private home, never a real server, and
# time for the test server to start on a loaded 2-core machine.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="idm-prefect-home-")
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)
os.environ.pop("PREFECT_API_URL", None)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One Prefect test server (temporary database) for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow sqlite database with its schema and experiment `idm` (artifacts in a temp dir)."""
    import mlflow

    from pipeline.tracking import EXPERIMENT

    root = tmp_path_factory.mktemp("mlflow-template")
    db = root / "mlflow.db"
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    client.create_experiment(EXPERIMENT, artifact_location=(root / "mlartifacts").as_uri())
    return db


@pytest.fixture
def mlflow_store(mlflow_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh MLflow store for one test (for this process and the subprocesses it starts)."""
    db = tmp_path / "mlflow.db"
    shutil.copy(mlflow_template, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def write_images(folder: Path, n: int = 4, size: tuple[int, int] = (48, 56)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(photo(*size, seed=i)).save(folder / f"im{i}.png")
    return folder


def make_project(work: Path, stages: dict[str, Any], files: dict[str, str] | None = None) -> Path:
    """A scratch copy of the project: idm/, pipeline/, .dvc/config, a tiny params.yaml on a
    folder of generated images, dvc.yaml with `stages`, extra `files`; git init + commit."""
    work.mkdir(parents=True)
    for name in ("idm", "pipeline"):
        shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    (work / ".dvc").mkdir()
    shutil.copy(ROOT / ".dvc" / "config", work / ".dvc" / "config")
    images = write_images(work.parent / f"{work.name}-images")
    params = {
        "datasets": [{"name": "tiny", "source": "folder", "path": str(images), "test_fraction": 0.5}],
        "prepare": {"scales": [2, 3], "ood_scales": [4], "seed": 0},
    }
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    (work / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    for name, text in (files or {}).items():
        (work / name).write_text(text)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run([*git, "init", "-q"], cwd=work, check=True)
    subprocess.run([*git, "add", "-A"], cwd=work, check=True)
    subprocess.run([*git, "commit", "-qm", "scratch project"], cwd=work, check=True)
    return work


def real_stages(*names: str) -> dict[str, Any]:
    """Stages of the project's own dvc.yaml, as they are today."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: stages[name] for name in names}


def register_fake_model(quality: float, *, alias: str | None = None) -> str:
    """Register a constant pyfunc model as a new version of `idm` (tag fake_quality); returns the version."""
    import mlflow

    from pipeline.registry import MODEL_NAME
    from pipeline.tracking import setup

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*type hints")  # a stand-in: no signature wanted

        class Constant(mlflow.pyfunc.PythonModel):
            def predict(self, context, model_input, params=None):
                return [quality] * len(model_input)

        with mlflow.start_run(experiment_id=setup(), run_name="fake-train"):
            info = mlflow.pyfunc.log_model(name="model", python_model=Constant(), registered_model_name=MODEL_NAME,
                                           pip_requirements=[])
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    client.set_model_version_tag(MODEL_NAME, version, "fake_quality", str(quality))
    if alias:
        client.set_registered_model_alias(MODEL_NAME, alias, version)
    return version
