"""Super-resolution methods behind one interface: (LR image, target size) -> SR image.

Evaluation, the report and the CLI only see `Method`; bicubic is the baseline, and
`DiffusionSR` (an IDM checkpoint, fp32 or int8) plugs in by satisfying the same protocol.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from torch import nn

from idm.checkpoint import build_model, load_checkpoint
from idm.config import SAMPLE_PRESETS, ConfigError, DiffusionConfig, SampleConfig, default_preset
from idm.diffusion.sampling import spaced_timesteps, super_resolve
from idm.diffusion.schedule import schedule_for
from idm.diffusion.targets import decoder
from idm.inference.memory import choose_tile, untiled_peak_bytes
from idm.inference.tiling import tiled_apply, tiled_super_resolve
from idm.resize import resize_uint8, to_model_range, to_uint8, to_uint16


class Method(Protocol):
    """Maps an (h, w, 3) uint8 LR image to an (H, W, 3) uint8 image of `size` = (H, W)."""

    name: str

    def __call__(self, lr: np.ndarray, size: tuple[int, int]) -> np.ndarray: ...


class Bicubic:
    """Bicubic interpolation with the project's one resize function (idm.resize)."""

    name = "bicubic"

    def __call__(self, lr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        return resize_uint8(lr, size)


class DiffusionSR:
    """An IDM network as a Method: condition once per image, then the sampler `sample` describes.

    The initial noise comes from a generator seeded with `sample.seed` for every image,
    so outputs are reproducible image by image whatever the evaluation order. An output
    whose untiled run would exceed `sample.max_memory_gb` (idm.inference.memory) is made
    tile by tile (idm.inference.tiling). `diffusion` gives the noise schedule the model
    was trained with; `target` and `residual_scale` what its diffusion denoises
    (idm.diffusion.targets). With `sample.steps` = 0 the output is the encoder's regression
    estimate x_con, with no diffusion: only for a model whose x_con was trained as one
    (`regression`, TrainConfig.condition_loss > 0). Assigning `sample` re-spaces the steps;
    ConfigError if it asks for more steps than the model's schedule has, or for 0 steps
    of a model without a regression output.
    """

    def __init__(self, model: nn.Module, *, diffusion: DiffusionConfig, target: str = "image",
                 residual_scale: float = 1.0, sample: SampleConfig = SampleConfig(),
                 device: torch.device | str = "cpu", name: str = "idm", regression: bool = False) -> None:
        self.device = torch.device(device)
        # channels-last on CPU: oneDNN's convolutions skip a layout reorder per call; measured 1.1-1.6x
        # faster end to end on AVX2 for both outputs (bench/README.md, "Inference scaling")
        layout = torch.channels_last if self.device.type == "cpu" else torch.contiguous_format
        self.model = model.to(device, memory_format=layout).eval()
        self.schedule, self.clip_x0 = schedule_for(diffusion), diffusion.clip_x0
        self.decode = decoder(target, residual_scale)
        self.name, self.regression = name, regression
        self.sample = sample

    @property
    def sample(self) -> SampleConfig:
        """The sampling settings (validated by SampleConfig)."""
        return self._sample

    @sample.setter
    def sample(self, sample: SampleConfig) -> None:
        total = self.schedule.timesteps
        if sample.steps > total:
            raise ConfigError("steps", f"an integer in [{0 if self.regression else 1}, {total}] (the model's "
                              "diffusion timesteps)", sample.steps)
        if sample.steps == 0 and not self.regression:
            raise ConfigError("steps", "an integer >= 1: this model's x_con was not trained as a regression "
                              "(condition_loss 0), so it has no regression output", sample.steps)
        self.timesteps = spaced_timesteps(total, sample.steps, sample.spacing) if sample.steps else []
        self._sample = sample

    @classmethod
    def from_checkpoint(cls, path: str | Path, sample: SampleConfig | None = None, *,
                        device: torch.device | str = "cpu", name: str = "idm") -> DiffusionSR:
        """Rebuild the EMA model a checkpoint describes, with its own schedule and target.

        `sample` None: the model's default (`use_default_sample`)."""
        ckpt = load_checkpoint(path)
        train = ckpt["train_config"]
        regression = train.get("condition_loss", 0.0) > 0
        return cls(build_model(ckpt, use_ema=True), diffusion=DiffusionConfig(**ckpt["diffusion_config"]),
                   target=train["target"], residual_scale=train["residual_scale"],
                   sample=sample or SampleConfig(**SAMPLE_PRESETS[default_preset(regression)]),
                   device=device, name=name, regression=regression)

    def use_default_sample(self) -> DiffusionSR:
        """Sample with this model's default preset (idm.config.default_preset: the regression output
        when the model has one), keeping the other settings (seed, tiling, threads)."""
        self.sample = replace(self.sample, **SAMPLE_PRESETS[default_preset(self.regression)])
        return self

    def __call__(self, lr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        return self.upscale(lr, size, self.tile_for(lr.shape[:2], size))

    @torch.inference_mode()
    def upscale(self, lr: np.ndarray, size: tuple[int, int], tile: int | None) -> np.ndarray:
        """`__call__` with the tile given: `tile_for`'s choice (None: in one piece), so a
        caller that reports how the image was split reports what ran. A uint16 `lr` (16-bit
        file) is used at full precision and gives a uint16 output."""
        x_lr = to_model_range(lr, self.device)
        generator = torch.Generator(self.device).manual_seed(self.sample.seed)
        out = to_uint16 if lr.dtype == np.uint16 else to_uint8
        if not self.sample.steps:
            return out(self._regression(x_lr, size, tile))
        if tile is None:
            image = super_resolve(self.model, x_lr, size, self.timesteps, schedule=self.schedule, sample=self.sample,
                                  clip_x0=self.clip_x0, decode=self.decode, generator=generator)
        else:
            image = tiled_super_resolve(self.model, x_lr, size, self.timesteps, schedule=self.schedule,
                                        sample=self.sample, tile=tile, clip_x0=self.clip_x0, decode=self.decode,
                                        generator=generator)
        return out(image)

    def _regression(self, x_lr: torch.Tensor, size: tuple[int, int], tile: int | None) -> torch.Tensor:
        """x_con, the encoder's regression estimate: (1, 3, h, w) -> (1, 3, H, W) in [-1, 1]."""
        encoder = self.model.encoder
        if tile is None:
            return encoder(x_lr, size).clamp(-1, 1)
        s = self.sample
        return tiled_apply(lambda lr_tile, tile_size: encoder(lr_tile, tile_size), x_lr, size, tile=tile,
                           overlap=s.tile_overlap, context=s.tile_context).clamp(-1, 1)

    def tile_for(self, lr_size: tuple[int, int], size: tuple[int, int]) -> int | None:
        """The square LR tile side an (h, w) -> `size` upscale runs in (`choose_tile` under
        the sample's memory bound), or None when it runs in one piece."""
        s = self.sample
        return choose_tile(self.model.cfg, tuple(lr_size), tuple(size), max_bytes=s.max_bytes,
                           overlap=s.tile_overlap, context=s.tile_context, norm=s.tile_norm,
                           regression=not s.steps)

    def peak_bytes(self, lr_size: tuple[int, int], size: tuple[int, int]) -> int:
        """Estimated peak memory (bytes) of an (h, w) -> `size` upscale in one piece
        (idm.inference.memory; the regression output's own estimate with `steps` 0)."""
        return untiled_peak_bytes(self.model.cfg, tuple(size), lr_size=tuple(lr_size),
                                  regression=not self.sample.steps)

    def use_int8(self, path: str | Path) -> DiffusionSR:
        """Swap in the int8 denoiser saved at `path` (idm.inference.quantize); int8 kernels run on CPU only."""
        from idm.inference.quantize import load_quantized

        self.model, self.device = load_quantized(path), torch.device("cpu")
        return self


def upscale_channels(upscale_rgb: Callable[[np.ndarray], np.ndarray], image: np.ndarray,
                     size: tuple[int, int]) -> np.ndarray:
    """Upscale an (h, w) grey, (h, w, 3) RGB or (h, w, 4) RGBA uint8 (or uint16) image to `size`
    = (H, W), keeping its channels and dtype: colour by `upscale_rgb` ((h, w, 3) -> (H, W, 3)), alpha by
    bicubic (the models are trained on colour only), grey as RGB and back (the channel mean).
    ValueError for any other shape."""
    if image.ndim == 2:
        rgb = upscale_rgb(np.ascontiguousarray(np.repeat(image[..., None], 3, axis=2)))
        return np.round(rgb.mean(axis=2)).astype(image.dtype)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"expected an (h, w), (h, w, 3) or (h, w, 4) image, got shape {tuple(image.shape)}")
    out = upscale_rgb(np.ascontiguousarray(image[..., :3]))
    if image.shape[2] == 4:
        alpha = resize_uint8(np.repeat(image[..., 3:], 3, axis=2), size)[..., :1]
        out = np.concatenate([out, alpha], axis=2)
    return out
