"""Device selection: `auto` means CUDA when present, else CPU."""

from __future__ import annotations

import torch

from idm.config import DEVICES


def resolve_device(name: str = "auto") -> torch.device:
    """Map a device setting to a torch.device; 'cuda' without a GPU is an error."""
    if name not in DEVICES and not name.startswith("cuda:"):
        raise ValueError(f"unknown device {name!r}; expected one of {list(DEVICES)} or 'cuda:N'")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)
