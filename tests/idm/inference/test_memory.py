"""Peak-memory estimates of untiled and tiled runs, and the tile chosen for a bound."""

from __future__ import annotations

import pytest

from idm.config import MODEL_PRESETS
from idm.inference.memory import (
    check_memory,
    choose_tile,
    estimate_peak_bytes,
    estimate_tiled_peak_bytes,
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


def test_choose_tile_fits_the_bound() -> None:
    bound = 2 * 2**30
    assert choose_tile(TINY, (32, 32), (128, 128), max_bytes=bound, overlap=8) is None
    tile = choose_tile(TINY, (512, 512), (2048, 2048), max_bytes=bound, overlap=16, context=32)
    assert tile is not None and 16 < tile < 512
    fits = estimate_tiled_peak_bytes(TINY, (512, 512), (2048, 2048), tile=tile, overlap=16, context=32)
    assert fits <= bound < estimate_tiled_peak_bytes(TINY, (512, 512), (2048, 2048), tile=tile + 1, overlap=16,
                                                     context=32)
    # the context is part of every tile's input, so it costs memory: a smaller tile without it
    assert choose_tile(TINY, (512, 512), (2048, 2048), max_bytes=bound, overlap=16) > tile
    with pytest.raises(ValueError, match="no tile"):
        choose_tile(TINY, (512, 512), (2048, 2048), max_bytes=2**20, overlap=16)
    # norm="image" holds the sampler's state for the whole image too: more memory, a smaller tile
    image = estimate_tiled_peak_bytes(TINY, (512, 512), (2048, 2048), tile=tile, overlap=16, context=32, norm="image")
    assert image - fits == 4 * 8 * 2048 * 2048
    assert choose_tile(TINY, (512, 512), (2048, 2048), max_bytes=bound, overlap=16, context=32, norm="image") < tile
