"""The shipped weights: found, checksum-verified, and exported atomically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import idm.pretrained
from idm.checkpoint import make_checkpoint, save_checkpoint
from idm.config import DiffusionConfig, ModelConfig, TrainConfig
from idm.files import file_sha256
from idm.inference.upscaler import DiffusionSR
from idm.models import IDM
from pipeline.stages.export_pretrained import FILE_NAME, export
from tests.helpers import TINY, photo

CFG = ModelConfig(**{k: v for k, v in TINY["model"].items() if k != "preset"})


def _model_pt(path: Path, *, optimizer: dict | None = None) -> Path:
    torch.manual_seed(0)
    model = IDM(CFG)
    save_checkpoint(make_checkpoint(model_config=CFG, diffusion_config=DiffusionConfig(timesteps=50),
                                    train_config=TrainConfig(target="refine", condition_loss=1.0, patch_size=16),
                                    model=model.state_dict(), ema=model.state_dict(), optimizer=optimizer or {},
                                    step=7, rng=[]), path)
    return path


@pytest.fixture
def shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An exported model in a weights folder that idm.pretrained reads instead of the package's."""
    weights = tmp_path / "weights"
    monkeypatch.setattr(idm.pretrained, "WEIGHTS_DIR", weights)
    monkeypatch.setattr(idm.pretrained, "MANIFEST", weights / "manifest.json")
    export(_model_pt(tmp_path / "model.pt"), weights)
    return weights


def test_export_records_the_checksum_and_the_weights_load(shipped: Path) -> None:
    record = json.loads((shipped / "manifest.json").read_text())
    assert record["file"] == FILE_NAME and record["steps"] == 7
    assert record["sha256"] == file_sha256(shipped / FILE_NAME)
    method = DiffusionSR.from_checkpoint(idm.pretrained.weights(), device="cpu")
    assert method.regression and method(photo(8, 8), (16, 16)).shape == (16, 16, 3)


def test_a_damaged_file_is_refused_before_loading(shipped: Path) -> None:
    path = shipped / FILE_NAME
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(idm.pretrained.PretrainedUnavailable, match="does not match the recorded"):
        idm.pretrained.weights()


def test_missing_weights_or_manifest_say_what_to_do(shipped: Path) -> None:
    (shipped / FILE_NAME).unlink()
    with pytest.raises(idm.pretrained.PretrainedUnavailable, match="missing; reinstall"):
        idm.pretrained.weights()
    (shipped / "manifest.json").write_text("{")
    with pytest.raises(idm.pretrained.PretrainedUnavailable, match="no readable manifest"):
        idm.pretrained.weights()


def test_export_refuses_a_training_checkpoint_and_keeps_the_previous_weights(shipped: Path, tmp_path: Path) -> None:
    before = (shipped / FILE_NAME).read_bytes(), (shipped / "manifest.json").read_text()
    training = _model_pt(tmp_path / "checkpoint.pt", optimizer={"state": {}, "param_groups": [{"lr": 1.0}]})
    with pytest.raises(ValueError, match="training checkpoint"):
        export(training, shipped)
    assert ((shipped / FILE_NAME).read_bytes(), (shipped / "manifest.json").read_text()) == before


def test_the_package_ships_weights_that_verify() -> None:
    """The real shipped file: present, matching its manifest, and a regression-capable IDM."""
    record = idm.pretrained.manifest()
    method = DiffusionSR.from_checkpoint(idm.pretrained.weights(), device="cpu")
    assert method.regression and record["bytes"] <= 20 * 2**20
