"""Training: config checks, diffusion targets, continuous-scale batches, EMA, fit, resume, DDP."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import idm.diffusion.schedule
import idm.models
import idm.train
from idm.checkpoint import build_model, load_checkpoint
from idm.config import DiffusionConfig, ModelConfig, TrainConfig
from idm.data import make_batch, training_images
from idm.diffusion.targets import TARGETS, decode, encode
from idm.resize import resize, resize_uint8
from idm.train import EMA, fit, setup_distributed
from tests.helpers import ROOT, photo

TINY = ModelConfig(encoder_blocks=1, encoder_channels=8, base_channels=8, channel_mults=(1, 2), res_blocks=1,
                   attention_levels=(1,), mid_attention=True, dropout=0.2, norm_groups=4, implicit_hidden=16,
                   modulation_hidden=8)
IMAGES = [photo(40, 52, 1), photo(30, 34, 2), photo(12, 60, 3)]  # the last is too small for 16 px patches


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP's
    spinning threads make them 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- TrainConfig


@pytest.mark.parametrize("field, value, allowed", [
    ("steps", 0, "an integer >= 1"),
    ("batch_size", 2.0, "an integer >= 1"),
    ("patch_size", 1, "an integer >= 2"),
    ("checkpoint_every", -1, "an integer >= 0"),
    ("seed", True, "an integer >= 0"),
    ("scale_min", 0.5, "a number >= 1"),
    ("scale_max", 1.0, "a number > scale_min = 1.0"),
    ("lr", "1e-4", "a number > 0"),  # what YAML makes of 1e-4
    ("ema_decay", 1.0, r"a number in \[0, 1\)"),
    ("grad_clip", -1.0, r"a number >= 0 \(0: off\)"),
    ("residual_scale", 0, "a number > 0"),
    ("target", "noise", r"one of \['image', 'refine', 'residual'\]"),
    ("flips", 1, "True or False"),
    ("condition_loss", -0.5, "a number >= 0"),
])
def test_bad_train_config_values_name_what_is_allowed(field: str, value: object, allowed: str) -> None:
    with pytest.raises(ValueError, match=f"^{field} must be {allowed}, got {value!r}"):
        TrainConfig(**{field: value})


def test_patch_must_hold_one_lr_pixel_and_unknown_keys_fail() -> None:
    with pytest.raises(ValueError, match="patch_size must be at least scale_max = 8"):
        TrainConfig(patch_size=6, scale_max=8.0)
    with pytest.raises(TypeError, match="lerning_rate"):
        TrainConfig(lerning_rate=1e-4)  # type: ignore[call-arg]
    assert TrainConfig().target == "image" and TrainConfig().scale_max == 4.0


# ---------------------------------------------------------------- targets


@pytest.mark.parametrize("mode", sorted(TARGETS))
def test_targets_are_inverse(mode: str) -> None:
    hr = torch.rand(2, 3, 15, 21) * 2 - 1
    lr = resize(hr, (5, 7))
    x_con = torch.rand(2, 3, 15, 21) * 2 - 1
    x0 = encode(hr, lr, mode, residual_scale=0.25, x_con=x_con)
    assert x0.shape == hr.shape
    torch.testing.assert_close(decode(x0, lr, (15, 21), mode, residual_scale=0.25, x_con=x_con), hr,
                               atol=1e-6, rtol=0)


def test_residual_target_starts_at_bicubic_and_errors() -> None:
    lr = torch.rand(1, 3, 6, 5) * 2 - 1
    assert torch.equal(decode(torch.zeros(1, 3, 18, 15), lr, (18, 15), "residual"),
                       resize(lr, (18, 15)).clamp(-1, 1))
    x_con = torch.rand(1, 3, 18, 15) * 2 - 1
    assert torch.equal(decode(torch.zeros(1, 3, 18, 15), lr, (18, 15), "refine", x_con=x_con), x_con)
    with pytest.raises(ValueError, match=r"unknown target 'noise'; expected one of \['image', 'refine', 'residual'\]"):
        encode(torch.zeros(1, 3, 4, 4), lr, "noise")
    with pytest.raises(ValueError, match=r"target 'refine' needs the condition x_con of size \(18, 15\), got None"):
        decode(torch.zeros(1, 3, 18, 15), lr, (18, 15), "refine")
    with pytest.raises(ValueError, match="does not match x0"):
        decode(torch.zeros(1, 3, 18, 15), lr, (15, 18), "image")


# ---------------------------------------------------------------- batches


def test_batch_shapes_range_and_scale() -> None:
    cfg = TrainConfig(batch_size=3, patch_size=16, scale_min=1.5, scale_max=3.5)
    data, gen = training_images(IMAGES, 16), torch.Generator().manual_seed(0)
    for _ in range(20):
        hr, lr, scale = make_batch(data, cfg, gen)
        side = round(16 / scale)
        assert 1.5 <= scale < 3.5
        assert hr.shape == (3, 3, 16, 16) and lr.shape == (3, 3, side, side)
        assert hr.min() >= -1 and hr.max() <= 1 and lr.min() >= -1 and lr.max() <= 1


def test_lr_is_the_project_resize_of_hr_rounded_to_8_bits() -> None:
    cfg = TrainConfig(batch_size=4, patch_size=20, scale_min=1.2, scale_max=4.0)
    hr, lr, scale = make_batch(training_images(IMAGES, 20), cfg, torch.Generator().manual_seed(1))
    hr255 = ((hr + 1) * 127.5).round()
    side = round(20 / scale)
    assert torch.equal(lr, resize(hr255, (side, side)).round().clamp(0, 255) / 127.5 - 1)
    # ... which is what the prepare stage does to a uint8 image.
    patch = hr255[0].permute(1, 2, 0).to(torch.uint8).numpy()
    assert np.array_equal(((lr[0] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy(),
                          resize_uint8(patch, (side, side)))


def test_patches_are_crops_without_flips_and_flipped_with_them() -> None:
    data = training_images([photo(18, 20, 4)], 16)
    image = data[0].float() / 127.5 - 1
    crops = {image[:, t : t + 16, l : l + 16].flip(dims).numpy().tobytes(): dims
             for t in range(3) for l in range(5) for dims in [(), (2,), (1,), (1, 2)]}
    seen = set()
    for flips in (False, True):
        hr, _, _ = make_batch(data, TrainConfig(batch_size=32, patch_size=16, flips=flips),
                              torch.Generator().manual_seed(2))
        found = [crops.get(p.numpy().tobytes()) for p in hr]
        assert None not in found
        seen |= set(found) if flips else set()
        assert flips or set(found) == {()}
    assert seen == {(), (2,), (1,), (1, 2)}


def test_batches_are_determined_by_the_generator_seed() -> None:
    cfg, data = TrainConfig(batch_size=2, patch_size=16), training_images(IMAGES, 16)
    a, b, c = (make_batch(data, cfg, torch.Generator().manual_seed(s)) for s in (7, 7, 8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    assert not torch.equal(a[0], c[0])


def test_small_images_are_skipped_and_none_big_enough_is_an_error() -> None:
    assert [tuple(t.shape) for t in training_images(IMAGES, 16)] == [(3, 40, 52), (3, 30, 34)]
    with pytest.raises(ValueError, match=r"no training image is at least 48x48 px .*shortest sides: \[40, 30, 12\]"):
        training_images(IMAGES, 48)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        training_images([np.zeros((20, 20), np.uint8)], 16)


# ---------------------------------------------------------------- EMA


def test_ema_averages_with_warmup() -> None:
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.99)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=1)  # warm-up decay (1 + 1) / (10 + 1) < 0.99
    d = 2 / 11
    torch.testing.assert_close(ema.module.weight, d * start + (1 - d) * model.weight)
    assert not ema.module.training and not ema.module.weight.requires_grad


# ---------------------------------------------------------------- fit


def _fit(cfg: TrainConfig, ckpt: Path | None, **hooks) -> dict:
    return fit(TINY, DiffusionConfig(), cfg, IMAGES, device="cpu", ckpt_path=ckpt, progress=False, **hooks)


def test_a_tiny_model_overfits_one_image() -> None:
    losses: list[float] = []
    cfg = TrainConfig(steps=300, batch_size=8, patch_size=16, scale_min=2.0, scale_max=2.01, lr=5e-3,
                      log_every=10, flips=False)
    model = replace(TINY, dropout=0.0)
    summary = fit(model, DiffusionConfig(), cfg, [photo(16, 16, 1)], device="cpu", progress=False,
                  on_log=lambda step, m: losses.append(m["loss"]))
    assert len(losses) == 30 and summary["final_loss"] == losses[-1] and summary["steps"] == 300
    assert losses[-1] / losses[0] < 0.3, losses


def test_condition_loss_trains_the_encoder_towards_hr(tmp_path: Path) -> None:
    """With condition_loss, x_con is regressed on HR: its error falls well below the untrained encoder's."""
    hr_img = photo(24, 24, 2)
    hr = torch.from_numpy(hr_img).permute(2, 0, 1)[None].float() / 127.5 - 1
    lr = resize(hr, (12, 12))
    model_cfg = replace(TINY, dropout=0.0, prediction="v")

    def x_con_error(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return (model.condition(lr, (24, 24)).x_con - hr).abs().mean().item()

    errors = {}
    for weight in (0.0, 1.0):
        cfg = TrainConfig(steps=150, batch_size=4, patch_size=24, scale_min=2.0, scale_max=2.01, lr=5e-3,
                          ema_decay=0.0, flips=False, target="residual", condition_loss=weight)
        fit(model_cfg, DiffusionConfig(), cfg, [hr_img], device="cpu", ckpt_path=tmp_path / f"{weight}.pt",
            progress=False)
        errors[weight] = x_con_error(build_model(load_checkpoint(tmp_path / f"{weight}.pt"), use_ema=True))
    bicubic = (resize(lr, (24, 24)) - hr).abs().mean().item()
    assert errors[1.0] < 0.85 * bicubic and errors[1.0] < 0.5 * errors[0.0], (errors, bicubic)


def _states(path: Path) -> dict:
    ckpt = load_checkpoint(path)
    opt = {f"{i}.{k}": v for i, s in ckpt["optimizer"]["state"].items() for k, v in s.items()}
    return {"step": ckpt["step"], "model": ckpt["model"], "ema": ckpt["ema"], "optimizer": opt}


def _equal(a: dict, b: dict, part: str) -> bool:
    return a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part])


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=8, batch_size=3, patch_size=16, log_every=2, checkpoint_every=3)
    _fit(cfg, tmp_path / "straight.pt")
    _fit(replace(cfg, steps=4), tmp_path / "resumed.pt")  # "stop" after 4 steps ...
    logs: list[int] = []
    summary = _fit(cfg, tmp_path / "resumed.pt", on_log=lambda step, m: logs.append(step))  # ... and go on
    assert logs == [6, 8] and summary["steps_run"] == 4
    straight, resumed = _states(tmp_path / "straight.pt"), _states(tmp_path / "resumed.pt")
    assert straight["step"] == resumed["step"] == 8
    for part in ("model", "ema", "optimizer"):
        assert _equal(straight, resumed, part), part


