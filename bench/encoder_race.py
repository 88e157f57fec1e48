"""Which LR encoder pays for its CPU minutes: train candidates for equal wall time, score x_con.

Usage: python -m bench.encoder_race --minutes 8 --candidates e48x12 e64x16 [--threads 1]
       python -m bench.encoder_race --x-con-only --minutes 12 --candidates lean lean-ens [--resume]
       python -m bench.encoder_race --step-cost --candidates lean lean-ens
Each candidate is the `lean` preset with another encoder, trained with the pretraining
recipe's objective (recipes/pretrain.yaml) on ../shared/datasets/SunHays80 for the same
wall time (steps = minutes / the seconds a step measured at the start); then the
regression output x_con is scored by Y-PSNR (LIIF protocol) on whole Set5 images at
x2, x4 and x8 beside bicubic. Run one candidate per core, two processes at once.

--x-con-only races regression networks (REGRESSION: the shipped LREncoder or an
ImplicitUpscaler) with no denoiser at all: `race_x_con` trains them with x_con's
L1 point loss only and scores them on Set5 and Set14, the grid-line test and speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from idm.config import TrainConfig
from idm.data import TrainBatches, hr_patch_side, training_images
from idm.device import cpu_summary
from idm.models.blocks import EDSRFeatures, SPANFeatures
from idm.models.encoder import LREncoder
from idm.models.ensemble import ImplicitUpscaler
from idm.resize import resize_uint8, to_model_range, to_uint8
from idm.train import EMA, fit
from pipeline.data.datasets import make_pair
from pipeline.data.images import list_images, read_image
from pipeline.evaluation import metrics
from pipeline.params import ROOT, load

CANDIDATES = {  # name -> (encoder_channels, encoder_blocks)
    "e32x8": (32, 8),
    "e48x12": (48, 12),
    "e64x16": (64, 16),  # EDSR-baseline
}
SHARED = ROOT.parent / "shared" / "datasets"


def score(model: torch.nn.Module, scales: list[float]) -> dict[str, float]:
    """Mean Y-PSNR of x_con and of bicubic on Set5 per scale."""
    from idm.inference.upscaler import Bicubic

    out: dict[str, float] = {}
    images = [read_image(p) for p in list_images(SHARED / "Set5")]
    for s in scales:
        ours, bic = [], []
        for img in images:
            hr, lr = make_pair(img, s)
            with torch.inference_mode():
                x_con = model.condition(to_model_range(lr, "cpu"), hr.shape[:2]).x_con
            border = metrics.border_for(s)
            ours.append(metrics.psnr(to_uint8(x_con), hr, border=border, y_channel=True))
            bic.append(metrics.psnr(Bicubic()(lr, hr.shape[:2]), hr, border=border, y_channel=True))
        out[f"x{s:g}"], out[f"bicubic_x{s:g}"] = float(np.mean(ours)), float(np.mean(bic))
    return out

# ---------------------------------------------------------------- x_con-only race

SHIPPED = ROOT / "idm" / "weights" / "idm-lean.pt"


def _warm(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with the shipped encoder's weights (EMA) and every weight frozen but its decoder's:
    isolates what a decoder does on top of a trained encoder. For an LREncoder the shipped MLP
    decoder is loaded too (and keeps training); an ImplicitUpscaler's decoder starts afresh."""
    ema = torch.load(SHIPPED, map_location="cpu", weights_only=False)["ema"]
    state = {k.removeprefix("encoder."): v for k, v in ema.items() if k.startswith("encoder.")}
    if isinstance(model, LREncoder):
        model.load_state_dict(state)
        decoder = model.to_image
    else:
        model.encoder.load_state_dict({k: v for k, v in state.items() if k.startswith(("head.", "body."))})
        decoder = model.decoder
    model.requires_grad_(False)
    decoder.requires_grad_(True)
    return model


REGRESSION: dict[str, Callable[[], torch.nn.Module]] = {  # name -> a network with features/query/forward
    "lean": lambda: LREncoder(channels=48, blocks=12, decoder_hidden=64),  # shipped: EDSR 48x12 + MLP
    "lean-ens": lambda: ImplicitUpscaler(EDSRFeatures(48, 12), hidden=64),  # + LIIF local ensemble
    "span48x8-ens": lambda: ImplicitUpscaler(SPANFeatures(48, 8), hidden=64),  # 24 convs like lean's
    "e64x7-ens": lambda: ImplicitUpscaler(EDSRFeatures(64, 7), hidden=64),  # wider-shallower, ~lean's FLOPs
    # the shipped encoder, frozen, under its own decoder or a fresh ensemble decoder
    "lean-warm": lambda: _warm(LREncoder(channels=48, blocks=12, decoder_hidden=64)),
    "lean-ens-warm": lambda: _warm(ImplicitUpscaler(EDSRFeatures(48, 12), hidden=64)),
}
RACE = TrainConfig(steps=10**9, batch_size=8, patch_size=48, lr_patch=48, scale_min=1.0, scale_max=8.0,
                   lr=2e-4, condition_points=2304, seed=0)  # recipes/pretrain.yaml's x_con side


