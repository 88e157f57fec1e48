"""report stage: reports/report.md with tables, PSNR-vs-scale and PSNR-vs-NIQE plots and visual grids.

The outputs replace the previous ones together, only once all are written.
"""

from __future__ import annotations

import argparse
import json
from contextlib import ExitStack
from pathlib import Path

import pandas as pd

from idm.files import atomic_path
from pipeline import tracking
from pipeline.data.datasets import scale_tag
from pipeline.evaluation.report import (
    plot_perception_distortion,
    plot_psnr_vs_scale,
    render_markdown,
    visual_grid,
)
from pipeline.params import ROOT, load
from pipeline.stages import run
from pipeline.workspace import staged_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--prepared", type=Path, default=ROOT / "data" / "prepared")
    parser.add_argument("--sr", type=Path, default=ROOT / "data" / "sr")
    parser.add_argument("--reports", type=Path, default=ROOT / "reports")
    args = parser.parse_args()
    params = load(args.params)
    tracking.setup()  # an unavailable MLflow store fails here, before any work
    table = pd.read_csv(args.reports / "scales.csv")
    per_image = pd.read_csv(args.reports / "per_image.csv")
    unavailable = json.loads((args.reports / "unavailable.json").read_text())

    plot, report = args.reports / "psnr_vs_scale.png", args.reports / "report.md"
    perception = args.reports / "psnr_vs_niqe.png"
    grids = []
    # Written to temporary files and folder; all three replace the old ones only once everything is written.
    with staged_dir(args.reports / "grids") as grid_dir, ExitStack() as outputs:
        plot_psnr_vs_scale(table, outputs.enter_context(atomic_path(plot)))
        plot_perception_distortion(table, params.report.grid_scales, outputs.enter_context(atomic_path(perception)))
        for dataset in sorted(table.dataset.unique()):
            for scale in params.report.grid_scales:
                name = f"{dataset}_{scale_tag(scale)}.png"
                if visual_grid(per_image, args.prepared, args.sr, dataset, scale, params.report.crop, grid_dir / name):
                    grids.append(args.reports / "grids" / name)
        outputs.enter_context(atomic_path(report)).write_text(render_markdown(table, unavailable, grids, plot, report,
                                                                                     perception))
    print(f"wrote {report} with {len(grids)} visual grids")

    import mlflow

    with tracking.stage_run("report", tags={"datasets": ",".join(sorted(table.dataset.unique()))}):
        for path in [report, plot, perception, *grids]:
            mlflow.log_artifact(str(path), artifact_path="report" if path.parent == args.reports else "report/grids")


if __name__ == "__main__":
    run(main)
