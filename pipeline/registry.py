"""The model registry side of the flows: the promotion gate and its record in MLflow.

An *evaluation* is what scoring one model on the test sets gives, as a plain dict:

    {"metrics": {"psnr_y.Set5.x4": 28.4, "psnr_y.Set5.x8": 23.1, ...},   # <metric>.<dataset>.x<scale>
     "in_distribution": ["Set5.x2", "Set5.x4", ...]}                      # <dataset>.x<scale> keys

`decide` (pure) compares a candidate's evaluation with the champion's; `record_decision`
writes the verdict to MLflow (a run with the comparison table, version tags) and moves
the `champion` alias only when the gate passed, as its very last step.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from pipeline.data.datasets import scale_tag
from pipeline.evaluation.names import parse_metric_name
from pipeline.params import PromotionParams
from pipeline.tracking import MODEL_NAME

CHAMPION = "champion"
CANDIDATE = "candidate"
PRETRAINED = "pretrained"  # the shipped weights' version (register_pretrained stage)
INT8_SUFFIX = "-int8"  # candidate-int8 is the int8 version quantized from the candidate

# Scores are rounded to 1e-6 in metrics.json; this keeps "exactly the threshold" on the passing side.
_EPS = 1e-9
TABLE_COLUMNS = ["dataset", "scale", "in_distribution", "candidate", "champion", "delta"]


@dataclass(frozen=True)
class Decision:
    """The gate's verdict: whether to promote, a one-line reason, and the per dataset x scale table."""

    promote: bool
    reason: str
    table: pd.DataFrame  # TABLE_COLUMNS, one row per dataset x scale of the gate's metric


def scores(evaluation: dict[str, Any] | None, metric: str) -> dict[tuple[str, float], float]:
    """{(dataset, scale): value} of `metric` in an evaluation (non-finite values left out)."""
    out: dict[tuple[str, float], float] = {}
    for name, value in ((evaluation or {}).get("metrics") or {}).items():
        m, dataset, scale = parse_metric_name(name)
        if m == metric and value is not None and math.isfinite(float(value)):
            out[(dataset, scale)] = float(value)
    return out


def comparison_table(candidate: dict[str, Any], champion: dict[str, Any] | None, metric: str) -> pd.DataFrame:
    """One row per dataset x scale scored by either model: both values and delta = candidate - champion."""
    cand, champ = scores(candidate, metric), scores(champion, metric)
    in_dist = set(candidate.get("in_distribution") or [])
    rows = [{"dataset": d, "scale": s, "in_distribution": f"{d}.{scale_tag(s)}" in in_dist,
             "candidate": cand.get((d, s), math.nan), "champion": champ.get((d, s), math.nan)}
            for d, s in sorted(set(cand) | set(champ))]
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS[:-1])
    table["delta"] = table.candidate - table.champion
    return table


def decide(candidate: dict[str, Any], champion: dict[str, Any] | None, gate: PromotionParams,
           references: dict[str, dict[str, Any] | None] | None = None) -> Decision:
    """Apply the promotion gate to two evaluations (see the module docstring for their shape).

    Promote when (a) the mean of `gate.metric` over the in-distribution dataset x scale pairs
    improves on the champion's by at least `gate.min_improvement` and (b) no dataset x scale,
    in or out of distribution, drops by more than `gate.max_drop`. A pair the champion was
    scored on but the candidate was not fails the gate: a drop there could not be ruled out.
    With no champion yet, the candidate must pass the same gate against every evaluation in
    `references` (e.g. {"the shipped pretrained model": ..., "bicubic": ...}; None values are
    skipped), so a first champion is never worse than what a user has without one.
    """
    if champion is not None:
        return _against(candidate, champion, gate)
    compared = [(name, _against(candidate, ref, gate)) for name, ref in (references or {}).items() if ref is not None]
    for name, verdict in compared:
        if not verdict.promote:
            return Decision(False, f"no champion yet, so compared with {name}: {verdict.reason}", verdict.table)
    if not compared:
        table = comparison_table(candidate, None, gate.metric)
        if table.candidate.isna().all():
            return Decision(False, f"candidate has no {gate.metric} scores", table)
        return Decision(True, "first model: there is no champion yet and no reference to compare with", table)
    names = " and ".join(name for name, _ in compared)
    return Decision(True, f"no champion yet; passes the gate against {names}: {compared[0][1].reason}",
                    compared[0][1].table)


