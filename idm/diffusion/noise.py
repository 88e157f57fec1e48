"""Random draws of the diffusion: Gaussian noise and SR3's continuous noise levels.

Every draw takes an optional torch.Generator and is made on the generator's device, so
a CPU generator gives the same numbers whatever device the model runs on.
"""

from __future__ import annotations

import torch
from torch import Tensor

from idm.diffusion.schedule import Schedule


def _draw_device(generator: torch.Generator | None, device: torch.device | str | None) -> torch.device | str | None:
    """Where a draw is made: the generator's device if there is one, else `device`."""
    return generator.device if generator is not None else device


def gaussian(shape: tuple[int, ...], generator: torch.Generator | None, *, device: torch.device | str | None,
             dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal noise of `shape` and `dtype`, drawn on the generator's device, returned on `device`."""
    return torch.randn(shape, generator=generator, device=_draw_device(generator, device), dtype=dtype).to(device)


def gaussian_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise of x's shape, dtype and device (`gaussian`)."""
    return gaussian(tuple(x.shape), generator, device=x.device, dtype=x.dtype)


def noise_levels(schedule: Schedule, batch: int, *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor:
    """SR3's continuous noise levels: (batch,) float64 gamma, one per sample.

    SR3 sec. 2.4: t ~ U{1, ..., T}, then gamma ~ U(sqrt(alpha_bar_t), sqrt(alpha_bar_{t-1})).
    Drawn on the generator's device, returned on `device`.
    """
    where = _draw_device(generator, device)
    t = torch.randint(1, schedule.timesteps + 1, (batch,), generator=generator, device=where)
    u = torch.rand(batch, generator=generator, device=where, dtype=torch.float64)
    gammas = schedule.alpha_bars.to(where).sqrt()
    lo, hi = gammas[t], gammas[t - 1]
    return (lo + (hi - lo) * u).to(device)
