"""`idm upscale`: round trips on awkward inputs and one-line errors."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tqdm import tqdm

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
    assert re.search(r"\(57x31\) in \d+\.\d s$", r.stdout.strip()), r.stdout  # one piece: no tiling to report; its time


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
    assert r.stdout.splitlines()[0] == (f"CPU: 1 threads, {capability} kernels, float32, channels-last; "
                                        "diffusion, ddim 1 steps, temperature 0")
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


def test_the_default_of_a_model_without_regression_is_the_balanced_preset(tmp_path, checkpoint):
    """One rule (idm.config.default_preset) for the CLI and the served model: here DDIM 2 at T 0."""
    Image.fromarray(photo(12, 10)).save(tmp_path / "a.png")
    r = idm("upscale", tmp_path / "a.png", "--scale", "2", "--model", checkpoint, "--out", tmp_path / "default")
    b = idm("upscale", tmp_path / "a.png", "--scale", "2", "--model", checkpoint, "--preset", "balanced",
            "--out", tmp_path / "balanced")
    assert r.returncode == b.returncode == 0, r.stderr + b.stderr
    assert "diffusion, ddim 2 steps, temperature 0" in r.stdout
    assert (read_image(tmp_path / "default" / "a_x2.png") == read_image(tmp_path / "balanced" / "a_x2.png")).all()


def test_real_esrgan_style_short_flags_and_a_fixed_tile(tmp_path, regression_checkpoint):
    Image.fromarray(photo(40, 36)).save(tmp_path / "a.png")
    r = idm("upscale", tmp_path / "a.png", "-s", "2", "-t", "20", "--model", regression_checkpoint,
            "-o", tmp_path / "tiled.png")
    assert r.returncode == 0, r.stderr
    assert "in 9 tiles of 20 LR px (--tile 20)" in r.stdout  # 3 x 3: 20 px tiles overlapping by 8 cover 40 x 36
    whole = idm("upscale", tmp_path / "a.png", "-s", "2", "-t", "0", "--model", regression_checkpoint,
                "-o", tmp_path / "whole.png")
    assert whole.returncode == 0 and "tiles" not in whole.stdout, whole.stderr
    tiled, one = read_image(tmp_path / "tiled.png"), read_image(tmp_path / "whole.png")
    assert tiled.shape == one.shape == (80, 72, 3)


@pytest.mark.parametrize("flags, message", [
    (["--tile-n", "tile"], "unrecognized arguments: --tile-n tile"),  # no abbreviations of --tile-norm
    (["--temp", "1"], "unrecognized arguments: --temp 1"),
    (["-t", "8"], "--tile must be 0 (automatic) or an integer > 8"),
    (["--suffix", "../x"], "'../x': must be part of a file name"),
    (["--suffix", "a/b"], "'a/b': must be part of a file name"),
    (["--keep-aspect"], "--keep-aspect needs --size"),
])
def test_flags_that_are_refused_in_one_line(tmp_path, checkpoint, flags, message):
    Image.fromarray(photo(8, 8)).save(tmp_path / "a.png")
    r = idm("upscale", tmp_path / "a.png", "--scale", "2", "--model", checkpoint, "--out", tmp_path / "out", *flags)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


def test_scale_with_an_underscore_is_not_read_as_a_bigger_number():
    from pipeline.cli import parse_scale

    assert parse_scale("1.5") == 1.5 and parse_scale("3.7") == 3.7
    with pytest.raises(argparse.ArgumentTypeError, match="got '1_5'"):
        parse_scale("1_5")


def test_out_equal_to_an_input_folder_and_hidden_files(tmp_path, checkpoint):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(photo(8, 8)).save(folder / "a.png")
    (folder / "._a.png").write_bytes(b"\0\5\26\7 AppleDouble")  # macOS metadata beside a.png: skipped
    r = idm("upscale", folder, "--scale", "2", "--model", checkpoint, "--out", folder)
    assert r.returncode == 2 and "is also an input folder; write the outputs to another folder" in r.stderr
    r = idm("upscale", folder, "--scale", "2", "--model", checkpoint, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_x2.png"]


def test_one_long_image_shows_progress(tmp_path, checkpoint):
    Image.fromarray(photo(12, 10)).save(tmp_path / "a.png")
    r = idm("upscale", tmp_path / "a.png", "--scale", "2", "--model", checkpoint, "--steps", "5", "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    assert "a.png:   0%|" in r.stderr and "| 0/5 [" in r.stderr  # a bar of the 5 denoiser steps (redrawn on a terminal)


BLOCK_PIPELINE = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):  # what `pip install .` (no pipeline extra) does not install
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"mlflow", "dvc", "prefect", "pandas", "skimage", "matplotlib", "torchvision",
                                  "torchmetrics", "torch_fidelity", "lpips", "skvideo", "scipy"}:
            raise ImportError(f"No module named {name!r}")
sys.meta_path.insert(0, Block())
from pipeline.entry import main
main(sys.argv[1:])
"""


def test_idm_upscale_needs_only_the_core_dependencies(tmp_path):
    """`pip install .` gives torch, numpy, Pillow, OpenCV, tqdm and PyYAML: enough for the shipped model."""
    Image.fromarray(photo(20, 24)).save(tmp_path / "a.png")
    r = subprocess.run([sys.executable, "-c", BLOCK_PIPELINE, "upscale", str(tmp_path / "a.png"), "-s", "2",
                        "-o", str(tmp_path / "out.png")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert read_image(tmp_path / "out.png").shape == (40, 48, 3)
    uri = subprocess.run([sys.executable, "-c", BLOCK_PIPELINE, "upscale", str(tmp_path / "a.png"), "-s", "2",
                          "--model", "models:/idm@champion", "-o", str(tmp_path / "uri.png")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert uri.returncode == 2 and uri.stderr.count("\n") == 1, uri.stderr
    assert "model URIs need MLflow" in uri.stderr and "pip install -e '.[pipeline]'" in uri.stderr


def test_the_progress_bar_never_changes_what_the_network_returns(monkeypatch):
    """A forward hook that returns a value replaces the module's output; tqdm.update returns True when it redraws."""
    from types import SimpleNamespace

    from pipeline.cli import network_progress

    monkeypatch.setattr(tqdm, "update", lambda self, n=1: True)
    net = torch.nn.Conv2d(3, 3, 1)
    method = SimpleNamespace(model=net, sample=SampleConfig(steps=2))
    x = torch.rand(1, 3, 4, 4)
    with network_progress(method, total=2, name="x"), torch.no_grad():
        out = net(x)
    assert isinstance(out, torch.Tensor) and torch.equal(out, net(x).detach())
