"""float32 vs int8 denoiser (idm.inference.quantize): time per step, file size, PSNR delta.

Usage: python -m bench.int8 [CHECKPOINT] [--folder ../shared/datasets/Set5]
           [--calib-folder ../shared/datasets/Set14] [--calib-images 2] [--scale 4]
           [--crop 96] [--steps 20] [--speed-preset paper] [--pt2e] [--threads 2]

Two models, each quantized here and measured side by side with its float32 original:
- CHECKPOINT (default models/idm/checkpoint.pt), trained: PSNR-Y of float32 and int8
  on the test images (same x_T, DDIM eta = 0, --steps), plus its step time and size.
- the --speed-preset model (default paper, random weights: speed and size do not depend
  on the weights) at LR 16 -> 128: step time and file size.
Calibration runs the float32 sampler on --calib-images images of --calib-folder (not
the test images) over the same --steps timesteps. --pt2e also times torchao's PT2E
int8 graph compiled by Inductor (minutes of compile), the path idm.inference.quantize does not take.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/README.md: shared machines

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

from bench.per_step import interleaved_times, load_average  # noqa: E402
from bench.sampling_steps import (  # noqa: E402
    DATASETS,
    ROOT,
    Trained,
    load_trained,
    test_pairs,
    upscale,
)
from idm.config import (
    MODEL_PRESETS,  # noqa: E402
    SampleConfig,  # noqa: E402
)
from idm.diffusion.sampling import spaced_timesteps  # noqa: E402
from idm.diffusion.schedule import make_schedule  # noqa: E402
from idm.inference.quantize import file_size, quantize_denoiser, save_quantized  # noqa: E402
from idm.models import IDM  # noqa: E402
from idm.resize import to_model_range  # noqa: E402
from pipeline.evaluation import metrics  # noqa: E402

SAMPLE = SampleConfig()  # the sampling defaults of params.yaml


def step_fns(models: dict[str, torch.nn.Module], lr: torch.Tensor, size: tuple[int, int]) -> dict:
    """One denoiser step of each model (condition cached, inference_mode), by name."""
    x_t, gamma = torch.randn(lr.shape[0], 3, *size), torch.full((lr.shape[0],), 0.5)
    steps = {}
    for name, model in models.items():
        with torch.inference_mode():
            cond = model.condition(lr, size)

        def step(model=model, cond=cond) -> torch.Tensor:
            with torch.inference_mode():
                return model(x_t, gamma, cond)
        steps[name] = step
    return steps


def sizes(fp32: torch.nn.Module, int8: IDM) -> tuple[int, int]:
    """Bytes of the float32 state dict and of the int8 file."""
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(fp32.state_dict(), Path(tmp) / "fp32.pt")
        save_quantized(int8, Path(tmp) / "int8.pt")
        return file_size(Path(tmp) / "fp32.pt"), file_size(Path(tmp) / "int8.pt")


def pt2e_step(model: IDM, lr: torch.Tensor, size: tuple[int, int],
              calib_gammas: list[float]) -> tuple[Callable[[], torch.Tensor], float]:
    """torchao PT2E + X86InductorQuantizer int8 UNet compiled by Inductor: (step fn, compile s)."""
    import torch._inductor.config as inductor_config
    from torch.export import Dim, export
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    with torch.no_grad():
        cond = model.condition(lr, size)
    x = model.unet_input(torch.randn(lr.shape[0], 3, *size), cond)
    gamma = torch.full((lr.shape[0],), 0.5)
    args = (x, gamma, cond.pyramid, cond.code)
    auto = {2: Dim.AUTO, 3: Dim.AUTO}
    exported = export(model.unet, args, dynamic_shapes=(auto, None, [auto] * len(cond.pyramid), None))
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported.module(), quantizer)
    with torch.no_grad():
        for g in calib_gammas:
            prepared(x, torch.full_like(gamma, g), cond.pyramid, cond.code)
    inductor_config.freezing = True
    compiled = torch.compile(convert_pt2e(prepared))
    start = time.perf_counter()
    with torch.no_grad():
        compiled(*args)
    return (lambda: compiled(*args)), time.perf_counter() - start


def speed_and_size(fp32: IDM, int8: IDM, label: str, args: argparse.Namespace) -> list[str]:
    """Table rows for one model: step time of both, file size of both, and ratios."""
    lr = torch.rand(1, 3, 16, 16) * 2 - 1
    steps = step_fns({"fp32": fp32, "int8": int8}, lr, (128, 128))
    if args.pt2e:
        steps["pt2e"], compile_s = pt2e_step(fp32, lr, (128, 128), [0.1, 0.5, 0.9])
    times = interleaved_times(steps, args.repeat)
    fp32_bytes, int8_bytes = sizes(fp32, int8)
    rows = [f"| {label}, 16 -> 128 | {times['fp32']:.3f} | {times['int8']:.3f} | {times['fp32'] / times['int8']:.2f}x "
            f"| {fp32_bytes / 2**20:.1f} | {int8_bytes / 2**20:.1f} | {fp32_bytes / int8_bytes:.2f}x |"]
    if args.pt2e:
        rows.append(f"| {label}, PT2E + Inductor int8 ({compile_s:.0f} s compile) | {times['fp32']:.3f} "
                    f"| {times['pt2e']:.3f} | {times['fp32'] / times['pt2e']:.2f}x | | | |")
    return rows


def quantize_on(net: IDM, calib_folder: Path, n: int, scale: float, crop: int, steps: list[int],
                schedule, temperature: float = 1.0) -> IDM:
    """int8 copy of `net`, calibrated on n images of `calib_folder` over `steps` from noise x `temperature`."""
    calib = [(to_model_range(lr), hr.shape[:2]) for hr, lr in test_pairs(calib_folder, scale, crop, limit=n)]
    return quantize_denoiser(net, calib, schedule=schedule, timesteps=steps, temperature=temperature,
                             generator=torch.Generator().manual_seed(0))


def psnr_delta(net: Trained, int8: IDM, pairs: list, steps: list[int], scale: float) -> tuple[float, float, float]:
    """Mean PSNR-Y (dB) of the float32 and int8 outputs against HR, and of int8 against float32."""
    border, scores = metrics.border_for(scale), []
    for hr, lr in pairs:
        sr32, sr8 = (upscale(net, m, lr, hr.shape[:2], steps, "ddim") for m in (net.model, int8))
        scores.append([metrics.psnr(sr, ref, border=border, y_channel=True)
                       for sr, ref in ((sr32, hr), (sr8, hr), (sr8, sr32))])
    p32, p8, between = (float(sum(col) / len(col)) for col in zip(*scores))
    return p32, p8, between


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", type=Path, default=ROOT / "models" / "idm" / "checkpoint.pt")
    parser.add_argument("--folder", type=Path, default=DATASETS / "Set5")
    parser.add_argument("--calib-folder", type=Path, default=DATASETS / "Set14")
    parser.add_argument("--calib-images", type=int, default=2)
    parser.add_argument("--scale", type=float, default=4.0)
    parser.add_argument("--crop", type=int, default=96, help="HR centre crop (px); 0 = whole image")
    parser.add_argument("--steps", type=int, default=SAMPLE.steps,
                        help=f"DDIM steps, calibration and test (default {SAMPLE.steps}, as params.yaml)")
    parser.add_argument("--temperature", type=float, default=SAMPLE.temperature,
                        help=f"scale of the initial noise (default {SAMPLE.temperature}, as params.yaml)")
    parser.add_argument("--speed-preset", default="paper", choices=sorted(MODEL_PRESETS) + ["none"])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--pt2e", action="store_true", help="also time the PT2E + Inductor path (minutes)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average before: {load_average()}")
    net: Trained = dataclasses.replace(load_trained(args.checkpoint), temperature=args.temperature)
    steps = spaced_timesteps(net.schedule.timesteps, args.steps)
    int8 = quantize_on(net.model, args.calib_folder, args.calib_images, args.scale, args.crop, steps, net.schedule,
                       args.temperature)
    pairs = test_pairs(args.folder, args.scale, args.crop)
    p32, p8, between = psnr_delta(net, int8, pairs, steps, args.scale)
    rows = ["| model | fp32 s/step | int8 s/step | speed-up | fp32 MiB | int8 MiB | smaller |",
            "|---|---|---|---|---|---|---|"]
    rows += speed_and_size(net.model, int8, f"checkpoint ({args.checkpoint.name})", args)
    if args.speed_preset != "none":
        paper = IDM(MODEL_PRESETS[args.speed_preset]).eval()
        schedule = make_schedule("linear", 2000)
        paper8 = quantize_on(paper, args.calib_folder, 1, 8.0, 128, spaced_timesteps(2000, 4), schedule)
        rows += speed_and_size(paper, paper8, f"{args.speed_preset} preset (random weights)", args)
    print(f"\n{args.threads} threads, median of {args.repeat} interleaved rounds\n")
    print("\n".join(rows))
    print(f"\nPSNR-Y on {len(pairs)} images of {args.folder.name} (crop {args.crop}, x{args.scale:g}, "
          f"DDIM {args.steps} steps): fp32 {p32:.3f} dB, int8 {p8:.3f} dB, delta {p8 - p32:+.3f} dB; "
          f"int8 vs fp32 output {between:.2f} dB")
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
