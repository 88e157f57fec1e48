"""quantize stage: training-free int8 post-training quantization of the trained denoiser.

Calibrates on denoiser inputs gathered across the sampling timesteps (idm.inference.quantize), then
measures, side by side in this run, file size and seconds per denoising step of fp32
and int8, and registers the int8 model as a new `idm` version tagged quantization=int8.
Outputs (default models/idm-int8/): model_int8.pt, report.json, registered.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch

from idm.files import atomic_path
from idm.inference.quantize import file_size, quantize_denoiser, save_quantized
from idm.inference.upscaler import DiffusionSR
from idm.resize import to_model_range
from pipeline import tracking
from pipeline.data.datasets import center_crop, make_pair
from pipeline.data.images import read_image
from pipeline.params import ROOT, Params, flatten, load
from pipeline.stages import run
from pipeline.workspace import staged_dir

# The scales the evaluation asks for, in and out of the training range, so that the
# activation ranges cover the out-of-distribution scales too (docs/decisions.md,
# "Calibration scales for int8").
CALIBRATION_SCALES = (2.0, 3.0, 4.0, 8.0)


def calibration_set(prepared: Path, n_images: int = 4, side: int = 96) -> list[tuple[torch.Tensor, tuple[int, int]]]:
    """(LR in [-1, 1], HR size) pairs from centre crops of the first training images, one
    scale of CALIBRATION_SCALES each (side 96: a 12 px LR image at x8)."""
    manifest = pd.read_csv(prepared / "manifest.csv")
    paths = manifest[manifest.split == "train"].hr.tolist()[:n_images]
    if not paths:
        raise ValueError(f"{prepared / 'manifest.csv'}: no training images to calibrate on")
    pairs = []
    for i, rel in enumerate(paths):
        hr, lr = make_pair(center_crop(read_image(prepared / rel), side), CALIBRATION_SCALES[i % len(CALIBRATION_SCALES)])
        pairs.append((to_model_range(lr, "cpu"), hr.shape[:2]))
    return pairs


@torch.inference_mode()
def seconds_per_step(model: torch.nn.Module, size: tuple[int, int] = (128, 128), repeat: int = 5) -> float:
    """Median seconds of one denoiser evaluation at `size` (condition computed once, outside the timing)."""
    lr = torch.rand(1, 3, size[0] // 4, size[1] // 4) * 2 - 1
    cond = model.condition(lr, size)
    x, level = torch.randn(1, 3, *size), torch.full((1,), 0.5)
    model(x, level, cond)  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        model(x, level, cond)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--prepared", type=Path, default=ROOT / "data" / "prepared")
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "idm" / "model.pt")
    parser.add_argument("--out", type=Path, default=ROOT / "models" / "idm-int8")
    args = parser.parse_args()
    params = load(args.params)
    tracking.setup()  # an unavailable MLflow store fails here, before any work
    if not args.checkpoint.is_file():
        raise FileNotFoundError(f"{args.checkpoint}: no trained model; run the train stage first (dvc repro train)")
    s = params.sample
    fp32 = DiffusionSR.from_checkpoint(args.checkpoint, s)
    int8 = quantize_denoiser(fp32.model, calibration_set(args.prepared), schedule=fp32.schedule,
                             timesteps=fp32.timesteps, temperature=s.temperature,
                             generator=torch.Generator().manual_seed(s.seed))
    with staged_dir(args.out) as staged:  # the model and its report replace the old ones together
        save_quantized(int8, staged / "model_int8.pt")
        t_fp32, t_int8 = seconds_per_step(fp32.model), seconds_per_step(int8)
        report = {"fp32_bytes": file_size(args.checkpoint), "int8_bytes": file_size(staged / "model_int8.pt"),
                  "fp32_s_per_step_128px": t_fp32, "int8_s_per_step_128px": t_int8}
        report["size_ratio"] = report["fp32_bytes"] / report["int8_bytes"]
        report["speedup"] = t_fp32 / t_int8
        (staged / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"int8: {report['size_ratio']:.2f}x smaller, {report['speedup']:.2f}x per step (128x128, this CPU)")
    register(params, args, report)


def register(params: Params, args: argparse.Namespace, report: dict) -> None:
    """Log the int8 model as a new `idm` version tagged quantization=int8, linked to the fp32 one,
    with that version's aliases plus -int8 (candidate -> candidate-int8)."""
    import mlflow

    from pipeline import registry
    from pipeline.mlflow_model import log_and_register

    source = json.loads((args.checkpoint.parent / "registered.json").read_text()) \
        if (args.checkpoint.parent / "registered.json").is_file() else {}
    with tracking.stage_run("quantize", tags={"model": "idm-int8"}, params=flatten(params)) as active:
        mlflow.log_metrics(report)
        fp32 = str(source.get("version", ""))
        tags = {"quantization": "int8", "size_bytes": str(report["int8_bytes"]),
                "speedup_per_step": f"{report['speedup']:.2f}", "fp32_version": fp32}
        description = (f"Int8 post-training quantization (training-free) of the denoiser of version {fp32 or '?'}; "
                       f"the encoder stays float32. {report['size_ratio']:.2f}x smaller, {report['speedup']:.2f}x "
                       "per sampling step at 128x128 on the CPU that quantized it.")
        version = log_and_register(args.checkpoint, int8=args.out / "model_int8.pt", tags=tags, description=description)
        aliases = registry.mirror_aliases_to_int8(fp32, version) if fp32 else []
        record = {"run_id": active.info.run_id, "model_name": "idm", "version": version, "quantization": "int8",
                  "aliases": aliases}
    with atomic_path(args.out / "registered.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    run(main)
