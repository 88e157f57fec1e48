"""Tiled inference: super-resolve an output of any size in bounded memory.

The LR image is cut into overlapping tiles, each tile is super-resolved on its own,
and the HR tiles are blended with raised-cosine ramps over their overlaps, then
divided by the summed weights.

Geometry. Tiles are planned per axis in LR pixels. A tile covering LR rows [a, b)
writes HR rows [hr(a), hr(b)) with hr(a) = round(a * H / h), computed in integers, so
neighbouring tiles agree on every boundary and the last tile ends exactly at H: the
tiles line up with the untiled output grid for any scale, integer or not. The network
sees more than the tile (`input_span`): `context` HR pixels (rounded up to whole LR
pixels) on every side, so that no output it keeps is computed from zero padding, with
its ends moved onto the whole image's grids (HR pixel centres and the UNet's stride-2
grids), so that a tile is computed as the same part of the whole picture and not as a
slightly shifted or stretched one. The UNet runs every input, tile or whole image, on a
canvas whose sides are multiples of its coarsest stride (`ModelConfig.canvas`), so its
levels do not drift with the input's size (docs/decisions.md, "The UNet canvas
(multiples of the coarsest stride)"): without GroupNorm and attention, a tile whose
context covers the receptive field gives the untiled output exactly
(tests/idm/models/test_models.py).

Tiled vs untiled. The denoiser's receptive field is wide (three levels, attention at the
coarsest), so a tile matches the untiled run only as far as its input resembles the
whole image. Two causes of difference remain. GroupNorm: each tile normalises with its
own statistics (`SampleConfig.tile_norm` "tile", the default: fast). With "image" the tiles run in
step and normalise with the whole image's statistics, found tile by tile in bounded
memory (`idm.inference.image_norm`), for many times the compute (bench/README.md). And
the receptive field beyond a tile's `context`, which more context closes for more
compute. Few tiles keep both gaps small: `idm.inference.memory.choose_tile` (what `idm
upscale` uses) takes the fewest that fit the memory bound, each no larger than that count
needs, which is also the least work (docs/decisions.md, "Tile context and grid alignment",
"Tile size: least work").

Noise. For a diffusion sampler to give the same picture tiled and untiled, x_T is
drawn once for the whole HR image and each tile receives its crop (`noise=` of
`tiled_apply`; `tiled_super_resolve` does this). Ancestral (DDPM) sampling still draws
fresh noise per tile at every step; only deterministic samplers (DDIM, eta = 0) make
tiles agree on their overlaps up to the tile's limited context.

Memory: `idm.inference.memory` estimates a run's peak and picks the tile for a bound.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
from torch import Tensor

from idm.config import SampleConfig
from idm.diffusion.noise import gaussian
from idm.diffusion.sampling import SAMPLER_FUNCTIONS, Decoder
from idm.diffusion.schedule import Schedule
from idm.inference.image_norm import ImageNorm
from idm.models import IDM

TileFn = Callable[..., Tensor]


@dataclass(frozen=True)
class Span:
    """One tile's extent along one axis: LR pixels [lr0, lr1), HR pixels [hr0, hr1),
    and the tile's blending weight along that axis, (hr1 - hr0,) float32 in (0, 1]."""

    lr0: int
    lr1: int
    hr0: int
    hr1: int
    weight: Tensor


def hr_coord(lr_pos: int, lr_len: int, hr_len: int) -> int:
    """round(lr_pos * hr_len / lr_len), halves rounded up, in exact integer arithmetic."""
    return (2 * lr_pos * hr_len + lr_len) // (2 * lr_len)


