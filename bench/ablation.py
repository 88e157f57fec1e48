"""Ablation of the default recipe: what the denoiser predicts, the target, the sampler settings.

Usage: python -m bench.ablation [--steps 3000] [--variants eps-residual x0-refine ...]
Trains the `tiny` preset once per variant on the training images of the default
pipeline (`data/prepared`, run `dvc repro prepare` first), with everything else as in
params.yaml, then prints Y-PSNR (dB) on the held-out photos at x2, x3, x4 and x6 for
each sampler setting beside bicubic and the variant's own regression condition x_con.
One 3000-step variant takes ~8 min on one quiet CPU core; run two at once with
--variants to use both cores.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from idm.config import SampleConfig
from idm.inference.upscaler import Bicubic, DiffusionSR
from idm.resize import to_model_range, to_uint8
from idm.train import fit
from pipeline.data.images import read_image
from pipeline.evaluation import metrics
from pipeline.params import ROOT, load

# name -> (model.prediction, train.target, train.condition_loss)
VARIANTS = {
    "eps-residual": ("eps", "residual", 0.0),  # the previous default (paper's eps-prediction)
    "v-residual": ("v", "residual", 1.0),
    "x0-residual": ("x0", "residual", 1.0),
    "v-refine": ("v", "refine", 1.0),
    "x0-refine": ("x0", "refine", 1.0),  # the default
}
SAMPLING = [(20, 1.0), (20, 0.5), (5, 1.0), (5, 0.5)]  # (DDIM steps, temperature)
SCALES = [2.0, 3.0, 4.0, 6.0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000, help="training steps per variant")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/idm-ablation"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = load(ROOT / "params.yaml")
    prepared = ROOT / "data" / "prepared"
    manifest = pd.read_csv(prepared / "manifest.csv")
    train_images = [read_image(prepared / p) for p in manifest[manifest.split == "train"].hr]
    test = manifest[(manifest.split == "test") & manifest.scale.isin(SCALES)]
    pairs = [(row.scale, read_image(prepared / row.hr), read_image(prepared / row.lr)) for row in test.itertuples()]

    def mean_psnr(method) -> dict[float, float]:
        scores: dict[float, list[float]] = {}
        for scale, hr, lr in pairs:
            sr = method(lr, hr.shape[:2])
            scores.setdefault(scale, []).append(
                metrics.psnr(sr, hr, border=metrics.border_for(scale), y_channel=True))
        return {s: float(np.mean(v)) for s, v in scores.items()}

    header = "| variant | sampling | " + " | ".join(f"x{s:g}" for s in SCALES) + " |"
    rows = [header, "|" + "---|" * (len(SCALES) + 2)]

    def add(variant: str, setting: str, psnr: dict[float, float]) -> None:
        rows.append(f"| {variant} | {setting} | " + " | ".join(f"{psnr[s]:.2f}" for s in SCALES) + " |")
        print(rows[-1], flush=True)

    add("bicubic", "-", mean_psnr(Bicubic()))
    for name in args.variants:
        prediction, target, condition_loss = VARIANTS[name]
        model_cfg = dataclasses.replace(params.model, prediction=prediction)
        train_cfg = dataclasses.replace(params.train, steps=args.steps, target=target, condition_loss=condition_loss,
                                        checkpoint_every=0)
        ckpt = args.work / name / "checkpoint.pt"
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        fit(model_cfg, params.diffusion, train_cfg, train_images, device="cpu", ckpt_path=ckpt, progress=False)
        net = DiffusionSR.from_checkpoint(ckpt, SampleConfig(steps=1))

        def condition_only(lr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
            with torch.inference_mode():
                return to_uint8(net.model.condition(to_model_range(lr, "cpu"), size).x_con)

        add(name, "x_con only", mean_psnr(condition_only))
        for steps, temperature in SAMPLING:
            method = DiffusionSR.from_checkpoint(ckpt, SampleConfig(steps=steps, temperature=temperature))
            add(name, f"DDIM {steps}, T={temperature:g}", mean_psnr(method))
    print(f"\n{args.steps} training steps per variant, {len(pairs) // len(SCALES)} held-out photos "
          f"({params.datasets[0].test_crop} px crops)\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
