"""Training IDM: EMA, a step-based fit loop, DDP, bfloat16 autocast.

`fit` trains from a list of HR images (the caller loads the files) and reports
through hooks, so this library never imports a tracking tool. Each step's batch is
drawn from its own seed (idm.data), by the training process or by DataLoader workers;
every other random draw (noise, crops, dropout) comes from generators whose states go
into the checkpoint, so a resumed run reaches exactly the weights of an uninterrupted
one, with any number of workers. Under `torchrun`, the same `fit` trains with
DistributedDataParallel after `setup_distributed()`.
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from idm.checkpoint import (
    check_same_configs,
    load_checkpoint,
    make_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from idm.config import RESUMABLE_CHANGES, DiffusionConfig, ModelConfig, TrainConfig
from idm.data import (
    DecodedImages,
    TrainBatches,
    batches,
    hr_patch_side,
    rand_int,
    training_images,
)
from idm.diffusion.loss import training_loss
from idm.diffusion.schedule import Schedule, schedule_for
from idm.diffusion.targets import encode
from idm.models import IDM

# ---------------------------------------------------------------- model side


class EMA:
    """Exponential moving average of a model's weights, kept in a frozen copy (`module`).

    The decay warms up as min(decay, (1 + t) / (10 + t)) at step t (TensorFlow's
    ExponentialMovingAverage with num_updates), so the average of a short run is not
    dominated by the random initial weights.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Move the average towards `model`'s current weights; buffers are copied."""
        decay = min(self.decay, (1 + step) / (10 + step))
        for avg, p in zip(self.module.parameters(), model.parameters()):
            avg.lerp_(p, 1 - decay)
        for avg, b in zip(self.module.buffers(), model.buffers()):
            avg.copy_(b)

    def state_dict(self) -> dict[str, Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.module.load_state_dict(state)


class Objective(nn.Module):
    """The training loss of IDM as one module, so DDP sees the encoder and the UNet run.

    forward(hr (B, 3, H, W), lr (B, 3, h, w), generator) -> scalar noise-prediction loss.
    """

    def __init__(self, model: IDM, schedule: Schedule, cfg: TrainConfig, loss: str) -> None:
        super().__init__()
        self.model, self.schedule, self.cfg, self.loss = model, schedule, cfg, loss

    def forward(self, hr: Tensor, lr: Tensor, generator: torch.Generator) -> Tensor:
        window, hr_whole = None, hr
        side = self.cfg.unet_patch
        if side and max(hr.shape[-2:]) > side:  # x_con and the denoiser on one random crop
            height, width = min(side, hr.shape[-2]), min(side, hr.shape[-1])
            top = rand_int(hr.shape[-2] - height + 1, generator)
            left = rand_int(hr.shape[-1] - width + 1, generator)
            window = (top, left, height, width)
            hr_full, hr = hr.shape[-2:], hr[..., top : top + height, left : left + width]
        features = self.model.encoder.features(lr)  # once, for the crop and the point loss
        cond = self.model.condition(lr, hr_full if window else hr.shape[-2:], window, features=features)
        x0 = encode(hr, lr, self.cfg.target, self.cfg.residual_scale, x_con=cond.x_con)
        loss = training_loss(self.model, x0, cond, schedule=self.schedule, loss=self.loss,
                             prediction=self.model.cfg.prediction, generator=generator)
        if self.cfg.condition_loss:
            # An L1 regression of the image-like condition on HR (LIIF's loss), so the
            # encoder gives the denoiser a good estimate instead of an arbitrary picture.
            if self.cfg.condition_points:
                loss = loss + self.cfg.condition_loss * self._point_loss(hr_whole, lr, features, generator)
            else:
                loss = loss + self.cfg.condition_loss * (cond.x_con - hr).abs().mean()
        return loss

    def _point_loss(self, hr: Tensor, lr: Tensor, features: Tensor, generator: torch.Generator) -> Tensor:
        """L1 of x_con against HR (B, 3, H, W) at condition_points random pixels per sample."""
        b, _, height, width = hr.shape
        index = torch.randint(height * width, (b, self.cfg.condition_points), generator=generator).to(hr.device)
        points = torch.stack([index // width, index % width], dim=-1)
        target = hr.flatten(2).gather(2, index[:, None].expand(-1, 3, -1))
        return (self.model.encoder.query(lr, (height, width), points, features) - target).abs().mean()


# ---------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun) and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def setup_distributed(device: torch.device | str) -> DistInfo:
    """Join the process group if launched by torchrun (RANK, WORLD_SIZE, LOCAL_RANK set).

    Backend nccl on CUDA (each process then uses cuda:LOCAL_RANK), gloo on CPU. Without
    torchrun: nothing to join; returns rank 0 of 1 on `device`.
    """
    device = torch.device(device)
    if "WORLD_SIZE" not in os.environ:
        return DistInfo(0, 1, 0, device)
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return DistInfo(rank, world, local, device)


def cleanup_distributed() -> None:
    """Leave the process group, if any."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


# ---------------------------------------------------------------- fit


@dataclass
class _Run:
    """Everything a training run mutates."""

    model: IDM
    objective: nn.Module  # Objective, wrapped in DDP when world > 1
    optimizer: torch.optim.Optimizer
    ema: EMA
    generator: torch.Generator
    device: torch.device
    rank: int
    world: int
    configs: tuple[ModelConfig, DiffusionConfig, TrainConfig]
    bf16: bool = False  # the forward pass under bfloat16 autocast


def _build_run(model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig, cfg: TrainConfig,
               device: torch.device) -> _Run:
    rank, world = _rank_and_world()
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = IDM(model_cfg).to(device).train()
    generator = torch.Generator().manual_seed(cfg.seed + rank)  # noise and crops, per rank (batches: idm.data)
    torch.manual_seed(int(torch.randint(2**62, (), generator=generator)))  # dropout, per rank
    schedule = schedule_for(diffusion_cfg)
    objective: nn.Module = Objective(model, schedule, cfg, diffusion_cfg.loss)
    if world > 1:
        objective = DistributedDataParallel(objective, device_ids=[device] if device.type == "cuda" else None)
    if cfg.compile:  # the weights stay those of `model`, so checkpoints do not change
        objective = torch.compile(objective)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    bf16 = cfg.precision == "bfloat16" or (cfg.precision == "auto" and device.type == "cuda")
    return _Run(model, objective, optimizer, EMA(model, cfg.ema_decay), generator, device, rank, world,
                (model_cfg, diffusion_cfg, cfg), bf16)


def _resume(run: _Run, path: Path) -> int:
    """Load weights, EMA, optimizer and random states from `path`; returns its step."""
    ckpt = load_checkpoint(path)
    current = dict(zip(("model_config", "diffusion_config", "train_config"), map(asdict, run.configs)))
    check_same_configs(ckpt, current, may_change={"train_config": RESUMABLE_CHANGES}, source=str(path))
    run.model.load_state_dict(ckpt["model"])
    run.ema.load_state_dict(ckpt["ema"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    states = ckpt["rng"]
    if len(states) != run.world:
        warnings.warn(f"{path} was written by {len(states)} process(es), now {run.world}: "
                      f"the run continues but will not repeat an uninterrupted one exactly")
    if run.rank < len(states):
        set_rng_state(states[run.rank], run.generator, run.device)
    return int(ckpt["step"])


def _save(run: _Run, path: Path, step: int) -> None:
    """Checkpoint from rank 0, with every rank's random state; all ranks wait for the write."""
    state = rng_state(run.generator, run.device)
    states = [state]
    if run.world > 1:
        states = [None] * run.world
        dist.all_gather_object(states, state)
    if run.rank == 0:
        model_cfg, diffusion_cfg, cfg = run.configs
        save_checkpoint(make_checkpoint(model_config=model_cfg, diffusion_config=diffusion_cfg, train_config=cfg,
                                        model=run.model.state_dict(), ema=run.ema.state_dict(),
                                        optimizer=run.optimizer.state_dict(), step=step, rng=states), path)
    if run.world > 1:
        dist.barrier()


def _train_step(run: _Run, hr: Tensor, lr: Tensor, grad_clip: float) -> tuple[Tensor, Tensor]:
    """One optimiser step on a batch; returns (loss, gradient norm before clipping), detached."""
    run.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.bf16):
        loss = run.objective(hr, lr, run.generator).float()
    loss.backward()  # DDP averages the gradients across ranks here
    norm = nn.utils.clip_grad_norm_(run.model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    run.optimizer.step()
    return loss.detach(), norm.detach()


def _mean_over_ranks(values: Tensor, world: int) -> list[float]:
    if world > 1:
        dist.all_reduce(values)
        values = values / world
    return values.tolist()  # CPU-GPU sync point, once per log interval


Hook = Callable[..., None]


def _call_hook(hook: Hook | None, run: _Run, *args: Any) -> None:
    """Rank 0 only; the hook's own random draws (e.g. sampling) never touch training's."""
    if hook is None or run.rank != 0:
        return
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        hook(*args)


def fit(model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig, cfg: TrainConfig,
        images: Sequence[np.ndarray] | DecodedImages, *,
        device: torch.device | str, ckpt_path: str | os.PathLike | None = None,
        on_log: Callable[[int, dict[str, float]], None] | None = None,
        on_sample: Callable[[int, nn.Module], None] | None = None,
        on_checkpoint: Callable[[int, Path], None] | None = None, progress: bool = True) -> dict[str, float]:
    """Train IDM on HR `images` ((H, W, 3) uint8, or DecodedImages) for cfg.steps steps,
    resuming from `ckpt_path` if it exists.

    Checkpoints go to `ckpt_path` every cfg.checkpoint_every steps and at the end.
    Hooks run on rank 0: on_log(step, {"loss", "grad_norm", "samples_per_s", "input_wait"})
    every cfg.log_every steps and at the end (loss and grad_norm averaged over the interval
    and the ranks; input_wait the fraction of the interval spent waiting for batches);
    on_sample(step, ema_model) every cfg.sample_every steps; on_checkpoint(step, path)
    after each write. Returns {"final_loss" (of the last log interval; NaN if the
    checkpoint had no steps left to run), "steps", "steps_run", "samples_per_s",
    "seconds", "input_wait"}. Seeds torch's global generator from cfg.seed.
    """
    device = torch.device(device)
    data = images if isinstance(images, DecodedImages) else training_images(images, hr_patch_side(cfg))
    run = _build_run(model_cfg, diffusion_cfg, cfg, device)
    path = Path(ckpt_path) if ckpt_path is not None else None
    start = _resume(run, path) if path is not None and path.exists() else 0
    stream = batches(TrainBatches(data, cfg, run.rank), start, workers=cfg.workers, pin_memory=device.type == "cuda")
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=not progress or run.rank != 0)
    totals, count, final_loss, seen = torch.zeros(2, device=device), 0, math.nan, 0
    t0 = tick = time.perf_counter()
    waited = waited_total = 0.0
    for step in range(start + 1, cfg.steps + 1):
        asked = time.perf_counter()
        hr, lr = next(stream)
        waited += time.perf_counter() - asked
        hr, lr = hr.to(device, non_blocking=True), lr.to(device, non_blocking=True)
        loss, norm = _train_step(run, hr, lr, cfg.grad_clip)
        run.ema.update(run.model, step)
        totals += torch.stack([loss, norm.to(loss.dtype)])
        count += 1
        bar.update()
        if step % cfg.log_every == 0 or step == cfg.steps:
            final_loss, grad_norm = _mean_over_ranks(totals / count, run.world)
            now = time.perf_counter()
            speed = count * cfg.batch_size * run.world / (now - tick)
            bar.set_postfix(loss=f"{final_loss:.4f}")
            _call_hook(on_log, run, step, {"loss": final_loss, "grad_norm": grad_norm, "samples_per_s": speed,
                                           "input_wait": waited / (now - tick)})
            totals, count, tick, waited_total, waited = torch.zeros(2, device=device), 0, now, waited_total + waited, 0.0
        if cfg.sample_every and step % cfg.sample_every == 0:
            _call_hook(on_sample, run, step, run.ema.module)
        if path is not None and (step == cfg.steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)):
            _save(run, path, step)
            _call_hook(on_checkpoint, run, step, path)
        seen += 1
    bar.close()
    del stream  # ends the DataLoader workers now
    seconds = time.perf_counter() - t0
    return {"final_loss": final_loss, "steps": max(start, cfg.steps), "steps_run": seen,
            "samples_per_s": seen * cfg.batch_size * run.world / seconds if seen else 0.0, "seconds": seconds,
            "input_wait": (waited_total + waited) / seconds if seen else 0.0}
