"""Small helpers shared by tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth-plus-texture (H, W, 3) uint8 test image, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in range(3)], axis=-1)
    img = 127.5 + 90 * base + rng.normal(0, 12, (height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


# A model and training run small enough for tests: seconds, not minutes.
TINY: dict = {
    "model": {"preset": "tiny", "base_channels": 8, "channel_mults": [1, 2], "attention_levels": [], "norm_groups": 4,
              "encoder_channels": 8, "encoder_blocks": 1, "implicit_hidden": 8, "modulation_hidden": 8},
    "diffusion": {"timesteps": 50},
    "train": {"steps": 6, "batch_size": 2, "patch_size": 16, "checkpoint_every": 3, "log_every": 2,
              "sample_every": 3, "target": "residual", "device": "cpu"},
    "sample": {"steps": 2},
    "evaluate": {"methods": ["bicubic", "idm"]},
}


ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "datasets"


def make_image_folder(folder: Path) -> Path:
    """A folder of small images in several modes: RGB, greyscale, RGBA, palette, 16-bit, JPEG."""
    folder.mkdir(parents=True)
    Image.fromarray(photo(60, 72, 1)).save(folder / "rgb.png")
    Image.fromarray(photo(64, 48, 2)).convert("L").save(folder / "grey.png")
    Image.fromarray(photo(50, 50, 3)).convert("RGBA").save(folder / "rgba.png")
    Image.fromarray(photo(56, 64, 4)).convert("P").save(folder / "palette.png")
    Image.fromarray((photo(48, 60, 5)[..., 0].astype(np.uint16) * 257)).save(folder / "sixteen.png")
    Image.fromarray(photo(66, 70, 6)).save(folder / "jpeg.jpg", quality=95)
    return folder


def stage_store_runs(filter_string: str) -> list:
    """Runs of experiment `idm` in the store the stage subprocesses log to ($MLFLOW_TRACKING_URI),
    newest first; other tests may have pointed this process's MLflow elsewhere."""
    import os

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("idm")
    return client.search_runs([experiment.experiment_id], filter_string, order_by=["attributes.start_time DESC"])


def stage_store_client():
    """An MlflowClient on the store the stage subprocesses log to."""
    import os

    import mlflow

    return mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])


def fabricated_weights(name: str) -> bytes:
    """A torch.save'd state dict with the keys and shapes of the LPIPS ('lpips': torchvision
    AlexNet) or FID ('fid': torch-fidelity Inception-v3) backbone, a few KB: every tensor is a
    stride-0 view of one seeded random value per output channel, over the
    fan-in so that activations stay finite through Inception's 90-odd layers."""
    import io

    import torch

    if name == "lpips":
        import torchvision

        state = torchvision.models.alexnet(weights=None).state_dict()
    else:
        state = inception_network().state_dict()
    gen = torch.Generator().manual_seed(0)
    small = {k: ((torch.rand(v.shape[0], generator=gen) + 0.5) / max(1, v[0].numel()))
             .view(-1, *[1] * (v.dim() - 1)).expand(v.shape) if v.dim() else v.clone() for k, v in state.items()}
    buf = io.BytesIO()
    torch.save(small, buf)
    return buf.getvalue()


def inception_network():
    """torch-fidelity's Inception-v3 feature extractor with its default (random) init: the
    architecture only, neither downloaded nor loaded."""
    from unittest import mock

    from torch_fidelity import feature_extractor_inceptionv3 as fidelity

    with mock.patch.object(fidelity, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, s: None):
        return fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
