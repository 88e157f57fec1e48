"""download stage: put every dataset's images, as fetched, in data/raw/<name>/."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.data.datasets import copy_folder, export_skimage
from pipeline.params import ROOT, DatasetParams, load
from pipeline.stages import run
from pipeline.workspace import staged_dir


def fetch_dataset(ds: DatasetParams, dest: Path, cache: Path) -> None:
    """Fill `dest` with the images of dataset `ds` from its source."""
    if ds.source == "skimage":
        export_skimage(ds.images, dest)
    elif ds.source == "folder":
        copy_folder((ROOT / ds.path).resolve(), dest)  # type: ignore[operator]
    else:
        from pipeline.data.fetch import fetch
        from pipeline.data.presets import PRESETS

        if ds.preset is not None and ds.preset not in PRESETS:
            raise ValueError(f"datasets[{ds.name}].preset {ds.preset!r} unknown; expected one of {sorted(PRESETS)}")
        preset = PRESETS[ds.preset] if ds.preset else None
        fetch(
            preset.url if preset else ds.url,  # type: ignore[arg-type]
            dest,
            sha256=ds.sha256 or (preset.sha256 if preset else None),
            subdir=ds.subdir or (preset.subdir if preset else None),
            cache_dir=cache,
            progress=sys.stderr.isatty(),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "raw")
    parser.add_argument("--cache", type=Path, default=ROOT / "data" / "cache")
    args = parser.parse_args()
    params = load(args.params)
    with staged_dir(args.out) as tmp:
        for ds in params.datasets:
            fetch_dataset(ds, tmp / ds.name, args.cache)
            print(f"{ds.name}: {sum(1 for _ in (tmp / ds.name).iterdir())} files from {ds.source}")


if __name__ == "__main__":
    run(main)
