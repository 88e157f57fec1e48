"""IDM: the LR condition, computed once per image, and the denoiser that consumes it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from idm.config import ModelConfig
from idm.models.encoder import ConditionPyramid, LREncoder
from idm.models.modulation import scale_code
from idm.models.unet import UNet
from idm.prediction import to_eps


@dataclass(frozen=True)
class Condition:
    """Everything the denoiser needs from the LR image, for a target size (H, W).

    x_con: (B, 3, H, W) image-like condition. pyramid: one LR feature map per UNet
    level, pyramid[i] (B, C_i, ceil(H / 2**i), ceil(W / 2**i)). code: (B,) scale codes
    (`scale_code`). All on the LR image's device.
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

    def select(self, index: int | slice | Tensor) -> Condition:
        """The condition of a subset of the batch (an int keeps the batch dimension)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return Condition(self.x_con[index], [p[index] for p in self.pyramid], self.code[index])

    def repeat(self, n: int) -> Condition:
        """Each image's condition n times in a row: batch B -> B * n (e.g. n samples per image)."""
        return Condition(self.x_con.repeat_interleave(n, dim=0),
                         [p.repeat_interleave(n, dim=0) for p in self.pyramid],
                         self.code.repeat_interleave(n, dim=0))


class IDM(nn.Module):
    """Implicit Diffusion Model for continuous-scale super-resolution.

    cond = model.condition(lr, (H, W)) once per image; then eps = model(x_t, gamma, cond)
    at every denoising step.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = LREncoder(channels=cfg.encoder_channels, blocks=cfg.encoder_blocks)
        self.pyramid = ConditionPyramid(cfg.channels)
        self.unet = UNet(cfg)

    def condition(self, lr: Tensor, size: tuple[int, int]) -> Condition:
        """LR image (B, 3, h, w) in [-1, 1] and target size (H, W) -> Condition."""
        if lr.dim() != 4 or lr.shape[1] != 3:
            raise ValueError(f"lr must be (B, 3, h, w), got {tuple(lr.shape)}")
        height, width = (int(s) for s in size)
        if height < 1 or width < 1:
            raise ValueError(f"target size must be at least 1x1, got {height}x{width}")
        x_con = self.encoder(lr, (height, width))
        code = torch.full((lr.shape[0],), scale_code(lr.shape[-2:], (height, width)),
                          device=lr.device, dtype=lr.dtype)
        return Condition(x_con, self.pyramid(x_con), code)

    def forward(self, x_t: Tensor, noise_level: Tensor, cond: Condition, *, raw: bool = False) -> Tensor:
        """Predict the noise: x_t (B, 3, H, W), noise_level (B,) = sqrt(alpha_bar) -> (B, 3, H, W).

        The network itself predicts `cfg.prediction` (eps, x0 or v; idm.prediction);
        forward converts that to the noise so every sampler sees one contract. With
        raw=True it returns the network's own output (the training loss uses it).
        """
        if x_t.shape[0] != len(cond) or tuple(x_t.shape[-2:]) != cond.size:
            raise ValueError(f"x_t {tuple(x_t.shape)} does not match the condition: "
                             f"batch {len(cond)}, size {cond.size}")
        if noise_level.shape != (x_t.shape[0],):
            raise ValueError(f"noise_level must be (B,) = ({x_t.shape[0]},), got {tuple(noise_level.shape)}")
        out = self.unet(torch.cat([cond.x_con, x_t], dim=1), noise_level, cond.pyramid, cond.code)
        if raw or self.cfg.prediction == "eps":
            return out
        return to_eps(self.cfg.prediction, out, x_t, noise_level[:, None, None, None])
