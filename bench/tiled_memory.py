"""Peak memory of a 512x512 -> 2048x2048 upscale with tiling, measured in a subprocess.

Usage: python -m bench.tiled_memory [--bounds 1.5] [--lr 512] [--scale 4] [--steps 2]
                                    [--overlap 16] [--preset tiny] [--threads 2] [--norms tile image]

For each memory bound (GiB), idm.inference.memory.choose_tile picks the tile of least work
among those whose estimated peak fits, and a fresh Python process runs the tiled DDIM upscale (the
tiny preset, random weights, --steps steps: memory does not depend on the weights or
the step count), once per --norms entry (idm.inference.tiling.tiled_super_resolve's norm:
"image" is ~15-20x slower). The parent reads the child's peak RSS from the kernel
(os.wait4, the per-child form of getrusage(RUSAGE_CHILDREN)). A bound above the untiled
estimate runs the whole image as one tile: that measures an untiled run (how
idm.inference.tiling.estimate_peak_bytes is calibrated, e.g. --lr 128 --bounds 1000 --steps 1).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/README.md: shared machines

import argparse  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from bench.per_step import load_average  # noqa: E402
from idm.config import MODEL_PRESETS, TILE_NORMS  # noqa: E402
from idm.inference.memory import (  # noqa: E402
    choose_tile,
    estimate_peak_bytes,
    estimate_tiled_peak_bytes,
)
from idm.inference.tiling import plan_axis  # noqa: E402

GIB = 2**30


def child(args: argparse.Namespace) -> None:
    """Run one tiled upscale and print its time (the parent measures the memory)."""
    from idm.config import SampleConfig
    from idm.diffusion.sampling import spaced_timesteps
    from idm.diffusion.schedule import make_schedule
    from idm.inference.tiling import tiled_super_resolve
    from idm.models import IDM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = IDM(MODEL_PRESETS[args.preset]).eval()
    lr = torch.rand(1, 3, args.lr, args.lr) * 2 - 1
    size = (round(args.lr * args.scale),) * 2
    start = time.perf_counter()
    steps, schedule = spaced_timesteps(1000, args.steps), make_schedule("linear", 1000)
    sample = SampleConfig(sampler="ddim", eta=0.0, temperature=1.0, tile_overlap=args.overlap,
                          tile_context=args.context, tile_norm=args.norm)
    out = tiled_super_resolve(model, lr, size, steps, schedule=schedule, sample=sample, tile=args.tile,
                              generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 3, *size)
    print(f"{time.perf_counter() - start:.1f}")


def measure(args: argparse.Namespace, tile: int) -> tuple[float, float]:
    """(peak RSS in bytes, seconds) of a child process running the upscale with `tile`."""
    cmd = [sys.executable, "-m", "bench.tiled_memory", "--child", "--tile", str(tile)] + [
        f"--{k}={getattr(args, k)}" for k in ("lr", "scale", "steps", "overlap", "context", "preset", "threads", "norm")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's rusage (ru_maxrss in KiB on Linux)
    proc.returncode = os.waitstatus_to_exitcode(status)
    output = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}): {' '.join(cmd)}")
    return usage.ru_maxrss * 1024, float(output.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bounds", type=float, nargs="+", default=[1.5], help="GiB; 4 takes ~12 min at 1 thread (4 big tiles: attention's compute "
                        "grows with the square of a tile's pixels)")
    parser.add_argument("--lr", type=int, default=512)
    parser.add_argument("--scale", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--overlap", type=int, default=16)
    parser.add_argument("--context", type=int, default=64, help="HR px of extra input around each tile")
    parser.add_argument("--preset", default="tiny", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--norms", nargs="+", default=["tile"], choices=list(TILE_NORMS),
                        help="GroupNorm statistics per tile or of the whole image")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--norm", default="tile", help=argparse.SUPPRESS)
    parser.add_argument("--tile", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    cfg, size = MODEL_PRESETS[args.preset], (round(args.lr * args.scale),) * 2
    print(f"load average before: {load_average()}")
    print(f"{args.preset} preset, {args.lr}x{args.lr} -> {size[0]}x{size[1]}, DDIM {args.steps} steps, "
          f"overlap {args.overlap} LR px, context {args.context} HR px; untiled estimate {estimate_peak_bytes(cfg, size) / GIB:.0f} GiB\n")
    rows = ["| norm | bound (GiB) | tile (LR px) | tiles | estimated peak (GiB) | measured peak RSS (GiB) | s |",
            "|---|---|---|---|---|---|---|"]
    for bound in args.bounds:
        for norm in args.norms:
            tile = choose_tile(cfg, (args.lr,) * 2, size, max_bytes=int(bound * GIB), overlap=args.overlap,
                               context=args.context, norm=norm)
            tile = tile or args.lr
            n = len(plan_axis(args.lr, size[0], tile, args.overlap)) ** 2
            estimate = estimate_tiled_peak_bytes(cfg, (args.lr,) * 2, size, tile=tile, overlap=args.overlap,
                                                 context=args.context, norm=norm)
            args.norm = norm
            peak, seconds = measure(args, tile)
            rows.append(f"| {norm} | {bound:g} | {tile} | {n} | {estimate / GIB:.2f} "
                        f"| {peak / GIB:.2f} | {seconds:.0f} |")
            print(rows[-1], flush=True)
    print("\n" + "\n".join(rows))
    print(f"(all children: getrusage(RUSAGE_CHILDREN) max RSS "
          f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20:.2f} GiB)")
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
