"""Per-image scoring (pipeline.evaluation.evaluate), the gaps the evaluate stage reports, and
how hf_ratio flows into metrics.json names and the report table."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import skimage.data

from idm.resize import resize_uint8
from pipeline.evaluation import metrics
from pipeline.evaluation.evaluate import score_image, summarize
from pipeline.evaluation.niqe import PristineModel
from pipeline.evaluation.report import dataset_table
from pipeline.stages.evaluate import mark_gaps, metrics_dict
from tests.helpers import photo


def bicubic_pair(hr: np.ndarray, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """(sr, lr): hr downscaled by `scale` and back up, both with the project's bicubic."""
    lr = resize_uint8(hr, (hr.shape[0] // scale, hr.shape[1] // scale))
    return resize_uint8(lr, hr.shape[:2]), lr


def test_score_image_has_hf_ratio_and_niqe_only_on_large_images() -> None:
    model = PristineModel.load()
    hr = photo(64, 64, seed=5)
    sr, lr = bicubic_pair(hr, 2)
    scores = score_image(sr, hr, lr, 2, lpips=None, niqe=model)
    assert list(scores) == ["psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb", "hf_ratio", "consistency", "niqe"]
    assert scores["hf_ratio"] == metrics.hf_ratio(sr, hr, border=2)
    assert 0 < scores["hf_ratio"] < 0.5  # bicubic x2 of a noisy image: most of the fine detail is gone
    assert math.isnan(scores["niqe"])  # 64 px: no whole block, let alone 36

    big = skimage.data.retina()[400:976, 400:976]  # 576x576: 6x6 blocks
    sr, lr = bicubic_pair(big, 4)
    scores = score_image(sr, big, lr, 4, lpips=None, niqe=model)
    assert scores["niqe"] == model(sr) and np.isfinite(scores["niqe"])
    assert "niqe" not in score_image(sr, big, lr, 4, lpips=None)


def test_flat_ground_truth_gives_nan_hf_ratio_not_an_error() -> None:
    hr = np.full((32, 32, 3), 90, np.uint8)
    sr = photo(32, 32)
    scores = score_image(sr, hr, resize_uint8(hr, (16, 16)), 2, lpips=None)
    assert math.isnan(scores["hf_ratio"]) and np.isfinite(scores["psnr_y"])


def per_image_rows() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two methods x one dataset x two scales x two images: at x2 every image is large enough
    for NIQE and image 'b' has a flat HR; at x4 image 'b' is 288x288 (3x3 blocks)."""
    pairs = pd.DataFrame(dict(dataset="d", image=["a", "b", "a", "b"], scale=[2.0, 2.0, 4.0, 4.0],
                              hr_h=[600, 600, 600, 288], hr_w=[600, 700, 600, 288]))
    rows = []
    for method, offset in (("bicubic", 0.0), ("idm", 1.0)):
        for pair in pairs.itertuples():
            flat = pair.image == "b" and pair.scale == 2.0
            small = pair.hr_h < 576
            rows.append(dict(method=method, dataset="d", image=pair.image, scale=pair.scale, in_distribution=True,
                             psnr_y=30.0 + offset, ssim_y=0.9, psnr_rgb=29.0, ssim_rgb=0.8,
                             hf_ratio=np.nan if flat else 0.2 + offset, consistency=1e-5,
                             niqe=np.nan if small else 5.0 + offset))
    return pd.DataFrame(rows), pairs


def test_mark_gaps_removes_incomplete_means_and_says_why() -> None:
    per_image, pairs = per_image_rows()
    table = summarize(per_image)
    unavailable: dict[str, str] = {"lpips": "disabled"}
    mark_gaps(table, per_image, pairs, unavailable)
    at = table.set_index(["method", "scale"])
    assert math.isnan(at.loc[("idm", 2.0), "hf_ratio"]) and at.loc[("idm", 4.0), "hf_ratio"] == pytest.approx(1.2)
    assert at.loc[("bicubic", 2.0), "niqe"] == 5.0 and math.isnan(at.loc[("bicubic", 4.0), "niqe"])
    assert unavailable == {
        "lpips": "disabled",
        "hf_ratio.d.x2": "1 of 2 HR images have no fine detail (a zero Y Laplacian), so hf_ratio is undefined",
        "niqe.d.x4": "1 of 2 images are too small for NIQE: a 288x288 image holds 3x3 = 9 whole 96x96 blocks, "
                     "under NIQE's minimum of 36 (e.g. 6x6, a 576x576 image)",
    }
    numbers = metrics_dict(table)
    assert numbers["idm"]["hf_ratio.d.x4"] == pytest.approx(1.2) and numbers["bicubic"]["niqe.d.x2"] == 5.0
    assert "hf_ratio.d.x2" not in numbers["idm"] and "niqe.d.x4" not in numbers["bicubic"]


def test_mark_gaps_names_a_method_whose_outputs_niqe_cannot_fit() -> None:
    per_image, pairs = per_image_rows()
    per_image.loc[(per_image.method == "idm") & (per_image.image == "a") & (per_image.scale == 2.0), "niqe"] = np.nan
    table = summarize(per_image)
    unavailable: dict[str, str] = {}
    mark_gaps(table, per_image, pairs, unavailable)
    assert unavailable["niqe.d.x2"] == "idm: NIQE is undefined for 1 of 2 outputs (too flat to fit)"
    assert table.set_index(["method", "scale"]).loc[("bicubic", 2.0), "niqe"] == 5.0


def test_report_table_shows_hf_ratio_beside_psnr() -> None:
    per_image, pairs = per_image_rows()
    table = summarize(per_image)
    mark_gaps(table, per_image, pairs, {})
    header = dataset_table(table, "d").splitlines()[0]
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[:9] == ["scale", "dist.", "method", "psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb", "hf_ratio",
                           "consistency (x1e-5)"]
    assert "| x4 " in dataset_table(table, "d") and "1.2 " in dataset_table(table, "d")
