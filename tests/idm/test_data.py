"""Training batches: one seed per step, the same stream from 0 or N DataLoader workers, from
memory or memory-mapped files, and exact resume with workers after a kill -9."""

from __future__ import annotations

import pickle
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from idm.config import TrainConfig
from idm.data import (
    DecodedImages,
    TrainBatches,
    batch_seed,
    batches,
    make_batch,
    training_images,
)
from tests.helpers import ROOT

# _one_thread: one torch thread here too, as in the killed subprocess (sums in another order differ)
from tests.idm.test_train import IMAGES, _equal, _fit, _one_thread, _states  # noqa: F401

CFG = TrainConfig(steps=6, batch_size=3, patch_size=16, scale_max=3.0)


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for pa, pb in zip(a, b) for x, y in zip(pa, pb))


def test_each_step_has_its_own_seed_and_a_resumed_stream_continues_it() -> None:
    assert len({batch_seed(0, r, s) for r in range(3) for s in range(100)}) == 300
    assert batch_seed(0, 0, 5) == batch_seed(0, 0, 5) < 2**63
    stream = TrainBatches(training_images(IMAGES, 16), CFG)
    everything = list(batches(stream, 0))
    assert len(everything) == 6 and everything[0][0].shape == (3, 3, 16, 16)
    assert _same(everything[2:], list(batches(stream, 2)))  # a resume at step 2 goes on with step 3
    hr, lr, _ = make_batch(stream.images, CFG, torch.Generator().manual_seed(batch_seed(0, 0, 4)))
    assert torch.equal(everything[3][0], hr) and torch.equal(everything[3][1], lr)
    assert not torch.equal(everything[0][0], TrainBatches(stream.images, CFG, rank=1)[1][0])  # ranks differ


def test_workers_give_the_stream_the_training_process_would_make() -> None:
    stream = TrainBatches(training_images(IMAGES, 16), CFG)
    inline = list(batches(stream, 1))
    assert _same(inline, list(batches(stream, 1, workers=2)))
    assert _same(inline, list(batches(stream, 1, workers=1, prefetch=1)))


def test_decoded_images_stream_from_disk_like_images_in_memory(tmp_path: Path) -> None:
    decoded = DecodedImages.build(IMAGES, tmp_path / "cache", patch_size=16)
    assert len(decoded) == 2 and sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["0.npy", "1.npy"]
    assert isinstance(np.load(tmp_path / "cache" / "0.npy", mmap_mode="r"), np.memmap)
    assert np.array_equal(decoded[1], IMAGES[1].transpose(2, 0, 1))
    decoded[0]
    assert pickle.loads(pickle.dumps(decoded))._maps == {}  # a worker maps the files itself
    in_memory = list(batches(TrainBatches(training_images(IMAGES, 16), CFG), 0))
    assert _same(in_memory, list(batches(TrainBatches(decoded, CFG), 0, workers=2)))
    with pytest.raises(ValueError, match="no training image is at least 64x64"):
        DecodedImages.build(IMAGES, tmp_path / "none", patch_size=64)
    with pytest.raises(ValueError, match=r"training image 1 must be an \(H, W, 3\) uint8 array, got float32"):
        DecodedImages.build([IMAGES[0], IMAGES[1].astype(np.float32)], tmp_path / "bad", patch_size=16)


def test_fit_with_workers_is_bit_identical_to_fit_without(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=4, batch_size=2, patch_size=16, checkpoint_every=0)
    waits: list[float] = []
    _fit(cfg, tmp_path / "inline.pt")
    summary = _fit(replace(cfg, workers=2), tmp_path / "two.pt", on_log=lambda step, m: waits.append(m["input_wait"]))
    _fit(replace(cfg, workers=2), tmp_path / "again.pt")
    inline, two, again = (_states(tmp_path / f"{n}.pt") for n in ("inline", "two", "again"))
    for part in ("model", "ema", "optimizer"):
        assert _equal(inline, two, part) and _equal(two, again, part), part
    assert 0 <= summary["input_wait"] < 1 and len(waits) == 1 and 0 <= waits[0] < 1


KILLED_AT_CHECKPOINT = """
import os, signal, sys
import torch
torch.set_num_threads(1)
from idm.config import DiffusionConfig, TrainConfig
from idm.train import fit
from tests.idm.test_train import IMAGES, TINY
cfg = TrainConfig(steps=8, batch_size=2, patch_size=16, checkpoint_every=3, workers=2)
fit(TINY, DiffusionConfig(), cfg, IMAGES, device="cpu", ckpt_path=sys.argv[1], progress=False,
    on_checkpoint=lambda step, path: os.kill(os.getpid(), signal.SIGKILL))
"""


@pytest.mark.timeout(300)
def test_a_run_with_workers_killed_after_a_checkpoint_resumes_to_the_same_weights(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=8, batch_size=2, patch_size=16, checkpoint_every=3, workers=2)
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_CHECKPOINT, str(tmp_path / "killed.pt")], cwd=ROOT,
                            capture_output=True, text=True, timeout=240,
                            env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert _states(tmp_path / "killed.pt")["step"] == 3
    _fit(cfg, tmp_path / "killed.pt")  # resumes at step 4, workers making steps 4..8
    _fit(cfg, tmp_path / "straight.pt")
    straight, resumed = _states(tmp_path / "straight.pt"), _states(tmp_path / "killed.pt")
    assert resumed["step"] == 8
    for part in ("model", "ema", "optimizer"):
        assert _equal(straight, resumed, part), part


def test_bfloat16_autocast_trains_float32_weights_and_other_precisions_are_refused(tmp_path: Path) -> None:
    summary = _fit(TrainConfig(steps=2, batch_size=2, patch_size=16, precision="bfloat16"), tmp_path / "bf16.pt")
    states = _states(tmp_path / "bf16.pt")
    assert np.isfinite(summary["final_loss"])
    assert {t.dtype for t in states["model"].values() if t.is_floating_point()} == {torch.float32}
    assert {t.dtype for t in states["ema"].values() if t.is_floating_point()} == {torch.float32}
    fp32 = _fit(TrainConfig(steps=2, batch_size=2, patch_size=16, precision="float32"), tmp_path / "fp32.pt")
    assert summary["final_loss"] != fp32["final_loss"]  # autocast did run in bfloat16
    with pytest.raises(ValueError, match=r"precision must be one of \['auto', 'float32', 'bfloat16'\]"):
        TrainConfig(precision="fp16")


def test_compile_wraps_the_training_objective(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real compile takes minutes on this CPU (bench.train_input part 4); here, its wiring."""
    from idm.train import Objective

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module: compiled.append(module) or module)
    _fit(TrainConfig(steps=1, batch_size=2, patch_size=16), tmp_path / "eager.pt")
    assert compiled == []
    _fit(TrainConfig(steps=1, batch_size=2, patch_size=16, compile=True), tmp_path / "compiled.pt")
    assert len(compiled) == 1 and isinstance(compiled[0], Objective)
    with pytest.raises(ValueError, match="compile must be True or False"):
        TrainConfig(compile="yes")
