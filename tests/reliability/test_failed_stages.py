"""A stage that fails under `dvc repro`, for any reason, leaves every previous output as it was.

DVC deletes a stage's outputs before running its command unless they are `persist: true`;
one scratch project (the module fixture) runs the whole pipeline once, then each test
breaks one thing, runs `dvc repro` on the stage it breaks and compares every output of
every stage byte for byte, the `cache: false` reports included.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.reliability.harness import dvc, dvc_project, snapshot

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

OUTPUTS = ("data/raw", "data/prepared", "models/idm", "models/idm-int8", "data/sr", "reports")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = dvc_project(tmp_path_factory.mktemp("failed") / "project")
    done = dvc(project, "repro", timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return project


def _outputs(project: Path) -> dict[str, dict[str, bytes]]:
    return {name: snapshot(project / name) for name in OUTPUTS}


def _edit_params(project: Path, section: str, values: dict) -> str:
    """Update params.yaml's `section` with `values`; returns the original text."""
    original = (project / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params[section] = {**params.get(section, {}), **values}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return original


@pytest.mark.parametrize("section, values, stage, message", [
    ("prepare", {"seeed": 1}, "prepare", "unknown key prepare.seeed"),
    ("evaluate", {"methods": ["bicubic", "nearest"]}, "evaluate", "evaluate.methods must be"),
    ("report", {"crop": 2}, "report", "report.crop must be"),
    # evaluate runs bicubic, then finds no tile fits for idm: a failure half way through
    ("sample", {"max_memory_gb": 1e-6}, "evaluate", "fits in"),
], ids=["typo-in-prepare", "bad-method", "bad-report-crop", "evaluate-fails-mid-way"])
def test_a_failing_stage_keeps_every_previous_output(project: Path, section: str, values: dict, stage: str,
                                                    message: str) -> None:
    before = _outputs(project)
    assert all(before.values()), [name for name, files in before.items() if not files]
    assert "metrics.json" in before["reports"] and "per_image.csv" in before["reports"]
    original = _edit_params(project, section, values)
    try:
        failed = dvc(project, "repro", "--single-item", stage, timeout=600)
    finally:
        (project / "params.yaml").write_text(original)
    assert failed.returncode != 0 and message in failed.stdout + failed.stderr, failed.stdout + failed.stderr
    after = _outputs(project)
    for name in OUTPUTS:
        assert after[name] == before[name], f"{name} changed after a failed `dvc repro {stage}`"