def test_resume_covers_dropout_randomness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Control: skip restoring torch's global generator (dropout) and the runs part ways."""
    cfg = TrainConfig(steps=4, batch_size=2, patch_size=16)
    _fit(cfg, tmp_path / "straight.pt")
    _fit(replace(cfg, steps=2), tmp_path / "resumed.pt")
    restore = idm.train.set_rng_state

    def without_global_torch_state(state: dict, generator: torch.Generator, device: torch.device) -> None:
        torch.manual_seed(123)
        restore(state | {"torch": torch.get_rng_state()}, generator, device)

    monkeypatch.setattr(idm.train, "set_rng_state", without_global_torch_state)
    _fit(cfg, tmp_path / "resumed.pt")
    assert not _equal(_states(tmp_path / "straight.pt"), _states(tmp_path / "resumed.pt"), "model")


def test_resume_with_another_config_names_the_keys(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=1, batch_size=1, patch_size=16)
    _fit(cfg, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match=r"ckpt\.pt.*2 key\(s\): train_config\.lr .*train_config\.seed"):
        _fit(replace(cfg, steps=2, lr=1e-3, seed=1), tmp_path / "ckpt.pt")


def test_hooks_see_the_ema_model_and_cannot_change_training(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=4, batch_size=2, patch_size=16, log_every=2, sample_every=2, checkpoint_every=3)
    calls: list[tuple] = []

    def on_sample(step: int, model: torch.nn.Module) -> None:
        calls.append(("sample", step, model.training))
        torch.randn(100), np.random.rand(), model.condition(torch.zeros(1, 3, 4, 4), (8, 8))

    _fit(cfg, tmp_path / "plain.pt")
    _fit(cfg, tmp_path / "hooked.pt", on_sample=on_sample,
         on_checkpoint=lambda step, path: calls.append(("checkpoint", step, path.name)))
    assert calls == [("sample", 2, False), ("checkpoint", 3, "hooked.pt"), ("sample", 4, False),
                     ("checkpoint", 4, "hooked.pt")]
    assert _equal(_states(tmp_path / "plain.pt"), _states(tmp_path / "hooked.pt"), "model")


