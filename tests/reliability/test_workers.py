"""The train stage's DDP processes (train.processes: 2 on CPU) under kills, Ctrl-C and a second run.

Each test starts the real stage as a subprocess, group leader of its own session as under
`dvc repro`, on a tiny prepared workspace (TINY model, 9 steps, a checkpoint every 3), holds
rank 0 right after its step-3 checkpoint (fault `pause-after-save`), then:

- SIGKILL to the stage alone: both DDP processes die with it (no orphan trains on and
  rewrites checkpoint.pt), and nothing is left in the TMPDIR the stage was given;
- SIGINT to the process group (Ctrl-C in a terminal): one `error: interrupted` line;
- a second training of the same output folder: refused in one line naming the lock and the
  PID of the first, which holds it; then one DDP process of the first is killed: one line
  naming it, no traceback.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from idm.checkpoint import load_checkpoint
from tests.reliability.harness import child_env, prepared_workspace, stage_args, write_params

pytestmark = pytest.mark.reliability

ROOT = Path(__file__).resolve().parents[2]
TRAIN = {"processes": 2, "threads": 1, "steps": 9, "checkpoint_every": 3, "log_every": 3, "sample_every": 0}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return prepared_workspace(tmp_path_factory.mktemp("workers"), train=TRAIN)


class Training:
    """`python -m pipeline.stages.train` on `out` in its own session, its output in files (an orphan
    holding a pipe open would block the reader), TMPDIR a folder of its own, rank 0 held after
    its step-3 checkpoint until `release()`."""

    def __init__(self, w: dict[str, Path], out: Path, tmp: Path, *, hold: bool = True) -> None:
        self.tmp, self.out, self.ckpt = tmp, out, out / "checkpoint.pt"
        tmp.mkdir(parents=True)
        self.marker, self.released = tmp / "saved-3", tmp / "release"
        self.tmpdir = tmp / "TMPDIR"
        self.tmpdir.mkdir()
        fault = {"kind": "pause-after-save", "step": 3, "marker": str(self.marker), "release": str(self.released)}
        env = {**child_env(fault if hold else None), "TMPDIR": str(self.tmpdir)}
        args = ["--params", w["params"], "--prepared", w["prepared"], "--out", out]
        with open(tmp / "stdout", "w") as stdout, open(tmp / "stderr", "w") as stderr:
            self.proc = subprocess.Popen([sys.executable, "-m", "pipeline.stages.train", *map(str, args)], cwd=ROOT,
                                         env=env, stdout=stdout, stderr=stderr, start_new_session=True)
        self.workers: list[int] = []

    def wait_for_step_3(self, timeout: float = 240) -> list[int]:
        """Wait for rank 0's step-3 checkpoint; returns the PIDs of the DDP processes."""
        deadline = time.monotonic() + timeout
        while not self.marker.exists():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.stderr()
            time.sleep(0.05)
        self.workers = [pid for pid in _descendants(self.proc.pid) if "pipeline.stages.train" in _cmdline(pid)
                        and "torch.distributed.run" not in _cmdline(pid)]
        assert len(self.workers) == 2, (self.workers, self.stderr())
        return self.workers

    def release(self) -> None:
        self.released.touch()

    def finish(self, timeout: float = 120) -> int:
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        return (self.tmp / "stderr").read_text()

    def kill_all(self) -> None:
        """Clean up after a failed assertion: no process of a test outlives it."""
        for pid in [self.proc.pid, *self.workers]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


