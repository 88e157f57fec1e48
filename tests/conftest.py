"""Test-wide settings: no telemetry, a private MLflow store, small helper fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import photo


os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")


@pytest.fixture(autouse=True, scope="session")
def _private_mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Never write to the project's mlflow.db from tests."""
    store = tmp_path_factory.mktemp("mlflow")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A folder of small images in several modes: RGB, greyscale, RGBA, palette, 16-bit."""
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(photo(60, 72, 1)).save(folder / "rgb.png")
    Image.fromarray(photo(64, 48, 2)).convert("L").save(folder / "grey.png")
    Image.fromarray(photo(50, 50, 3)).convert("RGBA").save(folder / "rgba.png")
    Image.fromarray(photo(56, 64, 4)).convert("P").save(folder / "palette.png")
    Image.fromarray((photo(48, 60, 5)[..., 0].astype(np.uint16) * 257)).save(folder / "sixteen.png")
    Image.fromarray(photo(66, 70, 6)).save(folder / "jpeg.jpg", quality=95)
    return folder
