"""The one reader of params.yaml: each section becomes a frozen, validated dataclass.

An unknown or misspelt key, a value of the wrong type or out of range raises
ParamsError naming the key, so a typo fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from idm.config import (
    DEVICES,
    MODEL_PRESETS,
    SAMPLE_PRESETS,
    ConfigError,
    DiffusionConfig,
    ModelConfig,
    SampleConfig,
    TrainConfig,
)
from pipeline.strict_yaml import MAX_FILE_BYTES, StrictYAMLError, read_strict  # noqa: F401 (MAX_FILE_BYTES)

ROOT = Path(__file__).resolve().parent.parent
PARAMS_FILE = ROOT / "params.yaml"

SOURCES = ("skimage", "folder", "url")
METHODS = ("bicubic", "idm", "idm-regression", "idm-int8", "pretrained", "pretrained-regression")

# The RGB photographs scikit-image ships in its wheel (no network needed).
SKIMAGE_IMAGES = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
    "immunohistochemistry", "retina", "colorwheel", "motorcycle_left", "motorcycle_right",
)


class ParamsError(ValueError):
    """params.yaml is malformed: the message names the key and what is allowed."""


@dataclass(frozen=True)
class DatasetParams:
    """One dataset: where its images come from and how much of it is held out for testing."""

    name: str
    source: str
    path: str | None = None  # folder source: a directory of images (relative to the project root)
    url: str | None = None  # url source: an https file or archive ...
    preset: str | None = None  # ... or a named preset (pipeline.data.presets.PRESETS)
    sha256: str | None = None
    subdir: str | None = None  # folder inside an archive that holds the images
    images: tuple[str, ...] = SKIMAGE_IMAGES  # skimage source: which images
    test_fraction: float = 1.0  # 1.0: a test set only; 0.0: training only
    test_crop: int = 0  # centre-crop test HR images to at most this side (0: whole image)

    def __post_init__(self) -> None:
        where = f"datasets[{self.name}]"
        _check(self.name.replace("-", "").replace("_", "").isalnum(), f"{where}.name", "letters, digits, - and _ only")
        _check(self.source in SOURCES, f"{where}.source", f"one of {list(SOURCES)}, got {self.source!r}")
        _check(0.0 <= self.test_fraction <= 1.0, f"{where}.test_fraction", f"a number in [0, 1], got {self.test_fraction}")
        _check(self.test_crop >= 0, f"{where}.test_crop", f"an integer >= 0, got {self.test_crop}")
        if self.source == "folder":
            _check(bool(self.path), f"{where}.path", "a directory of images for source 'folder'")
        if self.source == "url":
            _check(bool(self.url) != bool(self.preset), f"{where}.url", "exactly one of 'url' or 'preset' for source 'url'")
        if self.source == "skimage":
            _check(len(self.images) > 0, f"{where}.images", "at least one image name")
            dupes = sorted({n for n in self.images if self.images.count(n) > 1})
            _check(not dupes, f"{where}.images", f"distinct names, got duplicates {dupes}")
            unknown = sorted(set(self.images) - set(SKIMAGE_IMAGES))
            _check(not unknown, f"{where}.images", f"names from {list(SKIMAGE_IMAGES)}, got unknown {unknown}")


@dataclass(frozen=True)
class PrepareParams:
    """How LR/HR test pairs are made."""

    scales: tuple[float, ...] = (2.0, 2.5, 3.0, 4.0)  # in-distribution evaluation scales
    ood_scales: tuple[float, ...] = (6.0, 8.0, 12.0)  # out-of-distribution evaluation scales
    seed: int = 0  # train/test split

    def __post_init__(self) -> None:
        for key in ("scales", "ood_scales"):
            for s in getattr(self, key):
                _check(math.isfinite(s) and s > 1.0, f"prepare.{key}", f"finite numbers > 1, got {s}")
        _check(len(self.scales) > 0, "prepare.scales", "at least one scale")
        for key in ("scales", "ood_scales"):
            values = getattr(self, key)
            dupes = sorted({s for s in values if values.count(s) > 1})
            _check(not dupes, f"prepare.{key}", f"distinct scales (each is scored and gated once), got duplicates {dupes}")
        overlap = sorted(set(self.scales) & set(self.ood_scales))
        _check(not overlap, "prepare.ood_scales", f"scales not also listed in prepare.scales, got {overlap}")

    @property
    def all_scales(self) -> tuple[float, ...]:
        return tuple(sorted(self.scales + self.ood_scales))


@dataclass(frozen=True)
class EvaluateParams:
    """Which methods run and which metrics are computed."""

    methods: tuple[str, ...] = ("bicubic",)
    device: str = "auto"
    niqe: bool = True
    lpips: bool = True
    fid: bool = True  # FID and KID
    fid_patch: int = 64  # side of the patches FID/KID compare
    fid_min_patches: int = 2048  # fewer: FID unavailable (its covariance is singular)
    kid_min_patches: int = 100
    offline: bool = False  # true: never download metric weights (also IDM_OFFLINE=1)
    lpips_url: str = ""  # '' = the upstream file; a mirror or your own file, with its sha256
    lpips_sha256: str = ""
    fid_url: str = ""
    fid_sha256: str = ""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(METHODS))
        _check(self.methods and not unknown, "evaluate.methods", f"a non-empty list from {list(METHODS)}, got {list(self.methods)}")
        _check(self.device in DEVICES, "evaluate.device", f"one of {list(DEVICES)}, got {self.device!r}")
        _check(self.fid_patch >= 16, "evaluate.fid_patch", f"an integer >= 16, got {self.fid_patch}")
        for key in ("fid_min_patches", "kid_min_patches"):
            _check(getattr(self, key) >= 2, f"evaluate.{key}", f"an integer >= 2, got {getattr(self, key)}")
        for key in ("lpips", "fid"):
            url, sha = getattr(self, f"{key}_url"), getattr(self, f"{key}_sha256")
            _check(bool(url) == bool(sha), f"evaluate.{key}_url and {key}_sha256",
                   f"given together (a file of your own needs its hash), got url {url!r}, sha256 {sha!r}")
            _check(not sha or re.fullmatch(r"[0-9a-fA-F]{8,64}", sha) is not None, f"evaluate.{key}_sha256",
                   f"8 to 64 hex digits of the file's sha256, got {sha!r}")


@dataclass(frozen=True)
class ReportParams:
    """What the report shows."""

    crop: int = 96  # side of the HR crop shown in visual grids
    grid_scales: tuple[float, ...] = (4.0, 8.0)

    def __post_init__(self) -> None:
        _check(self.crop >= 8, "report.crop", f"an integer >= 8, got {self.crop}")


@dataclass(frozen=True)
class TrainStageParams:
    """Where the train stage runs (the training recipe itself is idm.config.TrainConfig)."""

    device: str = "auto"
    threads: int = 0  # torch CPU threads per process; 0: torch's default
    processes: int = 1  # on CPU, DDP processes the stage starts itself (pipeline.stages.train)

    def __post_init__(self) -> None:
        _check(self.device in DEVICES, "train.device", f"one of {list(DEVICES)}, got {self.device!r}")
        _check(self.threads >= 0, "train.threads", f"an integer >= 0, got {self.threads}")
        _check(self.processes >= 1, "train.processes", f"an integer >= 1, got {self.processes}")


@dataclass(frozen=True)
class PromotionParams:
    """The gate a retrained candidate must pass to become `champion`."""

    metric: str = "psnr_y"  # higher is better
    min_improvement: float = 0.05  # mean over in-distribution scales, all test sets (dB)
    max_drop: float = 0.2  # no single dataset x scale may drop by more (dB)

    def __post_init__(self) -> None:
        allowed = ("psnr_y", "psnr_rgb", "ssim_y", "ssim_rgb")
        _check(self.metric in allowed, "promotion.metric", f"one of {list(allowed)}, got {self.metric!r}")
        _check(math.isfinite(self.min_improvement), "promotion.min_improvement", "a finite number")
        _check(math.isfinite(self.max_drop) and self.max_drop >= 0, "promotion.max_drop", "a finite number >= 0")


@dataclass(frozen=True)
class ScheduleParams:
    """Cron schedules of the served retrain and evaluate flows."""

    retrain_cron: str = "0 3 * * 0"
    evaluate_cron: str = "0 6 * * *"
    evaluate_drop_tolerance: float = 0.1  # dB of the promotion metric
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        for key in ("retrain_cron", "evaluate_cron"):
            _check(len(getattr(self, key).split()) == 5, f"schedules.{key}", f"a 5-field cron expression, got {getattr(self, key)!r}")
        _check(self.evaluate_drop_tolerance >= 0, "schedules.evaluate_drop_tolerance", "a number >= 0")


@dataclass(frozen=True)
class Params:
    datasets: tuple[DatasetParams, ...]
    prepare: PrepareParams = field(default_factory=PrepareParams)
    model: ModelConfig = field(default_factory=lambda: MODEL_PRESETS["tiny"])
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    train_stage: TrainStageParams = field(default_factory=TrainStageParams)
    sample: SampleConfig = field(default_factory=SampleConfig)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    report: ReportParams = field(default_factory=ReportParams)
    promotion: PromotionParams = field(default_factory=PromotionParams)
    schedules: ScheduleParams = field(default_factory=ScheduleParams)

    def __post_init__(self) -> None:
        _check(len(self.datasets) > 0, "datasets", "at least one dataset")
        names = [d.name for d in self.datasets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        _check(not dupes, "datasets", f"unique names, got duplicates {dupes}")

    def dataset(self, name: str) -> DatasetParams:
        for d in self.datasets:
            if d.name == name:
                return d
        raise ParamsError(f"no dataset named {name!r}; params.yaml has {[d.name for d in self.datasets]}")


def check_pipeline(params: Params) -> None:
    """Raise ParamsError unless the whole pipeline can run on `params`: some dataset leaves
    images for training and some holds images out for testing. Checked before DVC runs
    (`main`, the flows), not by every stage: a stage on its own (evaluating a registered
    model on test sets, say) may use a file without training images."""
    # The split rule (pipeline.data.datasets.split): a fraction < 1 keeps one training image
    # of two or more, a fraction > 0 holds out at least one; a lone skimage photo trains or tests.
    trains = [d for d in params.datasets if d.test_fraction < 1 and (d.source != "skimage" or len(d.images) > 1
                                                                     or d.test_fraction == 0)]
    _check(bool(trains), "datasets", "at least one dataset with images left for training (test_fraction < 1); "
                                     "every dataset is held out for testing")
    _check(any(d.test_fraction > 0 for d in params.datasets), "datasets",
           "at least one dataset with test images (test_fraction > 0); none is held out for testing")


def _check(ok: bool, key: str, expected: str) -> None:
    if not ok:
        raise ParamsError(f"params.yaml: {key} must be {expected}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; convert lists to tuples and ints to floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        return _coerce(value, next(t for t in options if t is not type(None)), key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"params.yaml: {key} must be a list, got {value!r}")
        item = typing.get_args(tp)[0]
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ParamsError(f"params.yaml: {key} must be of type {tp.__name__}, got {value!r}")


def build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from mapping `data`, failing on unknown keys and bad types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"params.yaml: {where} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ParamsError(f"params.yaml: unknown key {where}.{unknown[0]}; allowed keys: {sorted(fields)}")
    values = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**values)
    except ParamsError:
        raise
    except ConfigError as err:  # the library's own check, naming the field
        raise ParamsError(f"params.yaml: {where}.{err}") from None
    except (TypeError, ValueError) as err:  # a required key is missing, or the library's own check
        raise ParamsError(f"params.yaml: {where}: {err}") from None


def build_model(data: Any) -> ModelConfig:
    """The `model` section: a named preset plus any ModelConfig field overriding it."""
    data = dict(data or {})
    preset = data.pop("preset", "tiny")
    if preset not in MODEL_PRESETS:
        raise ParamsError(f"params.yaml: model.preset must be one of {sorted(MODEL_PRESETS)}, got {preset!r}")
    base = dataclasses.asdict(MODEL_PRESETS[preset])
    fields = set(base)
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ParamsError(f"params.yaml: unknown key model.{unknown[0]}; allowed keys: {sorted(fields | {'preset'})}")
    return build(ModelConfig, {**base, **data}, "model")


def build_sample(data: Any) -> SampleConfig:
    """The `sample` section: an optional named preset (idm.config.SAMPLE_PRESETS) plus any
    SampleConfig field, which overrides the preset's."""
    data = dict(data or {})
    preset = data.pop("preset", None)
    if preset is not None and preset not in SAMPLE_PRESETS:
        raise ParamsError(f"params.yaml: sample.preset must be one of {sorted(SAMPLE_PRESETS)}, got {preset!r}")
    try:
        return build(SampleConfig, {**SAMPLE_PRESETS.get(preset, {}), **data}, "sample")
    except ParamsError as err:
        raise ParamsError(str(err).replace("allowed keys: [", "allowed keys: ['preset', ", 1)) from None


