"""evaluate stage: run each method over every test pair; write metrics and log them to MLflow.

Outputs: data/sr/<method>/<dataset>/x<scale>/<image>.png (the SR images),
reports/metrics.json (DVC metrics: numbers only, {method: {name: value}}),
reports/unavailable.json (why a metric has no number: {name: reason}), reports/scales.csv
(DVC plots: one row per method x dataset x scale), reports/per_image.csv, and one MLflow
run per method.
All of them are replaced together at the end, so a failure (bad input, a full disk)
leaves the previous run's outputs as they were; the MLflow store is checked first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from contextlib import ExitStack
from pathlib import Path

import pandas as pd

from idm.config import SampleConfig
from idm.device import resolve_device, use_threads
from idm.files import atomic_path
from idm.inference.upscaler import Bicubic, DiffusionSR, Method
from pipeline import tracking
from pipeline.evaluation import metrics, weights
from pipeline.evaluation.evaluate import inception_by_group, run_method, summarize
from pipeline.evaluation.names import ALL_METRICS, SET_METRICS, metric_name
from pipeline.evaluation.niqe import PristineModel
from pipeline.params import METHODS, ROOT, EvaluateParams, Params, flatten, load
from pipeline.stages import run
from pipeline.workspace import staged_dir


def build_methods(params: Params, checkpoint: Path, device: str) -> list[Method]:
    """The methods params.yaml asks for: `idm` is the trained checkpoint's EMA model
    sampled as params.yaml's `sample` says, `idm-regression` its regression output
    (sample.steps = 0), `pretrained` and `pretrained-regression` the same two of the
    model shipped in the package (idm.pretrained)."""
    regression = dataclasses.replace(params.sample, steps=0)

    def trained(sample: SampleConfig, name: str) -> Method:
        if not checkpoint.is_file():
            raise FileNotFoundError(f"{checkpoint}: no trained model; run the train stage first (dvc repro train)")
        return DiffusionSR.from_checkpoint(checkpoint, sample, device=device, name=name)

    def idm_int8() -> Method:
        int8 = checkpoint.parent.parent / "idm-int8" / "model_int8.pt"
        if not int8.is_file():
            raise FileNotFoundError(f"{int8}: no int8 model; run the quantize stage first (dvc repro quantize)")
        return trained(params.sample, "idm-int8").use_int8(int8)

    def shipped(sample: SampleConfig, name: str) -> Method:
        from idm.pretrained import weights

        return DiffusionSR.from_checkpoint(weights(), sample, device=device, name=name)

    builders = {
        "bicubic": Bicubic,
        "idm": lambda: trained(params.sample, "idm"),
        "idm-regression": lambda: trained(regression, "idm-regression"),
        "idm-int8": idm_int8,
        "pretrained": lambda: shipped(params.sample, "pretrained"),
        "pretrained-regression": lambda: shipped(regression, "pretrained-regression"),
    }
    assert set(builders) == set(METHODS)
    return [builders[name]() for name in params.evaluate.methods]


def model_uri_method(args: argparse.Namespace, params: Params, device: str) -> list[Method]:
    """A registered model (models:/idm@champion, models:/idm/3, runs:/...) as the only method;
    its download is removed once the weights are loaded."""
    import tempfile

    from pipeline.mlflow_model import checkpoint_from_uri
    from pipeline.tracking import setup

    setup()
    with tempfile.TemporaryDirectory(prefix="idm-model-") as tmp:
        path = checkpoint_from_uri(args.model_uri, Path(tmp))
        method = DiffusionSR.from_checkpoint(path, params.sample, device=device, name=args.label)
        if (path.parent / "model_int8.pt").is_file():  # an int8 version: its artifacts carry the int8 denoiser
            method.use_int8(path.parent / "model_int8.pt")
    return [method]


def trained_model_tags(checkpoint: Path, params: Params) -> dict[str, str]:
    """Link the evaluation to the train run and model version that produced `checkpoint`."""
    record = checkpoint.parent / "registered.json"
    if "idm" not in params.evaluate.methods or not record.is_file():
        return {}
    info = json.loads(record.read_text())
    return {"train_run_id": info["run_id"], "model_version": str(info["version"])}


def describe_versions(numbers: dict, checkpoint: Path, metric: str) -> None:
    """Write the `idm` and `idm-int8` scores into their registered versions' descriptions."""
    from pipeline import registry

    records = {"idm": checkpoint.parent / "registered.json",
               "idm-int8": checkpoint.parent.parent / "idm-int8" / "registered.json"}
    for method, record in records.items():
        if method in numbers and record.is_file():
            version = str(json.loads(record.read_text())["version"])
            registry.describe_evaluation(version, {"metrics": numbers[method]}, metric, "evaluate stage")


