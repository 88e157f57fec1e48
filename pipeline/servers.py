"""`make serve`: a Prefect server, the MLflow UI and the retrain and evaluate flows on their schedules.

    python -m pipeline.servers [--params params.yaml] [--prefect-port N] [--mlflow-port 5000] [--no-mlflow-ui]

Everything binds 127.0.0.1. The servers run in their own process groups; Ctrl-C or
SIGTERM stops the flow runner (which ends any flow run in progress), then each server's
whole group, so nothing is left running. With PREFECT_API_URL set, flows are served
against that server instead of a local one; with MLFLOW_TRACKING_URI pointing at an
http(s) tracking server, no local MLflow UI is started.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline.params import ROOT, Params, load

HOST = "127.0.0.1"  # never another interface
PREFECT_PORT = 4200
MLFLOW_PORT = 5000
STARTUP_TIMEOUT = 180.0  # s; a first Prefect start migrates its database, slow on 2 cores
STOP_TIMEOUT = 20.0  # s between SIGTERM and SIGKILL
# Deployment names, shown as <flow>/<deployment> (idm-retrain/retrain-and-promote).
RETRAIN, EVALUATE, PIPELINE = "retrain-and-promote", "rescore-champion", "dvc-repro"


def port_is_free(port: int) -> bool:
    """Whether a server could listen on `port` now (connections closing in TIME_WAIT do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class Service:
    """A server started in its own process group (so stopping it reaches all its workers)."""

    name: str
    proc: subprocess.Popen
    log: Path

    @classmethod
    def start(cls, name: str, cmd: list[str], log_dir: Path, env: dict[str, str] | None = None) -> "Service":
        log_dir.mkdir(parents=True, exist_ok=True)
        log = log_dir / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, env={**os.environ, **(env or {})})
        return cls(name, proc, log)

    def wait_until_up(self, url: str, timeout: float = STARTUP_TIMEOUT) -> None:
        """Poll `url` until it answers 200; raise (with the log's tail) if the server dies or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        tail = "".join(self.log.read_text(errors="replace").splitlines(keepends=True)[-20:])
        state = f"exited with code {self.proc.returncode}" if self.proc.poll() is not None else f"not up after {timeout:g} s"
        raise RuntimeError(f"{self.name} {state} ({url}); last lines of {self.log}:\n{tail}")

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM the whole process group, SIGKILL whatever is left after `timeout` s."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            deadline = time.monotonic() + timeout
            while self.group_alive() and time.monotonic() < deadline:
                time.sleep(0.2)
            if not self.group_alive():
                break
        self.proc.wait()

    def group_alive(self) -> bool:
        self.proc.poll()  # reap the leader, or the group never empties
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True


def stop_other_children(keep_groups: set[int], timeout: float = STOP_TIMEOUT) -> None:
    """Terminate this process's descendants outside `keep_groups` (e.g. a flow run the runner left)."""
    import psutil

    def group(p: psutil.Process) -> int | None:
        try:
            return os.getpgid(p.pid)
        except ProcessLookupError:
            return None

    children = [c for c in psutil.Process().children(recursive=True) if group(c) not in keep_groups]
    for child in children:
        with suppress(psutil.NoSuchProcess):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for child in alive:
        with suppress(psutil.NoSuchProcess):
            child.kill()


def start_prefect_server(port: int, log_dir: Path) -> Service:
    """`prefect server start` on HOST:port, its UI told that same address.

    The UI asks the server (`/ui-settings`) where the API is; Prefect derives that from its
    settings, not from `--port`, so without these variables a server on another port sends
    the browser to 127.0.0.1:4200 (or to whatever PREFECT_API_URL names)."""
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)]
    env = {"PREFECT_SERVER_API_HOST": HOST, "PREFECT_SERVER_API_PORT": str(port),
           "PREFECT_UI_API_URL": f"http://{HOST}:{port}/api", "PREFECT_API_URL": f"http://{HOST}:{port}/api"}
    service = Service.start("prefect-server", cmd, log_dir, env=env)
    service.wait_until_up(f"http://{HOST}:{port}/api/health")
    return service