def build_train(data: Any) -> tuple[TrainConfig, TrainStageParams]:
    """The `train` section: TrainConfig fields plus where to run (device, threads, processes)."""
    data = dict(data or {})
    stage = {k: data.pop(k) for k in ("device", "threads", "processes") if k in data}
    try:
        config = build(TrainConfig, data, "train")
    except ParamsError as err:
        raise ParamsError(str(err).replace("allowed keys: [", "allowed keys: ['device', 'processes', 'threads', ",
                                           1)) from None
    return config, build(TrainStageParams, stage, "train")


SECTIONS = ("datasets", "prepare", "model", "diffusion", "train", "sample", "evaluate", "report", "promotion",
            "schedules")


def section_keys() -> dict[str, tuple[str, ...]]:
    """The keys each mapping section of params.yaml accepts, sorted (`datasets`, a list, is not one)."""
    classes = {"prepare": [PrepareParams], "model": [ModelConfig], "diffusion": [DiffusionConfig],
               "train": [TrainConfig, TrainStageParams], "sample": [SampleConfig], "evaluate": [EvaluateParams],
               "report": [ReportParams], "promotion": [PromotionParams], "schedules": [ScheduleParams]}
    extra = {"model": ["preset"], "sample": ["preset"]}
    return {section: tuple(sorted({f.name for c in cs for f in dataclasses.fields(c)} | set(extra.get(section, ()))))
            for section, cs in classes.items()}


