"""The Prefect flows on scratch copies of the project, under one Prefect test server per session.

The pipeline flow runs the project's own download and prepare stages through DVC; the
train and evaluate steps are stand-ins (a constant pyfunc model registered by a fake
train stage, an injected evaluator) so these tests exercise the flows, not the model.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import mlflow
import pytest

from pipeline import flows, registry
from pipeline.params import ParamsError
from pipeline.registry import CHAMPION, MODEL_NAME
from tests.conftest_prefect import make_project, real_stages, register_fake_model

pytestmark = pytest.mark.usefixtures("prefect_harness", "mlflow_store")

# Stands in for pipeline.stages.evaluate in the pipeline flow: counts the test pairs per
# scale and logs an MLflow stage run like the real stage does.
FAKE_EVALUATE = '''
import json
from pathlib import Path

import mlflow
import pandas as pd

from pipeline.tracking import stage_run

pairs = pd.read_csv("data/prepared/manifest.csv").query("split == 'test'")
numbers = {f"psnr_y.{d}.x{s:g}": 20.0 + len(g) for (d, s), g in pairs.groupby(["dataset", "scale"])}
Path("reports").mkdir(exist_ok=True)
Path("reports/metrics.json").write_text(json.dumps({"fake": numbers}))
with stage_run("evaluate", tags={"method": "fake"}):
    mlflow.log_metrics(numbers)
print(f"scored {len(numbers)} dataset x scale")
'''

# Stands in for the train stage: registers a constant pyfunc model of quality fake.yaml:quality
# as a new version of `idm`, sets alias `candidate`, writes models/idm/registered.json. (Plain mlflow,
# not pipeline.tracking, which imports torch: seconds per retrain.)
FAKE_TRAIN = '''
import json
from pathlib import Path

import os

import mlflow
import yaml


class Constant(mlflow.pyfunc.PythonModel):
    def __init__(self, quality):
        self.quality = quality

    def predict(self, context, model_input, params=None):
        return [self.quality] * len(model_input)


quality = yaml.safe_load(Path("fake.yaml").read_text())["quality"]
tags = {"dvc_stage": "train", "pipeline_run": os.environ["IDM_PIPELINE_RUN"]}
with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("idm").experiment_id, tags=tags) as run:
    info = mlflow.pyfunc.log_model(name="model", python_model=Constant(quality), registered_model_name="idm",
                                   pip_requirements=[])
version = str(info.registered_model_version)
client = mlflow.MlflowClient()
client.set_model_version_tag("idm", version, "fake_quality", str(quality))
client.set_registered_model_alias("idm", "candidate", version)
if yaml.safe_load(Path("fake.yaml").read_text()).get("crash"):
    raise SystemExit("training crashed after registering")
Path("models/idm").mkdir(parents=True, exist_ok=True)
Path("models/idm/registered.json").write_text(json.dumps({"run_id": run.info.run_id, "model_name": "idm", "version": version}))
print(f"registered idm version {version}")
'''

TRAIN_STAGE = {"train": {"cmd": "python fake_train.py", "deps": ["fake_train.py"],
                         "params": [{"fake.yaml": ["quality"]}], "outs": ["models/idm"]}}


def scores(quality: float, drop: float = 0.0) -> dict:
    """An evaluation on the tiny test set: x2, x3 in distribution, x4 out (drop applied at x4)."""
    return {"metrics": {"psnr_y.tiny.x2": quality + 4, "psnr_y.tiny.x3": quality + 2, "psnr_y.tiny.x4": quality - drop},
            "in_distribution": ["tiny.x2", "tiny.x3"]}


BICUBIC_QUALITY = 25.0  # the fake bicubic baseline's score


def fake_evaluator(fail_on: str | None = None):
    """Scores a model by its fake_quality tag; raises while evaluating `fail_on` (a label)."""
    def evaluate(model_uri: str, label: str, project: Path) -> dict:
        if label == fail_on:
            raise RuntimeError(f"evaluation of the {label} crashed")
        if model_uri == flows.BICUBIC:
            return scores(BICUBIC_QUALITY)
        version = model_uri.rsplit("/", 1)[1]
        return scores(float(mlflow.MlflowClient().get_model_version(MODEL_NAME, version).tags["fake_quality"]))
    return evaluate


@pytest.fixture
def train_project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "project", TRAIN_STAGE, {"fake_train.py": FAKE_TRAIN, "fake.yaml": "quality: 30.0\n"})


def set_quality(project: Path, quality: float) -> None:
    (project / "fake.yaml").write_text(f"quality: {quality}\n")


def champion() -> str | None:
    return registry.version_by_alias(CHAMPION)


# --- pipeline -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_pipeline_runs_the_stages_in_order_then_skips_them_and_overrides_leave_params_alone(tmp_path):
    stages = {**real_stages("download", "prepare"),
              "evaluate": {"cmd": "python fake_evaluate.py", "deps": ["fake_evaluate.py", "data/prepared"],
                           "metrics": [{"reports/metrics.json": {"cache": False}}]}}
    # Listed out of order on purpose: the flow follows the dependencies, not the file.
    stages = {name: stages[name] for name in ("evaluate", "prepare", "download")}
    project = make_project(tmp_path / "project", stages, {"fake_evaluate.py": FAKE_EVALUATE})
    assert flows.dvc_stages(project) == ["download", "prepare", "evaluate"]

    first = flows.pipeline(project=str(project))
    assert first["stages"] == {"download": "ran", "prepare": "ran", "evaluate": "ran"}
    assert first["metrics"] == {"fake": {"psnr_y.tiny.x2": 22.0, "psnr_y.tiny.x3": 22.0, "psnr_y.tiny.x4": 22.0}}
    (run_id,) = first["runs"]["evaluate"]
    assert mlflow.MlflowClient().get_run(run_id).data.metrics["psnr_y.tiny.x3"] == 22.0

    second = flows.pipeline(project=str(project))
    assert second["stages"] == {"download": "skipped", "prepare": "skipped", "evaluate": "skipped"}
    assert second["metrics"] == first["metrics"] and second["runs"] == {}

    committed = (project / "params.yaml").read_text()
    third = flows.pipeline(overrides={"prepare.scales": [2, 2.5]}, project=str(project))
    assert set(third["metrics"]["fake"]) == {"psnr_y.tiny.x2", "psnr_y.tiny.x2.5", "psnr_y.tiny.x4"}
    assert len(third["runs"]["evaluate"]) == 1
    assert (project / "params.yaml").read_text() == committed
    assert json.loads((project / "reports" / "metrics.json").read_text()) == first["metrics"]  # workspace untouched
    refs = subprocess.run(["git", "for-each-ref", "refs/exps/"], cwd=project, capture_output=True, text=True).stdout
    assert f"/{third['experiment']}\n" in refs  # recorded as a DVC experiment


def test_a_hostile_or_bad_params_file_stops_the_pipeline_flow_before_dvc_reads_it(tmp_path, monkeypatch):
    project = make_project(tmp_path / "project", real_stages("download", "prepare"))
    monkeypatch.setattr(flows, "dvc", lambda *a, **k: pytest.fail("dvc ran on a params file that fails the check"))
    good = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(good + "a: &a [1, 1, 1]\nb: [*a, *a, *a]\n")
    with pytest.raises(ParamsError, match="aliases"):
        flows.pipeline(project=str(project))
    (project / "params.yaml").write_text(good)
    with pytest.raises(ParamsError, match="unknown key prepare.seeed"):
        flows.pipeline(overrides={"prepare.seeed": 1}, project=str(project))
    # An override is a value of params.yaml, never another file: the run fails, naming it and the allowed form.
    state = flows.pipeline(overrides={"dvc.yaml:stages.download.cmd": "touch pwned"}, project=str(project),
                           return_state=True)
    assert state.is_failed()
    assert "override \"dvc.yaml:stages.download.cmd='touch pwned'\": 'dvc.yaml:stages.download.cmd' is not a key " \
           "of params.yaml (no file prefix, no +, ~ or spaces); use section.key=value" in state.message
    with pytest.raises(flows.OverrideError, match=r"^override 'datasets=\[\]': datasets cannot be overridden"):
        flows.pipeline(overrides={"datasets": []}, project=str(project))
    assert not (project / "pwned").exists() and (project / "params.yaml").read_text() == good


def test_overrides_are_written_in_the_grammar_of_dvc_exp_run_set():
    from hydra.core.override_parser.overrides_parser import (
        OverridesParser,  # what `dvc exp run -S` parses with
    )

    parse = OverridesParser.create().parse_overrides
    for value in (1, 2.5, 1e-07, "a b", "it's", "é", "a:b", "1,2", True, None, [2, 2.5], {"b": 1, "c": [1, "x", {"e": 2.5}]}):
        assert parse([f"key={flows.override_value(value)}"])[0].value() == value


def test_the_download_task_retries_with_backoff():
    task = flows.stage_task("download")
    assert task.retries == 3
    assert task.retry_delay_seconds == [30, 60, 120]
    assert flows.stage_task("prepare").retries == 0


def hold_workspace(project: Path, seconds: float) -> threading.Thread:
    """Another flow run, holding the workspace lock for `seconds` (started once it holds it)."""
    held = threading.Event()

    def holder():
        with flows.workspace_lock(project):
            held.set()
            time.sleep(seconds)

    thread = threading.Thread(target=holder)
    thread.start()
    assert held.wait(10)
    return thread


def test_a_second_flow_run_waits_for_the_workspace_or_fails_clearly(tmp_path):
    holder = hold_workspace(tmp_path, 1.5)
    started = time.monotonic()
    with pytest.raises(flows.WorkspaceBusy, match=r"is busy: pid \d+, flow run .* holds .*idm-flows.lock"):
        flows.dvc(["--version"], project=tmp_path, pipeline_run="x", lock_timeout=0.3)
    assert time.monotonic() - started < 1.5
    flows.dvc(["--version"], project=tmp_path, pipeline_run="x", lock_timeout=30)  # waits its turn
    assert time.monotonic() - started >= 1.5
    holder.join()


# --- retrain ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_first_model_becomes_champion_then_better_is_promoted_and_worse_rejected(train_project):
    first = flows.retrain(project=str(train_project), evaluator=fake_evaluator())
    assert first["promoted"] and first["reason"].startswith("no champion yet; passes the gate against bicubic")
    assert champion() == first["candidate"] == first["champion_after"] == "1"
    assert registry.version_tags("1")["promotion"] == "accepted"
    assert {"train", "retrain-candidate-v1", "promotion-v1"} <= set(first["runs"])  # MLflow runs of this flow run

    set_quality(train_project, 31.0)
    better = flows.retrain(project=str(train_project), evaluator=fake_evaluator())
    assert better["promoted"] and better["champion_before"] == "1" and champion() == "2"

    set_quality(train_project, 30.5)
    worse = flows.retrain(project=str(train_project), evaluator=fake_evaluator())
    assert not worse["promoted"] and champion() == "2"
    tags = registry.version_tags("3")
    assert tags["promotion"] == "rejected" and tags["promotion_reason"] == worse["reason"]
    assert "changed by -0.500" in worse["reason"]
    run = mlflow.MlflowClient().get_run(worse["decision_run"])
    assert run.data.tags["promotion"] == "rejected" and run.data.tags["champion_version"] == "2"
    assert "comparison.csv" in {a.path for a in mlflow.MlflowClient().list_artifacts(worse["decision_run"])}

    # Nothing changed: DVC skips train, and the same version is not judged twice.
    again = flows.retrain(project=str(train_project), evaluator=fake_evaluator())
    assert again["candidate"] == "3" and again["reason"].startswith("already rejected") and champion() == "2"


@pytest.mark.slow
def test_a_first_candidate_must_beat_the_shipped_model_and_bicubic(train_project):
    """No champion yet: the gate compares with the `pretrained` version and bicubic instead of promoting anything."""
    shipped = register_fake_model(30.5, alias=registry.PRETRAINED)
    first = flows.retrain(project=str(train_project), evaluator=fake_evaluator())  # quality 30.0 < 30.5
    assert not first["promoted"] and champion() is None
    assert first["reason"].startswith("no champion yet, so compared with the shipped pretrained model: mean psnr_y")
    assert "changed by -0.500" in first["reason"] and first["candidate"] != shipped
    set_quality(train_project, 31.0)
    second = flows.retrain(project=str(train_project), evaluator=fake_evaluator())
    assert second["promoted"] and champion() == second["candidate"]
    assert "against the shipped pretrained model and bicubic" in second["reason"]


@pytest.mark.slow
def test_a_retrain_that_crashes_mid_way_leaves_the_champion_untouched(train_project):
    register_fake_model(30.0, alias=CHAMPION)
    set_quality(train_project, 40.0)  # would be promoted, had the evaluation not crashed
    state = flows.retrain(project=str(train_project), evaluator=fake_evaluator(fail_on="candidate"), return_state=True)
    assert state.is_failed()
    with pytest.raises(RuntimeError, match="evaluation of the candidate crashed"):
        state.result()
    assert champion() == "1"
    assert "promotion" not in registry.version_tags("2")


@pytest.mark.slow
def test_a_train_stage_crashing_after_registering_leaves_the_champion(train_project):
    register_fake_model(30.0, alias=CHAMPION)
    (train_project / "fake.yaml").write_text("quality: 40.0\ncrash: true\n")
    state = flows.retrain(project=str(train_project), evaluator=fake_evaluator(), return_state=True)
    assert state.is_failed()
    with pytest.raises(flows.CommandFailed, match="repro --single-item train"):
        state.result()
    assert champion() == "1" and registry.version_by_alias(registry.CANDIDATE) == "2"


# --- evaluate -----------------------------------------------------------------------------------

def test_evaluate_flags_a_drop_of_the_champion_beyond_the_tolerance(train_project):
    # With no champion the run fails, with the reason, instead of completing having done nothing.
    state = flows.evaluate(project=str(train_project), evaluator=fake_evaluator(), return_state=True)
    assert state.is_failed() and "has the alias 'champion': nothing to evaluate" in state.message
    register_fake_model(30.0, alias=CHAMPION)

    steady = flows.evaluate(project=str(train_project), evaluator=fake_evaluator())
    assert steady["champion"] == "1" and not steady["regression"]

    dropped = flows.evaluate(project=str(train_project), evaluator=lambda uri, label, project: scores(30.0, drop=0.5))
    assert dropped["regression"] and dropped["drops"] == ["psnr_y tiny x4: 30.000 -> 29.500"]
    run = mlflow.MlflowClient().get_run(dropped["run_id"])
    assert run.data.tags["regression"] == "true" and run.data.tags["compared_with_run"] == steady["run_id"]
    assert run.data.tags["model_version"] == "1" and run.data.metrics["psnr_y.tiny.x4"] == 29.5

