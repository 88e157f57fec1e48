"""The promotion gate (pure) and how its verdicts are recorded in the MLflow registry."""

from __future__ import annotations

import json

import mlflow
import pytest

from pipeline import registry
from pipeline.params import PromotionParams
from pipeline.registry import CHAMPION, decide, parse_metric_name, regressions
from tests.conftest_prefect import register_fake_model

GATE = PromotionParams(metric="psnr_y", min_improvement=0.05, max_drop=0.2)
IN_DIST = {2.0: 33.0, 3.0: 30.0}  # in-distribution scales and a baseline score
OOD = {4.0: 28.0, 8.0: 24.0}


def evaluation(shift: float = 0.0, *, at: dict[float, float] | None = None, datasets=("Set5", "Set14"),
               drop: tuple[str, float] | None = None) -> dict:
    """Scores = baseline + shift (+ at[scale]), ssim alongside; in_distribution = the x2, x3 pairs."""
    metrics, in_dist = {}, []
    for d in datasets:
        for scale, base in {**IN_DIST, **OOD}.items():
            value = base + shift + (at or {}).get(scale, 0.0)
            metrics[f"psnr_y.{d}.x{scale:g}"] = value
            metrics[f"ssim_y.{d}.x{scale:g}"] = value / 40
            if scale in IN_DIST:
                in_dist.append(f"{d}.x{scale:g}")
    if drop:
        metrics[drop[0]] -= drop[1]
    return {"metrics": metrics, "in_distribution": in_dist}


def test_first_model_is_promoted():
    d = decide(evaluation(), None, GATE)
    assert d.promote and "first model" in d.reason
    assert list(d.table.columns) == registry.TABLE_COLUMNS and len(d.table) == 8
    assert d.table.champion.isna().all()


def test_without_a_champion_the_candidate_must_beat_the_shipped_model_and_bicubic():
    shipped, bicubic = evaluation(0.5), evaluation(-1.0)
    references = {"the shipped pretrained model": shipped, "bicubic": bicubic}
    weak = decide(evaluation(0.2), None, GATE, references)  # above bicubic, below the shipped model
    assert not weak.promote
    assert weak.reason.startswith("no champion yet, so compared with the shipped pretrained model: mean psnr_y")
    assert "changed by -0.300 (needs >= +0.050)" in weak.reason
    assert weak.table.champion.round(6).eq(weak.table.candidate.round(6) + 0.3).all()  # the table is the shipped one's
    below_bicubic = decide(evaluation(-1.1), None, GATE, {"bicubic": bicubic, "the shipped model": None})
    assert not below_bicubic.promote and "compared with bicubic" in below_bicubic.reason
    assert "dropped by" not in below_bicubic.reason
    drops_once = decide(evaluation(1.0, drop=("psnr_y.Set5.x8", 2.0)), None, GATE, references)
    assert not drops_once.promote and "psnr_y dropped by 1.500 on Set5 x8" in drops_once.reason
    strong = decide(evaluation(0.8), None, GATE, references)
    assert strong.promote and strong.reason.startswith(
        "no champion yet; passes the gate against the shipped pretrained model and bicubic: mean psnr_y")
    assert "improved by +0.300" in strong.reason


def test_better_candidate_is_promoted_with_the_improvement_in_the_reason():
    d = decide(evaluation(0.3), evaluation(), GATE)
    assert d.promote, d.reason
    assert "improved by +0.300" in d.reason
    assert d.table.delta.round(6).eq(0.3).all()
    assert d.table[d.table.in_distribution].scale.tolist() == [2.0, 3.0, 2.0, 3.0]


def test_worse_candidate_is_rejected_with_a_reason():
    d = decide(evaluation(-0.1), evaluation(), GATE)
    assert not d.promote
    assert "changed by -0.100 (needs >= +0.050)" in d.reason


def test_too_small_an_improvement_is_rejected_and_the_threshold_itself_passes():
    assert not decide(evaluation(0.049), evaluation(), GATE).promote
    assert decide(evaluation(0.05), evaluation(), GATE).promote


