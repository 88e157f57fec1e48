"""End-to-end `idm upscale` speed per output size: seconds, s/Mpx, peak RSS, achieved GFLOP/s.

Usage: python -m bench.upscale_speed [--presets tiny paper | --checkpoint PATH] [--mpx 0.06 0.25 1 2.5 16]
                                     [--scale 4] [--steps 5] [--threads 2] [--photo PATH] [--against REV] [--repeat 1]

Each case is one `python -m pipeline.cli upscale` child process on a real photo
(scikit-image's astronaut, or --photo, resized to the LR size the output needs), with the
pipeline's sampling defaults (`--steps`, 0 = the regression output; the 4 GiB tiling
bound): wall seconds of the whole process (the fastest of --repeat runs), the same minus
the start-up (a 16 x 16 -> 32 x 32 run of the same command, timed first), s/Mpx of output from the net seconds, peak RSS
(wait4), and the achieved GFLOP/s: the FLOPs of what the run computes (the condition once
and `--steps` denoiser steps, or x_con alone; torch.utils.flop_counter on the meta
device, at the size each tile runs) over the net seconds. The machine's peak is measured
in the same run: a 2048^3 float32 matmul and a 64 -> 64 channel 3x3 float32 convolution
at 256 x 256 (and bfloat16 where the CPU has it), so the fraction of peak is read against
this CPU, whose flags are printed. `--against REV` runs every case a second time on that
git revision's code (a temporary worktree) with the same checkpoint and prints the speed-up.
Without --checkpoint a preset runs with random weights (speed does not depend on them).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/README.md: shared machines

import argparse  # noqa: E402
import contextlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bench.per_step import load_average  # noqa: E402
from idm.checkpoint import build_model, load_checkpoint, make_checkpoint, save_checkpoint  # noqa: E402
from idm.config import MODEL_PRESETS, DiffusionConfig, ModelConfig, SampleConfig, TrainConfig  # noqa: E402
from idm.device import cpu_summary, has_fast_bf16  # noqa: E402
from idm.inference.memory import choose_tile  # noqa: E402
from idm.inference.tiling import largest_input, tile_starts  # noqa: E402
from idm.models import IDM  # noqa: E402
from idm.resize import resize_uint8  # noqa: E402
from pipeline.data.images import write_image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
def peak_gflops(dtype: torch.dtype, repeat: int = 5) -> tuple[float, float]:
    """(matmul, conv) GFLOP/s of this process: best of `repeat` runs of a 2048^3 matmul and a
    64 -> 64 channel 3x3 conv at 256 x 256 (batch 1), in `dtype`."""
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    x, w = torch.randn(1, 64, 256, 256, dtype=dtype), torch.randn(64, 64, 3, 3, dtype=dtype)
    results = []
    for flops, op in ((2 * 2048**3, lambda: a @ b), (2 * 64 * 64 * 9 * 256 * 256, lambda: F.conv2d(x, w, padding=1))):
        op()
        best = min(_timed(op) for _ in range(repeat))
        results.append(flops / best / 1e9)
    return results[0], results[1]


def _timed(op) -> float:
    start = time.perf_counter()
    op()
    return time.perf_counter() - start


def run_flops(cfg: ModelConfig, lr_size: tuple[int, int], size: tuple[int, int], sample: SampleConfig) -> float:
    """FLOPs of an (h, w) -> size upscale as `sample` runs it: x_con alone (steps 0), or the
    condition and `steps` denoiser steps; summed over the tiles it runs in."""
    regression = not sample.steps
    tile = choose_tile(cfg, lr_size, size, max_bytes=sample.max_bytes, overlap=sample.tile_overlap,
                       context=sample.tile_context, norm=sample.tile_norm, regression=regression)
    if tile is None:
        (h, w), (H, W), tiles = lr_size, size, 1
    else:  # every tile counted at the plan's largest network input
        rows, cols = (len(tile_starts(n, tile, sample.tile_overlap)) for n in lr_size)
        tiles = rows * cols
        H, W = (largest_input(n, N, tile=tile, overlap=sample.tile_overlap, context=sample.tile_context,
                              align=cfg.tile_align) for n, N in zip(lr_size, size))
        h, w = (-(-T * n // N) for T, n, N in zip((H, W), lr_size, size))
    with torch.device("meta"), torch.no_grad():
        model = IDM(cfg).eval()
        with FlopCounterMode(display=False) as counter:
            if regression:
                model.encoder(torch.zeros(1, 3, h, w), (H, W))
            else:
                cond = model.condition(torch.zeros(1, 3, h, w), (H, W))
                for _ in range(sample.steps):
                    model(torch.zeros(1, 3, H, W), torch.full((1,), 0.5), cond)
    return float(counter.get_total_flops() * tiles)


def random_checkpoint(preset: str, folder: Path) -> Path:
    """A checkpoint of the `preset` model with random weights and the default recipe's diffusion."""
    torch.manual_seed(0)
    cfg = MODEL_PRESETS[preset]
    model = IDM(cfg).state_dict()
    path = folder / f"{preset}.pt"
    save_checkpoint(make_checkpoint(model_config=cfg, diffusion_config=DiffusionConfig(timesteps=1000),
                                    train_config=TrainConfig(target="refine"), model=model, ema=model, optimizer={},
                                    step=0, rng=[]), path)
    return path


