"""Fault injection for stage processes of the reliability tests (never installed outside them).

Python imports `sitecustomize` at start-up, so with this folder on PYTHONPATH and
IDM_FAULT set, every Python process of a test (DVC and the stages DVC starts) gets the
fault. IDM_FAULT is JSON, {"kind": ..., ...}:

- pause-after-save {step, marker, release?}: once the training loop has written
  checkpoint.pt for `step`, create `marker` and wait (for `release` to exist, or forever:
  the test kills the process).
- pause-mid-save {step, marker}: while writing checkpoint.pt for `step`, stop half way
  through the bytes (flushed to disk), create `marker` and wait to be killed.
- fail-register: registering the model in MLflow fails as if the server had gone away.
- pause-import {module, marker}: when `module` is first imported, create `marker` and wait
  there, inside the import, to be signalled or killed (an interrupt during start-up).

The patch is applied when the target module is first imported (a meta-path hook), so a
process that never imports it pays nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import io
import json
import os
import sys
import time
from pathlib import Path


def _wait(marker: str, release: str | None) -> None:
    Path(marker).touch()
    while not (release and Path(release).exists()):
        time.sleep(0.05)


def _is_target(fault: dict, ckpt: dict, path: object) -> bool:
    return Path(path).name == "checkpoint.pt" and ckpt.get("step") == fault["step"]


def _patch_checkpoint(module, fault: dict) -> None:
    save, real_torch = module.save_checkpoint, module.torch

    class HalfWriter:
        """torch, except that save() stops half way through the file."""

        def __getattr__(self, name: str):
            return getattr(real_torch, name)

        def save(self, obj, f) -> None:
            buf = io.BytesIO()
            real_torch.save(obj, buf)
            data = buf.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            _wait(fault["marker"], None)

    def faulty_save(ckpt, path) -> None:
        if fault["kind"] == "pause-mid-save" and _is_target(fault, ckpt, path):
            module.torch = HalfWriter()
        save(ckpt, path)
        if fault["kind"] == "pause-after-save" and _is_target(fault, ckpt, path):
            _wait(fault["marker"], fault.get("release"))

    module.save_checkpoint = faulty_save


def _patch_registration(module, fault: dict) -> None:
    def unreachable(*args, **kwargs):
        from mlflow.exceptions import MlflowException

        raise MlflowException("API request to http://mlflow.internal:5000/api/2.0/mlflow/registered-models/create "
                              "failed: Connection refused (injected fault)")

    module.log_and_register = unreachable


TARGETS = {"pause-after-save": ("idm.checkpoint", _patch_checkpoint),
           "pause-mid-save": ("idm.checkpoint", _patch_checkpoint),
           "fail-register": ("pipeline.mlflow_model", _patch_registration)}


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Run `patch(module, fault)` right after module `name` has been executed."""

    def __init__(self, name: str, patch, fault: dict) -> None:
        self.name, self.patch, self.fault = name, patch, fault

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once, and so that the lookup below finds the real module
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module) -> None:
            exec_module(module)
            self.patch(module, self.fault)

        spec.loader.exec_module = exec_and_patch
        return spec


class _PauseOnImport(importlib.abc.MetaPathFinder):
    """Wait inside the import of module `name`, forever, after creating `marker`."""

    def __init__(self, fault: dict) -> None:
        self.fault = fault

    def find_spec(self, fullname, path, target=None):
        if fullname == self.fault["module"]:
            _wait(self.fault["marker"], None)
        return None


if os.environ.get("IDM_FAULT"):
    _fault = json.loads(os.environ["IDM_FAULT"])
    if _fault["kind"] == "pause-import":
        sys.meta_path.insert(0, _PauseOnImport(_fault))
    else:
        _name, _patch = TARGETS[_fault["kind"]]
        sys.meta_path.insert(0, _PatchOnImport(_name, _patch, _fault))
