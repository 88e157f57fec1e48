"""train stage: fit IDM on the prepared training images, log to MLflow, register the EMA model.

Outputs (default models/idm/): checkpoint.pt (full state, for resuming), model.pt
(configs + EMA weights, what is registered and evaluated) and registered.json (MLflow
run id and model version). An interrupted run resumes from checkpoint.pt; a finished
or incompatible one is set aside and training starts afresh. Runs unchanged under
`torchrun --nproc-per-node N -m pipeline.stages.train` (DDP; rank 0 logs and saves), which
the stage starts itself on CPU with `train.processes` > 1 (`launch_processes`).

One run per output folder: rank 0 holds a lock beside checkpoint.pt for the whole run
(idm.checkpoint.exclusive_writer), and a second training of the same folder stops with one
`error:` line naming the PID that holds it. DDP processes die with the process that started
them (`die_with_parent`), so a killed stage never leaves workers rewriting its checkpoint.

MLflow: an unavailable or locked store stops the stage before training starts
(pipeline.tracking.setup, one `error:` line). A finished run is never lost to the store:
between the end of training and registration, pending.json records the run (its step
and a digest of the training images); if registration fails or the stage is killed
there, the next run on the same images and configuration registers that checkpoint
without training it again.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import logging
import os
import signal
import sys
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from idm.checkpoint import (
    CheckpointError,
    check_same_configs,
    check_weights,
    exclusive_writer,
    load_checkpoint,
    save_checkpoint,
)
from idm.config import RESUMABLE_CHANGES
from idm.data import DecodedImages, hr_patch_side
from idm.device import resolve_device
from idm.files import atomic_path
from idm.train import cleanup_distributed, fit, setup_distributed
from pipeline.data.images import read_image
from pipeline.params import ROOT, Params, flatten, load
from pipeline.stages import run


def training_paths(prepared: Path) -> list[Path]:
    """The HR image files of the manifest's train split."""
    manifest = pd.read_csv(prepared / "manifest.csv")
    rows = manifest[manifest.split == "train"]
    if rows.empty:
        raise ValueError(f"{prepared / 'manifest.csv'}: no training images (every dataset has test_fraction 1?)")
    return [prepared / hr for hr in rows.hr]


def read_training_images(prepared: Path) -> list[np.ndarray]:
    """The HR images of the manifest's train split, as (H, W, 3) uint8 arrays."""
    return [read_image(path) for path in training_paths(prepared)]


def decoded_training_images(prepared: Path, cache: Path, patch_size: int) -> tuple[DecodedImages, str]:
    """The training images decoded once into `cache` (idm.data.DecodedImages) and their
    inputs_digest; a cache written for the same files (names, sizes, mtimes) and patch size is reused.

    Used with train.workers > 0, so a large dataset streams from disk instead of being held
    in every process's memory. Call it on one process first (the others then find the cache).
    """
    paths = training_paths(prepared)
    files = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
    key = hashlib.sha256(json.dumps([patch_size, files]).encode())
    index = cache / "index.json"
    try:
        record = json.loads(index.read_text())
        if record["key"] == key.hexdigest():
            return DecodedImages(cache, record["shapes"]), record["inputs"]
    except (OSError, ValueError, KeyError):
        pass
    digest = hashlib.sha256()

    def decoded():  # one image in memory at a time, digested as it goes by
        for path in paths:
            img = read_image(path)
            _digest_image(digest, img)
            yield img

    images = DecodedImages.build(decoded, cache, patch_size)
    with atomic_path(index) as tmp:
        tmp.write_text(json.dumps({"key": key.hexdigest(), "inputs": digest.hexdigest(), "shapes": images.shapes}))
    return images, digest.hexdigest()


PENDING = "pending.json"  # a finished training run that is not registered yet


def inputs_digest(images: list[np.ndarray]) -> str:
    """sha256 of the training images (shapes and pixels): tells a rerun on the same data from one on new data
    (decoded_training_images computes the same)."""
    digest = hashlib.sha256()
    for img in images:
        _digest_image(digest, img)
    return digest.hexdigest()


def _digest_image(digest: Any, img: np.ndarray) -> None:
    digest.update(f"{img.shape}|".encode())
    digest.update(np.ascontiguousarray(img).tobytes())


