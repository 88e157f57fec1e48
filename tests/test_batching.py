"""Batching images of mixed sizes: grouping, batch limits, input order."""

from __future__ import annotations

import pytest
import torch

from idm.batching import group_by_size, map_batched
from idm.resize import resize


def test_groups_equal_sizes_in_order_of_first_appearance() -> None:
    lr_sizes = [(8, 8), (6, 9), (8, 8), (8, 8), (6, 9), (8, 8)]
    sizes = [(16, 16), (12, 18), (16, 16), (24, 24), (12, 18), (16, 16)]
    assert group_by_size(lr_sizes, sizes, max_batch=2) == [[0, 2], [5], [1, 4], [3]]
    assert group_by_size(lr_sizes, sizes, max_batch=8) == [[0, 2, 5], [1, 4], [3]]


def test_outputs_come_back_in_input_order() -> None:
    g = torch.Generator().manual_seed(0)
    lrs = [torch.rand(3, *s, generator=g) for s in [(8, 8), (5, 7), (8, 8), (5, 7), (8, 8)]]
    sizes = [(16, 16), (10, 14), (20, 20), (10, 14), (16, 16)]
    calls = []

    def fn(batch: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        calls.append(batch.shape[0])
        return resize(batch, size)

    out = map_batched(fn, lrs, sizes, max_batch=4)
    assert sorted(calls) == [1, 2, 2]  # batch > 1 wherever sizes repeat
    for lr, size, y in zip(lrs, sizes, out):
        torch.testing.assert_close(y, resize(lr, size))


@pytest.mark.parametrize("max_batch", [0, -1, 1.5, True])
def test_bad_max_batch_raises(max_batch) -> None:
    with pytest.raises(ValueError, match="max_batch"):
        group_by_size([(8, 8)], [(16, 16)], max_batch=max_batch)


def test_mismatched_inputs_raise() -> None:
    with pytest.raises(ValueError, match="LR sizes"):
        group_by_size([(8, 8)], [], max_batch=2)
    with pytest.raises(ValueError, match=r"\(3, h, w\)"):
        map_batched(resize, [torch.rand(1, 3, 8, 8)], [(16, 16)], max_batch=2)
    with pytest.raises(ValueError, match="fn returned"):
        map_batched(lambda b, s: b, [torch.rand(3, 8, 8)], [(16, 16)], max_batch=2)