def test_one_dataset_scale_dropping_too_far_rejects_even_when_the_mean_improves():
    # Out of distribution: not in the mean, but still guarded by max_drop.
    d = decide(evaluation(0.5, drop=("psnr_y.Set14.x8", 0.8)), evaluation(), GATE)
    assert not d.promote
    assert d.reason == "psnr_y dropped by 0.300 on Set14 x8 (out of distribution, max drop 0.2)"
    # A drop of exactly max_drop is allowed.
    assert decide(evaluation(0.5, drop=("psnr_y.Set14.x8", 0.7)), evaluation(), GATE).promote


def test_out_of_distribution_gains_do_not_count_toward_the_mean():
    d = decide(evaluation(at={4.0: 2.0, 8.0: 2.0}), evaluation(), GATE)
    assert not d.promote and "changed by +0.000" in d.reason


def test_every_failure_is_named():
    d = decide(evaluation(-0.1, drop=("psnr_y.Set5.x2", 0.5)), evaluation(), GATE)
    assert not d.promote
    assert d.reason.count(";") == 1 and "Set5 x2 (in distribution" in d.reason


def test_the_gate_metric_is_configurable():
    cand = evaluation()
    cand["metrics"] = {k: v + (0.1 if k.startswith("ssim") else -1.0) for k, v in cand["metrics"].items()}
    assert decide(cand, evaluation(), PromotionParams(metric="ssim_y", min_improvement=0.05, max_drop=0.2)).promote
    assert not decide(cand, evaluation(), GATE).promote


def test_a_candidate_missing_a_score_the_champion_has_is_rejected():
    cand = evaluation(1.0)
    del cand["metrics"]["psnr_y.Set14.x8"]
    d = decide(cand, evaluation(), GATE)
    assert not d.promote and "no psnr_y for Set14 x8" in d.reason


def test_a_new_test_set_only_the_candidate_has_is_shown_but_not_gated():
    d = decide(evaluation(0.1, datasets=("Set5", "Set14", "Urban100")), evaluation(), GATE)
    assert d.promote, d.reason
    assert d.table[d.table.dataset == "Urban100"].champion.isna().all()


def test_no_scores_no_promotion():
    assert not decide({"metrics": {}, "in_distribution": []}, None, GATE).promote
    no_in_dist = {**evaluation(1.0), "in_distribution": []}
    d = decide(no_in_dist, evaluation(), GATE)
    assert not d.promote and "no in-distribution" in d.reason


def test_metric_names_parse_and_bad_ones_fail():
    assert parse_metric_name("psnr_y.Set14.x2.5") == ("psnr_y", "Set14", 2.5)
    assert parse_metric_name("lpips.DIV2K-valid.x12") == ("lpips", "DIV2K-valid", 12.0)
    for bad in ("psnr_y", "psnr_y.Set5", "psnr_y.Set5.4", "psnr_y.Set5.xfour"):
        with pytest.raises(ValueError, match="<metric>.<dataset>.x<scale>"):
            parse_metric_name(bad)


def test_regressions_beyond_tolerance_are_listed():
    assert regressions(evaluation(), None, "psnr_y", 0.1) == []
    assert regressions(evaluation(-0.1), evaluation(), "psnr_y", 0.1) == []
    found = regressions(evaluation(drop=("psnr_y.Set5.x4", 0.5)), evaluation(), "psnr_y", 0.1)
    assert found == ["psnr_y Set5 x4: 28.000 -> 27.500"]


# --- the MLflow side ----------------------------------------------------------------------------

