"""Self-describing training checkpoints: atomic save, weights-only load.

A checkpoint (FORMAT 1) is a plain dict that rebuilds its own model:

    {"format": 1, "model_config": asdict(ModelConfig), "diffusion_config": asdict(DiffusionConfig),
     "train_config": asdict(TrainConfig), "model": state_dict, "ema": state_dict,
     "optimizer": state_dict, "step": int, "rng": [one rng_state() dict per DDP rank]}

Everything in it is a tensor, a number, a string, None or a container of those, so
`torch.load(..., weights_only=True)` reads it; that loader refuses arbitrary Python
objects, so a tampered file cannot run code on load.

`save_checkpoint` adds one more key, "sha256": a digest of everything else, which
`load_checkpoint` recomputes and removes. torch.load checks no checksum of its own, so
without it a flipped bit in a weight would load silently. Files written before the
digest existed load unchecked.

A file's contents are checked before anything is built from them: `load_checkpoint`
validates the three configs (their keys, and their values as the config classes do) and
`check_weights` compares the tensor shapes a model_config implies with those stored,
from the config alone, so a small crafted file can neither make its reader allocate a
model of any size nor fail later with a KeyError.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import pickle
import random
import re
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from idm.config import DiffusionConfig, ModelConfig, TrainConfig
from idm.files import atomic_path, fsync_dir
from idm.models import IDM

FORMAT = 1
KEYS = ("format", "model_config", "diffusion_config", "train_config", "model", "ema",
        "optimizer", "step", "rng")
DIGEST = "sha256"  # added by save_checkpoint, checked and removed by load_checkpoint
CONFIGS = {"model_config": ModelConfig, "diffusion_config": DiffusionConfig, "train_config": TrainConfig}
# The config keys every FORMAT 1 checkpoint has held since the format began: one missing means a
# damaged or foreign file. Keys added since may be absent and take their default, or the value
# in LEGACY_VALUES where the default is not what files written before the key existed did.
FORMAT_KEYS = {
    "model_config": ("encoder_blocks", "encoder_channels", "base_channels", "channel_mults", "res_blocks",
                     "attention_levels", "mid_attention", "dropout", "norm_groups", "implicit_hidden",
                     "modulation_hidden"),
    "diffusion_config": ("schedule", "timesteps", "beta_start", "beta_end", "loss", "clip_x0"),
    "train_config": ("steps", "batch_size", "patch_size", "scale_min", "scale_max", "lr", "ema_decay", "grad_clip",
                     "checkpoint_every", "log_every", "sample_every", "seed", "target", "residual_scale", "flips"),
}
LEGACY_VALUES = {"model_config": {"attention_window": 0}, "diffusion_config": {},  # global attention before
                 "train_config": {"precision": "float32"}}  # no autocast before


class CheckpointError(ValueError):
    """A checkpoint file cannot be used: the message names the file and the reason."""


def make_checkpoint(*, model_config: Any, diffusion_config: Any, train_config: Any,
                    model: Mapping[str, Any], ema: Mapping[str, Any], optimizer: Mapping[str, Any],
                    step: int, rng: list[dict[str, Any]]) -> dict[str, Any]:
    """The checkpoint dict; the three configs are dataclasses, the rest state dicts."""
    return {
        "format": FORMAT,
        "model_config": dataclasses.asdict(model_config),
        "diffusion_config": dataclasses.asdict(diffusion_config),
        "train_config": dataclasses.asdict(train_config),
        "model": dict(model),
        "ema": dict(ema),
        "optimizer": optimizer,
        "step": int(step),
        "rng": rng,
    }


def save_checkpoint(ckpt: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write `ckpt` to `path` atomically: a crash leaves the old file or the new one, never half.

    The bytes (with a "sha256" digest of the contents, see `content_digest`) go to a
    temporary file in the same directory, are fsync'ed, and the file is renamed over
    `path` (os.replace is atomic within a file system). Temporary files that killed
    writers left beside `path` are removed once the new file is in place.
    """
    path = Path(path)
    body = {k: v for k, v in ckpt.items() if k != DIGEST}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save({**body, DIGEST: content_digest(body)}, f)
        f.flush()
        os.fsync(f.fileno())  # the bytes are on disk before the rename makes them the checkpoint
    fsync_dir(path.parent)


