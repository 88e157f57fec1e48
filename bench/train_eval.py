"""Train IDM on one configuration and compare it with bicubic, stage by stage, in a scratch workspace.

Usage: python -m bench.train_eval --params bench/sunhays80.yaml --work /tmp/idm-bench
Runs download, prepare, train and evaluate (the project's own stage entry points) with
all outputs under --work, then prints Y-PSNR/SSIM of IDM and bicubic per dataset x
scale, their difference, and the training throughput.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd


def stage(name: str, *args: object) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", f"pipeline.stages.{name}", *map(str, args)], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("bench/sunhays80.yaml"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/idm-bench"))
    args = parser.parse_args()
    w, p = args.work, args.params.resolve()
    w.mkdir(parents=True, exist_ok=True)
    seconds = {"download": stage("download", "--params", p, "--out", w / "raw", "--cache", w / "cache")}
    seconds["prepare"] = stage("prepare", "--params", p, "--raw", w / "raw", "--out", w / "prepared")
    seconds["train"] = stage("train", "--params", p, "--prepared", w / "prepared", "--out", w / "models")
    seconds["evaluate"] = stage("evaluate", "--params", p, "--prepared", w / "prepared", "--sr-out", w / "sr",
                                "--metrics", w / "metrics.json",
                                "--unavailable", w / "unavailable.json", "--scales", w / "scales.csv",
                                "--per-image", w / "per_image.csv", "--checkpoint", w / "models" / "model.pt")
    table = pd.read_csv(w / "scales.csv")
    wide = table.pivot_table(index=["dataset", "scale"], columns="method", values=["psnr_y", "ssim_y"])
    wide[("psnr_y", "idm - bicubic")] = wide[("psnr_y", "idm")] - wide[("psnr_y", "bicubic")]
    print(wide.round(4).to_markdown())
    summary = json.loads((w / "models" / "registered.json").read_text())
    import mlflow

    metrics = mlflow.get_run(summary["run_id"]).data.metrics
    print(f"\ntraining: {metrics.get('train_samples_per_s', float('nan')):.1f} samples/s, "
          f"{metrics.get('train_seconds', float('nan')):.0f} s for {metrics.get('train_steps_run', 0):.0f} steps")
    print("stage seconds:", {k: round(v) for k, v in seconds.items()})


if __name__ == "__main__":
    main()