def _against(candidate: dict[str, Any], champion: dict[str, Any], gate: PromotionParams) -> Decision:
    """The gate of `decide` against one evaluation `champion` (a champion or a reference)."""
    table = comparison_table(candidate, champion, gate.metric)
    if table.candidate.isna().all():
        return Decision(False, f"candidate has no {gate.metric} scores", table)
    missing = table[table.candidate.isna() & table.champion.notna()]
    if not missing.empty:
        where = ", ".join(f"{r.dataset} x{r.scale:g}" for r in missing.itertuples())
        return Decision(False, f"candidate has no {gate.metric} for {where}, which the champion was scored on", table)
    both = table.dropna(subset=["candidate", "champion"])
    in_dist = both[both.in_distribution]
    if in_dist.empty:
        return Decision(False, f"no in-distribution dataset x scale has {gate.metric} for both models", table)

    failures = []
    mean_delta = float(in_dist.delta.mean())
    if mean_delta < gate.min_improvement - _EPS:
        failures.append(f"mean {gate.metric} over {len(in_dist)} in-distribution dataset x scale changed by "
                        f"{mean_delta:+.3f} (needs >= {gate.min_improvement:+.3f})")
    for r in both[both.delta < -gate.max_drop - _EPS].itertuples():
        where = "in" if r.in_distribution else "out of"
        failures.append(f"{gate.metric} dropped by {-r.delta:.3f} on {r.dataset} x{r.scale:g} "
                        f"({where} distribution, max drop {gate.max_drop:g})")
    if failures:
        return Decision(False, "; ".join(failures), table)
    largest_drop = max(0.0, float(-both.delta.min()))
    return Decision(True, f"mean {gate.metric} over {len(in_dist)} in-distribution dataset x scale improved by "
                          f"{mean_delta:+.3f} (>= {gate.min_improvement:+.3f}); largest drop {largest_drop:.3f} "
                          f"(<= {gate.max_drop:g})", table)


def regressions(current: dict[str, Any], previous: dict[str, Any] | None, metric: str, tolerance: float) -> list[str]:
    """Each dataset x scale where `metric` fell by more than `tolerance` since `previous`, described."""
    now, before = scores(current, metric), scores(previous, metric)
    return [f"{metric} {dataset} x{scale:g}: {before[(dataset, scale)]:.3f} -> {value:.3f}"
            for (dataset, scale), value in sorted(now.items())
            if (dataset, scale) in before and before[(dataset, scale)] - value > tolerance + _EPS]


# --- MLflow side -------------------------------------------------------------------------------

def client() -> Any:
    """An MlflowClient on the project store (pipeline.tracking decides which)."""
    from mlflow import MlflowClient

    from pipeline.tracking import setup, tracking_uri

    setup()
    return MlflowClient(tracking_uri())


def version_by_alias(alias: str) -> str | None:
    """The version of model `idm` that carries `alias`, or None (no such alias or model yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client().get_model_version_by_alias(MODEL_NAME, alias).version)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def version_tags(version: str) -> dict[str, str]:
    return dict(client().get_model_version(MODEL_NAME, version).tags)


def log_evaluation(version: str, label: str, evaluation: dict[str, Any], *, flow: str, pipeline_run: str,
                   tags: dict[str, str] | None = None) -> str:
    """One MLflow run holding a model version's evaluation (metrics + evaluation.json); returns its id."""
    import mlflow

    from pipeline.tracking import git_commit, setup

    all_tags = {"evaluation": "true", "flow": flow, "pipeline_run": pipeline_run, "git_commit": git_commit(),
                "model_name": MODEL_NAME, "model_version": version, "model_uri": f"models:/{MODEL_NAME}/{version}",
                "label": label, **(tags or {})}
    with mlflow.start_run(experiment_id=setup(), run_name=f"{flow}-{label}-v{version}", tags=all_tags) as run:
        mlflow.log_metrics({k: float(v) for k, v in evaluation.get("metrics", {}).items()})
        mlflow.log_dict(evaluation, "evaluation.json")
    return run.info.run_id


def last_evaluation(version: str) -> dict[str, Any] | None:
    """The metrics of the latest evaluation run logged for `version` (by any flow), or None."""
    from pipeline.tracking import setup

    runs = client().search_runs(
        [setup()], f"tags.evaluation = 'true' and tags.model_name = '{MODEL_NAME}' and tags.model_version = '{version}'",
        max_results=1, order_by=["attributes.start_time DESC"])
    return {"metrics": dict(runs[0].data.metrics), "run_id": runs[0].info.run_id} if runs else None