@dataclasses.dataclass
class Scorers:
    """The optional metrics that could be set up, and why the others are unavailable."""

    lpips: metrics.LPIPS | None = None
    niqe: PristineModel | None = None
    inception: Path | None = None  # the Inception weights, when FID/KID can run
    unavailable: dict[str, str] = dataclasses.field(default_factory=dict)


def load_scorers(cfg: EvaluateParams, device: str) -> Scorers:
    """LPIPS, NIQE and FID/KID as params.yaml asks, their weights found or downloaded first
    (pipeline.evaluation.weights); a metric that cannot run is explained, never faked."""
    out = Scorers()
    for key, enabled in (("niqe", cfg.niqe), ("lpips", cfg.lpips), ("fid", cfg.fid)):
        if not enabled:
            out.unavailable[key] = f"disabled in params.yaml (evaluate.{key}: false)"
            continue
        try:
            if key == "niqe":
                out.niqe = PristineModel.load()
                continue
            path = weights.ensure(key, offline=cfg.offline, url=getattr(cfg, f"{key}_url"),
                                  sha256=getattr(cfg, f"{key}_sha256"))
            if key == "lpips":
                out.lpips = metrics.LPIPS(path, device=device)
            else:
                metrics.InceptionDistances(path, patch=cfg.fid_patch, device=device)  # fails now if the file is bad
                out.inception = path
        except metrics.MetricUnavailable as err:
            out.unavailable[key] = str(err)
    return out


def mark_niqe_gaps(table: pd.DataFrame, per_image: pd.DataFrame, unavailable: dict[str, str]) -> None:
    """A dataset x scale with any image too small for NIQE gets no NIQE (a mean over the
    others would not compare with other scales), and the reason."""
    if "niqe" not in per_image:
        return
    for row in table.itertuples():
        group = per_image[(per_image.method == row.method) & (per_image.dataset == row.dataset)
                          & (per_image.scale == row.scale)]
        missing = int(group.niqe.isna().sum())
        if missing:
            table.loc[row.Index, "niqe"] = float("nan")
            unavailable[metric_name("niqe", row.dataset, row.scale)] = (
                f"{missing} of {len(group)} images are under two whole 96x96 blocks, NIQE's minimum")


def metrics_dict(table: pd.DataFrame) -> dict[str, dict[str, float]]:
    """{method: {"psnr_y.Set5.x4": 28.4, ...}} from the per-scale table (NaN left out)."""
    out: dict[str, dict[str, float]] = {}
    for row in table.itertuples(index=False):
        named = out.setdefault(row.method, {})
        for metric in ALL_METRICS:
            value = getattr(row, metric, float("nan"))
            if value is not None and math.isfinite(value):
                named[metric_name(metric, row.dataset, row.scale)] = round(float(value), 6)
    return out


def log_to_mlflow(params: Params, table: pd.DataFrame, numbers: dict, unavailable: dict[str, str], scales_csv: Path,
                  extra_tags: dict[str, str]) -> None:
    """One MLflow run per method: flat metrics, a per-scale series (step = 10 x scale), tags."""
    import mlflow

    datasets = ",".join(sorted(table.dataset.unique()))
    for method, named in numbers.items():
        tags = {"method": method, "datasets": datasets, **extra_tags,
                **{f"unavailable.{k}": v[:5000] for k, v in unavailable.items()}}
        with mlflow_run(params, tags):
            mlflow.log_metrics(named)
            for row in table[table.method == method].itertuples(index=False):
                series = {f"{m}.{row.dataset}": float(getattr(row, m)) for m in ALL_METRICS
                          if m in table and math.isfinite(getattr(row, m))}
                mlflow.log_metrics(series, step=round(10 * row.scale))
            mlflow.log_artifact(str(scales_csv))


