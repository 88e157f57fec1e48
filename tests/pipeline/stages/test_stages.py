"""The stages end to end on a tiny folder dataset, and their error paths."""

from __future__ import annotations

import functools
import http.server
import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from idm.resize import resize_uint8
from pipeline.data.datasets import scale_tag
from pipeline.data.images import read_image
from pipeline.evaluation import metrics
from pipeline.evaluation.niqe import too_few_blocks
from tests.helpers import photo, stage_store_client, stage_store_runs

ROOT = Path(__file__).resolve().parents[3]


def stage(name: str, *args: str | Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", f"pipeline.stages.{name}", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def write_params(path: Path, datasets: list[dict], **sections) -> Path:
    raw = {
        "datasets": datasets,
        "prepare": {"scales": [2, 2.5], "ood_scales": [4], "seed": 0},
        "evaluate": {"methods": ["bicubic"], "device": "cpu", "lpips": False, "fid": False},
        "report": {"crop": 16, "grid_scales": [2, 4]},
    }
    for key, value in sections.items():
        raw[key] = {**raw[key], **value}
    path.write_text(yaml.safe_dump(raw))
    return path


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture
def work(tmp_path: Path, image_folder: Path) -> dict[str, Path]:
    params = write_params(tmp_path / "params.yaml", [{"name": "tiny", "source": "folder", "path": str(image_folder), "test_fraction": 0.5}])
    return {"params": params, "raw": tmp_path / "raw", "prepared": tmp_path / "prepared", "sr": tmp_path / "sr",
            "reports": tmp_path / "reports", "folder": image_folder}


@pytest.mark.slow
def test_stages_end_to_end(work):
    p = work
    assert stage("download", "--params", p["params"], "--out", p["raw"]).returncode == 0
    assert sorted(f.name for f in (p["raw"] / "tiny").iterdir()) == sorted(f.name for f in p["folder"].iterdir())
    assert stage("prepare", "--params", p["params"], "--raw", p["raw"], "--out", p["prepared"]).returncode == 0
    manifest = pd.read_csv(p["prepared"] / "manifest.csv")
    test = manifest[manifest.split == "test"]
    assert len(manifest[manifest.split == "train"]) == 3 and test.image.nunique() == 3
    assert sorted(test.scale.unique()) == [2.0, 2.5, 4.0]
    assert (test.hr_h == test.lr_h * test.scale).all() and (test.hr_w == test.lr_w * test.scale).all()
    assert set(test[test.scale == 4].in_distribution) == {False}

    r = stage("evaluate", "--params", p["params"], "--prepared", p["prepared"], "--sr-out", p["sr"],
              "--metrics", p["reports"] / "metrics.json", "--headline", p["reports"] / "headline",
              "--unavailable", p["reports"] / "unavailable.json", "--scales", p["reports"] / "scales.csv",
              "--per-image", p["reports"] / "per_image.csv")
    assert r.returncode == 0, r.stderr
    numbers = json.loads((p["reports"] / "metrics.json").read_text())
    assert set(numbers) == {"bicubic"}  # numbers only; the reasons are beside them
    # The headline (DVC's metrics): Y-PSNR at x2 and x4 (no x8 here), SSIM and hf_ratio at the middle one.
    assert [f.name for f in (p["reports"] / "headline").iterdir()] == ["bicubic.json"]
    shown = json.loads((p["reports"] / "headline" / "bicubic.json").read_text())
    assert shown == {k: numbers["bicubic"][k] for k in
                     ("psnr_y.tiny.x2", "psnr_y.tiny.x4", "ssim_y.tiny.x4", "hf_ratio.tiny.x4")}
    unavailable = json.loads((p["reports"] / "unavailable.json").read_text())
    # The test images are ~60 px: none has a whole 96x96 block; the reason names the first image's size.
    first = test.groupby("scale").first()
    assert first.loc[2.0, "hr_h"] < 96 and too_few_blocks(60, 72).startswith("a 60x72 image holds 0x0 = 0 whole")
    too_small = {f"niqe.tiny.{scale_tag(s)}": f"3 of 3 images are too small for NIQE: {too_few_blocks(r.hr_h, r.hr_w)}"
                 for s, r in first.iterrows()}
    assert unavailable == {"lpips": "disabled in params.yaml (evaluate.lpips: false)",
                           "fid": "disabled in params.yaml (evaluate.fid: false)", **too_small}
    # Recompute two numbers independently from the prepared files.
    rows = test[test.scale == 2.5]
    pairs = [(resize_uint8(read_image(p["prepared"] / r.lr), (r.hr_h, r.hr_w)), read_image(p["prepared"] / r.hr))
             for r in rows.itertuples()]
    expected = np.mean([metrics.psnr(sr, hr, border=3, y_channel=True) for sr, hr in pairs])
    assert numbers["bicubic"]["psnr_y.tiny.x2.5"] == pytest.approx(expected, abs=1e-5)
    expected_hf = np.mean([metrics.hf_ratio(sr, hr, border=3) for sr, hr in pairs])
    assert 0 < expected_hf < 1 and numbers["bicubic"]["hf_ratio.tiny.x2.5"] == pytest.approx(expected_hf, abs=1e-6)
    assert {"ssim_rgb.tiny.x4", "consistency.tiny.x2", "psnr_rgb.tiny.x2", "hf_ratio.tiny.x4"} <= set(
        numbers["bicubic"])
    assert not any(name.startswith("niqe.") for name in numbers["bicubic"])
    per_image = pd.read_csv(p["reports"] / "per_image.csv")
    assert sorted(per_image[per_image.scale == 2.5].hf_ratio) == pytest.approx(
        sorted(metrics.hf_ratio(sr, hr, border=3) for sr, hr in pairs), rel=1e-5)
    assert per_image.niqe.isna().all()  # too small: not computed
    assert len(list((p["sr"] / "bicubic" / "tiny" / "x4").glob("*.png"))) == 3

    run = stage_store_runs("tags.method = 'bicubic'")[0]
    assert run.data.metrics["psnr_y.tiny.x2.5"] == pytest.approx(expected, abs=1e-5)
    assert run.data.metrics["hf_ratio.tiny.x2.5"] == pytest.approx(expected_hf, abs=1e-6)
    assert run.data.tags["dvc_stage"] == "evaluate" and run.data.tags["datasets"] == "tiny"
    assert run.data.tags["unavailable.lpips"].startswith("disabled")
    assert run.data.params["prepare.scales"] == "(2.0, 2.5)"
    # The promotion gate's floor: `--model-uri bicubic` scores the same as the bicubic method.
    floor = p["reports"] / "floor"
    r = stage("evaluate", "--params", p["params"], "--prepared", p["prepared"], "--sr-out", floor / "sr",
              "--metrics", floor / "metrics.json", "--headline", floor / "headline",
              "--unavailable", floor / "unavailable.json", "--scales", floor / "scales.csv",
              "--per-image", floor / "per_image.csv", "--model-uri", "bicubic", "--label", "floor")
    assert r.returncode == 0, r.stderr
    assert json.loads((floor / "metrics.json").read_text()) == {"floor": numbers["bicubic"]}
    artifacts = {a.path for a in stage_store_client().list_artifacts(run.info.run_id)}
    assert {"scales.json", "psnr_y_vs_scale.png", "scales.csv"} <= artifacts  # the per-scale table and chart
    assert stage_store_client().get_metric_history(run.info.run_id, "psnr_y.tiny") == []  # no stepped series

    r = stage("report", "--params", p["params"], "--prepared", p["prepared"], "--sr", p["sr"], "--reports", p["reports"])
    assert r.returncode == 0, r.stderr
    report = (p["reports"] / "report.md").read_text()
    assert "## tiny" in report and "bicubic" in report and "psnr_vs_scale.png" in report and "psnr_vs_niqe.png" in report
    assert re.search(r"\|\s+psnr_rgb\s+\|\s+ssim_rgb\s+\|\s+hf_ratio\s+\|", report)  # a column of the dataset table
    assert "- `niqe.tiny.x2`: 3 of 3 images are too small for NIQE" in report
    assert "grids/tiny_x2.png" in report and "grids/tiny_x4.png" in report
    assert Image.open(p["reports"] / "grids" / "tiny_x4.png").size[0] > 200


def test_corrupt_image_fails_prepare_without_output(work, tmp_path):
    (work["folder"] / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert stage("download", "--params", work["params"], "--out", work["raw"]).returncode == 0
    r = stage("prepare", "--params", work["params"], "--raw", work["raw"], "--out", work["prepared"])
    assert_user_error(r, "zz_corrupt.png", "not a readable image")
    assert not work["prepared"].exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".prepared")] == []