@pytest.fixture
def trainings():
    started: list[Training] = []
    yield started
    for training in started:
        training.kill_all()


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                children.setdefault(int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]), []).append(
                    int(entry.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


def _survivors(pids: list[int], timeout: float = 20) -> list[int]:
    """The processes of `pids` still running after up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while any(map(_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [pid for pid in pids if _alive(pid)]


def _error_lines(stderr: str) -> tuple[list[str], list[str]]:
    """(`error:` lines, other lines) of a stage's stderr; progress bars and MLflow INFO lines are left out."""
    lines = [line for chunk in stderr.splitlines() for line in chunk.split("\r") if line.strip()]
    others = [line for line in lines if not line.startswith("error: ") and "%|" not in line
              and not re.match(r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d INFO mlflow", line)]
    return [line for line in lines if line.startswith("error: ")], others


def _left_in(tmpdir: Path) -> list[str]:
    """What the stage left in its TMPDIR; torch's per-user compile cache folder is meant to stay."""
    return sorted(p.name for p in tmpdir.iterdir() if not p.name.startswith("torchinductor_"))


def test_killing_the_stage_alone_kills_its_training_processes(workspace, tmp_path, trainings):
    """SIGKILL reaches only the stage (as when `dvc repro`'s group is killed: the DDP processes
    run in sessions of their own); they die with it and checkpoint.pt stops changing."""
    first = Training(workspace, tmp_path / "models", tmp_path / "run")
    trainings.append(first)
    workers = first.wait_for_step_3()
    os.kill(first.proc.pid, signal.SIGKILL)
    first.release()  # an orphan rank 0 would now train on to step 9, rewriting checkpoint.pt
    assert first.finish() == -signal.SIGKILL
    assert _survivors(workers) == [], f"DDP processes outlived the stage: {[_cmdline(p) for p in workers]}"
    written = first.ckpt.stat().st_mtime_ns
    time.sleep(1.0)
    assert first.ckpt.stat().st_mtime_ns == written and load_checkpoint(first.ckpt)["step"] == 3
    assert _left_in(first.tmpdir) == [], "torchelastic's log folders stay out of TMPDIR, even after SIGKILL"


def test_ctrl_c_stops_every_process_in_one_line(workspace, tmp_path, trainings):
    first = Training(workspace, tmp_path / "models", tmp_path / "run")
    trainings.append(first)
    workers = first.wait_for_step_3()
    os.killpg(first.proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: the foreground group
    first.release()
    assert first.finish() == 130, first.stderr()
    errors, others = _error_lines(first.stderr())
    assert len(errors) == 1 and errors[0].startswith("error: interrupted") and others == [], first.stderr()
    assert _survivors(workers) == []
    assert load_checkpoint(first.ckpt)["step"] == 3, "the last checkpoint stands"
    assert not (first.out / "checkpoint.pt.lock").exists(), "rank 0 let go of the output folder"
    assert _left_in(first.tmpdir) == []


def test_a_second_training_of_the_folder_is_refused_and_a_killed_worker_is_named(workspace, tmp_path, trainings):
    first = Training(workspace, tmp_path / "models", tmp_path / "run")
    trainings.append(first)
    workers = first.wait_for_step_3()

    # One process, so the refusal comes from the lock rank 0 takes (the DDP launcher checks it first too).
    raw = yaml.safe_load(workspace["params"].read_text())
    raw["train"]["processes"] = 1
    single = write_params(tmp_path / "single.yaml", raw)
    second = subprocess.run([sys.executable, "-m", "pipeline.stages.train", "--params", str(single),
                             *map(str, stage_args({**workspace, "models": first.out}, "train"))],
                            cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=240)
    errors, others = _error_lines(second.stderr)
    assert second.returncode == 2 and len(errors) == 1 and others == [], second.stderr
    assert f"is being written by another training (PID {first.proc.pid}, which holds " in errors[0], errors
    assert "checkpoint.pt.lock" in errors[0] and second.stdout == "", "refused before touching the folder"

    rank1 = next(pid for pid in workers if b"\0RANK=1\0" in b"\0" + Path(f"/proc/{pid}/environ").read_bytes())
    os.kill(rank1, signal.SIGKILL)
    first.release()
    assert first.finish() == 2, first.stderr()
    errors, others = _error_lines(first.stderr())
    assert errors == ["error: training worker 1 died (signal 9); the last checkpoint is kept"], first.stderr()
    assert others == [], first.stderr()
    assert _survivors(workers) == []
    assert load_checkpoint(first.ckpt)["step"] == 3


def test_a_training_process_whose_launcher_is_gone_exits_at_once():
    """die_with_parent: the parent-death signal is set, and a process adopted by another parent
    (its launcher died before the request took effect) stops before doing anything."""
    script = ("import ctypes, os\n"
              "from pipeline.stages.train import LAUNCHER, die_with_parent\n"
              "os.environ[LAUNCHER] = str(os.getppid())\n"
              "die_with_parent()\n"
              "signum = ctypes.c_int()\n"
              "ctypes.CDLL(None).prctl(2, ctypes.byref(signum), 0, 0, 0)  # PR_GET_PDEATHSIG\n"
              "print('death signal', signum.value, flush=True)\n"
              "os.environ[LAUNCHER] = str(os.getppid() + 1)  # as if adopted\n"
              "die_with_parent()\n"
              "print('still running')\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=child_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.stdout == f"death signal {int(signal.SIGKILL)}\n", r.stdout + r.stderr
    assert r.returncode == 143 and r.stderr == ("error: the training launcher ended before this DDP process "
                                                "started; exiting\n"), r.stderr
