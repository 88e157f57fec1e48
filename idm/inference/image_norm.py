"""Whole-image GroupNorm statistics for a network run tile by tile, in bounded memory.

A GroupNorm layer normalises with the mean and variance of its whole input, so a
network run on one tile normalises with that tile's statistics, not the image's, and
the tiles of a varied image come out with slightly different tones that no context or
blending removes. `ImageNorm` gives every tile the statistics the untiled run would use,
computed from the tiles themselves.

How. The statistics of GroupNorm call k depend on the outputs of calls 0..k-1, so they
are found in order, one *wave* per call: in wave k every tile is run up to call k with
the image statistics of calls 0..k-1 already known, its input there is summed (x and
x^2 per group, weighted by the tile's share of the whole image, so overlaps count once)
and the run stops; the sums over all tiles give call k's statistics. One more wave with
every statistic known runs the tiles to the end. Only one tile's activations are held
at a time, so the memory bound of tiling holds; the price is compute: L GroupNorm calls
take L + 1 partial runs of every tile. The result is exact up to what lies beyond a
tile's context (idm.inference.tiling). Why waves: a layer's statistics can only be exact
once every earlier layer's are, and the cheaper estimates tried are not
(docs/decisions.md, "Whole-image GroupNorm statistics for tiles").

Why by hand: tiled-VAE implementations (e.g. the MultiDiffusion upscaler for Stable
Diffusion) hold every tile's activations at once to synchronise GroupNorm, which
defeats a memory bound; no library offers the recompute-per-wave variant.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _WaveDone(Exception):
    """Raised inside a tile's forward once the wave's GroupNorm input has been summed."""


class ImageNorm:
    """Context manager: while active, the GroupNorm layers of `module` normalise with
    statistics given by `run`; outside `run` they behave as usual.

        with ImageNorm(model.unet) as norm:
            outputs = norm.run([(lambda: model(x_tile, ...), share) for ...])
    """

    def __init__(self, module: nn.Module) -> None:
        self.norms = [m for m in module.modules() if isinstance(m, nn.GroupNorm)]
        self._handles: list = []
        self._active = False
        self._stats: list[tuple[Tensor, Tensor]] = []  # (mean, var), (B, G) float64, per call
        self._sums: Tensor | None = None  # (3, B, G): sum w x, sum w x^2, sum w
        self._share: Tensor | None = None
        self._calls = 0

    def __enter__(self) -> ImageNorm:
        self._handles = [m.register_forward_hook(self._hook) for m in self.norms]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._active = [], False

    def run(self, tiles: Sequence[tuple[Callable[[], Tensor], Tensor]]) -> list[Tensor]:
        """Run each tile's forward with the whole image's GroupNorm statistics.

        tiles: (forward, share) per tile. forward() runs the network on the tile (the
        same network, batch and device each time, and it must be deterministic); share
        (T_H, T_W) is the tile's weight at each pixel of its input, with the shares of
        all tiles summing to 1 at every pixel of the image (0 over context the tile
        does not keep). GroupNorm inputs at lower resolutions get the share averaged
        down to their size. Returns each forward's return value from the last wave, the
        only one that runs to the end (a forward may instead add its output into a
        buffer, so that one tile's output is held at a time).
        """
        if not self._handles:
            raise RuntimeError("ImageNorm.run needs the context manager to be entered")
        self._stats, self._active = [], True
        try:
            while True:
                self._sums, outputs = None, []
                for forward, share in tiles:
                    self._share, self._calls = share, 0
                    try:
                        outputs.append(forward())
                    except _WaveDone:
                        continue
                if len(outputs) == len(tiles):
                    return outputs
                if outputs or self._sums is None:
                    raise RuntimeError("tiles reached different numbers of GroupNorm layers")
                total, total_sq, weight = self._sums
                mean = total / weight
                self._stats.append((mean, (total_sq / weight - mean.square()).clamp(min=0)))
        finally:
            self._active, self._sums, self._share = False, None, None

    def _hook(self, norm: nn.GroupNorm, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
        """Replace the layer's output (computed with the tile's own statistics; discarded)."""
        if not self._active:
            return output
        x, call = args[0], self._calls
        self._calls += 1
        b, c, groups = x.shape[0], x.shape[1], norm.num_groups
        if call == len(self._stats):  # this wave's layer: sum its input over the tile's share
            share = F.adaptive_avg_pool2d(self._share[None, None].to(x.device, torch.float64), x.shape[-2:])[0, 0]
            grouped = x.double().reshape(b, groups, c // groups, *x.shape[-2:])
            sums = torch.stack([(grouped * share).sum(dim=(2, 3, 4)), (grouped.square() * share).sum(dim=(2, 3, 4)),
                                (share.sum() * (c // groups)).expand(b, groups)])
            self._sums = sums if self._sums is None else self._sums + sums
            raise _WaveDone
        mean, var = self._stats[call]
        y = (x.reshape(b, groups, -1).double() - mean[..., None]) * torch.rsqrt(var[..., None] + norm.eps)
        y = y.to(x.dtype).reshape_as(x)
        if norm.affine:
            y = y * norm.weight[None, :, None, None] + norm.bias[None, :, None, None]
        return y
