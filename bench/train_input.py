"""The training input pipeline on its own, and the training loop's time split, on this CPU.

Usage: python -m bench.train_input [--workers 0 1 2] [--seconds 20] [--loop-steps 60] [--prepared DIR]

1. Patches/s of idm.data alone (random crop, flips, the project's resize to LR) per
   DataLoader worker count, from images in memory and memory-mapped from .npy files, at the DIV2K recipe's sizes (recipes/div2k_x4.yaml: LR 48x48,
   scales (1, 4], so HR patches up to 192x192, batch 16), on SunHays80's ~1024 px photos
   when ../shared/datasets/SunHays80 is there, else scikit-image's photos. Beside it, what a GPU would
   consume: an assumed step rate for the paper-size model (see ASSUMED_GPU_STEPS_PER_S).
2. The default recipe's (params.yaml) training loop for --loop-steps steps with 0 and 1
   workers: samples/s and the fraction of the time spent waiting for batches.
3. That loop in float32 and under bfloat16 autocast.
4. That loop eager and under torch.compile: compile time and steady speed.
Prints the CPU's capability first; run it on a quiet machine.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/README.md: shared machines

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from bench.gpu_check import DIV2K_SIZES  # noqa: E402
from idm.data import DecodedImages, TrainBatches, batches, training_images  # noqa: E402
from idm.device import cpu_summary  # noqa: E402
from pipeline.params import ROOT, load  # noqa: E402

# Assumption, not a measurement (no GPU here): the paper-size model (98M parameters) at
# batch 16 with 48x48 LR patches, bfloat16 on one A100-class GPU, ~5 steps/s = 80 patches/s.
ASSUMED_GPU_STEPS_PER_S = 5.0
DIV2K = dataclasses.replace(DIV2K_SIZES, steps=10**6)


def photos() -> tuple[str, list]:
    from pipeline.data.images import list_images, read_image

    folder = ROOT.parent / "shared" / "datasets" / "SunHays80"
    if folder.is_dir():
        return "SunHays80", [read_image(p) for p in list_images(folder)]
    from bench.gpu_check import photos as skimage_photos

    return "skimage", skimage_photos()


def input_rate(images, workers: int, seconds: float) -> float:
    """Patches/s of the DIV2K-sized stream over `images` (training_images or DecodedImages)
    with `workers` workers, after a warm-up batch."""
    stream = batches(TrainBatches(images, DIV2K), 0, workers=workers)
    next(stream)
    start, made = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        next(stream)
        made += DIV2K.batch_size
    rate = made / (time.perf_counter() - start)
    del stream
    return rate


def loop_split(steps: int, workers: int, prepared: Path, precision: str = "float32", compile: bool = False,
               on_log=None) -> dict:
    from idm.train import fit
    from pipeline.stages.train import read_training_images

    params = load(ROOT / "params.yaml")
    images = read_training_images(prepared)
    cfg = dataclasses.replace(params.train, steps=steps, checkpoint_every=0, sample_every=0,
                              log_every=steps if on_log is None else max(1, steps // 6), workers=workers,
                              precision=precision, compile=compile)
    return fit(params.model, params.diffusion, cfg, images, device="cpu", progress=False, on_log=on_log)


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--loop-steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=0, help="training threads for part 2 (0: torch's default)")
    parser.add_argument("--prepared", type=Path, default=ROOT / "data" / "prepared", help="params.yaml's prepared data")
    args = parser.parse_args()
    print(cpu_summary(), "| load", loadavg())
    threads = args.threads or torch.get_num_threads()
    start = time.perf_counter()
    name, images = photos()
    decode_s = time.perf_counter() - start
    print(f"\n1. input pipeline alone: {name} ({len(images)} photos), LR 48, scales (1, 4], batch 16")
    need = ASSUMED_GPU_STEPS_PER_S * DIV2K.batch_size
    print(f"   a GPU at the assumed {ASSUMED_GPU_STEPS_PER_S:g} steps/s consumes {need:.0f} patches/s")
    start = time.perf_counter()
    in_memory = training_images(images, 192)
    with tempfile.TemporaryDirectory(prefix="idm-decoded-") as tmp:
        decoded = DecodedImages.build(images, tmp, 192)
        print(f"   decoding: {decode_s / len(images) * 1e3:.0f} ms per photo from its file; writing the "
              f".npy cache {(time.perf_counter() - start) / len(images) * 1e3:.0f} ms per photo, once")
        print("   images           | workers | patches/s | per worker | GPUs fed")
        for label, source in (("in memory", in_memory), ("memory-mapped", decoded)):
            for workers in args.workers:
                torch.set_num_threads(1)
                rate = input_rate(source, workers, args.seconds)
                print(f"   {label:<16} | {workers:>7} | {rate:9.1f} | {rate / max(workers, 1):10.1f} | {rate / need:8.2f}")
    torch.set_num_threads(threads)
    print(f"\n2. training loop, params.yaml, {args.loop_steps} steps, {torch.get_num_threads()} training threads")
    print("   workers | samples/s | input wait")
    for workers in (0, 1):
        summary = loop_split(args.loop_steps, workers, args.prepared)
        print(f"   {workers:>7} | {summary['samples_per_s']:9.1f} | {summary['input_wait']:10.1%}")
    print("\n3. the same loop by precision (bfloat16 autocast on a CPU pays only with bf16 hardware: AMX, AVX-512 BF16)")
    print("   precision | samples/s")
    for precision in ("float32", "bfloat16"):
        summary = loop_split(args.loop_steps, 0, args.prepared, precision)
        print(f"   {precision:>9} | {summary['samples_per_s']:9.1f}")
    print("\n4. the same loop, eager and torch.compile'd: the first interval includes compiling;")
    print("   steady = samples/s of the last interval")
    print("   mode    | total s | first interval s | steady samples/s")
    for compile in (False, True):
        logs: list[float] = []
        start = time.perf_counter()
        summary = loop_split(args.loop_steps, 0, args.prepared, compile=compile,
                             on_log=lambda step, values: logs.append(values["samples_per_s"]))
        first = (args.loop_steps // 6) * load(ROOT / "params.yaml").train.batch_size / logs[0]
        print(f"   {'compile' if compile else 'eager':<7} | {time.perf_counter() - start:7.0f} | "
              f"{first:16.1f} | {logs[-1]:16.1f}")
    print("load", loadavg())


if __name__ == "__main__":
    main()
