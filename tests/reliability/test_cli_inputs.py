"""`idm upscale` under hostile flags and inputs: every flag checked like params.yaml, memory
bounded before decoding, non-regular and multi-frame files refused, temporary folders
removed, interrupts ending in one line with nothing half-written."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from pipeline import cli
from pipeline.data.images import ImageReadError, probe_image, read_image
from tests.helpers import ROOT, photo
from tests.reliability.harness import FAULTS
from tests.pipeline.test_cli import checkpoint  # noqa: F401 -- an untrained tiny model (T = 50), module-scoped

pytestmark = pytest.mark.reliability


def _png(height: int, width: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(photo(height, width)).save(buf, format="PNG")
    return buf.getvalue()


def _huge_png(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height RGB pixels, with a few bytes of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _run(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as exit_:
        cli.main(args)
    return int(exit_.value.code), [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.parametrize("flags, message", [
    (["--steps", "51"], "--steps must be an integer in [1, 50] (the model's diffusion timesteps), got 51"),
    (["--steps", "-2"], "--steps must be an integer >= 0 (0: the regression output), got -2"),
    (["--eta", "nan"], "--eta must be a number >= 0, got nan"),
    (["--eta", "-1"], "--eta must be a number >= 0, got -1.0"),
    (["--temperature", "inf"], "--temperature must be a number in [0, 1], got inf"),
    (["--temperature", "1.5"], "--temperature must be a number in [0, 1], got 1.5"),
    (["--max-memory-gb", "nan"], "--max-memory-gb must be a number > 0, got nan"),
    (["--max-memory-gb", "0"], "--max-memory-gb must be a number > 0, got 0.0"),
    (["--max-memory-gb", "inf"], "--max-memory-gb must be a number > 0, got inf"),
    (["--sampler", "euler"], "argument --sampler: invalid choice: 'euler'"),
    (["--tile-norm", "batch"], "argument --tile-norm: invalid choice: 'batch'"),
    (["--steps", "two"], "argument --steps: invalid int value: 'two'"),
    (["--model", "http://example.com/model.pt"], "--model 'http://example.com/model.pt': unsupported model URI"),
    (["--device", "tpu"], "--device 'tpu': unknown device 'tpu'; expected one of ['auto', 'cpu', 'cuda']"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_every_flag_is_checked_in_one_line_and_nothing_is_written(checkpoint, tmp_path, capsys, flags,  # noqa: F811
                                                                  message):
    (tmp_path / "a.png").write_bytes(_png(8, 8))
    base = ["upscale", str(tmp_path / "a.png"), "--scale", "2", "--model", str(checkpoint), "--steps", "1",
            "--out", str(tmp_path / "out")]
    code, lines = _run(base + flags, capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("idm: error: "), lines
    assert message in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_a_fifo_is_refused_at_once(tmp_path, checkpoint, capsys):  # noqa: F811
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    start = time.monotonic()
    with pytest.raises(ImageReadError, match="not a regular file"):
        read_image(fifo)
    code, lines = _run(["upscale", str(fifo), "--scale", "2", "--model", str(checkpoint), "--out", str(tmp_path)],
                       capsys)
    assert code == 2 and "not a regular file" in lines[-1] and time.monotonic() - start < 30
    with pytest.raises(ImageReadError, match="a folder"):
        read_image(tmp_path)


def test_a_tiny_file_declaring_a_huge_canvas_is_refused_from_its_header(tmp_path, checkpoint, capsys):  # noqa: F811
    """12000 x 12000 px passes the pixel limits but needs ~3.2 GiB to decode: refused before
    decoding, by the memory bound."""
    big = tmp_path / "big.png"
    big.write_bytes(_huge_png(12000, 12000))
    assert big.stat().st_size < 200 and probe_image(big) == (12000, 12000)
    code, lines = _run(["upscale", str(big), "--size", "12000x12000", "--model", str(checkpoint),
                        "--max-memory-gb", "2", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "decoding its 12000x12000 pixels needs ~3.22 GiB, above the bound of 2.00 GiB" in lines[-1]
    with pytest.raises(ImageReadError, match="decoding its"):
        read_image(big, max_bytes=2**30)
    assert not (tmp_path / "out").exists()


def test_the_memory_bound_counts_the_input_and_a_smaller_size_is_refused(checkpoint, tmp_path, capsys):  # noqa: F811
    """The LR encoder's features at the input's size count in the memory estimate, not only the
    output's; and a --size not larger than the input is refused before any decode (idm only enlarges)."""
    from idm.checkpoint import build_model, load_checkpoint
    from idm.inference.memory import estimate_peak_bytes

    cfg = build_model(load_checkpoint(checkpoint)).cfg
    with_input = estimate_peak_bytes(cfg, (40, 40), lr_size=(1200, 1200))
    assert with_input > 1.2 * estimate_peak_bytes(cfg, (40, 40))
    (tmp_path / "big.png").write_bytes(_png(1200, 1200))
    for size in ("40x40", "1200x1300", "2400x1200"):
        code, lines = _run(["upscale", str(tmp_path / "big.png"), "--size", size, "--model", str(checkpoint),
                            "--out", str(tmp_path / "out")], capsys)
        assert code == 2 and "is not larger than the input (1200x1200) in both directions" in lines[-1], lines
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["gif", "tiff", "png"])
def test_multi_frame_images_are_refused_not_cut_to_their_first_frame(tmp_path, kind):
    frames = [Image.fromarray(photo(6, 6, seed)) for seed in (1, 2, 3)]
    path = tmp_path / f"anim.{kind}"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with pytest.raises(ImageReadError, match="has 3 frames"):
        read_image(path)
    single = tmp_path / f"one.{kind}"
    frames[0].save(single)
    assert read_image(single).shape == (6, 6, 3)


