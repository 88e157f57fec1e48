"""The registered pyfunc model: loads once, samples with per-call settings, matches DiffusionSR."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest

from idm.config import DiffusionConfig, ModelConfig, SampleConfig, TrainConfig
from idm.inference.upscaler import DiffusionSR
from idm.train import fit
from pipeline import tracking
from pipeline.mlflow_model import SAMPLE, log_and_register
from tests.helpers import photo

TINY = ModelConfig(encoder_blocks=1, encoder_channels=8, base_channels=8, channel_mults=(1, 2), res_blocks=1,
                   attention_levels=(), norm_groups=4, implicit_hidden=16, modulation_hidden=8, dropout=0.0,
                   prediction="x0")


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    ckpt = tmp_path_factory.mktemp("pyfunc") / "model.pt"
    fit(TINY, DiffusionConfig(timesteps=100), TrainConfig(steps=2, batch_size=2, patch_size=16, target="refine",
                                                         condition_loss=1.0, checkpoint_every=0),
        [photo(24, 24, 1)], device="cpu", ckpt_path=ckpt, progress=False)
    experiment = tracking.setup()  # experiment `idm`, artifacts beside the test store, not in ./mlruns
    with mlflow.start_run(experiment_id=experiment):
        version = log_and_register(ckpt)
    return ckpt, version


def test_pyfunc_predicts_what_diffusion_sr_gives(registered, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt, version = registered
    model = mlflow.pyfunc.load_model(f"models:/idm/{version}")
    lr = photo(10, 12, 3)
    loads = []
    original = DiffusionSR.from_checkpoint.__func__
    monkeypatch.setattr(DiffusionSR, "from_checkpoint",
                        classmethod(lambda cls, *a, **k: loads.append(a) or original(cls, *a, **k)))
    out = model.predict(lr, params={"scale": 2.5, "steps": 3, "seed": 4, "temperature": 1.0})
    again = model.predict(lr, params={"scale": 2.5, "steps": 3, "seed": 4, "temperature": 1.0})
    other_seed = model.predict(lr, params={"scale": 2.5, "steps": 3, "seed": 5, "temperature": 1.0})
    assert loads == []  # the model was loaded once, in load_context
    method = model.unwrap_python_model().method  # params.yaml's memory bound and tiling
    assert (method.sample.max_bytes, method.sample.tile_overlap, method.sample.tile_context,
            method.sample.tile_norm) == (SAMPLE.max_bytes, SAMPLE.tile_overlap, SAMPLE.tile_context, SAMPLE.tile_norm)
    assert out.shape == (25, 30, 3) and out.dtype == np.uint8
    monkeypatch.undo()
    reference = DiffusionSR.from_checkpoint(ckpt, SampleConfig(steps=3, seed=4, temperature=1.0))(lr, (25, 30))
    np.testing.assert_array_equal(out, reference)
    np.testing.assert_array_equal(out, again)
    assert not np.array_equal(out, other_seed)
    with pytest.raises(ValueError, match="temperature must be a number in"):
        model.predict(lr, params={"scale": 2.0, "temperature": 2.0})


def test_a_missing_alias_says_which_aliases_the_pipeline_sets(registered, tmp_path: Path) -> None:
    from pipeline.mlflow_model import checkpoint_from_uri

    with pytest.raises(ValueError, match=r"alias no-such-alias not found; .* try models:/idm@candidate"):
        checkpoint_from_uri("models:/idm@no-such-alias", tmp_path / "dl")
