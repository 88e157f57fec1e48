"""params.yaml parsing: defaults load, typos and bad values fail naming the key."""

from __future__ import annotations

import math

import pytest
import yaml

from pipeline import params as P

BASE = {"datasets": [{"name": "tiny", "source": "folder", "path": "imgs"}]}


def parse(**sections):
    return P.parse({**BASE, **sections})


def test_default_params_file_loads():
    p = P.load()
    assert p.datasets[0].source == "skimage"
    assert {2.0, 3.0, 4.0} <= set(p.prepare.scales)
    assert any(s != int(s) for s in p.prepare.scales), "a non-integer scale is evaluated by default"
    assert {6.0, 8.0, 12.0} <= set(p.prepare.ood_scales)
    assert p.evaluate.device == "auto"


def test_model_preset_with_overrides():
    from idm.config import MODEL_PRESETS

    p = parse(model={"preset": "paper", "dropout": 0.1, "channel_mults": [1, 2, 4, 8]})
    assert p.model.base_channels == MODEL_PRESETS["paper"].base_channels
    assert p.model.dropout == 0.1 and p.model.channel_mults == (1, 2, 4, 8)
    assert parse().model == MODEL_PRESETS["tiny"]


def test_sample_preset_with_overrides():
    from idm.config import SAMPLE_PRESETS

    assert P.load().sample.steps == SAMPLE_PRESETS["balanced"]["steps"]  # params.yaml's default preset
    p = parse(sample={"preset": "perceptual", "seed": 3})
    assert (p.sample.steps, p.sample.temperature, p.sample.seed) == (1, 1.0, 3)
    assert parse(sample={"preset": "perceptual", "steps": 4}).sample.steps == 4  # a key overrides the preset
    assert parse(sample={"preset": "fidelity"}).sample.steps == 0
    with pytest.raises(P.ParamsError, match="sample.preset must be one of"):
        parse(sample={"preset": "sharp"})
    with pytest.raises(P.ParamsError, match=r"unknown key sample.stepz; allowed keys: \['preset', "):
        parse(sample={"stepz": 1})


def test_metric_weights_params():
    assert parse(evaluate={"fid_url": "https://mirror/x.pth", "fid_sha256": "abcdef12"}).evaluate.fid_url
    with pytest.raises(P.ParamsError, match="given together"):
        parse(evaluate={"fid_url": "https://mirror/x.pth"})
    with pytest.raises(P.ParamsError, match="8 to 64 hex digits"):
        parse(evaluate={"lpips_url": "https://mirror/a.pth", "lpips_sha256": "xyz"})
    with pytest.raises(P.ParamsError, match="fid_min_patches must be an integer >= 2"):
        parse(evaluate={"fid_min_patches": 1})


