"""pipeline.evaluation.weights: metric weights found in the cache or fetched from a local server.

Fabricated weight files (tests.helpers.fabricated_weights: the right keys and shapes, a few
KB) are served from 127.0.0.1; the upstream URLs are never contacted.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.evaluation import metrics, weights
from tests.helpers import fabricated_weights
from tests.pipeline.data.test_fetch import send, server, slow, status  # noqa: F401 (server is a fixture)

FAST = {"timeout": 2.0, "retries": 1, "backoff": 0.01}


@pytest.fixture(scope="module")
def alexnet_file() -> bytes:
    return fabricated_weights("lpips")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv(weights.OFFLINE_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return tmp_path / "hub" / "checkpoints"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_good_file_is_fetched_once_and_loads(server, cache: Path, alexnet_file: bytes) -> None:  # noqa: F811
    server.routes["/alexnet.pth"] = send(alexnet_file)
    path = weights.ensure("lpips", url=server.url("/alexnet.pth"), sha256=sha(alexnet_file)[:12], **FAST)
    assert path == cache / "alexnet-owt-7be5be79.pth" and path.read_bytes() == alexnet_file
    assert weights.ensure("lpips", url=server.url("/alexnet.pth"), sha256=sha(alexnet_file), **FAST) == path
    assert server.hits["/alexnet.pth"] == 1  # the second call used the cache
    assert leftovers(cache) == [path.name]
    lpips = metrics.LPIPS(path)
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert lpips(img, img) == 0.0 and lpips(img, 255 - img) > 0


@pytest.mark.parametrize("case", ["corrupt", "wrong hash", "truncated", "404", "slow"])
def test_failed_fetch_is_unavailable_and_leaves_nothing(server, cache: Path, alexnet_file: bytes, case: str) -> None:  # noqa: F811
    expected = sha(alexnet_file)
    route = {
        "corrupt": send(alexnet_file[:100] + b"x" + alexnet_file[101:]),
        "wrong hash": send(alexnet_file),
        "truncated": send(alexnet_file[: len(alexnet_file) // 2], announce=len(alexnet_file)),
        "404": status(404),
        "slow": slow(3.0, send(alexnet_file)),
    }[case]
    if case == "wrong hash":
        expected = "0" * 64
    server.routes["/alexnet.pth"] = route
    with pytest.raises(metrics.MetricUnavailable) as info:
        weights.ensure("lpips", url=server.url("/alexnet.pth"), sha256=expected, **FAST)
    message = str(info.value)
    assert message.startswith("LPIPS (AlexNet trunk): ")
    assert str(cache / "alexnet-owt-7be5be79.pth") in message  # where to put it by hand
    reason = {"corrupt": "checksum mismatch", "wrong hash": "checksum mismatch", "truncated": "truncated",
              "404": "HTTP 404", "slow": "timed out"}[case]
    assert reason in message
    assert leftovers(cache) == []


@pytest.mark.parametrize("switch", ["param", "environment"])
def test_offline_never_connects(server, cache: Path, alexnet_file: bytes, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
                                switch: str) -> None:
    server.routes["/alexnet.pth"] = send(alexnet_file)
    if switch == "environment":
        monkeypatch.setenv(weights.OFFLINE_ENV, "1")
    with pytest.raises(metrics.MetricUnavailable, match="downloads are off") as info:
        weights.ensure("lpips", offline=switch == "param", url=server.url("/alexnet.pth"), sha256=sha(alexnet_file))
    assert f"download {server.url('/alexnet.pth')} by hand" in str(info.value)
    assert server.hits["/alexnet.pth"] == 0 and leftovers(cache) == []


def test_a_file_put_by_hand_is_used_offline(cache: Path, monkeypatch: pytest.MonkeyPatch, alexnet_file: bytes) -> None:
    monkeypatch.setenv(weights.OFFLINE_ENV, "yes")
    cache.mkdir(parents=True)
    (cache / "alexnet-owt-7be5be79.pth").write_bytes(alexnet_file)
    assert weights.ensure("lpips") == cache / "alexnet-owt-7be5be79.pth"


def test_archive_member_is_extracted_and_the_archive_removed(server, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    member = weights.FILES["niqe-matlab"].member
    payload = b"pretend npz"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo(member)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    server.routes["/basicsr.tar.gz"] = send(buf.getvalue())
    path = weights.ensure("niqe-matlab", url=server.url("/basicsr.tar.gz"), sha256=sha(buf.getvalue()), **FAST)
    assert path.read_bytes() == payload and leftovers(cache) == ["niqe_pris_params.npz"]

    empty = io.BytesIO()
    with tarfile.open(fileobj=empty, mode="w:gz"):
        pass
    path.unlink()
    server.routes["/empty.tar.gz"] = send(empty.getvalue())
    with pytest.raises(metrics.MetricUnavailable, match=f"holds no {member}"):
        weights.ensure("niqe-matlab", url=server.url("/empty.tar.gz"), sha256=sha(empty.getvalue()), **FAST)
    assert leftovers(cache) == []
