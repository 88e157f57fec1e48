"""Thin MLflow helpers: one store location, one experiment, tagged runs.

The store is `sqlite:///<project>/mlflow.db` with artifacts in `<project>/mlartifacts/`
unless MLFLOW_TRACKING_URI says otherwise (a server, another database). `<project>` is
where the code is, or, for `dvc exp run --temp` / `--queue` (which run in a copy under
`<project>/.dvc/tmp/exps/`), the project that copy was made from, so experiments are
tracked in the project's own store instead of a throwaway one.

When the store is unavailable or locked, a stage fails before doing any work: `setup()`,
which every stage calls before its work (the train stage through `stage_run`, before
training starts), raises TrackingUnavailable naming the store, and the stage prints it as
one `error:` line and exits 2 (pipeline.stages.run). A store on an http(s) server is probed
for up to STORE_WAIT_SECONDS instead of MLflow's own retries (minutes). If the store fails
after the work started, the stage fails the same way; its outputs are written atomically
and a training run keeps its checkpoint, so the next run resumes instead of starting over.

A stage killed outright (SIGKILL, power loss) cannot end its MLflow run, which would stay
RUNNING forever. Every run is tagged with the host and process that started it, and
`stage_run` first marks as KILLED the RUNNING runs of this host whose process is gone.

Params and tags pass through `redact` before they are logged: a password or token inside
a URL (user:password@, ?token=..., ?X-Amz-Signature=...) never reaches the store, and
messages show store URIs without their password.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from idm.files import process_exists
from pipeline.data.fetch import redact_url
from pipeline.params import ROOT

EXPERIMENT = "idm"
MODEL_NAME = "idm"  # the registered model every trained and quantized version belongs to
STORE_WAIT_SECONDS = 15.0  # how long an http(s) store may take to answer before a stage gives up

_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")


class TrackingUnavailable(RuntimeError):
    """The MLflow store cannot be reached, opened or written (down, locked, misconfigured)."""


def project_root(root: Path = ROOT) -> Path:
    """`root`, or the project DVC copied it from when `root` lies in <project>/.dvc/tmp/exps/."""
    parts = root.resolve().parts
    for i in range(len(parts) - 3, 0, -1):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def artifact_location() -> str | None:
    """mlartifacts/ beside the sqlite file of a local store; None (the server decides) otherwise."""
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()


def redact(value: Any) -> Any:
    """A param or tag value with the credentials of every URL in it hidden (pipeline.data.fetch.redact_url)."""
    if not isinstance(value, str):
        return redact(str(value)) if _URL.search(str(value)) else value
    return _URL.sub(lambda m: redact_url(m.group(0)), value)


def display_uri(uri: str) -> str:
    """A store URI fit for messages and logs (no password)."""
    return redact_url(uri)


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


def _probe_server(uri: str, wait: float) -> None:
    """Raise TrackingUnavailable unless the http(s) server at `uri` answers within `wait` seconds.

    Any answer below 500 counts (a 401 means it is up and wants credentials, which MLflow
    then sends); refused connections, timeouts and 5xx (a proxy whose backend is down) do not.
    """
    deadline = time.monotonic() + wait
    while True:
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=min(5.0, max(wait, 0.5))):
                return
        except urllib.error.HTTPError as err:
            if err.code < 500:
                return
            reason = f"HTTP {err.code}"
        except (urllib.error.URLError, OSError) as err:
            reason = " ".join(str(getattr(err, "reason", err)).split())
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TrackingUnavailable(
                f"MLflow store {display_uri(uri)} is unavailable ({reason}, for {wait:g} s); nothing was done: "
                "start the tracking server or point MLFLOW_TRACKING_URI at a reachable store, then rerun")
        time.sleep(min(1.0, remaining))


def setup() -> str:
    """Point MLflow at the project store and make sure experiment `idm` exists; returns its id.

    Raises TrackingUnavailable (one line, naming the store without its password) if the
    store is down, locked by another process, or cannot be opened.
    """
    import mlflow

    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        _probe_server(uri, STORE_WAIT_SECONDS)
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.get_experiment_by_name(EXPERIMENT)
        if experiment is not None:
            return experiment.experiment_id
        return mlflow.create_experiment(EXPERIMENT, artifact_location=artifact_location())
    except Exception as err:  # MlflowException, sqlalchemy's OperationalError, OSError, ...
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        hint = ("another process holds the database lock; rerun when it is done" if "locked" in reason
                else "check MLFLOW_TRACKING_URI and that the store is reachable, then rerun")
        raise TrackingUnavailable(f"MLflow store {display_uri(uri)} is unavailable ({redact(reason)}); "
                                  f"nothing was done: {hint}") from None


def close_abandoned_runs(experiment_id: str) -> list[str]:
    """Mark as KILLED the RUNNING runs started on this host by a process that no longer
    exists (a stage killed before it could end its run); returns their run ids.

    Runs from other hosts, and runs without the host/pid tags, are left alone.
    """
    import mlflow

    client, host = mlflow.MlflowClient(), socket.gethostname()
    runs = client.search_runs([experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.host = '{host}'")
    closed = []
    for run in runs:
        pid = run.data.tags.get("pid", "")
        if pid.isdigit() and int(pid) != os.getpid() and not process_exists(int(pid)):
            client.set_tag(run.info.run_id, "ended_by", f"stage_run: process {pid} on {host} no longer exists")
            client.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
    return closed


@contextmanager
def stage_run(stage: str, *, tags: dict[str, str] | None = None, params: dict[str, Any] | None = None) -> Iterator[Any]:
    """Start an MLflow run for one execution of DVC stage `stage`, tagged and with params (both redacted)."""
    import mlflow

    experiment_id = setup()
    close_abandoned_runs(experiment_id)
    all_tags = {"dvc_stage": stage, "git_commit": git_commit(), "pipeline_run": pipeline_run_id(),
                "host": socket.gethostname(), "pid": str(os.getpid()), **(tags or {})}
    all_tags = {k: redact(v) for k, v in all_tags.items()}
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"{stage}-{all_tags.get('method', '')}".rstrip("-"), tags=all_tags) as run:
        if params:
            mlflow.log_params({k: str(redact(v))[:6000] for k, v in params.items()})
        yield run
