"""Ancestral sampling with all T steps vs DDIM with few steps: PSNR and time.

Usage: python -m bench.sampling_steps [CHECKPOINT] [--folder ../shared/datasets/Set5]
           [--scale 4] [--crop 128] [--steps 5 10 20 50 100] [--spacings uniform quadratic]
           [--no-ddpm] [--threads 2]

CHECKPOINT (default models/idm/checkpoint.pt) is a training checkpoint
(idm.checkpoint); its EMA weights, noise schedule and diffusion target are used. Each
test image is centre-cropped to --crop HR px (0: whole image; keeps CPU time sane),
paired with its bicubic LR at --scale, and upscaled from the same x_T by every sampler;
the table gives mean PSNR (Y channel, BasicSR conventions) and seconds per image.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/README.md: shared machines

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Sequence  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.per_step import load_average  # noqa: E402
from idm.checkpoint import build_model, load_checkpoint  # noqa: E402
from idm.config import DiffusionConfig, SampleConfig  # noqa: E402
from idm.diffusion.sampling import SPACINGS, spaced_timesteps, super_resolve  # noqa: E402
from idm.diffusion.schedule import Schedule, schedule_for  # noqa: E402
from idm.diffusion.targets import decode  # noqa: E402
from idm.models import IDM  # noqa: E402
from idm.resize import resize_uint8, to_model_range, to_uint8  # noqa: E402
from pipeline.data.datasets import center_crop, make_pair  # noqa: E402
from pipeline.data.images import list_images, read_image  # noqa: E402
from pipeline.evaluation import metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"


@dataclass(frozen=True)
class Trained:
    """A model with what is needed to sample from it and decode its output."""

    model: IDM
    schedule: Schedule
    target: str
    residual_scale: float
    temperature: float = 1.0


def load_trained(path: Path) -> Trained:
    """The EMA model of a training checkpoint, its schedule and its diffusion target."""
    ckpt = load_checkpoint(path)
    schedule, train = schedule_for(DiffusionConfig(**ckpt["diffusion_config"])), ckpt["train_config"]
    return Trained(build_model(ckpt, use_ema=True), schedule, train.get("target", "image"),
                   float(train.get("residual_scale", 1.0)))


def test_pairs(folder: Path, scale: float, crop: int, limit: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(HR, LR) uint8 pairs of the images in `folder`, HR centre-cropped to `crop` px."""
    paths = list_images(folder)[: limit or None]
    if not paths:
        raise SystemExit(f"{folder}: no images")
    return [make_pair(center_crop(read_image(p), crop), scale) for p in paths]


def upscale(net: Trained, model: torch.nn.Module, lr: np.ndarray, size: tuple[int, int],
            timesteps: Sequence[int], sampler: str, *, eta: float = 0.0, seed: int = 0) -> np.ndarray:
    """One SR image (H, W, 3) uint8 by `sampler` (a SAMPLERS name) at `eta` and net.temperature;
    `model` may be net.model or a quantized copy."""
    lr_t = to_model_range(lr)
    sample = SampleConfig(sampler=sampler, eta=eta, temperature=net.temperature)
    with torch.inference_mode():
        image = super_resolve(model, lr_t, size, timesteps, schedule=net.schedule, sample=sample,
                              generator=torch.Generator().manual_seed(seed),
                              decode=lambda x0, lr, cond: decode(x0, lr, size, net.target, net.residual_scale,
                                                                 x_con=cond.x_con))
        return to_uint8(image)


def evaluate(net: Trained, model: torch.nn.Module, pairs: list, timesteps: Sequence[int], sampler: str,
             eta: float, scale: float) -> tuple[float, float]:
    """(mean PSNR-Y in dB, mean seconds per image) of one sampler setting."""
    scores, seconds = [], []
    for hr, lr in pairs:
        start = time.perf_counter()
        sr = upscale(net, model, lr, hr.shape[:2], timesteps, sampler, eta=eta)
        seconds.append(time.perf_counter() - start)
        scores.append(metrics.psnr(sr, hr, border=metrics.border_for(scale), y_channel=True))
    return float(np.mean(scores)), float(np.mean(seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", type=Path, default=ROOT / "models" / "idm" / "checkpoint.pt")
    parser.add_argument("--folder", type=Path, default=DATASETS / "Set5")
    parser.add_argument("--scale", type=float, default=4.0)
    parser.add_argument("--crop", type=int, default=128, help="HR centre crop (px); 0 = whole image")
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50, 100])
    parser.add_argument("--no-ddpm", action="store_true", help="skip ancestral sampling with all T steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=1.0, help="scale of the initial noise (params sample.temperature)")
    parser.add_argument("--spacings", nargs="+", default=["uniform"], choices=list(SPACINGS),
                        help="step spacings to compare for DDIM (params sample.spacing)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average before: {load_average()}")
    net = dataclasses.replace(load_trained(args.checkpoint), temperature=args.temperature)
    pairs = test_pairs(args.folder, args.scale, args.crop)
    total = net.schedule.timesteps
    runs = [] if args.no_ddpm else [("ancestral (DDPM)", total, "ddpm", 1.0, "uniform")]
    runs += [(f"DDIM eta=0, {spacing}", n, "ddim", 0.0, spacing) for spacing in args.spacings
             for n in args.steps if n <= total]
    versus = "vs first DDIM row" if args.no_ddpm else "vs ancestral"
    rows = [f"| sampler | steps | PSNR-Y (dB) | s/image | speed-up {versus} |", "|---|---|---|---|---|"]
    bicubic = np.mean([metrics.psnr(resize_uint8(lr, hr.shape[:2]), hr, border=metrics.border_for(args.scale),
                                    y_channel=True) for hr, lr in pairs])
    rows.append(f"| bicubic | - | {bicubic:.2f} | - | - |")
    first = None
    for name, n, sampler, eta, spacing in runs:
        psnr, seconds = evaluate(net, net.model, pairs, spaced_timesteps(total, n, spacing), sampler, eta, args.scale)
        first = first or seconds
        rows.append(f"| {name} | {n} | {psnr:.2f} | {seconds:.2f} | {first / seconds:.1f}x |")
        print(rows[-1], flush=True)
    print(f"\n{args.checkpoint}, {len(pairs)} images of {args.folder.name} (crop {args.crop}), x{args.scale:g}, "
          f"target {net.target}, temperature {net.temperature:g}, {args.threads} threads\n")
    print("\n".join(rows))
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