def test_verdicts_are_recorded_and_only_an_accepted_one_moves_the_alias(mlflow_store):
    assert registry.version_by_alias(CHAMPION) is None  # no model registered at all yet
    v1, v2 = register_fake_model(30.0), register_fake_model(29.0)
    assert registry.version_by_alias(CHAMPION) is None  # a model, but no alias

    registry.record_decision(v1, decide(evaluation(), None, GATE), champion=None, pipeline_run="p1")
    assert registry.version_by_alias(CHAMPION) == v1
    assert registry.version_tags(v1)["promotion"] == "accepted"

    run_id = registry.record_decision(v2, decide(evaluation(-1.0), evaluation(), GATE), champion=v1, pipeline_run="p2")
    assert registry.version_by_alias(CHAMPION) == v1
    tags = registry.version_tags(v2)
    assert tags["promotion"] == "rejected" and "needs >=" in tags["promotion_reason"]
    assert tags["previous_champion"] == v1 and tags["promotion_run"] == run_id

    run = mlflow.MlflowClient().get_run(run_id)
    assert run.data.tags["promotion"] == "rejected" and run.data.tags["pipeline_run"] == "p2"
    assert run.data.metrics["mean_delta_in_distribution"] == pytest.approx(-1.0)
    table = mlflow.artifacts.load_text(f"runs:/{run_id}/comparison.csv")
    assert table.splitlines()[0] == ",".join(registry.TABLE_COLUMNS) and len(table.splitlines()) == 9
    assert json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/decision.json"))["promote"] is False


def test_last_evaluation_is_the_latest_run_of_that_version(mlflow_store):
    assert registry.last_evaluation("1") is None
    registry.log_evaluation("1", "champion", evaluation(), flow="evaluate", pipeline_run="a")
    registry.log_evaluation("2", "candidate", evaluation(5.0), flow="retrain", pipeline_run="b")
    latest = registry.log_evaluation("1", "champion", evaluation(1.0), flow="retrain", pipeline_run="c")
    found = registry.last_evaluation("1")
    assert found["run_id"] == latest and found["metrics"]["psnr_y.Set5.x2"] == 34.0


def test_int8_versions_follow_their_float32_aliases_and_are_found_from_them(mlflow_store):
    fp32 = register_fake_model(30.0, alias=registry.CANDIDATE)
    int8 = register_fake_model(30.0)
    c = registry.client()  # on this test's store
    c.set_model_version_tag("idm", int8, "quantization", "int8")
    c.set_model_version_tag("idm", int8, "fp32_version", fp32)
    plain = register_fake_model(31.0)  # never quantized

    assert registry.mirror_aliases_to_int8(fp32, int8) == ["candidate-int8"]
    assert registry.version_by_alias("candidate-int8") == int8
    assert registry.int8_of(fp32) == int8 and registry.int8_of(plain) is None
    assert registry.int8_uri("models:/idm@candidate") == f"models:/idm/{int8}"
    assert registry.int8_uri(f"models:/idm/{fp32}") == f"models:/idm/{int8}"
    assert registry.int8_uri("models:/idm@candidate-int8") == "models:/idm@candidate-int8"  # already int8
    assert registry.int8_uri("runs:/abc/model") == "runs:/abc/model"  # outside the registry: as given
    assert registry.int8_uri("models:/idm@no-such") == "models:/idm@no-such"  # loading it explains
    with pytest.raises(ValueError, match=f"version {plain}, and no int8 version was quantized from it"):
        registry.int8_uri(f"models:/idm/{plain}")

    # Promotion moves champion-int8 with champion, and drops it for a champion that has no int8.
    registry.record_decision(fp32, decide(evaluation(), None, GATE), champion=None, pipeline_run="p1")
    assert registry.version_by_alias("champion-int8") == int8
    registry.record_decision(plain, decide(evaluation(1.0), evaluation(), GATE), champion=fp32, pipeline_run="p2")
    assert registry.version_by_alias(CHAMPION) == plain and registry.version_by_alias("champion-int8") is None


def test_an_evaluation_replaces_the_last_one_in_a_version_description(mlflow_store):
    version = register_fake_model(30.0)
    c = registry.client()
    c.update_model_version("idm", version, description="Float32 EMA model, 6 steps.")
    registry.describe_evaluation(version, evaluation(), "psnr_y", "evaluate stage")
    registry.describe_evaluation(version, evaluation(1.0, datasets=("Set5",)), "psnr_y", "evaluate stage")
    assert c.get_model_version("idm", version).description == (
        "Float32 EMA model, 6 steps.\n\nLast evaluation (evaluate stage), psnr_y: "
        "Set5 x2 34.00, Set5 x3 31.00, Set5 x4 29.00, Set5 x8 25.00.")
