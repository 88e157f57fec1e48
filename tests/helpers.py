"""Small helpers shared by tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth-plus-texture (H, W, 3) uint8 test image, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in range(3)], axis=-1)
    img = 127.5 + 90 * base + rng.normal(0, 12, (height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "datasets"
