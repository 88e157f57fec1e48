"""train -> evaluate -> registry, through the stage entry points, on a tiny configuration."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from tests.helpers import TINY, make_image_folder, stage_store_client, stage_store_runs
from tests.pipeline.stages.test_stages import assert_user_error, stage, write_params


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp_path = tmp_path_factory.mktemp("train_stage")
    image_folder = make_image_folder(tmp_path / "images")
    params = write_params(tmp_path / "params.yaml", [{"name": "tiny", "source": "folder", "path": str(image_folder),
                                                     "test_fraction": 0.5}], **{k: v for k, v in TINY.items() if k == "evaluate"})
    import yaml

    raw = yaml.safe_load(params.read_text())
    raw.update({k: v for k, v in TINY.items() if k != "evaluate"})
    params.write_text(yaml.safe_dump(raw))
    p = {"params": params, "raw": tmp_path / "raw", "prepared": tmp_path / "prepared", "models": tmp_path / "models",
         "reports": tmp_path / "reports", "sr": tmp_path / "sr"}
    assert stage("download", "--params", params, "--out", p["raw"]).returncode == 0
    assert stage("prepare", "--params", params, "--raw", p["raw"], "--out", p["prepared"]).returncode == 0
    r = stage("train", "--params", params, "--prepared", p["prepared"], "--out", p["models"])
    assert r.returncode == 0, r.stderr[-3000:]
    return p


def evaluate(p: dict[str, Path], *extra: str | Path) -> subprocess.CompletedProcess:
    return stage("evaluate", "--params", p["params"], "--prepared", p["prepared"], "--sr-out", p["sr"],
                 "--metrics", p["reports"] / "metrics.json",
                 "--unavailable", p["reports"] / "unavailable.json", "--scales", p["reports"] / "scales.csv",
                 "--per-image", p["reports"] / "per_image.csv", "--checkpoint", p["models"] / "model.pt", *extra)


@pytest.mark.slow
def test_train_registers_and_evaluate_links(trained):
    p = trained
    record = json.loads((p["models"] / "registered.json").read_text())
    client = stage_store_client()
    version = client.get_model_version_by_alias("idm", "candidate")
    assert str(version.version) == record["version"] and version.run_id == record["run_id"]
    train_run = client.get_run(record["run_id"])
    assert train_run.data.tags["dvc_stage"] == "train"
    assert train_run.data.params["train.steps"] == "6"
    assert [m.step for m in client.get_metric_history(record["run_id"], "loss")] == [2, 4, 6]
    assert any(a.path.startswith("images") for a in client.list_artifacts(record["run_id"])), "sample images logged"

    r = evaluate(p)
    assert r.returncode == 0, r.stderr[-3000:]
    numbers = json.loads((p["reports"] / "metrics.json").read_text())
    assert {"bicubic", "idm"} <= set(numbers)
    assert set(numbers["idm"]) == set(numbers["bicubic"])
    assert stage_store_runs("tags.method = 'idm'")[0].data.tags["train_run_id"] == record["run_id"]

    # A registered model evaluates by URI, outside DVC, under its own label.
    r = evaluate(p, "--model-uri", "models:/idm@candidate", "--label", "champion")
    assert r.returncode == 0, r.stderr[-3000:]
    by_uri = json.loads((p["reports"] / "metrics.json").read_text())
    assert set(by_uri) == {"champion"}
    assert by_uri["champion"] == pytest.approx(numbers["idm"], abs=1e-6), "same weights, same sampler, same numbers"


@pytest.mark.slow
def test_evaluate_without_model_is_a_clear_error(trained):
    r = evaluate(trained, "--checkpoint", trained["models"] / "missing.pt")
    assert_user_error(r, "missing.pt: no trained model; run the train stage first")
    r = evaluate(trained, "--model-uri", "models:/idm/999", "--label", "x")
    assert_user_error(r, "cannot load model 'models:/idm/999'")


def test_train_without_training_images(tmp_path, image_folder):
    params = write_params(tmp_path / "params.yaml", [{"name": "t", "source": "folder", "path": str(image_folder)}])
    assert stage("download", "--params", params, "--out", tmp_path / "raw").returncode == 0
    assert stage("prepare", "--params", params, "--raw", tmp_path / "raw", "--out", tmp_path / "prep").returncode == 0
    r = stage("train", "--params", params, "--prepared", tmp_path / "prep", "--out", tmp_path / "models")
    assert_user_error(r, "no training images")
    assert not (tmp_path / "models").exists()


@pytest.mark.slow
def test_train_stage_starts_its_own_ddp_processes(trained, tmp_path):
    """train.processes: 2 on CPU: the stage relaunches itself under torchrun; rank 0 trains,
    checkpoints every rank's random state and registers, as under a hand-typed torchrun."""
    import yaml

    from idm.checkpoint import load_checkpoint

    raw = yaml.safe_load(trained["params"].read_text())
    raw["train"].update(processes=2, threads=1)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    r = stage("train", "--params", params, "--prepared", trained["prepared"], "--out", tmp_path / "models")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "training in 2 DDP processes x 1 thread(s)" in r.stdout
    assert not (tmp_path / "models" / "checkpoint.pt.lock").exists(), "rank 0 let go of the folder at the end"
    ckpt = load_checkpoint(tmp_path / "models" / "checkpoint.pt")
    assert ckpt["step"] == raw["train"]["steps"] and len(ckpt["rng"]) == 2
    record = json.loads((tmp_path / "models" / "registered.json").read_text())
    assert stage_store_client().get_run(record["run_id"]).data.params["train_stage.processes"] == "2"

    # train.workers: 1 streams the images from files decoded once (rank 0 writes them, rank 1
    # reads them after a barrier) and trains to the very same weights.
    raw["train"].update(workers=1)
    params.write_text(yaml.safe_dump(raw))
    r = stage("train", "--params", params, "--prepared", trained["prepared"], "--out", tmp_path / "streamed")
    assert r.returncode == 0, r.stderr[-3000:]
    cache = trained["prepared"].parent / "train-cache"
    assert json.loads((cache / "index.json").read_text())["inputs"] == record_inputs(trained)
    streamed = load_checkpoint(tmp_path / "streamed" / "checkpoint.pt")
    for part in ("model", "ema"):
        assert all(torch.equal(ckpt[part][k], streamed[part][k]) for k in ckpt[part]), part


