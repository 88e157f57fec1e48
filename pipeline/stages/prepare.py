"""prepare stage: disjoint train/test split per dataset and LR/HR test pairs per scale.

Layout of the output (default data/prepared/):
  <dataset>/train/<image>.png           training HR images (8-bit RGB)
  <dataset>/test/x<scale>/HR/<image>.png HR cropped so the LR size is whole
  <dataset>/test/x<scale>/LR/<image>.png LR made by idm.resize (bicubic, antialiased)
  manifest.csv                           one row per image (train) or pair (test)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from pipeline.data.datasets import center_crop, make_pair, read_all, scale_tag, split
from pipeline.data.images import list_images, write_image
from pipeline.params import ROOT, DatasetParams, PrepareParams, load
from pipeline.stages import run
from pipeline.workspace import staged_dir


def prepare_dataset(ds: DatasetParams, prep: PrepareParams, raw: Path, out: Path) -> list[dict]:
    """Write one dataset's train images and test pairs under `out`; return manifest rows."""
    paths = list_images(raw)
    if not paths:
        raise ValueError(f"{raw}: dataset {ds.name!r} has no images")
    images = read_all(paths)
    files = {p.stem: p for p in paths}
    train, test = split(list(images), ds.test_fraction, prep.seed)
    rows: list[dict] = []
    for name in train:
        path = out / "train" / f"{name}.png"
        write_image(path, images[name])
        h, w = images[name].shape[:2]
        rows.append(dict(dataset=ds.name, split="train", image=name, hr=str(path.relative_to(out.parent)), hr_h=h, hr_w=w))
    for name in test:
        hr_full = center_crop(images[name], ds.test_crop)
        for scale in prep.all_scales:
            try:
                hr, lr = make_pair(hr_full, scale)
            except ValueError as err:  # e.g. a 1x1 image: no LR image can be made from it
                raise ValueError(f"{files[name]}: test image of {hr_full.shape[1]}x{hr_full.shape[0]} px "
                                 f"cannot be used at scale x{scale:g}: {err}") from None
            pair_dir = out / "test" / scale_tag(scale)
            write_image(pair_dir / "HR" / f"{name}.png", hr)
            write_image(pair_dir / "LR" / f"{name}.png", lr)
            rows.append(dict(
                dataset=ds.name, split="test", image=name, scale=scale,
                in_distribution=scale in prep.scales,
                hr=f"{ds.name}/test/{scale_tag(scale)}/HR/{name}.png",
                lr=f"{ds.name}/test/{scale_tag(scale)}/LR/{name}.png",
                hr_h=hr.shape[0], hr_w=hr.shape[1], lr_h=lr.shape[0], lr_w=lr.shape[1],
            ))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--raw", type=Path, default=ROOT / "data" / "raw")
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "prepared")
    args = parser.parse_args()
    params = load(args.params)
    with staged_dir(args.out) as tmp:
        rows = []
        for ds in params.datasets:
            ds_rows = prepare_dataset(ds, params.prepare, args.raw / ds.name, tmp / ds.name)
            n_train = sum(r["split"] == "train" for r in ds_rows)
            print(f"{ds.name}: {n_train} train images, {len(ds_rows) - n_train} test pairs")
            rows += ds_rows
        columns = ["dataset", "split", "image", "scale", "in_distribution", "hr", "lr", "hr_h", "hr_w", "lr_h", "lr_w"]
        pd.DataFrame(rows, columns=columns).to_csv(tmp / "manifest.csv", index=False)


if __name__ == "__main__":
    run(main)
