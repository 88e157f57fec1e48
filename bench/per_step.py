"""Per-step throughput of the denoiser: reference mode vs each inference optimisation.

Usage: python -m bench.per_step [--preset paper] [--lr 16] [--size 128] [--batches 1 8]
                                [--repeat 5] [--no-compile] [--no-int8] [--threads 2]

Every variant runs the same randomly initialised model (speed does not depend on the
weights) side by side in one process, interleaved round by round so that a busy
machine slows them alike; the table gives the median seconds per denoiser step, the
FLOPs of one step (torch.utils.flop_counter) and the ratio to reference mode.

Reference mode is our model run the way the reference code runs it: the LR condition
(EDSR encoder and the LR pyramid) recomputed inside every denoiser call, under
torch.no_grad, default memory format. The variants then add, cumulatively: the
condition cached once per image, inference_mode, channels_last, torch.compile
(Inductor with freezing: weights folded as constants and pre-packed for oneDNN; ~30 s
to compile per batch size, less from Inductor's cache). int8 (idm.inference.quantize,
calibrated over 4 steps, eager) is timed with the cached condition and inference_mode.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/README.md: shared machines

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402
import torch._inductor.config as inductor_config  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from idm.config import MODEL_PRESETS  # noqa: E402
from idm.diffusion.sampling import spaced_timesteps  # noqa: E402
from idm.diffusion.schedule import make_schedule  # noqa: E402
from idm.inference.quantize import quantize_denoiser  # noqa: E402
from idm.models import IDM, Condition  # noqa: E402

Step = Callable[[], torch.Tensor]


def load_average() -> str:
    """The 1/5/15-minute load averages, to state how busy the machine was."""
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def interleaved_times(steps: dict[str, Step], repeat: int) -> dict[str, float]:
    """Median seconds of each step, warm-up once, then timed round-robin `repeat` times."""
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeat):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def count_flops(step: Step) -> float:
    """FLOPs of one call (convolutions, matmuls and attention; elementwise ops not counted)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def channels_last(cond: Condition) -> Condition:
    to = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
    return Condition(to(cond.x_con), [to(p) for p in cond.pyramid], cond.code)


def make_steps(model: IDM, lr: torch.Tensor, size: tuple[int, int], *, compile_model: bool,
               int8: IDM | None) -> dict[str, Step]:
    """One denoiser step per variant, on a fixed x_t at noise level 0.5."""
    batch = lr.shape[0]
    x_t = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(0))
    gamma = torch.full((batch,), 0.5)
    with torch.no_grad():
        cond = model.condition(lr, size)
    fast = IDM(model.cfg).eval()
    fast.load_state_dict(model.state_dict())
    fast = fast.to(memory_format=torch.channels_last)
    x_cl, cond_cl = x_t.contiguous(memory_format=torch.channels_last), channels_last(cond)

    def run(net: torch.nn.Module, x: torch.Tensor, c: Condition | None, inference: bool) -> Step:
        def step() -> torch.Tensor:
            with torch.inference_mode() if inference else torch.no_grad():
                return net(x, gamma, c if c is not None else net.condition(lr, size))
        return step

    steps = {
        "reference (condition every step)": run(model, x_t, None, False),
        "+ cached condition": run(model, x_t, cond, False),
        "+ inference_mode": run(model, x_t, cond, True),
        "+ channels_last": run(fast, x_cl, cond_cl, True),
    }
    if compile_model:
        inductor_config.freezing = True  # inference only: weights become constants
        compiled = torch.compile(fast)
        start = time.perf_counter()
        run(compiled, x_cl, cond_cl, True)()
        print(f"  torch.compile: {time.perf_counter() - start:.0f} s to compile for batch {batch}")
        steps["+ torch.compile (freezing)"] = run(compiled, x_cl, cond_cl, True)
    if int8 is not None:
        steps["int8 (cached condition, inference_mode)"] = run(int8, x_t, cond, True)
        steps["int8 + channels_last"] = run(int8, x_cl, cond_cl, True)
    return steps


def report(steps: dict[str, Step], times: dict[str, float], batch: int) -> list[str]:
    """Markdown table rows: variant, s/step, GFLOP/step, GFLOP/s, speed-up vs the first (reference)."""
    rows = [f"| batch {batch} | s/step | s/step/image | GFLOP/step | GFLOP/s | vs reference |",
            "|---|---|---|---|---|---|"]
    names = list(steps)
    base = times[names[0]]
    # Every variant after the reference does the same arithmetic as the cached one; count
    # it there (the counter misses SDPA's flash kernel, which channels_last may select).
    cached_flops = count_flops(steps[names[1]])
    for name in names:
        flops = count_flops(steps[name]) if name == names[0] else cached_flops
        t = times[name]
        rows.append(f"| {name} | {t:.3f} | {t / batch:.3f} | {flops / 1e9:.1f} | {flops / 1e9 / t:.0f} "
                    f"| {base / t:.2f}x |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="paper", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--lr", type=int, default=16, help="LR side (px)")
    parser.add_argument("--size", type=int, default=128, help="target side (px)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (~30 s per batch size)")
    parser.add_argument("--no-int8", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"load average before: {load_average()}; {args.threads} threads; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    model = IDM(MODEL_PRESETS[args.preset]).eval()
    size = (args.size, args.size)
    int8 = None
    if not args.no_int8:
        calib = [(torch.rand(1, 3, args.lr, args.lr) * 2 - 1, size)]
        int8 = quantize_denoiser(model, calib, schedule=make_schedule("linear", 2000),
                                 timesteps=spaced_timesteps(2000, 4), generator=torch.Generator().manual_seed(0))
    lines = []
    for batch in args.batches:
        lr = torch.rand(batch, 3, args.lr, args.lr, generator=torch.Generator().manual_seed(batch)) * 2 - 1
        steps = make_steps(model, lr, size, compile_model=not args.no_compile, int8=int8)
        lines += report(steps, interleaved_times(steps, args.repeat), batch) + [""]
    print(f"\n{args.preset} preset, LR {args.lr} -> {args.size}, median of {args.repeat} interleaved rounds\n")
    print("\n".join(lines))
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
