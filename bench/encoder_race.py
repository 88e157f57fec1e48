"""Which LR encoder pays for its CPU minutes: train candidates for equal wall time, score x_con.

Usage: python -m bench.encoder_race --minutes 8 --candidates e48x12 e64x16 [--threads 1]
Each candidate is the `lean` preset with another encoder, trained with the pretraining
recipe's objective (recipes/pretrain.yaml) on ../shared/datasets/SunHays80 for the same
wall time (steps = minutes / the seconds a step measured at the start); then the
regression output x_con is scored by Y-PSNR (LIIF protocol) on whole Set5 images at
x2, x4 and x8 beside bicubic. Run one candidate per core, two processes at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from idm.device import cpu_summary
from idm.resize import to_model_range, to_uint8
from idm.train import fit
from pipeline.data.datasets import make_pair
from pipeline.data.images import list_images, read_image
from pipeline.evaluation import metrics
from pipeline.params import ROOT, load

CANDIDATES = {  # name -> (encoder_channels, encoder_blocks)
    "e32x8": (32, 8),
    "e48x12": (48, 12),
    "e64x16": (64, 16),  # EDSR-baseline
}
SHARED = ROOT.parent / "shared" / "datasets"


def score(model: torch.nn.Module, scales: list[float]) -> dict[str, float]:
    """Mean Y-PSNR of x_con and of bicubic on Set5 per scale."""
    from idm.inference.upscaler import Bicubic

    out: dict[str, float] = {}
    images = [read_image(p) for p in list_images(SHARED / "Set5")]
    for s in scales:
        ours, bic = [], []
        for img in images:
            hr, lr = make_pair(img, s)
            with torch.inference_mode():
                x_con = model.condition(to_model_range(lr, "cpu"), hr.shape[:2]).x_con
            border = metrics.border_for(s)
            ours.append(metrics.psnr(to_uint8(x_con), hr, border=border, y_channel=True))
            bic.append(metrics.psnr(Bicubic()(lr, hr.shape[:2]), hr, border=border, y_channel=True))
        out[f"x{s:g}"], out[f"bicubic_x{s:g}"] = float(np.mean(ours)), float(np.mean(bic))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = load(ROOT / "recipes" / "pretrain.yaml")
    images = [read_image(p) for p in list_images(SHARED / "SunHays80")]
    print(f"CPU: {cpu_summary()}; {args.threads} thread(s) per candidate")
    for name in args.candidates:
        channels, blocks = CANDIDATES[name]
        model_cfg = dataclasses.replace(params.model, encoder_channels=channels, encoder_blocks=blocks)
        probe = dataclasses.replace(params.train, steps=3, log_every=1, checkpoint_every=0)
        t0 = time.perf_counter()
        fit(model_cfg, params.diffusion, probe, images, device="cpu", progress=False)
        per_step = (time.perf_counter() - t0) / 3
        steps = max(1, int(args.minutes * 60 / per_step))
        result: dict[str, float] = {}
        cfg = dataclasses.replace(params.train, steps=steps, sample_every=steps, checkpoint_every=0)
        fit(model_cfg, params.diffusion, cfg, images, device="cpu", progress=False,
            on_sample=lambda step, ema, result=result: result.update(score(ema, [2.0, 4.0, 8.0])))
        gains = "  ".join(f"x{s:g} {result[f'x{s:g}']:.2f} ({result[f'x{s:g}'] - result[f'bicubic_x{s:g}']:+.2f})"
                          for s in (2, 4, 8))
        print(f"{name}: {steps} steps x batch {cfg.batch_size} in {args.minutes:g} min "
              f"({per_step:.2f} s/step); Set5 Y-PSNR of x_con (gain over bicubic): {gains}", flush=True)


if __name__ == "__main__":
    main()
