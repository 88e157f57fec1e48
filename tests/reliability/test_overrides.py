"""Per-run overrides (`python -m pipeline.flows pipeline -S key=value`, the pipeline flow's
`overrides`, a deployment's parameter) only ever set values of params.yaml.

`dvc exp run -S` would apply any file prefix (`dvc.yaml:stages.train.cmd=...` rewrites a
command) and Hydra's grammar (`+key`, `~key`, `${oc.env:...}`), so everything else is refused
with one line before DVC runs, and what DVC is given is written by the project and read back
by DVC's own code to exactly the params that were checked.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import flows
from pipeline import overrides as O
from pipeline import params as P
from tests.conftest_prefect import make_project, real_stages
from tests.reliability.harness import assert_one_line_error, child_env, snapshot

pytestmark = pytest.mark.reliability

FORM = ("use section.key=value with a key of params.yaml (e.g. train.steps=500), section one of "
        "['diffusion', 'evaluate', 'model', 'prepare', 'promotion', 'report', 'sample', 'schedules', 'train']")
NOT_A_KEY = "is not a key of params.yaml (no file prefix, no +, ~ or spaces); " + FORM
PLAIN = ("it must be plain YAML data: a number, true/false, null, one line of text without '${', "
         "or a list or mapping of those")
PARAMS = {"datasets": [{"name": "tiny", "source": "folder", "path": "imgs", "test_fraction": 0.5}],
          "prepare": {"scales": [2, 3], "ood_scales": [4], "seed": 0},
          "train": {"steps": 10, "lr": 2.0e-4}, "sample": {"preset": "balanced"}, "schedules": {"timezone": "UTC"}}


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    return path


def refusal(texts: list[str], params_file: Path) -> str:
    """The one-line OverrideError of `-S texts...` (parsed, then checked against params_file)."""
    with pytest.raises(O.OverrideError) as err:
        O.check_params(params_file, O.parse_cli_overrides(texts))
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("text, why", [
    # a file prefix: DVC would edit that file, dvc.yaml's commands included
    ("dvc.yaml:stages.train.cmd=touch pwned", f"'dvc.yaml:stages.train.cmd' {NOT_A_KEY}"),
    ("params.yaml:train.steps=5", f"'params.yaml:train.steps' {NOT_A_KEY}"),
    ("other.yaml:x=1", f"'other.yaml:x' {NOT_A_KEY}"),
    # Hydra's grammar: add, force-add, delete, packages, nested config
    ("+train.foo=1", f"'+train.foo' {NOT_A_KEY}"),
    ("++train.steps=3", f"'++train.steps' {NOT_A_KEY}"),
    ("~train.steps=10", f"'~train.steps' {NOT_A_KEY}"),
    ("~train.steps", "no '='; use section.key=value with a key of params.yaml (e.g. train.steps=500)"),
    ("train.steps@_global_=1", f"'train.steps@_global_' {NOT_A_KEY}"),
    ("hydra.run.dir=/tmp", f"'hydra.run.dir' {NOT_A_KEY}"),
    # other characters, empty parts
    ("train/steps=1", f"'train/steps' {NOT_A_KEY}"),
    (" train.steps=1", f"' train.steps' {NOT_A_KEY}"),
    ("train.steps =1", f"'train.steps ' {NOT_A_KEY}"),
    ("=1", f"'' {NOT_A_KEY}"),
    ("train.=1", f"'train.' {NOT_A_KEY}"),
    ("Train.steps=1", f"'Train.steps' {NOT_A_KEY}"),
    ("bad=1", f"'bad' {NOT_A_KEY}"),
    # unknown sections and keys; what may not be overridden
    ("nope.x=1", f"unknown section 'nope'; {FORM}"),
    ("report.crop.x=1", f"'report.crop.x' {NOT_A_KEY}"),
    ("promotion.metrc=ssim_y", "unknown key promotion.metrc; allowed keys of promotion: "
                               "['max_drop', 'metric', 'min_improvement']"),
    ("datasets=[]", "datasets cannot be overridden (it says which files and URLs the pipeline reads): "
                    f"edit params.yaml, or {FORM}"),
    ("datasets.0.path=/etc", "datasets cannot be overridden (it says which files and URLs the pipeline reads): "
                             f"edit params.yaml, or {FORM}"),
    ("evaluate.fid_url=https://evil.example/x.pth",
     "evaluate.fid_url says where a file is downloaded from and cannot be overridden: edit params.yaml"),
], ids=lambda v: v if len(v) < 40 else None)
def test_a_key_that_is_not_a_section_key_of_params_yaml_is_refused(params_file, text, why):
    assert refusal([text], params_file) == f"override {text!r}: {why}"


@pytest.mark.parametrize("text, why", [
    ("schedules.timezone=${oc.env:HOME}", f"the value is text with '${{' (DVC would expand it); {PLAIN}"),
    ("schedules.timezone=x${oc.env:HOME}", f"the value is text with '${{' (DVC would expand it); {PLAIN}"),
    ('schedules.timezone="UTC\\ntrain.steps=1"', f"the value is text with a line break or another control character; {PLAIN}"),
    ('schedules.timezone="UTC\\L"', f"the value is text with a line break or another control character; {PLAIN}"),
    ("schedules.timezone=UT\\C", f"DVC would not read this value back exactly; {PLAIN}"),
    ("train.steps=!!python/object/apply:os.system [ls]", "the value is not valid YAML (line 1: could not determine a "
     f"constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'); {PLAIN}"),
    ("prepare.scales=[&a 2, *a]", "the value is line 1: aliases (*name) are not allowed: a few of them can expand the "
                                  f"file into gigabytes; write the values out; {PLAIN}"),
    ("train.steps=2024-01-01", f"the value is a date; {PLAIN}"),
    ("train.steps=.inf", f"the value is a number that is not finite; {PLAIN}"),
    ("train.steps=123456789012345678901234567890", f"the value is an integer beyond 64 bits; {PLAIN}"),
    ("prepare.scales=[2, [3]]", f"the value is a list or mapping inside another; {PLAIN}"),
    ("prepare.scales=[2, {a: 3}]", f"the value is a list or mapping inside another; {PLAIN}"),
    ("train.steps={a b: 1}", f"the value is a mapping whose keys are not plain names; {PLAIN}"),
], ids=lambda v: v if len(v) < 40 else None)
def test_a_value_that_is_not_plain_data_is_refused(params_file, text, why):
    assert refusal([text], params_file) == f"override {text!r}: {why}"


def test_very_long_or_repeated_overrides_are_refused(params_file):
    long = "schedules.timezone=" + "x" * 1000
    assert refusal([long], params_file) == f"override {long[:80] + '...'!r}: 1019 characters; at most 1000"
    assert refusal(["train.steps=1", "train.steps=2"], params_file) == \
        "override 'train.steps=2': train.steps is given twice; give each key once"


@pytest.mark.parametrize("texts, why", [
    (["train.steps=abc"], "train.steps='abc': params.yaml: train.steps must be of type int, got 'abc'"),
    (["train.steps="], "train.steps=None: params.yaml: train.steps must be of type int, got None"),
    (["prepare.scales=[2, 4]"], "prepare.scales=[2, 4]: params.yaml: prepare.ood_scales must be scales not also "
                                "listed in prepare.scales, got [4.0]"),
    (["sample.temperature=2"], "sample.temperature=2: params.yaml: sample.temperature must be a number in [0, 1], got 2.0"),
    (["train.steps=1,2"], "train.steps='1,2': params.yaml: train.steps must be of type int, got '1,2'"),  # no sweep
], ids=["type", "empty", "overlap", "range", "sweep"])
def test_the_merged_params_must_pass_the_full_check(params_file, texts, why):
    assert refusal(texts, params_file) == f"with the overrides {why}"


@pytest.mark.parametrize("overrides, message", [
    (["train.steps", 1], "overrides must be a mapping {section.key: value}, got list; each one section.key=value "
                         "with a key of params.yaml (e.g. train.steps=500)"),
    ({1: 2}, f"override '1=2': 1 {NOT_A_KEY}"),
    ({"train.steps=1": 2}, f"override 'train.steps=1=2': 'train.steps=1' {NOT_A_KEY}"),
    ({"dvc.yaml:stages.train.cmd": "touch pwned"},
     f"override \"dvc.yaml:stages.train.cmd='touch pwned'\": 'dvc.yaml:stages.train.cmd' {NOT_A_KEY}"),
    ({"train.steps": b"1"}, f"override \"train.steps=b'1'\": the value is a bytes; {PLAIN}"),
    ({"train.steps": float("nan")}, f"override 'train.steps=nan': the value is a number that is not finite; {PLAIN}"),
    ({"schedules.timezone": "UTC\u2028x"},
     f"override {'schedules.timezone=' + repr('UTC' + chr(0x2028) + 'x')!r}: the value is text with a line break or "
     f"another control character; {PLAIN}"),
    ({"schedules.timezone": "${oc.env:AWS_SECRET_ACCESS_KEY}"},
     f"override \"schedules.timezone='${{oc.env:AWS_SECRET_ACCESS_KEY}}'\": the value is text with '${{' (DVC would expand it); {PLAIN}"),
    ({"prepare.scales": list(range(2, 602))},
     f"override {('prepare.scales=' + repr(list(range(2, 602))))[:80] + '...'!r}: the value is 600 items (at most 500); "
     f"{PLAIN}"),
    ({"schedules.timezone": "x" * 990},
     f"override {('schedules.timezone=' + repr('x' * 990))[:80] + '...'!r}: 1011 characters once written for DVC; at most 1000"),
], ids=["list", "int-key", "equals-in-key", "file-prefix", "bytes", "nan", "line-separator", "interpolation", "many-items", "long"])
def test_the_flow_parameter_gets_the_same_rules(overrides, message):
    """The pipeline flow's `overrides` arrive as JSON from the Prefect UI or API, not as -S text."""
    with pytest.raises(O.OverrideError) as err:
        O.check_overrides(overrides)
    assert str(err.value) == message


