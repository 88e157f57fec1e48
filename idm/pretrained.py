"""The pretrained IDM shipped inside the package: idm/weights/, described by its MODEL_CARD.md.

`weights()` returns the checkpoint's path after checking it against the sha256 that
idm/weights/manifest.json records, so a damaged or replaced file is refused before
`torch.load` (which reads it with weights_only=True) ever sees it.
"""

from __future__ import annotations

import json
from pathlib import Path

from idm.files import file_sha256

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MANIFEST = WEIGHTS_DIR / "manifest.json"


class PretrainedUnavailable(FileNotFoundError):
    """The shipped weights are missing or do not match their recorded checksum."""


def manifest() -> dict:
    """{"file", "sha256", ...} of the shipped weights; PretrainedUnavailable if absent or unreadable."""
    try:
        record = json.loads(MANIFEST.read_text())
        record["file"], record["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PretrainedUnavailable(f"{MANIFEST}: no readable manifest of the pretrained weights ({err}); "
                                    "reinstall the package, or give --model a checkpoint") from None
    return record


def weights() -> Path:
    """Path of the shipped checkpoint, its sha256 verified; PretrainedUnavailable otherwise."""
    record = manifest()
    path = WEIGHTS_DIR / record["file"]
    if not path.is_file():
        raise PretrainedUnavailable(f"{path}: the pretrained weights are missing; reinstall the package "
                                    "(pip install --force-reinstall idm-pipeline), or give --model a checkpoint")
    actual = file_sha256(path)
    if actual != record["sha256"]:
        raise PretrainedUnavailable(f"{path}: sha256 {actual} does not match the recorded {record['sha256']} "
                                    "(damaged or replaced file); reinstall the package")
    return path