def mlflow_run(params: Params, tags: dict[str, str]):
    from pipeline.tracking import stage_run

    return stage_run("evaluate", tags=tags, params=flatten(params))


def write_outputs(table: pd.DataFrame, per_image: pd.DataFrame, numbers: dict, unavailable: dict,
                  args: argparse.Namespace, stack: ExitStack) -> None:
    """Write the report files to temporary files that `stack` renames into place when it closes."""
    for path, text in (
        (args.metrics, json.dumps(numbers, indent=2, sort_keys=True) + "\n"),
        (args.unavailable, json.dumps(unavailable, indent=2, sort_keys=True) + "\n"),
        (args.scales, table.to_csv(index=False, float_format="%.6g")),
        (args.per_image, per_image.to_csv(index=False, float_format="%.6g")),
    ):
        stack.enter_context(atomic_path(path)).write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--prepared", type=Path, default=ROOT / "data" / "prepared")
    parser.add_argument("--sr-out", type=Path, default=ROOT / "data" / "sr")
    parser.add_argument("--metrics", type=Path, default=ROOT / "reports" / "metrics.json")
    parser.add_argument("--unavailable", type=Path, default=ROOT / "reports" / "unavailable.json",
                        help="why a metric has no number in --metrics")
    parser.add_argument("--scales", type=Path, default=ROOT / "reports" / "scales.csv")
    parser.add_argument("--per-image", type=Path, default=ROOT / "reports" / "per_image.csv")
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "idm" / "model.pt",
                        help="the checkpoint evaluated as method 'idm'")
    parser.add_argument("--model-uri", help="evaluate only this registered model (e.g. models:/idm@champion), outside DVC")
    parser.add_argument("--label", default="idm", help="method name for --model-uri results")
    args = parser.parse_args()
    params = load(args.params)
    tracking.setup()  # an unavailable MLflow store fails here, before any work
    manifest = pd.read_csv(args.prepared / "manifest.csv")
    pairs = manifest[manifest.split == "test"]
    if pairs.empty:
        raise ValueError(f"{args.prepared / 'manifest.csv'}: no test pairs (every dataset has test_fraction 0?)")
    device = str(resolve_device(params.evaluate.device))
    use_threads(params.sample.threads)
    scorers = load_scorers(params.evaluate, device)
    unavailable = scorers.unavailable
    # Exits in reverse order: the report files are renamed into place, then data/sr is swapped.
    with staged_dir(args.sr_out) as sr_dir, ExitStack() as reports:
        methods = model_uri_method(args, params, device) if args.model_uri else build_methods(params, args.checkpoint, device)
        per_image = pd.concat([run_method(m, pairs, args.prepared, out_dir=sr_dir, lpips=scorers.lpips,
                                          niqe=scorers.niqe) for m in methods], ignore_index=True)
        table = summarize(per_image)
        mark_niqe_gaps(table, per_image, unavailable)
        if scorers.inception is not None:
            cfg = params.evaluate
            scores, missing = inception_by_group(
                per_image, args.prepared, sr_dir,
                lambda: metrics.InceptionDistances(scorers.inception, patch=cfg.fid_patch, device=device),
                fid_min=cfg.fid_min_patches, kid_min=cfg.kid_min_patches)
            for metric in SET_METRICS:
                table[metric] = [scores[(r.method, r.dataset, r.scale)].get(metric, float("nan"))
                                 for r in table.itertuples()]
            unavailable.update(missing)
        numbers = metrics_dict(table)
        write_outputs(table, per_image, numbers, unavailable, args, reports)
    extra_tags = {"model_uri": args.model_uri} if args.model_uri else trained_model_tags(args.checkpoint, params)
    log_to_mlflow(params, table, numbers, unavailable, args.scales, extra_tags)
    if not args.model_uri:
        describe_versions(numbers, args.checkpoint, params.promotion.metric)
    for key, reason in unavailable.items():
        print(f"unavailable: {key}: {reason}")


if __name__ == "__main__":
    run(main)
