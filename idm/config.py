"""Configuration of the IDM network and of its diffusion process.

Frozen dataclasses, checked on construction, so a bad value fails where it is
written, with a message that names the field and what it accepts. Checkpoints store
`dataclasses.asdict(cfg)` and rebuild with `ModelConfig(**d)`; sequences may come
back as lists (YAML, JSON) and are turned into tuples again.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from idm.diffusion import LOSSES, SCHEDULES
from idm.prediction import PREDICTIONS


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _int_tuple(name: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name} must be a sequence of integers, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class ModelConfig:
    """Every architectural knob of IDM; the defaults are the paper's (~100M params).

    Level i of the UNet works at H' / 2**i x W' / 2**i (H', W': the output size
    rounded up to a multiple of `unet_stride`: `canvas`) with
    base_channels * channel_mults[i] channels; the decoder has res_blocks + 1 residual
    blocks per level (as SR3) and one LR feature map per level.
    """

    encoder_blocks: int = 16  # EDSR-baseline residual blocks
    encoder_channels: int = 64
    base_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 4, 8, 8)
    res_blocks: int = 2  # per encoder level; the decoder has one more
    attention_levels: tuple[int, ...] = (3,)  # level 3 = 1/8 resolution
    mid_attention: bool = True
    dropout: float = 0.2
    norm_groups: int = 32
    implicit_hidden: int = 256  # hidden width of the coordinate MLP of each up-step
    modulation_hidden: int = 64  # hidden width of the scale -> (s1, s2) maps
    prediction: str = "eps"  # what the denoiser outputs: eps (paper) | x0 | v (idm.prediction)

    def __post_init__(self) -> None:
        mults = _int_tuple("channel_mults", self.channel_mults)
        attention = _int_tuple("attention_levels", self.attention_levels)
        object.__setattr__(self, "channel_mults", mults)
        object.__setattr__(self, "attention_levels", attention)
        _check_int("encoder_blocks", self.encoder_blocks, 0)
        for name in ("encoder_channels", "base_channels", "res_blocks", "norm_groups",
                     "implicit_hidden", "modulation_hidden"):
            _check_int(name, getattr(self, name), 1)
        if not mults:
            raise ValueError("channel_mults must list at least one level, got ()")
        for m in mults:
            _check_int("every channel_mults entry", m, 1)
        levels = range(len(mults))
        if any(isinstance(a, bool) or a not in levels for a in attention):
            raise ValueError(f"attention_levels must be level indices in {list(levels)} "
                             f"(one per channel_mults entry), got {list(attention)}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r}; expected one of {list(PREDICTIONS)}")
        if not isinstance(self.mid_attention, bool):
            raise ValueError(f"mid_attention must be True or False, got {self.mid_attention!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        for m in mults:
            if self.base_channels * m % self.norm_groups:
                raise ValueError(
                    f"norm_groups={self.norm_groups} must divide every level's channel count "
                    f"base_channels * channel_mults = {[self.base_channels * k for k in mults]}")

    @property
    def channels(self) -> tuple[int, ...]:
        """Channel count of each UNet level."""
        return tuple(self.base_channels * m for m in self.channel_mults)

    @property
    def unet_stride(self) -> int:
        """How many times smaller the UNet's coarsest level is than its finest: the levels
        halve the size len(channel_mults) - 1 times. The UNet works on sides that are
        multiples of it (`canvas`)."""
        return 2 ** (len(self.channel_mults) - 1)

    def canvas(self, size: tuple[int, int]) -> tuple[int, int]:
        """The UNet's working size for a target (H, W): each side rounded up to a multiple
        of `unet_stride`, so every level halves the one above exactly (`IDM.to_canvas`)."""
        stride = self.unet_stride
        return tuple(-(-int(n) // stride) * stride for n in size)  # type: ignore[return-value]


@dataclass(frozen=True)
class DiffusionConfig:
    """The noise process: beta schedule, number of steps, training loss, x0 clipping.

    beta_start and beta_end are used by the linear schedule only (paper: 1e-6 -> 1e-2
    over T = 2000); the cosine schedule (Nichol & Dhariwal 2021) fixes its own range.
    """

    schedule: str = "linear"
    timesteps: int = 2000
    beta_start: float = 1e-6
    beta_end: float = 1e-2
    loss: str = "l1"
    clip_x0: bool = True

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; expected one of {sorted(SCHEDULES)}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; expected one of {sorted(LOSSES)}")
        _check_int("timesteps", self.timesteps, 1)
        for name in ("beta_start", "beta_end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
        if self.beta_start > self.beta_end:
            raise ValueError(f"beta_start must be <= beta_end, got {self.beta_start} > {self.beta_end}")
        if not isinstance(self.clip_x0, bool):
            raise ValueError(f"clip_x0 must be True or False, got {self.clip_x0!r}")


MODEL_PRESETS: dict[str, ModelConfig] = {
    # Paper size (IDM / SR3 faces): EDSR 16x64, UNet 64 x [1, 2, 4, 8, 8].
    "paper": ModelConfig(),
    # Trains a few thousand steps on 2 CPU cores in minutes (48-64 px patches, batch 8).
    "tiny": replace(
        ModelConfig(),
        encoder_blocks=2,
        encoder_channels=16,
        base_channels=16,
        channel_mults=(1, 2, 2),
        res_blocks=1,
        attention_levels=(2,),
        mid_attention=True,
        dropout=0.0,
        norm_groups=8,
        implicit_hidden=32,
        modulation_hidden=16,
    ),
}
