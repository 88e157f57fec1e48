"""IDM: the LR condition, computed once per image, and the denoiser that consumes it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from idm.config import ModelConfig
from idm.diffusion.prediction import to_eps
from idm.models.encoder import ConditionPyramid, LREncoder, Window
from idm.models.modulation import scale_code
from idm.models.unet import UNet


@dataclass(frozen=True)
class Condition:
    """Everything the denoiser needs from the LR image, for a target size (H, W).

    x_con: (B, 3, H, W) image-like condition. pyramid: one LR feature map per UNet
    level on the UNet's canvas (`ModelConfig.canvas`), pyramid[i] (B, C_i, H' / 2**i, W' / 2**i).
    code: (B,) scale codes (`scale_code`). All on the LR image's device.
    """

    x_con: Tensor
    pyramid: list[Tensor]
    code: Tensor

    @property
    def size(self) -> tuple[int, int]:
        """Target (H, W)."""
        return tuple(self.x_con.shape[-2:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return self.x_con.shape[0]


class IDM(nn.Module):
    """Implicit Diffusion Model for continuous-scale super-resolution.

    cond = model.condition(lr, (H, W)) once per image; then eps = model(x_t, gamma, cond)
    at every denoising step.

    The UNet runs on a canvas whose sides are multiples of its coarsest stride
    (`ModelConfig.canvas`, `to_canvas`): the image, edge pixels repeated to the right and
    below, and its output is cropped back. On any other size the UNet's levels would
    drift apart by up to half a coarse pixel, by an amount that depends on the image's
    size, so a tile (idm.inference.tiling) would see the picture differently from the
    whole image (docs/decisions.md, "The UNet canvas (multiples of the coarsest stride)").
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = LREncoder(channels=cfg.encoder_channels, blocks=cfg.encoder_blocks,
                                 decoder_hidden=cfg.decoder_hidden)
        self.pyramid = ConditionPyramid(cfg.channels)
        self.unet = UNet(cfg)

    def condition(self, lr: Tensor, size: tuple[int, int], window: Window | None = None, *,
                  features: Tensor | None = None) -> Condition:
        """LR image (B, 3, h, w) in [-1, 1] and target size (H, W) -> Condition.

        With `window` = (top, left, height, width), the condition of that crop of the
        (H, W) output only (training's denoiser works on crops: TrainConfig.unet_patch).
        `features`: the encoder's `features(lr)`, when the caller has them already.
        """
        if lr.dim() != 4 or lr.shape[1] != 3:
            raise ValueError(f"lr must be (B, 3, h, w), got {tuple(lr.shape)}")
        height, width = (int(s) for s in size)
        if height < 1 or width < 1:
            raise ValueError(f"target size must be at least 1x1, got {height}x{width}")
        x_con = self.encoder(lr, (height, width), window, features)
        code = torch.full((lr.shape[0],), scale_code(lr.shape[-2:], (height, width)),
                          device=lr.device, dtype=lr.dtype)
        return Condition(x_con, self.pyramid(self.to_canvas(x_con)), code)

    def to_canvas(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) with its last row and column repeated out to the UNet's canvas
        (`ModelConfig.canvas`)."""
        height, width = self.cfg.canvas(x.shape[-2:])
        if (height, width) == tuple(x.shape[-2:]):
            return x
        return F.pad(x, (0, width - x.shape[-1], 0, height - x.shape[-2]), mode="replicate")

    def unet_input(self, x_t: Tensor, cond: Condition) -> Tensor:
        """The UNet's input for x_t (B, 3, H, W): [x_con, x_t] on the canvas, (B, 6, H', W')."""
        return self.to_canvas(torch.cat([cond.x_con, x_t], dim=1))

    def forward(self, x_t: Tensor, noise_level: Tensor, cond: Condition, *, raw: bool = False) -> Tensor:
        """Predict the noise: x_t (B, 3, H, W), noise_level (B,) = sqrt(alpha_bar) -> (B, 3, H, W).

        The network itself predicts `cfg.prediction` (eps, x0 or v; idm.diffusion.prediction);
        forward converts that to the noise so every sampler sees one contract. With
        raw=True it returns the network's own output (the training loss uses it).
        """
        if x_t.shape[0] != len(cond) or tuple(x_t.shape[-2:]) != cond.size:
            raise ValueError(f"x_t {tuple(x_t.shape)} does not match the condition: "
                             f"batch {len(cond)}, size {cond.size}")
        if noise_level.shape != (x_t.shape[0],):
            raise ValueError(f"noise_level must be (B,) = ({x_t.shape[0]},), got {tuple(noise_level.shape)}")
        out = self.unet(self.unet_input(x_t, cond), noise_level, cond.pyramid, cond.code)
        out = out[..., :x_t.shape[-2], :x_t.shape[-1]]
        if raw or self.cfg.prediction == "eps":
            return out
        return to_eps(self.cfg.prediction, out, x_t, noise_level[:, None, None, None])