def run_case(code: Path, checkpoint: Path, image: Path, scale: float, steps: int, threads: int,
             out: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in bytes) of one `idm upscale` child process running `code`'s tree."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(code)}
    cmd = [sys.executable, "-m", "pipeline.cli", "upscale", str(image), "--scale", f"{scale:g}", "--steps", str(steps),
           "--model", str(checkpoint), "--out", str(out)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=code, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read() if proc.stderr else ''}")
    return seconds, usage.ru_maxrss * 1024


@contextlib.contextmanager
def worktree(rev: str | None):
    """The project's tree at git revision `rev` (a temporary detached worktree, removed after), or None."""
    if rev is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="upscale-speed-rev-") as tmp:
        subprocess.run(["git", "worktree", "add", "--detach", "--quiet", tmp, rev], cwd=ROOT, check=True)
        try:
            yield Path(tmp)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", tmp], cwd=ROOT, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny"], choices=sorted(MODEL_PRESETS))
    parser.add_argument("--checkpoint", type=Path, help="a trained checkpoint instead of random presets")
    parser.add_argument("--mpx", type=float, nargs="+", default=[0.06, 0.25, 1.0], help="output megapixels")
    parser.add_argument("--scale", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=SampleConfig().steps, help="0: the regression output")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--photo", type=Path, help="the photo to resize to each LR size (default: skimage's astronaut)")
    parser.add_argument("--against", metavar="REV", help="also run every case on this git revision's code")
    parser.add_argument("--repeat", type=int, default=1, help="runs per case (and of the start-up); the fastest counts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average before: {load_average()}")
    print(f"CPU: {cpu_summary()}")
    peaks = {"float32": peak_gflops(torch.float32)}
    if has_fast_bf16():
        peaks["bfloat16"] = peak_gflops(torch.bfloat16)
    for name, (mm, conv) in peaks.items():
        print(f"peak {name}: matmul {mm:.0f} GFLOP/s, 3x3 conv {conv:.0f} GFLOP/s ({args.threads} threads)")
    if args.photo:
        from pipeline.data.images import read_image

        photo = read_image(args.photo)
    else:
        from skimage import data

        photo = data.astronaut()
    sample = SampleConfig(steps=args.steps)
    header = "| model | output | Mpx | s | start-up | s/Mpx (net) | peak RSS (GiB) | GFLOP/s | of fp32 conv peak |"
    against = f" {args.against}: s | s/Mpx (net) | peak RSS | speed-up |" if args.against else ""
    rows = [header + against, "|---" * (header.count("|") - 1 + against.count("|")) + "|"]
    with tempfile.TemporaryDirectory(prefix="upscale-speed-") as tmp, worktree(args.against) as old:
        work = Path(tmp)
        models = {"trained": args.checkpoint} if args.checkpoint else {p: random_checkpoint(p, work) for p in args.presets}
        write_image(work / "tiny.png", resize_uint8(photo, (16, 16)))
        codes = [ROOT] + ([old] if old else [])
        for name, ckpt in models.items():
            cfg = build_model(load_checkpoint(ckpt)).cfg
            def fastest(code: Path, image: Path, scale: float) -> tuple[float, float]:
                runs = [run_case(code, ckpt, image, scale, args.steps, args.threads, work / "out")
                        for _ in range(args.repeat)]
                return min(runs)

            startup = [fastest(code, work / "tiny.png", 2)[0] for code in codes]
            for mpx in args.mpx:
                side = max(1, round((mpx * 1e6) ** 0.5 / args.scale))
                image = work / f"lr{side}.png"
                write_image(image, resize_uint8(photo, (side, side)))
                size = (round(side * args.scale),) * 2
                out_mpx = size[0] * size[1] / 1e6
                cells = []
                for code, start in zip(codes, startup):
                    seconds, rss = fastest(code, image, args.scale)
                    cells.append((seconds, max(seconds - start, 1e-3), rss))
                (seconds, net, rss) = cells[0]
                gflops = run_flops(cfg, (side, side), size, sample) / net / 1e9
                row = (f"| {name} | {size[1]}x{size[0]} | {out_mpx:.2f} | {seconds:.1f} | {startup[0]:.1f} "
                       f"| {net / out_mpx:.2f} | {rss / 2**30:.2f} | {gflops:.1f} | {100 * gflops / peaks['float32'][1]:.0f}% |")
                if old:
                    o_seconds, o_net, o_rss = cells[1]
                    row += f" {o_seconds:.1f} | {o_net / out_mpx:.2f} | {o_rss / 2**30:.2f} | {o_seconds / seconds:.2f}x |"
                rows.append(row)
                print(row, flush=True)
    print("\n" + "\n".join(rows))
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
