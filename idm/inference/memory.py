"""Peak-memory estimates of a run, untiled or tiled, and the tile that fits a bound.

`estimate_peak_bytes` predicts the peak memory of an untiled run from the model config
and output size; it grows linearly with the pixel count (self-attention runs in SDPA's
blocked kernel, idm.models.layers.SelfAttention). The constants are calibrated against
measured peak RSS (`python -m bench.tiled_memory`; docs/decisions.md, "Memory estimate
constants").
"""

from __future__ import annotations

import functools
import math

import torch

from idm.config import ModelConfig
from idm.inference.tiling import largest_input, plan_inputs, tile_starts
from idm.models import IDM

# Bytes that Python and torch hold before the model runs.
RUNTIME_BYTES = 768 * 2**20
# C x N float tensors self-attention holds at once (q, k, v, the output, its transpose).
ATTENTION_COPIES = 5
# Factor on the counted activations for the temporaries the count leaves out and allocator slack.
ACTIVATION_SLACK = 1.5


def _level_pixels(cfg: ModelConfig, size: tuple[int, int]) -> list[int]:
    """Pixels of each UNet level on its canvas (`ModelConfig.canvas`)."""
    height, width = cfg.canvas(size)
    return [(height >> i) * (width >> i) for i in range(len(cfg.channels))]


@functools.lru_cache(maxsize=8)
def _param_count(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in IDM(cfg).parameters())


def estimate_peak_bytes(cfg: ModelConfig, size: tuple[int, int], *, batch: int = 1,
                        lr_size: tuple[int, int] | None = None) -> int:
    """Estimated peak memory (bytes, float32, whole process) of one untiled run of a
    `cfg` model at output size (H, W): runtime + weights + what a denoising step keeps
    alive at once. Calibrated to stay above the measured peak RSS (docs/decisions.md,
    "Memory estimate constants").

    Held through the step: condition (x_con and pyramid), sampler state and the UNet
    skips. On top, the largest transient: a decoder residual block, an implicit up-step
    (hidden width at the finer level's resolution) or an attention level's copies of
    its input. With `lr_size` (h, w), the LR input and the LR encoder's features count too
    (held, and a transient while the condition is computed): they matter when the input
    is large against the output. All of it grows linearly with the pixel count.
    """
    ch, n = cfg.channels, _level_pixels(cfg, size)
    held = 3 * n[0] * 6 + sum(c * p for c, p in zip(ch, n))  # x_con, x_t, x0, eps..; pyramid
    held += ch[0] * n[0] + sum(cfg.res_blocks * c * p for c, p in zip(ch, n))  # skips
    held += sum(c * p for c, p in zip(ch[:-1], n[1:]))  # down-sampled skips
    blocks = [6 * (2 * c) * p for c, p in zip(ch, n)]  # residual block on a concat input
    blocks += [(3 * ch[i + 1] + 8 + 2 * cfg.implicit_hidden) * n[i] for i in range(len(ch) - 1)]
    levels = list(cfg.attention_levels) + ([len(ch) - 1] if cfg.mid_attention else [])
    blocks += [ATTENTION_COPIES * ch[i] * n[i] for i in levels]
    if lr_size is not None:
        lr_pixels = int(lr_size[0]) * int(lr_size[1])
        held += 3 * lr_pixels  # the LR image
        decoder = cfg.encoder_channels + 6 + (3 + 2 * cfg.decoder_hidden if cfg.decoder_hidden else 0)
        blocks.append(3 * cfg.encoder_channels * lr_pixels + decoder * n[0])  # LR encoder and x_con decoder
    activations = ACTIVATION_SLACK * (held + max(blocks))
    return RUNTIME_BYTES + 4 * (_param_count(cfg) + math.ceil(batch * activations))


# An x_con-only run peaks either in the LR encoder (ENCODER_MAPS encoder-width float32 maps per LR
# pixel: features, a block's input and its two conv outputs) or in the decoder (the features and
# the first layer's output at LR, REGRESSION_HR_FLOATS float32 values per output pixel: bicubic
# base, output, the clamped copy, the uint8 conversion); REGRESSION_SLACK covers the rest.
ENCODER_MAPS = 4
REGRESSION_HR_FLOATS = 9
REGRESSION_SLACK = 1.2


def estimate_regression_peak_bytes(cfg: ModelConfig, lr_size: tuple[int, int], size: tuple[int, int], *,
                                   batch: int = 1) -> int:
    """Estimated peak memory (bytes, float32, whole process) of x_con alone (`steps` 0) for an
    (h, w) -> (H, W) upscale: runtime + weights + the larger of the LR encoder's maps and the
    decoder's (its LR inputs and the output-sized buffers). The MLP decoder works in bands of
    rows and holds no full-size hidden map (LREncoder._decode_rows); the nearest+conv decoder
    holds the nearest features at full size. Calibrated against peak RSS (bench/README.md,
    "Inference scaling").
    """
    lr_pixels, hr_pixels = int(lr_size[0]) * int(lr_size[1]), int(size[0]) * int(size[1])
    channels = cfg.encoder_channels
    encoder = (3 + ENCODER_MAPS * channels) * lr_pixels
    decoder = (3 + channels + cfg.decoder_hidden) * lr_pixels + REGRESSION_HR_FLOATS * hr_pixels
    if not cfg.decoder_hidden:
        decoder += 2 * channels * hr_pixels
    return RUNTIME_BYTES + 4 * (_param_count(cfg) + math.ceil(batch * REGRESSION_SLACK * max(encoder, decoder)))


