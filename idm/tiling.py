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
canvas whose sides are multiples of its coarsest stride (`ModelConfig.canvas`), so its levels
do not drift with the input's size: without GroupNorm and attention, a tile whose
context covers the receptive field gives the untiled output exactly
(tests/test_models.py).

How much context, and what remains. The denoiser's receptive field is wide (three
levels, attention at the coarsest), so a tile matches the untiled run only as far as its
input resembles the whole image: the smaller a part of a varied image a tile is, the
larger the gap (`bench/tiled_seams.py`; tables in bench/README.md). Two causes remain.
GroupNorm: each tile normalises with its own statistics (norm="tile", the default:
fast). With norm="image" the tiles run in step and normalise with the whole image's
statistics, found tile by tile in bounded memory (`idm.image_norm`), for 15-60x the
compute. And the receptive field beyond a tile's `context`, which more context closes
for more compute. Tiles as large as the memory bound allows (`choose_tile`, what
`idm upscale` uses) keep both gaps small.

Noise. For a diffusion sampler to give the same picture tiled and untiled, x_T is
drawn once for the whole HR image and each tile receives its crop (`noise=` of
`tiled_apply`; `tiled_super_resolve` does this). Ancestral (DDPM) sampling still draws
fresh noise per tile at every step; only deterministic samplers (DDIM, eta = 0) make
tiles agree on their overlaps up to the tile's limited context.

Memory. `estimate_peak_bytes` predicts the peak memory of an untiled run from the
model config and output size. It grows linearly with the pixel count: self-attention
runs in SDPA's blocked (flash) kernel and holds no N x N map (its compute still grows
with N^2). `choose_tile` picks the largest tile under a bound.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from idm.config import ModelConfig
from idm.diffusion import Schedule
from idm.image_norm import ImageNorm
from idm.models import IDM
from idm.sampling import Decoder, Sampler, check_temperature, sample_ddpm

TileFn = Callable[..., Tensor]
TILE_NORMS = ("tile", "image")  # GroupNorm statistics per tile, or the whole image's (idm.image_norm)


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
    level is smaller) keeps its stride-2 grids in phase with the whole image's. On the default model's smooth test photo at x2.5, these took the
    tiled output from 56 to 58-65 dB PSNR against the untiled one (bench/tiled_seams).
    Context is counted in HR pixels because the denoiser, whose receptive field it must
    cover, runs at the output resolution.
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
def tiled_super_resolve(model: nn.Module, lr: Tensor, size: tuple[int, int], timesteps: Sequence[int], *,
                        schedule: Schedule, tile: int, overlap: int, sampler: Sampler = sample_ddpm,
                        eta: float | None = None, clip_x0: bool = True, temperature: float = 1.0,
                        decode: Decoder | None = None, generator: torch.Generator | None = None,
                        context: int = 0, align: int | None = None, norm: str = "tile") -> Tensor:
    """`idm.sampling.super_resolve`, tile by tile: lr (B, 3, h, w) -> (B, 3, H, W) in [-1, 1].

    x_T is drawn once for the whole (H, W) image with `generator`, and every tile starts
    from its crop, so with a deterministic sampler (DDIM, eta = 0) overlapping tiles
    agree up to their different context. Each tile's condition is computed once, and
    `decode` (idm.sampling.super_resolve) is applied tile by tile, before blending.
    `context` and `align` (HR px; align defaults to the UNet's coarsest stride) widen each
    tile's input (`input_span`).

    `norm` (`TILE_NORMS`): "tile" runs each tile's whole sampler on its own, its
    GroupNorm layers normalising with the tile's statistics; "image" runs the tiles in
    step, blending their predictions into one whole-image x_t at every step, with the
    whole image's GroupNorm statistics (`idm.image_norm`): the same picture as the
    untiled run up to what lies beyond a tile's context (its convolutions' reach and
    its attention), in the same memory, for 15-60x the untiled run's time with the
    default model.
    """
    check_temperature(temperature)
    if norm not in TILE_NORMS:
        raise ValueError(f"unknown tile norm {norm!r}; expected one of {list(TILE_NORMS)}")
    where = generator.device if generator is not None else lr.device
    x_T = temperature * torch.randn((lr.shape[0], 3, *size), generator=generator, device=where, dtype=lr.dtype).to(lr.device)
    extra = {} if eta is None else {"eta": eta}
    if align is None:
        align = model.cfg.unet_stride
    if norm == "image":
        return _image_norm_sample(model, lr, size, timesteps, x_T, schedule=schedule, sampler=sampler,
                                  clip_x0=clip_x0, decode=decode, generator=generator, tile=tile,
                                  overlap=overlap, context=context, align=align, **extra)

    def one_tile(lr_tile: Tensor, tile_size: tuple[int, int], x_T_tile: Tensor) -> Tensor:
        cond = model.condition(lr_tile, tile_size)
        x0 = sampler(model, cond, x_T_tile, timesteps, schedule=schedule, clip_x0=clip_x0,
                     generator=generator, **extra)
        return x0 if decode is None else decode(x0, lr_tile, cond)

    return tiled_apply(one_tile, lr, size, tile=tile, overlap=overlap, noise=x_T, context=context, align=align)


