"""`idm upscale`: round trips on awkward inputs and one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from idm.checkpoint import make_checkpoint, save_checkpoint
from idm.config import DiffusionConfig, ModelConfig, SampleConfig, TrainConfig
from idm.models import IDM
from idm.resize import resize_uint8
from pipeline.data.images import read_image
from tests.helpers import TINY, photo

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny model: the CLI's plumbing does not depend on what it learned."""
    torch.manual_seed(0)
    cfg = ModelConfig(**{k: v for k, v in TINY["model"].items() if k != "preset"})
    model = IDM(cfg)
    path = tmp_path_factory.mktemp("cli") / "model.pt"
    save_checkpoint(make_checkpoint(model_config=cfg, diffusion_config=DiffusionConfig(timesteps=50),
                                    train_config=TrainConfig(target="residual", patch_size=16), model=model.state_dict(),
                                    ema=model.state_dict(), optimizer={}, step=0, rng=[]), path)
    return path


def idm(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_upscale_greyscale_and_rgba_keeps_alpha(tmp_path, checkpoint):
    Image.fromarray(photo(20, 24)).convert("L").save(tmp_path / "grey.png")
    rgba = np.dstack([photo(18, 16), np.linspace(0, 255, 18 * 16).reshape(18, 16).astype(np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    r = idm("upscale", tmp_path / "grey.png", tmp_path / "rgba.png", "--scale", "2.5", "--model", checkpoint,
            "--steps", "2", "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    grey = read_image(tmp_path / "out" / "grey_x2.5.png")
    out = read_image(tmp_path / "out" / "rgba_x2.5.png", alpha=True)
    assert grey.shape == (50, 60, 3) and out.shape == (45, 40, 4)
    assert np.array_equal(out[..., 3], resize_uint8(np.repeat(rgba[..., 3:], 3, axis=2), (45, 40))[..., 0])
    assert "alpha by bicubic" in r.stdout


def test_a_16_bit_input_gives_a_16_bit_png_close_to_the_8_bit_output(tmp_path, checkpoint):
    import cv2

    from pipeline.data.images import read_image_16

    eight = photo(16, 20)
    deep = eight.astype(np.uint16) * 257
    cv2.imwrite(str(tmp_path / "deep.png"), deep[..., ::-1])
    Image.fromarray(eight).save(tmp_path / "eight.png")
    r = idm("upscale", tmp_path / "deep.png", tmp_path / "eight.png", "--scale", "2", "--model", checkpoint,
            "--steps", "2", "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "16-bit" in r.stdout
    out16 = read_image_16(tmp_path / "out" / "deep_x2.png")
    out8 = read_image(tmp_path / "out" / "eight_x2.png")
    assert out16.dtype == np.uint16 and out16.shape == (32, 40, 3)
    # Same pixels (x257), same seed: the outputs agree to within rounding at 8 bits.
    assert np.abs(out16 / 257 - out8).max() <= 1.0
    assert len(np.unique(out16)) > len(np.unique(out8))  # finer levels than the 8-bit output
    r = idm("upscale", tmp_path / "deep.png", "--scale", "2", "--model", checkpoint, "--steps", "2",
            "--ext", "jpg", "--out", tmp_path / "jpg")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "jpg" / "deep_x2.jpg").mode == "RGB"  # JPEG holds 8 bits


def test_folders_recursive_suffix_ext_and_one_bar(tmp_path, checkpoint):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    Image.fromarray(photo(12, 14)).save(tmp_path / "in" / "a.png")
    Image.fromarray(photo(10, 10)).save(tmp_path / "in" / "sub" / "b.jpg", quality=95)
    r = idm("upscale", tmp_path / "in", "-r", "--scale", "2", "--model", checkpoint, "--steps", "1",
            "--suffix", "big", "--out", tmp_path / "in" / "out")
    assert r.returncode == 0, r.stderr
    made = sorted(p.relative_to(tmp_path / "in" / "out").as_posix() for p in (tmp_path / "in" / "out").rglob("*.*"))
    assert made == ["a_big.png", "sub/b_big.jpg"]  # --ext auto keeps each input's format
    assert Image.open(tmp_path / "in" / "out" / "sub" / "b_big.jpg").format == "JPEG"
    renders = [part for part in r.stderr.replace("\r", "\n").splitlines() if "%|" in part]
    assert renders and all(part.startswith("upscale:") and "/2 " in part for part in renders)  # one bar, all images
    # Again, into the same folder inside the input: the previous outputs are not inputs now.
    again = idm("upscale", tmp_path / "in", "-r", "--scale", "2", "--model", checkpoint, "--steps", "1",
                "--ext", "webp", "--out", tmp_path / "in" / "out")
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in (tmp_path / "in" / "out").rglob("*.webp")) == ["a_x2.webp", "b_x2.webp"]


def test_size_that_stretches_warns_and_keep_aspect_fits(tmp_path, checkpoint):
    Image.fromarray(photo(10, 20)).save(tmp_path / "a.png")
    r = idm("upscale", tmp_path / "a.png", "--size", "40x40", "--model", checkpoint, "--out", tmp_path / "o")
    assert r.returncode == 0 and "changes its aspect ratio (20x10, stretched 0.50x horizontally)" in r.stderr
    r = idm("upscale", tmp_path / "a.png", "--size", "40x40", "--keep-aspect", "--model", checkpoint,
            "--out", tmp_path / "o.png")
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    assert read_image(tmp_path / "o.png").shape == (20, 40, 3)  # --out names the one output file


def test_upscale_to_size(tmp_path, checkpoint):
    Image.fromarray(photo(10, 20)).save(tmp_path / "a.png")
    r = idm("upscale", tmp_path / "a.png", "--size", "57x31", "--model", checkpoint, "--steps", "1", "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    assert read_image(tmp_path / "a_57x31.png").shape == (31, 57, 3)
    assert r.stdout.strip().endswith("(57x31)")  # one piece: no tiling to report


def test_tiled_output_matches_requested_size(tmp_path, checkpoint):
    Image.fromarray(photo(40, 40)).save(tmp_path / "a.png")
    # Untiled, 320x320 needs an estimated 0.84 GiB (0.75 of it torch itself); under 0.82 GiB
    # it is made in 4 tiles of 24 LR px with their context (inputs aligned to the 32 px of its
    # attention windows: ModelConfig.tile_align).
    r = idm("upscale", tmp_path / "a.png", "--scale", "8", "--model", checkpoint, "--steps", "1",
            "--max-memory-gb", "0.82", "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    assert read_image(tmp_path / "a_x8.png").shape == (320, 320, 3)
    assert "(320x320) in 4 tiles of 24 LR px (in one piece it would need ~0.84 GiB, above --max-memory-gb 0.82)" in r.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--scale", "1"], "scale must be a finite number > 1"),
        (["--scale", "nan"], "scale must be a finite number > 1"),
        (["--scale", "-3"], "scale must be a finite number > 1"),
        (["--size", "big"], "--size must look like 1920x1080"),
        (["--scale", "2", "--spacing", "cosine"], "argument --spacing: invalid choice: 'cosine'"),
        (["--scale", "2", "--tile-norm", "batch"], "argument --tile-norm: invalid choice: 'batch'"),
    ],
)
def test_bad_arguments(tmp_path, checkpoint, args, message):
    Image.fromarray(photo(8, 8)).save(tmp_path / "a.png")
    r = idm("upscale", tmp_path / "a.png", *args, "--model", checkpoint, "--out", tmp_path / "out")
    assert r.returncode == 2 and message in r.stderr
    assert not (tmp_path / "out").exists()


def test_unreadable_image_and_missing_model(tmp_path, checkpoint):
    (tmp_path / "bad.png").write_bytes(b"nope")
    Image.fromarray(photo(8, 8)).save(tmp_path / "good.png")
    r = idm("upscale", tmp_path / "good.png", tmp_path / "bad.png", "--scale", "2", "--model", checkpoint, "--out", tmp_path / "out")
    assert r.returncode == 2 and "bad.png: not a readable image" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists(), "nothing written when any input is bad"
    r = idm("upscale", tmp_path / "good.png", "--scale", "2", "--model", tmp_path / "none.pt", "--out", tmp_path / "out")
    assert r.returncode == 2 and "none.pt: no such model checkpoint" in r.stderr


def test_memory_bound_without_tiling(tmp_path, checkpoint):
    Image.fromarray(photo(40, 40)).save(tmp_path / "a.png")
    r = idm("upscale", tmp_path / "a.png", "--scale", "8", "--model", checkpoint, "--no-tiling",
            "--max-memory-gb", "0.3", "--out", tmp_path / "out")
    assert r.returncode == 2 and "above the bound" in r.stderr and "enable tiling" in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def regression_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny model whose x_con was (nominally) trained as a regression (condition_loss > 0)."""
    torch.manual_seed(0)
    cfg = ModelConfig(**{k: v for k, v in TINY["model"].items() if k != "preset"}, decoder_hidden=8)
    model = IDM(cfg)
    path = tmp_path_factory.mktemp("cli") / "regression.pt"
    save_checkpoint(make_checkpoint(model_config=cfg, diffusion_config=DiffusionConfig(timesteps=50),
                                    train_config=TrainConfig(target="refine", condition_loss=1.0, patch_size=16),
                                    model=model.state_dict(), ema=model.state_dict(), optimizer={}, step=0, rng=[]),
                    path)
    return path


def test_steps_0_writes_the_regression_output(tmp_path, regression_checkpoint):
    from idm.checkpoint import build_model, load_checkpoint
    from idm.resize import to_model_range, to_uint8

    img = photo(12, 10)
    Image.fromarray(img).save(tmp_path / "a.png")
    r = idm("upscale", tmp_path / "a.png", "--scale", "3", "--model", regression_checkpoint, "--steps", "0",
            "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    model = build_model(load_checkpoint(regression_checkpoint), use_ema=True).eval()
    with torch.no_grad():
        want = to_uint8(model.encoder(to_model_range(img, "cpu"), (36, 30)).clamp(-1, 1))
    assert (read_image(tmp_path / "out" / "a_x3.png") == want).all()


def test_steps_0_of_a_model_without_a_regression_output_is_refused(tmp_path, checkpoint):
    Image.fromarray(photo(8, 8)).save(tmp_path / "a.png")
    r = idm("upscale", tmp_path / "a.png", "--scale", "2", "--model", checkpoint, "--steps", "0",
            "--out", tmp_path / "out")
    assert r.returncode == 2 and "--steps must be an integer >= 1: this model's x_con was not trained" in r.stderr
    assert not (tmp_path / "out").exists()


def test_the_default_model_is_the_shipped_one(tmp_path):
    """No --model, no MLflow store, no network: the package's weights."""
    import os

    from idm.pretrained import weights

    Image.fromarray(photo(10, 12)).save(tmp_path / "a.png")
    no_store = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/missing/dir/mlflow.db"}
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "upscale", str(tmp_path / "a.png"), "--scale", "2",
                        "--steps", "1", "--out", str(tmp_path / "default")], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=no_store)
    assert r.returncode == 0, r.stderr
    r = idm("upscale", tmp_path / "a.png", "--scale", "2", "--steps", "1", "--model", weights(),
            "--out", tmp_path / "explicit")
    assert r.returncode == 0, r.stderr
    assert (read_image(tmp_path / "default" / "a_x2.png") == read_image(tmp_path / "explicit" / "a_x2.png")).all()


def test_without_steps_a_regression_model_gives_its_regression_output(tmp_path, regression_checkpoint, checkpoint):
    Image.fromarray(photo(12, 10)).save(tmp_path / "a.png")
    for name, model, steps in (("default", regression_checkpoint, []), ("zero", regression_checkpoint, ["--steps", "0"]),
                               ("diffusion", checkpoint, [])):
        r = idm("upscale", tmp_path / "a.png", "--scale", "2", "--model", model, *steps, "--out", tmp_path / name)
        assert r.returncode == 0, r.stderr
    default, zero = (read_image(tmp_path / n / "a_x2.png") for n in ("default", "zero"))
    assert (default == zero).all()
    assert read_image(tmp_path / "diffusion" / "a_x2.png").shape == (24, 20, 3)  # no regression output: it samples


def test_threads_flag_sets_and_reports_the_cpu_threads(tmp_path, checkpoint):
    Image.fromarray(photo(10, 12)).save(tmp_path / "a.png")
    r = idm("upscale", tmp_path / "a.png", "--scale", "2", "--model", checkpoint, "--steps", "1", "--threads", "1",
            "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    capability = torch.backends.cpu.get_cpu_capability()
    assert r.stdout.splitlines()[0] == f"CPU: 1 threads, {capability} kernels, float32, channels-last"
    bad = idm("upscale", tmp_path / "a.png", "--scale", "2", "--model", checkpoint, "--threads", "-1", "--out", tmp_path)
    assert bad.returncode == 2 and "--threads must be an integer >= 0" in bad.stderr, bad.stderr


@pytest.mark.parametrize("argv, expected", [
    (["--preset", "perceptual"], (1, 1.0)),
    (["--preset", "perceptual", "--steps", "3"], (3, 1.0)),
    (["--preset", "balanced", "--temperature", "0.5"], (2, 0.5)),
    (["--preset", "fidelity"], (0, SampleConfig().temperature)),
    (["--steps", "4"], (4, SampleConfig().temperature)),
])
def test_preset_then_flags(argv, expected):
    from pipeline.cli import build_parser, sample_config

    args = build_parser().parse_args(["upscale", "x.png", "--scale", "2", "--out", "o", *argv])
    sample = sample_config(args)
    assert (sample.steps, sample.temperature) == expected