def test_the_flow_and_its_experiment_task_refuse_before_dvc_runs(params_file, monkeypatch):
    called = []
    monkeypatch.setattr(flows, "dvc", lambda *a, **k: called.append(a))
    hostile = [{"dvc.yaml:stages.download.cmd": "touch pwned"}, {"+train.foo": 1}, {"datasets": []},
               {"schedules.timezone": "${oc.env:HOME}"}]
    for overrides in [*hostile, {"train.steps": "abc"}]:
        with pytest.raises(O.OverrideError, match=r"^(override |with the overrides )"):
            flows.pipeline.fn(overrides=overrides, project=str(params_file.parent))
    for overrides in hostile:  # the task, run on its own, checks keys and values again
        with pytest.raises(O.OverrideError, match=r"^override "):
            flows.run_experiment.fn(overrides, "x", params_file.parent, "run")
    assert called == [] and [p.name for p in params_file.parent.iterdir()] == ["params.yaml"]


def test_what_dvc_is_given_is_read_back_by_dvc_as_exactly_the_checked_params(params_file, tmp_path, monkeypatch):
    """DVC's own `-S` code (to_path_overrides, apply_overrides) on a copy of the params file."""
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import apply_overrides
    from hydra.core.override_parser.overrides_parser import OverridesParser

    # Why the key rule: DVC would send this one to dvc.yaml.
    assert to_path_overrides(["dvc.yaml:stages.train.cmd=touch pwned"]) == {"dvc.yaml": ["stages.train.cmd=touch pwned"]}
    texts = ["train.steps=500", "train.lr=1e-7", "sample.steps=4", "sample.preset=null", "prepare.scales=[2, 2.5]",
             "schedules.timezone=America/Argentina/Buenos_Aires", "schedules.retrain_cron=0 3 * * 1",
             "promotion.metric=ssim_y", "evaluate.offline=true", "report.crop=32", "model.dropout=0.1",
             """schedules.evaluate_cron="0 6 * * 1" """.strip(), "evaluate.methods=[bicubic, idm]"]
    overrides = O.parse_cli_overrides(texts)
    O.check_params(params_file, overrides)
    args = O.override_args(overrides, P.read_yaml(params_file))
    assert all(a.startswith("params.yaml:") for a in args)
    assert "params.yaml:+sample.steps=4" in args and "params.yaml:train.steps=500" in args  # + only for absent keys
    parsed = OverridesParser.create().parse_overrides([a.partition(":")[2] for a in args])
    assert not any(o.is_sweep_override() or o.is_delete() for o in parsed)

    work = tmp_path / "dvc"
    work.mkdir()
    shutil.copy(params_file, work / "params.yaml")
    monkeypatch.chdir(work)
    for path, settings in to_path_overrides(args).items():
        assert path == "params.yaml"
        apply_overrides(path, settings)
    expected = json.loads(json.dumps(PARAMS))
    for key, value in overrides.items():
        section, name = key.split(".")
        expected.setdefault(section, {})[name] = value
    assert P.load(work / "params.yaml") == P.parse(expected)
    assert P.load(work / "params.yaml").train.lr == 1e-7  # DVC writes 1e-07; read as a float (YAML 1.2)


