"""evaluate stage: run each method over every test pair; write metrics and log them to MLflow.

Outputs: data/sr/<method>/<dataset>/x<scale>/<image>.png (the SR images),
reports/metrics.json (every number: {method: {name: value}}), reports/headline/<method>.json
(DVC's metrics: Y-PSNR at x2, x4 and x8 and SSIM / hf_ratio at x4, so `dvc metrics show` is one
row per method that fits a screen),
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
from pipeline.evaluation.names import ALL_METRICS, SET_METRICS, metric_name, parse_metric_name
from pipeline.evaluation.niqe import PristineModel, too_few_blocks
from pipeline.params import METHODS, ROOT, EvaluateParams, Params, flatten, load
from pipeline.stages import run
from pipeline.workspace import staged_dir


HEADLINE_SCALES = (2.0, 4.0, 8.0)  # Y-PSNR at these; SSIM and hf_ratio at the middle one (x4)


def build_methods(params: Params, checkpoint: Path, device: str, int8: Path | None = None) -> list[Method]:
    """The methods params.yaml asks for: `idm` is the trained checkpoint's EMA model
    sampled as params.yaml's `sample` says, `idm-regression` its regression output
    (sample.steps = 0), `idm-int8` the sample with the int8 denoiser at `int8` (default: the
    quantize stage's output beside the checkpoint's folder), `pretrained` and
    `pretrained-regression` the same two of the model shipped in the package (idm.pretrained)."""
    regression = dataclasses.replace(params.sample, steps=0)

    def trained(sample: SampleConfig, name: str) -> Method:
        if not checkpoint.is_file():
            raise FileNotFoundError(f"{checkpoint}: no trained model; run the train stage first (dvc repro train)")
        return DiffusionSR.from_checkpoint(checkpoint, sample, device=device, name=name)

    def idm_int8() -> Method:
        path = int8 or checkpoint.parent.parent / "idm-int8" / "model_int8.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no int8 model; run the quantize stage first (dvc repro quantize)")
        return trained(params.sample, "idm-int8").use_int8(path)

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
    """A registered model (models:/idm@champion, models:/idm/3, runs:/...) as the only method,
    or bicubic for "bicubic" (the promotion gate's floor); a download is removed once the weights
    are loaded."""
    if args.model_uri == "bicubic":
        method = Bicubic()
        method.name = args.label
        return [method]
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


def mark_gaps(table: pd.DataFrame, per_image: pd.DataFrame, pairs: pd.DataFrame, unavailable: dict[str, str]) -> None:
    """A method x dataset x scale with any image lacking hf_ratio or NIQE gets no mean of it
    (a mean over the others would not compare with other scales), and the reason under
    its name. `pairs` (the manifest's test rows) gives the HR sizes."""
    sizes = per_image.merge(pairs[["dataset", "image", "scale", "hr_h", "hr_w"]], how="left",
                            on=["dataset", "image", "scale"], validate="many_to_one")
    reasons: dict[str, list[str]] = {}
    for row in table.itertuples():
        group = sizes[(sizes.method == row.method) & (sizes.dataset == row.dataset) & (sizes.scale == row.scale)]
        for metric in ("hf_ratio", "niqe"):
            if metric in group and group[metric].isna().any():
                table.loc[row.Index, metric] = float("nan")
                said = reasons.setdefault(metric_name(metric, row.dataset, row.scale), [])
                reason = gap_reason(metric, row.method, group)
                if reason not in said:
                    said.append(reason)
    unavailable.update({name: " | ".join(said) for name, said in reasons.items()})


def gap_reason(metric: str, method: str, group: pd.DataFrame) -> str:
    """One sentence on why `metric` is NaN for some images of `group` (one method x dataset x
    scale, with the HR sizes hr_h, hr_w)."""
    missing = group[group[metric].isna()]
    if metric == "hf_ratio":
        return (f"{len(missing)} of {len(group)} HR images have no fine detail (a zero Y Laplacian), "
                "so hf_ratio is undefined")
    small = [r for r in (too_few_blocks(h, w) for h, w in zip(missing.hr_h, missing.hr_w)) if r is not None]
    flat = len(missing) - len(small)
    parts = [f"{method}: NIQE is undefined for {flat} of {len(group)} outputs (too flat to fit)"] if flat else []
    if small:
        parts.append(f"{len(small)} of {len(group)} images are too small for NIQE: {small[0]}")
    return "; ".join(parts)


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


def headline(numbers: dict[str, dict[str, float]], scales: list[float]) -> dict[str, dict[str, float]]:
    """{method: {name: value}} with Y-PSNR at HEADLINE_SCALES (those evaluated; else every scale)
    and SSIM and hf_ratio at the middle one, per dataset: a table that fits a screen."""
    chosen = [s for s in HEADLINE_SCALES if s in scales] or sorted(scales)
    middle = chosen[len(chosen) // 2]
    wanted = {("psnr_y", s) for s in chosen} | {("ssim_y", middle), ("hf_ratio", middle)}
    out = {}
    for method, named in numbers.items():
        out[method] = {name: value for name, value in named.items()
                       if (name.split(".")[0], parse_metric_name(name)[2]) in wanted}
    return out


def log_to_mlflow(params: Params, table: pd.DataFrame, numbers: dict, unavailable: dict[str, str], scales_csv: Path,
                  extra_tags: dict[str, str]) -> None:
    """One MLflow run per method: flat metrics (<metric>.<dataset>.x<scale>), its rows of the per-scale
    table as `scales.json` (MLflow's table view), a Y-PSNR-vs-scale chart, scales.csv, tags."""
    import tempfile

    import mlflow

    from pipeline.evaluation.report import plot_psnr_vs_scale

    datasets = ",".join(sorted(table.dataset.unique()))
    for method, named in numbers.items():
        tags = {"method": method, "datasets": datasets, **extra_tags,
                **{f"unavailable.{k}": v[:5000] for k, v in unavailable.items()}}
        rows = table[table.method == method].reset_index(drop=True)
        with mlflow_run(params, tags), tempfile.TemporaryDirectory(prefix="idm-eval-") as tmp:
            mlflow.log_metrics(named)
            mlflow.log_table(rows, artifact_file="scales.json")
            plot_psnr_vs_scale(rows, Path(tmp) / "psnr_y_vs_scale.png")
            mlflow.log_artifact(str(Path(tmp) / "psnr_y_vs_scale.png"))
            mlflow.log_artifact(str(scales_csv))


def mlflow_run(params: Params, tags: dict[str, str]):
    from pipeline.tracking import stage_run

    return stage_run("evaluate", tags=tags, params=flatten(params))


def write_outputs(table: pd.DataFrame, per_image: pd.DataFrame, numbers: dict, unavailable: dict,
                  args: argparse.Namespace, stack: ExitStack) -> None:
    """Write the report files to temporary files, and the headline files into a staged folder, that
    `stack` puts into place when it closes (nothing is created before: a failed run leaves no trace)."""
    headline_dir = stack.enter_context(staged_dir(args.headline))
    for method, named in headline(numbers, sorted(table.scale.unique())).items():
        (headline_dir / f"{method}.json").write_text(json.dumps(named, indent=2, sort_keys=True) + "\n")
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
    parser.add_argument("--headline", type=Path, default=None,
                        help="folder of <method>.json headline metrics, DVC's metrics (default: headline/ beside --metrics)")
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "idm" / "model.pt",
                        help="the checkpoint evaluated as method 'idm'")
    parser.add_argument("--int8", type=Path, default=None,
                        help="the int8 denoiser of method 'idm-int8' (default: ../idm-int8/model_int8.pt "
                             "beside the checkpoint's folder)")
    parser.add_argument("--model-uri", help="evaluate only this registered model (e.g. models:/idm@champion), "
                                            "or 'bicubic', outside DVC")
    parser.add_argument("--label", default="idm", help="method name for --model-uri results")
    args = parser.parse_args()
    args.headline = args.headline or args.metrics.parent / "headline"
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
        methods = (model_uri_method(args, params, device) if args.model_uri
                   else build_methods(params, args.checkpoint, device, args.int8))
        per_image = pd.concat([run_method(m, pairs, args.prepared, out_dir=sr_dir, lpips=scorers.lpips,
                                          niqe=scorers.niqe) for m in methods], ignore_index=True)
        table = summarize(per_image)
        mark_gaps(table, per_image, pairs, unavailable)
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