def record_inputs(trained) -> str:
    from pipeline.stages.train import inputs_digest, read_training_images

    return inputs_digest(read_training_images(trained["prepared"]))


def test_a_checkpoint_whose_weights_do_not_fit_its_config_is_set_aside_not_resumed(tmp_path, image_folder):
    """Configs equal to params.yaml's but tensors of another shape: resuming would fail inside
    load_state_dict, so the stage starts afresh and says why."""
    from dataclasses import asdict

    from idm.checkpoint import make_checkpoint, save_checkpoint
    from idm.config import ModelConfig
    from idm.models import IDM
    from pipeline.params import load
    from pipeline.stages.train import resume_blocker
    from tests.reliability.harness import tiny_params
    from tests.reliability.harness import write_params as write_raw

    params = load(write_raw(tmp_path / "params.yaml", tiny_params(image_folder)))
    other = IDM(ModelConfig(**{**asdict(params.model), "base_channels": 2 * params.model.base_channels})).state_dict()
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(make_checkpoint(model_config=params.model, diffusion_config=params.diffusion,
                                    train_config=params.train, model=other, ema=other, optimizer={}, step=1, rng=[]),
                    path)
    reason = resume_blocker(path, params)
    assert reason is not None and reason.startswith(f"{path}'s weights do not fit its model_config: the config "
                                                    "implies"), reason


@pytest.mark.parametrize("codes, exit_code, line", [
    ({0: 2, 1: 143}, 2, ""),  # rank 0 printed its own error line; rank 1 was stopped
    ({0: -15, 1: 1}, 1, ""),  # rank 1's traceback is on stderr
    ({0: -15, 1: -9}, 2, "\nerror: training worker 1 died (signal 9); the last checkpoint is kept\n"),
    ({0: 143, 1: -11}, 2, "\nerror: training worker 1 died (signal 11); the last checkpoint is kept\n"),
    ({0: 143, 1: 137}, 2, "error: training worker 1 stopped (exit code 137); the last checkpoint is kept\n"),
])
def test_a_failed_ddp_run_ends_in_at_most_one_error_line_naming_its_cause(capsys, codes, exit_code, line):
    """The processes the agent stopped once another failed (SIGTERM, or exit 143) are never the cause."""
    from types import SimpleNamespace

    from pipeline.stages.train import failure_exit

    assert failure_exit({rank: SimpleNamespace(exitcode=code) for rank, code in codes.items()}) == exit_code
    assert capsys.readouterr().err == line
