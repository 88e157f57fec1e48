"""Noise schedules (pure functions) and the SR3 continuous-noise-level training loss.

Notation: step t = 1..T has beta_t; alpha_bar_t = prod_{s <= t} (1 - beta_s), with
alpha_bar_0 = 1; the network is conditioned on gamma = sqrt(alpha_bar) (SR3's noise
level), a continuous value, so it can be sampled with any subset of steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from idm.prediction import training_target

if TYPE_CHECKING:  # idm.models imports idm.config, which imports this module
    from idm.models import Condition


def linear_betas(timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """Betas rising linearly from beta_start to beta_end (DDPM; IDM: 1e-6 -> 1e-2, T = 2000).

    Returns (timesteps,) float64.
    """
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def cosine_betas(timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """Betas of the cosine schedule (Nichol & Dhariwal 2021, eq. 17), offset s = 0.008.

    beta_start and beta_end are unused (the schedule fixes its own range); they are
    accepted so that every entry of SCHEDULES has one signature. Returns (timesteps,) float64.
    """
    s = 0.008
    t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    # Nichol & Dhariwal eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t + s) / (1 + s)) * pi / 2)
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    # ... and beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}, clipped at 0.999 near t = T.
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)


SCHEDULES: dict[str, Callable[[int, float, float], Tensor]] = {
    "linear": linear_betas,
    "cosine": cosine_betas,
}

LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "l1": F.l1_loss,  # IDM's choice
    "l2": F.mse_loss,
}


@dataclass(frozen=True)
class Schedule:
    """A discrete noise schedule. betas: (T,) float64; alpha_bars: (T + 1,) float64 with
    alpha_bars[0] = 1, so alpha_bars[t] belongs to step t = 1..T."""

    betas: Tensor
    alpha_bars: Tensor

    @property
    def timesteps(self) -> int:
        """T, the number of steps."""
        return self.betas.numel()

    @classmethod
    def from_betas(cls, betas: Tensor) -> Schedule:
        """Build from (T,) betas in (0, 1)."""
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.dim() != 1 or betas.numel() == 0 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a non-empty 1-D sequence of values in (0, 1)")
        ones = torch.ones(1, dtype=torch.float64)
        return cls(betas, torch.cat([ones, torch.cumprod(1 - betas, dim=0)]))


def make_schedule(name: str, timesteps: int, *, beta_start: float = 1e-6, beta_end: float = 1e-2) -> Schedule:
    """The named schedule (one of SCHEDULES) with T = timesteps."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; expected one of {sorted(SCHEDULES)}")
    return Schedule.from_betas(SCHEDULES[name](timesteps, beta_start, beta_end))


def noise_levels(schedule: Schedule, batch: int, *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor:
    """SR3's continuous noise levels: (batch,) float64 gamma, one per sample.

    SR3 sec. 2.4: t ~ U{1, ..., T}, then gamma ~ U(sqrt(alpha_bar_t), sqrt(alpha_bar_{t-1})).
    Drawn on the generator's device (so a CPU generator works for any model device),
    returned on `device`.
    """
    where = generator.device if generator is not None else device
    t = torch.randint(1, schedule.timesteps + 1, (batch,), generator=generator, device=where)
    u = torch.rand(batch, generator=generator, device=where, dtype=torch.float64)
    gammas = schedule.alpha_bars.to(where).sqrt()
    lo, hi = gammas[t], gammas[t - 1]
    return (lo + (hi - lo) * u).to(device)


def training_loss(model: nn.Module, x0: Tensor, cond: Condition, *, schedule: Schedule,
                  loss: str = "l1", prediction: str = "eps", generator: torch.Generator | None = None) -> Tensor:
    """Denoising loss of `model` on clean images x0 (B, 3, H, W) in [-1, 1].

    With prediction "eps", model(x_t, gamma, cond) predicts the noise (SR3, IDM); with
    "x0" or "v", model(x_t, gamma, cond, raw=True) predicts that (idm.prediction).
    Returns the mean `loss` ("l1" as IDM, or "l2") between the output and its target,
    a scalar with gradients.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; expected one of {sorted(LOSSES)}")
    gamma = noise_levels(schedule, x0.shape[0], generator=generator, device=x0.device).to(x0.dtype)
    where = generator.device if generator is not None else x0.device
    eps = torch.randn(x0.shape, generator=generator, device=where, dtype=x0.dtype).to(x0.device)
    g = gamma[:, None, None, None]
    # SR3 eq. 4 / DDPM eq. 4: x_t = gamma * x0 + sqrt(1 - gamma^2) * eps
    x_t = g * x0 + (1 - g**2).sqrt() * eps
    if prediction == "eps":
        return LOSSES[loss](model(x_t, gamma, cond), eps)
    return LOSSES[loss](model(x_t, gamma, cond, raw=True), training_target(prediction, x0, eps, g))
