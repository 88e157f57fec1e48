"""Noise schedules as pure functions, and the discrete `Schedule` they define.

Notation: step t = 1..T has beta_t; alpha_bar_t = prod_{s <= t} (1 - beta_s), with
alpha_bar_0 = 1; the network is conditioned on gamma = sqrt(alpha_bar) (SR3's noise
level), a continuous value, so it can be sampled with any subset of steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from idm.config import SCHEDULES, DiffusionConfig


def linear_betas(timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """Betas rising linearly from beta_start to beta_end (DDPM; IDM: 1e-6 -> 1e-2, T = 2000).

    Returns (timesteps,) float64.
    """
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def cosine_betas(timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """Betas of the cosine schedule (Nichol & Dhariwal 2021, eq. 17), offset s = 0.008.

    beta_start and beta_end are unused (the schedule fixes its own range); they are
    accepted so that every entry of BETAS has one signature. Returns (timesteps,) float64.
    """
    s = 0.008
    t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    # Nichol & Dhariwal eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t + s) / (1 + s)) * pi / 2)
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    # ... and beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}, clipped at 0.999 near t = T.
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)


BETAS: dict[str, Callable[[int, float, float], Tensor]] = {
    "linear": linear_betas,
    "cosine": cosine_betas,
}
assert set(BETAS) == set(SCHEDULES)


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
    if name not in BETAS:
        raise ValueError(f"unknown schedule {name!r}; expected one of {sorted(BETAS)}")
    return Schedule.from_betas(BETAS[name](timesteps, beta_start, beta_end))


def schedule_for(cfg: DiffusionConfig) -> Schedule:
    """The schedule a DiffusionConfig describes."""
    return make_schedule(cfg.schedule, cfg.timesteps, beta_start=cfg.beta_start, beta_end=cfg.beta_end)
