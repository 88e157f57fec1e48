"""Helpers of the reliability suite: stages run in this process, scratch DVC projects, injected faults."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import yaml

from tests.conftest_prefect import make_project, real_stages
from tests.helpers import TINY, tiny_train_section

ROOT = Path(__file__).resolve().parents[2]
FAULTS = Path(__file__).parent / "faults"  # holds the sitecustomize.py that injects IDM_FAULT
STAGES = ("download", "prepare", "train", "quantize", "evaluate", "report")


def run_stage(name: str, *args: str | Path) -> tuple[int, str]:
    """`python -m pipeline.stages.<name> args...`, run in this process: (exit code, stderr).

    An uncaught exception counts as exit code 1 with its traceback as stderr, as in a
    real process. Much faster than a subprocess (torch and MLflow are imported once).
    """
    import importlib

    from pipeline.stages import run

    module = importlib.import_module(f"pipeline.stages.{name}")
    err = io.StringIO()
    argv = sys.argv
    sys.argv = [f"pipeline.stages.{name}", *map(str, args)]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            run(module.main)
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    except Exception:  # noqa: BLE001 -- what a real process would die of
        err.write(traceback.format_exc())
        code = 1
    finally:
        sys.argv = argv
    return code, err.getvalue()


def assert_one_line_error(code: int, stderr: str, *fragments: str) -> str:
    """Exit code 2 and exactly one stderr line `error: ...` holding every fragment; returns that line.

    Progress bars (tqdm) and MLflow's INFO log lines, on stderr too, are the only other lines allowed.
    """
    lines = [line for chunk in stderr.splitlines() for line in chunk.split("\r") if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    others = [line for line in lines if not line.startswith("error: ") and "%|" not in line
              and not re.match(r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d INFO mlflow", line)]
    assert code == 2 and len(errors) == 1 and not others, f"exit {code}:\n{stderr}"
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    return errors[0]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (hidden ones too) as {relative path: bytes}; {} if `root` does not exist."""
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary files or folders (atomic writers and staged_dir name them .<name>.*) in `folder`."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.exists() else []


def tiny_params(images: Path, *, test_fraction: float = 0.5, **sections: dict[str, Any]) -> dict[str, Any]:
    """A params.yaml dict: the TINY model and training run of tests/helpers.py on a folder of images;
    `sections` update the sections of the same name."""
    params = {
        "datasets": [{"name": "tiny", "source": "folder", "path": str(images), "test_fraction": test_fraction}],
        "prepare": {"scales": [2, 3], "ood_scales": [4], "seed": 0},
        **{k: dict(v) for k, v in TINY.items()},
        "report": {"crop": 16, "grid_scales": [2]},
    }
    params["train"] = tiny_train_section()
    params["train"]["threads"] = 1
    params["evaluate"] = {"methods": ["bicubic", "idm", "idm-int8"], "device": "cpu", "lpips": False, "fid": False}
    for name, values in sections.items():
        params[name] = {**params.get(name, {}), **values}
    return params


def write_params(path: Path, params: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def dvc_project(work: Path, **sections: dict[str, Any]) -> Path:
    """A scratch copy of the project with the real dvc.yaml and a tiny params.yaml (see tiny_params)."""
    project = make_project(work, real_stages(*STAGES))
    images = Path(yaml.safe_load((project / "params.yaml").read_text())["datasets"][0]["path"])
    write_params(project / "params.yaml", tiny_params(images, **sections))
    return project


def child_env(fault: dict[str, Any] | None = None) -> dict[str, str]:
    """The environment of DVC and stage subprocesses: one CPU thread, this venv, an optional fault."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("IDM_FAULT", None)
    if fault is not None:
        env["IDM_FAULT"] = json.dumps(fault)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FAULTS), os.environ.get("PYTHONPATH")]))
    return env


def dvc(project: Path, *args: str, fault: dict[str, Any] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=child_env(fault),
                          capture_output=True, text=True, timeout=timeout)


def start_dvc(project: Path, *args: str, fault: dict[str, Any] | None = None) -> subprocess.Popen:
    """`dvc args...` in the background, in its own process group (so a kill reaches the stage too)."""
    return subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=project, env=child_env(fault),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(marker: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Wait until `marker` exists; fail with the process's output if it ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_group(proc)
            raise AssertionError(f"{marker.name} never appeared; output:\n{proc.stdout.read()}")
        time.sleep(0.05)


def kill_group(proc: subprocess.Popen) -> str:
    """kill -9 the process group of `proc` (DVC and the stage it runs); returns what it printed."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    return out


def prepared_workspace(tmp: Path, **sections: dict[str, Any]) -> dict[str, Path]:
    """A folder of images in several modes, a tiny params.yaml, and data/raw + data/prepared made by the stages."""
    from tests.helpers import make_image_folder

    images = make_image_folder(tmp / "images")
    w = {"images": images, "params": write_params(tmp / "params.yaml", tiny_params(images, **sections)),
         "raw": tmp / "data" / "raw", "prepared": tmp / "data" / "prepared", "sr": tmp / "data" / "sr",
         "models": tmp / "models" / "idm", "reports": tmp / "reports"}
    for stage, args in (("download", ("--out", w["raw"])), ("prepare", ("--raw", w["raw"], "--out", w["prepared"]))):
        code, err = run_stage(stage, "--params", w["params"], *args)
        assert code == 0, err
    return w


def stage_args(w: dict[str, Path], stage: str) -> list[str | Path]:
    """The command-line arguments of `stage` on workspace `w` (as dvc.yaml gives them)."""
    return {
        "download": ["--out", w["raw"]],
        "prepare": ["--raw", w["raw"], "--out", w["prepared"]],
        "train": ["--prepared", w["prepared"], "--out", w["models"]],
        "quantize": ["--prepared", w["prepared"], "--checkpoint", w["models"] / "model.pt",
                     "--out", w["models"].parent / "idm-int8"],
        "evaluate": ["--prepared", w["prepared"], "--sr-out", w["sr"], "--metrics", w["reports"] / "metrics.json",
                     "--unavailable", w["reports"] / "unavailable.json", "--scales", w["reports"] / "scales.csv", "--per-image", w["reports"] / "per_image.csv",
                     "--checkpoint", w["models"] / "model.pt"],
        "report": ["--prepared", w["prepared"], "--sr", w["sr"], "--reports", w["reports"]],
    }[stage]