def record_decision(version: str, decision: Decision, *, champion: str | None, pipeline_run: str) -> str:
    """Log the verdict on candidate `version` and, if it passed, make it the champion; returns the run id.

    Order matters for crash safety: the run and version tags are written first and the
    alias moves last, so an interruption can leave a verdict without an alias move but
    never an alias move without its verdict.
    """
    import mlflow

    from pipeline.tracking import git_commit, setup

    verdict = "accepted" if decision.promote else "rejected"
    tags = {"flow": "retrain", "pipeline_run": pipeline_run, "git_commit": git_commit(), "model_name": MODEL_NAME,
            "candidate_version": version, "champion_version": champion or "none",
            "promotion": verdict, "promotion_reason": decision.reason[:5000]}
    with mlflow.start_run(experiment_id=setup(), run_name=f"promotion-v{version}", tags=tags) as run:
        both = decision.table.dropna(subset=["candidate", "champion"])
        if not both.empty:
            in_dist = both[both.in_distribution]
            mlflow.log_metrics({"max_drop": max(0.0, float(-both.delta.min())),
                                **({"mean_delta_in_distribution": float(in_dist.delta.mean())} if not in_dist.empty else {})})
        mlflow.log_text(decision.table.to_csv(index=False, float_format="%.6g"), "comparison.csv")
        mlflow.log_text(decision.table.to_string(index=False, float_format=lambda v: f"{v:.3f}"), "comparison.txt")
        mlflow.log_text(json.dumps({"promote": decision.promote, "reason": decision.reason,
                                    "candidate": version, "champion": champion}, indent=2), "decision.json")
    c = client()
    for key, value in {"promotion": verdict, "promotion_reason": decision.reason[:5000],
                       "promotion_run": run.info.run_id, "previous_champion": champion or "none"}.items():
        c.set_model_version_tag(MODEL_NAME, version, key, value)
    if decision.promote:
        int8 = int8_of(version)  # champion-int8 follows; a champion without one loses the stale alias
        if int8:
            c.set_registered_model_alias(MODEL_NAME, CHAMPION + INT8_SUFFIX, int8)
        else:
            delete_alias(CHAMPION + INT8_SUFFIX)
        c.set_registered_model_alias(MODEL_NAME, CHAMPION, version)
    return run.info.run_id


def delete_alias(alias: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client().delete_registered_model_alias(MODEL_NAME, alias)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise


# --- int8 versions and descriptions ------------------------------------------------------------

def int8_of(version: str) -> str | None:
    """The newest int8 version quantized from float32 `version` (tags quantization=int8 and
    fp32_version, set by the quantize stage), or None."""
    found = client().search_model_versions(
        f"name='{MODEL_NAME}' and tags.quantization='int8' and tags.fp32_version='{version}'")
    return str(max(int(v.version) for v in found)) if found else None


def mirror_aliases_to_int8(fp32_version: str, int8_version: str) -> list[str]:
    """Give `int8_version` the alias `<alias>-int8` for each alias `fp32_version` has; returns them."""
    c = client()
    aliases = [a + INT8_SUFFIX for a in c.get_model_version(MODEL_NAME, fp32_version).aliases
               if not a.endswith(INT8_SUFFIX)]
    for alias in aliases:
        c.set_registered_model_alias(MODEL_NAME, alias, int8_version)
    return aliases


def int8_uri(uri: str) -> str:
    """The registry URI of the int8 model that goes with `uri` (models:/idm@ALIAS or models:/idm/N):
    `uri` itself if it is an int8 version, else the int8 version quantized from it.

    ValueError naming the version if it has none; URIs outside the registry come back unchanged.
    """
    prefix = f"models:/{MODEL_NAME}"
    if not uri.startswith((prefix + "@", prefix + "/")):
        return uri
    from mlflow.exceptions import MlflowException

    c = client()
    ref = uri[len(prefix) + 1:]
    try:
        version = str(c.get_model_version_by_alias(MODEL_NAME, ref).version) if uri[len(prefix)] == "@" else ref
        if c.get_model_version(MODEL_NAME, version).tags.get("quantization") == "int8":
            return uri
    except MlflowException:
        return uri  # no such alias or version: loading it says so, with a hint

    int8 = int8_of(version)
    if int8 is None:
        raise ValueError(f"{uri} is version {version}, and no int8 version was quantized from it "
                         "(the quantize stage registers one: dvc repro quantize)")
    return f"{prefix}/{int8}"


LAST_EVALUATION = "\n\nLast evaluation"


def describe_evaluation(version: str, evaluation: dict[str, Any], metric: str, where: str) -> None:
    """End version's description with its `metric` per dataset x scale, replacing an earlier evaluation's."""
    c = client()
    base = (c.get_model_version(MODEL_NAME, version).description or "").split(LAST_EVALUATION)[0]
    table = ", ".join(f"{dataset} {scale_tag(scale)} {value:.2f}"
                      for (dataset, scale), value in sorted(scores(evaluation, metric).items()))
    c.update_model_version(MODEL_NAME, version, description=f"{base}{LAST_EVALUATION} ({where}), {metric}: {table}.")

