"""End-to-end `idm upscale` speed per output size: seconds, s/Mpx, peak RSS, achieved GFLOP/s.

Usage: python -m bench.upscale_speed [--presets tiny paper] [--mpx 0.06 0.25 1 2.5]
                                     [--scale 4] [--steps 5] [--threads 2] [--checkpoint PATH]

Each case is one `python -m pipeline.cli upscale` child process on a real photo
(scikit-image's astronaut, resized to the LR size the output needs), with the
pipeline's sampling defaults (DDIM, `--steps`, the 4 GiB tiling bound): wall seconds of
the whole process, s/Mpx of output, peak RSS (wait4), and the denoiser's achieved
GFLOP/s, its FLOPs (torch.utils.flop_counter on the meta device, at the size each tile
runs) times the steps over the wall time. The machine's peak is measured in the same run:
a 2048^3 float32 matmul and a 64 -> 64 channel 3x3 float32 convolution at 256 x 256
(and bfloat16 where the CPU has it), so the fraction of peak is read against this CPU,
whose flags are printed. Without --checkpoint a preset runs with random weights (speed
does not depend on them).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/README.md: shared machines

import argparse  # noqa: E402
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
from idm.inference.memory import choose_tile  # noqa: E402
from idm.inference.tiling import largest_input, tile_starts  # noqa: E402
from idm.models import IDM  # noqa: E402
from idm.resize import resize_uint8  # noqa: E402
from pipeline.data.images import write_image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_flags() -> str:
    """The CPU model, the SIMD flags among CPU_FLAGS it has, and torch's chosen capability."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())
    return (f"{model}; flags: {' '.join(f for f in CPU_FLAGS if f in flags) or 'none of ' + ', '.join(CPU_FLAGS)}; "
            f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, "
            f"{torch.get_num_threads()} threads")


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


def step_flops(cfg: ModelConfig, lr_size: tuple[int, int], size: tuple[int, int], sample: SampleConfig) -> float:
    """FLOPs of one denoiser step of an (h, w) -> size upscale, summed over the tiles it runs in."""
    tile = choose_tile(cfg, lr_size, size, max_bytes=sample.max_bytes, overlap=sample.tile_overlap,
                       context=sample.tile_context, norm=sample.tile_norm)
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
        cond = model.condition(torch.zeros(1, 3, h, w), (H, W))
        with FlopCounterMode(display=False) as counter:
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


def run_case(checkpoint: Path, image: Path, scale: float, steps: int, threads: int, out: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in bytes) of one `idm upscale` child process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "pipeline.cli", "upscale", str(image), "--scale", f"{scale:g}", "--steps", str(steps),
           "--model", str(checkpoint), "--out", str(out)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read() if proc.stderr else ''}")
    return seconds, usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny"], choices=sorted(MODEL_PRESETS))
    parser.add_argument("--checkpoint", type=Path, help="a trained checkpoint instead of random presets")
    parser.add_argument("--mpx", type=float, nargs="+", default=[0.06, 0.25, 1.0], help="output megapixels")
    parser.add_argument("--scale", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=SampleConfig().steps)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average before: {load_average()}")
    print(f"CPU: {cpu_flags()}")
    peaks = {"float32": peak_gflops(torch.float32)}
    if torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX"):
        peaks["bfloat16"] = peak_gflops(torch.bfloat16)
    for name, (mm, conv) in peaks.items():
        print(f"peak {name}: matmul {mm:.0f} GFLOP/s, 3x3 conv {conv:.0f} GFLOP/s ({args.threads} threads)")
    from skimage import data

    photo = data.astronaut()
    sample = SampleConfig(steps=args.steps)
    rows = ["| model | output | Mpx | s | s/Mpx | peak RSS (GiB) | GFLOP/s | of fp32 conv peak |",
            "|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="upscale-speed-") as tmp:
        work = Path(tmp)
        models = {"trained": args.checkpoint} if args.checkpoint else {p: random_checkpoint(p, work) for p in args.presets}
        for name, ckpt in models.items():
            cfg = build_model(load_checkpoint(ckpt)).cfg
            for mpx in args.mpx:
                side = max(1, round((mpx * 1e6) ** 0.5 / args.scale))
                lr = resize_uint8(photo, (side, side))
                image = work / f"lr{side}.png"
                write_image(image, lr)
                size = (round(side * args.scale),) * 2
                seconds, rss = run_case(ckpt, image, args.scale, args.steps, args.threads, work / "out")
                out_mpx = size[0] * size[1] / 1e6
                gflops = step_flops(cfg, (side, side), size, sample) * args.steps / seconds / 1e9
                rows.append(f"| {name} | {size[1]}x{size[0]} | {out_mpx:.2f} | {seconds:.1f} | {seconds / out_mpx:.1f} "
                            f"| {rss / 2**30:.2f} | {gflops:.1f} | {100 * gflops / peaks['float32'][1]:.0f}% |")
                print(rows[-1], flush=True)
    print("\n" + "\n".join(rows))
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
