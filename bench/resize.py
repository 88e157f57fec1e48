"""Our resize (torch bicubic, antialiased) against PIL's BICUBIC, side by side.

Usage: python -m bench.resize [--folder ../shared/datasets/Set14] [--scale 4] [--repeat 5]
Prints seconds per image for both, their ratio, and how far the outputs differ.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from idm.resize import resize_uint8
from pipeline.data.datasets import make_pair
from pipeline.data.images import list_images, read_image


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--folder", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "datasets" / "Set14")
    parser.add_argument("--scale", type=float, default=4.0)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    ours_s = pil_s = 0.0
    diffs = []
    for path in list_images(args.folder):
        hr, lr = make_pair(read_image(path), args.scale)
        size = lr.shape[:2]
        ours_s += timed(lambda: resize_uint8(hr, size), args.repeat)
        pil_s += timed(lambda: Image.fromarray(hr).resize(size[::-1], Image.BICUBIC), args.repeat)
        pil = np.asarray(Image.fromarray(hr).resize(size[::-1], Image.BICUBIC)).astype(int)
        diffs.append(np.abs(pil - lr.astype(int)).mean())
    n = len(diffs)
    print(f"{n} images from {args.folder}, downscale x{args.scale:g}, {args.repeat} repeats")
    print(f"ours (torch, antialias)  {1e3 * ours_s / n:8.2f} ms/image")
    print(f"PIL BICUBIC              {1e3 * pil_s / n:8.2f} ms/image")
    print(f"ratio ours/PIL           {ours_s / pil_s:8.2f}x")
    print(f"mean |ours - PIL|        {np.mean(diffs):8.3f} (uint8 levels)")


if __name__ == "__main__":
    main()