def test_values_are_converted_and_frozen():
    p = parse(prepare={"scales": [2, 2.5], "ood_scales": [8]})
    assert p.prepare.scales == (2.0, 2.5) and isinstance(p.prepare.scales[0], float)
    assert p.prepare.all_scales == (2.0, 2.5, 8.0)
    with pytest.raises(AttributeError):
        p.prepare.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "raw, message",
    [
        ({**BASE, "prepare": {"scale": [2]}}, "unknown key prepare.scale"),
        ({**BASE, "evaluat": {}}, "unknown section 'evaluat'"),
        ({"datasets": [{"name": "a", "source": "folder", "path": "x", "test_fracton": 1}]}, "unknown key datasets[0].test_fracton"),
        ({**BASE, "prepare": {"scales": [1]}}, "prepare.scales must be finite numbers > 1, got 1.0"),
        ({**BASE, "prepare": {"scales": [0.5]}}, "prepare.scales must be finite numbers > 1"),
        ({**BASE, "prepare": {"scales": [math.nan]}}, "got nan"),
        ({**BASE, "prepare": {"ood_scales": [math.inf]}}, "got inf"),
        ({**BASE, "prepare": {"scales": ["two"]}}, "prepare.scales[0] must be of type float"),
        ({**BASE, "prepare": {"seed": 1.5}}, "prepare.seed must be of type int"),
        ({**BASE, "prepare": {"seed": True}}, "prepare.seed must be of type int"),
        ({**BASE, "prepare": {"scales": [2], "ood_scales": [2]}}, "not also listed"),
        ({"datasets": [{"name": "a", "source": "ftp"}]}, "source must be one of ['skimage', 'folder', 'url']"),
        ({"datasets": [{"name": "a", "source": "folder"}]}, "datasets[a].path"),
        ({"datasets": [{"name": "a", "source": "url"}]}, "exactly one of 'url' or 'preset'"),
        ({"datasets": [{"name": "a", "source": "skimage", "images": ["lena"]}]}, "unknown ['lena']"),
        ({"datasets": [BASE["datasets"][0], BASE["datasets"][0]]}, "duplicates ['tiny']"),
        ({"datasets": []}, "at least one dataset"),
        ({**BASE, "evaluate": {"methods": ["nearest"]}}, "evaluate.methods must be a non-empty list from ['bicubic', 'idm', 'idm-regression', 'idm-int8', 'pretrained', 'pretrained-regression']"),
        ({**BASE, "evaluate": {"device": "tpu"}}, "evaluate.device must be one of ['auto', 'cpu', 'cuda']"),
        ({"datasets": [{"source": "skimage"}]}, "datasets[0]"),
        ({**BASE, "model": {"preset": "huge"}}, "model.preset must be one of ['lean', 'paper', 'tiny']"),
        ({**BASE, "model": {"base_chanels": 8}}, "unknown key model.base_chanels"),
        ({**BASE, "model": {"base_channels": 0}}, "model: base_channels must be an integer >= 1, got 0"),
        ({**BASE, "model": {"norm_groups": 5}}, "norm_groups=5 must divide"),
        ({**BASE, "diffusion": {"schedule": "sigmoid"}}, "unknown schedule 'sigmoid'; expected one of ['cosine', 'linear']"),
        ({**BASE, "diffusion": {"timesteps": 0}}, "timesteps must be an integer >= 1"),
        ({**BASE, "train": {"scale_min": -2}}, "scale_min"),
        ({**BASE, "train": {"lerning_rate": 1e-4}}, "unknown key train.lerning_rate; allowed keys: ['device', 'processes', 'threads', "),
        ({**BASE, "train": {"processes": 0}}, "train.processes must be an integer >= 1, got 0"),
        ({**BASE, "sample": {"threads": -1}}, "sample.threads must be an integer >= 0 (0: one per physical core), got -1"),
        ({**BASE, "train": {"device": "tpu"}}, "train.device must be one of"),
        ({**BASE, "sample": {"sampler": "euler"}}, "sample.sampler must be one of ['ddim', 'ddpm']"),
        ({**BASE, "sample": {"spacing": "cosine"}}, "sample.spacing must be one of ['uniform', 'quadratic']"),
        ({**BASE, "sample": {"tile_norm": "batch"}}, "sample.tile_norm must be one of ['tile', 'image']"),
        ({**BASE, "sample": {"temperature": 1.5}}, "sample.temperature must be a number in [0, 1], got 1.5"),
        ({**BASE, "sample": {"temperature": float("nan")}}, "sample.temperature must be a number in [0, 1], got nan"),
        ({**BASE, "model": {"prediction": "score"}}, "unknown prediction 'score'; expected one of ['eps', 'x0', 'v']"),
        ({**BASE, "train": {"target": "refined"}}, "target must be one of ['image', 'refine', 'residual']"),
        ({**BASE, "train": {"condition_loss": -1}}, "condition_loss must be a number >= 0, got -1"),
        ({**BASE, "promotion": {"metric": "lpips"}}, "promotion.metric must be one of"),
        ({**BASE, "schedules": {"retrain_cron": "weekly"}}, "5-field cron"),
        ([1, 2], "must be a mapping"),
        ({**BASE, "prepare": {"scales": [2, 3, 2]}}, "prepare.scales must be distinct scales (each is scored and gated once), got duplicates [2.0]"),
        ({**BASE, "prepare": {"ood_scales": [8, 8]}}, "prepare.ood_scales must be distinct scales"),
        ({"datasets": [{"name": "s", "source": "skimage", "images": [], "test_fraction": 0.5}]}, "datasets[s].images must be at least one image name"),
        ({"datasets": [{"name": "s", "source": "skimage", "images": ["retina", "retina"]}]}, "distinct names, got duplicates ['retina']"),
    ],
)
def test_bad_params_name_the_key(raw, message):
    with pytest.raises(P.ParamsError) as err:
        P.parse(raw)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("datasets, message", [
    ([{"name": "a", "source": "folder", "path": "x"}], "at least one dataset with images left for training"),
    ([{"name": "a", "source": "folder", "path": "x", "test_fraction": 0.0}], "at least one dataset with test images"),
    ([{"name": "s", "source": "skimage", "images": ["retina"], "test_fraction": 0.5}], "images left for training"),
], ids=["all-test", "all-train", "lone-photo"])
def test_a_split_with_no_training_or_no_test_images_fails_the_pipeline_check(tmp_path, datasets, message):
    params = P.parse({"datasets": datasets})  # fine for one stage on its own (evaluate on test sets, say)
    with pytest.raises(P.ParamsError, match=message):
        P.check_pipeline(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"datasets": datasets}))
    assert P.main([str(path)]) == 2
    P.check_pipeline(P.parse({"datasets": [{**BASE["datasets"][0], "test_fraction": 0.5}]}))  # split in two: passes


