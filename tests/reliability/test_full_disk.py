"""A full disk under every stage and the CLI, and what killed runs leave behind.

The disk fills (a patched writer raises OSError(ENOSPC), as a full tmpfs would) part way
through each stage's writing; the stage must say so in one `error:` line naming the file,
exit 2, and leave the outputs of its previous run byte for byte as they were, with no
temporary files beside them.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

import idm.checkpoint
import pipeline.data.fetch
from idm.checkpoint import load_checkpoint
from pipeline import cli
from tests.helpers import photo
from tests.pipeline.data.test_fetch import RED, make_zip, send, server  # noqa: F401
from tests.pipeline.test_cli import checkpoint  # noqa: F401 -- an untrained tiny model, module-scoped
from tests.reliability.harness import (
    assert_one_line_error,
    leftovers,
    prepared_workspace,
    run_stage,
    snapshot,
    stage_args,
    write_params,
)

pytestmark = pytest.mark.reliability

FULL = "No space left on device"


def full_disk(after: int = 0):
    """A writer that works `after` times, then fails like a full disk."""
    calls = {"n": 0}

    def write(real, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    return write


def patch_writer(monkeypatch, owner, name: str, after: int = 0) -> None:
    real, write = getattr(owner, name), full_disk(after)
    monkeypatch.setattr(owner, name, lambda *args, **kwargs: write(real, *args, **kwargs))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A prepared workspace with a finished bicubic evaluation and report: the 'previous run'."""
    w = prepared_workspace(tmp_path_factory.mktemp("disk"), evaluate={"methods": ["bicubic"]})
    for stage in ("evaluate", "report"):
        code, err = run_stage(stage, "--params", w["params"], *stage_args(w, stage))
        assert code == 0, err
    return w


def _outputs(w) -> dict[str, dict[str, bytes]]:
    return {name: snapshot(w[name]) for name in ("raw", "prepared", "sr", "reports")}


@pytest.mark.parametrize("stage, owner, name, after", [
    ("download", shutil, "copy2", 2),
    ("prepare", Image.Image, "save", 5),
    ("evaluate", Path, "write_text", 2),  # metrics.json and unavailable.json written, scales.csv not
    ("report", Figure, "savefig", 1),  # the plot written, a grid not
])
def test_a_full_disk_mid_stage_is_one_line_and_keeps_the_previous_outputs(work, monkeypatch, stage, owner, name, after):
    before = _outputs(work)
    patch_writer(monkeypatch, owner, name, after)
    code, err = run_stage(stage, "--params", work["params"], *stage_args(work, stage))
    monkeypatch.undo()
    assert_one_line_error(code, err, f"{FULL}: {work['raw'].parent.parent}", "free some disk space",
                          "previous run are unchanged")
    assert _outputs(work) == before
    for folder in (work["raw"].parent, work["reports"], work["reports"] / "grids"):
        assert leftovers(folder) == [], folder


def test_a_full_disk_while_downloading_keeps_the_previous_download(server, tmp_path, monkeypatch):  # noqa: F811
    server.routes["/d.zip"] = send(make_zip({"a.png": RED}))
    params = write_params(tmp_path / "params.yaml", {"datasets": [{"name": "web", "source": "url", "url": server.url("/d.zip")}]})
    raw, cache = tmp_path / "raw", tmp_path / "cache"
    assert run_stage("download", "--params", params, "--out", raw, "--cache", cache)[0] == 0
    before = snapshot(raw)
    (cache / "d.zip").unlink()

    def full_file(path, mode="r", *args, **kwargs):  # the download's temporary file, on a full disk
        f = open(path, mode, *args, **kwargs)
        if "x" in mode:
            f.write = lambda data: full_disk()(None, data)
        return f

    monkeypatch.setattr(pipeline.data.fetch, "open", full_file, raising=False)
    assert_one_line_error(*run_stage("download", "--params", params, "--out", raw, "--cache", cache),
                          FULL, "free some disk space")
    assert snapshot(raw) == before and leftovers(tmp_path) == []
    assert [name for name in leftovers(cache) if ".part-" in name] == []


def test_a_full_disk_while_checkpointing_keeps_the_last_checkpoint(work, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    out = tmp_path / "models" / "idm"
    real_save = idm.checkpoint.torch.save

    def save(obj, f, *args, **kwargs):  # the disk fills up after the step-3 checkpoint
        if obj.get("step") == 6:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(idm.checkpoint.torch, "save", save)
    code, err = run_stage("train", "--params", work["params"], "--prepared", work["prepared"], "--out", out)
    monkeypatch.undo()
    assert_one_line_error(code, err, f"{FULL}: {out / 'checkpoint.pt'}")
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 3
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]


def test_a_full_disk_in_the_cli_writes_nothing(checkpoint, tmp_path, monkeypatch, capsys):  # noqa: F811
    Image.fromarray(photo(8, 8)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_x2.png").write_bytes(b"previous")
    patch_writer(monkeypatch, Image.Image, "save")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["upscale", str(tmp_path / "a.png"), "--scale", "2", "--model", str(checkpoint), "--steps", "1",
                  "--out", str(out)])
    line = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and line.startswith("idm: error: ") and FULL in line and "\n" not in line
    assert snapshot(out) == {"a_x2.png": b"previous"}


def test_folders_left_by_killed_runs_are_removed_by_the_next_run(work):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    parent = work["prepared"].parent
    stale = [parent / f".prepared.tmp-{dead}", parent / f".prepared.old-{dead}"]
    live = parent / f".prepared.tmp-{os.getppid()}"  # a run in progress (any live process) is left alone
    for folder in (*stale, live):
        (folder / "tiny").mkdir(parents=True)
        (folder / "tiny" / "half.png").write_bytes(b"half")
    try:
        code, err = run_stage("prepare", "--params", work["params"], *stage_args(work, "prepare"))
        assert code == 0, err
        assert leftovers(parent) == [live.name]
    finally:
        shutil.rmtree(live)