def awaits_registration(out: Path, params: Params, inputs: str) -> bool:
    """Whether out/checkpoint.pt is a finished run of exactly this config on these images that never got registered."""
    try:
        record = json.loads((out / PENDING).read_text())
        ckpt = load_checkpoint(out / "checkpoint.pt")
        check_same_configs(ckpt, {"model_config": asdict(params.model), "diffusion_config": asdict(params.diffusion),
                                  "train_config": asdict(params.train)})
    except (OSError, ValueError):  # no record, a damaged one, no checkpoint, another config (CheckpointError too)
        return False
    return (isinstance(record, dict) and record.get("inputs") == inputs
            and record.get("step") == ckpt["step"] == params.train.steps)


def resume_blocker(path: Path, params: Params) -> str | None:
    """Why the checkpoint at `path` must not be resumed, or None if it is an interrupted run of this config."""
    if not path.exists():
        return "no checkpoint"
    try:
        ckpt = load_checkpoint(path)
        current = {"model_config": asdict(params.model), "diffusion_config": asdict(params.diffusion),
                   "train_config": asdict(params.train)}
        check_same_configs(ckpt, current, may_change={"train_config": RESUMABLE_CHANGES}, source=str(path))
        for part in ("model", "ema"):  # resuming loads them into a model of the current config
            check_weights(params.model, ckpt[part], source=str(path))
    except (CheckpointError, ValueError) as err:
        return str(err)
    if ckpt["step"] >= params.train.steps:
        return f"{path} is a finished run ({ckpt['step']} steps); its inputs changed"
    return None


def export_inference(checkpoint: Path, out: Path) -> int:
    """Write configs + EMA weights only (what evaluation and the registry need); returns the parameter count."""
    ckpt = load_checkpoint(checkpoint)
    save_checkpoint({**ckpt, "model": ckpt["ema"], "optimizer": {}, "rng": []}, out)
    return sum(t.numel() for t in ckpt["ema"].values() if t.is_floating_point())


def sample_logger(params: Params, images: list[np.ndarray] | DecodedImages, device: torch.device):
    """on_sample hook: the EMA model's x4 output for a fixed LR crop, logged as an MLflow image.

    Sampled untiled with params.yaml's sampler, as evaluate samples this small a crop.
    """
    import mlflow

    from idm.diffusion.sampling import spaced_timesteps, super_resolve
    from idm.diffusion.schedule import schedule_for
    from idm.diffusion.targets import decoder
    from idm.resize import to_model_range, to_uint8
    from pipeline.data.datasets import center_crop, make_pair

    first = images[0] if isinstance(images, list) else np.ascontiguousarray(images[0].transpose(1, 2, 0))
    hr, lr = make_pair(center_crop(first, 128), 4)
    d, s = params.diffusion, params.sample  # the sample looks like what evaluate will produce
    schedule = schedule_for(d)
    # at least one step: with the `fidelity` preset (steps 0) the preview is still a diffusion sample
    timesteps = spaced_timesteps(d.timesteps, max(1, min(s.steps, d.timesteps)), s.spacing)
    decode = decoder(params.train.target, params.train.residual_scale)

    @torch.inference_mode()
    def log_sample(step: int, model: torch.nn.Module) -> None:
        generator = torch.Generator(device).manual_seed(s.seed)
        out = super_resolve(model.to(device).eval(), to_model_range(lr, device), hr.shape[:2], timesteps,
                            schedule=schedule, sample=s, decode=decode, generator=generator)
        mlflow.log_image(np.concatenate([to_uint8(out), hr], axis=1), key="sample_x4", step=step)

    return log_sample


