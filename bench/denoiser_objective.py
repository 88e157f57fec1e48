"""Denoiser objective study: which prediction, loss, residual_scale and schedule let the
diffusion half of IDM add detail the regression output x_con cannot.

Usage:
  python -m bench.denoiser_objective --minutes 10 --variants A B C [--out /tmp/denoiser_study]
      [--stage all|residual|train|eval|denoise|report] [--max-steps N] [--images baboon comic ...]
      [--seeds 0 1] [--temperature 1.0] [--settings ddim4 ...] [--best D@t0.7-ddim4]

Stages (`all` runs them in order; each reads what the earlier ones wrote to --out):
- residual: std and percentiles of HR - x_con (model units, [-1, 1]) of the shipped model on
  SunHays80 patches at x2, x4, x8 -> residual.json. Its pooled std is the residual_scale of
  the variants marked "std" (the diffusion target then has unit variance).
- train: each variant starts from the shipped EMA weights, FREEZES the LR encoder (so x_con
  stays the shipped regression output, and every variant refines the same picture) and
  fine-tunes the rest (UNet and condition pyramid) for --minutes of wall time, one thread,
  two variants at a time under `nice -n 5` -> <variant>.pt. The loop is written here because
  `idm.train.fit` trains the whole model from scratch; it calls the same library pieces
  (idm.train.Objective with condition_loss 0, EMA, idm.data.TrainBatches, LIIF protocol with
  48 px LR patches, scales U(2, 8), the denoiser on a 48 px crop).
- eval: whole Set5 and some Set14 images at x4 (HR cropped to a multiple of 4, LR by
  idm.resize.resize_uint8): the regression output, DDPM ancestral 8/20 steps, DDIM eta 0 with
  4/8 steps and DDIM eta 1 with 8 steps, temperature 1, --seeds seeds -> rows.csv and the
  seed-0 outputs as PNGs. Every variant's x0 (the scaled residual) is clipped to
  +-0.5 / residual_scale, i.e. the residual to +-0.5 model units, as the shipped sampler
  clips variant A (x0 in [-1, 1] at scale 0.5); a unit-variance target clipped at [-1, 1]
  would lose everything beyond one std.
  --seeds applies to the SEEDED settings (the per-pixel std across seeds); DDIM eta 1 and
  DDPM give the same numbers (same update, same draws). --temperature < 1 (eval only) writes
  its rows as <variant>@t<temperature>.
- denoise: per noise level, how much of the residual each denoiser recovers from x_t
  (held-out Set14 patches) -> denoise.md.
- report: markdown tables (means over the images) and crops.png (HR / bicubic / regression
  / best sample / control sample, 2x nearest) of the most textured and the flattest bright
  96 px windows.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/README.md: shared machines

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.ndimage as ndi
import torch
from torch import nn

from idm.checkpoint import load_checkpoint
from idm.config import DiffusionConfig, ModelConfig, TrainConfig
from idm.data import TrainBatches, hr_patch_side, make_batch, training_images
from idm.device import cpu_summary, use_threads
from idm.diffusion.noise import gaussian_like
from idm.diffusion.prediction import to_eps
from idm.diffusion.sampling import sample_ddim, sample_ddpm, spaced_timesteps
from idm.diffusion.schedule import schedule_for
from idm.diffusion.targets import decode
from idm.models import IDM
from idm.pretrained import weights
from idm.resize import resize_uint8, to_model_range, to_uint8
from idm.train import EMA, Objective
from pipeline.data.images import list_images, read_image, write_image
from pipeline.evaluation import metrics

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
SCALE, BORDER = 4, 4


@dataclass(frozen=True)
class Variant:
    """One denoiser objective; residual_scale None = the measured pooled std (residual.json)."""

    prediction: str
    loss: str
    residual_scale: float | None
    schedule: str = "linear"


VARIANTS = {
    "A": Variant("x0", "l1", 0.5),  # the shipped objective: the control
    "B": Variant("eps", "l2", None),
    "C": Variant("v", "l2", None),
    "D": Variant("v", "l2", None, "cosine"),
}
# label -> (sampler, steps, eta)
SETTINGS = {"ddpm8": (sample_ddpm, 8, 1.0), "ddpm20": (sample_ddpm, 20, 1.0), "ddim4": (sample_ddim, 4, 0.0),
            "ddim8": (sample_ddim, 8, 0.0), "ddim8-eta1": (sample_ddim, 8, 1.0)}
SEEDED = ("ddpm8", "ddim8")  # the settings sampled with every --seeds seed (the others: the first only)


# ---------------------------------------------------------------- residual range


def residual_stats(out: Path, batches: int = 6) -> dict:
    """Std and |r| percentiles of HR - x_con of the shipped model per scale, and pooled."""
    model = _shipped()[1]
    images = _sunhays()
    result, pooled = {}, []
    for scale in (2.0, 4.0, 8.0):
        cfg = TrainConfig(batch_size=8, lr_patch=48, scale_min=scale, scale_max=scale + 1e-6, patch_size=400)
        data = training_images(images, hr_patch_side(cfg))
        gen = torch.Generator().manual_seed(0)
        rs = []
        for _ in range(batches):
            hr, lr, _ = make_batch(data, cfg, gen)
            with torch.no_grad():
                rs.append((hr - model.encoder(lr, hr.shape[-2:])).flatten())
        r = torch.cat(rs).numpy()
        pooled.append(r[:: max(1, r.size // 2_000_000)])
        result[f"x{scale:g}"] = _describe(r)
    result["pooled"] = _describe(np.concatenate(pooled))
    (out / "residual.json").write_text(json.dumps(result, indent=1))
    return result


def _describe(r: np.ndarray) -> dict:
    a = np.abs(r)
    return {"std": float(r.std()), "mean": float(r.mean()), "mean_abs": float(a.mean()),
            **{f"p{q:g}_abs": float(np.percentile(a, q)) for q in (50, 90, 99, 99.9)},
            "max_abs": float(a.max()), "frac_abs_gt_0.5": float((a > 0.5).mean())}


# ---------------------------------------------------------------- training


def _shipped() -> tuple[dict, IDM]:
    ckpt = load_checkpoint(weights())
    model = IDM(ModelConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["ema"])
    return ckpt, model.eval()


def _sunhays() -> list[np.ndarray]:
    return [read_image(p) for p in list_images(DATASETS / "SunHays80")]


def _scale_of(name: str, out: Path) -> float:
    v = VARIANTS[name]
    return v.residual_scale or json.loads((out / "residual.json").read_text())["pooled"]["std"]


def train_variant(name: str, minutes: float, out: Path, max_steps: int = 0, seed: int = 0, lr: float = 2e-4) -> None:
    """Fine-tune variant `name`'s denoiser from the shipped weights for `minutes` (or `max_steps`
    > 0 steps, whichever ends first), encoder frozen."""
    variant, scale = VARIANTS[name], _scale_of(name, out)
    ckpt, _ = _shipped()
    mcfg = replace(ModelConfig(**ckpt["model_config"]), prediction=variant.prediction)
    dcfg = replace(DiffusionConfig(**ckpt["diffusion_config"]), loss=variant.loss, schedule=variant.schedule)
    tcfg = replace(TrainConfig(**ckpt["train_config"]), steps=10**7, scale_min=2.0, scale_max=8.0, lr=lr, seed=seed,
                   condition_loss=0.0, condition_points=0, residual_scale=scale, workers=0, precision="float32")
    model = IDM(mcfg)
    model.load_state_dict(ckpt["ema"])
    model.train()
    model.encoder.requires_grad_(False).eval()  # x_con stays the shipped regression output
    torch.manual_seed(seed)
    objective = Objective(model, schedule_for(dcfg), tcfg, dcfg.loss)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=tcfg.lr)
    ema = EMA(model, tcfg.ema_decay)
    stream = TrainBatches(training_images(_sunhays(), hr_patch_side(tcfg)), tcfg)
    generator = torch.Generator().manual_seed(seed)
    losses, window, step, t0 = [], [], 0, time.perf_counter()
    while time.perf_counter() - t0 < minutes * 60 and not (max_steps and step >= max_steps):
        step += 1
        hr, lr_img = stream[step]
        optimizer.zero_grad(set_to_none=True)
        loss = objective(hr, lr_img, generator)
        loss.backward()
        nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
        optimizer.step()
        ema.update(model, step)
        window.append(float(loss.detach()))
        if step % 50 == 0:
            losses.append((step, float(np.mean(window))))
            window = []
            print(f"{name} step {step} loss {losses[-1][1]:.4f} {time.perf_counter() - t0:.0f}s", flush=True)
    torch.save({"variant": name, "model_config": asdict(mcfg), "diffusion_config": asdict(dcfg),
                "residual_scale": scale, "ema": ema.state_dict(), "steps": step,
                "seconds": time.perf_counter() - t0, "losses": losses}, out / f"{name}.pt")


# ---------------------------------------------------------------- evaluation


class ClippedX0(nn.Module):
    """Wraps an IDM for the samplers: clips its x0 estimate to +-`bound` (pass clip_x0=False to
    the sampler) and keeps the last one, which is the sampler's output before its final
    [-1, 1] clamp (at the last step both samplers return x0 exactly)."""

    def __init__(self, model: IDM, bound: float) -> None:
        super().__init__()
        self.model, self.bound, self.last_x0 = model, bound, None

    def forward(self, x_t, gamma, cond):
        eps = self.model(x_t, gamma, cond)
        g = gamma[:, None, None, None]
        sigma = (1 - g**2).sqrt()
        self.last_x0 = ((x_t - sigma * eps) / g).clamp(-self.bound, self.bound)
        return to_eps("x0", self.last_x0, x_t, g)


def load_variant(path: Path) -> tuple[IDM, DiffusionConfig, float]:
    state = torch.load(path, weights_only=True)
    model = IDM(ModelConfig(**state["model_config"]))
    model.load_state_dict(state["ema"])
    return model.eval(), DiffusionConfig(**state["diffusion_config"]), float(state["residual_scale"])


def test_pairs(names: list[str]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, HR cropped to a multiple of 4, LR) of Set5 and the named Set14 images."""
    paths = list_images(DATASETS / "Set5") + [DATASETS / "Set14" / f"{n}.png" for n in names]
    pairs = []
    for p in paths:
        hr = read_image(p)
        hr = np.ascontiguousarray(hr[: hr.shape[0] // SCALE * SCALE, : hr.shape[1] // SCALE * SCALE])
        pairs.append((p.stem, hr, resize_uint8(hr, (hr.shape[0] // SCALE, hr.shape[1] // SCALE))))
    return pairs


@torch.no_grad()
def sample(model: IDM, dcfg: DiffusionConfig, scale: float, lr: np.ndarray, size: tuple[int, int],
           setting: str, seed: int, temperature: float = 1.0) -> np.ndarray:
    """One sample (H, W, 3) uint8 of `setting` (SETTINGS) from noise x `temperature`, x0 clipped
    to +-0.5 / scale."""
    sampler, steps, eta = SETTINGS[setting]
    lr_t = to_model_range(lr)
    cond = model.condition(lr_t, size)
    gen = torch.Generator().manual_seed(seed)
    wrapped = ClippedX0(model, 0.5 / scale)
    schedule = schedule_for(dcfg)
    x_T = temperature * gaussian_like(cond.x_con, gen)
    sampler(wrapped, cond, x_T, spaced_timesteps(dcfg.timesteps, steps), schedule=schedule, eta=eta,
            clip_x0=False, generator=gen)
    return to_uint8(decode(wrapped.last_x0, lr_t, size, "refine", scale, x_con=cond.x_con))


def _ycc(img: np.ndarray) -> np.ndarray:
    """BT.601 Y, Cb, Cr of (H, W, 3) uint8: (3, H, W) float64."""
    x = img.astype(np.float64) / 255.0
    y = 16 + x @ np.array([65.481, 128.553, 24.966])
    cb = 128 + x @ np.array([-37.797, -74.203, 112.0])
    cr = 128 + x @ np.array([112.0, -93.786, -18.214])
    return np.stack([y, cb, cr])


def flat_bright(hr: np.ndarray) -> np.ndarray:
    """Mask of flat bright HR pixels: Y > 170 and the 9x9 local std of Y < 3 (on [16, 235])."""
    y = _ycc(hr)[0]
    local_std = np.sqrt(np.maximum(ndi.uniform_filter(y**2, 9) - ndi.uniform_filter(y, 9) ** 2, 0))
    return (y > 170) & (local_std < 3)


def scores(sr: np.ndarray, hr: np.ndarray, lr: np.ndarray, reg: np.ndarray) -> dict:
    """Y-PSNR, HF ratio, LR-consistency x1e-5 and the stain measure (max over flat bright HR
    pixels of the 5x5-mean Cb/Cr distance to the regression output) of one output."""
    dc = ndi.uniform_filter(_ycc(sr)[1:] - _ycc(reg)[1:], (1, 5, 5))
    mask = metrics.crop_border(flat_bright(hr), BORDER)
    chroma = metrics.crop_border(np.sqrt((dc**2).sum(0)), BORDER)
    return {"psnr_y": metrics.psnr(sr, hr, border=BORDER, y_channel=True),
            "hf_ratio": metrics.hf_ratio(sr, hr, border=BORDER),
            "lr_cons": metrics.lr_consistency(sr, lr) * 1e5,
            "stain": float(chroma[mask].max()) if mask.any() else np.nan}


def seed_spread(a: np.ndarray, b: np.ndarray, hr: np.ndarray) -> tuple[float, float]:
    """Mean per-pixel Y std across two samples, and its Pearson correlation with the HR's local
    Laplacian magnitude (|laplace(Y)|, 5x5 mean): texture should vary, flat areas should not."""
    std = metrics.crop_border(np.abs(_ycc(a)[0] - _ycc(b)[0]) / np.sqrt(2), BORDER)
    lap = metrics.crop_border(ndi.uniform_filter(np.abs(ndi.laplace(_ycc(hr)[0])), 5), BORDER)
    if std.std() == 0 or lap.std() == 0:  # no variation: no correlation
        return float(std.mean()), float("nan")
    return float(std.mean()), float(np.corrcoef(std.ravel(), lap.ravel())[0, 1])


def evaluate(names: list[str], out: Path, images: list[str], seeds: list[int], temperature: float = 1.0,
             settings: list[str] | None = None) -> None:
    """Score every variant in `names` ("regression", "bicubic" or a trained variant) -> rows_<n>.csv;
    at a temperature other than 1 the variant is labelled <n>@t<temperature>."""
    _, shipped = _shipped()
    for name in names:
        rows, label = [], name if temperature == 1 or name not in VARIANTS else f"{name}@t{temperature:g}"
        for image, hr, lr in test_pairs(images):
            with torch.no_grad():
                reg = to_uint8(shipped.encoder(to_model_range(lr), hr.shape[:2]))
            if name in ("regression", "bicubic"):
                sr = reg if name == "regression" else resize_uint8(lr, hr.shape[:2])
                _save(out / "png" / name / f"{image}.png", sr)
                rows.append({"variant": name, "setting": "-", "image": image, **scores(sr, hr, lr, reg)})
            for setting in (settings or SETTINGS) if name in VARIANTS else ():
                model, dcfg, scale = load_variant(out / f"{name}.pt")
                t0 = time.perf_counter()
                outs = [sample(model, dcfg, scale, lr, hr.shape[:2], setting, s, temperature)
                        for s in (seeds if setting in SEEDED else seeds[:1])]
                row = {"variant": label, "setting": setting, "image": image, **scores(outs[0], hr, lr, reg),
                       "seconds": (time.perf_counter() - t0) / len(outs)}
                if len(outs) > 1:
                    row["seed_std"], row["std_lap_corr"] = seed_spread(outs[0], outs[1], hr)
                _save(out / "png" / f"{label}-{setting}" / f"{image}.png", outs[0])
                rows.append(row)
                print(label, setting, image, {k: round(v, 3) for k, v in row.items() if isinstance(v, float)},
                      flush=True)
            pd.DataFrame(rows).to_csv(out / f"rows_{label}.csv", index=False)  # after each image


def _save(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(path, img)


# ---------------------------------------------------------------- denoising diagnostic

HELD_OUT = ["bridge", "man", "pepper", "lenna", "monarch", "coastguard"]  # Set14 images not in --images


@torch.no_grad()
def denoise_diagnostic(out: Path, names: list[str], levels=(10, 50, 100, 200, 400, 700, 1000)) -> str:
    """How much of the residual r = HR - x_con each denoiser recovers from x_t at step t, on 8
    x4 patches (96 px HR) of Set14 images the evaluation does not use: the fraction of r's
    variance left unexplained by the x0 estimate (MSE / var r; 1 = the regression output) and
    the estimate's std over r's (0 = it always answers the regression output)."""
    cfg = TrainConfig(batch_size=8, lr_patch=24, scale_min=4.0, scale_max=4.0 + 1e-6, patch_size=100)
    hr, lr, _ = make_batch([torch.from_numpy(read_image(DATASETS / "Set14" / f"{n}.png")).permute(2, 0, 1)
                            for n in HELD_OUT], cfg, torch.Generator().manual_seed(0))
    lines = ["| variant | " + " | ".join(f"t={t}" for t in levels) + " |", "|---|" + "---|" * len(levels)]
    for name in names:
        model, dcfg, scale = load_variant(out / f"{name}.pt")
        cond = model.condition(lr, hr.shape[-2:])
        r = hr - cond.x_con
        cells = []
        for t in levels:
            ab = float(schedule_for(dcfg).alpha_bars[t])
            g = torch.full((hr.shape[0],), ab**0.5)
            eps = torch.randn(r.shape, generator=torch.Generator().manual_seed(t))
            x_t = ab**0.5 * r / scale + (1 - ab) ** 0.5 * eps
            r_hat = scale * ((x_t - (1 - ab) ** 0.5 * model(x_t, g, cond)) / ab**0.5).clamp(-0.5 / scale, 0.5 / scale)
            cells.append(f"{float(((r_hat - r) ** 2).mean() / r.var()):.2f} / {float(r_hat.std() / r.std()):.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    (out / "denoise.md").write_text(text + "\n")
    return text


# ---------------------------------------------------------------- report


def report(out: Path, names: list[str]) -> str:
    """Markdown: training summary, then per variant and setting the means over the images."""
    lines = ["| variant | prediction / loss / residual_scale / schedule | steps in budget | final loss |",
             "|---|---|---|---|"]
    for n in names:
        if (out / f"{n}.pt").exists():
            s, v = torch.load(out / f"{n}.pt", weights_only=True), VARIANTS[n]
            lines.append(f"| {n} | {v.prediction} / {v.loss} / {s['residual_scale']:.3f} / {v.schedule} "
                         f"| {s['steps']} ({s['seconds'] / 60:.1f} min) | {s['losses'][-1][1] if s['losses'] else float('nan'):.4f} |")
    frames = [pd.read_csv(p) for p in sorted(out.glob("rows_*.csv"))]
    for tempered in (False, True):  # the main table, then the reduced-temperature runs on their images
        chosen = [f for f in frames if ("@" in str(f["variant"].iloc[0])) == tempered]
        if chosen:
            common = set.intersection(*(set(f["image"]) for f in chosen))  # an interrupted eval: the shared images
            df = pd.concat(frames)
            lines += _table(df[df["image"].isin(common) & (~df["variant"].str.contains("@") | tempered)], common)
    text = "\n".join(lines)
    (out / "tables.md").write_text(text + "\n")
    return text


def _table(df: pd.DataFrame, images: set[str]) -> list[str]:
    lines = ["", f"Images ({len(images)}): {', '.join(sorted(images))}"]
    cols = [c for c in ("psnr_y", "hf_ratio", "lr_cons", "seed_std", "std_lap_corr", "stain", "seconds") if c in df]
    table = df.groupby(["variant", "setting"], sort=False)[cols].mean().reset_index()
    lines += ["", "| variant | setting | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for _, r in table.iterrows():
        lines.append(f"| {r['variant']} | {r['setting']} | " + " | ".join(
            "-" if pd.isna(r[c]) else f"{r[c]:.3f}" if c != "psnr_y" else f"{r[c]:.2f}" for c in cols) + " |")
    return lines


def crops(out: Path, best: str, control: str, images: list[str], side: int = 96) -> Path:
    """crops.png: rows = the most textured and the flattest bright `side` px windows of the test
    images; columns = HR, bicubic, regression, `best`, `control` (png folders), 2x nearest."""
    windows = []
    for image, hr, _ in test_pairs(images):
        y = _ycc(hr)[0]
        lap, flat = ndi.uniform_filter(np.abs(ndi.laplace(y)), side), ndi.uniform_filter(flat_bright(hr) * 1.0, side)
        h, w = y.shape
        valid = (slice(side // 2, h - side // 2), slice(side // 2, w - side // 2))
        for score, kind in ((lap, "texture"), (flat, "flat")):
            i, j = np.unravel_index(np.argmax(score[valid]), score[valid].shape)
            windows.append((kind, float(score[valid][i, j]), image, i, j))
    chosen = [max((w for w in windows if w[0] == k), key=lambda w: w[1]) for k in ("texture", "flat")]
    chosen.insert(1, max((w for w in windows if w[0] == "texture" and w[2] != chosen[0][2]), key=lambda w: w[1]))
    rows = []
    for _, _, image, i, j in chosen:
        tiles = [read_image(out / "png" / col / f"{image}.png") if col != "hr" else
                 next(hr for n, hr, _ in test_pairs(images) if n == image)
                 for col in ("hr", "bicubic", "regression", best, control)]
        tiles = [t[i : i + side, j : j + side].repeat(2, 0).repeat(2, 1) for t in tiles]
        rows.append(np.concatenate([np.pad(t, ((2, 2), (2, 2), (0, 0)), constant_values=255) for t in tiles], 1))
    sheet = np.concatenate(rows, 0)
    _save(out / "crops.png", sheet)
    (out / "crops.json").write_text(json.dumps([{"image": c[2], "kind": c[0], "top": int(c[3]), "left": int(c[4])}
                                                for c in chosen]))
    return out / "crops.png"


# ---------------------------------------------------------------- driver


def _in_pairs(stage: str, names: list[str], args: argparse.Namespace) -> None:
    """Run `stage` for each name in its own niced 1-thread process, two at a time."""
    for k in range(0, len(names), 2):
        procs = [subprocess.Popen(["nice", "-n", "5", sys.executable, "-m", "bench.denoiser_objective",
                                   "--stage", stage, "--variants", n, "--minutes", str(args.minutes),
                                   "--max-steps", str(args.max_steps),
                                   "--out", str(args.out), "--images", *args.images,
                                   "--seeds", *map(str, args.seeds)], cwd=ROOT, env={**os.environ,
                                   "OMP_NUM_THREADS": "1"}) for n in names[k : k + 2]]
        if any(p.wait() for p in procs):
            raise SystemExit(f"denoiser_objective: a {stage} process failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="training wall time per variant")
    parser.add_argument("--variants", nargs="+", default=["A", "B", "C"], choices=sorted(VARIANTS) +
                        ["regression", "bicubic"])
    parser.add_argument("--max-steps", type=int, default=0,
                        help="> 0: stop training at this many steps if the minutes last longer (equal compute on a loaded machine)")
    parser.add_argument("--stage", default="all", choices=["all", "residual", "train", "eval", "denoise", "report"])
    parser.add_argument("--out", type=Path, default=Path("/tmp/denoiser_study"))
    parser.add_argument("--temperature", type=float, default=1.0, help="eval: scale of the initial noise")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), help="eval: these settings only")
    parser.add_argument("--images", nargs="*", default=["baboon", "comic", "zebra", "foreman"],
                        help="Set14 images evaluated besides all of Set5")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--best", default="C-ddpm20", help="report: the png folder of the 'best sample' column")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    use_threads(1)
    if args.stage in ("all", "residual"):
        print(cpu_summary(), flush=True)
        print(json.dumps(residual_stats(args.out), indent=1))
    trained = [v for v in args.variants if v in VARIANTS]
    if args.stage == "train" and len(trained) == 1:
        train_variant(trained[0], args.minutes, args.out, args.max_steps)
    elif args.stage == "eval" and len(args.variants) == 1:
        evaluate(args.variants, args.out, args.images, args.seeds, args.temperature, args.settings)
    elif args.stage in ("train", "eval", "all"):
        if args.stage in ("train", "all"):
            _in_pairs("train", trained, args)
        if args.stage in ("eval", "all"):
            _in_pairs("eval", ["regression", "bicubic", *trained], args)
    if args.stage in ("denoise", "all"):
        print(denoise_diagnostic(args.out, trained))
    if args.stage in ("report", "all"):
        print(cpu_summary())
        print(report(args.out, trained))
        print(crops(args.out, args.best, f"A-{args.best.split('-', 1)[1]}", args.images))


if __name__ == "__main__":
    main()