@contextlib.contextmanager
def exclusive_writer(path: str | os.PathLike, *, owner: int | None = None) -> Iterator[None]:
    """Be the only writer of checkpoint `path` (and of the run outputs beside it) inside the block.

    Holds an exclusive flock on `path`.lock, which records `owner` (default: this process's
    PID), and removes that file at the end. Raises CheckpointError naming the lock file and
    the PID recorded in it if another process holds the lock. The kernel releases the lock
    when its holder dies, however it dies, so a killed run never blocks the next one; why:
    two trainings of one folder would otherwise interleave their checkpoints. Unix only.
    """
    import fcntl

    lock = Path(f"{path}.lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CheckpointError(f"{path} is being written by another training (PID {holder}, which holds "
                                  f"{lock}); wait for it to finish or stop it, then rerun") from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break  # else a finishing holder removed the file between our open and flock: retry
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{owner or os.getpid()}\n".encode(), 0)
        yield
    finally:
        lock.unlink(missing_ok=True)  # while still locked, so no one locks the removed file unaware
        os.close(fd)


def content_digest(ckpt: Mapping[str, Any]) -> str:
    """Hex sha256 of a checkpoint's contents: every tensor's dtype, shape and bytes and every
    plain value, containers walked in sorted key order (so it survives a save/load round trip)."""
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in ckpt.items() if k != DIGEST})
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor) and value.is_quantized:  # int8 models (idm.inference.quantize)
        digest.update(f"Q{value.qscheme()}|".encode())
        if value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            params = [value.q_per_channel_scales(), value.q_per_channel_zero_points(), value.q_per_channel_axis()]
        else:
            params = [value.q_scale(), value.q_zero_point()]
        _feed(digest, [value.int_repr(), *params])
    elif isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"T{flat.dtype}{tuple(value.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy())
    elif isinstance(value, Mapping):
        digest.update(f"D{len(value)}|".encode())
        for key in sorted(value, key=repr):
            _feed(digest, key)
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{len(value)}|".encode())
        for item in value:
            _feed(digest, item)
    else:  # str, int, float, bool, None: what weights_only loading allows
        digest.update(f"{type(value).__name__}:{value!r}|".encode())


