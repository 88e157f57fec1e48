"""Archives as untrusted input: extracted safely, swapped into place atomically.

A member with an absolute path or a `..` component, a link pointing outside the
extraction folder, a member written through a link, or a device file or fifo rejects
the whole archive before anything is extracted; tarfile's "data" filter and a final
check of where every extracted symlink resolves back this up. Also the errors every
download and extraction raises (`FetchError`), shared with pipeline.data.fetch.
"""

from __future__ import annotations

import lzma
import os
import posixpath
import re
import secrets
import shutil
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from idm.files import replace_dir

# What a corrupt or truncated archive raises (NotImplementedError: unsupported zip compression).
_ARCHIVE_ERRORS = (
    tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, zlib.error, lzma.LZMAError, NotImplementedError,
)


class FetchError(RuntimeError):
    """A download or extraction failed; the message names the URL or file and what to do."""


class DamagedFile(FetchError):
    """A file is not a readable archive or image (truncated or corrupt): not worth keeping."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"{problem}; delete it and download it again")
        self.problem = problem


def one_line(err: BaseException) -> str:
    text = " ".join(str(getattr(err, "reason", None) or err).split())
    return text or type(err).__name__


def sibling_path(path: Path, tag: str) -> Path:
    """A fresh hidden name beside `path` (same filesystem, so a rename onto `path` is atomic)."""
    return path.parent / f".{path.name}.{tag}-{secrets.token_hex(4)}"


def _member_path(name: str, archive: Path) -> PurePosixPath:
    """Validate an archive member name and return it as a relative path."""
    clean = name.replace("\\", "/")
    if clean.startswith("/") or re.match(r"[A-Za-z]:", clean):
        raise FetchError(f"{archive} has a member with an absolute path {name!r}; refusing to extract it")
    # Any '..' is refused, even one that stays inside: data archives never need it.
    if ".." in clean.split("/"):
        raise FetchError(f"{archive} has a member with '..' in its path {name!r}; refusing to extract it")
    return PurePosixPath(clean)


def _check_link(member: tarfile.TarInfo, path: PurePosixPath, links: set[PurePosixPath], archive: Path) -> None:
    """Refuse a symlink or hardlink whose target is absolute, escapes, or passes through a link."""
    link = member.linkname.replace("\\", "/")
    base = path.parent if member.issym() else PurePosixPath()  # hardlinks are relative to the root
    resolved = posixpath.normpath(str(base / link))
    escapes = link.startswith("/") or resolved == ".." or resolved.startswith("../")
    through = any(p in links for p in (PurePosixPath(resolved), *PurePosixPath(resolved).parents))
    if escapes or (member.islnk() and through):
        raise FetchError(
            f"{archive} has a link {member.name!r} -> {member.linkname!r} outside the archive; refusing to extract it"
        )


def _check_tar(tar: tarfile.TarFile, archive: Path) -> list[tarfile.TarInfo]:
    """Vet every member before anything is written; return them."""
    members = tar.getmembers()  # reads to the end: a truncated archive fails here
    links: set[PurePosixPath] = set()
    for member in members:
        path = _member_path(member.name, archive)
        if any(parent in links for parent in path.parents):
            raise FetchError(f"{archive} writes {member.name!r} through a link; refusing to extract it")
        if member.issym() or member.islnk():
            _check_link(member, path, links, archive)
            links.add(path)
        elif not (member.isfile() or member.isdir()):
            raise FetchError(f"{archive} has a device file or fifo {member.name!r}; refusing to extract it")
    return members


def _check_symlinks_inside(root: Path, archive: Path) -> None:
    """After extraction: every symlink must resolve inside `root` (catches link chains)."""
    real_root = os.path.realpath(root)
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            if os.path.islink(path) and os.path.commonpath([os.path.realpath(path), real_root]) != real_root:
                raise FetchError(f"{archive} has a link {os.path.relpath(path, root)!r} resolving outside the archive")


def _extract_into(archive: Path, folder: Path) -> None:
    """Unpack a zip or tar archive into the existing empty `folder` after vetting every member."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                _member_path(name, archive)
            # zipfile writes link and device entries as plain files, so names are all to vet.
            zf.extractall(folder)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tar:
            members = _check_tar(tar, archive)
            data_filter = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(folder, members=members, **data_filter)
        if any(m.issym() for m in members):
            _check_symlinks_inside(folder, archive)
    else:
        raise DamagedFile(f"{archive} is not a zip or tar archive (or is truncated)")


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace_path(source: Path, target: Path) -> None:
    """Rename `source` onto `target` (idm.files.replace_dir), the old `target` swapped out first."""
    replace_dir(source, target, backup=sibling_path(target, "old"))


def extract(archive: Path, target: Path) -> Path:
    """Extract a zip or tar (.gz, .bz2, .xz) archive to the folder `target` and return it.

    The format is detected from the content. Extraction goes to a hidden folder beside
    `target`, which is renamed into place only on success: an existing `target` is
    replaced then, and left as it was on any failure. Unsafe members (see the module
    docstring), a corrupt or truncated archive, or a file that is no archive raise
    FetchError and leave nothing behind.
    """
    archive, target = Path(archive), Path(target)
    if not archive.is_file():
        raise FetchError(f"archive {archive} does not exist; download it first")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = sibling_path(target, "extract")
    staging.mkdir()
    try:
        try:
            _extract_into(archive, staging)
        except _ARCHIVE_ERRORS as err:
            raise DamagedFile(f"cannot extract {archive} ({one_line(err)}); it may be truncated or corrupt") from err
        replace_path(staging, target)
    finally:
        remove_path(staging)
    return target