def main() -> None:
    if "WORLD_SIZE" in os.environ:  # a DDP process (ours or a hand-typed torchrun's)
        die_with_parent()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--prepared", type=Path, default=ROOT / "data" / "prepared")
    parser.add_argument("--out", type=Path, default=ROOT / "models" / "idm")
    parser.add_argument("--alias", default="candidate", help="registry alias of the new version (default candidate)")
    args = parser.parse_args()
    params = load(args.params)
    if params.train_stage.threads:
        torch.set_num_threads(params.train_stage.threads)
    streamed = params.train.workers > 0  # then from decoded files on disk, shared by every process

    def training_data():
        if streamed:  # outside the DVC outputs, so prepare's stays as DVC recorded it
            return decoded_training_images(args.prepared, args.prepared.parent / "train-cache",
                                           hr_patch_side(params.train))
        images = read_training_images(args.prepared)
        return images, inputs_digest(images)

    # Here too when launching: bad data fails before any process starts. With several
    # processes, rank 0 decodes into the cache and the others read it after a barrier.
    later = streamed and int(os.environ.get("RANK", "0")) > 0
    images, inputs = (None, None) if later else training_data()
    device = resolve_device(params.train_stage.device)
    ckpt_path = args.out / "checkpoint.pt"
    if params.train_stage.processes > 1 and device.type == "cpu" and "WORLD_SIZE" not in os.environ:
        from pipeline.tracking import setup

        setup()  # likewise an unavailable store: one error line
        del images  # the processes read their own
        sys.exit(launch_processes(params.train_stage.processes, params.train_stage.threads or 1, ckpt_path))
    info = setup_distributed(device)
    if streamed and info.world_size > 1:
        torch.distributed.barrier()
    if later:
        images, inputs = training_data()
    with contextlib.ExitStack() as held:
        held.callback(cleanup_distributed)
        if info.rank == 0:
            args.out.mkdir(parents=True, exist_ok=True)
            held.enter_context(exclusive_writer(ckpt_path, owner=int(os.environ.get(LAUNCHER, os.getpid()))))
            prepare_output(args.out, params, inputs)
        if info.world_size > 1:
            torch.distributed.barrier()
        if info.rank == 0:
            train_and_register(params, images, info.device, args.out, inputs, alias=args.alias)
        else:
            fit(params.model, params.diffusion, params.train, images, device=info.device, ckpt_path=ckpt_path)


def prepare_output(out: Path, params: Params, inputs: str) -> None:
    """Rank 0, holding the lock: decide whether out/checkpoint.pt is registered as is, resumed, or
    set aside (as checkpoint.pt.old) for a fresh start, and say which."""
    ckpt_path = out / "checkpoint.pt"
    if awaits_registration(out, params, inputs):  # fit() resumes it at its last step: nothing to train
        print(f"{ckpt_path} is a finished run on these images that was not registered: registering it "
              "without training again")
        return
    (out / PENDING).unlink(missing_ok=True)
    reason = resume_blocker(ckpt_path, params)
    if reason is None:
        print(f"resuming from {ckpt_path}")
    elif ckpt_path.exists():
        print(f"starting afresh: {reason}")
        os.replace(ckpt_path, ckpt_path.with_suffix(".pt.old"))


# ---------------------------------------------------------------- DDP processes

LAUNCHER = "IDM_TRAIN_LAUNCHER"  # set by launch_processes for its DDP processes: its PID
STOPPED = 143  # exit code of a DDP process stopped by its launcher or by another process's death
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """In a DDP process: have Linux SIGKILL it when its parent (launch_processes, or torchrun) ends,
    however that ends, and exit at once if the launcher that started it is already gone (it died
    before the request took effect). Why: an orphan would go on rewriting the checkpoint."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    parent = os.getppid()  # under a hand-typed torchrun its PID is unknown: only the request above holds
    if os.environ.get(LAUNCHER, str(parent)) != str(parent):
        print("error: the training launcher ended before this DDP process started; exiting", file=sys.stderr)
        sys.exit(STOPPED)


def worker_main() -> None:
    """main() in a DDP process of launch_processes: stopped by the launcher (SIGINT, SIGTERM) or
    by another process's death (a collective fails), it exits quietly with STOPPED, since the
    launcher reports the run's one cause; errors of its own it reports itself (pipeline.stages.run)."""
    try:
        main()
    except (KeyboardInterrupt, torch.distributed.DistError):
        sys.exit(STOPPED)
    except RuntimeError as err:  # DDP's gradient all-reduce reports a lost peer as gloo's RuntimeError
        if "/gloo/" not in str(err):
            raise
        sys.exit(STOPPED)


