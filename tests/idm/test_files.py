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


def test_only_temporary_files_of_dead_writers_are_removed(tmp_path: Path) -> None:
    """A killed writer's leftover goes once the file is written again; a live writer's stays."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        target = tmp_path / "model.pt"
        killed, writing = tmp_path / f".model.pt.{int(dead.stdout)}-abc.tmp", tmp_path / f".model.pt.{live.pid}-xyz.tmp"
        legacy = tmp_path / ".model.pt.q1w2e3.tmp"  # written before temporary names carried the pid
        for path in (killed, writing, legacy):
            path.write_bytes(b"half")
        with atomic_path(target) as tmp:
            assert tmp.name.startswith(f".model.pt.{os.getpid()}-")
            tmp.write_bytes(b"whole")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.pt", writing.name])
    finally:
        live.kill()
        live.wait()


def test_an_interrupt_inside_an_atomic_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    """Ctrl-C, or SIGTERM turned into KeyboardInterrupt by the CLI and the stages, mid-write."""
    target = tmp_path / "out.png"
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_bytes(b"half an image")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
