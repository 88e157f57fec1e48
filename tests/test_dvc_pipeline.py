"""`dvc repro` over the real dvc.yaml in a scratch copy of the project."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import TINY

ROOT = Path(__file__).resolve().parent.parent


def dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def project(tmp_path: Path, image_folder: Path) -> Path:
    work = tmp_path / "project"
    work.mkdir()
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, work / name)
    for name in ("idm", "pipeline", ".dvc"):
        shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["datasets"] = [{"name": "tiny", "source": "folder", "path": str(image_folder), "test_fraction": 0.5}]
    params["prepare"] = {"scales": [2, 3], "ood_scales": [4], "seed": 0}
    params.update({k: v for k, v in TINY.items() if k != "evaluate"})
    params["evaluate"].update(lpips=False, fid=False, device="cpu", methods=["bicubic", "idm", "idm-int8"])
    params["report"].update(crop=16)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    return work


@pytest.mark.slow
def test_dvc_repro_runs_every_stage_then_is_up_to_date(project):
    first = dvc(project, "repro")
    assert first.returncode == 0, first.stdout + first.stderr
    for stage in ("download", "prepare", "train", "quantize", "evaluate", "report"):
        assert f"Running stage '{stage}'" in first.stdout
    numbers = json.loads((project / "reports" / "metrics.json").read_text())
    assert set(numbers["idm"]) == set(numbers["bicubic"]) == set(numbers["idm-int8"])
    report = json.loads((project / "models" / "idm-int8" / "report.json").read_text())
    assert report["int8_bytes"] < report["fp32_bytes"]
    assert (project / "models" / "idm" / "registered.json").exists()
    assert numbers["bicubic"]["psnr_y.tiny.x2"] > numbers["bicubic"]["psnr_y.tiny.x3"] > numbers["bicubic"]["psnr_y.tiny.x4"] > 15
    assert (project / "reports" / "report.md").read_text().startswith("# IDM evaluation report")
    assert (project / "dvc.lock").exists()

    second = dvc(project, "repro")
    assert second.returncode == 0 and "Data and pipelines are up to date." in second.stdout

    shown = dvc(project, "metrics", "show", "--json")
    assert "psnr_y.tiny.x2" in shown.stdout