def load_plain(path: str | os.PathLike, *, what: str, map_location: str | torch.device = "cpu") -> Any:
    """torch.load(path, weights_only=True), with one CheckpointError naming the file (and
    calling it `what`) if it is missing, damaged, or references Python objects (which
    are never unpickled: that could run code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what} file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message also advises weights_only=False, which could run the file's code: never repeated
        unsafe = re.search(r"unsupported GLOBAL:? (?:GLOBAL )?([\w.]+)", str(e), re.IGNORECASE)
        if unsafe:
            raise CheckpointError(
                f"{path}: refusing to load: it references the Python object {unsafe.group(1)}, and "
                f"only tensors and plain containers are loaded (weights_only=True), since "
                f"unpickling anything else could run code") from None
        reason = str(e).partition("WeightsUnpickler error:")[2].strip().split("\n")[0] or "an unreadable pickle stream"
        raise CheckpointError(f"{path}: corrupt or truncated {what}, or one holding something other than tensors "
                              f"and plain containers ({reason}); nothing in it was run") from None
    except Exception as e:  # torch raises RuntimeError, EOFError, ... on damaged zip archives
        raise CheckpointError(f"{path}: corrupt or truncated {what} ({type(e).__name__}: {e})") from None


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`, never unpickling arbitrary objects.

    Raises FileNotFoundError if `path` does not exist, and CheckpointError (a ValueError)
    naming the file if it is truncated, corrupt (its contents do not match the "sha256"
    recorded when it was written), holds Python objects other than plain data
    (weights_only=True refuses them), lacks the FORMAT 1 keys, or holds a config that is
    incomplete or invalid (`check_configs`). The digest is removed from the returned dict;
    config keys added after the file was written are filled in (`check_configs`).
    """
    path = Path(path)
    ckpt = load_plain(path, what="checkpoint", map_location=map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not an IDM checkpoint of format {FORMAT} (format: {found!r})")
    missing = [k for k in KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks the keys {missing}")
    view = next(broadcast_views(ckpt), None)
    if view is not None:  # expanded views: a few bytes on disk, any size once copied (as the digest would)
        raise CheckpointError(f"{path}: not a checkpoint written by idm: it holds a tensor of shape "
                              f"{tuple(view.shape)} backed by only {view.untyped_storage().nbytes()} bytes")
    recorded = ckpt.pop(DIGEST, None)
    if recorded is not None and recorded != content_digest(ckpt):
        raise CheckpointError(f"{path}: corrupt checkpoint: its contents do not match the sha256 recorded when it "
                              f"was written (damaged on disk or in a copy); restore it or retrain")
    try:
        check_configs(ckpt)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    return ckpt


def broadcast_views(value: Any) -> Iterator[torch.Tensor]:
    """Tensors anywhere in `value` that claim more bytes than their storage holds (broadcast views)."""
    if isinstance(value, torch.Tensor):
        if not value.is_quantized and value.numel() * value.element_size() > value.untyped_storage().nbytes():
            yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from broadcast_views(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from broadcast_views(item)


def check_configs(ckpt: dict[str, Any]) -> None:
    """Validate a checkpoint's configs, its state dicts, step and rng list, completing the configs in place.

    Each config section must hold the FORMAT_KEYS, no key its class lacks, and values the
    class accepts; keys added since are filled in (LEGACY_VALUES, else the class default).
    Raises CheckpointError naming the section and key, so no reader meets a KeyError later.
    """
    for section, cls in CONFIGS.items():
        stored = ckpt[section]
        if not isinstance(stored, dict):
            raise CheckpointError(f"checkpoint's {section} is not a mapping (found {type(stored).__name__})")
        unknown = sorted(map(str, set(stored) - {f.name for f in dataclasses.fields(cls)}))
        if unknown:
            raise CheckpointError(f"checkpoint's {section} cannot be built by this version of idm (unknown "
                                  f"key(s) {unknown}: written by a newer idm?)")
        missing = [key for key in FORMAT_KEYS[section] if key not in stored]
        if missing:
            raise CheckpointError(f"checkpoint's {section} lacks the key(s) {missing}: the file is damaged or was "
                                  f"not written by idm; restore it or retrain")
        try:
            ckpt[section] = dataclasses.asdict(cls(**{**LEGACY_VALUES[section], **stored}))
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"checkpoint's {section} cannot be built by this version of idm ({err})") from None
    for name in ("model", "ema"):
        state = ckpt[name]
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in state.items()):
            raise CheckpointError(f"checkpoint's {name!r} is not a state dict (tensor names -> tensors)")
    step = ckpt["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"checkpoint's step must be an integer >= 0, got {step!r}")
    if not isinstance(ckpt["optimizer"], dict) or not isinstance(ckpt["rng"], list):
        raise CheckpointError("checkpoint's optimizer must be a mapping and its rng a list")


def check_weights(cfg: ModelConfig, state: Mapping[str, Any], *, source: str = "checkpoint",
                  exact: bool = True) -> None:
    """Raise CheckpointError unless `state` holds exactly the tensors (names and shapes) of
    IDM(cfg), each backed by bytes of its own; decided before any model is built. With
    `exact` False (a quantized model's state, whose names differ), IDM(cfg) may hold at most
    as many values as `state` does, instead of the same names and shapes.

    Cheap bounds first, naming the model_config field: every block needs a tensor of its own
    and every width is some tensor's size. Then the shapes of IDM(cfg) built on the meta
    device (no memory) are compared with the stored ones. Why: a few-KB file declaring a wide
    model, or storing broadcast views of one number, would otherwise be allocated in full.
    """
    tensors = list(state.values())
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        raise CheckpointError(f"{source}'s weights are not a state dict (tensor names -> tensors)")
    widest = max((max(t.shape, default=1) for t in tensors), default=0)
    blocks = {"encoder_blocks": cfg.encoder_blocks,
              "channel_mults x res_blocks": len(cfg.channels) * (2 * cfg.res_blocks + 1)}
    widths = {"encoder_channels": cfg.encoder_channels, "base_channels x channel_mults": max(cfg.channels),
              "modulation_hidden": cfg.modulation_hidden, "decoder_hidden": cfg.decoder_hidden,
              "implicit_hidden": cfg.implicit_hidden if len(cfg.channels) > 1 else 0}
    unfit = [f"{name} = {n:,} blocks, but it holds {len(tensors)} tensors" for name, n in blocks.items()
             if n > len(tensors)]
    unfit += [f"{name} = {n:,}, wider than any stored tensor (widest: {widest})" for name, n in widths.items()
              if n > widest]
    claimed = sum(t.numel() * t.element_size() for t in tensors)
    held = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())
    if not unfit and claimed > held:
        unfit = [f"its tensors claim {claimed:,} bytes but only {held:,} are stored (views of smaller tensors)"]
    if not unfit:
        unfit = _shape_mismatches(cfg, state) if exact else _too_many_values(cfg, state)
    if unfit:
        raise CheckpointError(f"{source}'s weights do not fit its model_config: {'; '.join(unfit[:4])}"
                              + (f" (and {len(unfit) - 4} more)" if len(unfit) > 4 else ""))


def _too_many_values(cfg: ModelConfig, state: Mapping[str, torch.Tensor]) -> list[str]:
    """[why] if IDM(cfg) (built on the meta device) holds more values than `state`, else []."""
    try:
        with torch.device("meta"):
            implied = sum(v.numel() for v in IDM(cfg).state_dict().values())
    except (RuntimeError, ValueError, OverflowError) as err:
        return [f"the model it describes cannot be built ({err})"]
    held = sum(t.numel() for t in state.values())
    return [f"the config implies {implied:,} values, the file holds {held:,}"] if implied > held else []


def _shape_mismatches(cfg: ModelConfig, state: Mapping[str, torch.Tensor]) -> list[str]:
    """How `state` differs from IDM(cfg)'s state dict (built on the meta device): names and shapes."""
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in IDM(cfg).state_dict().items()}
    except (RuntimeError, ValueError, OverflowError) as err:  # e.g. sizes beyond int64
        return [f"the model it describes cannot be built ({err})"]
    stored = {k: tuple(v.shape) for k, v in state.items()}
    out = [f"{k} is {stored[k]}, the config implies {shape}" for k, shape in expected.items()
           if k in stored and stored[k] != shape]
    missing, unexpected = sorted(expected.keys() - stored.keys()), sorted(stored.keys() - expected.keys())
    if missing:
        out.append(f"missing {len(missing)} tensor(s) such as {missing[0]}")
    if unexpected:
        out.append(f"{len(unexpected)} unexpected tensor(s) such as {unexpected[0]}")
    if out:
        implied = sum(math.prod(shape) for shape in expected.values())
        out.insert(0, f"the config implies {implied:,} values in {len(expected)} tensors, the file holds "
                      f"{sum(t.numel() for t in state.values()):,} in {len(stored)}")
    return out


