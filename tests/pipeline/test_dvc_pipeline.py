"""dvc.yaml: every stage's deps cover the code it runs, and `dvc repro` over it in a scratch copy."""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from tests.helpers import TINY, fabricated_weights, photo, stage_store_client, tiny_train_section
from tests.pipeline.data.test_fetch import send, server  # noqa: F401 (server is a fixture)

ROOT = Path(__file__).resolve().parents[2]
# The layers whose code computes a stage's outputs; the plumbing around them (params,
# MLflow tracking, the stage runner, swapping outputs into place) is not followed.
COMPUTE = ("idm", "pipeline.data", "pipeline.evaluation")


def _module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported(path: Path) -> set[str]:
    """Project modules `path` imports anywhere (module level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names if _module_file(f"{node.module}.{a.name}")}
    found = set()
    for name in names:
        parts = name.split(".")
        found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}  # a module imports its packages
    return {n for n in found if n.split(".")[0] in ("idm", "pipeline") and _module_file(n)}


def _only_docstring(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def code_run_by(module: str) -> set[str]:
    """Files (relative to the project) of the compute-layer modules `module` runs, transitively."""
    seen, todo = {module}, [module]
    while todo:
        for name in _imported(_module_file(todo.pop())):
            if name not in seen and any(name == c or name.startswith(c + ".") for c in COMPUTE):
                seen.add(name)
                todo.append(name)
    files = {_module_file(n) for n in seen}
    return {str(f.relative_to(ROOT)) for f in files if not (f.name == "__init__.py" and _only_docstring(f))}


def _stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", sorted(_stages()))
def test_stage_deps_cover_the_code_it_runs(stage: str) -> None:
    spec = _stages()[stage]
    module = spec["cmd"].split("python -m ")[1].split()[0]
    deps = [d if isinstance(d, str) else next(iter(d)) for d in spec["deps"]]
    missing = sorted(f for f in code_run_by(module) if not _covered(f, deps))
    assert not missing, f"{stage} runs code its dvc.yaml deps do not name: {missing}"
    assert all((ROOT / d).exists() for d in deps if not d.startswith(("data/", "models/", "reports/")))


TRAIN_RUNTIME = {"threads", "workers", "log_every", "checkpoint_every"}  # how fast and how often, not what


def test_train_lists_every_key_that_changes_what_it_learns_and_no_other() -> None:
    listed = {p for p in _stages()["train"]["params"] if p.startswith("train.")}
    in_params = set(yaml.safe_load((ROOT / "params.yaml").read_text())["train"])
    assert listed == {f"train.{k}" for k in in_params - TRAIN_RUNTIME}
    assert "train" not in _stages()["train"]["params"]  # not the whole section


def test_inference_and_evaluation_code_is_not_a_train_dependency() -> None:
    stages = _stages()
    train = [d if isinstance(d, str) else next(iter(d)) for d in stages["train"]["deps"]]
    assert not _covered("idm/inference/tiling.py", train) and not _covered("pipeline/evaluation/metrics.py", train)
    assert not [f for f in code_run_by("pipeline.stages.train") if f.startswith(("idm/inference", "pipeline/evaluation"))]
    assert "idm/inference/tiling.py" in code_run_by("pipeline.stages.evaluate")
    assert _covered("idm/inference/tiling.py", stages["evaluate"]["deps"])


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
    params["prepare"] = {"scales": [2], "ood_scales": [4], "seed": 0}  # two scales keep the run short
    params.update({k: v for k, v in TINY.items() if k not in ("evaluate", "train")})
    params["train"] = tiny_train_section()
    params["evaluate"].update(lpips=False, fid=False, device="cpu", methods=["bicubic", "idm", "idm-int8"])
    params["report"].update(crop=16)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    return work


@pytest.mark.slow
def test_dvc_repro_runs_every_stage_then_is_up_to_date(project, server, tmp_path, monkeypatch):  # noqa: F811
    # LPIPS and FID/KID weights come from a local server on first use (fabricated files, a few KB).
    params = yaml.safe_load((project / "params.yaml").read_text())
    for key in ("lpips", "fid"):
        data = fabricated_weights(key)
        server.routes[f"/{key}.pth"] = send(data)
        params["evaluate"].update({key: True, f"{key}_url": server.url(f"/{key}.pth"),
                                   f"{key}_sha256": hashlib.sha256(data).hexdigest()})
    params["evaluate"].update(fid_patch=32, fid_min_patches=3, kid_min_patches=3)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("IDM_OFFLINE")

    first = dvc(project, "repro")
    assert first.returncode == 0, first.stdout + first.stderr
    for stage in ("download", "prepare", "train", "quantize", "evaluate", "report"):
        assert f"Running stage '{stage}'" in first.stdout
    numbers = json.loads((project / "reports" / "metrics.json").read_text())
    assert set(numbers["idm"]) == set(numbers["bicubic"]) == set(numbers["idm-int8"])
    assert sorted(p.name for p in (tmp_path / "torch" / "hub" / "checkpoints").iterdir()) == [
        "alexnet-owt-7be5be79.pth", "weights-inception-2015-12-05-6726825d.pth"]
    assert server.hits == {"/lpips.pth": 1, "/fid.pth": 1}
    for metric in ("lpips", "fid", "kid"):
        assert all(math.isfinite(numbers[m][f"{metric}.tiny.x2"]) for m in ("bicubic", "idm", "idm-int8")), metric
    assert numbers["bicubic"]["lpips.tiny.x2"] < numbers["bicubic"]["lpips.tiny.x4"]
    manifest = pd.read_csv(project / "data" / "prepared" / "manifest.csv")
    hr_x2 = manifest[(manifest.split == "test") & (manifest.scale == 2)].hr
    shapes = [Image.open(project / "data" / "prepared" / path).size for path in hr_x2]
    assert numbers["idm"]["fid_patches.tiny.x2"] == sum((w // 32) * (h // 32) for w, h in shapes) >= 3
    unavailable = json.loads((project / "reports" / "unavailable.json").read_text())
    assert "NIQE's minimum" in unavailable["niqe.tiny.x2"]  # the test images are under 96 px
    report = json.loads((project / "models" / "idm-int8" / "report.json").read_text())
    assert report["int8_bytes"] < report["fp32_bytes"]
    # The registry: the int8 version has the candidate's alias plus -int8, and every version
    # says what it is; `idm upscale --int8` finds the int8 model from the candidate's URI.
    client = stage_store_client()
    fp32 = json.loads((project / "models" / "idm" / "registered.json").read_text())["version"]
    int8 = json.loads((project / "models" / "idm-int8" / "registered.json").read_text())["version"]
    assert str(client.get_model_version_by_alias("idm", "candidate-int8").version) == int8
    assert client.get_model_version("idm", int8).tags["fp32_version"] == fp32
    described = client.get_model_version("idm", fp32).description
    assert f"{params['train']['steps']} steps of batch {params['train']['batch_size']}" in described
    assert f"Last evaluation (evaluate stage), psnr_y: tiny x2 {numbers['idm']['psnr_y.tiny.x2']:.2f}, " in described
    assert client.get_model_version("idm", int8).description.startswith(f"Int8 post-training quantization "
                                                                        f"(training-free) of the denoiser of version {fp32};")
    assert "candidate-int8" in client.get_registered_model("idm").description
    from pipeline import cli

    Image.fromarray(photo(12, 10, 0)).save(tmp_path / "lr.png")
    cli.main(["upscale", str(tmp_path / "lr.png"), "--scale", "2", "--model", "models:/idm@candidate", "--int8",
              "--steps", "1", "--out", str(tmp_path / "up.png")])
    assert Image.open(tmp_path / "up.png").size == (20, 24)
    assert numbers["bicubic"]["psnr_y.tiny.x2"] > numbers["bicubic"]["psnr_y.tiny.x4"] > 15
    assert (project / "reports" / "report.md").read_text().startswith("# IDM evaluation report")
    assert (project / "dvc.lock").exists()

    second = dvc(project, "repro")
    assert second.returncode == 0 and "Data and pipelines are up to date." in second.stdout
    # Importing the code writes bytecode next to it; DVC must not see a changed dependency.
    subprocess.run([sys.executable, "-m", "compileall", "-q", "idm", "pipeline"], cwd=project, check=True)
    assert list((project / "idm" / "diffusion").glob("__pycache__/*.pyc"))
    status = dvc(project, "status")
    assert status.returncode == 0 and "Data and pipelines are up to date." in status.stdout, status.stdout
    # Run-time settings (threads, input workers, logging) never retrain.
    edited = yaml.safe_load((project / "params.yaml").read_text())
    edited["train"].update(threads=2, workers=1, log_every=7, checkpoint_every=3)
    (project / "params.yaml").write_text(yaml.safe_dump(edited))
    assert "train" not in json.loads(dvc(project, "status", "--json").stdout)
    (project / "params.yaml").write_text(yaml.safe_dump(params))

    shown = dvc(project, "metrics", "show", "--json")
    assert "psnr_y.tiny.x2" in shown.stdout and "NIQE's minimum" not in shown.stdout  # numbers only
    plot = json.loads(dvc(project, "plots", "show", "--json").stdout)["data"]["reports/scales.csv"][0]["content"]
    assert plot["encoding"]["color"]["field"] == "method"  # one line per method, not per revision
    assert {row["method"] for row in plot["data"]["values"]} == {"bicubic", "idm", "idm-int8"}

    # An edit to inference or evaluation code re-runs what uses it, never training.
    for path in ("idm/inference/tiling.py", "pipeline/evaluation/metrics.py"):
        with open(project / path, "a") as f:
            f.write("# an edit\n")
    status = dvc(project, "status", "--json")
    changed = json.loads(status.stdout)
    assert "evaluate" in changed and "quantize" in changed
    assert "train" not in changed and "prepare" not in changed


def test_project_root_of_a_dvc_experiment_copy(tmp_path: Path) -> None:
    from pipeline.tracking import project_root

    assert project_root(tmp_path / "proj") == tmp_path / "proj"
    assert project_root(tmp_path / "proj" / ".dvc" / "tmp" / "exps" / "tmpab12") == tmp_path / "proj"
    assert project_root(tmp_path / "proj" / ".dvc" / "tmp" / "exps" / "celery" / "tmpcd34") == tmp_path / "proj"


@pytest.mark.slow
def test_dvc_exp_run_temp_logs_to_the_project_store(tmp_path: Path, monkeypatch) -> None:
    """`dvc exp run --temp` runs the stage in a copy under .dvc/tmp/exps; its MLflow run must land
    in the project's mlflow.db, not in the copy's (which DVC deletes)."""
    work = tmp_path / "project"
    work.mkdir()
    for name in ("idm", "pipeline"):
        shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "params.yaml", work / "params.yaml")
    (work / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"track": {
        "cmd": "python -c \"from pipeline.tracking import stage_run; import pipeline.params as p; "
               "r = stage_run('evaluate', tags={'method': 'exp-probe', 'seed': str(p.load().prepare.seed)}); "
               "r.__enter__(); r.__exit__(None, None, None)\"",
        "deps": ["pipeline/tracking.py"], "params": ["prepare.seed"]}}}))
    git = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for key, value in git.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the project's own store, as outside the tests
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    assert dvc(work, "init", "-q").returncode == 0
    for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=work, check=True)
    ran = dvc(work, "exp", "run", "--temp", "-S", "prepare.seed=7")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.method = 'exp-probe'")
    assert [r.data.tags["seed"] for r in runs] == ["7"]
    assert not (work / ".dvc" / "tmp" / "exps").exists() or not list((work / ".dvc" / "tmp" / "exps").rglob("mlflow.db"))