def start_mlflow_ui(port: int, log_dir: Path) -> Service:
    from pipeline.tracking import artifact_location, tracking_uri

    if not port_is_free(port):
        raise RuntimeError(f"port {port} on {HOST} is taken (is `make ui` running?); "
                           "use --mlflow-port 0 for a free port, or --no-mlflow-ui")
    artifacts = artifact_location()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(port), "--workers", "1",
           *(["--default-artifact-root", artifacts] if artifacts else [])]
    # The store URI goes in the environment, not on the command line, where `ps` would show a database password.
    # MLflow's GenAI job workers (seven processes) are not needed to browse runs and models.
    env = {"MLFLOW_BACKEND_STORE_URI": tracking_uri(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    service = Service.start("mlflow-ui", cmd, log_dir, env=env)
    service.wait_until_up(f"http://{HOST}:{port}/health")
    return service


@contextmanager
def services(args: argparse.Namespace) -> Iterator[dict[str, str]]:
    """Start the Prefect server and MLflow UI that are wanted; yield their URLs; always stop them."""
    from pipeline.tracking import setup, tracking_uri

    running: list[Service] = []
    urls: dict[str, str] = {}
    log_dir = Path(os.environ["PREFECT_HOME"]) / "serve-logs"
    try:
        if os.environ.get("PREFECT_API_URL"):  # a Prefect server elsewhere
            urls["prefect"] = os.environ["PREFECT_API_URL"]
        else:
            port = args.prefect_port or (PREFECT_PORT if port_is_free(PREFECT_PORT) else free_port())
            running.append(start_prefect_server(port, log_dir))
            urls["prefect"] = os.environ["PREFECT_API_URL"] = f"http://{HOST}:{port}/api"
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri()  # one store for the flows, their stages and the UI
        setup()  # experiment `idm` exists, with the project's artifact root, before anything logs
        if not args.no_mlflow_ui and not tracking_uri().startswith(("http://", "https://")):
            port = args.mlflow_port or free_port()
            running.append(start_mlflow_ui(port, log_dir))
            urls["mlflow"] = f"http://{HOST}:{port}"
        yield urls
    finally:
        # A second Ctrl-C must not interrupt the clean-up half way and orphan a server; the
        # handlers come back afterwards (a process that ignores SIGINT passes that on to its children).
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            stop_other_children({s.proc.pid for s in running})  # each server leads its own group
            for service in reversed(running):
                service.stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def deployments(params: Params) -> list[Any]:
    """retrain and evaluate on their cron schedules (params.yaml: schedules), and pipeline to run by hand."""
    from prefect.schedules import Cron

    from pipeline import flows

    s = params.schedules
    return [
        flows.retrain.to_deployment(RETRAIN, schedules=[Cron(s.retrain_cron, timezone=s.timezone)],
                                    description="Retrain, gate and maybe promote a candidate (pipeline.flows.retrain)"),
        flows.evaluate.to_deployment(EVALUATE, schedules=[Cron(s.evaluate_cron, timezone=s.timezone)],
                                     description="Re-score the champion, flag regressions (pipeline.flows.evaluate)"),
        flows.pipeline.to_deployment(PIPELINE, description="Run the DVC pipeline, optionally with param overrides"),
    ]


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None, *, extra_deployments: Callable[[], list[Any]] | None = None) -> int:
    """Serve until Ctrl-C or SIGTERM. `extra_deployments` (called once Prefect is configured) adds more."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--prefect-port", type=int, default=None, help=f"default {PREFECT_PORT}, or a free port if taken")
    parser.add_argument("--mlflow-port", type=int, default=MLFLOW_PORT, help="0: a free port")
    parser.add_argument("--no-mlflow-ui", action="store_true")
    args = parser.parse_args(argv)
    params = load(args.params)  # a bad params file fails before anything starts
    os.environ.setdefault("PREFECT_HOME", str(ROOT / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    signal.signal(signal.SIGTERM, _raise_interrupt)  # until Prefect's runner installs its own handler
    try:
        with services(args) as urls:
            from prefect import serve
            from prefect.settings import PREFECT_API_URL, temporary_settings

            from pipeline.tracking import display_uri

            for name, url in urls.items():
                print(f"{name}: {display_uri(url.removesuffix('/api'))}", flush=True)  # no password in the log
            with temporary_settings(updates={PREFECT_API_URL: urls["prefect"]}):
                serve(*deployments(params), *(extra_deployments() if extra_deployments else []))
    except KeyboardInterrupt:
        pass
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