def build_model(ckpt: Mapping[str, Any], *, use_ema: bool = True) -> IDM:
    """The IDM network a checkpoint describes, with its EMA (default) or raw weights, in eval mode.

    Raises CheckpointError if the stored model_config is not one this version of idm can
    build, or the weights do not fit it (missing, unexpected or differently shaped tensors:
    `check_weights`, before the model is allocated).
    """
    try:
        cfg = ModelConfig(**ckpt["model_config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint's model_config cannot be built by this version of idm ({err})") from None
    state = ckpt["ema" if use_ema else "model"]
    check_weights(cfg, state)
    model = IDM(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        reason = " ".join(str(err).split())
        raise CheckpointError(f"checkpoint's weights do not fit its model_config ({reason[:500]})") from None
    return model.eval()


def _plain(value: Any) -> Any:
    """Lists and tuples compare equal whether they came back from YAML, JSON or a checkpoint."""
    return tuple(_plain(v) for v in value) if isinstance(value, (list, tuple)) else value


def check_same_configs(ckpt: Mapping[str, Any], current: Mapping[str, Mapping[str, Any]], *,
                       may_change: Mapping[str, Collection[str]] | None = None, source: str = "checkpoint") -> None:
    """Raise ValueError naming every key whose value differs between `ckpt` and `current`.

    current: {"model_config": asdict(...), ...}, the sections to compare; keys listed
    in may_change[section] are allowed to differ (e.g. the number of steps).
    """
    may_change = may_change or {}
    diffs = []
    for section, now in current.items():
        stored = ckpt[section]
        for key in sorted(set(stored) | set(now)):
            if key in may_change.get(section, ()):
                continue
            old, new = _plain(stored.get(key, "<absent>")), _plain(now.get(key, "<absent>"))
            if old != new:
                diffs.append(f"{section}.{key} (checkpoint {old!r}, now {new!r})")
    if diffs:
        raise ValueError(f"cannot resume from {source}: its configuration differs in "
                         f"{len(diffs)} key(s): {'; '.join(diffs)}")


def rng_state(generator: torch.Generator, device: torch.device) -> dict[str, Any]:
    """Every random state training depends on, as tensors and plain numbers.

    torch's global CPU (and, on CUDA, `device`'s) generator (dropout), the data
    `generator`, numpy's and Python's global generators.
    """
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "data": generator.get_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }


def set_rng_state(state: Mapping[str, Any], generator: torch.Generator, device: torch.device) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    generator.set_state(state["data"])
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss_next"]))
