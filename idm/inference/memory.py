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
from idm.inference.tiling import largest_input
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


def check_memory(cfg: ModelConfig, size: tuple[int, int], *, max_bytes: int, batch: int = 1,
                 lr_size: tuple[int, int] | None = None) -> None:
    """Raise ValueError if an untiled run at `size` (from `lr_size`) is estimated to exceed `max_bytes`."""
    need = estimate_peak_bytes(cfg, size, batch=batch, lr_size=lr_size)
    if need > max_bytes:
        raise ValueError(f"an untiled {size[0]}x{size[1]} output (batch {batch}) needs an estimated "
                         f"{need / 2**30:.2f} GiB, above the bound of {max_bytes / 2**30:.2f} GiB; "
                         f"enable tiling (idm.inference.tiling.choose_tile gives a tile size that fits)")


# float32 values per output pixel (batch 1) that a tiled run holds for the whole image, by `norm`.
WHOLE_IMAGE_FLOATS = {"tile": 16, "image": 24}


def estimate_tiled_peak_bytes(cfg: ModelConfig, lr_size: tuple[int, int], size: tuple[int, int], *,
                              tile: int, overlap: int = 0, context: int = 0, batch: int = 1,
                              norm: str = "tile") -> int:
    """Estimated peak memory (bytes) of `tiled_super_resolve` with square `tile`-px LR tiles,
    `overlap` LR px, `context` HR px and `norm`: one tile's run on the largest network
    input of the plan (`input_span`, aligned to the UNet's coarsest grid), plus the
    whole-image buffers the tiling holds (`WHOLE_IMAGE_FLOATS`)."""
    (h, w), (height, width), align = lr_size, size, cfg.tile_align
    tile_size = (largest_input(h, height, tile=tile, overlap=overlap, context=context, align=align),
                 largest_input(w, width, tile=tile, overlap=overlap, context=context, align=align))
    lr_tile = tuple(-(-t * lr // hr) for t, lr, hr in zip(tile_size, (h, w), (height, width)))
    return (estimate_peak_bytes(cfg, tile_size, batch=batch, lr_size=lr_tile)
            + 4 * WHOLE_IMAGE_FLOATS[norm] * batch * height * width)


def choose_tile(cfg: ModelConfig, lr_size: tuple[int, int], size: tuple[int, int], *,
                max_bytes: int, overlap: int, context: int = 0, batch: int = 1, norm: str = "tile") -> int | None:
    """The largest square LR tile side whose tiled run (with `context` HR px, `norm`) fits in
    `max_bytes`; None if the whole image fits untiled. Raises ValueError if not even a
    tile of overlap + 1 px fits.

    The largest tile wastes least work on overlaps and context, but attention's compute
    grows with the square of a tile's pixels, so a smaller tile can be faster at large sizes.
    """
    if estimate_peak_bytes(cfg, size, batch=batch, lr_size=lr_size) <= max_bytes:
        return None
    for tile in range(max(lr_size) - 1, overlap, -1):
        if estimate_tiled_peak_bytes(cfg, lr_size, size, tile=tile, overlap=overlap, context=context,
                                     batch=batch, norm=norm) <= max_bytes:
            return tile
    raise ValueError(f"no tile larger than the overlap ({overlap} px) fits in "
                     f"{max_bytes / 2**30:.2f} GiB for a {size[0]}x{size[1]} output")
