"""`python -m pipeline.servers`: real servers on free loopback ports, a scheduled run, a clean shutdown."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from pipeline import servers as serve
from pipeline.params import load

ROOT = Path(__file__).resolve().parents[2]

# A flow with nothing to import, so that its run starts fast on a busy machine.
TICK = """
from prefect import flow


@flow(name="tick")
def tick() -> str:
    return "tock"
"""

# serve.main plus deployment `tick`, every 20 s from a few seconds after serving starts: on a
# busy machine registering the deployment can take longer than the first slot, so one slot
# alone (the first version of this test) could leave nothing scheduled for an hour.
SERVE_WITH_TICK = """
import sys
from datetime import datetime, timedelta, timezone

from pipeline import servers as serve


def tick_deployment():
    from prefect.schedules import Interval

    from tick import tick

    soon = datetime.now(timezone.utc) + timedelta(seconds=5)
    return [tick.to_deployment("tick-soon", schedules=[Interval(timedelta(seconds=20), anchor_date=soon)])]


sys.exit(serve.main(sys.argv[1:], extra_deployments=tick_deployment))
"""


def api(url: str, body: dict | None = None) -> dict | list:
    data = json.dumps(body or {}).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def wait_for(check, timeout: float, what: str, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"serve exited ({proc.returncode}) waiting for {what}:\n{log.read_text()[-3000:]}")
        try:
            found = check()
        except OSError:
            found = None
        if found:
            return found
        time.sleep(1)
    pytest.fail(f"no {what} after {timeout:g} s:\n{log.read_text()[-3000:]}")


def test_deployments_carry_the_cron_schedules_of_params():
    params = load(ROOT / "params.yaml")
    retrain, evaluate, pipeline = serve.deployments(params)
    assert (retrain.name, evaluate.name, pipeline.name) == ("retrain-and-promote", "rescore-champion", "dvc-repro")
    expected = params.schedules
    assert retrain.schedules[0].schedule.cron == expected.retrain_cron
    assert evaluate.schedules[0].schedule.cron == expected.evaluate_cron
    assert retrain.schedules[0].schedule.timezone == expected.timezone
    assert not pipeline.schedules


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_serve_runs_a_scheduled_flow_and_stops_without_orphans(tmp_path, mlflow_store):
    prefect_port, mlflow_port = serve.free_port(), serve.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_RUNNER_POLL_FREQUENCY="1",
               PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2", PYTHONPATH=str(ROOT))
    (tmp_path / "tick.py").write_text(TICK)
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:  # cwd: the runner finds tick.py there
        proc = subprocess.Popen([sys.executable, "-c", SERVE_WITH_TICK, "--prefect-port", str(prefect_port),
                                 "--mlflow-port", str(mlflow_port)], cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{prefect_port}/api"
        wanted = {serve.RETRAIN, serve.EVALUATE, serve.PIPELINE, "tick-soon"}
        wait_for(lambda: wanted <= {d["name"] for d in api(f"{base}/deployments/filter")}, 150, "deployments", proc, log)
        crons = {d["schedules"][0]["schedule"].get("cron") for d in api(f"{base}/deployments/filter") if d["schedules"]}
        schedules = load(ROOT / "params.yaml").schedules
        assert {schedules.retrain_cron, schedules.evaluate_cron} <= crons
        # The UI in a browser asks this for the API's address: the server's own port, not 4200.
        with urllib.request.urlopen(f"http://127.0.0.1:{prefect_port}/ui-settings", timeout=10) as response:
            assert json.loads(response.read())["api_url"] == base

        completed = {"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
                     "deployments": {"name": {"any_": ["tick-soon"]}}}
        wait_for(lambda: api(f"{base}/flow_runs/filter", completed), 120, "completed scheduled run of tick", proc, log)
        with urllib.request.urlopen(f"http://127.0.0.1:{mlflow_port}/health", timeout=10) as response:
            assert response.status == 200

        tree = psutil.Process(proc.pid).children(recursive=True)
        assert len(tree) >= 2  # the two servers and their workers
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        _, alive = psutil.wait_procs(tree, timeout=10)
        assert not alive, f"left running: {[p.pid for p in alive]}"
        assert serve.port_is_free(prefect_port) and serve.port_is_free(mlflow_port)
    finally:
        stop_tree(proc)


def stop_tree(proc: subprocess.Popen) -> None:
    """Whatever happened, end serve and every process it started (the servers lead their own groups)."""
    tree = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # let serve stop its servers itself first
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
