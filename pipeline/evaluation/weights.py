"""The pretrained files behind LPIPS, FID/KID and MATLAB NIQE: found in the cache or downloaded on first use.

Every file lives in `cache_dir()` (torch.hub's checkpoint folder, `$TORCH_HOME/hub/checkpoints`)
under the name torchvision / torch-fidelity give it, so a file put there by hand, or already
fetched by those libraries, is used as it is. A missing file is downloaded through
`pipeline.data.fetch.download` (https or loopback only, retried, checked against the pinned
hash, renamed into place only when complete) unless downloads are off: `offline=True`
(`evaluate.offline` in params.yaml) or the environment variable IDM_OFFLINE=1. Any failure
raises `MetricUnavailable` naming the file, its URL and where to put it by hand.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

from pipeline.data.archives import FetchError, extract, sibling_path
from pipeline.data.fetch import download
from pipeline.evaluation.metrics import MetricUnavailable

OFFLINE_ENV = "IDM_OFFLINE"


@dataclass(frozen=True)
class WeightFile:
    """One file a metric needs: its cache name, upstream URL and the sha256 (or torch.hub
    prefix of it) the download must have; `member` is the file's path inside the download
    when the URL is an archive."""

    what: str
    name: str
    url: str
    sha256: str
    member: str | None = None


FILES = {
    # torch.hub names checkpoints <name>-<first 8+ hex of sha256>.pth; the prefix is the pin.
    "lpips": WeightFile("LPIPS (AlexNet trunk)", "alexnet-owt-7be5be79.pth",
                        torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url, "7be5be79"),
    "fid": WeightFile("FID/KID (Inception-v3)", "weights-inception-2015-12-05-6726825d.pth", URL_INCEPTION_V3, "6726825d"),
    # The MATLAB release's pristine model as BasicSR converted it, from BasicSR's source archive on PyPI.
    "niqe-matlab": WeightFile(
        "NIQE (MATLAB pristine model)", "niqe_pris_params.npz",
        "https://files.pythonhosted.org/packages/86/41/00a6b000f222f0fa4c6d9e1d6dcc9811a374cabb8abb9d408b77de39648c/"
        "basicsr-1.4.2.tar.gz",
        "b89b595a87ef964cda9913b4d99380ddb6554c965577c0c10cb7b78e31301e87",
        member="basicsr-1.4.2/basicsr/metrics/niqe_pris_params.npz",
    ),
}


def cache_dir() -> Path:
    """torch.hub's checkpoint folder (moved by $TORCH_HOME or torch.hub.set_dir)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def path_of(key: str) -> Path:
    """Where the file `key` (one of FILES) is read from."""
    return cache_dir() / FILES[key].name


def offline_requested(offline: bool = False) -> bool:
    """True when `offline` or IDM_OFFLINE is set to anything but '', '0', 'false' or 'no'."""
    return offline or os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def ensure(key: str, *, offline: bool = False, url: str = "", sha256: str = "", timeout: float = 60.0,
           retries: int = 3, backoff: float = 1.0) -> Path:
    """The path of file `key`, downloading it first if it is not in `cache_dir()`.

    url, sha256: a mirror or a file of your own instead of the upstream one ('' = FILES' pin).
    A file already in the cache is used without a download or a hash check (as torch.hub does),
    but every metric still loads it with weights_only and checks its keys and shapes.
    """
    spec = FILES[key]
    dest = path_of(key)
    if dest.is_file():
        return dest
    source, expected = url or spec.url, (sha256 or spec.sha256).strip().lower()
    by_hand = f"download {source} by hand{' and take ' + spec.member + ' from it' if spec.member else ''} to {dest}"
    if offline_requested(offline):
        raise MetricUnavailable(f"{spec.what} needs {dest}, which does not exist, and downloads are off "
                                f"(evaluate.offline or {OFFLINE_ENV}); {by_hand}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    kwargs = dict(timeout=timeout, retries=retries, backoff=backoff, progress=False, by_hand=by_hand)
    try:
        if spec.member is None:
            download(source, dest, hash_prefix=expected, **kwargs)
        else:
            _download_member(source, expected, spec.member, dest, kwargs)
    except FetchError as err:
        advice = "" if by_hand in str(err) else f"; or {by_hand}"
        raise MetricUnavailable(f"{spec.what}: {err}{advice}") from err
    return dest


def _download_member(url: str, expected: str, member: str, dest: Path, kwargs: dict) -> None:
    """Download the archive at `url` beside `dest`, extract it there and rename `member` onto `dest`."""
    archive, folder = sibling_path(dest, "archive"), sibling_path(dest, "extract")
    try:
        download(url, archive, hash_prefix=expected, **kwargs)
        extract(archive, folder)
        found = folder / member
        if not found.is_file():
            raise FetchError(f"{url} holds no {member}; fix the URL")
        os.replace(found, dest)
    finally:
        archive.unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