@pytest.mark.parametrize("args, params_text, fragments", [
    (["-S", "dvc.yaml:stages.download.cmd=touch pwned"], None,
     ["error: override 'dvc.yaml:stages.download.cmd=touch pwned': 'dvc.yaml:stages.download.cmd' is not a key"]),
    (["-S", "bad=1"], None, ["error: override 'bad=1': 'bad' is not a key of params.yaml"]),
    (["-S", "prepare.seed=1"], "x: &x [1, 1]\ny: [*x, *x]\n", ["params.yaml: line 14: aliases (*name) are not allowed"]),
], ids=["file-prefix", "bad-key", "alias-bomb"])
def test_the_cli_refuses_with_one_line_and_touches_nothing(tmp_path, args, params_text, fragments):
    project = make_project(tmp_path / "project", real_stages("download"))
    if params_text is not None:
        (project / "params.yaml").write_text((project / "params.yaml").read_text() + params_text)
    before = snapshot(project)
    env = {**child_env(), "PYTHONDONTWRITEBYTECODE": "1"}  # the copy of pipeline/ is the one imported
    done = subprocess.run([sys.executable, "-m", "pipeline.flows", "pipeline", *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300)
    assert_one_line_error(done.returncode, done.stderr, *fragments)
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert snapshot(project) == before  # no pwned file, no .dvc/tmp, params.yaml as it was
