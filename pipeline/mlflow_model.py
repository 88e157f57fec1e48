"""IDM as an MLflow model: log and register a checkpoint, and get one back from a URI.

The registered artifact is the inference checkpoint (configs + EMA weights, no
optimizer state), loaded with `weights_only=True` like every checkpoint; the pyfunc
wrapper only points at it, so `mlflow.pyfunc.load_model("models:/idm@champion")`
works for serving while evaluation reads the checkpoint file directly.
"""

from __future__ import annotations

import base64
import binascii
import copy
import dataclasses
import io
import logging
import threading
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.types.schema import ParamSchema, ParamSpec
from PIL import Image

from idm.config import SAMPLE_PRESETS, SampleConfig
from pipeline.params import ROOT
from pipeline.tracking import MODEL_NAME

SAMPLE = SampleConfig()  # tiling and memory bound of the served model (sampler settings: the model's default)
UNSET = -1  # a `steps` or `temperature` param left at this: the preset's (or the model's default) value
# The most work one request may ask for, in output megapixels x denoiser passes (the regression
# output counts as REGRESSION_PASSES of one): above it the request is refused at once, before
# MLflow's request timeout (MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT, 60 s) would cut it off half
# done (bench/README.md, "Serving: the work bound"). IDM_SERVE_MAX_WORK_MPX sets it for a faster or slower machine.
MAX_WORK_MPX = 4.0
REGRESSION_PASSES = 0.3
QUEUE_SECONDS = 20.0  # how long a request waits for a free slot before it is refused as busy
CHECKPOINT_ARTIFACT = "checkpoint"
INT8_ARTIFACT = "int8"

MODEL_DESCRIPTION = (
    "IDM, implicit diffusion for arbitrary-scale super-resolution (this project's pipeline.mlflow_model). "
    "Float32 versions come from the train stage (alias candidate; champion once the retrain flow's gate "
    "passes it), int8 versions from the quantize stage (tags quantization=int8 and fp32_version; aliases "
    "candidate-int8 and champion-int8), the package's shipped weights from register_pretrained (alias "
    "pretrained). pyfunc predict: LR uint8 image(s) and params scale, preset, steps, seed, temperature; "
    "by default the model's regression output when it has one."
)

# No input schema: the pyfunc takes arrays of several shapes and encoded files (IDMPyfunc).
# The params are typed, so MLflow passes them on.
SIGNATURE = ModelSignature(
    inputs=None,
    params=ParamSchema([ParamSpec("scale", "double", 4.0), ParamSpec("preset", "string", ""),
                         ParamSpec("steps", "long", UNSET), ParamSpec("seed", "long", SAMPLE.seed),
                         ParamSpec("temperature", "double", float(UNSET))]),
)
IMAGE_COLUMN = "image"


class BadInput(MlflowException):
    """A request the model cannot answer; `mlflow models serve` replies 400 with this one line.

    The scoring server rewrites an exception's message to "Failed to predict data '<the
    whole input>'. Error: ..."; this class keeps its own reason instead, so a reply never
    echoes an image's pixels back.
    """

    def __init__(self, reason: str, error_code: int = INVALID_PARAMETER_VALUE) -> None:
        self.reason = reason
        super().__init__(reason, error_code=error_code)

    @property
    def message(self) -> str:
        return self.reason

    @message.setter
    def message(self, value: str) -> None:
        pass


