"""Checkpoints: round trip, atomic writes, weights-only loading, damaged files, config checks, one writer."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

import idm.checkpoint
from idm.checkpoint import (
    CheckpointError,
    build_model,
    check_same_configs,
    exclusive_writer,
    load_checkpoint,
    make_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from idm.config import DiffusionConfig, ModelConfig, TrainConfig
from idm.models import IDM
from idm.train import EMA

TINY = ModelConfig(encoder_blocks=1, encoder_channels=8, base_channels=8, channel_mults=(1, 2), res_blocks=1,
                   attention_levels=(), mid_attention=False, dropout=0.0, norm_groups=4, implicit_hidden=16,
                   modulation_hidden=8)
CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads; on a busy machine they only slow down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _checkpoint(step: int = 7) -> dict:
    """A real checkpoint of a tiny model after one optimiser step, EMA differing from the weights."""
    torch.manual_seed(0)
    model = IDM(TINY)
    ema = EMA(model, decay=0.9)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    cond = model.condition(torch.rand(2, 3, 6, 6) * 2 - 1, (12, 12))
    model(torch.randn(2, 3, 12, 12), torch.rand(2), cond).square().mean().backward()
    opt.step()
    ema.update(model, step=100)
    return make_checkpoint(model_config=TINY, diffusion_config=DiffusionConfig(), train_config=TrainConfig(),
                           model=model.state_dict(), ema=ema.state_dict(), optimizer=opt.state_dict(),
                           step=step, rng=[rng_state(torch.Generator().manual_seed(3), CPU)])


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_round_trip_rebuilds_an_identical_model(tmp_path: Path) -> None:
    ckpt = _checkpoint()
    save_checkpoint(ckpt, tmp_path / "ckpt.pt")
    loaded = load_checkpoint(tmp_path / "ckpt.pt")
    assert loaded["format"] == 1 and loaded["step"] == 7
    assert ModelConfig(**loaded["model_config"]) == TINY
    assert DiffusionConfig(**loaded["diffusion_config"]) == DiffusionConfig()
    assert TrainConfig(**loaded["train_config"]) == TrainConfig()
    raw, ema = build_model(loaded, use_ema=False), build_model(loaded)
    assert _same_state(raw.state_dict(), ckpt["model"]) and _same_state(ema.state_dict(), ckpt["ema"])
    assert not _same_state(raw.state_dict(), ema.state_dict())
    assert not raw.training
    # Same weights, same outputs as a model built by hand from the stored state.
    twin = IDM(TINY).eval()
    twin.load_state_dict(ckpt["model"])
    lr, x = torch.rand(1, 3, 5, 7) * 2 - 1, torch.randn(1, 3, 11, 16)
    with torch.no_grad():
        assert torch.equal(raw(x, torch.tensor([0.3]), raw.condition(lr, (11, 16))),
                           twin(x, torch.tensor([0.3]), twin.condition(lr, (11, 16))))


def test_optimizer_state_survives_the_round_trip(tmp_path: Path) -> None:
    ckpt = _checkpoint()
    save_checkpoint(ckpt, tmp_path / "ckpt.pt")
    model = build_model(load_checkpoint(tmp_path / "ckpt.pt"), use_ema=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt.load_state_dict(load_checkpoint(tmp_path / "ckpt.pt")["optimizer"])
    for i, state in ckpt["optimizer"]["state"].items():
        assert all(torch.equal(v, opt.state_dict()["state"][i][k]) for k, v in state.items())


def test_a_failed_save_leaves_the_previous_checkpoint_and_no_temp_file(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint(_checkpoint(step=1), path)
    before = path.read_bytes()

    def half_written_then_crash(obj: object, f) -> None:
        f.write(before[: len(before) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(idm.checkpoint.torch, "save", half_written_then_crash)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(_checkpoint(step=2), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1


class _Payload:
    """Unpickling this object would create a marker file (standing in for any code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def test_a_malicious_pickle_is_refused_without_running_it(tmp_path: Path) -> None:
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    ckpt = _checkpoint()
    ckpt["model"]["innocent.weight"] = _Payload(marker)
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"evil\.pt.*refusing to load"):
        load_checkpoint(path)
    assert not marker.exists()
    # Control: an unsafe loader would have run the payload.
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_damaged_file_is_rejected_naming_it(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "damaged.pt"
    save_checkpoint(_checkpoint(), path)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 3], "garbage": b"\x00not a checkpoint" * 50,
                      "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=r"damaged\.pt: corrupt or truncated"):
        load_checkpoint(path)


