"""Every configuration of the library, and the names each setting accepts.

A leaf module: it imports nothing from idm, so any module may depend on it. Frozen
dataclasses check their values on construction and fail with a message naming the
field and what it accepts. Checkpoints store `dataclasses.asdict(cfg)` and rebuild with
`ModelConfig(**d)`; sequences may come back as lists (YAML, JSON) and become tuples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

# The names each setting accepts; the modules that implement them key their tables by these.
SCHEDULES = ("cosine", "linear")  # idm.diffusion.schedule.BETAS
LOSSES = ("l1", "l2")  # idm.diffusion.loss.LOSS_FUNCTIONS
PREDICTIONS = ("eps", "x0", "v")  # idm.diffusion.prediction
TARGETS = ("image", "residual", "refine")  # idm.diffusion.targets
SAMPLERS = ("ddim", "ddpm")  # idm.diffusion.sampling.SAMPLER_FUNCTIONS
SPACINGS = ("uniform", "quadratic")  # idm.diffusion.sampling.spaced_timesteps
TILE_NORMS = ("tile", "image")  # GroupNorm statistics per tile, or the whole image's (idm.inference.image_norm)
DEVICES = ("auto", "cpu", "cuda")  # idm.device.resolve_device


class ConfigError(ValueError):
    """A setting has a value it does not accept; `field` names the setting."""

    def __init__(self, field: str, allowed: str, value: Any) -> None:
        super().__init__(f"{field} must be {allowed}, got {value!r}")
        self.field = field


def _check(ok: bool, field: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ConfigError(field, allowed, value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _int_tuple(name: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name} must be a sequence of integers, got {value!r}")
    return tuple(value)


def check_temperature(temperature: Any) -> None:
    """Raise ConfigError unless 0 <= temperature <= 1 (the scale of the initial noise)."""
    _check(_is_number(temperature) and 0 <= temperature <= 1, "temperature", "a number in [0, 1]", temperature)


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
    # Self-attention within windows of this many tokens per side (0: over the whole level).
    # 16 covers the paper's attention levels whole at its 128 px training size, and bounds
    # the cost per pixel at any larger size (idm.models.layers.SelfAttention).
    attention_window: int = 16
    dropout: float = 0.2
    norm_groups: int = 32
    implicit_hidden: int = 256  # hidden width of the coordinate MLP of each up-step
    modulation_hidden: int = 64  # hidden width of the scale -> (s1, s2) maps
    prediction: str = "eps"  # what the denoiser outputs: one of PREDICTIONS (idm.diffusion.prediction)
    # x_con from the LR features: 0 = nearest feature + one 3x3 conv; > 0 = bilinear features
    # and a per-pixel MLP of this hidden width, told the scale (idm.models.encoder.LREncoder).
    decoder_hidden: int = 0

    def __post_init__(self) -> None:
        mults = _int_tuple("channel_mults", self.channel_mults)
        attention = _int_tuple("attention_levels", self.attention_levels)
        object.__setattr__(self, "channel_mults", mults)
        object.__setattr__(self, "attention_levels", attention)
        _check_int("encoder_blocks", self.encoder_blocks, 0)
        _check_int("attention_window", self.attention_window, 0)
        _check_int("decoder_hidden", self.decoder_hidden, 0)
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
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
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

    @property
    def tile_align(self) -> int:
        """The HR period of the network's grids: the coarsest stride, and the span of an
        attention window at each attention level. Tiles that start on multiples of it
        see the same level grids and attention windows as the whole image
        (idm.inference.tiling.input_span)."""
        levels = list(self.attention_levels) + ([len(self.channel_mults) - 1] if self.mid_attention else [])
        return max([self.unet_stride] + [self.attention_window * 2**i for i in levels if self.attention_window])

    def canvas(self, size: tuple[int, int]) -> tuple[int, int]:
        """The UNet's working size for a target (H, W): each side rounded up to a multiple
        of `unet_stride`, so every level halves the one above exactly (`IDM.to_canvas`)."""
        stride = self.unet_stride
        return tuple(-(-int(n) // stride) * stride for n in size)  # type: ignore[return-value]


# The longest noise schedule a config may declare (the paper uses 2000): a checkpoint's config
# cannot make its loader build tables of billions of steps.
MAX_TIMESTEPS = 100_000


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
        if self.timesteps > MAX_TIMESTEPS:  # the schedule is a table of this length, built before any use
            raise ValueError(f"timesteps must be at most {MAX_TIMESTEPS}, got {self.timesteps!r}")
        for name in ("beta_start", "beta_end"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
        if self.beta_start > self.beta_end:
            raise ValueError(f"beta_start must be <= beta_end, got {self.beta_start} > {self.beta_end}")
        if not isinstance(self.clip_x0, bool):
            raise ValueError(f"clip_x0 must be True or False, got {self.clip_x0!r}")


# Train settings that may change when a run is resumed: none of them alters the weights.
# Keys a run may change when it resumes. The batches do not depend on `workers` (idm.data),
# and the float32 master weights do not depend on `precision` or `compile`.
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "log_every", "sample_every", "workers", "precision", "compile")
PRECISIONS = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class TrainConfig:
    """How IDM is trained (idm.train.fit). Defaults: the paper's optimiser with LIIF's scale range."""

    steps: int = 2000
    batch_size: int = 8
    patch_size: int = 48  # side of the HR patch (px); the LR patch is round(patch_size / s)
    scale_min: float = 1.0  # LIIF: s ~ U(1, 4), one scale per batch
    scale_max: float = 4.0
    lr: float = 1e-4  # Adam, constant (paper)
    ema_decay: float = 0.999
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    checkpoint_every: int = 500  # 0: only at the end
    log_every: int = 50
    sample_every: int = 0  # 0: never call on_sample
    seed: int = 0
    target: str = "image"  # what the diffusion denoises, one of TARGETS (idm.diffusion.targets)
    residual_scale: float = 0.5  # targets "residual" / "refine": x0 = (HR - bicubic or x_con) / residual_scale
    flips: bool = True  # random horizontal and vertical flips
    condition_loss: float = 0.0  # weight of an L1 loss of the condition x_con against HR; 0: paper (none)
    # > 0: LR patches of this side (LIIF: 48) with HR round(lr_patch * s), instead of HR patch_size.
    lr_patch: int = 0
    # > 0: x_con's loss and the denoiser see one random crop of this side of the HR patch
    # (the encoder still sees the whole LR patch), so large scales do not make steps expensive.
    unet_patch: int = 0
    # > 0: x_con's loss on this many random HR pixels of the whole patch per sample (LIIF:
    # 48 x 48), so every LR pixel's features get a gradient; needs ModelConfig.decoder_hidden > 0.
    condition_points: int = 0
    # DataLoader worker processes making the batches (idm.data.batches); 0: the training process.
    workers: int = 0
    # auto: bfloat16 autocast on CUDA, float32 elsewhere (bench/README.md, "Training input and
    # precision"); weights, optimiser state and EMA stay float32 either way.
    precision: str = "auto"
    # torch.compile the training objective: pays only when a run is long enough to repay the
    # compile time (bench/README.md, "Training input and precision").
    compile: bool = False

    def __post_init__(self) -> None:
        for name, least in (("steps", 1), ("batch_size", 1), ("patch_size", 2), ("checkpoint_every", 0),
                            ("log_every", 1), ("sample_every", 0), ("seed", 0)):
            value = getattr(self, name)
            _check(_is_int(value) and value >= least, name, f"an integer >= {least}", value)
        _check(_is_number(self.scale_min) and self.scale_min >= 1, "scale_min", "a number >= 1", self.scale_min)
        _check(_is_number(self.scale_max) and self.scale_max > self.scale_min, "scale_max",
               f"a number > scale_min = {self.scale_min}", self.scale_max)
        _check(self.patch_size >= self.scale_max, "patch_size",
               f"at least scale_max = {self.scale_max} (the LR patch needs 1 px)", self.patch_size)
        _check(_is_number(self.lr) and self.lr > 0, "lr", "a number > 0", self.lr)
        _check(_is_number(self.ema_decay) and 0 <= self.ema_decay < 1, "ema_decay", "a number in [0, 1)", self.ema_decay)
        _check(_is_number(self.grad_clip) and self.grad_clip >= 0, "grad_clip", "a number >= 0 (0: off)", self.grad_clip)
        _check(_is_number(self.residual_scale) and self.residual_scale > 0, "residual_scale", "a number > 0",
               self.residual_scale)
        _check(self.target in TARGETS, "target", f"one of {sorted(TARGETS)}", self.target)
        _check(isinstance(self.flips, bool), "flips", "True or False", self.flips)
        _check(isinstance(self.compile, bool), "compile", "True or False", self.compile)
        _check(_is_number(self.condition_loss) and self.condition_loss >= 0, "condition_loss", "a number >= 0",
               self.condition_loss)
        _check(self.precision in PRECISIONS, "precision", f"one of {list(PRECISIONS)}", self.precision)
        for name in ("lr_patch", "unet_patch", "condition_points", "workers"):
            value = getattr(self, name)
            _check(_is_int(value) and value >= 0, name, "an integer >= 0 (0: off)", value)
        _check(not self.unet_patch or self.target != "residual", "unet_patch",
               "0 with target 'residual' (its base needs the whole LR patch)", self.unet_patch)


# Named sampler settings, chosen from the perception-distortion study (bench/README.md,
# "Perception-distortion"): fidelity = the regression output (best PSNR/SSIM); balanced = the
# deterministic setting with the lowest NIQE at x4 and at x8; perceptual = the lowest mean NIQE
# over x4 and x8.
SAMPLE_PRESETS: dict[str, dict[str, Any]] = {
    "fidelity": {"steps": 0},
    "balanced": {"sampler": "ddim", "steps": 2, "temperature": 0.0},
    "perceptual": {"sampler": "ddim", "steps": 1, "temperature": 1.0},
}


def default_preset(regression: bool) -> str:
    """The SAMPLE_PRESETS name a model samples with when its caller names no preset and no steps:
    `fidelity` (the one-pass regression output) for a model that has one, else `balanced`.

    The one rule behind every default (`idm upscale`, the served model, `DiffusionSR.from_checkpoint`),
    so the three never disagree; the regression output is the fastest and never below bicubic.
    """
    return "fidelity" if regression else "balanced"


@dataclass(frozen=True)
class SampleConfig:
    """How a trained IDM samples an output: the sampler, its steps and noise, and tiling.

    One object carries these settings everywhere they travel (params.yaml's `sample`
    section, `idm upscale`'s flags, the MLflow model), and this is their one validator.
    """

    # sampler, steps and temperature default to the `balanced` preset (SAMPLE_PRESETS)
    sampler: str = "ddim"  # one of SAMPLERS
    # Denoiser evaluations per image (spaced over the schedule; at most its T); 0: no
    # diffusion, the encoder's regression output x_con (one pass, the best PSNR).
    steps: int = 2
    spacing: str = "uniform"  # how the steps spread over the schedule: one of SPACINGS
    eta: float = 0.0  # 0: deterministic DDIM; 1: ancestral-like
    seed: int = 0  # initial noise, per image
    temperature: float = 0.0  # scale of the initial noise: 1 samples the model, < 1 favours PSNR over texture
    max_memory_gb: float = 4.0  # outputs whose untiled run would need more are made tile by tile
    tile_overlap: int = 8  # LR pixels shared by neighbouring tiles
    tile_context: int = 64  # HR pixels of extra input around each tile (idm.inference.tiling.input_span)
    tile_norm: str = "tile"  # one of TILE_NORMS: GroupNorm statistics per tile, or the whole image's
    threads: int = 0  # CPU threads (idm.device.use_threads); 0: one per physical core

    def __post_init__(self) -> None:
        _check(_is_int(self.threads) and self.threads >= 0, "threads", "an integer >= 0 (0: one per physical core)",
               self.threads)
        _check(_is_number(self.max_memory_gb) and self.max_memory_gb > 0, "max_memory_gb", "a number > 0",
               self.max_memory_gb)
        _check(_is_int(self.tile_overlap) and self.tile_overlap >= 0, "tile_overlap", "an integer >= 0",
               self.tile_overlap)
        _check(_is_int(self.tile_context) and self.tile_context >= 0, "tile_context", "an integer >= 0",
               self.tile_context)
        _check(self.tile_norm in TILE_NORMS, "tile_norm", f"one of {list(TILE_NORMS)}", self.tile_norm)
        _check(self.sampler in SAMPLERS, "sampler", f"one of {sorted(SAMPLERS)}", self.sampler)
        _check(_is_int(self.steps) and self.steps >= 0, "steps", "an integer >= 0 (0: the regression output)",
               self.steps)
        _check(self.spacing in SPACINGS, "spacing", f"one of {list(SPACINGS)}", self.spacing)
        _check(_is_number(self.eta) and self.eta >= 0, "eta", "a number >= 0", self.eta)
        _check(_is_int(self.seed) and 0 <= self.seed < 2**63, "seed", "an integer in [0, 2**63)", self.seed)
        check_temperature(self.temperature)

    @property
    def max_bytes(self) -> int:
        """The memory bound in bytes."""
        return int(self.max_memory_gb * 2**30)


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
# The shipped pretrained model's shape: capacity in the LR encoder, which runs once per
# image at LR size, and the tiny per-step UNet, which runs at HR size at every step.
MODEL_PRESETS["lean"] = replace(MODEL_PRESETS["tiny"], encoder_blocks=12, encoder_channels=48, decoder_hidden=64)