def _image_norm_sample(model: nn.Module, lr: Tensor, size: tuple[int, int], timesteps: Sequence[int],
                       x_T: Tensor, *, schedule: Schedule, sampler: Sampler, clip_x0: bool,
                       decode: Decoder | None, generator: torch.Generator | None, tile: int, overlap: int,
                       context: int, align: int, **extra: float) -> Tensor:
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

        x0 = sampler(denoise, None, x_T, timesteps, schedule=schedule, clip_x0=clip_x0, generator=generator,
                     **extra)
    if decode is None:
        return x0
    image = torch.zeros_like(x0)
    for t in tiles:
        image[(..., *t.hr)] += decode(x0[(..., *t.hr)], lr[(..., *t.lr)], condition(t)) * t.share
    return image


# --- memory bound --------------------------------------------------------------------

# Python and torch before the model runs: ~0.7 GiB RSS for this torch build (measured).
RUNTIME_BYTES = 768 * 2**20
# Self-attention holds its contiguous q, k, v, the output and its transpose: 5 C x N
# floats. SDPA's flash kernel works in blocks and holds no N x N map (measured:
# idm.models.layers.SelfAttention).
ATTENTION_COPIES = 5
# Temporaries the per-tensor count below leaves out, and allocator slack: measured peaks
# are 0.8-1.15x the counted activations (untiled, tiny 256-1536 px, paper 128-512 px);
# 1.5 keeps the estimate 1.05-1.5x above them.
ACTIVATION_SLACK = 1.5


def _level_pixels(cfg: ModelConfig, size: tuple[int, int]) -> list[int]:
    """Pixels of each UNet level on its canvas (`ModelConfig.canvas`)."""
    height, width = cfg.canvas(size)
    return [(height >> i) * (width >> i) for i in range(len(cfg.channels))]


@functools.lru_cache(maxsize=8)
def _param_count(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in IDM(cfg).parameters())


def estimate_peak_bytes(cfg: ModelConfig, size: tuple[int, int], *, batch: int = 1) -> int:
    """Estimated peak memory (bytes, float32, whole process) of one untiled run of a
    `cfg` model at output size (H, W): runtime + weights + what a denoising step keeps
    alive at once. Calibrated against measured peak RSS (`bench.tiled_memory --bounds 1000`:
    tiny 256-1536 px, paper 128-512 px): 1.05-1.5x of it.

    Held through the step: condition (x_con and pyramid), sampler state and the UNet
    skips. On top, the largest transient: a decoder residual block, an implicit up-step
    (hidden width at the finer level's resolution) or an attention level's copies of
    its input. All of it grows linearly with the pixel count.
    """
    ch, n = cfg.channels, _level_pixels(cfg, size)
    held = 3 * n[0] * 6 + sum(c * p for c, p in zip(ch, n))  # x_con, x_t, x0, eps..; pyramid
    held += ch[0] * n[0] + sum(cfg.res_blocks * c * p for c, p in zip(ch, n))  # skips
    held += sum(c * p for c, p in zip(ch[:-1], n[1:]))  # down-sampled skips
    blocks = [6 * (2 * c) * p for c, p in zip(ch, n)]  # residual block on a concat input
    blocks += [(3 * ch[i + 1] + 8 + 2 * cfg.implicit_hidden) * n[i] for i in range(len(ch) - 1)]
    levels = list(cfg.attention_levels) + ([len(ch) - 1] if cfg.mid_attention else [])
    blocks += [ATTENTION_COPIES * ch[i] * n[i] for i in levels]
    activations = ACTIVATION_SLACK * (held + max(blocks))
    return RUNTIME_BYTES + 4 * (_param_count(cfg) + math.ceil(batch * activations))


