"""A first look at a GPU machine in under 10 minutes, with nothing installed beyond `make`'s venv.

Usage: python -m bench.gpu_check [--steps 300] [--workers 4] [--tiny]

Trains the paper-size model (idm.config preset `paper`) for --steps steps on the photos
scikit-image ships, at the DIV2K recipe's sizes (48x48 LR patches, scales (1, 4], batch 16),
with `precision: auto` (bfloat16 autocast on CUDA) and --workers input processes, then
prints it/s, samples/s, peak GPU memory, the fraction of time spent waiting for input and
the loss at the start, middle and end; then times one `idm upscale` of a 2 Mpx output
(the shipped model, x2.8 of a 512 px photo). --tiny swaps in a tiny model and a few steps,
so the test suite runs the same code on CPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/README.md: shared machines

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from idm.config import MODEL_PRESETS, DiffusionConfig, TrainConfig  # noqa: E402
from idm.device import cpu_summary, resolve_device  # noqa: E402

SKIMAGE_PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry"]
DIV2K_SIZES = TrainConfig(batch_size=16, patch_size=48, lr_patch=48, scale_min=1.0, scale_max=4.0,
                          checkpoint_every=0, precision="auto")


def photos() -> list[np.ndarray]:
    from skimage import data

    return [getattr(data, name)() for name in SKIMAGE_PHOTOS]


def train(steps: int, workers: int, tiny: bool, device: torch.device) -> dict:
    """fit() at the DIV2K recipe's sizes; returns its summary plus the logged losses and peak memory."""
    from idm.train import fit

    model = MODEL_PRESETS["tiny"] if tiny else MODEL_PRESETS["paper"]
    cfg = dataclasses.replace(DIV2K_SIZES, steps=steps, workers=workers, log_every=max(1, steps // 10),
                              **({"batch_size": 2, "lr_patch": 8} if tiny else {}))
    logs: list[dict] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    summary = fit(model, DiffusionConfig(), cfg, photos(), device=device, progress=False,
                  on_log=lambda step, values: logs.append({"step": step, **values}))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {**summary, "logs": logs, "peak_gib": peak, "batch_size": cfg.batch_size}


def upscale(tiny: bool) -> tuple[float, tuple[int, int]]:
    """Seconds of one `idm upscale` (a subprocess, as a user runs it) and the output's size."""
    from skimage import data

    with tempfile.TemporaryDirectory(prefix="idm-gpu-check-") as tmp:
        photo = data.astronaut()[:64, :64] if tiny else data.astronaut()  # 512 x 512
        Image.fromarray(photo).save(Path(tmp) / "photo.png")
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pipeline.cli", "upscale", str(Path(tmp) / "photo.png"),
                        "--scale", "2.8", "--out", str(Path(tmp) / "out.png")], check=True, capture_output=True)
        seconds = time.perf_counter() - start
        return seconds, Image.open(Path(tmp) / "out.png").size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--tiny", action="store_true", help="a tiny model and 4 steps: the test suite's CPU run")
    args = parser.parse_args(argv)
    device = resolve_device("auto")
    steps = 4 if args.tiny else args.steps
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu_summary()}")
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}, bfloat16 autocast: {device.type == 'cuda'}")
    result = train(steps, args.workers, args.tiny, device)
    losses = [entry["loss"] for entry in result["logs"]]
    print(f"train: {steps} steps, batch {result['batch_size']}, {args.workers} input workers")
    print(f"  {steps / result['seconds']:.2f} it/s, {result['samples_per_s']:.1f} samples/s, "
          f"peak GPU memory {result['peak_gib']:.2f} GiB, input wait {result['input_wait']:.1%}")
    print(f"  loss: first {losses[0]:.4f}, middle {losses[len(losses) // 2]:.4f}, last {losses[-1]:.4f} "
          f"({len(losses)} log points)")
    seconds, size = upscale(args.tiny)
    print(f"upscale: {size[0]}x{size[1]} ({size[0] * size[1] / 1e6:.1f} Mpx) in {seconds:.1f} s, end to end")


if __name__ == "__main__":
    main()
