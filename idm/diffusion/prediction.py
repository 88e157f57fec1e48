"""What the denoiser's output means: the noise (eps), the clean target (x0) or v.

The paper (and SR3) predict the noise eps. That is a poor fit for small-variance
targets such as residuals over bicubic: at high noise the clean estimate
x0 = (x_t - sqrt(1 - gamma^2) * eps) / gamma multiplies any error in eps by
sqrt(1 - gamma^2) / gamma, which is large at the end of the schedule. Predicting x0, or
v (Salimans & Ho 2022, "Progressive distillation", sec. 4), bounds that factor by 1
(docs/decisions.md, "Predicting x0 instead of eps").

All functions take gamma = sqrt(alpha_bar) shaped to broadcast against the images
(e.g. (B, 1, 1, 1)) and use x_t = gamma * x0 + sqrt(1 - gamma^2) * eps.
"""

from __future__ import annotations

from torch import Tensor

from idm.config import PREDICTIONS


def _check(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; expected one of {list(PREDICTIONS)}")


def training_target(prediction: str, x0: Tensor, eps: Tensor, gamma: Tensor) -> Tensor:
    """What a network predicting `prediction` should output for clean x0 and noise eps."""
    _check(prediction)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    return gamma * eps - (1 - gamma**2).sqrt() * x0  # v


def to_eps(prediction: str, output: Tensor, x_t: Tensor, gamma: Tensor) -> Tensor:
    """The noise implied by a network `output` of kind `prediction` at x_t."""
    _check(prediction)
    sigma = (1 - gamma**2).sqrt()
    if prediction == "eps":
        return output
    if prediction == "x0":
        return (x_t - gamma * output) / sigma
    return sigma * x_t + gamma * output  # v: eps = sigma * x_t + gamma * v