def test_missing_file_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match=r"foreign\.pt: not an IDM checkpoint of format 1"):
        load_checkpoint(tmp_path / "foreign.pt")
    partial = {k: v for k, v in _checkpoint().items() if k not in ("ema", "rng")}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"partial\.pt: checkpoint lacks the keys \['ema', 'rng'\]"):
        load_checkpoint(tmp_path / "partial.pt")


def test_config_mismatch_names_every_differing_key() -> None:
    ckpt = _checkpoint()
    same = {"model_config": asdict(TINY), "train_config": asdict(TrainConfig())}
    check_same_configs(ckpt, same)  # no error
    changed = {"model_config": asdict(TINY) | {"base_channels": 16},
               "train_config": asdict(TrainConfig(lr=3e-4, steps=50))}
    with pytest.raises(ValueError) as err:
        check_same_configs(ckpt, changed, source="run/ckpt.pt")
    message = str(err.value)
    assert "run/ckpt.pt" in message and "3 key(s)" in message
    assert "model_config.base_channels (checkpoint 8, now 16)" in message
    assert "train_config.lr (checkpoint 0.0001, now 0.0003)" in message
    assert "train_config.steps (checkpoint 2000, now 50)" in message
    check_same_configs(ckpt, {"train_config": asdict(TrainConfig(steps=50))}, may_change={"train_config": ["steps"]})


def test_lists_from_yaml_equal_tuples() -> None:
    ckpt = _checkpoint()
    as_yaml = asdict(TINY) | {"channel_mults": [1, 2], "attention_levels": []}
    check_same_configs(ckpt, {"model_config": as_yaml})


def test_rng_state_restores_every_generator_through_a_file(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    save_checkpoint(make_checkpoint(model_config=TINY, diffusion_config=DiffusionConfig(), train_config=TrainConfig(),
                                    model={}, ema={}, optimizer={}, step=0, rng=[rng_state(gen, CPU)]),
                    tmp_path / "rng.pt")

    def draws() -> list:
        return [torch.rand(3).tolist(), torch.rand(3, generator=gen).tolist(), np.random.normal(size=3).tolist(),
                [random.random() for _ in range(3)]]

    expected = draws()
    draws()  # move every generator on
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"][0], gen, CPU)
    assert draws() == expected


def test_a_second_writer_is_refused_naming_the_lock_and_its_holder(tmp_path: Path) -> None:
    path, lock = tmp_path / "checkpoint.pt", tmp_path / "checkpoint.pt.lock"
    with exclusive_writer(path, owner=4321):
        assert lock.read_text() == "4321\n"
        with pytest.raises(CheckpointError, match=r"checkpoint\.pt is being written by another training \(PID 4321, "
                                                  r"which holds .*checkpoint\.pt\.lock\)"):
            with exclusive_writer(path):  # a second open file: flock refuses it even in this process
                pass
        assert lock.read_text() == "4321\n", "the refused writer changed nothing"
    assert not lock.exists(), "the lock file goes with its holder"
    with exclusive_writer(path):
        assert lock.read_text() == f"{os.getpid()}\n"


def test_a_lock_held_by_another_process_is_released_when_it_is_killed(tmp_path: Path) -> None:
    """The kernel drops a killed holder's lock; its stale file (and PID) never blocks the next writer."""
    path, lock = tmp_path / "checkpoint.pt", tmp_path / "checkpoint.pt.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, b'777\\n')\n"
        "print('held', flush=True)\n"
        "time.sleep(120)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(CheckpointError, match="PID 777"):
            with exclusive_writer(path):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert lock.read_text() == "777\n"
    with exclusive_writer(path, owner=5):
        assert lock.read_text() == "5\n"
    assert not lock.exists()


class _RunsCode:
    def __reduce__(self):
        import os

        return (os.system, ("true",))


@pytest.mark.parametrize("payload", [_RunsCode(), {"model": frozenset([1])}], ids=["reduce-to-os.system", "frozenset"])
def test_a_checkpoint_with_python_objects_is_refused_by_name_without_weights_only_advice(tmp_path, payload):
    from idm.checkpoint import load_plain

    path = tmp_path / "evil.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError) as caught:
        load_plain(path, what="checkpoint")
    message = str(caught.value)
    assert "refusing to load: it references the Python object" in message and "\n" not in message
    assert "weights_only=False" not in message and "corrupt" not in message
