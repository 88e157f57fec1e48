"""pipeline.jobs: how `idm upscale` names its outputs, and what it refuses before any work."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.jobs import plan


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    """in/a.png, in/b.jpg, in/alpha.png (RGBA), in/sub/c.tif, in/notes.txt."""
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    rgb = np.zeros((4, 5, 3), np.uint8)
    Image.fromarray(rgb).save(root / "a.png")
    Image.fromarray(rgb).save(root / "b.jpg")
    Image.fromarray(np.zeros((4, 5, 4), np.uint8)).save(root / "alpha.png")
    Image.fromarray(rgb).save(root / "sub" / "c.tif")
    (root / "notes.txt").write_text("not an image")
    return root


def outs(jobs, base: Path) -> list[str]:
    return [job.out.relative_to(base).as_posix() for job in jobs]


def test_a_folder_gives_its_images_named_by_suffix_and_format(inputs: Path, tmp_path: Path) -> None:
    jobs = plan([inputs], tmp_path / "out", suffix="x2", ext="auto")
    assert outs(jobs, tmp_path / "out") == ["a_x2.png", "alpha_x2.png", "b_x2.jpg"]
    assert [job.alpha for job in jobs] == [False, True, False]
    deep = plan([inputs], tmp_path / "out", suffix="", ext="webp", recursive=True)
    assert outs(deep, tmp_path / "out") == ["a.webp", "alpha.webp", "b.webp", "sub/c.webp"]
    assert outs(plan([inputs / "sub" / "c.tif"], tmp_path / "o", suffix="s", ext="auto"), tmp_path / "o") == ["c_s.png"]


def test_the_output_folder_inside_an_input_folder_is_not_an_input(inputs: Path) -> None:
    (inputs / "out").mkdir()
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(inputs / "out" / "a_x2.png")
    jobs = plan([inputs], inputs / "out", suffix="x2", ext="png", recursive=True)
    assert all("out" not in job.src.relative_to(inputs).parts for job in jobs) and len(jobs) == 4


@pytest.mark.parametrize("args, message", [
    (dict(names=["a.png", "sub/a.jpg"], suffix="", ext="png"), "in/a.png and .*in/sub/a.jpg would both be written to .*/a.png"),
    (dict(names=["a.png", "a.png"], suffix="x2", ext="png"), "would both be written"),
    (dict(names=["alpha.png"], suffix="x2", ext="jpg"), "has an alpha channel, which JPEG cannot hold"),
    (dict(names=["empty"], suffix="x2", ext="png"), "no images directly in this folder .--recursive looks in subfolders"),
])
def test_refused_before_any_work(inputs: Path, tmp_path: Path, args: dict, message: str) -> None:
    (inputs / "empty").mkdir()
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(inputs / "sub" / "a.jpg")
    with pytest.raises(ValueError, match=message):
        plan([inputs / n for n in args["names"]], tmp_path / "out", suffix=args["suffix"], ext=args["ext"])
    assert not (tmp_path / "out").exists()


def test_an_output_never_overwrites_an_input(inputs: Path) -> None:
    with pytest.raises(ValueError, match="would overwrite the input"):
        plan([inputs / "a.png"], inputs, suffix="", ext="auto")


def test_out_as_one_file_or_a_bad_place(inputs: Path, tmp_path: Path) -> None:
    [job] = plan([inputs / "a.png"], tmp_path / "big.jpg", suffix="x2", ext="auto")
    assert job.out == tmp_path / "big.jpg"
    with pytest.raises(ValueError, match="names one file, but there are 2 inputs"):
        plan([inputs / "a.png", inputs / "b.jpg"], tmp_path / "big.jpg", suffix="x2", ext="auto")
    with pytest.raises(ValueError, match=r"\.tif is not an output format"):
        plan([inputs / "a.png"], tmp_path / "x.tif", suffix="x2", ext="auto")
    with pytest.raises(ValueError, match="is a file, so no folder can be made there"):
        plan([inputs / "a.png"], inputs / "a.png" / "deeper", suffix="x2", ext="auto")
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ValueError, match="permission denied"):
            plan([inputs / "a.png"], locked / "out", suffix="x2", ext="auto")
