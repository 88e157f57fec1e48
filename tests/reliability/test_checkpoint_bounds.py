"""Crafted checkpoint files: configs that do not describe their own weights, huge declared sizes,
missing or unknown config keys. Each is refused with one CheckpointError naming the field or key,
decided from the config and the stored shapes before any model or schedule is built."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import idm.checkpoint
from idm.checkpoint import (
    CheckpointError,
    build_model,
    check_weights,
    load_checkpoint,
    make_checkpoint,
    save_checkpoint,
)
from idm.config import DiffusionConfig, ModelConfig, TrainConfig
from idm.models import IDM
from tests.helpers import TINY, photo

pytestmark = pytest.mark.reliability

ROOT = Path(__file__).resolve().parents[2]
CFG = ModelConfig(**{k: v for k, v in TINY["model"].items() if k != "preset"})


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An untrained TINY model's checkpoint dict (a few hundred KB on disk)."""
    torch.manual_seed(0)
    weights = IDM(CFG).state_dict()
    return make_checkpoint(model_config=CFG, diffusion_config=DiffusionConfig(timesteps=50),
                           train_config=TrainConfig(target="residual", patch_size=16), model=weights, ema=weights,
                           optimizer={}, step=0, rng=[])


def _crafted(real: dict, tmp_path: Path, section: str = "model_config", **changes) -> Path:
    path = tmp_path / "crafted.pt"
    save_checkpoint({**real, section: {**real[section], **changes}}, path)
    assert path.stat().st_size < 1_000_000
    return path


@pytest.mark.parametrize("field, value, named", [
    ("base_channels", 4096, "base_channels x channel_mults = 8,192, wider than any stored tensor"),
    ("encoder_channels", 1_000_000, "encoder_channels = 1,000,000, wider than any stored tensor"),
    ("implicit_hidden", 500_000, "implicit_hidden = 500,000, wider than any stored tensor"),
    ("encoder_blocks", 10_000_000, "encoder_blocks = 10,000,000 blocks, but it holds"),
    ("channel_mults", [1] * 200_000, "channel_mults x res_blocks = 1,000,000 blocks, but it holds"),
])
def test_a_small_file_declaring_a_huge_model_is_refused_before_allocation(real, tmp_path, monkeypatch, field,
                                                                         value, named):
    path = _crafted(real, tmp_path, **{field: value})
    ckpt = load_checkpoint(path)
    built = []
    monkeypatch.setattr(idm.checkpoint, "IDM", lambda cfg: built.append(cfg) or IDM(CFG))
    with pytest.raises(CheckpointError, match="weights do not fit its model_config") as err:
        build_model(ckpt)
    assert named in str(err.value) and built == [], "refused from the config and the stored shapes alone"


def test_weights_of_the_declared_shapes_made_of_broadcast_views_are_refused(real, tmp_path, monkeypatch):
    """A paper-size config whose every tensor is a stride-0 view of one number: a few KB on disk,
    ~400 MB once copied (by the digest check or the model). Refused on load, before both."""
    paper = ModelConfig()
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in IDM(paper).state_dict().items()}
    one = torch.zeros(())
    views = {k: one.expand(shape) for k, shape in shapes.items()}
    path = tmp_path / "views.pt"
    save_checkpoint({**real, "model_config": dataclasses.asdict(paper), "model": views, "ema": views}, path)
    assert path.stat().st_size < 200_000
    monkeypatch.setattr(idm.checkpoint, "content_digest", lambda ckpt: pytest.fail("digested the views"))
    with pytest.raises(CheckpointError, match=r"views.pt: not a checkpoint written by idm: it holds a tensor of "
                                              r"shape \(64, 3, 3, 3\) backed by only 4 bytes"):
        load_checkpoint(path)
    # The same weights as views into one shared buffer, each backed but all aliased, in memory:
    buffer = torch.zeros(max(math.prod(shape) for shape in shapes.values()))
    aliased = {k: buffer[: math.prod(shape)].view(shape) for k, shape in shapes.items()}
    monkeypatch.setattr(idm.checkpoint, "IDM", lambda cfg: pytest.fail("allocated"))
    with pytest.raises(CheckpointError, match=r"its tensors claim 393,653,016 bytes but only 18,874,368 are stored"):
        check_weights(paper, aliased)


