"""kill -9 of training, a failed registration, two `dvc repro` at once and determinism, on one scratch project.

One story (the module fixture) drives `dvc repro` over the real dvc.yaml in a scratch copy
of the project (TINY model, 9 steps, a checkpoint every 3) through these faults, and each
test checks one property of what happened:

1. `dvc repro prepare`.
2. `dvc repro train` with a checkpoint of another configuration in models/idm; DVC and the
   stage are killed (SIGKILL to the process group) right after the step-3 checkpoint.
3. `dvc repro train`, killed half way through writing the step-6 checkpoint.
4. `dvc repro`: training resumes and finishes (step 9), then registering in MLflow fails.
5. `dvc repro`: registers the run step 4 finished without training it again, then
   quantize, evaluate and report.
6. `dvc repro --force` (an uninterrupted run from scratch), held after its step-3
   checkpoint while a second `dvc repro` is started in the same workspace, then released.

Resume: the checkpoint step 4 finished (after two kills) must equal step 6's bit for bit.
Determinism: the metrics.json and weights of runs 5 and 6 must be byte-identical. Both
hold on one machine with one CPU thread per stage (train.threads: 1); across machines or
thread counts float summation order may differ and only closeness can be promised.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
import torch

from idm.checkpoint import (
    CheckpointError,
    load_checkpoint,
    make_checkpoint,
    save_checkpoint,
)
from idm.models import IDM
from pipeline.params import load
from tests.helpers import stage_store_runs
from tests.reliability.harness import (
    dvc,
    dvc_project,
    kill_group,
    leftovers,
    start_dvc,
    wait_for,
)

pytestmark = pytest.mark.reliability


def _plant_other_config(project: Path) -> None:
    """models/idm/checkpoint.pt of another model configuration (twice the channels)."""
    params = load(project / "params.yaml")
    other = dataclasses.replace(params.model, base_channels=2 * params.model.base_channels)
    weights = IDM(other).state_dict()
    save_checkpoint(make_checkpoint(model_config=other, diffusion_config=params.diffusion, train_config=params.train,
                                    model=weights, ema=weights, optimizer={}, step=2, rng=[]),
                    project / "models" / "idm" / "checkpoint.pt")


def _killed(project: Path, fault: dict) -> str:
    """`dvc repro train` with `fault`, killed (SIGKILL to DVC and the stage) once the fault's marker appears."""
    proc = start_dvc(project, "repro", "train", fault=fault)
    wait_for(Path(fault["marker"]), proc)
    return kill_group(proc)


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Runs the six steps of the module docstring; returns what each left behind."""
    tmp = tmp_path_factory.mktemp("crash")
    project = dvc_project(tmp / "project", train={"steps": 9, "checkpoint_every": 3, "log_every": 3, "sample_every": 0})
    models = project / "models" / "idm"
    s: dict = {}

    first = dvc(project, "repro", "prepare")
    assert first.returncode == 0, first.stdout + first.stderr

    _plant_other_config(project)
    started = int(time.time() * 1000)
    s["out2"] = _killed(project, {"kind": "pause-after-save", "step": 3, "marker": str(tmp / "m2")})
    s["step2"] = load_checkpoint(models / "checkpoint.pt")["step"]
    s["old2"] = load_checkpoint(models / "checkpoint.pt.old")["model_config"]

    s["out3"] = _killed(project, {"kind": "pause-mid-save", "step": 6, "marker": str(tmp / "m3")})
    s["partial3"] = sorted(models.glob(".checkpoint.pt.*.tmp"))
    s["partial3_errors"] = []
    for partial in s["partial3"]:
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(partial)
        s["partial3_errors"].append(str(err.value))
    s["step3"] = load_checkpoint(models / "checkpoint.pt")["step"]

    s["run4"] = dvc(project, "repro", fault={"kind": "fail-register"})
    s["train_runs4"] = [(r.info.status, r.data.tags.get("ended_by", "")) for r in reversed(
        stage_store_runs(f"tags.dvc_stage = 'train' and attributes.start_time >= {started}"))]
    s["resumed"] = load_checkpoint(models / "checkpoint.pt")
    s["registered4"] = (models / "registered.json").exists()
    s["leftovers4"] = leftovers(models)

    s["run5"] = dvc(project, "repro")
    assert s["run5"].returncode == 0, s["run5"].stdout + s["run5"].stderr
    s["metrics5"] = (project / "reports" / "metrics.json").read_bytes()
    s["model5"] = load_checkpoint(models / "model.pt")

    release = tmp / "release6"
    proc = start_dvc(project, "repro", "--force",
                     fault={"kind": "pause-after-save", "step": 3, "marker": str(tmp / "m6"), "release": str(release)})
    wait_for(tmp / "m6", proc)
    s["second"] = dvc(project, "repro", timeout=120)
    release.touch()
    s["out6"], _ = proc.communicate(timeout=600)
    s["code6"] = proc.returncode
    s["status6"] = dvc(project, "status")
    s["metrics6"] = (project / "reports" / "metrics.json").read_bytes()
    s["model6"] = load_checkpoint(models / "model.pt")
    s["straight"] = load_checkpoint(models / "checkpoint.pt")
    s["leftovers6"] = leftovers(models)
    return s


def _same_tensors(a: object, b: object) -> bool:
    """Equal nested containers of tensors and plain values, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same_tensors, a, b))
    return a == b or (a != a and b != b)  # NaN == NaN here