def _temp_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("idm-model-"))


def test_a_registered_model_load_leaves_no_temporary_folder(checkpoint, tmp_path, monkeypatch, capsys):  # noqa: F811
    """models:/ (and file://) loads download into a temporary folder, removed on success and on failure."""
    import shutil

    from pipeline import mlflow_model, tracking

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setattr(tracking, "setup", lambda: "0")

    def fake_download(uri: str, dest: Path) -> Path:  # what MLflow's download leaves: a copy in dest
        return Path(shutil.copy(checkpoint, Path(dest) / "model.pt"))

    monkeypatch.setattr(mlflow_model, "checkpoint_from_uri", fake_download)
    (tmp_path / "a.png").write_bytes(_png(8, 8))
    cli.main(["upscale", str(tmp_path / "a.png"), "--scale", "2", "--model", "models:/idm@candidate", "--steps", "1",
              "--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "a_x2.png").is_file() and _temp_dirs(scratch) == []
    code, lines = _run(["upscale", str(tmp_path / "a.png"), "--scale", "2", "--model", "models:/idm@candidate",
                        "--steps", "99", "--out", str(tmp_path / "out2")], capsys)
    assert code == 2 and "--steps must be an integer in [1, 50]" in lines[-1] and _temp_dirs(scratch) == []


def _start_upscale(model: Path, image: Path, out: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    # A shell's background job (CI under nohup or `&`) ignores SIGINT, and a child inherits that:
    # give it the default Ctrl-C, as in a terminal. `python -m pipeline.entry` is the `idm` command.
    return subprocess.Popen([sys.executable, "-m", "pipeline.entry", "upscale", str(image), "--scale", "4",
                             "--model", str(model), "--steps", "50", "--out", str(out)],
                            cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(proc: subprocess.Popen, text: str, timeout: float = 300) -> str:
    """What `proc` wrote to stderr up to and including the first `text`, however long a loaded machine takes."""
    seen, deadline = "", time.monotonic() + timeout
    while text not in seen:
        char = proc.stderr.read(1)
        assert char and time.monotonic() < deadline, f"no {text!r} from the process: {seen}"
        seen += char
    return seen


def _lines(err: str) -> list[str]:
    """stderr's lines without progress-bar redraws (tqdm rewrites its line with carriage returns)."""
    return [line for line in re.split(r"[\r\n]", err) if line.strip() and "%|" not in line]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupt_ends_in_one_line_exit_130_and_leaves_no_temporary_file(checkpoint, tmp_path,  # noqa: F811
                                                                             signum):
    (tmp_path / "a.png").write_bytes(_png(192, 192))
    out = tmp_path / "out"
    proc = _start_upscale(checkpoint, tmp_path / "a.png", out)
    seen = _wait_for(proc, "%|")  # the progress bar of the denoiser's 50 steps: loaded and sampling
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    lines = _lines(seen + err)
    assert proc.returncode == 130 and len(lines) == 1 and lines[0].startswith("idm: interrupted"), seen + err
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == []


@pytest.mark.parametrize("module", ["torch", "pipeline.data.images", "pipeline.cli"])
def test_an_interrupt_during_start_up_ends_in_one_line_exit_130(checkpoint, tmp_path, module):  # noqa: F811
    """Ctrl-C while the command is still importing (torch takes seconds): no import traceback."""
    (tmp_path / "a.png").write_bytes(_png(16, 16))
    marker = tmp_path / "importing"
    fault = {"IDM_FAULT": json.dumps({"kind": "pause-import", "module": module, "marker": str(marker)}),
             "PYTHONPATH": f"{FAULTS}{os.pathsep}{ROOT}"}
    proc = _start_upscale(checkpoint, tmp_path / "a.png", tmp_path / "out", env=fault)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and _lines(err) == [
        "idm: interrupted before any work started; nothing was written"], err
    assert not (tmp_path / "out").exists()


def test_a_later_input_that_cannot_fit_stops_the_run_before_the_first_output(checkpoint, tmp_path,  # noqa: F811
                                                                             capsys):
    from idm.checkpoint import build_model, load_checkpoint
    from idm.inference.memory import estimate_peak_bytes

    cfg = build_model(load_checkpoint(checkpoint)).cfg
    bound = (estimate_peak_bytes(cfg, (16, 16), lr_size=(8, 8)) + 2**20) / 2**30  # the small one fits untiled
    (tmp_path / "a.png").write_bytes(_png(8, 8))
    (tmp_path / "b.png").write_bytes(_png(300, 300))  # no tile of it fits
    code, lines = _run(["upscale", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--scale", "2", "--steps", "1",
                        "--model", str(checkpoint), "--max-memory-gb", f"{bound:.6f}", "--out", str(tmp_path / "out")],
                       capsys)
    assert code == 2 and "fits in" in lines[-1], lines
    assert not (tmp_path / "out").exists()
