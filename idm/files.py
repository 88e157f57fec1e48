"""Atomic file writes: a file is either its old content or its new one, never half.

Writers get a temporary path beside the destination and the rename happens only on
success; temporary files of killed writers are removed once a new file is in place.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only on success.

    On failure `path` keeps its old content (or stays absent) and the temporary file is
    removed; an OSError that names no file is re-raised naming `path` (`naming`). Temporary
    files of killed writers are removed once the new file is in place (`remove_stale_temps`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with naming(path):
            yield tmp_path
            os.chmod(tmp_path, 0o644)  # mkstemp makes it private; outputs are meant to be shared
            os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)
    remove_stale_temps(path)


@contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise an OSError that names no file (e.g. "No space left on device" from an encoder
    or os.sendfile) as the same error naming `path`, so the message says what failed."""
    try:
        yield
    except OSError as err:
        if err.errno is None or err.filename is not None:
            raise
        raise OSError(err.errno, err.strerror or str(err), str(path)) from err


def remove_stale_temps(path: str | os.PathLike) -> None:
    """Delete the `.<name>.<pid>-*.tmp` files beside `path` that writers killed mid-write left.

    Only those of processes that no longer exist: a concurrent writer's file is left alone.
    """
    path = Path(path)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = stale.name[len(path.name) + 2:].partition("-")[0]
        if not (pid.isdigit() and int(pid) != os.getpid() and process_exists(int(pid))):
            stale.unlink(missing_ok=True)


def process_exists(pid: int) -> bool:
    """Whether a process `pid` exists (signal 0: an existence check only)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_dir(source: Path, target: Path, *, backup: Path) -> None:
    """Rename the folder `source` onto `target`, swapping an existing `target` out to `backup`
    only once `source` is ready, and back if the second rename fails; `backup` is then deleted.

    POSIX has no atomic swap of two folders: between the two renames `target` is briefly
    absent, but it never holds a mix of old and new content.
    """
    if not target.exists() and not target.is_symlink():
        os.rename(source, target)
        return
    os.rename(target, backup)
    try:
        os.rename(source, target)
    except OSError:
        os.rename(backup, target)
        raise
    if backup.is_dir() and not backup.is_symlink():
        shutil.rmtree(backup, ignore_errors=True)
    else:
        backup.unlink(missing_ok=True)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
