"""A tiny training run for tests/idm/test_train.py to launch under torchrun.

    python -m torch.distributed.run --nproc-per-node 2 -m tests.idm.ddp_worker OUT_DIR STEPS

Trains on CPU (gloo) into OUT_DIR/ckpt.pt (a copy of the step-3 checkpoint goes to
OUT_DIR/ckpt_step3.pt); each hook call leaves a file named after the rank that made
it, so the test can check that only rank 0 logs and checkpoints.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from idm.config import DiffusionConfig, ModelConfig, TrainConfig
from idm.train import cleanup_distributed, fit, setup_distributed
from tests.helpers import photo

MODEL = ModelConfig(encoder_blocks=1, encoder_channels=8, base_channels=8, channel_mults=(1, 2), res_blocks=1,
                    attention_levels=(), mid_attention=False, dropout=0.1, norm_groups=4, implicit_hidden=16,
                    modulation_hidden=8)


def main(out: Path, steps: int) -> None:
    torch.set_num_threads(1)
    info = setup_distributed("cpu")
    try:
        def on_log(step: int, metrics: dict[str, float]) -> None:
            with open(out / f"log_rank{info.rank}.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")

        def on_checkpoint(step: int, path: Path) -> None:
            (out / f"checkpoint_rank{info.rank}_step{step}").touch()
            if step == 3:  # kept for the resume test
                shutil.copy(path, out / "ckpt_step3.pt")

        cfg = TrainConfig(steps=steps, batch_size=2, patch_size=16, log_every=2, checkpoint_every=3)
        summary = fit(MODEL, DiffusionConfig(), cfg, [photo(40, 48, 1), photo(36, 36, 2)], device=info.device,
                      ckpt_path=out / "ckpt.pt", on_log=on_log, on_checkpoint=on_checkpoint, progress=False)
        (out / f"summary_rank{info.rank}.json").write_text(json.dumps({"world_size": info.world_size, **summary}))
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
