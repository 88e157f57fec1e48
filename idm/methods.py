"""Super-resolution methods behind one interface: (LR image, target size) -> SR image.

Evaluation, the report and the CLI only see `Method`; bicubic is the baseline, and
model-backed methods (an IDM checkpoint, a registered model, the int8 model) plug in
by satisfying the same protocol.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from idm.checkpoint import build_model, load_checkpoint
from idm.config import DiffusionConfig
from idm.diffusion import Schedule, make_schedule
from idm.models import Condition
from idm.resize import resize_uint8
from idm.sampling import SAMPLERS, check_temperature, spaced_timesteps, super_resolve
from idm.targets import decode
from idm.tiling import TILE_NORMS, choose_tile, tiled_super_resolve


class Method(Protocol):
    """Maps an (h, w, 3) uint8 LR image to an (H, W, 3) uint8 image of `size` = (H, W)."""

    name: str

    def __call__(self, lr: np.ndarray, size: tuple[int, int]) -> np.ndarray: ...


class Bicubic:
    """Bicubic interpolation with the project's one resize function (idm.resize)."""

    name = "bicubic"

    def __call__(self, lr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        return resize_uint8(lr, size)


def to_model_range(img: np.ndarray, device: torch.device | str) -> Tensor:
    """(h, w, 3) uint8 in [0, 255] -> (1, 3, h, w) float in [-1, 1] on `device`."""
    x = torch.from_numpy(np.ascontiguousarray(img)).to(device).permute(2, 0, 1).unsqueeze(0).float()
    return x / 127.5 - 1.0


def to_uint8(x: Tensor) -> np.ndarray:
    """(1, 3, H, W) float in [-1, 1] -> (H, W, 3) uint8, rounded like a saved image."""
    y = ((x[0].clamp(-1, 1) + 1.0) * 127.5).round_().to(torch.uint8)
    return y.permute(1, 2, 0).cpu().numpy()


class DiffusionSR:
    """An IDM network as a Method: condition once per image, then a few-step sampler.

    The initial noise comes from a generator seeded with `seed` for every image, so
    outputs are reproducible image by image whatever the evaluation order. With
    `max_bytes`, an output whose untiled run would exceed that memory estimate is made
    tile by tile (idm.tiling), with `overlap` LR pixels between tiles and `context` HR
    pixels of extra input around each (idm.tiling.input_span). `temperature`
    scales the initial noise (idm.sampling.super_resolve).
    """

    def __init__(self, model: nn.Module, *, schedule: Schedule, timesteps: Sequence[int], sampler: str = "ddim",
                 eta: float = 0.0, target: str = "image", residual_scale: float = 1.0, clip_x0: bool = True,
                 seed: int = 0, device: torch.device | str = "cpu", name: str = "idm",
                 max_bytes: int | None = None, overlap: int = 8, context: int = 64,
                 temperature: float = 1.0, tile_norm: str = "tile") -> None:
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; expected one of {sorted(SAMPLERS)}")
        self.model = model.to(device).eval()
        self.schedule, self.timesteps = schedule, list(timesteps)
        self.sampler, self.eta, self.clip_x0 = SAMPLERS[sampler], eta, clip_x0
        self.target, self.residual_scale = target, residual_scale
        self.seed, self.device, self.name = seed, torch.device(device), name
        self.max_bytes, self.overlap, self.context = max_bytes, overlap, context  # max_bytes None: never tile
        if tile_norm not in TILE_NORMS:
            raise ValueError(f"unknown tile norm {tile_norm!r}; expected one of {list(TILE_NORMS)}")
        self.tile_norm = tile_norm
        check_temperature(temperature)
        self.temperature = temperature

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, steps: int, sampler: str = "ddim", eta: float = 0.0, seed: int = 0,
                        device: torch.device | str = "cpu", name: str = "idm", max_bytes: int | None = None,
                        overlap: int = 8, context: int = 64, temperature: float = 1.0,
                        spacing: str = "uniform", tile_norm: str = "tile") -> DiffusionSR:
        """Rebuild the EMA model a checkpoint describes, with its own schedule and target."""
        ckpt = load_checkpoint(path)
        diffusion = DiffusionConfig(**ckpt["diffusion_config"])
        train = ckpt["train_config"]
        schedule = make_schedule(diffusion.schedule, diffusion.timesteps,
                                 beta_start=diffusion.beta_start, beta_end=diffusion.beta_end)
        return cls(build_model(ckpt, use_ema=True), schedule=schedule,
                   timesteps=spaced_timesteps(diffusion.timesteps, min(steps, diffusion.timesteps), spacing),
                   sampler=sampler, eta=eta, target=train["target"], residual_scale=train["residual_scale"],
                   clip_x0=diffusion.clip_x0, seed=seed, device=device, name=name, max_bytes=max_bytes,
                   overlap=overlap, context=context, temperature=temperature, tile_norm=tile_norm)

    def __call__(self, lr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        return self.upscale(lr, size, self.tile_for(lr.shape[:2], size))

    @torch.inference_mode()
    def upscale(self, lr: np.ndarray, size: tuple[int, int], tile: int | None) -> np.ndarray:
        """`__call__` with the tile given: `tile_for`'s choice (None: in one piece), so a
        caller that reports how the image was split reports what ran."""
        x_lr = to_model_range(lr, self.device)
        generator = torch.Generator(self.device).manual_seed(self.seed)
        kwargs = dict(schedule=self.schedule, sampler=self.sampler, eta=self.eta, clip_x0=self.clip_x0,
                      temperature=self.temperature, decode=self._decode, generator=generator)
        if tile is None:
            image = super_resolve(self.model, x_lr, size, self.timesteps, **kwargs)
        else:
            image = tiled_super_resolve(self.model, x_lr, size, self.timesteps, tile=tile, overlap=self.overlap,
                                        context=self.context, norm=self.tile_norm, **kwargs)
        return to_uint8(image)

    def tile_for(self, lr_size: tuple[int, int], size: tuple[int, int]) -> int | None:
        """The square LR tile side an (h, w) -> `size` upscale runs in (`idm.tiling.choose_tile`
        under `max_bytes`), or None when it runs in one piece."""
        if self.max_bytes is None:
            return None
        return choose_tile(self.model.cfg, tuple(lr_size), tuple(size), max_bytes=self.max_bytes,
                           overlap=self.overlap, context=self.context, norm=self.tile_norm)

    def use_int8(self, path: str | Path) -> DiffusionSR:
        """Swap in the int8 denoiser saved at `path` (idm.quantize); int8 kernels run on CPU only."""
        from idm.quantize import load_quantized

        self.model, self.device = load_quantized(path), torch.device("cpu")
        return self

    def _decode(self, x0: Tensor, lr: Tensor, cond: Condition) -> Tensor:
        """The sampler's x0 as an image (the model's target may be a residual; idm.targets)."""
        return decode(x0, lr, tuple(x0.shape[-2:]), self.target, self.residual_scale, x_con=cond.x_con)
