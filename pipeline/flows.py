"""Prefect flows over the DVC pipeline.

- `pipeline`: one task per dvc.yaml stage, in dependency order, each `dvc repro --single-item`;
  returns reports/metrics.json and the MLflow runs the stages logged.
- `retrain`: refresh the data, train (and quantize) a candidate, score it and the champion
  on the same test sets, apply the promotion gate (pipeline.registry.decide).
- `evaluate`: re-score the champion and flag a drop against its last evaluation.

DVC must never run twice at once in one workspace: every dvc call (and every evaluation,
which reads data/prepared) holds the workspace lock `.dvc/tmp/idm-flows.lock`, so two flow
runs in one workspace take turns, or the later one fails with WorkspaceBusy after
`lock_timeout` seconds naming the holder.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from pipeline import registry
from pipeline.data.datasets import scale_tag
from pipeline.dvc_commands import (  # noqa: F401
    LOCK_FILE,
    LOCK_TIMEOUT,
    CommandFailed,
    WorkspaceBusy,
    current_run_id,
    dvc,
    dvc_stages,
    flow_logger,
    run_command,
    stage_status,
    subprocess_env,
    workspace_lock,
)
from pipeline.overrides import (  # noqa: F401 (OverrideError, override_value)
    OverrideError,
    check_params,
    override_args,
    override_value,
    parse_cli_overrides,
)
from pipeline.params import ROOT, ParamsError, PromotionParams, load, read_yaml

METRICS_FILE = "reports/metrics.json"
REGISTERED_FILE = "models/idm/registered.json"  # written by the train stage
RETRAIN_TARGETS = ("train", "quantize")  # retrain runs these and everything upstream of them
BICUBIC = "bicubic"  # the "model URI" an evaluator scores as the bicubic baseline

# evaluator(model_uri, label, project) -> evaluation (see pipeline.registry for its shape)
Evaluator = Callable[[str, str, Path], dict[str, Any]]


@task(name="dvc-stage", cache_policy=NO_CACHE)  # DVC is the cache: it skips up-to-date stages itself
def run_stage(stage: str, project: Path, pipeline_run: str, force: bool = False,
              lock_timeout: float = LOCK_TIMEOUT) -> str:
    """`dvc repro --single-item [--force] <stage>`; returns stage_status.

    --single-item: the flow runs the stages in dependency order, so upstream is already
    up to date when a stage's task starts; each task then checks and runs exactly its
    own stage and its log holds only that stage's output.
    """
    lines = dvc(["repro", "--single-item", *(["--force"] if force else []), stage],
                project=project, pipeline_run=pipeline_run, lock_timeout=lock_timeout)
    return stage_status(lines, stage)


def stage_task(stage: str) -> Any:
    """The task that runs `stage`, named after it; download, which may fetch from the network,
    retries with exponential backoff (30 s, 60 s, 120 s)."""
    if stage == "download":
        return run_stage.with_options(name="dvc-download", retries=3,
                                      retry_delay_seconds=exponential_backoff(backoff_factor=30), retry_jitter_factor=0.2)
    return run_stage.with_options(name=f"dvc-{stage}")


@task(name="dvc-experiment", cache_policy=NO_CACHE)
def run_experiment(overrides: dict[str, Any], name: str, project: Path, pipeline_run: str,
                   lock_timeout: float = LOCK_TIMEOUT) -> dict[str, Any] | None:
    """The whole pipeline as DVC experiment `name` with params `overrides`; returns its metrics.json.

    Why `dvc exp run --temp -S key=value`: DVC applies the overrides to a copy of the
    workspace in a temporary directory (.dvc/tmp/exps/), so the committed params.yaml is
    never written, even if this process is killed; the result is recorded as an experiment
    (`dvc exp show` compares it, `dvc exp apply <name>` brings it into the workspace) and its
    outputs go to the shared DVC cache. Writing params.yaml and restoring it afterwards
    would leave it edited after a crash. One experiment, not one per stage: an experiment
    is DVC's unit (one commit of params and results) and N partial ones would only clutter
    `dvc exp show`. Like any DVC experiment it runs the committed code plus changes to
    tracked files; untracked new files must be `git add`-ed first.
    """
    settings = override_args(overrides, read_yaml(project / "params.yaml"))  # checked again: a task can run alone
    settings = [arg for setting in settings for arg in ("-S", setting)]
    dvc(["exp", "run", "--temp", "--name", name, *settings], project=project, pipeline_run=pipeline_run,
        lock_timeout=lock_timeout)
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps/"], cwd=project,
                          capture_output=True, text=True, check=True).stdout.split()
    ref = next((r for r in refs if r.endswith(f"/{name}")), None)
    if ref is None:
        return None
    shown = subprocess.run(["git", "show", f"{ref}:{METRICS_FILE}"], cwd=project, capture_output=True, text=True)
    return json.loads(shown.stdout) if shown.returncode == 0 else None  # None: the pipeline writes no metrics


def stage_evaluator(model_uri: str, label: str, project: Path) -> dict[str, Any]:
    """Score registered model `model_uri` (or BICUBIC, the baseline) on `<project>/data/prepared`
    with the evaluate stage, outside DVC."""
    with tempfile.TemporaryDirectory(prefix="idm-eval-") as tmp:
        out = Path(tmp)
        cmd = [sys.executable, "-m", "pipeline.stages.evaluate", "--params", str(project / "params.yaml"),
               "--prepared", str(project / "data" / "prepared"), "--model-uri", model_uri, "--label", label,
               "--sr-out", str(out / "sr"), "--metrics", str(out / "metrics.json"), "--headline", str(out / "headline"),
               "--unavailable", str(out / "unavailable.json"),
               "--scales", str(out / "scales.csv"), "--per-image", str(out / "per_image.csv")]
        run_command(cmd, cwd=project, env=subprocess_env(current_run_id()), log=flow_logger().info)
        numbers = json.loads((out / "metrics.json").read_text())
        table = pd.read_csv(out / "scales.csv")
    if "method" in table:
        table = table[table.method == label]
    in_dist = sorted({f"{r.dataset}.{scale_tag(r.scale)}" for r in table.itertuples() if bool(r.in_distribution)})
    return {"metrics": numbers.get(label, {}), "in_distribution": in_dist}


@task(name="evaluate-model", cache_policy=NO_CACHE)
def score_model(evaluator: Evaluator, version: str, label: str, project: Path,
                lock_timeout: float = LOCK_TIMEOUT) -> dict[str, Any]:
    """Evaluate version `version` of model idm; holds the workspace lock (data/prepared must not change meanwhile)."""
    with workspace_lock(project, lock_timeout):
        evaluation = evaluator(f"models:/{registry.MODEL_NAME}/{version}", label, project)
    if not isinstance(evaluation, dict) or not isinstance(evaluation.get("metrics"), dict):
        raise TypeError(f"evaluator returned {type(evaluation).__name__}; expected {{'metrics': {{...}}, 'in_distribution': [...]}}")
    flow_logger().info(f"{label} (version {version}): {len(evaluation['metrics'])} metrics")
    return evaluation


@task(name="promotion-gate", cache_policy=NO_CACHE)
def gate(candidate: str, champion: str | None, evaluations: dict[str, dict | None], rule: PromotionParams,
         pipeline_run: str, references: dict[str, dict | None] | None = None) -> dict[str, Any]:
    """decide() (against `references` when there is no champion) then record_decision(); refuses
    to promote if the champion moved meanwhile."""
    decision = registry.decide(evaluations["candidate"], evaluations["champion"], rule, references)
    now = registry.version_by_alias(registry.CHAMPION)
    if decision.promote and now != champion:
        decision = registry.Decision(False, f"the champion changed from {champion} to {now} during this retrain; "
                                            "compared against a stale champion", decision.table)
    run_id = registry.record_decision(candidate, decision, champion=champion, pipeline_run=pipeline_run)
    log = flow_logger()
    (log.info if decision.promote else log.warning)(
        f"version {candidate} {'promoted to champion' if decision.promote else 'rejected'}: {decision.reason}")
    return {"promoted": decision.promote, "reason": decision.reason, "decision_run": run_id,
            "table": decision.table.to_dict(orient="records")}


def stage_runs(pipeline_run: str) -> dict[str, list[str]]:
    """MLflow run ids tagged with `pipeline_run`, by DVC stage (or run name for non-stage runs)."""
    from pipeline.tracking import setup

    runs = registry.client().search_runs([setup()], f"tags.pipeline_run = '{pipeline_run}'",
                                         order_by=["attributes.start_time ASC"])
    out: dict[str, list[str]] = {}
    for run in runs:
        out.setdefault(run.data.tags.get("dvc_stage") or run.info.run_name, []).append(run.info.run_id)
    return out


# --- flows --------------------------------------------------------------------------------------

@flow(name="idm-pipeline")
def pipeline(overrides: dict[str, Any] | None = None, project: str | None = None,
             lock_timeout: float = LOCK_TIMEOUT) -> dict[str, Any]:
    """Run the DVC pipeline; `overrides` ({"prepare.seed": 1, ...}) change params for this run only.

    Each override sets one `section.key` of params.yaml to plain data (pipeline.overrides) and the
    merged params must pass the pipeline's check; otherwise the run fails with OverrideError
    naming it before DVC runs. Returns {"metrics": reports/metrics.json, "runs": {stage: [MLflow run ids]},
    "stages": {stage: "ran" | "restored" | "skipped"}, "experiment": name or None}.
    """
    from pipeline.tracking import setup

    root, run_id = Path(project or ROOT).resolve(), current_run_id()
    check_params(root / "params.yaml", overrides or {})  # before DVC reads the file
    setup()  # the experiment exists, with the project's artifact root, before any stage runs
    if overrides:
        name = f"flow-{run_id[:8]}"
        metrics = run_experiment(dict(overrides), name, root, run_id, lock_timeout)
        return {"metrics": metrics, "runs": stage_runs(run_id), "stages": {}, "experiment": name}
    statuses = {stage: stage_task(stage)(stage, root, run_id, lock_timeout=lock_timeout) for stage in dvc_stages(root)}
    metrics_path = root / METRICS_FILE
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else None
    return {"metrics": metrics, "runs": stage_runs(run_id), "stages": statuses, "experiment": None}


@flow(name="idm-retrain")
def retrain(project: str | None = None, refresh_data: bool = True, evaluator: Evaluator | None = None,
            lock_timeout: float = LOCK_TIMEOUT) -> dict[str, Any]:
    """Refresh data, train a candidate, score it and the champion, and promote it if it passes the gate.

    Nothing here moves or removes the `champion` alias except the gate's last step, so a
    retrain that fails or is killed anywhere before it leaves the champion as it was.
    """
    from pipeline.tracking import setup

    root, run_id, log = Path(project or ROOT).resolve(), current_run_id(), get_run_logger()
    params = load(root / "params.yaml")  # a bad params file fails before any work
    setup()
    stages = dvc_stages(root, RETRAIN_TARGETS)
    if "train" not in stages:
        raise ValueError(f"{root / 'dvc.yaml'} has no 'train' stage; retrain needs one")
    for stage in stages:  # download forced: a folder or URL source may have new images DVC cannot see
        stage_task(stage)(stage, root, run_id, force=refresh_data and stage == "download", lock_timeout=lock_timeout)

    candidate = str(json.loads((root / REGISTERED_FILE).read_text())["version"])
    champion = registry.version_by_alias(registry.CHAMPION)
    result = {"candidate": candidate, "champion_before": champion, "champion_after": champion, "promoted": False,
              "runs": stage_runs(run_id)}
    if candidate == champion:
        log.info(f"version {candidate} (train was up to date) is already the champion")
        return {**result, "reason": "candidate is already the champion"}
    earlier = registry.version_tags(candidate)
    if "promotion" in earlier:
        log.info(f"version {candidate} (train was up to date) was already {earlier['promotion']}")
        return {**result, "reason": f"already {earlier['promotion']}: {earlier.get('promotion_reason', '')}"}

    evaluate_fn = evaluator or stage_evaluator
    evaluations: dict[str, dict | None] = {"candidate": None, "champion": None}
    for label, version in (("candidate", candidate), ("champion", champion)):
        if version is not None:
            evaluations[label] = score_model(evaluate_fn, version, label, root, lock_timeout)
            registry.log_evaluation(version, label, evaluations[label], flow="retrain", pipeline_run=run_id)
    references = {} if champion is not None else reference_evaluations(evaluate_fn, candidate, root, lock_timeout)
    verdict = gate(candidate, champion, evaluations, params.promotion, run_id, references)
    return {**result, **verdict, "champion_after": candidate if verdict["promoted"] else champion,
            "runs": stage_runs(run_id)}


def reference_evaluations(evaluate_fn: Evaluator, candidate: str, root: Path,
                          lock_timeout: float = LOCK_TIMEOUT) -> dict[str, dict | None]:
    """What a first champion must beat: the shipped pretrained model (its registered version, alias
    `pretrained`, when `dvc repro` has registered it) and bicubic, scored like the candidate."""
    references: dict[str, dict | None] = {}
    shipped = registry.version_by_alias(registry.PRETRAINED)
    if shipped is not None and shipped != candidate:
        references["the shipped pretrained model"] = score_model(evaluate_fn, shipped, "pretrained", root, lock_timeout)
    with workspace_lock(root, lock_timeout):
        references["bicubic"] = evaluate_fn(BICUBIC, "bicubic", root)
    return references


class NoChampion(RuntimeError):
    """The evaluate flow found no model to re-score; its run ends Failed with this message."""


@flow(name="idm-evaluate")
def evaluate(project: str | None = None, evaluator: Evaluator | None = None,
             lock_timeout: float = LOCK_TIMEOUT) -> dict[str, Any]:
    """Re-score the champion and log it; tag the run regression=true (and warn) when any
    dataset x scale fell by more than schedules.evaluate_drop_tolerance since its last evaluation."""
    root, run_id, log = Path(project or ROOT).resolve(), current_run_id(), get_run_logger()
    params = load(root / "params.yaml")
    champion = registry.version_by_alias(registry.CHAMPION)
    if champion is None:  # a scheduled check that checked nothing must not look green
        raise NoChampion(f"no version of model {registry.MODEL_NAME!r} has the alias {registry.CHAMPION!r}: "
                         "nothing to evaluate (run the retrain flow first)")
    evaluation = score_model(evaluator or stage_evaluator, champion, "champion", root, lock_timeout)
    previous = registry.last_evaluation(champion)
    tolerance = params.schedules.evaluate_drop_tolerance
    drops = registry.regressions(evaluation, previous, params.promotion.metric, tolerance)
    tags = {"regression": str(bool(drops)).lower(), "compared_with_run": previous["run_id"] if previous else "none"}
    if drops:
        tags["regression_detail"] = "; ".join(drops)[:5000]
    mlflow_run = registry.log_evaluation(champion, "champion", evaluation, flow="evaluate", pipeline_run=run_id, tags=tags)
    if drops:
        log.warning(f"champion version {champion} dropped by more than {tolerance:g} since run "
                    f"{tags['compared_with_run']}: {'; '.join(drops)}")
    elif previous is None:
        log.info(f"first evaluation of champion version {champion}: nothing to compare with")
    return {"champion": champion, "regression": bool(drops), "drops": drops, "run_id": mlflow_run,
            "metrics": evaluation["metrics"]}


def main(argv: list[str] | None = None) -> None:
    """Run one flow once: `python -m pipeline.flows pipeline -S prepare.seed=1`, `... retrain`, `... evaluate`."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("flow", choices=["pipeline", "retrain", "evaluate"])
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                        help="pipeline only: override a params.yaml value for this run (value in YAML)")
    args = parser.parse_args(argv)
    if args.set and args.flow != "pipeline":
        parser.error("-S/--set applies to the pipeline flow only")
    try:  # what the flow checks, checked first here: one line instead of Prefect's logged traceback
        overrides = parse_cli_overrides(args.set)
        if args.flow == "pipeline":
            check_params(ROOT / "params.yaml", overrides)
        else:
            load(ROOT / "params.yaml")
        result = {"pipeline": lambda: pipeline(overrides=overrides or None), "retrain": retrain,
                  "evaluate": evaluate}[args.flow]()
    except ParamsError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    except NoChampion as err:
        raise SystemExit(f"error: {err}") from None
    print(json.dumps({k: v for k, v in result.items() if k != "table"}, indent=2, default=str))


if __name__ == "__main__":
    main()
