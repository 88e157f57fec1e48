"""Run a method over LR/HR pairs and score it, per image and per dataset x scale.

Metric conventions (BasicSR/SwinIR): images in [0, 255]; PSNR/SSIM on the Y channel
(BT.601) and on RGB after cropping ceil(scale) border pixels; hf_ratio is the Y Laplacian
energy of the output over the HR's on the same crop; LR-consistency is the MSE of the
resized-down output against the LR input; LPIPS (AlexNet) and NIQE (no reference, on images
of at least niqe.MIN_BLOCKS whole 96x96 blocks) per image; FID and KID per dataset x scale
over patches of the whole set. Names follow `<metric>.<dataset>.x<scale>`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from tqdm import tqdm

from idm.inference.upscaler import Method
from pipeline.data.datasets import scale_tag
from pipeline.data.images import read_image, write_image
from pipeline.evaluation import metrics
from pipeline.evaluation.names import PER_IMAGE_METRICS, metric_name
from pipeline.evaluation.niqe import MIN_BLOCKS, PristineModel


def score_image(sr: np.ndarray, hr: np.ndarray, lr: np.ndarray, scale: float, lpips: metrics.LPIPS | None,
                niqe: PristineModel | None = None) -> dict[str, float]:
    """All per-image metrics of one (H, W, 3) uint8 SR image against its HR and LR.

    A metric that cannot be computed honestly is NaN, never a number from bad inputs:
    hf_ratio for a flat HR image, NIQE for an image under niqe.MIN_BLOCKS whole 96x96 blocks
    (or one too flat to fit); the evaluate stage reports why under the metric's name.
    """
    border = metrics.border_for(scale)
    scores = {
        "psnr_y": metrics.psnr(sr, hr, border=border, y_channel=True),
        "ssim_y": metrics.ssim(sr, hr, border=border, y_channel=True),
        "psnr_rgb": metrics.psnr(sr, hr, border=border, y_channel=False),
        "ssim_rgb": metrics.ssim(sr, hr, border=border, y_channel=False),
        "hf_ratio": _or_nan(lambda: metrics.hf_ratio(sr, hr, border=border)),
        "consistency": metrics.lr_consistency(sr, lr),
    }
    if lpips is not None:
        scores["lpips"] = lpips(sr, hr)
    if niqe is not None:
        scores["niqe"] = _or_nan(lambda: niqe(sr, min_blocks=MIN_BLOCKS))
    return scores


def _or_nan(compute: Callable[[], float]) -> float:
    try:
        value = compute()
    except metrics.MetricUnavailable:
        return float("nan")
    return value if np.isfinite(value) else float("nan")


def run_method(
    method: Method,
    pairs: pd.DataFrame,
    root: Path,
    *,
    out_dir: Path | None = None,
    lpips: metrics.LPIPS | None = None,
    niqe: PristineModel | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Apply `method` to every test pair (manifest rows; paths relative to `root`).

    Saves each output as out_dir/<method>/<dataset>/x<scale>/<image>.png when out_dir
    is given. Returns one row per pair: method, dataset, image, scale, in_distribution,
    hr and sr paths (relative to `root` and `out_dir`) and the per-image metrics.
    """
    rows = []
    for pair in tqdm(pairs.itertuples(index=False), total=len(pairs), desc=method.name, disable=not progress):
        hr, lr = read_image(root / pair.hr), read_image(root / pair.lr)
        sr = method(lr, hr.shape[:2])
        if sr.shape != hr.shape or sr.dtype != np.uint8:
            raise ValueError(f"method {method.name!r} returned {sr.shape} {sr.dtype} for {pair.lr}, expected {hr.shape} uint8")
        sr_rel = f"{method.name}/{pair.dataset}/{scale_tag(pair.scale)}/{pair.image}.png"
        if out_dir is not None:
            write_image(out_dir / sr_rel, sr)
        rows.append(dict(
            method=method.name, dataset=pair.dataset, image=pair.image, scale=pair.scale,
            in_distribution=bool(pair.in_distribution), hr=pair.hr, sr=sr_rel,
            **score_image(sr, hr, lr, pair.scale, lpips, niqe),
        ))
    return pd.DataFrame(rows)


def summarize(per_image: pd.DataFrame) -> pd.DataFrame:
    """Mean of each per-image metric per method x dataset x scale, with the image count."""
    keys = ["method", "dataset", "scale", "in_distribution"]
    present = [m for m in PER_IMAGE_METRICS if m in per_image]
    table = per_image.groupby(keys, sort=True)[present].mean().reset_index()
    table["n_images"] = per_image.groupby(keys, sort=True).size().to_numpy()
    return table


def inception_by_group(
    per_image: pd.DataFrame, pairs_root: Path, sr_root: Path, make: Callable[[], metrics.InceptionDistances],
    *, fid_min: int, kid_min: int,
) -> tuple[dict[tuple[str, str, float], dict[str, float]], dict[str, str]]:
    """FID, KID and the patch count ('fid_patches') of SR vs HR patches per (method, dataset, scale);
    what cannot be scored (too few patches) is explained under its metric name instead."""
    values, unavailable = {}, {}
    for (method, dataset, scale), group in per_image.groupby(["method", "dataset", "scale"]):
        scorer = make()
        for row in group.itertuples(index=False):
            scorer.update(read_image(sr_root / row.sr), read_image(pairs_root / row.hr))
        scores = values[(method, dataset, scale)] = {"fid_patches": float(scorer.count)}
        for name, compute in (("fid", lambda: scorer.fid(fid_min)), ("kid", lambda: scorer.kid(kid_min))):
            try:
                scores[name] = compute()
            except metrics.MetricUnavailable as err:
                unavailable[metric_name(name, dataset, scale)] = str(err)
    return values, unavailable
