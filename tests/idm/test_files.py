"""Atomic writes: a file or folder is its old content or its new one, never a mix."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from idm.files import atomic_path, replace_dir


def test_atomic_path_keeps_the_old_file_on_failure_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def _folder(path: Path, name: str) -> Path:
    path.mkdir()
    (path / name).write_text(name)
    return path


def test_replace_dir_swaps_a_folder_in_and_deletes_the_old_one(tmp_path: Path) -> None:
    target, backup = tmp_path / "out", tmp_path / ".out.old"
    replace_dir(_folder(tmp_path / "first", "a"), target, backup=backup)
    replace_dir(_folder(tmp_path / "second", "b"), target, backup=backup)
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_replace_dir_puts_the_old_folder_back_when_the_swap_fails(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    target, backup = _folder(tmp_path / "out", "old"), tmp_path / ".out.old"
    new = _folder(tmp_path / "new", "new")
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new folder onto the target
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="No space left"):
        replace_dir(new, target, backup=backup)
    assert (target / "old").read_text() == "old" and not backup.exists() and (new / "new").exists()
