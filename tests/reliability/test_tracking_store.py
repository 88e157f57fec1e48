"""The MLflow store unavailable or locked: stages fail before doing any work, in one line.

The decision (pipeline/tracking.py): every stage that logs to MLflow (train, quantize,
evaluate, report) checks the store before its work and stops with one `error:` line and
exit code 2 if it is down, locked or cannot be opened; nothing is trained, written or
registered, and rerunning once the store is back does the work. An http(s) store is given
STORE_WAIT_SECONDS (15 s) instead of MLflow's own retries (four minutes against a closed
port). A store that fails after the work started fails the stage the same way without
losing it: see test_crash_and_concurrency.py (registration failing after training).
"""

from __future__ import annotations

import socket
import sqlite3

import mlflow
import pytest

from pipeline import tracking
from tests.reliability.harness import (
    assert_one_line_error,
    prepared_workspace,
    run_stage,
    snapshot,
    stage_args,
)

pytestmark = pytest.mark.reliability

WORK_STAGES = ("train", "quantize", "evaluate", "report")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return prepared_workspace(tmp_path_factory.mktemp("store"), evaluate={"methods": ["bicubic"]})


@pytest.fixture(autouse=True)
def _restore_tracking_uri():
    """The stages point this process's MLflow at the store they were given; point it back afterwards."""
    yield
    mlflow.set_tracking_uri(tracking.tracking_uri())


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nothing_done(work) -> None:
    assert not (work["models"] / "checkpoint.pt").exists(), "training started"
    for out in (work["models"].parent / "idm-int8", work["sr"], work["reports"]):
        assert snapshot(out) == {}, f"{out} was written"


@pytest.mark.parametrize("stage", WORK_STAGES)
def test_an_unreachable_server_stops_every_stage_before_work(work, stage, monkeypatch):
    monkeypatch.setattr(tracking, "STORE_WAIT_SECONDS", 0.2)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://bob:hunter2@127.0.0.1:{_closed_port()}")
    line = assert_one_line_error(*run_stage(stage, "--params", work["params"], *stage_args(work, stage)),
                                 "MLflow store http://bob:***@127.0.0.1", "is unavailable", "nothing was done")
    assert "hunter2" not in line
    _nothing_done(work)


def test_a_store_that_cannot_be_opened_stops_training_before_it_starts(work, tmp_path, monkeypatch):
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'not-a-folder' / 'mlflow.db'}")
    assert_one_line_error(*run_stage("train", "--params", work["params"], *stage_args(work, "train")),
                          "is unavailable", "not-a-folder", "nothing was done")
    _nothing_done(work)


def test_a_locked_store_stops_training_before_it_starts(work, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}?timeout=0.2")  # default: 5 s
    db = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None)
    db.execute("BEGIN EXCLUSIVE")  # what a busy or hung writer holding the database looks like
    try:
        assert_one_line_error(*run_stage("train", "--params", work["params"], *stage_args(work, "train")),
                              "database is locked", "another process holds the database lock")
    finally:
        db.execute("ROLLBACK")
        db.close()
    _nothing_done(work)
