"""Samplers: pure functions with one signature, k-diffusion style.

    sampler(model, cond, x_T, timesteps, *, schedule, eta, clip_x0=True, generator=None) -> x_0

`cond` is whatever the model takes besides x_t and the noise level (IDM's Condition),
computed once per image by the caller (the samplers never see the LR image);
`timesteps` is a strictly descending sequence of schedule steps in 1..T, all T of them
or any subset. Because the network is conditioned on the
continuous noise level sqrt(alpha_bar), a subset needs no retraining: consecutive
chosen steps t > s simply act as one step with alpha = alpha_bar_t / alpha_bar_s.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from idm.config import SAMPLERS, SPACINGS, SampleConfig
from idm.diffusion.noise import gaussian_like
from idm.diffusion.schedule import Schedule

Sampler = Callable[..., Tensor]
Decoder = Callable[[Tensor, Tensor, Any], Tensor]  # (x_0, lr, cond) -> image


def spaced_timesteps(total: int, steps: int, spacing: str = "uniform") -> list[int]:
    """`steps` distinct steps of 1..total, descending, always starting at `total`.

    "uniform": evenly spaced, total * (1 - i / steps). "quadratic": total * (1 - i / steps)^2,
    so the steps crowd together at low noise, where the image's fine detail is decided
    (DDIM's "quad" spacing, Song et al. 2021, sec. D.2); where rounding would repeat a
    step, the next lower free step is taken.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; expected one of {list(SPACINGS)}")
    if not 1 <= steps <= total:
        raise ValueError(f"steps must be in [1, {total}], got {steps}")
    if spacing == "uniform":
        chosen = [round(total - i * total / steps) for i in range(steps)]
    else:
        chosen = [round(total * ((steps - i) / steps) ** 2) for i in range(steps)]
    for i in range(1, steps):  # strictly descending; never below steps - i (room for the rest)
        chosen[i] = max(min(chosen[i], chosen[i - 1] - 1), steps - i)
    return chosen


def _pairs(timesteps: Sequence[int], schedule: Schedule) -> list[tuple[float, float]]:
    """(alpha_bar_t, alpha_bar_s) for each step t and the next chosen step s (0 at the end)."""
    steps = [int(t) for t in timesteps]
    if not steps or any(not 1 <= t <= schedule.timesteps for t in steps) \
            or any(a <= b for a, b in zip(steps, steps[1:])):
        raise ValueError(f"timesteps must be a non-empty, strictly descending sequence of steps "
                         f"in [1, {schedule.timesteps}], got {steps[:5]}{'...' if len(steps) > 5 else ''}")
    alpha_bars = schedule.alpha_bars.tolist()
    return [(alpha_bars[t], alpha_bars[s]) for t, s in zip(steps, steps[1:] + [0])]


def _predict(model: nn.Module, cond: Any, x: Tensor, alpha_bar: float,
             clip_x0: bool) -> tuple[Tensor, Tensor]:
    """One network call at noise level sqrt(alpha_bar): (x0 estimate, noise consistent with it)."""
    gamma = torch.full((x.shape[0],), alpha_bar**0.5, device=x.device, dtype=x.dtype)
    eps = model(x, gamma, cond)
    # DDPM eq. 15 inverted: x0 = (x_t - sqrt(1 - alpha_bar) * eps) / sqrt(alpha_bar)
    x0 = (x - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar**0.5
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
        eps = (x - alpha_bar**0.5 * x0) / (1 - alpha_bar) ** 0.5
    return x0, eps


@torch.no_grad()
def sample_ddpm(model: nn.Module, cond: Any, x_T: Tensor, timesteps: Sequence[int], *,
                schedule: Schedule, eta: float = 1.0, clip_x0: bool = True,
                generator: torch.Generator | None = None) -> Tensor:
    """Ancestral sampling (DDPM, Ho et al. 2020, Alg. 2), respaced to `timesteps`."""
    x = x_T
    for a_t, a_s in _pairs(timesteps, schedule):
        x0, _ = _predict(model, cond, x, a_t, clip_x0)
        beta = 1 - a_t / a_s  # the respaced step's beta
        # DDPM eq. 7: posterior q(x_s | x_t, x0) mean and variance
        mean = (a_s**0.5 * beta / (1 - a_t)) * x0 + ((1 - beta) ** 0.5 * (1 - a_s) / (1 - a_t)) * x
        std = eta * (beta * (1 - a_s) / (1 - a_t)) ** 0.5
        x = mean + std * gaussian_like(x, generator) if std > 0 else mean
    return x.clamp(-1.0, 1.0)


@torch.no_grad()
def sample_ddim(model: nn.Module, cond: Any, x_T: Tensor, timesteps: Sequence[int], *,
                schedule: Schedule, eta: float = 0.0, clip_x0: bool = True,
                generator: torch.Generator | None = None) -> Tensor:
    """DDIM sampling (Song et al. 2021, eq. 12); deterministic at eta = 0."""
    x = x_T
    for a_t, a_s in _pairs(timesteps, schedule):
        x0, eps = _predict(model, cond, x, a_t, clip_x0)
        # DDIM eq. 16: sigma = eta * sqrt((1 - a_s) / (1 - a_t)) * sqrt(1 - a_t / a_s)
        sigma = eta * ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)) ** 0.5
        x = a_s**0.5 * x0 + max(1 - a_s - sigma**2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * gaussian_like(x, generator)
    return x.clamp(-1.0, 1.0)


SAMPLER_FUNCTIONS: dict[str, Sampler] = {"ddpm": sample_ddpm, "ddim": sample_ddim}
assert set(SAMPLER_FUNCTIONS) == set(SAMPLERS)


@torch.no_grad()
def super_resolve(model: nn.Module, lr: Tensor, size: tuple[int, int], timesteps: Sequence[int], *,
                  schedule: Schedule, sample: SampleConfig, clip_x0: bool = True, decode: Decoder | None = None,
                  generator: torch.Generator | None = None) -> Tensor:
    """Upscale lr (B, 3, h, w) in [-1, 1] to size (H, W): (B, 3, H, W) in [-1, 1].

    The LR condition is computed once, then the sampler `sample.sampler` names (SAMPLER_FUNCTIONS)
    runs over `timesteps` with `sample.eta`, from Gaussian noise times `sample.temperature`:
    1 draws from the model's distribution; < 1 (as in SR3's and Glow's reduced-temperature
    sampling) trades generated detail for fidelity: less texture, higher PSNR. The signature of
    idm.inference.tiling.tiled_super_resolve, which runs the same tile by tile. Returns the
    sampler's x_0, or decode(x_0, lr, cond) when a decoder is given (to turn a residual target
    back into an image; idm.diffusion.targets).
    """
    cond = model.condition(lr, size)
    x_T = sample.temperature * gaussian_like(cond.x_con, generator)
    x0 = SAMPLER_FUNCTIONS[sample.sampler](model, cond, x_T, timesteps, schedule=schedule, eta=sample.eta,
                                           clip_x0=clip_x0, generator=generator)
    return x0 if decode is None else decode(x0, lr, cond)
