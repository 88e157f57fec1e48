"""Running dvc in the workspace for the flows: one at a time (the workspace lock), with the
pipeline run's environment, output streamed to the flow's log, stages in dependency order."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml
from prefect import get_run_logger

LOCK_FILE = ".dvc/tmp/idm-flows.lock"
LOCK_TIMEOUT = 6 * 3600.0  # a scheduled run waits for one in progress rather than failing


class WorkspaceBusy(RuntimeError):
    """Another flow run holds the workspace lock."""


class CommandFailed(RuntimeError):
    """A dvc (or stage) command exited non-zero; the message ends with its last output lines."""


# --- workspace, lock, subprocesses ---------------------------------------------------------------

def current_run_id() -> str:
    """The Prefect flow run id (tags every MLflow run of this execution), or a new id outside Prefect."""
    from prefect.runtime import flow_run

    return flow_run.id or uuid.uuid4().hex[:12]


def flow_logger() -> Any:
    try:
        return get_run_logger()
    except Exception:  # called outside a flow or task run (a plain function call)
        import logging

        return logging.getLogger("pipeline.flows")


@contextmanager
def workspace_lock(project: Path, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Hold `<project>/.dvc/tmp/idm-flows.lock`; wait up to `timeout` s, then raise WorkspaceBusy."""
    from filelock import FileLock, Timeout

    path = project / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    owner = path.with_name(path.name + ".owner")
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = owner.read_text().strip() if owner.exists() else "unknown holder"
        flow_logger().info(f"workspace {project} is busy ({holder}); waiting up to {timeout:g} s")
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise WorkspaceBusy(f"workspace {project} is busy: {holder} holds {path}; gave up after {timeout:g} s "
                                "(DVC must not run twice at once in one workspace)") from None
    try:
        owner.write_text(f"pid {os.getpid()}, flow run {current_run_id()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        yield
    finally:
        lock.release()


def subprocess_env(pipeline_run: str) -> dict[str, str]:
    """The environment of dvc and stage processes: this flow run's id, this process's MLflow store."""
    from pipeline.tracking import tracking_uri

    return {
        **os.environ,
        "IDM_PIPELINE_RUN": pipeline_run,  # pipeline/tracking.py tags every stage run with it
        # Stages in a temporary DVC experiment workspace would otherwise default to a store there.
        "MLFLOW_TRACKING_URI": tracking_uri(),
        "DVC_NO_ANALYTICS": "1",
        "PYTHONUNBUFFERED": "1",  # stage output reaches the Prefect log line by line
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # dvc.yaml's `python`
    }


def run_command(cmd: list[str], *, cwd: Path, env: dict[str, str], log: Callable[[str], None]) -> list[str]:
    """Run `cmd` (an argument list), passing each output line to `log` as it comes; return the lines."""
    lines: list[str] = []
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip():
                lines.append(line.rstrip())
                log(line.rstrip())
        code = proc.wait()
    finally:  # the flow was cancelled or interrupted: do not leave dvc running without the lock
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    if code != 0:
        tail = "\n".join(lines[-15:])
        raise CommandFailed(f"`{' '.join(cmd[1:])}` in {cwd} exited with code {code}:\n{tail}")
    return lines


def dvc(args: list[str], *, project: Path, pipeline_run: str, lock_timeout: float = LOCK_TIMEOUT) -> list[str]:
    """Run `dvc <args>` in `project` under the workspace lock, streaming its output to the run log."""
    log = flow_logger().info
    with workspace_lock(project, lock_timeout):
        return run_command([sys.executable, "-m", "dvc", *args], cwd=project, env=subprocess_env(pipeline_run), log=log)


# --- the stage graph ----------------------------------------------------------------------------

def _paths(spec: dict, keys: tuple[str, ...]) -> list[str]:
    items = [item for key in keys for item in spec.get(key) or []]
    return [os.path.normpath(item if isinstance(item, str) else next(iter(item))) for item in items]


def dvc_stages(project: Path, targets: tuple[str, ...] | None = None) -> list[str]:
    """Stage names of `<project>/dvc.yaml` in dependency order (file order among independent stages).

    With `targets`, only those present and the stages upstream of them. A stage depends on
    another when one of its deps is, or lies under, one of the other's outs/metrics/plots.
    """
    stages: dict[str, dict] = (yaml.safe_load((project / "dvc.yaml").read_text()) or {}).get("stages") or {}
    outs = {name: _paths(spec, ("outs", "metrics", "plots")) for name, spec in stages.items()}
    upstream = {
        name: {other for other, produced in outs.items() if other != name
               for dep in _paths(spec, ("deps",)) for out in produced if dep == out or dep.startswith(out + os.sep)}
        for name, spec in stages.items()
    }
    if targets is not None:
        wanted, todo = set(), [t for t in targets if t in stages]
        while todo:
            name = todo.pop()
            if name not in wanted:
                wanted.add(name)
                todo.extend(upstream[name])
        upstream = {name: deps for name, deps in upstream.items() if name in wanted}
    order: list[str] = []
    while len(order) < len(upstream):
        ready = [name for name, deps in upstream.items() if name not in order and deps <= set(order)]
        if not ready:
            raise ValueError(f"{project / 'dvc.yaml'}: stages {sorted(set(upstream) - set(order))} depend on each other in a cycle")
        order.append(ready[0])
    return order


def stage_status(lines: list[str], stage: str) -> str:
    """'ran', 'restored' (from DVC's run cache) or 'skipped' (up to date), from dvc repro's output."""
    text = "\n".join(lines)
    if f"Running stage '{stage}'" in text:
        return "ran"
    return "restored" if f"Stage '{stage}' is cached" in text else "skipped"


# --- tasks --------------------------------------------------------------------------------------