def test_empty_folder_fails_download(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    params = write_params(tmp_path / "params.yaml", [{"name": "e", "source": "folder", "path": str(empty)}])
    r = stage("download", "--params", params, "--out", tmp_path / "raw")
    assert_user_error(r, "no images found", str(empty))
    assert not (tmp_path / "raw").exists()


@pytest.mark.parametrize(
    "prepare, fragment",
    [
        ({"scales": [1]}, "prepare.scales must be finite numbers > 1, got 1.0"),
        ({"scales": [0.5]}, "got 0.5"),
        ({"scales": [float("nan")]}, "got nan"),
        ({"ood_scales": [float("inf")]}, "got inf"),
        ({"sclaes": [2]}, "unknown key prepare.sclaes"),
    ],
)
def test_bad_params_fail_before_work(work, prepare, fragment):
    write_params(work["params"], [{"name": "tiny", "source": "folder", "path": str(work["folder"])}], prepare=prepare)
    r = stage("download", "--params", work["params"], "--out", work["raw"])
    assert_user_error(r, fragment)
    assert not work["raw"].exists()


def test_checksum_mismatch_leaves_nothing(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    Image.fromarray(photo(32, 32)).save(served / "one.png")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/one.png"
        params = write_params(tmp_path / "params.yaml", [{"name": "web", "source": "url", "url": url, "sha256": "0" * 64}])
        r = stage("download", "--params", params, "--out", tmp_path / "raw", "--cache", tmp_path / "cache")
        assert_user_error(r, "sha256")
        assert not (tmp_path / "raw").exists()
        assert not list((tmp_path / "cache").glob("*")) if (tmp_path / "cache").exists() else True
        # The right checksum downloads the file.
        import hashlib

        good = hashlib.sha256((served / "one.png").read_bytes()).hexdigest()
        write_params(params, [{"name": "web", "source": "url", "url": url, "sha256": good}])
        r = stage("download", "--params", params, "--out", tmp_path / "raw", "--cache", tmp_path / "cache")
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "raw" / "web" / "one.png").read_bytes() == (served / "one.png").read_bytes()
    finally:
        server.shutdown()
        server.server_close()


def test_an_interrupted_stage_ends_in_one_line_with_exit_code_130(capsys):
    import signal

    from pipeline.stages import run

    def interrupted() -> None:
        raise KeyboardInterrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_:
        run(interrupted)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_.value.code == 130 and len(lines) == 1 and lines[0].startswith("error: interrupted"), lines
    assert signal.getsignal(signal.SIGTERM) == before  # run() restores the handler it installed
