"""Peak-memory estimates of untiled and tiled runs, and the tile chosen for a bound."""

from __future__ import annotations

import pytest

from idm.config import MODEL_PRESETS
from idm.inference.memory import (
    check_memory,
    choose_tile,
    estimate_peak_bytes,
    estimate_regression_peak_bytes,
    estimate_tiled_peak_bytes,
    tiled_work,
)

TINY = MODEL_PRESETS["tiny"]


def test_memory_estimate_grows_with_size_and_batch() -> None:
    small, large = estimate_peak_bytes(TINY, (128, 128)), estimate_peak_bytes(TINY, (512, 512))
    assert small < large < estimate_peak_bytes(TINY, (512, 512), batch=2)
    # attention runs in blocks (SDPA's flash kernel), so activations are linear in the
    # pixel count: 4x the side (every level divides evenly) -> 16x the activations
    fixed = estimate_peak_bytes(TINY, (0, 0))  # runtime and weights
    assert (large - fixed) / (small - fixed) == pytest.approx(16, rel=1e-6)
    assert estimate_peak_bytes(TINY, (512, 512), batch=2) - fixed == pytest.approx(2 * (large - fixed), rel=1e-6)


def test_exceeding_the_memory_bound_untiled_raises() -> None:
    check_memory(TINY, (64, 64), max_bytes=4 * 2**30)
    with pytest.raises(ValueError, match="enable tiling"):
        check_memory(TINY, (2048, 2048), max_bytes=4 * 2**30)


def _largest_fitting(cfg, lr, size, bound, **kw) -> int:
    return next(t for t in range(max(lr) - 1, 0, -1) if estimate_tiled_peak_bytes(cfg, lr, size, tile=t, **kw) <= bound)


def test_choose_tile_fits_the_bound_with_the_least_work() -> None:
    bound = 2 * 2**30
    assert choose_tile(TINY, (32, 32), (128, 128), max_bytes=bound, overlap=8) is None
    lr, size = (512, 512), (2048, 2048)
    tile = choose_tile(TINY, lr, size, max_bytes=bound, overlap=16, context=32)
    assert tile is not None and 16 < tile < 512
    assert estimate_tiled_peak_bytes(TINY, lr, size, tile=tile, overlap=16, context=32) <= bound
    largest = _largest_fitting(TINY, lr, size, bound, overlap=16, context=32)
    assert tile <= largest
    work = tiled_work(TINY, lr, size, tile=tile, overlap=16, context=32)
    assert work <= tiled_work(TINY, lr, size, tile=largest, overlap=16, context=32)
    # no tile that fits computes less (the candidates skip most sizes; they miss nothing)
    assert all(work <= tiled_work(TINY, lr, size, tile=t, overlap=16, context=32) for t in range(17, largest + 1, 7))
    with pytest.raises(ValueError, match="no tile"):
        choose_tile(TINY, lr, size, max_bytes=2**20, overlap=16)
    # norm="image" holds the sampler's state for the whole image too: more memory
    fits = estimate_tiled_peak_bytes(TINY, lr, size, tile=tile, overlap=16, context=32)
    image = estimate_tiled_peak_bytes(TINY, lr, size, tile=tile, overlap=16, context=32, norm="image")
    assert image - fits == 4 * 8 * 2048 * 2048


def test_the_largest_tile_that_fits_is_not_the_fastest() -> None:
    """2.5 Mpx out of the lean model's diffusion under 4 GiB: the largest tile that fits (331 LR
    px) covers the 395 px side in two tiles that overlap by most of their width, 3x the
    untiled work; two 202 px tiles per axis do it for 1.2x."""
    lr, size, bound = (395, 395), (1580, 1580), 4 * 2**30
    kw = dict(overlap=8, context=64)
    largest = _largest_fitting(MODEL_PRESETS["lean"], lr, size, bound, **kw)
    tile = choose_tile(MODEL_PRESETS["lean"], lr, size, max_bytes=bound, **kw)
    assert (largest, tile) == (331, 202)
    untiled = size[0] * size[1]
    assert tiled_work(MODEL_PRESETS["lean"], lr, size, tile=largest, **kw) > 3 * untiled
    assert tiled_work(MODEL_PRESETS["lean"], lr, size, tile=tile, **kw) < 1.25 * untiled

LEAN = MODEL_PRESETS["lean"]


def test_the_regression_output_needs_far_less_memory_than_a_diffusion_step() -> None:
    """x_con alone holds no UNet state and no full-size hidden map: a 16 Mpx output of the lean
    model from 1000 x 1000 px fits the default 4 GiB bound in one piece (measured peak RSS
    1.59 GiB, bench/README.md), where a diffusion step needs tiles."""
    lr, size = (1000, 1000), (4000, 4000)
    regression = estimate_regression_peak_bytes(LEAN, lr, size)
    assert regression < 2 * 2**30 < 4 * 2**30 < estimate_peak_bytes(LEAN, size, lr_size=lr)
    assert choose_tile(LEAN, lr, size, max_bytes=4 * 2**30, overlap=8, regression=True) is None
    assert choose_tile(LEAN, lr, size, max_bytes=4 * 2**30, overlap=8) is not None
    check_memory(LEAN, size, max_bytes=4 * 2**30, lr_size=lr, regression=True)
    # the encoder's maps at LR decide when the input is large against the output: x2 to 16 Mpx is tiled
    assert estimate_regression_peak_bytes(LEAN, (2000, 2000), size) > 4 * 2**30
    tile = choose_tile(LEAN, (2000, 2000), size, max_bytes=4 * 2**30, overlap=8, context=64, regression=True)
    assert tile is not None and 8 < tile < 2000
    with pytest.raises(ValueError, match="needs lr_size"):
        check_memory(LEAN, size, max_bytes=4 * 2**30, regression=True)
