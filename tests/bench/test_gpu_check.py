"""bench.gpu_check runs end to end on CPU with --tiny, so the script a GPU machine needs cannot rot."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.helpers import ROOT


def test_the_gpu_check_runs_on_cpu_and_reports_every_figure():
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--tiny", "--workers", "1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                               "IDM_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "bfloat16 autocast: False" in out  # CPU: float32 (precision auto)
    assert re.search(r"train: 4 steps, batch 2, 1 input workers\n  [\d.]+ it/s, [\d.]+ samples/s, "
                     r"peak GPU memory nan GiB, input wait [\d.]+%", out), out
    assert re.search(r"loss: first [\d.]+, middle [\d.]+, last [\d.]+ \(4 log points\)", out), out
    assert "upscale: 179x179 (0.0 Mpx) in" in out, out