def untiled_peak_bytes(cfg: ModelConfig, size: tuple[int, int], *, batch: int = 1,
                       lr_size: tuple[int, int] | None = None, regression: bool = False) -> int:
    """`estimate_peak_bytes`, or with `regression` (x_con alone, which needs `lr_size`)
    `estimate_regression_peak_bytes`; ValueError if `regression` comes without `lr_size`."""
    if not regression:
        return estimate_peak_bytes(cfg, size, batch=batch, lr_size=lr_size)
    if lr_size is None:
        raise ValueError("the regression output's memory estimate needs lr_size")
    return estimate_regression_peak_bytes(cfg, lr_size, size, batch=batch)


def check_memory(cfg: ModelConfig, size: tuple[int, int], *, max_bytes: int, batch: int = 1,
                 lr_size: tuple[int, int] | None = None, regression: bool = False) -> None:
    """Raise ValueError if an untiled run at `size` (from `lr_size`; x_con alone with
    `regression`) is estimated to exceed `max_bytes`."""
    need = untiled_peak_bytes(cfg, size, batch=batch, lr_size=lr_size, regression=regression)
    if need > max_bytes:
        raise ValueError(f"an untiled {size[0]}x{size[1]} output (batch {batch}) needs an estimated "
                         f"{need / 2**30:.2f} GiB, above the bound of {max_bytes / 2**30:.2f} GiB; "
                         f"enable tiling (idm.inference.tiling.choose_tile gives a tile size that fits)")


# float32 values per output pixel (batch 1) that a tiled run holds for the whole image, by `norm`.
WHOLE_IMAGE_FLOATS = {"tile": 16, "image": 24}


def estimate_tiled_peak_bytes(cfg: ModelConfig, lr_size: tuple[int, int], size: tuple[int, int], *,
                              tile: int, overlap: int = 0, context: int = 0, batch: int = 1,
                              norm: str = "tile", regression: bool = False) -> int:
    """Estimated peak memory (bytes) of `tiled_super_resolve` (of x_con alone with `regression`)
    with square `tile`-px LR tiles, `overlap` LR px, `context` HR px and `norm`: one tile's run
    on the largest network input of the plan (`input_span`, aligned to the UNet's coarsest
    grid), plus the whole-image buffers the tiling holds (`WHOLE_IMAGE_FLOATS`)."""
    (h, w), (height, width), align = lr_size, size, cfg.tile_align
    tile_size = (largest_input(h, height, tile=tile, overlap=overlap, context=context, align=align),
                 largest_input(w, width, tile=tile, overlap=overlap, context=context, align=align))
    lr_tile = tuple(-(-t * lr // hr) for t, lr, hr in zip(tile_size, (h, w), (height, width)))
    return (untiled_peak_bytes(cfg, tile_size, batch=batch, lr_size=lr_tile, regression=regression)
            + 4 * WHOLE_IMAGE_FLOATS[norm] * batch * height * width)


def tiled_work(cfg: ModelConfig, lr_size: tuple[int, int], size: tuple[int, int], *, tile: int, overlap: int,
               context: int = 0) -> int:
    """HR pixels the network computes in a tiled run: the summed areas of every tile's input
    (`input_span`, aligned to the UNet's coarsest grid). With bounded attention a run's time
    is proportional to it (bench/README.md, "Tile size: least work")."""
    sums = [sum(r1 - r0 for *_, r0, r1 in plan_inputs(n, big, tile=tile, overlap=overlap, context=context,
                                                      align=cfg.tile_align))
            for n, big in zip(lr_size, size)]
    return sums[0] * sums[1]


def choose_tile(cfg: ModelConfig, lr_size: tuple[int, int], size: tuple[int, int], *,
                max_bytes: int, overlap: int, context: int = 0, batch: int = 1, norm: str = "tile",
                regression: bool = False) -> int | None:
    """The fastest square LR tile side whose tiled run (with `context` HR px, `norm`; x_con
    alone with `regression`) fits in `max_bytes`; None if the whole image fits untiled. Raises
    ValueError if not even a tile of overlap + 1 px fits.

    Fastest is least `tiled_work`: the largest tile that fits can take more work than a smaller
    one, when its tiles overlap by most of their width (docs/decisions.md, "Tile size: least
    work"). The candidates are that largest tile and, for each of the next few tile counts
    per axis, the smallest tile that covers the axis in that many.
    """
    if untiled_peak_bytes(cfg, size, batch=batch, lr_size=lr_size, regression=regression) <= max_bytes:
        return None
    largest = next((tile for tile in range(max(lr_size) - 1, overlap, -1)
                    if estimate_tiled_peak_bytes(cfg, lr_size, size, tile=tile, overlap=overlap, context=context,
                                                 batch=batch, norm=norm, regression=regression) <= max_bytes), None)
    if largest is None:
        raise ValueError(f"no tile larger than the overlap ({overlap} px) fits in "
                         f"{max_bytes / 2**30:.2f} GiB for a {size[0]}x{size[1]} output")
    candidates = {largest}
    for length in lr_size:
        fewest = len(tile_starts(length, largest, overlap))
        for count in range(fewest, fewest + 4):
            tile = -(-(length + (count - 1) * overlap) // count)  # the smallest that covers `length` in `count` tiles
            if overlap < tile <= largest:
                candidates.add(tile)
    return min(candidates, key=lambda tile: (tiled_work(cfg, lr_size, size, tile=tile, overlap=overlap,
                                                        context=context), -tile))
