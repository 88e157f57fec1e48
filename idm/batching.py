"""Batch images of different sizes: group by (LR size, target size), restore input order.

A batch needs one LR size and one target size (the condition, the noise and every
UNet level share a shape), so a mixed list is split into groups of equal sizes, each
group into batches of at most `max_batch`, and the outputs are put back in the order
the images came in.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

BatchFn = Callable[[Tensor, tuple[int, int]], Tensor]


def group_by_size(lr_sizes: Sequence[tuple[int, int]], sizes: Sequence[tuple[int, int]], *,
                  max_batch: int) -> list[list[int]]:
    """Indices of the inputs, grouped into batches of equal (LR size, target size).

    Batches hold at most `max_batch` indices, in input order; groups come in the order
    of their first image. E.g. sizes A, B, A with max_batch 8 -> [[0, 2], [1]].
    """
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    if len(lr_sizes) != len(sizes):
        raise ValueError(f"got {len(lr_sizes)} LR sizes but {len(sizes)} target sizes")
    groups: dict[tuple[tuple[int, int], tuple[int, int]], list[int]] = {}
    for index, key in enumerate(zip(lr_sizes, sizes)):
        key = (tuple(int(v) for v in key[0]), tuple(int(v) for v in key[1]))
        groups.setdefault(key, []).append(index)  # type: ignore[arg-type]
    return [members[i:i + max_batch] for members in groups.values()
            for i in range(0, len(members), max_batch)]


def map_batched(fn: BatchFn, lrs: Sequence[Tensor], sizes: Sequence[tuple[int, int]], *,
                max_batch: int) -> list[Tensor]:
    """Apply fn to every (LR image, target size), batching equal sizes together.

    lrs: images (3, h, w), any mix of sizes; sizes: target (H, W) of each.
    fn(lr_batch (B, 3, h, w), (H, W)) -> (B, C, H, W) upscales one batch.
    Returns one (C, H, W) output per input, in input order.
    """
    for lr in lrs:
        if lr.dim() != 3:
            raise ValueError(f"each LR image must be (3, h, w), got {tuple(lr.shape)}")
    out: list[Tensor | None] = [None] * len(lrs)
    for batch in group_by_size([lr.shape[-2:] for lr in lrs], sizes, max_batch=max_batch):
        size = tuple(int(v) for v in sizes[batch[0]])
        result = fn(torch.stack([lrs[i] for i in batch]), size)  # type: ignore[arg-type]
        if result.shape[0] != len(batch) or tuple(result.shape[-2:]) != size:
            raise ValueError(f"fn returned {tuple(result.shape)} for a batch of {len(batch)} at size {size}")
        for i, y in zip(batch, result):
            out[i] = y
    return out  # type: ignore[return-value]