def _step(model: torch.nn.Module, hr: torch.Tensor, lr: torch.Tensor, step: int) -> torch.Tensor:
    """x_con's L1 loss on RACE.condition_points random HR pixels per sample (idm.train's point loss)."""
    b, _, height, width = hr.shape
    generator = torch.Generator().manual_seed(step)
    index = torch.randint(height * width, (b, RACE.condition_points), generator=generator)
    points = torch.stack([index // width, index % width], dim=-1)
    target = hr.flatten(2).gather(2, index[:, None].expand(-1, 3, -1))
    return (model.query(lr, (height, width), points) - target).abs().mean()


class XCon:
    """A regression network as an upscaling Method: (h, w, 3) uint8 -> (H, W, 3) uint8."""

    name = "x_con"

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval()

    def __call__(self, lr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        with torch.inference_mode():
            return to_uint8(self.model(to_model_range(lr), tuple(size)))


def score_x_con(model: torch.nn.Module, sets: dict[str, list[np.ndarray]], scales: list[float]) -> dict[str, float]:
    """Mean Y-PSNR (border ceil(s)) of the network and of bicubic per data set and scale."""
    from idm.inference.upscaler import Bicubic

    method, out = XCon(model), {}
    for name, images in sets.items():
        for s in scales:
            ours, bic = [], []
            for img in images:
                hr, lr = make_pair(img, s)
                border = metrics.border_for(s)
                ours.append(metrics.psnr(method(lr, hr.shape[:2]), hr, border=border, y_channel=True))
                bic.append(metrics.psnr(Bicubic()(lr, hr.shape[:2]), hr, border=border, y_channel=True))
            out[f"{name} x{s:g}"], out[f"{name} bicubic x{s:g}"] = float(np.mean(ours)), float(np.mean(bic))
    return out


def speed_and_lines(model: torch.nn.Module) -> dict[str, float]:
    """Grid-line ratios to bicubic at x4 (bench.grid_lines), parameters, and net seconds per
    output Mpx of one 500 x 500 -> 2000 x 2000 upscale (fastest of 2, the caller's threads)."""
    from skimage import data

    from bench.grid_lines import beading_ratio

    method = XCon(model)
    out = {f"beads {a:g}deg w{w:g}": beading_ratio(method, 4.0, a, w) for a in (45.0, 22.5) for w in (1.25, 2.0)}
    out["params"] = float(sum(p.numel() for p in model.parameters()))
    lr = to_model_range(resize_uint8(data.astronaut(), (500, 500)))
    times = []
    with torch.inference_mode():
        for _ in range(2):
            t0 = time.perf_counter()
            model(lr, (2000, 2000))
            times.append(time.perf_counter() - t0)
    out["s per Mpx x4"] = min(times) / 4.0
    return out


def race_x_con(name: str, args: argparse.Namespace) -> None:
    """Train REGRESSION[name] for args.minutes of training time (its own, evaluations excluded;
    with --resume, more minutes on top of the saved run), then score it; state and results
    go to args.out/<name>.pt and .json."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = REGRESSION[name]().train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=RACE.lr)
    ema = EMA(model, RACE.ema_decay)
    step, elapsed, cpu, curve = 0, 0.0, 0.0, []
    if args.resume and (out / f"{name}.pt").exists():
        state = torch.load(out / f"{name}.pt", weights_only=False)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed, cpu, curve = state["step"], state["elapsed"], state["cpu"], state["curve"]
    marks = [m for m in sorted(args.snapshots) if 60 * m > elapsed]  # minutes still to be scored at
    images = [read_image(p) for p in list_images(SHARED / "SunHays80")]
    batches = TrainBatches(training_images(images, hr_patch_side(RACE)), RACE)
    set5 = {"Set5": [read_image(p) for p in list_images(SHARED / "Set5")]}
    budget = elapsed + 60 * args.minutes
    while elapsed < budget:
        t0, c0 = time.perf_counter(), time.process_time()
        hr, lr = batches[step + 1]
        optimizer.zero_grad(set_to_none=True)
        loss = _step(model, hr, lr, step + 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), RACE.grad_clip)
        optimizer.step()
        step += 1
        ema.update(model, step)
        elapsed, cpu = elapsed + time.perf_counter() - t0, cpu + time.process_time() - c0
        if marks and elapsed >= 60 * marks[0]:
            marks.pop(0)
            curve.append((elapsed / 60, cpu / 60, step, score_x_con(ema.module, set5, [4.0])["Set5 x4"]))
            print(f"{name}: {curve[-1][0]:.1f} min, step {step}, loss {loss.item():.4f}, "
                  f"cpu {curve[-1][1]:.1f} min, Set5 x4 {curve[-1][3]:.2f}", flush=True)
            ema.module.train()
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                "step": step, "elapsed": elapsed, "cpu": cpu, "curve": curve}, out / f"{name}.pt")
    sets = {s: [read_image(p) for p in list_images(SHARED / s)] for s in ("Set5", "Set14")}
    result = {"name": name, "steps": step, "minutes": elapsed / 60, "cpu minutes": cpu / 60,
              "cpu s/step": cpu / step, "curve": curve,
              **score_x_con(ema.module, sets, [2.0, 3.0, 4.0, 8.0]), **speed_and_lines(ema.module)}
    (out / f"{name}-{round(elapsed / 60)}min.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)


def step_cost(name: str, args: argparse.Namespace, repeats: int = 8) -> None:
    """Median seconds of one training step at x4 and x8 (the same batches for every candidate),
    and of its decoder alone (query on fixed features, forward + backward)."""
    torch.manual_seed(0)
    model = REGRESSION[name]().train()
    images = [read_image(p) for p in list_images(SHARED / "SunHays80")[:8]]
    for scale in (4.0, 8.0):
        cfg = dataclasses.replace(RACE, scale_min=scale - 1e-6, scale_max=scale)
        hr, lr = TrainBatches(training_images(images, hr_patch_side(cfg)), cfg)[1]
        whole, decoder = [], []
        for i in range(repeats):
            t0 = time.perf_counter()
            _step(model, hr, lr, i).backward()
            whole.append(time.perf_counter() - t0)
            feat = model.features(lr).detach().requires_grad_()
            b, _, height, width = hr.shape
            index = torch.randint(height * width, (b, RACE.condition_points))
            points = torch.stack([index // width, index % width], dim=-1)
            t0 = time.perf_counter()
            model.query(lr, (height, width), points, feat).abs().mean().backward()
            decoder.append(time.perf_counter() - t0)
        print(f"{name} x{scale:g}: step {np.median(whole):.3f} s, decoder (with bicubic skip) "
              f"{np.median(decoder):.3f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--candidates", nargs="+", help=f"default: all of {list(CANDIDATES)}, or with "
                        f"--x-con-only / --step-cost all of {list(REGRESSION)}")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--x-con-only", action="store_true", help="race REGRESSION networks, no denoiser")
    parser.add_argument("--step-cost", action="store_true", help="seconds per training step of REGRESSION networks")
    parser.add_argument("--resume", action="store_true", help="--x-con-only: continue each candidate's saved run")
    parser.add_argument("--snapshots", type=float, nargs="*", default=[2, 4, 6, 8, 10],
                        help="--x-con-only: training minutes at which Set5 x4 is scored (not counted)")
    parser.add_argument("--out", default="/tmp/regression_race", help="--x-con-only: state and results folder")
    args = parser.parse_args()
    if args.x_con_only or args.step_cost:
        torch.set_num_threads(args.threads)
        print(f"CPU: {cpu_summary()}; {args.threads} thread(s) per candidate", flush=True)
        for name in args.candidates or list(REGRESSION):
            if name not in REGRESSION:
                parser.error(f"unknown candidate {name!r}; expected one of {list(REGRESSION)}")
            (step_cost if args.step_cost else race_x_con)(name, args)
        return
    torch.set_num_threads(args.threads)
    params = load(ROOT / "recipes" / "pretrain.yaml")
    images = [read_image(p) for p in list_images(SHARED / "SunHays80")]
    print(f"CPU: {cpu_summary()}; {args.threads} thread(s) per candidate")
    for name in args.candidates or list(CANDIDATES):
        if name not in CANDIDATES:
            parser.error(f"unknown candidate {name!r}; expected one of {list(CANDIDATES)}")
        channels, blocks = CANDIDATES[name]
        model_cfg = dataclasses.replace(params.model, encoder_channels=channels, encoder_blocks=blocks)
        probe = dataclasses.replace(params.train, steps=3, log_every=1, checkpoint_every=0)
        t0 = time.perf_counter()
        fit(model_cfg, params.diffusion, probe, images, device="cpu", progress=False)
        per_step = (time.perf_counter() - t0) / 3
        steps = max(1, int(args.minutes * 60 / per_step))
        result: dict[str, float] = {}
        cfg = dataclasses.replace(params.train, steps=steps, sample_every=steps, checkpoint_every=0)
        fit(model_cfg, params.diffusion, cfg, images, device="cpu", progress=False,
            on_sample=lambda step, ema, result=result: result.update(score(ema, [2.0, 4.0, 8.0])))
        gains = "  ".join(f"x{s:g} {result[f'x{s:g}']:.2f} ({result[f'x{s:g}'] - result[f'bicubic_x{s:g}']:+.2f})"
                          for s in (2, 4, 8))
        print(f"{name}: {steps} steps x batch {cfg.batch_size} in {args.minutes:g} min "
              f"({per_step:.2f} s/step); Set5 Y-PSNR of x_con (gain over bicubic): {gains}", flush=True)


if __name__ == "__main__":
    main()
