"""Training throughput on this CPU: 1 process x 1 thread, 1 x N threads, N DDP processes x 1 thread.

Usage: python -m bench.train_speed [--params params.yaml] [--steps 30] [--cores 2]
Runs the recipe's `fit` on its own training images (data/prepared for params.yaml;
recipes/pretrain.yaml trains on ../shared/datasets/SunHays80) for --steps steps in each
layout, after a warm-up of 3 steps, and prints samples/s side by side with the CPU's
capability. Run it on a quiet machine: another process on a core skews every layout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from idm.device import cpu_summary
from pipeline.params import ROOT, load


def images_for(params_path: Path) -> list:
    from pipeline.data.images import list_images, read_image

    params = load(params_path)
    folders = [ROOT / d.path for d in params.datasets if d.source == "folder" and d.test_fraction < 1]
    if folders:
        return [read_image(p) for folder in folders for p in list_images(folder)]
    from pipeline.stages.train import read_training_images

    return read_training_images(ROOT / "data" / "prepared")


def worker(params_path: Path, steps: int, threads: int) -> None:
    """One process of a layout: prints {"samples_per_s"} of `steps` steps after 3 warm-up steps (rank 0)."""
    from idm.train import cleanup_distributed, fit, setup_distributed

    torch.set_num_threads(threads)
    params = load(params_path)
    info = setup_distributed("cpu")
    images = images_for(params_path)
    cfg = dataclasses.replace(params.train, steps=3, checkpoint_every=0, sample_every=0, log_every=1)
    fit(params.model, params.diffusion, cfg, images, device="cpu", progress=False)
    cfg = dataclasses.replace(cfg, steps=steps, log_every=steps)
    summary = fit(params.model, params.diffusion, cfg, images, device="cpu", progress=False)
    if info.rank == 0:
        print(json.dumps({"samples_per_s": summary["samples_per_s"]}))
    cleanup_distributed()


def layout(params_path: Path, steps: int, procs: int, threads: int) -> float:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    args = ["-m", "bench.train_speed", "--worker", "--params", str(params_path), "--steps", str(steps),
            "--threads", str(threads)]
    cmd = [sys.executable, *args] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), *args]
    out = subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["samples_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.params, args.steps, args.threads)
    print(f"CPU: {cpu_summary()}; {os.cpu_count()} cpus; {args.params.name}, {args.steps} steps per layout")
    rows = [(1, 1), (1, args.cores), (args.cores, 1)]
    base = None
    for procs, threads in rows:
        t0 = time.perf_counter()
        speed = layout(args.params, args.steps, procs, threads)
        base = base or speed
        print(f"{procs} process(es) x {threads} thread(s): {speed:6.1f} samples/s  ({speed / base:.2f}x)  "
              f"[{time.perf_counter() - t0:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