def test_kill_after_a_checkpoint_leaves_it_whole_and_another_config_is_set_aside(story):
    assert "starting afresh" in story["out2"] and "differs in" in story["out2"], story["out2"]
    assert story["old2"]["base_channels"] == 16, "the other configuration's checkpoint is kept as checkpoint.pt.old"
    assert story["step2"] == 3


def test_the_mlflow_runs_of_killed_stages_are_closed_as_killed_by_the_next_stage(story):
    """SIGKILL leaves a run RUNNING; the next stage's stage_run marks it KILLED, saying why."""
    (status2, why2), (status3, why3), (status4, _) = story["train_runs4"]
    assert (status2, status3) == ("KILLED", "KILLED") and "no longer exists" in why2 and "no longer exists" in why3
    assert status4 == "FAILED"  # run 4 itself failed to register (an exception ends its run)


def test_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint(story):
    assert story["partial3"], "the kill left the half-written temporary file"
    assert len(story["partial3_errors"]) == len(story["partial3"]), "a half-written checkpoint never loads"
    assert story["step3"] == 3
    assert "resuming from" in story["out3"]


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(story):
    assert "resuming from" in story["run4"].stdout
    resumed, straight = story["resumed"], story["straight"]
    assert resumed["step"] == straight["step"] == 9
    for part in ("model", "ema", "optimizer"):
        assert _same_tensors(resumed[part], straight[part]), part
    # Training draws from torch's generators only; numpy's and Python's are seeded from the OS
    # in every fresh process, so an uninterrupted run's copy of them is arbitrary.
    for part in ("torch", "data"):
        assert torch.equal(resumed["rng"][0][part], straight["rng"][0][part]), part


def test_no_half_written_checkpoint_is_left_in_the_output(story):
    assert [n for n in story["leftovers4"] if n.endswith(".tmp")] == []
    assert [n for n in story["leftovers6"] if n.endswith(".tmp")] == []


def test_a_failed_registration_is_one_clear_line_and_keeps_the_finished_run(story):
    run4 = story["run4"]
    assert run4.returncode != 0
    errors = [line for line in (run4.stdout + run4.stderr).splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "MLflow store" in errors[0] and "Connection refused" in errors[0], errors
    assert story["resumed"]["step"] == 9 and not story["registered4"]


def test_the_finished_run_is_registered_without_training_again(story):
    out = story["run5"].stdout
    assert "starting afresh" not in out and "without training again" in out, out


def test_a_second_dvc_repro_in_the_same_workspace_fails_clearly(story):
    second = story["second"]
    assert second.returncode != 0
    text = second.stdout + second.stderr
    assert "is busy" in text or "Unable to acquire lock" in text, text
    assert story["code6"] == 0, story["out6"]
    assert "Data and pipelines are up to date" in story["status6"].stdout, story["status6"].stdout


def test_two_full_runs_give_identical_metrics_and_weights(story):
    assert json.loads(story["metrics5"])["idm"], "idm was evaluated"
    assert story["metrics5"] == story["metrics6"]
    assert _same_tensors(story["model5"]["ema"], story["model6"]["ema"])