# ---------------------------------------------------------------- distributed


def test_setup_distributed_is_a_no_op_without_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = setup_distributed("cpu")
    assert (info.rank, info.world_size, info.device) == (0, 1, torch.device("cpu"))
    assert not torch.distributed.is_initialized()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out: Path, steps: int) -> None:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "tests.idm.ddp_worker", str(out), str(steps)]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_process_ddp_trains_logs_on_rank_0_and_resumes_exactly(tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir(), resumed.mkdir()
    _torchrun(straight, 5)
    assert sorted(p.name for p in straight.iterdir()) == [
        "checkpoint_rank0_step3", "checkpoint_rank0_step5", "ckpt.pt", "ckpt_step3.pt", "log_rank0.jsonl",
        "summary_rank0.json", "summary_rank1.json"]
    logged = [json.loads(line)["step"] for line in (straight / "log_rank0.jsonl").read_text().splitlines()]
    assert logged == [2, 4, 5]
    summary = json.loads((straight / "summary_rank1.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 5
    ckpt = load_checkpoint(straight / "ckpt.pt")
    assert ckpt["step"] == 5 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["data"], ckpt["rng"][1]["data"])  # different data per rank
    # Both ranks resume from the step-3 checkpoint with their own random states.
    shutil.copy(straight / "ckpt_step3.pt", resumed / "ckpt.pt")
    _torchrun(resumed, 5)
    a, b = _states(straight / "ckpt.pt"), _states(resumed / "ckpt.pt")
    for part in ("model", "ema", "optimizer"):
        assert _equal(a, b, part), part




# ---------------------------------------------------------------- the pretraining protocol (LIIF patches, crops)

LEAN = replace(TINY, decoder_hidden=8, attention_window=2)
CROPS = TrainConfig(steps=6, batch_size=2, patch_size=16, lr_patch=6, unet_patch=8, condition_points=20,
                    scale_min=1.0, scale_max=4.0, target="refine", condition_loss=1.0, log_every=2,
                    checkpoint_every=3)


def test_lr_patch_fixes_the_lr_side_and_scales_the_hr_side() -> None:
    cfg = replace(CROPS, batch_size=2)
    data, gen = training_images(IMAGES, idm.train.hr_patch_side(cfg)), torch.Generator().manual_seed(0)
    assert idm.train.hr_patch_side(cfg) == 24 and len(data) == 2  # the 30x34 and 40x52 photos
    for _ in range(10):
        hr, lr, scale = make_batch(data, cfg, gen)
        assert lr.shape == (2, 3, 6, 6) and hr.shape == (2, 3, round(6 * scale), round(6 * scale))


def test_crops_and_point_loss_train_and_resume_exactly(tmp_path: Path) -> None:
    """The denoiser on a crop and x_con's loss on random pixels: finite losses, and a
    resumed run reaches the uninterrupted run's weights exactly."""
    def run(cfg: TrainConfig, path: Path, **hooks) -> dict:
        return fit(LEAN, DiffusionConfig(timesteps=50), cfg, IMAGES, device="cpu", ckpt_path=path,
                   progress=False, **hooks)

    losses: list[float] = []
    run(CROPS, tmp_path / "straight.pt", on_log=lambda step, m: losses.append(m["loss"]))
    assert all(np.isfinite(losses)) and len(losses) == 3
    run(replace(CROPS, steps=3), tmp_path / "resumed.pt")
    run(CROPS, tmp_path / "resumed.pt")
    straight, resumed = _states(tmp_path / "straight.pt"), _states(tmp_path / "resumed.pt")
    for part in ("model", "ema", "optimizer"):
        assert _equal(straight, resumed, part), part


def test_point_loss_is_the_l1_of_x_con_at_the_drawn_pixels() -> None:
    torch.manual_seed(0)
    model = idm.models.IDM(LEAN)
    objective = idm.train.Objective(model, idm.diffusion.schedule.make_schedule("linear", 50), CROPS, "l1")
    hr, lr = torch.rand(2, 3, 20, 20) * 2 - 1, torch.rand(2, 3, 5, 5) * 2 - 1
    gen = torch.Generator().manual_seed(3)
    got = objective._point_loss(hr, lr, model.encoder.features(lr), gen)
    index = torch.randint(400, (2, 20), generator=torch.Generator().manual_seed(3))
    x_con = model.encoder(lr, (20, 20)).flatten(2)
    want = torch.stack([(x_con[b][:, index[b]] - hr.flatten(2)[b][:, index[b]]).abs().mean() for b in range(2)]).mean()
    torch.testing.assert_close(got, want)
