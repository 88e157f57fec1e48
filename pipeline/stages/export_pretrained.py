"""Export a trained model.pt as the package's pretrained weights (idm/weights/).

Usage: python -m pipeline.stages.export_pretrained models/pretrained/model.pt
Writes idm/weights/<name>.pt (configs + EMA weights in float32, as model.pt holds
them) and manifest.json (file name, sha256, size, training steps), both atomically;
the previous weights stay until the new ones are complete. `make pretrain` runs it last.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from idm.checkpoint import load_checkpoint
from idm.files import atomic_path, file_sha256
from idm.pretrained import MANIFEST, WEIGHTS_DIR
from pipeline.stages import run

FILE_NAME = "idm-lean.pt"


def export(model: Path, dest_dir: Path = WEIGHTS_DIR) -> dict:
    """Copy `model` (an exported model.pt) into `dest_dir` and record its sha256; returns the manifest."""
    ckpt = load_checkpoint(model)  # refuses anything that is not an IDM checkpoint
    if ckpt.get("optimizer"):
        raise ValueError(f"{model}: a training checkpoint; export its model.pt (EMA weights only) instead")
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / FILE_NAME
    with atomic_path(dest) as tmp:
        shutil.copyfile(model, tmp)
    record = {"file": FILE_NAME, "sha256": file_sha256(dest), "bytes": dest.stat().st_size,
              "steps": int(ckpt["step"]), "preset": "lean", "recipe": "recipes/pretrain.yaml"}
    with atomic_path(dest_dir / MANIFEST.name) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="model.pt written by the train stage")
    args = parser.parse_args()
    record = export(args.model)
    print(f"exported {args.model} -> {WEIGHTS_DIR / record['file']} ({record['bytes'] / 2**20:.1f} MiB, "
          f"sha256 {record['sha256'][:12]}...)")


if __name__ == "__main__":
    run(main)
