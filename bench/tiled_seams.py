"""Tiled vs untiled IDM output on images small enough to run untiled: the PSNR difference.

Usage: python -m bench.tiled_seams [CHECKPOINT] [--scales 2 2.5 3 4] [--tiles 32:8:0 32:8 48:16 48:16:64:image auto:8]
           [--folder ../shared/datasets/Set14 --crop 192 [--as-lr]] [--only zebra monarch]
Upscales the held-out test images of the default pipeline (`data/prepared`), or with
--folder that folder's images centre-cropped to --crop HR px and paired with their
bicubic LR (with --as-lr the images themselves are the LR inputs, upscaled past any
ground truth: for outputs larger than the memory bound; only the agreement is printed),
with the sampling settings of params.yaml, once untiled and once tile by
tile (tile:overlap:context:norm: tile and overlap in LR px, context in HR px,
defaulting to params.yaml's tile_context, norm "tile" or "image" (idm.inference.image_norm),
defaulting to params.yaml's tile_norm; from the same whole-image x_T; tile "auto" is
the tile `idm upscale` would use, `idm.inference.tiling.choose_tile` under params.yaml's
max_memory_gb, "auto@2" under 2 GiB), and prints
tiled minus untiled Y-PSNR against the ground truth per image, in brackets the Y-PSNR
of the tiled output against the untiled one (inf: identical, the image fit in one
tile's input), and the tiled run's time over the untiled run's, measured in the same
process one after the other. The issue's target: |difference| <= 0.05 dB; a summary per
tile spec counts the cases within it, leaving out those run as one tile (identical).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch

from idm.config import ModelConfig, SampleConfig
from idm.diffusion.sampling import super_resolve
from idm.inference.memory import choose_tile
from idm.inference.tiling import tiled_super_resolve
from idm.inference.upscaler import DiffusionSR
from idm.resize import to_model_range, to_uint8
from pipeline.data.datasets import center_crop, make_pair
from pipeline.data.images import list_images, read_image
from pipeline.evaluation import metrics
from pipeline.params import ROOT, load


def test_images(args: argparse.Namespace) -> Iterator[tuple[str, float, np.ndarray | None, np.ndarray]]:
    """(name, scale, HR, LR) of the held-out photos in data/prepared, or of --folder's images
    (with --as-lr: (name, scale, None, image), the image cropped and used as the LR input)."""
    if args.folder is not None:
        for path in list_images(args.folder):
            if args.only and path.stem not in args.only:
                continue
            image = center_crop(read_image(path), args.crop)
            for scale in args.scales:
                yield (path.stem, scale, None, image) if args.as_lr else (path.stem, scale, *make_pair(image, scale))
        return
    prepared = ROOT / "data" / "prepared"
    manifest = pd.read_csv(prepared / "manifest.csv")
    for row in manifest[(manifest.split == "test") & manifest.scale.isin(args.scales)].itertuples():
        if args.only and row.image not in args.only:
            continue
        yield row.image, row.scale, read_image(prepared / row.hr), read_image(prepared / row.lr)


def parse_spec(spec: str, sample: SampleConfig, lr_size: tuple[int, int], size: tuple[int, int],
               cfg: ModelConfig) -> tuple[int | None, int, int, str]:
    """(tile or None for untiled, overlap, context, norm) of a tile:overlap[:context[:norm]] spec."""
    fields = spec.split(":")
    overlap, context = [int(v) for v in fields[1:3]] + [sample.tile_overlap, sample.tile_context][len(fields[1:3]):]
    norm = fields[3] if len(fields) > 3 else sample.tile_norm
    if not fields[0].startswith("auto"):
        return int(fields[0]), overlap, context, norm
    gib = float(fields[0].partition("@")[2] or sample.max_memory_gb)
    return choose_tile(cfg, lr_size, size, max_bytes=int(gib * 2**30), overlap=overlap, context=context,
                       norm=norm), overlap, context, norm


def summary(spec: str, diffs: list[tuple[float, float]]) -> str:
    """How many tiled cases of one spec are within the 0.05 dB target, and the worst."""
    tiled = [d for d, agreement in diffs if math.isfinite(agreement)]
    if not tiled:
        return f"{spec}: no case was tiled"
    if all(math.isnan(d) for d in tiled):  # --as-lr: agreement only
        return f"{spec}: {len(tiled)} tiled, lowest agreement {min(a for _, a in diffs if math.isfinite(a)):.1f} dB"
    worst = max(tiled, key=abs)
    within = sum(abs(d) <= 0.05 for d in tiled)
    return f"{spec}: {within} of {len(tiled)} within 0.05 dB, worst {worst:+.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", type=Path, default=ROOT / "models" / "idm" / "model.pt")
    parser.add_argument("--scales", type=float, nargs="+", default=[2.0, 2.5, 3.0, 4.0])
    parser.add_argument("--tiles", nargs="+", default=["32:8:0", "32:8", "48:16"],
                        help="tile:overlap[:context[:norm]]: LR px (or auto, auto@GiB: choose_tile under "
                             "params.yaml's max_memory_gb or GiB), context in HR px, norm tile|image "
                             "(defaults: params.yaml's tile_context and tile_norm)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--folder", type=Path, help="a folder of test images instead of the held-out photos")
    parser.add_argument("--crop", type=int, default=192, help="with --folder: HR centre crop (px)")
    parser.add_argument("--only", nargs="+", help="only these images (file stems)")
    parser.add_argument("--as-lr", action="store_true",
                        help="with --folder: the (cropped) images are the LR inputs; no ground truth, "
                             "only the tiled output's agreement with the untiled one")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    s = load(ROOT / "params.yaml").sample
    net = DiffusionSR.from_checkpoint(args.checkpoint, s)
    kwargs = dict(schedule=net.schedule, sample=s, decode=net.decode)
    rows = ["| image | scale | " + " | ".join(f"tile {t}" for t in args.tiles) + " |",
            "|---|---|" + "---|" * len(args.tiles)]
    results: dict[str, list[tuple[float, float]]] = {spec: [] for spec in args.tiles}
    for name, scale, hr, lr in test_images(args):
        x, border = to_model_range(lr, "cpu"), metrics.border_for(scale)
        size = hr.shape[:2] if hr is not None else tuple(round(scale * n) for n in lr.shape[:2])

        def psnr(out: torch.Tensor) -> float:
            if hr is None:  # --as-lr: no ground truth
                return math.nan
            return metrics.psnr(to_uint8(out), hr, border=border, y_channel=True)

        with torch.inference_mode():
            start = time.perf_counter()
            untiled_out = super_resolve(net.model, x, size, net.timesteps,
                                        generator=torch.Generator().manual_seed(s.seed), **kwargs)
            untiled_time, untiled = time.perf_counter() - start, psnr(untiled_out)
            diffs = []
            for spec in args.tiles:
                try:
                    tile, overlap, context, norm = parse_spec(spec, s, lr.shape[:2], size, net.model.cfg)
                except ValueError as err:  # no tile fits the bound
                    diffs.append(str(err))
                    continue
                if tile is None:
                    diffs.append("untiled (fits the bound)")
                    continue
                start = time.perf_counter()
                sample = dataclasses.replace(s, tile_overlap=overlap, tile_context=context, tile_norm=norm)
                tiled = tiled_super_resolve(net.model, x, size, net.timesteps, schedule=net.schedule, sample=sample,
                                            tile=tile, decode=net.decode,
                                            generator=torch.Generator().manual_seed(s.seed))
                ratio = (time.perf_counter() - start) / untiled_time
                agreement = metrics.psnr(to_uint8(tiled), to_uint8(untiled_out), border=border, y_channel=True)
                diff = psnr(tiled) - untiled
                results[spec].append((diff, agreement))
                label = f"{tile} px: " if spec.startswith("auto") else ""
                shown = f"{diff:+.3f} " if hr is not None else ""
                diffs.append(f"{label}{shown}({agreement:.1f}) {ratio:.1f}x")
        name = name if hr is not None else f"{name} {lr.shape[1]}x{lr.shape[0]}"
        rows.append(f"| {name} | x{scale:g} | " + " | ".join(diffs) + " |")
        print(rows[-1], flush=True)
    print(f"\n{args.checkpoint}: tiled minus untiled Y-PSNR (dB), {s.sampler} {s.steps} steps, "
          f"temperature {s.temperature:g}\n")
    print("\n".join(rows))
    print("\n" + "\n".join(summary(spec, results[spec]) for spec in args.tiles))


if __name__ == "__main__":
    main()
