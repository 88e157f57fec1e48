"""Thin MLflow helpers: one store location, one experiment, tagged runs.

The store is `sqlite:///<project>/mlflow.db` with artifacts in `<project>/mlartifacts/`
unless MLFLOW_TRACKING_URI says otherwise (a server, another database).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from pipeline.params import ROOT

EXPERIMENT = "idm"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{ROOT / 'mlflow.db'}"


def artifact_location() -> str | None:
    """mlartifacts/ beside the sqlite file of a local store; None (the server decides) otherwise."""
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()


def git_commit() -> str:
    """The project's HEAD commit (with '-dirty' when the tree has changes), or 'unknown'."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def pipeline_run_id() -> str:
    """The id shared by all stage runs of one pipeline execution (set by flows), or a new one."""
    return os.environ.get("IDM_PIPELINE_RUN") or uuid.uuid4().hex[:12]


def setup() -> str:
    """Point MLflow at the project store and make sure experiment `idm` exists; returns its id."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        return experiment.experiment_id
    return mlflow.create_experiment(EXPERIMENT, artifact_location=artifact_location())


@contextmanager
def stage_run(stage: str, *, tags: dict[str, str] | None = None, params: dict[str, Any] | None = None) -> Iterator[Any]:
    """Start an MLflow run for one execution of DVC stage `stage`, tagged and with params."""
    import mlflow

    experiment_id = setup()
    all_tags = {"dvc_stage": stage, "git_commit": git_commit(), "pipeline_run": pipeline_run_id(), **(tags or {})}
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"{stage}-{all_tags.get('method', '')}".rstrip("-"), tags=all_tags) as run:
        if params:
            mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
        yield run