def test_shapes_of_another_config_name_the_tensor_and_both_sizes(real, tmp_path):
    path = _crafted(real, tmp_path, base_channels=4, norm_groups=4)
    with pytest.raises(CheckpointError) as err:
        build_model(load_checkpoint(path))
    message = str(err.value)
    assert "weights do not fit its model_config: the config implies" in message
    assert "pyramid.stem.weight is (8, 3, 3, 3), the config implies (4, 3, 3, 3)" in message


@pytest.mark.parametrize("section, change, message", [
    ("diffusion_config", {"timesteps": 10**9}, "timesteps must be at most 100000, got 1000000000"),
    ("model_config", {"hyper_drive": True}, "cannot be built by this version of idm (unknown key(s) ['hyper_drive']"),
    ("model_config", {"norm_groups": 3}, "norm_groups=3 must divide"),
    ("train_config", {"target": "sharpen"}, "target must be one of"),
])
def test_a_config_the_classes_refuse_is_refused_on_load_naming_the_field(real, tmp_path, section, change, message):
    path = _crafted(real, tmp_path, section, **change)
    with pytest.raises(CheckpointError, match="crafted.pt: checkpoint's " + section) as err:
        load_checkpoint(path)
    assert message in str(err.value)


@pytest.mark.parametrize("section, key", [("train_config", "target"), ("train_config", "residual_scale"),
                                          ("model_config", "base_channels"), ("diffusion_config", "schedule")])
def test_a_missing_config_key_is_named_on_load(real, tmp_path, section, key):
    path = tmp_path / "missing.pt"
    save_checkpoint({**real, section: {k: v for k, v in real[section].items() if k != key}}, path)
    with pytest.raises(CheckpointError, match=rf"missing.pt: checkpoint's {section} lacks the key\(s\) \['{key}'\]"):
        load_checkpoint(path)


def test_keys_added_after_a_file_was_written_take_the_values_it_meant(real, tmp_path):
    """A checkpoint from before attention_window, decoder_hidden, precision... existed."""
    path = tmp_path / "old.pt"
    old = {**real, "model_config": {k: v for k, v in real["model_config"].items()
                                    if k not in ("attention_window", "decoder_hidden", "prediction")},
           "train_config": {k: v for k, v in real["train_config"].items()
                            if k not in ("precision", "workers", "compile", "condition_loss")}}
    save_checkpoint(old, path)
    ckpt = load_checkpoint(path)
    assert (ckpt["model_config"]["attention_window"], ckpt["model_config"]["decoder_hidden"]) == (0, 0)
    assert (ckpt["train_config"]["precision"], ckpt["train_config"]["condition_loss"]) == ("float32", 0.0)
    assert build_model(ckpt).cfg == dataclasses.replace(CFG, attention_window=0)


def _upscale(model: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    from PIL import Image

    Image.fromarray(photo(12, 12)).save(tmp_path / "a.png")
    return subprocess.run([sys.executable, "-m", "pipeline.entry", "upscale", str(tmp_path / "a.png"), "--scale", "2",
                           "--model", str(model), "--out", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case", ["missing target", "huge channels"])
def test_the_cli_answers_a_crafted_checkpoint_in_one_line(real, tmp_path, case):
    """What used to end in a KeyError traceback, or in gigabytes allocated, is one `idm: error:` line."""
    if case == "missing target":
        path = tmp_path / "crafted.pt"
        save_checkpoint({**real, "train_config": {k: v for k, v in real["train_config"].items() if k != "target"}},
                        path)
        fragment = "checkpoint's train_config lacks the key(s) ['target']"
    else:
        path, fragment = _crafted(real, tmp_path, encoder_channels=2_000_000), "encoder_channels = 2,000,000"
    r = _upscale(path, tmp_path)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("idm: error: "), r.stderr
    assert fragment in lines[0], lines[0]
    assert not (tmp_path / "out").exists()