class ModelFailure(BadInput):
    """A request the model failed on for a reason of its own (HTTP 500): one line, no stack trace or
    server paths in the reply; the traceback goes to the server's log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, error_code=INTERNAL_ERROR)


def pixels(array: Any) -> np.ndarray:
    """An image array as uint8: integers 0..255 of any dtype (JSON gives int64); BadInput otherwise."""
    arr = np.asarray(array)
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind not in "iuf" or arr.size == 0:
        raise BadInput(f"expected image pixels as numbers, got an array of {arr.dtype} with shape {arr.shape}")
    if arr.min() < 0 or arr.max() > 255 or (arr.dtype.kind == "f" and not np.all(arr == np.round(arr))):
        raise BadInput(f"pixel values must be integers in [0, 255], got values in [{arr.min():g}, {arr.max():g}]")
    return arr.astype(np.uint8)


def encoded_images(values: Any, max_pixels: int) -> list[np.ndarray]:
    """Base64 strings (or raw bytes) of image files -> (h, w, 3) or (h, w, 4) uint8 arrays; a file
    declaring more than `max_pixels` is refused from its header, before it is decoded."""
    from pipeline.data.images import ImageReadError, decode_image

    out = []
    for i, value in enumerate(values):
        if isinstance(value, str):
            try:
                value = base64.b64decode(value, validate=True)
            except binascii.Error:
                raise BadInput(f"{IMAGE_COLUMN}[{i}] is not base64 (send the file's bytes base64-encoded)") from None
        if not isinstance(value, bytes):
            raise BadInput(f"{IMAGE_COLUMN}[{i}] must be a base64 string of an image file, got {type(value).__name__}")
        try:
            out.append(decode_image(value, name=f"{IMAGE_COLUMN}[{i}]", alpha=True, max_pixels=max_pixels))
        except ImageReadError as err:
            raise BadInput(str(err)) from None
    return out


def encode_png(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class IDMPyfunc(mlflow.pyfunc.PythonModel):
    """IDM behind `mlflow.pyfunc`, params {"scale", "preset", "steps", "seed", "temperature"}. Inputs:

    - an array: (h, w) grey, (h, w, 3) RGB or (h, w, 4) RGBA, or a batch (n, h, w, c) of
      same-size images; pixel values integers in [0, 255]. Returns uint8 arrays of the same
      layout at the target size.
    - a DataFrame (or dict) with column `image` of base64-encoded files (PNG, JPEG, WebP, any
      mode, sizes may differ), one row per image. Returns a DataFrame whose `image` column
      holds the results as base64 PNG (alpha kept).

    Alpha is upscaled by bicubic, colour by the model (idm.inference.upscaler.upscale_channels).
    Sampling: the model's default unless `preset` (one of idm.config.SAMPLE_PRESETS) or `steps`
    says otherwise — the regression output for a model that has one, as `idm upscale` does
    (idm.config.default_preset); `steps` and `temperature` override the preset's. The memory
    bound is SampleConfig's: larger outputs are made tile by tile, as in `idm upscale`. A request
    above `max_work_mpx` (MAX_WORK_MPX) is refused before any work, an encoded file too large for
    it before it is decoded; `concurrency` requests compute at once (IDM_SERVE_CONCURRENCY,
    default 1), the others wait up to `queue_seconds` and are then refused as busy, so memory stays
    within concurrency x SampleConfig.max_memory_gb plus the decoded inputs. Bad input or params
    raise BadInput (HTTP 400 with a one-line reason when served).
    """

    max_work_mpx = MAX_WORK_MPX
    concurrency, slots, queue_seconds = 1, threading.BoundedSemaphore(1), 0.0  # set by load_context

    def load_context(self, context: Any) -> None:
        """Load the model once; predict only changes the sampling settings."""
        from idm.inference.upscaler import DiffusionSR

        self.checkpoint = context.artifacts[CHECKPOINT_ARTIFACT]
        self.int8 = context.artifacts.get(INT8_ARTIFACT)
        import os

        # the model's default sampling (its regression output when it has one), SampleConfig's memory bound
        self.method = DiffusionSR.from_checkpoint(self.checkpoint)
        if self.int8:
            self.method.use_int8(self.int8)
        self.max_work_mpx = float(os.environ.get("IDM_SERVE_MAX_WORK_MPX", MAX_WORK_MPX))
        # requests computing at once; each holds at most SampleConfig.max_memory_gb (outputs beyond it are tiled)
        self.concurrency = int(os.environ.get("IDM_SERVE_CONCURRENCY", 1))
        self.slots = threading.BoundedSemaphore(self.concurrency)
        self.queue_seconds = QUEUE_SECONDS

    # Annotated as MLflow accepts without a warning; a DataFrame or dict of encoded files is taken too.
    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> Any:
        try:
            return self._predict(model_input, params)
        except BadInput:
            raise
        except Exception as err:  # noqa: BLE001 -- one line to the client, the traceback to the server's log only
            logging.getLogger(__name__).exception("idm pyfunc: a request failed")
            first = (str(err).splitlines() or [""])[0][:200]
            raise ModelFailure(f"the model failed on this request: {type(err).__name__}: {first}") from None

    def _predict(self, model_input: Any, params: dict[str, Any] | None) -> Any:
        from idm.config import ConfigError
        from idm.inference.upscaler import upscale_channels
        from idm.resize import check_scale, target_size

        params = {"scale": 4.0, "preset": "", "steps": UNSET, "seed": SAMPLE.seed, "temperature": UNSET,
                  **(params or {})}
        method = copy.copy(self.method)  # shares the loaded model; settings are per call
        try:
            scale = check_scale(float(params["scale"]))
            method.sample = requested_sample(method.sample, params)  # validated here
        except (ValueError, ConfigError) as err:
            raise BadInput(str(err).splitlines()[0]) from None
        # an input is never larger than its output, so no file above the work bound's pixels is decoded
        kind, images = images_of(model_input, max_pixels=int(self.max_work_mpx / REGRESSION_PASSES * 1e6))
        sizes = [target_size(img.shape[:2], scale) for img in images]
        work = sum(h * w for h, w in sizes) / 1e6 * (method.sample.steps or REGRESSION_PASSES)
        if work > self.max_work_mpx:
            raise BadInput(f"this request asks for {work:.1f} output Mpx x passes, above the server's "
                           f"{self.max_work_mpx:g} (IDM_SERVE_MAX_WORK_MPX): it would outlast the request timeout; "
                           "send fewer or smaller images, a smaller scale or fewer steps")
        if not self.slots.acquire(timeout=self.queue_seconds):  # memory: one tiled run per slot at a time
            raise BadInput(f"the server is busy with {self.concurrency} request(s) (IDM_SERVE_CONCURRENCY); "
                           "retry later")
        try:
            outs = [upscale_channels(lambda rgb: method(rgb, size), img, size) for img, size in zip(images, sizes)]
        finally:
            self.slots.release()
        if kind == "files":
            return pd.DataFrame({IMAGE_COLUMN: [encode_png(o) for o in outs]})
        return np.stack(outs) if kind == "batch" else outs[0]


def requested_sample(base: SampleConfig, params: dict[str, Any]) -> SampleConfig:
    """`base` (the model's default sampling) with a request's preset, steps, temperature and seed;
    ValueError or ConfigError (one line) for an unknown preset or a bad value."""
    preset = str(params.get("preset") or "")
    if preset and preset not in SAMPLE_PRESETS:
        raise ValueError(f"preset must be one of {sorted(SAMPLE_PRESETS)} (or empty: the model's default), "
                         f"got {preset!r}")
    chosen = dict(SAMPLE_PRESETS.get(preset, {}))
    for key, kind in (("steps", int), ("temperature", float)):
        if params.get(key, UNSET) != UNSET:
            chosen[key] = kind(params[key])
    return dataclasses.replace(base, **chosen, seed=int(params.get("seed", base.seed)))


def images_of(model_input: Any, max_pixels: int = 2**31) -> tuple[str, list[np.ndarray]]:
    """("files" | "batch" | "one", the input's images as uint8 arrays); BadInput for anything else,
    and for an encoded file declaring more than `max_pixels`.

    A function of the input alone (no state on the model), so concurrent requests cannot mix."""
    if isinstance(model_input, (pd.DataFrame, dict)):
        if IMAGE_COLUMN not in model_input:
            raise BadInput(f"expected a column {IMAGE_COLUMN!r} of base64-encoded image files, "
                           f"got columns {list(model_input)}")
        return "files", encoded_images(list(np.ravel(np.asarray(model_input[IMAGE_COLUMN], dtype=object))),
                                       max_pixels)
    arr = pixels(model_input)
    if arr.ndim == 4 or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        return "batch", list(arr)
    if arr.ndim not in (2, 3):
        raise BadInput(f"expected an (h, w), (h, w, 3), (h, w, 4) or (n, h, w, c) image array, "
                       f"got shape {arr.shape}")
    return "one", [arr]


def log_and_register(checkpoint: Path, *, int8: Path | None = None, tags: dict[str, str] | None = None,
                     description: str = "") -> str:
    """Log `checkpoint` (and its `int8` denoiser) as a pyfunc model in the active run; register a new `idm` version
    with `tags` and `description` (the registered model gets MODEL_DESCRIPTION).

    Returns the version number (as MLflow gives it, a string).
    """
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(ROOT / "pipeline" / "pyfunc_model.py"),  # model from code: nothing pickled
        artifacts={CHECKPOINT_ARTIFACT: str(checkpoint), **({INT8_ARTIFACT: str(int8)} if int8 else {})},
        signature=SIGNATURE,
        input_example=input_example(),
        code_paths=[str(ROOT / "idm"), str(ROOT / "pipeline")],
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", "pillow", "scikit-image", "tqdm"],
        registered_model_name=MODEL_NAME,
    )
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    for key, value in (tags or {}).items():
        client.set_model_version_tag(MODEL_NAME, version, key, value)
    if description:
        client.update_model_version(MODEL_NAME, version, description=description)
    client.update_registered_model(MODEL_NAME, description=MODEL_DESCRIPTION)
    return version


def input_example() -> tuple[pd.DataFrame, dict[str, Any]]:
    """What a request looks like, stored with each model version (MLflow shows it and
    `mlflow models serve` users copy it): one 8 x 8 PNG, base64, and the scale."""
    yy, xx = np.mgrid[0:8, 0:8]
    image = np.stack([yy * 32, xx * 32, (yy + xx) * 16], axis=-1).astype(np.uint8)
    return pd.DataFrame({IMAGE_COLUMN: [encode_png(image)]}), {"scale": 2.0}


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
