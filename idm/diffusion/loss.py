"""The SR3 continuous-noise-level denoising loss."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from idm.config import LOSSES
from idm.diffusion.noise import gaussian_like, noise_levels
from idm.diffusion.prediction import training_target
from idm.diffusion.schedule import Schedule

LOSS_FUNCTIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "l1": F.l1_loss,  # IDM's choice
    "l2": F.mse_loss,
}
assert set(LOSS_FUNCTIONS) == set(LOSSES)


def training_loss(model: nn.Module, x0: Tensor, cond: Any, *, schedule: Schedule,
                  loss: str = "l1", prediction: str = "eps", generator: torch.Generator | None = None) -> Tensor:
    """Denoising loss of `model` on clean images x0 (B, 3, H, W) in [-1, 1].

    `cond` is what the model's forward takes besides x_t and the noise level (IDM's
    Condition). With prediction "eps", model(x_t, gamma, cond) predicts the noise (SR3,
    IDM); with "x0" or "v", model(x_t, gamma, cond, raw=True) predicts that
    (idm.diffusion.prediction). Returns the mean `loss` ("l1" as IDM, or "l2") between
    the output and its target, a scalar with gradients.
    """
    if loss not in LOSS_FUNCTIONS:
        raise ValueError(f"unknown loss {loss!r}; expected one of {sorted(LOSS_FUNCTIONS)}")
    gamma = noise_levels(schedule, x0.shape[0], generator=generator, device=x0.device).to(x0.dtype)
    eps = gaussian_like(x0, generator)
    g = gamma[:, None, None, None]
    # SR3 eq. 4 / DDPM eq. 4: x_t = gamma * x0 + sqrt(1 - gamma^2) * eps
    x_t = g * x0 + (1 - g**2).sqrt() * eps
    if prediction == "eps":
        return LOSS_FUNCTIONS[loss](model(x_t, gamma, cond), eps)
    return LOSS_FUNCTIONS[loss](model(x_t, gamma, cond, raw=True), training_target(prediction, x0, eps, g))