def check_tiling(tile: int, overlap: int) -> None:
    """Raise ValueError unless tile >= 1 and 0 <= overlap < tile (both in LR pixels)."""
    for name, value in (("tile", tile), ("overlap", overlap)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer number of LR pixels, got {value!r}")
    if tile < 1:
        raise ValueError(f"tile must be >= 1 LR pixel, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile) = [0, {tile}), got {overlap}")


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of the fewest `tile`-px tiles that cover [0, length) with >= `overlap` px
    shared by neighbours, spread evenly; the last tile ends at `length`."""
    check_tiling(tile, overlap)
    if length <= tile:
        return [0]
    count = math.ceil((length - tile) / (tile - overlap)) + 1
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def _ramp(length: int) -> Tensor:
    """Raised cosine rising over `length` px, (length,) in (0, 1); ramp + flip(ramp) = 1."""
    i = torch.arange(length, dtype=torch.float64) + 0.5
    return (0.5 - 0.5 * torch.cos(math.pi * i / length)).float()


def plan_axis(lr_len: int, hr_len: int, tile: int, overlap: int) -> list[Span]:
    """The tiles along one axis of lr_len LR / hr_len HR pixels, with their weights."""
    bounds = [(a, min(a + tile, lr_len)) for a in tile_starts(lr_len, tile, overlap)]
    hr = [(hr_coord(a, lr_len, hr_len), hr_coord(b, lr_len, hr_len)) for a, b in bounds]
    spans = []
    for k, ((a, b), (r0, r1)) in enumerate(zip(bounds, hr)):
        weight = torch.ones(r1 - r0)
        if k > 0:  # rise over the HR overlap with the previous tile
            rise = hr[k - 1][1] - r0
            weight[:rise] *= _ramp(rise)
        if k < len(bounds) - 1:  # fall over the HR overlap with the next tile
            fall = r1 - hr[k + 1][0]
            weight[r1 - r0 - fall:] *= _ramp(fall).flip(0)
        spans.append(Span(a, b, r0, r1, weight))
    return spans


def lr_pixels(hr_pixels: int, lr_len: int, hr_len: int) -> int:
    """The whole LR pixels covering `hr_pixels` HR pixels: ceil(hr_pixels * h / H), and at
    least one when hr_pixels > 0."""
    return -(-hr_pixels * lr_len // hr_len)


def input_span(span: Span, lr_len: int, hr_len: int, *, context: int = 0, align: int = 1) -> tuple[int, int]:
    """The LR pixels [a0, a1) a tile's network sees: its span widened by `context` px on
    each side (clipped to the image), its ends moved further out (by at most a quarter
    of the span each) onto the whole image's grids where possible.

    Context lets the convolutions near a tile's inner edges see real neighbours instead of
    zero padding; the network's output over the context is dropped. The start is moved,
    in order of preference, to an LR pixel a0 whose HR position a0 * H / h is (1) an
    integer multiple of `align`, (2) a multiple of `align` after rounding, (3) left alone;
    the end, to one whose HR position is an integer. Exact ends put the tile's HR pixel
    centres exactly on the whole image's, so the tile is upscaled by exactly H / h and
    not by its rounded size ratio; `align` (the factor by which the UNet's coarsest
    level is smaller) keeps its stride-2 grids in phase with the whole image's
    (docs/decisions.md, "Tile context and grid alignment"). Context is counted in HR
    pixels because the denoiser, whose receptive field it must cover, runs at the
    output resolution.
    """
    a0, a1 = max(span.lr0 - context, 0), min(span.lr1 + context, lr_len)
    slack = (span.lr1 - span.lr0) // 4
    # HR positions a * H / h are integers for a = k * h / g (g = gcd(h, H)), and then
    # multiples of align when k is a multiple of align / gcd(align, H / g).
    g = math.gcd(lr_len, hr_len)
    exact_end = min(-(-a1 // (lr_len // g)) * (lr_len // g), lr_len)  # the image's end is exact
    if exact_end - a1 <= slack:  # an exact end too, so the tile's scale is exactly H / h
        a1 = exact_end
    period = lr_len // g * (align // math.gcd(align, hr_len // g))
    if a0 - a0 // period * period <= slack:
        return a0 // period * period, a1
    lowest = max(a0 - slack, 0)
    rounded = next((b for b in range(a0, lowest - 1, -1) if hr_coord(b, lr_len, hr_len) % align == 0), a0)
    return rounded, a1


def plan_inputs(lr_len: int, hr_len: int, *, tile: int, overlap: int, context: int = 0,
                align: int = 1) -> list[tuple[Span, int, int, int, int]]:
    """The tiles along one axis (`plan_axis`) with their network inputs: (span, a0, a1,
    R0, R1), LR pixels [a0, a1) (`input_span`, `context` in HR px) and their HR pixels [R0, R1)."""
    lr_context = lr_pixels(context, lr_len, hr_len)
    plan = []
    for span in plan_axis(lr_len, hr_len, tile, overlap):
        a0, a1 = input_span(span, lr_len, hr_len, context=lr_context, align=align)
        plan.append((span, a0, a1, hr_coord(a0, lr_len, hr_len), hr_coord(a1, lr_len, hr_len)))
    return plan


def largest_input(lr_len: int, hr_len: int, *, tile: int, overlap: int, context: int = 0, align: int = 1) -> int:
    """The most HR pixels along one axis that any tile's network input (`input_span`) covers."""
    plan = plan_inputs(lr_len, hr_len, tile=tile, overlap=overlap, context=context, align=align)
    return max(R1 - R0 for _, _, _, R0, R1 in plan)


@dataclass(frozen=True)
class _Tile:
    """One tile of a plan: its network input (LR and HR slices of the whole image), the
    part of that input it keeps (`own`, slices of the input) and its share of the whole
    image over the input ((T_H, T_W): the blending weight normalised so that the shares
    of all tiles sum to 1 at every pixel; zero over the context)."""

    lr: tuple[slice, slice]
    hr: tuple[slice, slice]
    own: tuple[slice, slice]
    share: Tensor

    @property
    def size(self) -> tuple[int, int]:
        """The network input's HR size (T_H, T_W)."""
        return self.hr[0].stop - self.hr[0].start, self.hr[1].stop - self.hr[1].start


def _tiles(lr_size: tuple[int, int], size: tuple[int, int], *, tile: int, overlap: int, context: int,
           align: int) -> list[_Tile]:
    """The tiles of an (h, w) -> `size` upscale (`plan_inputs` along each axis), row by row."""
    rows = plan_inputs(lr_size[0], size[0], tile=tile, overlap=overlap, context=context, align=align)
    cols = plan_inputs(lr_size[1], size[1], tile=tile, overlap=overlap, context=context, align=align)
    tiles, weight_sum = [], torch.zeros(size)
    for r, a0, a1, R0, R1 in rows:
        for c, b0, b1, C0, C1 in cols:
            own = (slice(r.hr0 - R0, r.hr1 - R0), slice(c.hr0 - C0, c.hr1 - C0))
            share = torch.zeros(R1 - R0, C1 - C0)
            share[own] = r.weight[:, None] * c.weight[None, :]
            weight_sum[R0:R1, C0:C1] += share
            tiles.append(_Tile((slice(a0, a1), slice(b0, b1)), (slice(R0, R1), slice(C0, C1)), own, share))
    for t in tiles:
        t.share.div_(weight_sum[t.hr])
    return tiles


def tiled_apply(fn: TileFn, lr: Tensor, size: tuple[int, int], *, tile: int, overlap: int,
                noise: Tensor | None = None, context: int = 0, align: int = 1) -> Tensor:
    """Upscale lr (B, 3, h, w) in [-1, 1] to size (H, W) tile by tile: (B, 3, H, W).

    fn(lr_tile (B, 3, t_h, t_w), (T_H, T_W)) -> (B, 3, T_H, T_W) upscales one tile; when
    `noise` (B, C, H, W) is given (a sampler's x_T for the whole image), it is called as
    fn(lr_tile, (T_H, T_W), noise_tile) with the tile's crop of it. `tile` and `overlap`
    are in LR pixels; tiles are square except where the image is smaller. Each tile's
    network input is widened by `context` HR px (in whole LR px, at least one) and aligned
    to `align` HR px (`input_span`); only the tile's own span of its output is blended.
    """
    height, width = (int(s) for s in size)
    if lr.dim() != 4 or height < 1 or width < 1:
        raise ValueError(f"need lr (B, C, h, w) and a size of at least 1x1, got {tuple(lr.shape)}, {size}")
    if noise is not None and (noise.shape[0] != lr.shape[0] or tuple(noise.shape[-2:]) != (height, width)):
        raise ValueError(f"noise {tuple(noise.shape)} must be (B, C, H, W) = ({lr.shape[0]}, C, {height}, {width})")
    if isinstance(context, bool) or not isinstance(context, int) or context < 0:
        raise ValueError(f"context must be an integer number of HR pixels >= 0, got {context!r}")
    if isinstance(align, bool) or not isinstance(align, int) or align < 1:
        raise ValueError(f"align must be an integer number of HR pixels >= 1, got {align!r}")
    out = None
    for t in _tiles(tuple(lr.shape[-2:]), (height, width), tile=tile, overlap=overlap, context=context, align=align):
        args = [lr[(..., *t.lr)], t.size]
        if noise is not None:
            args.append(noise[(..., *t.hr)])
        y = fn(*args)
        if y.shape[0] != lr.shape[0] or tuple(y.shape[-2:]) != t.size:
            raise ValueError(f"fn returned {tuple(y.shape)} for a tile of size {t.size}")
        if out is None:
            out = y.new_zeros((*y.shape[:2], height, width))
        under = out[(..., *t.hr)]  # a view: adding into its kept part adds into `out`
        under[(..., *t.own)] += y[(..., *t.own)] * t.share[t.own].to(y)
    return out


@torch.no_grad()
def tiled_super_resolve(model: IDM, lr: Tensor, size: tuple[int, int], timesteps: Sequence[int], *,
                        schedule: Schedule, sample: SampleConfig, tile: int, clip_x0: bool = True,
                        decode: Decoder | None = None, generator: torch.Generator | None = None,
                        align: int | None = None) -> Tensor:
    """`idm.diffusion.sampling.super_resolve`, tile by tile: lr (B, 3, h, w) -> (B, 3, H, W) in [-1, 1].

    `sample` gives the sampler, eta and temperature, and the tiling: square `tile`-px LR
    tiles overlapping by `sample.tile_overlap` LR px, each input widened by
    `sample.tile_context` HR px and aligned to `align` HR px (default: the model's
    `ModelConfig.tile_align`; `input_span`). x_T is drawn once for the whole (H, W) image with
    `generator` and every tile starts from its crop, so with a deterministic sampler
    (DDIM, eta = 0) overlapping tiles agree up to their different context. Each tile's
    condition is computed once, and `decode` is applied tile by tile, before blending.

    `sample.tile_norm` (TILE_NORMS): "tile" runs each tile's whole sampler on its own,
    its GroupNorm layers normalising with the tile's statistics; "image" runs the tiles
    in step, blending their predictions into one whole-image x_t at every step, with the
    whole image's GroupNorm statistics (idm.inference.image_norm): the untiled picture
    up to what lies beyond a tile's context, in the same memory, for many times the
    compute (bench/README.md).
    """
    sampler, eta = SAMPLER_FUNCTIONS[sample.sampler], sample.eta
    overlap, context = sample.tile_overlap, sample.tile_context
    x_T = sample.temperature * gaussian((lr.shape[0], 3, *size), generator, device=lr.device, dtype=lr.dtype)
    if align is None:
        align = model.cfg.tile_align
    if sample.tile_norm == "image":
        return _image_norm_sample(model, lr, size, timesteps, x_T, schedule=schedule, sampler=sampler, eta=eta,
                                  clip_x0=clip_x0, decode=decode, generator=generator, tile=tile,
                                  overlap=overlap, context=context, align=align)

    def one_tile(lr_tile: Tensor, tile_size: tuple[int, int], x_T_tile: Tensor) -> Tensor:
        cond = model.condition(lr_tile, tile_size)
        x0 = sampler(model, cond, x_T_tile, timesteps, schedule=schedule, eta=eta, clip_x0=clip_x0,
                     generator=generator)
        return x0 if decode is None else decode(x0, lr_tile, cond)

    return tiled_apply(one_tile, lr, size, tile=tile, overlap=overlap, noise=x_T, context=context, align=align)


def _image_norm_sample(model: IDM, lr: Tensor, size: tuple[int, int], timesteps: Sequence[int],
                       x_T: Tensor, *, schedule: Schedule, sampler: Callable[..., Tensor], eta: float,
                       clip_x0: bool, decode: Decoder | None, generator: torch.Generator | None, tile: int,
                       overlap: int, context: int, align: int) -> Tensor:
    """`tiled_super_resolve` with norm="image": the sampler runs on the whole image, and
    its denoiser is the tiles' predictions, blended, with whole-image GroupNorm statistics.

    Each tile's condition is recomputed whenever the tile runs rather than kept, so
    memory stays that of one tile (plus whole-image 3-channel buffers); it is a small
    part of a denoiser call.
    """
    tiles = [replace(t, share=t.share.to(x_T)) for t in
             _tiles(tuple(lr.shape[-2:]), size, tile=tile, overlap=overlap, context=context, align=align)]
    # GroupNorm sees each tile on the UNet's canvas (IDM.to_canvas): its shares
    # there, with the edge repeated as the canvas repeats the image's, so a tile that
    # ends where the image does counts the rows the untiled canvas adds, exactly once.
    canvas_share = [model.to_canvas(t.share[None, None])[0, 0] for t in tiles]

    def condition(t: _Tile):
        return model.condition(lr[(..., *t.lr)], t.size)

    def add_tile_eps(out: Tensor, t: _Tile, x_t: Tensor, noise_level: Tensor) -> None:
        # Blended in as soon as it is computed, so one tile's prediction is held at a time.
        out[(..., *t.hr)] += model(x_t[(..., *t.hr)], noise_level, condition(t)) * t.share

    with ImageNorm(model) as norm:
        def denoise(x_t: Tensor, noise_level: Tensor, _cond: None) -> Tensor:
            """The denoiser on the whole image: every tile's prediction, blended."""
            out = torch.zeros_like(x_t)
            norm.run([(functools.partial(add_tile_eps, out, t, x_t, noise_level), share)
                      for t, share in zip(tiles, canvas_share)])
            return out

        x0 = sampler(denoise, None, x_T, timesteps, schedule=schedule, eta=eta, clip_x0=clip_x0,
                     generator=generator)
    if decode is None:
        return x0
    image = torch.zeros_like(x0)
    for t in tiles:
        image[(..., *t.hr)] += decode(x0[(..., *t.hr)], lr[(..., *t.lr)], condition(t)) * t.share
    return image