def check_memory(cfg: ModelConfig, size: tuple[int, int], *, max_bytes: int, batch: int = 1) -> None:
    """Raise ValueError if an untiled run at `size` is estimated to exceed `max_bytes`."""
    need = estimate_peak_bytes(cfg, size, batch=batch)
    if need > max_bytes:
        raise ValueError(f"an untiled {size[0]}x{size[1]} output (batch {batch}) needs an estimated "
                         f"{need / 2**30:.2f} GiB, above the bound of {max_bytes / 2**30:.2f} GiB; "
                         f"enable tiling (idm.tiling.choose_tile gives a tile size that fits)")


def largest_input(lr_len: int, hr_len: int, *, tile: int, overlap: int, context: int = 0, align: int = 1) -> int:
    """The most HR pixels along one axis that any tile's network input (`input_span`) covers."""
    plan = plan_inputs(lr_len, hr_len, tile=tile, overlap=overlap, context=context, align=align)
    return max(R1 - R0 for _, _, _, R0, R1 in plan)


# float32 values per output pixel (batch 1) that a tiled run holds for the whole image.
# "tile": x_T, the weighted sum, the weight sum, the result and their transient copies,
# measured at 512 -> 2048 px. "image": the sampler's state on the whole image as well
# (x_t, x0, eps, the blended prediction and the sampler's temporaries), counted, not
# measured (a 512 -> 2048 px run takes hours in that mode).
WHOLE_IMAGE_FLOATS = {"tile": 16, "image": 24}


def estimate_tiled_peak_bytes(cfg: ModelConfig, lr_size: tuple[int, int], size: tuple[int, int], *,
                              tile: int, overlap: int = 0, context: int = 0, batch: int = 1,
                              norm: str = "tile") -> int:
    """Estimated peak memory (bytes) of `tiled_super_resolve` with square `tile`-px LR tiles,
    `overlap` LR px, `context` HR px and `norm`: one tile's run on the largest network
    input of the plan (`input_span`, aligned to the UNet's coarsest grid), plus the
    whole-image buffers the tiling holds (`WHOLE_IMAGE_FLOATS`)."""
    (h, w), (height, width), align = lr_size, size, cfg.unet_stride
    tile_size = (largest_input(h, height, tile=tile, overlap=overlap, context=context, align=align),
                 largest_input(w, width, tile=tile, overlap=overlap, context=context, align=align))
    return estimate_peak_bytes(cfg, tile_size, batch=batch) + 4 * WHOLE_IMAGE_FLOATS[norm] * batch * height * width


def choose_tile(cfg: ModelConfig, lr_size: tuple[int, int], size: tuple[int, int], *,
                max_bytes: int, overlap: int, context: int = 0, batch: int = 1, norm: str = "tile") -> int | None:
    """The largest square LR tile side whose tiled run (with `context` HR px, `norm`) fits in
    `max_bytes`; None if the whole image fits untiled. Raises ValueError if not even a
    tile of overlap + 1 px fits.

    The largest tile wastes least work on overlaps and context, but attention's compute
    grows with the square of a tile's pixels, so a smaller tile can be faster at large sizes.
    """
    if estimate_peak_bytes(cfg, size, batch=batch) <= max_bytes:
        return None
    for tile in range(max(lr_size) - 1, overlap, -1):
        if estimate_tiled_peak_bytes(cfg, lr_size, size, tile=tile, overlap=overlap, context=context,
                                     batch=batch, norm=norm) <= max_bytes:
            return tile
    raise ValueError(f"no tile larger than the overlap ({overlap} px) fits in "
                     f"{max_bytes / 2**30:.2f} GiB for a {size[0]}x{size[1]} output")
