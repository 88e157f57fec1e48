"""pipeline.data.archives: archives extracted by content, unsafe members refused, targets kept on failure."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import pytest

from pipeline.data.archives import extract
from pipeline.data.fetch import FetchError
from tests.pipeline.data.test_fetch import (
    BLUE,
    RED,
    entry,
    hidden,
    make_tar,
    make_zip,
    tree,
)


@pytest.mark.parametrize("kind", ["zip", "w", "w:gz", "w:bz2", "w:xz"])
def test_extract_detects_format_by_content(tmp_path, kind):
    files = {"imgs/a.png": RED, "imgs/deep/b.png": BLUE}
    data = make_zip(files) if kind == "zip" else make_tar(list(files.items()), mode=kind)
    archive = tmp_path / "download.bin"  # no telling suffix
    archive.write_bytes(data)
    assert extract(archive, tmp_path / "out") == tmp_path / "out"
    assert tree(tmp_path / "out") == files and hidden(tmp_path) == []


def test_extract_keeps_internal_symlinks(tmp_path):
    archive = tmp_path / "a.tar"
    archive.write_bytes(make_tar([("sub/a.png", RED), entry("alias.png", tarfile.SYMTYPE, "sub/a.png")]))
    extract(archive, tmp_path / "out")
    assert (tmp_path / "out" / "alias.png").is_symlink() and (tmp_path / "out" / "alias.png").read_bytes() == RED


def malicious(outside: Path) -> dict[str, bytes]:
    """Archives that try to write to (or link to) `outside`, a folder beside the target."""
    through = ("link/evil.txt", b"x")
    return {
        "zip ../": make_zip({"ok.png": RED, "../outside/evil.txt": b"x"}),
        "zip absolute": make_zip({"ok.png": RED, f"{outside}/evil.txt": b"x"}),
        "tar absolute": make_tar([("ok.png", RED), (f"{outside}/evil.txt", b"x")]),
        "tar ..": make_tar([("ok.png", RED), ("data/../../outside/evil.txt", b"x")]),
        "symlink absolute, write through": make_tar([entry("link", tarfile.SYMTYPE, str(outside)), through]),
        "symlink ../, write through": make_tar([entry("link", tarfile.SYMTYPE, "../outside"), through]),
        "symlink inside, write through": make_tar([("sub/ok.png", RED), entry("link", tarfile.SYMTYPE, "sub"), through]),
        "symlink chain": make_tar([entry("e", tarfile.SYMTYPE, "d/.."), entry("d", tarfile.SYMTYPE, ".")]),
        "hardlink ../": make_tar([entry("h", tarfile.LNKTYPE, "../outside/secret")]),
        "hardlink absolute": make_tar([entry("h", tarfile.LNKTYPE, f"{outside}/secret")]),
        "char device": make_tar([("ok.png", RED), entry("dev", tarfile.CHRTYPE)]),
        "fifo": make_tar([("ok.png", RED), entry("pipe", tarfile.FIFOTYPE)]),
    }


@pytest.mark.parametrize("case", sorted(malicious(Path("/x"))))
def test_extract_rejects_unsafe_archive_and_leaves_nothing(tmp_path, case):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    archive = tmp_path / "evil.archive"
    archive.write_bytes(malicious(outside)[case])
    with pytest.raises(FetchError, match="refusing to extract|outside the archive") as err:
        extract(archive, tmp_path / "target")
    assert str(archive) in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.archive", "outside"]
    assert tree(outside) == {"secret": b"secret"}


def test_extract_keeps_existing_target_on_failure_and_replaces_it_on_success(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "old.png").write_bytes(BLUE)
    bad, good = tmp_path / "bad.tar", tmp_path / "good.zip"
    bad.write_bytes(make_tar([("new.png", RED), ("../x", b"x")]))
    good.write_bytes(make_zip({"new.png": RED}))
    with pytest.raises(FetchError):
        extract(bad, target)
    assert tree(target) == {"old.png": BLUE}
    extract(good, target)
    assert tree(target) == {"new.png": RED} and hidden(tmp_path) == []


def test_extract_truncated_tar_gz_names_the_file(tmp_path):
    noise = bytes(range(256)) * 64 + hashlib.sha512(b"seed").digest() * 512  # poorly compressible
    data = make_tar([("a.bin", noise), ("b.png", RED)])
    archive = tmp_path / "cut.tar.gz"
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(FetchError, match="cannot extract .*cut.tar.gz.*truncated or corrupt"):
        extract(archive, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.tar.gz"]


@pytest.mark.parametrize("content", [RED, make_zip({"a.png": RED})[:-30], b""], ids=["png", "truncated zip", "empty"])
def test_extract_refuses_non_archives(tmp_path, content):
    archive = tmp_path / "file.zip"
    archive.write_bytes(content)
    with pytest.raises(FetchError, match="file.zip is not a zip or tar archive"):
        extract(archive, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.zip"]
