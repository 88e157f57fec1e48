"""Super-resolution methods behind one interface: (LR image, target size) -> SR image.

Evaluation, the report and the CLI only see `Method`; bicubic is the baseline, and
model-backed methods (an IDM checkpoint, a registered model, the int8 model) plug in
by satisfying the same protocol.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from idm.resize import resize_uint8


class Method(Protocol):
    """Maps an (h, w, 3) uint8 LR image to an (H, W, 3) uint8 image of `size` = (H, W)."""

    name: str

    def __call__(self, lr: np.ndarray, size: tuple[int, int]) -> np.ndarray: ...


class Bicubic:
    """Bicubic interpolation with the project's one resize function (idm.resize)."""

    name = "bicubic"

    def __call__(self, lr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        return resize_uint8(lr, size)
