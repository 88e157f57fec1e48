"""Bad input at every entry point: one line naming the problem, exit code 2, nothing half-written.

Images go through the download and prepare stages, params files through all six stages,
scales and sizes through `idm upscale` and the evaluate stage, checkpoints through the
CLI, the evaluate and quantize stages and the train stage's resume check. (Hostile
archives: test_downloads.py.) Awkward but valid images (greyscale, alpha, palette,
16-bit, CMYK, rotated) must be converted, not rejected.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from idm.checkpoint import load_checkpoint, save_checkpoint
from pipeline import cli
from pipeline.params import load
from tests.helpers import photo
from tests.idm.test_checkpoint import _Payload
from tests.pipeline.data.test_images import _png_header_only
from tests.pipeline.test_cli import checkpoint  # noqa: F401 -- an untrained tiny model, module-scoped
from tests.reliability.harness import (
    STAGES,
    assert_one_line_error,
    leftovers,
    run_stage,
    snapshot,
    stage_args,
    tiny_params,
    write_params,
)

pytestmark = pytest.mark.reliability


def _png(img: np.ndarray | Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(buf, format=save.pop("format", "PNG"), **save)
    return buf.getvalue()


def _workspace(tmp: Path, files: dict[str, bytes], **params) -> dict[str, Path]:
    """A folder holding `files` and a tiny params.yaml on it (`params`: see tiny_params)."""
    folder = tmp / "images"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    params = write_params(tmp / "params.yaml", tiny_params(folder, **params))
    return {"params": params, "raw": tmp / "data" / "raw", "prepared": tmp / "data" / "prepared",
            "sr": tmp / "data" / "sr", "models": tmp / "models" / "idm", "reports": tmp / "reports", "folder": folder}


GOOD = {"a.png": _png(photo(40, 44, 1)), "b.png": _png(photo(36, 40, 2))}
JPEG = _png(photo(40, 40, 3), format="JPEG", quality=90)

BAD_IMAGES = {
    "corrupt": (b"\x89PNG\r\n\x1a\n garbage", "not a readable image"),
    "truncated png": (_png(photo(40, 40, 4))[:300], "not a readable image"),
    "truncated jpeg": (JPEG[: len(JPEG) // 2], "not a readable image"),
    "zero bytes": (b"", "not a readable image"),
    "text named .png": (b"these are not the pixels you are looking for", "not a readable image"),
    "50000x50000 bomb": (_png_header_only(50_000, 50_000), "image too large"),
    "1x1": (_png(photo(1, 1)), "test image of 1x1 px cannot be used at scale x2"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_a_bad_image_fails_prepare_naming_it_and_keeps_the_previous_outputs(tmp_path, case):
    data, fragment = BAD_IMAGES[case]
    w = _workspace(tmp_path, GOOD, test_fraction=1.0)  # every image a test image, so the 1x1 one is paired
    for stage in ("download", "prepare"):
        assert run_stage(stage, "--params", w["params"], *stage_args(w, stage))[0] == 0
    before = snapshot(w["prepared"])
    (w["folder"] / "zz_bad.png").write_bytes(data)
    assert run_stage("download", "--params", w["params"], *stage_args(w, "download"))[0] == 0
    code, err = run_stage("prepare", "--params", w["params"], *stage_args(w, "prepare"))
    assert_one_line_error(code, err, "zz_bad.png", fragment)
    assert snapshot(w["prepared"]) == before and leftovers(w["prepared"].parent) == []


def _modes() -> dict[str, bytes]:
    rgb = photo(40, 48, 5)
    rotated = Image.fromarray(photo(40, 56, 6))
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    palette_alpha = Image.fromarray(rgb).convert("P")
    palette_alpha.info["transparency"] = 0
    as_float, as_int32 = io.BytesIO(), io.BytesIO()
    Image.fromarray(rgb[..., 0].astype(np.float32) / 255).save(as_float, format="TIFF")
    Image.fromarray(rgb[..., 1].astype(np.int32) * 256).save(as_int32, format="TIFF")
    return {
        "grey.png": _png(Image.fromarray(rgb).convert("L")),
        "grey_alpha.png": _png(Image.fromarray(rgb).convert("LA")),
        "rgba.png": _png(Image.fromarray(rgb).convert("RGBA")),
        "palette.png": _png(Image.fromarray(rgb).convert("P")),
        "palette_alpha.png": _png(palette_alpha, transparency=0),
        "bilevel.png": _png(Image.fromarray(rgb).convert("1")),
        "sixteen.png": _png(Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)),
        "int32.tif": as_int32.getvalue(),
        "float.tif": as_float.getvalue(),
        "cmyk.jpg": _png(Image.fromarray(rgb).convert("CMYK"), format="JPEG"),
        "rotated.jpg": _png(rotated, format="JPEG", exif=exif),
    }


def test_every_image_mode_is_converted_to_8_bit_rgb(tmp_path):
    files = _modes()
    w = _workspace(tmp_path, files)
    for stage in ("download", "prepare"):
        code, err = run_stage(stage, "--params", w["params"], *stage_args(w, stage))
        assert code == 0, err
    manifest = pd.read_csv(w["prepared"] / "manifest.csv")
    assert set(manifest.image) == {Path(name).stem for name in files}
    for rel in [*manifest.hr, *manifest.lr.dropna()]:
        with Image.open(w["prepared"] / rel) as img:
            assert img.mode == "RGB", rel
    rotated = manifest[manifest.image == "rotated"].iloc[0]
    assert rotated.hr_w <= rotated.hr_h, "EXIF orientation applied (56x40 shown as 40x56)"


# ------------------------------------------------------------------ params


BAD_PARAMS = {
    "unknown section": ("evaluat: {}\n", "unknown section 'evaluat'"),
    "misspelt key": ("train: {lerning_rate: 0.001}\n", "unknown key train.lerning_rate"),
    "wrong type": ("prepare: {seed: zero}\n", "prepare.seed must be of type int, got 'zero'"),
    "bool for int": ("prepare: {seed: true}\n", "prepare.seed must be of type int"),
    "out of range": ("train: {steps: 0}\n", "steps must be an integer >= 1"),
    "scale <= 1": ("prepare: {scales: [1]}\n", "prepare.scales must be finite numbers > 1, got 1.0"),
    "scale NaN": ("prepare: {scales: [.nan]}\n", "got nan"),
    "scale inf": ("prepare: {ood_scales: [.inf]}\n", "got inf"),
    "scale as text": ("prepare: {scales: [x4]}\n", "prepare.scales[0] must be of type float"),
    "bad YAML": ("datasets: [unclosed\n", "not valid YAML"),
    "not a mapping": ("- just\n- a list\n", "must be a mapping of sections"),
}


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("case", sorted(BAD_PARAMS))
def test_every_stage_rejects_a_bad_params_file_before_any_work(tmp_path, stage, case):
    text, fragment = BAD_PARAMS[case]
    w = _workspace(tmp_path, GOOD)
    good = w["params"].read_text()
    if case in ("bad YAML", "not a mapping"):
        w["params"].write_text(text)
    else:  # the bad section merged in (a repeated section is refused on its own: duplicate keys)
        params = yaml.safe_load(good)
        for section, values in yaml.safe_load(text).items():
            params[section] = {**(params.get(section) or {}), **values}
        w["params"].write_text(yaml.safe_dump(params, sort_keys=False))
    assert_one_line_error(*run_stage(stage, "--params", w["params"], *stage_args(w, stage)), fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "params.yaml"], "a stage wrote something"


# ------------------------------------------------------------------ scales, sizes, memory


@pytest.mark.parametrize("args, fragment", [
    (["--scale", "1"], "scale must be a finite number > 1, got 1.0"),
    (["--scale", "0"], "scale must be a finite number > 1"),
    (["--scale", "-3"], "scale must be a finite number > 1"),
    (["--scale", "nan"], "scale must be a finite number > 1, got nan"),
    (["--scale", "inf"], "scale must be a finite number > 1, got inf"),
    (["--scale", "two"], "scale must be a number > 1"),
    (["--scale", "1e308"], "makes the output size infinite"),
    (["--scale", "1e6"], "a 8000000x8000000 output is above the limit"),
    (["--size", "0x10"], "--size must be positive"),
    (["--size", "100000x100000"], "a 100000x100000 output is above the limit"),
    (["--scale", "8", "--max-memory-gb", "0.001"], "no tile larger than the overlap (8 px) fits"),
    (["--scale", "8", "--max-memory-gb", "0.05", "--no-tiling"], "above the bound of 0.05 GiB"),
    (["--scale", "2", "--steps", "0"], "--steps must be an integer >= 1: this model's x_con was not trained as a regression"),
])
def test_the_cli_rejects_bad_scales_sizes_and_memory_bounds(checkpoint, tmp_path, capsys, args, fragment):  # noqa: F811
    (tmp_path / "a.png").write_bytes(_png(photo(8, 8)))
    steps = [] if "--steps" in args else ["--steps", "1"]
    with pytest.raises(SystemExit) as exit_:
        cli.main(["upscale", str(tmp_path / "a.png"), *args, *steps, "--model", str(checkpoint),
                  "--out", str(tmp_path / "out")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and "error: " in last and fragment in last, last
    assert not (tmp_path / "out").exists()


def test_a_1x1_image_is_upscaled_not_rejected(checkpoint, tmp_path, capsys):  # noqa: F811
    (tmp_path / "one.png").write_bytes(_png(photo(1, 1)))
    cli.main(["upscale", str(tmp_path / "one.png"), "--scale", "4", "--model", str(checkpoint), "--steps", "1",
              "--out", str(tmp_path)])
    with Image.open(tmp_path / "one_x4.png") as img:
        assert img.size == (4, 4) and img.mode == "RGB"


def test_evaluate_rejects_outputs_beyond_the_memory_bound_and_writes_nothing(checkpoint, tmp_path):  # noqa: F811
    w = _workspace(tmp_path, GOOD, sample={"max_memory_gb": 1e-6}, evaluate={"methods": ["bicubic", "idm"]})
    for stage in ("download", "prepare"):
        assert run_stage(stage, "--params", w["params"], *stage_args(w, stage))[0] == 0
    args = [*stage_args(w, "evaluate")[:-1], checkpoint]
    assert_one_line_error(*run_stage("evaluate", "--params", w["params"], *args), "no tile larger than the overlap")
    assert not w["sr"].exists() and not w["reports"].exists() and leftovers(w["sr"].parent) == []


# ------------------------------------------------------------------ checkpoints


@pytest.fixture(scope="module")
def bad_checkpoints(checkpoint, tmp_path_factory) -> dict[str, tuple[Path, str]]:  # noqa: F811
    """Checkpoint files that must not load: {case: (path, fragment of the error)}."""
    tmp = tmp_path_factory.mktemp("bad-checkpoints")
    data, ckpt = checkpoint.read_bytes(), load_checkpoint(checkpoint)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # one byte in the middle of the weights: torch.load alone would not notice
    raw = {"truncated": (data[: len(data) // 3], "corrupt or truncated"), "zero bytes": (b"", "corrupt or truncated"),
           "text": (b"not a checkpoint\n" * 20, "corrupt or truncated"), "flipped byte": (bytes(flipped), "corrupt")}
    cases = {}
    for name, (content, fragment) in raw.items():
        (tmp / f"{name}.pt").write_bytes(content)
        cases[name] = (tmp / f"{name}.pt", fragment)
    for name, config, fragment in (
        ("weights of another config", {"base_channels": 16}, "weights do not fit its model_config"),
        ("config of another version", {"hyper_drive": True}, "cannot be built by this version of idm"),
    ):
        save_checkpoint({**ckpt, "model_config": {**ckpt["model_config"], **config}}, tmp / f"{name}.pt")
        cases[name] = (tmp / f"{name}.pt", fragment)
    return cases


@pytest.mark.parametrize("case", ["truncated", "zero bytes", "text", "flipped byte", "weights of another config",
                                  "config of another version"])
def test_the_cli_refuses_a_damaged_or_foreign_checkpoint(bad_checkpoints, tmp_path, capsys, case):
    path, fragment = bad_checkpoints[case]
    (tmp_path / "a.png").write_bytes(_png(photo(8, 8)))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["upscale", str(tmp_path / "a.png"), "--scale", "2", "--model", str(path), "--out", str(tmp_path / "out")])
    line = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and line.startswith("idm: error: ") and fragment in line and "\n" not in line, line
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from tests.reliability.harness import prepared_workspace

    return prepared_workspace(tmp_path_factory.mktemp("prepared"), evaluate={"methods": ["idm"]})


def test_a_malicious_pickle_never_runs_wherever_a_checkpoint_is_read(checkpoint, prepared, tmp_path, capsys):  # noqa: F811
    from pipeline.stages.train import resume_blocker as reusable

    marker = tmp_path / "pwned"
    ckpt = load_checkpoint(checkpoint)
    ckpt["model"]["innocent.weight"] = _Payload(marker)
    evil = tmp_path / "evil.pt"
    torch.save(ckpt, evil)
    refusal = "refusing to load: it references the Python object"

    with pytest.raises(SystemExit):
        cli.main(["upscale", str(prepared["images"] / "rgb.png"), "--scale", "2", "--model", str(evil),
                  "--out", str(tmp_path / "out")])
    assert refusal in capsys.readouterr().err
    w = prepared
    for stage, args in (("evaluate", [*stage_args(w, "evaluate")[:-1], evil]),
                        ("quantize", ["--prepared", w["prepared"], "--checkpoint", evil, "--out", tmp_path / "int8"])):
        assert_one_line_error(*run_stage(stage, "--params", w["params"], *args), str(evil), refusal)
    assert refusal in reusable(evil, load(w["params"])), "the train stage would set it aside, not resume from it"
    assert not marker.exists(), "the payload ran"
    assert not w["sr"].exists() and not (tmp_path / "int8").exists() and not (tmp_path / "out").exists()
