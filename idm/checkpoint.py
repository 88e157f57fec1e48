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
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import random
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from idm.config import ModelConfig
from idm.files import atomic_path, fsync_dir
from idm.models import IDM

FORMAT = 1
KEYS = ("format", "model_config", "diffusion_config", "train_config", "model", "ema",
        "optimizer", "step", "rng")
DIGEST = "sha256"  # added by save_checkpoint, checked and removed by load_checkpoint


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
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if unsafe:
            raise CheckpointError(
                f"{path}: refusing to load: it references the Python object {unsafe.group(1)}, and "
                f"only tensors and plain containers are loaded (weights_only=True), since "
                f"unpickling anything else could run code") from None
        reason = str(e).partition("WeightsUnpickler error:")[2].strip().split("\n")[0] or str(e)
        raise CheckpointError(f"{path}: corrupt or truncated {what} ({reason})") from None
    except Exception as e:  # torch raises RuntimeError, EOFError, ... on damaged zip archives
        raise CheckpointError(f"{path}: corrupt or truncated {what} ({type(e).__name__}: {e})") from None


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`, never unpickling arbitrary objects.

    Raises FileNotFoundError if `path` does not exist, and CheckpointError (a ValueError)
    naming the file if it is truncated, corrupt (its contents do not match the "sha256"
    recorded when it was written), holds Python objects other than plain data
    (weights_only=True refuses them), or lacks the FORMAT 1 keys. The digest is removed
    from the returned dict.
    """
    path = Path(path)
    ckpt = load_plain(path, what="checkpoint", map_location=map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not an IDM checkpoint of format {FORMAT} (format: {found!r})")
    missing = [k for k in KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks the keys {missing}")
    recorded = ckpt.pop(DIGEST, None)
    if recorded is not None and recorded != content_digest(ckpt):
        raise CheckpointError(f"{path}: corrupt checkpoint: its contents do not match the sha256 recorded when it "
                              f"was written (damaged on disk or in a copy); restore it or retrain")
    return ckpt


def build_model(ckpt: Mapping[str, Any], *, use_ema: bool = True) -> IDM:
    """The IDM network a checkpoint describes, with its EMA (default) or raw weights, in eval mode.

    Raises CheckpointError if the stored model_config is not one this version of idm can
    build, or the weights do not fit it (missing, unexpected or differently shaped tensors).
    """
    try:
        model = IDM(ModelConfig(**ckpt["model_config"]))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint's model_config cannot be built by this version of idm ({err})") from None
    try:
        model.load_state_dict(ckpt["ema" if use_ema else "model"])
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
