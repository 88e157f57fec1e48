"""Metric names, one scheme for metrics.json and MLflow alike: `<metric>.<dataset>.x<scale>` (docs/metrics.md)."""

from __future__ import annotations

import math

from pipeline.data.datasets import scale_tag

PER_IMAGE_METRICS = ("psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb", "hf_ratio", "consistency", "lpips", "niqe")
SET_METRICS = ("fid", "kid", "fid_patches")  # over the patches of a whole dataset x scale
ALL_METRICS = PER_IMAGE_METRICS + SET_METRICS


def metric_name(metric: str, dataset: str, scale: float) -> str:
    """`psnr_y.Set5.x4`: the name used in metrics.json and MLflow alike."""
    return f"{metric}.{dataset}.{scale_tag(scale)}"


def parse_metric_name(name: str) -> tuple[str, str, float]:
    """'psnr_y.Set14.x2.5' -> ('psnr_y', 'Set14', 2.5); ValueError if not <metric>.<dataset>.x<scale>."""
    metric, _, rest = name.partition(".")
    dataset, sep, scale = rest.partition(".x")
    try:
        value = float(scale)
    except ValueError:
        value = float("nan")
    if not (metric and dataset and sep) or not math.isfinite(value):
        raise ValueError(f"metric name {name!r} is not <metric>.<dataset>.x<scale>, e.g. 'psnr_y.Set5.x4'")
    return metric, dataset, value