def test_load_reports_yaml_errors_and_missing_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("datasets: [unclosed\n")
    with pytest.raises(P.ParamsError, match="not valid YAML"):
        P.load(bad)
    with pytest.raises(P.ParamsError, match="no such params file"):
        P.load(tmp_path / "missing.yaml")


@pytest.mark.parametrize("text, message", [
    ("datasets: [{name: a, source: folder, path: x, test_fraction: 0.5}]\nprepare: {seed: 0}\nprepare: {seed: 1}\n",
     "line 3: duplicate key 'prepare' (the later one would silently win)"),
    ("datasets: [{name: a, source: folder, path: x, test_fraction: 0.5}]\nreport:\n  crop: 16\n  crop: 32\n",
     "line 4: duplicate key 'crop'"),
    ("x: &x [1, 1]\ndatasets: [{name: a, source: folder, path: x, test_fraction: 0.5}]\ny: *x\n",
     "line 3: aliases (*name) are not allowed"),
], ids=["duplicate-section", "duplicate-key", "alias"])
def test_duplicate_keys_and_aliases_are_refused(tmp_path, text, message):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(P.ParamsError, match=__import__("re").escape(message)):
        P.load(path)


def test_an_exponentially_expanding_file_is_refused_at_once(tmp_path):
    """Nine levels of nine aliases: 9^9 values once expanded; refused at the first alias."""
    lines = ["l0: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)]
    path = tmp_path / "params.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(P.ParamsError, match="line 2: aliases"):
        P.load(path)
    assert P.main([str(path)]) == 2
    path.write_text("x: " + "a" * (P.MAX_FILE_BYTES + 1))
    with pytest.raises(P.ParamsError, match="too large for a params file"):
        P.load(path)


def test_the_project_params_check_runs_before_dvc_in_make_run_and_make_test():
    makefile = (P.ROOT / "Makefile").read_text()
    for target in ("run", "test"):
        recipe = makefile.split(f"\n{target}: ")[1].split("\n\n")[0]
        assert recipe.index("-m pipeline.params") < recipe.index("dvc repro" if target == "run" else "pytest")
    assert P.main([str(P.PARAMS_FILE)]) == 0


def test_yaml_nan_scale_is_rejected(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(BASE) + "prepare:\n  scales: [.nan]\n")
    with pytest.raises(P.ParamsError, match="finite numbers > 1, got nan"):
        P.load(path)


def test_flatten_names_datasets():
    flat = P.flatten(parse())
    assert flat["datasets.tiny.source"] == "folder"
    assert flat["prepare.seed"] == 0
    assert flat["evaluate.methods"] == ("bicubic",)


@pytest.mark.parametrize("section", sorted(P.section_keys()))
def test_section_keys_are_the_keys_parse_accepts(section):
    """pipeline.overrides allows exactly these keys: the ones parse lists as allowed."""
    with pytest.raises(P.ParamsError) as err:
        parse(**{section: {"zz_unknown": 1}})
    allowed = __import__("ast").literal_eval(str(err.value).split("allowed keys: ")[1])
    assert sorted(allowed) == list(P.section_keys()[section])
    assert "datasets" not in P.section_keys() and set(P.section_keys()) | {"datasets"} == set(P.SECTIONS)


def test_a_float_with_an_exponent_and_no_dot_is_a_float(tmp_path):
    """As in YAML 1.2: `dvc exp run -S` writes an overridden 1e-7 as `1e-07` (PyYAML alone reads a string)."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(BASE) + "train: {lr: 1e-07, steps: 1_000}\ndiffusion: {beta_start: 2E-6, beta_end: .5e-1}\n")
    p = P.load(path)
    assert (p.train.lr, p.train.steps, p.diffusion.beta_start, p.diffusion.beta_end) == (1e-7, 1000, 2e-6, 0.05)
    path.write_text(yaml.safe_dump(BASE) + "schedules: {timezone: 1e5x}\n")
    assert P.load(path).schedules.timezone == "1e5x"


def test_make_check_runs_the_params_check_alone():
    makefile = (P.ROOT / "Makefile").read_text()
    recipe = makefile.split("\ncheck: ")[1].split("\n\n")[0]
    assert recipe.splitlines()[1:] == ["\t$(VENV)/bin/python -m pipeline.params"]
    assert "check hooks" in makefile.split(".PHONY: ")[1].split("\n")[0]


def test_the_pre_commit_hook_refuses_a_params_file_that_fails_the_check(tmp_path):
    """`make hooks` in a scratch clone, then real commits: an alias bomb is refused, a good file passes."""
    import shutil
    import subprocess
    import sys

    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("pipeline", "idm"):
        shutil.copytree(P.ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "scripts").mkdir()
    shutil.copy(P.ROOT / "scripts" / "pre-commit", repo / "scripts" / "pre-commit")
    shutil.copy(P.ROOT / "Makefile", repo / "Makefile")
    venv = repo / ".venv" / "bin"  # the hook checks with the clone's .venv/bin/python
    venv.mkdir(parents=True)
    (venv / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (venv / "python").chmod(0o755)
    (repo / ".gitignore").write_text(".venv/\n")
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]

    def run(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=120)

    run(*git, "init", "-q")
    installed = run("make", "-s", "hooks")
    assert installed.returncode == 0 and "installed" in installed.stdout, installed.stderr
    good = yaml.safe_dump({"datasets": [{**BASE["datasets"][0], "test_fraction": 0.5}]})
    (repo / "params.yaml").write_text(good)
    run(*git, "add", "-A")
    assert run(*git, "commit", "-qm", "good").returncode == 0
    lines = ["l0: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)]
    (repo / "params.yaml").write_text(good + "\n".join(lines) + "\n")
    run(*git, "add", "params.yaml")
    refused = run(*git, "commit", "-qm", "bomb")
    assert refused.returncode != 0
    assert refused.stderr.splitlines() == [
        "error: params.yaml: line 7: aliases (*name) are not allowed: a few of them can expand the file into "
        "gigabytes; write the values out",
        "pre-commit: the staged params.yaml fails the check above; fix it (or commit with --no-verify)"]
    assert run("git", "rev-list", "--count", "HEAD").stdout.strip() == "1"
    assert run("make", "-s", "hooks").returncode == 0  # installing again is a no-op