def parse(raw: Any) -> Params:
    """Validate a params mapping (as loaded from YAML) into `Params`."""
    if not isinstance(raw, dict):
        raise ParamsError("params.yaml must be a mapping of sections")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ParamsError(f"params.yaml: unknown section {unknown[0]!r}; allowed sections: {sorted(SECTIONS)}")
    datasets = raw.get("datasets")
    if not isinstance(datasets, list):
        raise ParamsError("params.yaml: datasets must be a list of datasets")
    train, train_stage = build_train(raw.get("train"))
    return Params(
        datasets=tuple(build(DatasetParams, d, f"datasets[{i}]") for i, d in enumerate(datasets)),
        prepare=build(PrepareParams, raw.get("prepare"), "prepare"),
        model=build_model(raw.get("model")),
        diffusion=build(DiffusionConfig, raw.get("diffusion"), "diffusion"),
        train=train,
        train_stage=train_stage,
        sample=build_sample(raw.get("sample")),
        evaluate=build(EvaluateParams, raw.get("evaluate"), "evaluate"),
        report=build(ReportParams, raw.get("report"), "report"),
        promotion=build(PromotionParams, raw.get("promotion"), "promotion"),
        schedules=build(ScheduleParams, raw.get("schedules"), "schedules"),
    )


def read_yaml(path: str | Path) -> Any:
    """The YAML document at `path`, refusing aliases, duplicate keys and files over
    MAX_FILE_BYTES (pipeline.strict_yaml); ParamsError naming the file and the line."""
    try:
        return read_strict(path, what="params file")
    except StrictYAMLError as err:
        raise ParamsError(str(err)) from None


def load(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml (`read_yaml`, then `parse`)."""
    return parse(read_yaml(path))


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.params [PATH]`: check a params file for the whole pipeline before
    DVC reads it (`load`, `check_pipeline`); exit 2 if bad."""
    args = argv if argv is not None else sys.argv[1:]
    path = Path(args[0]) if args else PARAMS_FILE
    try:
        check_pipeline(load(path))
    except ParamsError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten params into {"prepare.scales": "(2.0, ...)", ...} for MLflow."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, (list, tuple)) and obj and all(isinstance(v, dict) for v in obj):
        for v in obj:
            out.update(flatten(v, f"{prefix}{v.get('name', len(out))}."))
    else:
        out[prefix.rstrip(".")] = obj
    return out


if __name__ == "__main__":
    sys.exit(main())
