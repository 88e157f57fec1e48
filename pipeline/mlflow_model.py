"""IDM as an MLflow model: log and register a checkpoint, and get one back from a URI.

The registered artifact is the inference checkpoint (configs + EMA weights, no
optimizer state), loaded with `weights_only=True` like every checkpoint; the pyfunc
wrapper only points at it, so `mlflow.pyfunc.load_model("models:/idm@champion")`
works for serving while evaluation reads the checkpoint file directly.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.models import ModelSignature
from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

from idm.config import SampleConfig
from pipeline.params import ROOT
from pipeline.tracking import MODEL_NAME

SAMPLE = SampleConfig()  # the sampling defaults of params.yaml
CHECKPOINT_ARTIFACT = "checkpoint"
INT8_ARTIFACT = "int8"

SIGNATURE = ModelSignature(
    inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, 3))]),  # the LR image, HWC RGB
    outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, 3))]),  # the SR image
    params=ParamSchema([ParamSpec("scale", "double", 4.0), ParamSpec("steps", "long", SAMPLE.steps),
                         ParamSpec("seed", "long", SAMPLE.seed), ParamSpec("temperature", "double", SAMPLE.temperature)]),
)


class IDMPyfunc(mlflow.pyfunc.PythonModel):
    """predict(lr (h, w, 3) uint8, params={"scale", "steps", "seed", "temperature"}) -> (H, W, 3) uint8.

    Defaults are the pipeline's sampling defaults (idm.config.SampleConfig), including
    its memory bound: larger outputs are made tile by tile, as in `idm upscale`.
    """

    def load_context(self, context: Any) -> None:
        """Load the model once; predict only changes the sampling settings."""
        from idm.inference.upscaler import DiffusionSR

        self.checkpoint = context.artifacts[CHECKPOINT_ARTIFACT]
        self.int8 = context.artifacts.get(INT8_ARTIFACT)
        # params.yaml's sampler, and its memory bound: outputs beyond it are made tile by tile
        self.method = DiffusionSR.from_checkpoint(self.checkpoint, SAMPLE)
        if self.int8:
            self.method.use_int8(self.int8)

    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        from idm.resize import target_size

        params = {"scale": 4.0, "steps": SAMPLE.steps, "seed": SAMPLE.seed, "temperature": SAMPLE.temperature,
                  **(params or {})}
        method = copy.copy(self.method)  # shares the loaded model; settings are per call
        method.sample = dataclasses.replace(method.sample, steps=int(params["steps"]), seed=int(params["seed"]),
                                            temperature=float(params["temperature"]))
        lr = np.asarray(model_input, dtype=np.uint8)
        return method(lr, target_size(lr.shape[:2], float(params["scale"])))


def log_and_register(checkpoint: Path, *, int8: Path | None = None, tags: dict[str, str] | None = None) -> str:
    """Log `checkpoint` (and its `int8` denoiser) as a pyfunc model in the active run; register a new `idm` version.

    Returns the version number (as MLflow gives it, a string).
    """
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(ROOT / "pipeline" / "pyfunc_model.py"),  # model from code: nothing pickled
        artifacts={CHECKPOINT_ARTIFACT: str(checkpoint), **({INT8_ARTIFACT: str(int8)} if int8 else {})},
        signature=SIGNATURE,
        code_paths=[str(ROOT / "idm"), str(ROOT / "pipeline")],
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", "pillow", "scikit-image", "tqdm"],
        registered_model_name=MODEL_NAME,
    )
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    for key, value in (tags or {}).items():
        client.set_model_version_tag(MODEL_NAME, version, key, value)
    return version


def int8_beside(checkpoint: Path) -> Path | None:
    """The int8 denoiser that goes with `checkpoint`: in its folder (a registered model's
    artifacts) or in the quantize stage's output folder next to it; None if there is none."""
    for candidate in (checkpoint.parent / "model_int8.pt", checkpoint.parent.parent / "idm-int8" / "model_int8.pt"):
        if candidate.is_file():
            return candidate
    return None


def checkpoint_from_uri(uri: str, dest: Path) -> Path:
    """Download the checkpoint of model `uri` (e.g. models:/idm@champion) into the folder `dest`
    (the caller removes it) and return its path; an int8 version's denoiser lands beside it
    (see `int8_beside`)."""
    dest = Path(dest)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))
    except mlflow.exceptions.MlflowException as err:
        hint = ""
        if "alias" in str(err) and "not found" in str(err):
            hint = ("; `dvc repro` registers each trained model with the alias 'candidate', and only the retrain "
                    "flow's promotion gate sets 'champion' (make serve, or python -m pipeline.flows retrain): "
                    f"try models:/{MODEL_NAME}@candidate or a checkpoint path such as models/idm/model.pt")
        raise ValueError(f"cannot load model {uri!r}: {str(err).splitlines()[0].rstrip('.')}{hint}") from None
    found = sorted(p for p in local.rglob("*.pt") if not p.name.endswith("_int8.pt"))
    if not found:
        raise ValueError(f"model {uri!r} holds no checkpoint (.pt) artifact")
    return found[0]
