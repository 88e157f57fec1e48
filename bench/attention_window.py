"""Cost of one denoiser step per output pixel, by self-attention window, across output sizes.

Usage: python -m bench.attention_window [--preset tiny] [--sizes 128 256 512 1024] [--threads 1]
       python -m bench.attention_window --checkpoint models/idm/model.pt [--prepared data/prepared]
For each window (0 = global attention over the whole level, the previous default; 8;
16, the default; no attention at all), one untrained `preset` model's step at each
square output size from an x4 LR input: seconds per output megapixel per step (best of
3, after one warm-up). Constant s/Mpx across sizes means linear cost. Speed does not
depend on the weights.

With --checkpoint: the trained model's Y-PSNR on the prepared test pairs per scale
(params.yaml's sampler), with global attention and with windows of 8 and 16 tokens: the
quality side of the same choice (a model trained on patches that fit one window learns
the same weights either way; only images larger than a window see the difference).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from idm.config import MODEL_PRESETS
from idm.device import cpu_summary
from idm.models import IDM


def seconds_per_mpx(model: IDM, side: int) -> float:
    lr = torch.rand(1, 3, side // 4, side // 4) * 2 - 1
    with torch.inference_mode():
        cond = model.condition(lr, (side, side))
        x, level = torch.randn(1, 3, side, side), torch.full((1,), 0.5)
        model(x, level, cond)
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            model(x, level, cond)
            best = min(best, time.perf_counter() - start)
    return best / (side * side / 1e6)


def quality(checkpoint: str, prepared: str) -> None:
    import numpy as np
    import pandas as pd

    from idm.inference.upscaler import DiffusionSR
    from pipeline.data.images import read_image
    from pipeline.evaluation import metrics
    from pipeline.params import load

    params = load()
    pairs = pd.read_csv(f"{prepared}/manifest.csv").query("split == 'test'")
    method = DiffusionSR.from_checkpoint(checkpoint, params.sample)
    scales = sorted(pairs.scale.unique())
    print("| attention | " + " | ".join(f"x{s:g}" for s in scales) + " |")
    print("|---|" + "---|" * len(scales))
    for window in (0, 8, 16):
        for layer in method.model.modules():
            if hasattr(layer, "window"):
                layer.window = window
        scores = {s: [] for s in scales}
        for row in pairs.itertuples():
            hr, lr = read_image(f"{prepared}/{row.hr}"), read_image(f"{prepared}/{row.lr}")
            sr = method(lr, hr.shape[:2])
            scores[row.scale].append(metrics.psnr(sr, hr, border=metrics.border_for(row.scale), y_channel=True))
        name = "global" if window == 0 else f"window {window}"
        print(f"| {name} | " + " | ".join(f"{np.mean(scores[s]):.3f}" for s in scales) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpoint", help="score this trained model per window instead of timing")
    parser.add_argument("--prepared", default="data/prepared")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.checkpoint:
        return quality(args.checkpoint, args.prepared)
    base = MODEL_PRESETS[args.preset]
    variants = {"global": dataclasses.replace(base, attention_window=0),
                "window 8": dataclasses.replace(base, attention_window=8),
                "window 16": dataclasses.replace(base, attention_window=16),
                "no attention": dataclasses.replace(base, attention_levels=(), mid_attention=False)}
    print(f"CPU: {cpu_summary()}")
    print(f"{args.preset} preset, {args.threads} thread(s); s per output Mpx per step")
    print("| attention | " + " | ".join(f"{s}x{s}" for s in args.sizes) + " |")
    print("|---|" + "---|" * len(args.sizes))
    for name, cfg in variants.items():
        torch.manual_seed(0)
        model = IDM(cfg).eval()
        print(f"| {name} | " + " | ".join(f"{seconds_per_mpx(model, s):.2f}" for s in args.sizes) + " |", flush=True)


if __name__ == "__main__":
    main()