def launch_processes(processes: int, threads: int, ckpt_path: Path) -> int:
    """Run this stage again as `processes` DDP processes of `threads` threads each and return the
    exit code (torchrun's elastic agent, standalone, in this process): on 2 CPU cores the fastest
    layout (bench/README.md, "Training layout").

    The processes are children of this one and die with it (die_with_parent). torchrun's logs
    go nowhere (no log folder in TMPDIR); the run ends in at most one `error:` line: the
    failing process's own, `interrupted` (Ctrl-C or SIGTERM here: the processes stop, the last
    checkpoint stands) or `training worker R died (signal N)`.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, get_args_parser

    if ckpt_path.parent.is_dir():
        with exclusive_writer(ckpt_path):  # another training of this folder: refused before any start-up
            pass
    os.environ.update({LAUNCHER: str(os.getpid()), "OMP_NUM_THREADS": str(threads)})  # the processes inherit them
    config, cmd, cmd_args = config_from_args(get_args_parser().parse_args([
        "--nnodes=1", f"--nproc-per-node={processes}", "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0",
        f"--rdzv-id={uuid.uuid4()}", f"--log-dir={os.devnull}", "-m", "pipeline.stages.train", *sys.argv[1:]]))
    print(f"training in {processes} DDP processes x {threads} thread(s)", flush=True)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)}
    logging.disable(logging.CRITICAL)  # the agent's own log lines; failures come back as exceptions
    try:
        elastic_launch(config, cmd)(*cmd_args)
        return 0
    except SignalException:  # the agent has stopped the processes
        raise KeyboardInterrupt from None
    except ChildFailedError as err:
        return failure_exit(err.failures)
    finally:
        logging.disable(logging.NOTSET)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def failure_exit(failures: dict[int, Any]) -> int:
    """The exit code of a failed DDP run from its processes' ({rank: ProcessFailure}); prints the
    run's error line unless a process printed its own (exit code 2) or a traceback (1)."""
    codes = {rank: failure.exitcode for rank, failure in sorted(failures.items())}
    for own in (2, 1):
        if own in codes.values():
            return own
    stops = (STOPPED, -signal.SIGTERM, -signal.SIGINT)  # how the agent stops the others once one failed
    rank, code = sorted(codes.items(), key=lambda item: (item[1] in stops, item[1] >= 0))[0]
    how = f"died (signal {-code})" if code < 0 else f"stopped (exit code {code})"
    cut = any(c < 0 for c in codes.values())  # a killed process may have left its progress bar's line open
    print(f"{chr(10) if cut else ''}error: training worker {rank} {how}; the last checkpoint is kept", file=sys.stderr)
    return 2


def recipe_description(params: Params, n_params: int, n_images: int) -> str:
    """What a registered version was trained on and how, in one paragraph (its full params are on its run)."""
    t, m = params.train, params.model
    data = ", ".join(f"{d.name} ({d.source})" for d in params.datasets if d.test_fraction < 1)
    return (f"Float32 EMA model, {n_params:,} parameters (UNet base width {m.base_channels}, encoder "
            f"{m.encoder_blocks} blocks of {m.encoder_channels}), trained by the train stage: {t.steps} steps "
            f"of batch {t.batch_size}, HR patches {t.patch_size} px, scales {t.scale_min:g}-{t.scale_max:g}, "
            f"target {t.target}, on {n_images} training images of {data}.")


def train_and_register(params: Params, images: list[np.ndarray] | DecodedImages, device: torch.device, out: Path,
                       inputs: str, *,
                       alias: str = "candidate") -> None:
    """Rank 0: train inside an MLflow run, then register the EMA model as a new `idm` version with `alias`.

    Between the two, out/pending.json marks the finished run (see the module docstring).
    """
    import mlflow

    from pipeline.mlflow_model import log_and_register
    from pipeline.tracking import MODEL_NAME, stage_run

    ckpt_path = out / "checkpoint.pt"
    with stage_run("train", tags={"model": "idm"}, params=flatten(params)) as active:
        summary = fit(
            params.model, params.diffusion, params.train, images, device=device, ckpt_path=ckpt_path,
            on_log=lambda step, values: mlflow.log_metrics(values, step=step),
            on_sample=sample_logger(params, images, device),
        )
        with atomic_path(out / PENDING) as tmp:
            tmp.write_text(json.dumps({"step": int(summary["steps"]), "inputs": inputs}) + "\n")
        mlflow.log_metrics({f"train_{k}": float(v) for k, v in summary.items()})
        n_params = export_inference(ckpt_path, out / "model.pt")
        version = log_and_register(out / "model.pt", tags={"n_params": str(n_params), "target": params.train.target},
                                   description=recipe_description(params, n_params, len(images)))
        mlflow.MlflowClient().set_registered_model_alias(MODEL_NAME, alias, version)
        record = {"run_id": active.info.run_id, "model_name": MODEL_NAME, "version": version}
    with atomic_path(out / "registered.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    (out / PENDING).unlink(missing_ok=True)
    print(f"registered {MODEL_NAME} version {version} (alias {alias}); {summary['samples_per_s']:.1f} samples/s")


if __name__ == "__main__":
    run(worker_main if LAUNCHER in os.environ and "WORLD_SIZE" in os.environ else main)
