"""Training-free post-training int8 quantization of IDM's denoiser (x86 CPU).

What is quantized: every convolution of the UNet, the part that runs at every
denoising step, with int8 weights (per output channel, symmetric) and int8
activations (per tensor, affine, ranges fixed by calibration), except those
`float_convs` names, which keep float32 compute (mixed precision, as Q-Diffusion and
PTQ4DM keep the first and last layers): the UNet's first and last convolutions
(`FLOAT_CONVS`), and the convolutions that write the full-resolution decoder's residual
stream (`conv2` and the 1x1 `skip` of every decoder ResBlock at level 0, and `attn.out`
if level 0 has attention). An eager int8 conv re-quantizes its output to 8 bits per
tensor, and those outputs reach conv_out through only GroupNorm and SiLU, so their
rounding would go straight to the denoiser's output (docs/decisions.md, "int8: which
convolutions stay float32").

The LR encoder and the condition pyramid run once per image and keep float32
compute, and so do the few Linear layers of the noise and scale embeddings. Their
weights, like every other float weight matrix, are *stored* in int8 (per output
channel, weight-only) and expanded to float32 on load, one byte per weight instead of
four; `quantize_denoiser` applies the same rounding in memory, so a saved and reloaded
model computes exactly what the in-memory one does.

Calibration follows Q-Diffusion / PTQ4DM: activation ranges must cover the inputs the
denoiser sees at *every* timestep, so the float32 sampler is run on a few calibration
LR images and the observers record each convolution's input and output at every step
of the trajectory (observers pass values through unchanged, so the trajectory is the
float32 one). A HistogramObserver picks each range to minimise the quantization error.

Which torch path: torch.ao's eager modules (nn.quantized.Conv2d, x86 engine), which run
real int8 kernels at any input size with no compile step, despite their deprecation
warnings. torchao's maintained PT2E flow (torch.export, prepare_pt2e / convert_pt2e with
the X86InductorQuantizer) runs in int8 only after torch.compile, again for every new
(batch, height, width), and a continuous-scale model sees a new size for almost every
scale; this module should move to PT2E once Inductor's int8 graphs are faster here and
compile for dynamic shapes (docs/decisions.md, "int8: why torch.ao eager and not PT2E").

File format: `torch.save` of plain data, loadable with `torch.load(weights_only=True)`:
{"format", "model_config": asdict(ModelConfig), "reduce_range": bool, "float_convs":
[names below the UNet of the convs with float32 compute], "state": the state dict
without the float weight matrices, "int8_weights": {name: {"q": int8, "scale": (C_out,)
float32}}, "sha256": idm.checkpoint.content_digest of the rest, checked on load}. The
file lists its float convs, so it loads the same whatever rule `float_convs` follows later.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from idm.checkpoint import broadcast_views, check_weights, content_digest, load_plain
from idm.config import ModelConfig
from idm.diffusion.noise import gaussian_like
from idm.diffusion.sampling import Sampler, sample_ddim
from idm.diffusion.schedule import Schedule
from idm.files import atomic_path
from idm.models import IDM
from idm.models.layers import SelfAttention

FORMAT = "idm-int8/3"  # /2: only FLOAT_CONVS float32, no "float_convs" key; /1: every conv int8
FLOAT_CONVS = ("conv_in", "conv_out")  # attributes of the UNet that always keep float32 compute
ENGINE = "x86"

with warnings.catch_warnings():  # torch.ao announces its move to torchao on import
    warnings.simplefilter("ignore", DeprecationWarning)
    import torch.ao.nn.quantized as nnq
    import torch.ao.quantization as tq


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence torch.ao's deprecation notices (see the module docstring for why we use it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.ao\..*")
        warnings.filterwarnings("ignore", message=r".*(quantize_per|TypedStorage|reduce_range).*")
        yield


def _use_engine() -> None:
    if ENGINE not in torch.backends.quantized.supported_engines:
        raise RuntimeError(f"int8 inference needs torch's {ENGINE!r} quantized engine; this build has "
                           f"{torch.backends.quantized.supported_engines}")
    torch.backends.quantized.engine = ENGINE


def has_vnni() -> bool:
    """True if the CPU has AVX512-VNNI, whose int8 dot products accumulate in 32 bits."""
    return bool(torch.cpu.get_capabilities().get("avx512_vnni", False))


def _qconfig(reduce_range: bool) -> Any:
    """Histogram-calibrated per-tensor quint8 activations, per-channel symmetric qint8 weights.

    reduce_range keeps activations to 7 bits (torch's default for x86) so that CPUs
    without VNNI cannot overflow their 16-bit intermediate sums; on a VNNI CPU the full
    8 bits give a smaller error (docs/decisions.md, "int8: 7-bit or 8-bit activations
    (reduce_range)").
    """
    top = 127 if reduce_range else 255
    return tq.QConfig(activation=tq.HistogramObserver.with_args(quant_min=0, quant_max=top),
                      weight=tq.default_per_channel_weight_observer)


def float_convs(unet: nn.Module) -> list[str]:
    """Names (as in unet.named_modules()) of the UNet convs that keep float32 compute.

    FLOAT_CONVS, plus the convs that write the full-resolution decoder's residual
    stream: conv2 and skip (when it is a conv) of every decoder stage at level 0 (the
    last res_blocks + 1 of `unet.up`), and attn.out when those stages have attention.
    Their outputs add up, at full resolution, to the map conv_out reads; int8 rounding
    there goes straight to the output (docs/decisions.md, "int8: which convolutions stay
    float32").
    """
    names = list(FLOAT_CONVS)
    first = len(unet.up) - (unet.res_blocks + 1)
    for i in range(first, len(unet.up)):
        stage = unet.up[i]
        names.append(f"up.{i}.res.conv2")
        if isinstance(stage.res.skip, nn.Conv2d):
            names.append(f"up.{i}.res.skip")
        if isinstance(stage.attn, SelfAttention):
            names.append(f"up.{i}.attn.out")
    return names


def _int8_convs(unet: nn.Module, keep_float: Sequence[str]) -> list[tuple[nn.Module, str, nn.Conv2d]]:
    """(parent, attribute name, conv) for every Conv2d of the UNet not named in keep_float."""
    convs = {name: m for name, m in unet.named_modules() if isinstance(m, nn.Conv2d)}
    unknown = sorted(set(keep_float) - set(convs))
    if unknown:
        raise ValueError(f"not convolutions of the UNet: {unknown}")
    out = []
    for name, conv in convs.items():
        if name not in keep_float:
            parent, _, attr = name.rpartition(".")
            out.append((unet.get_submodule(parent), attr, conv))
    return out


def _wrap_convs(unet: nn.Module, reduce_range: bool, keep_float: Sequence[str]) -> None:
    """Put every int8 conv between a QuantStub and a DeQuantStub (float in, float out)."""
    for parent, name, conv in _int8_convs(unet, keep_float):
        wrapper = tq.QuantWrapper(conv)
        wrapper.qconfig = _qconfig(reduce_range)
        setattr(parent, name, wrapper)


def is_quantized(model: nn.Module) -> bool:
    """True if `model` holds int8 modules made by this module."""
    return any(isinstance(m, nnq.Conv2d) for m in model.modules())


def _float_conv_names(unet: nn.Module) -> list[str]:
    """Names of the convs of a quantized UNet that compute in float32."""
    return [name for name, m in unet.named_modules() if type(m) is nn.Conv2d]


@torch.no_grad()
def calibrate(model: nn.Module, calibration: Sequence[tuple[Tensor, tuple[int, int]]], *,
              schedule: Schedule, timesteps: Sequence[int], sampler: Sampler = sample_ddim,
              eta: float = 0.0, temperature: float = 1.0, generator: torch.Generator | None = None) -> None:
    """Run `sampler` over every (lr (B, 3, h, w) in [-1, 1], target (H, W)) pair, so the
    observers of `model` see the denoiser's inputs at every step of `timesteps`, starting
    from noise scaled by `temperature` as at inference (idm.diffusion.sampling.super_resolve)."""
    for lr, size in calibration:
        cond = model.condition(lr, size)
        x_T = temperature * gaussian_like(cond.x_con, generator)
        sampler(model, cond, x_T, timesteps, schedule=schedule, eta=eta, generator=generator)


def quantize_denoiser(model: IDM, calibration: Sequence[tuple[Tensor, tuple[int, int]]], *,
                      schedule: Schedule, timesteps: Sequence[int], sampler: Sampler = sample_ddim,
                      eta: float = 0.0, temperature: float = 1.0, generator: torch.Generator | None = None,
                      reduce_range: bool | None = None, keep_float: Sequence[str] | None = None) -> IDM:
    """An int8 copy of `model` whose UNet convolutions run in int8; `model` is untouched.

    calibration: (lr (B, 3, h, w) in [-1, 1], target size (H, W)) pairs; a handful of
    images at the sizes and scales the model will serve is enough. The float32
    `sampler` runs `timesteps` on each (from noise times `temperature`) while the
    observers record activation ranges.
    The result has the same `condition` / `forward` as IDM and works with every sampler
    (on CPU; int8 kernels exist for the x86 engine only). reduce_range: 7-bit
    activations; default: only on CPUs without VNNI (`has_vnni`). keep_float: names
    of the UNet convs that keep float32 compute; default `float_convs(model.unet)`.
    """
    if not calibration:
        raise ValueError("calibration must hold at least one (lr, size) pair")
    _use_engine()
    reduce_range = not has_vnni() if reduce_range is None else reduce_range
    quantized = copy.deepcopy(model).cpu().eval()
    keep_float = float_convs(quantized.unet) if keep_float is None else list(keep_float)
    with _quiet():
        _wrap_convs(quantized.unet, reduce_range, keep_float)
        tq.prepare(quantized.unet, inplace=True)
        calibrate(quantized, calibration, schedule=schedule, timesteps=timesteps, sampler=sampler,
                  eta=eta, temperature=temperature, generator=generator)
        tq.convert(quantized.unet, inplace=True)
    _round_float_weights(quantized)
    quantized.reduce_range = reduce_range  # saved with the model, for the record
    return quantized


def _empty_int8(cfg: ModelConfig, keep_float: Sequence[str]) -> IDM:
    """An IDM with the int8 module structure of `quantize_denoiser`, weights unset."""
    model = IDM(cfg).eval()
    with _quiet():
        for parent, name, conv in _int8_convs(model.unet, keep_float):
            int8 = nnq.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                              padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                              bias=conv.bias is not None)
            wrapper = tq.QuantWrapper(int8)
            wrapper.quant = nnq.Quantize(1.0, 0, torch.quint8)
            wrapper.dequant = nnq.DeQuantize()
            setattr(parent, name, wrapper)
    return model


def _is_float_matrix(t: Tensor) -> bool:
    return t.is_floating_point() and t.dim() >= 2


def _pack(weight: Tensor) -> dict[str, Tensor]:
    """Symmetric int8 per output channel (dim 0): weight ~ q * scale[:, None, ...]."""
    flat = weight.detach().reshape(weight.shape[0], -1)
    scale = flat.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(flat / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return {"q": q.reshape(weight.shape), "scale": scale.float()}


def _unpack(packed: dict[str, Tensor]) -> Tensor:
    q = packed["q"]
    return (q.reshape(q.shape[0], -1).float() * packed["scale"][:, None]).reshape(q.shape)


@torch.no_grad()
def _round_float_weights(model: nn.Module) -> None:
    """Give every float weight matrix the value it will have after save and load."""
    for tensor in model.state_dict(keep_vars=True).values():
        if _is_float_matrix(tensor):
            tensor.copy_(_unpack(_pack(tensor)))


def save_quantized(model: IDM, path: str | os.PathLike) -> None:
    """Write an int8 model from `quantize_denoiser` to `path` (weights_only-loadable)."""
    if not is_quantized(model):
        raise ValueError("model is not quantized; run quantize_denoiser first")
    with _quiet(), atomic_path(path) as tmp:
        state = model.state_dict()
        blob = {"format": FORMAT, "model_config": dataclasses.asdict(model.cfg),
                "reduce_range": bool(getattr(model, "reduce_range", True)),
                "float_convs": _float_conv_names(model.unet),
                "state": {k: v for k, v in state.items() if not _is_float_matrix(v)},
                "int8_weights": {k: _pack(v) for k, v in state.items() if _is_float_matrix(v)}}
        blob["sha256"] = content_digest(blob)  # checked on load, like a checkpoint's
        with open(tmp, "wb") as f:  # a file object: torch.save would name the archive after the random tmp name
            torch.save(blob, f)


def load_quantized(path: str | os.PathLike) -> IDM:
    """Read a file written by `save_quantized`; never unpickles arbitrary objects."""
    _use_engine()
    with _quiet():
        blob = load_plain(path, what="int8 model")
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
            raise ValueError(f"{path}: not an int8 IDM file of format {FORMAT!r} (format: {found!r})")
        view = next(broadcast_views(blob), None)
        if view is not None:  # a few bytes on disk, any size once the digest copies it
            raise ValueError(f"{path}: not an int8 model written by idm: it holds a tensor of shape "
                             f"{tuple(view.shape)} backed by only {view.untyped_storage().nbytes()} bytes")
        if blob.get("sha256") != content_digest(blob):
            raise ValueError(f"{path}: corrupt int8 model: its contents do not match the sha256 recorded when it "
                             "was saved; run the quantize stage again (dvc repro quantize)")
        cfg = ModelConfig(**blob["model_config"])
        state = dict(blob["state"], **{k: _unpack(v) for k, v in blob["int8_weights"].items()})
        check_weights(cfg, state, source=str(path), exact=False)  # before building: no bigger than these weights
        model = _empty_int8(cfg, blob["float_convs"])
        model.load_state_dict(state)
    model.reduce_range = blob["reduce_range"]
    return model


def file_size(path: str | os.PathLike) -> int:
    """Size of a saved model file in bytes."""
    return Path(path).stat().st_size
