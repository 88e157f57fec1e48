"""The `idm` command: `idm upscale IMAGE... --scale 3.7 --out DIR` (and `idm serve`).

`--model` takes `pretrained` (the default: the weights shipped in the package, no network
or MLflow store needed), a checkpoint path or an MLflow model URI (e.g. models:/idm@champion).
By default a model with a regression output (the shipped one) gives it: one pass, the best
PSNR, never below bicubic (MODEL_CARD.md); `--steps N` draws a diffusion sample instead.
Inputs are files or folders (`--recursive`: subfolders too); outputs go to `--out` (default
`results/`) as <stem>_x<scale>.<ext> (or <stem>_<W>x<H>.<ext>; `--suffix`, `--ext`), written
atomically; every name is checked (no two outputs alike, no input overwritten) before any work.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from idm.config import (
    SAMPLE_PRESETS,
    SAMPLERS,
    SPACINGS,
    TILE_NORMS,
    ConfigError,
    SampleConfig,
)
from idm.resize import check_scale, target_size
from pipeline.data.images import (
    DEFAULT_MAX_PIXELS,
    ImageReadError,
    bit_depth,
    probe_image,
    read_image,
    read_image_16,
    to_8_bit,
    write_image,
)
from pipeline.jobs import OUTPUT_EXTS, check_suffix, plan

DEFAULT_MODEL = "pretrained"  # idm.pretrained: shipped in the package

SAMPLE = SampleConfig()  # sampling defaults under the flags and --preset
# zlib level of the output PNGs: faster to write than PIL's default 6, files a little larger (bench/README.md).
PNG_LEVEL = 3


def parse_size(text: str) -> tuple[int, int]:
    """'1920x1080' (width x height) -> (height, width)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must look like 1920x1080 (width x height), got {text!r}") from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"--size must be positive, got {text!r}")
    return height, width


def parse_scale(text: str) -> float:
    if "_" in text:  # float() reads '1_5' as 15
        raise argparse.ArgumentTypeError(f"scale must be a number > 1 such as 3.7, got {text!r}")
    try:
        return check_scale(float(text))
    except ValueError as err:
        message = str(err) if "scale" in str(err) else f"scale must be a number > 1, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def parse_suffix(text: str) -> str:
    try:
        return check_suffix(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--suffix ")) from None


def parse_tile(text: str) -> int:
    tile = int(text) if text.strip().isdigit() else -1
    if tile < 0 or 0 < tile <= SAMPLE.tile_overlap:
        raise argparse.ArgumentTypeError(f"--tile must be 0 (automatic) or an integer > {SAMPLE.tile_overlap} "
                                         f"(the tile overlap, LR px), got {text!r}")
    return tile


MODEL_URI_SCHEMES = ("models:/", "runs:/", "file://")


def load_method(args: argparse.Namespace, sample: SampleConfig, device: str):
    """The IDM method for --model (a checkpoint path or an MLflow model URI), fp32 or int8.

    A model URI is downloaded into a temporary folder that is removed once the weights
    are in memory, whatever happens.
    """
    if args.model == DEFAULT_MODEL:
        from idm.pretrained import weights

        return _method(weights(), args, sample, device)
    if "://" in args.model or args.model.startswith(("models:/", "runs:/")):
        if not args.model.startswith(MODEL_URI_SCHEMES):
            raise ValueError(f"--model {args.model!r}: unsupported model URI; give a checkpoint path, file://PATH, "
                             "models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/model")
        try:
            from pipeline.mlflow_model import checkpoint_from_uri
            from pipeline.tracking import setup
        except ImportError as err:  # `pip install .` has the CLI but not MLflow
            raise ValueError(f"--model {args.model}: model URIs need MLflow ({err}); install the pipeline "
                             "extra: pip install -e '.[pipeline]' (or make run)") from None
        setup()
        uri = args.model
        if args.int8:  # models:/idm@candidate --int8: the int8 version quantized from the candidate
            from pipeline.registry import int8_uri

            uri = int8_uri(uri)
        with tempfile.TemporaryDirectory(prefix="idm-model-") as tmp:
            return _method(checkpoint_from_uri(uri, Path(tmp)), args, sample, device)
    path = Path(args.model)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model checkpoint (give a .pt path or a models:/ URI)")
    return _method(path, args, sample, device)


def _method(path: Path, args: argparse.Namespace, sample: SampleConfig, device: str):
    from idm.inference.upscaler import DiffusionSR

    method = DiffusionSR.from_checkpoint(path, sample, device=device)
    if args.int8:
        from pipeline.mlflow_model import int8_beside

        int8 = int8_beside(path)
        if int8 is None:
            raise FileNotFoundError(f"--int8: no model_int8.pt beside {path} or in {path.parent.parent / 'idm-int8'}; "
                                    f"run `dvc repro quantize` or pass a model version tagged quantization=int8")
        method.use_int8(int8)
    return method


def resolve_device_flag(args: argparse.Namespace) -> str:
    """--device as a torch device name; ValueError naming the flag if it is unknown or absent."""
    from idm.device import resolve_device

    try:
        return str(resolve_device(args.device))
    except ValueError as err:
        raise ValueError(f"--device {args.device!r}: {err}") from None


def sample_config(args: argparse.Namespace) -> SampleConfig:
    """The sampling settings the flags ask for, checked by SampleConfig (as params.yaml's are);
    an error names the flag."""
    chosen = {**SAMPLE_PRESETS.get(args.preset, {}),
              **{k: getattr(args, k) for k in ("sampler", "steps", "temperature") if getattr(args, k) is not None}}
    try:
        return dataclasses.replace(SAMPLE, **chosen, spacing=args.spacing, eta=args.eta, seed=args.seed,
                                   max_memory_gb=args.max_memory_gb, tile_norm=args.tile_norm, threads=args.threads)
    except ConfigError as err:
        raise flag_error(err) from None


def flag_error(err: ConfigError) -> ValueError:
    """A SampleConfig error worded with the flag's name (`max_memory_gb` -> `--max-memory-gb`)."""
    return ValueError(f"--{str(err).replace('_', '-', err.field.count('_'))}")


def output_size(path: Path, lr_shape: tuple[int, ...], args: argparse.Namespace) -> tuple[int, int]:
    """(height, width) of the output for an input of `lr_shape`; ValueError naming `path` if it
    is absurd (not finite, or more pixels than inputs may have: pipeline.data.images.DEFAULT_MAX_PIXELS).
    With --size and --keep-aspect: the largest size of the input's aspect ratio inside --size."""
    if args.size and args.keep_aspect:
        scale = min(args.size[0] / lr_shape[0], args.size[1] / lr_shape[1])
        height, width = (max(1, round(side * scale)) for side in lr_shape[:2])
    elif args.size:
        height, width = args.size
    else:
        height, width = (side * args.scale for side in lr_shape[:2])
    if not (math.isfinite(height) and math.isfinite(width)):
        raise ValueError(f"{path}: --scale {args.scale:g} makes the output size infinite; use a smaller --scale")
    if height * width > DEFAULT_MAX_PIXELS:
        raise ValueError(f"{path}: a {round(width)}x{round(height)} output is above the limit of {DEFAULT_MAX_PIXELS} "
                         f"pixels; use a smaller --scale or --size")
    if args.size:
        if height <= lr_shape[0] or width <= lr_shape[1]:
            raise ValueError(f"{path}: {round(width)}x{round(height)} is not larger than the input "
                             f"({lr_shape[1]}x{lr_shape[0]}) in both directions; idm upscale only enlarges")
        return int(height), int(width)
    return target_size(lr_shape[:2], args.scale)


def aspect_warning(path: Path, lr_shape: tuple[int, ...], size: tuple[int, int]) -> str | None:
    """A warning when `size` stretches the input by more than 1% in one direction than the other."""
    stretch = (size[1] / lr_shape[1]) / (size[0] / lr_shape[0])
    if abs(stretch - 1) <= 0.01:
        return None
    return (f"idm: warning: {path}: {size[1]}x{size[0]} changes its aspect ratio ({lr_shape[1]}x{lr_shape[0]}, "
            f"stretched {stretch:.2f}x horizontally); --keep-aspect fits it inside --size instead")


def upscale(args: argparse.Namespace) -> None:
    """Check every flag, input, output name and output size first (fail fast: nothing is written
    on bad input), then upscale the inputs one at a time, so memory holds one decoded input at once."""
    if args.keep_aspect and not args.size:
        raise ValueError("--keep-aspect needs --size (with --scale the aspect ratio is always kept)")
    sample = sample_config(args)
    device = resolve_device_flag(args)  # every flag is checked before any input is read
    shapes: dict[Path, tuple[int, int]] = {}
    sizes: dict[Path, tuple[int, int]] = {}

    def suffix(src: Path) -> str:  # headers only: the input's size gives the output's
        shapes[src] = probe_image(src, max_bytes=sample.max_bytes)
        sizes[src] = output_size(src, shapes[src], args)
        if args.suffix is not None:
            return args.suffix
        return f"x{args.scale:g}" if args.scale else f"{sizes[src][1]}x{sizes[src][0]}"

    jobs = plan(args.images, args.out, suffix=suffix, ext=args.ext, recursive=args.recursive)
    for job in jobs:
        if args.size and not args.keep_aspect and (warning := aspect_warning(job.src, shapes[job.src], sizes[job.src])):
            print(warning, file=sys.stderr)
    try:
        method = load_method(args, sample, device)
    except ConfigError as err:  # settings that depend on the model: --steps above its T
        raise flag_error(err) from None
    if args.steps is None and args.preset is None:  # the model's own default (idm.config.default_preset)
        method.use_default_sample()
        if not method.sample.steps and (args.sampler is not None or args.temperature is not None):
            print("idm: warning: --sampler and --temperature apply to a diffusion sample; the default here is the "
                  "regression output (add --steps N or --preset balanced|perceptual)", file=sys.stderr)
    if method.device.type == "cpu":  # say what runs: threads, the kernels torch picked for this CPU, precision
        import torch

        from idm.device import use_threads

        path = "int8 denoiser" if args.int8 else "float32, channels-last"
        what = (f"diffusion, {method.sample.sampler} {method.sample.steps} steps, temperature "
                f"{method.sample.temperature:g}" if method.sample.steps else "regression output")
        print(f"CPU: {use_threads(sample.threads)} threads, {torch.backends.cpu.get_cpu_capability()} kernels, "
              f"{path}; {what}")
    from idm.inference.memory import check_memory

    tiles = {}
    for job in jobs:  # decodable, and a tile (or none) fits the bound; one image held at a time
        read_image(job.src, max_bytes=sample.max_bytes)
        if args.no_tiling:
            check_memory(method.model.cfg, sizes[job.src], max_bytes=sample.max_bytes, lr_size=shapes[job.src],
                         regression=not method.sample.steps)
        tiles[job.src] = (method.tile_for(shapes[job.src], sizes[job.src]) if not args.tile
                          else None if args.tile >= max(shapes[job.src]) else args.tile)
    bar = tqdm(jobs, desc="upscale", unit="image", disable=len(jobs) < 2)
    for job in bar:
        started = time.perf_counter()
        done = _upscale_one(method, job, sizes[job.src], tiles[job.src], args, sample)
        bar.write(f"{done} in {time.perf_counter() - started:.1f} s")


def _upscale_one(method, job, size: tuple[int, int], tile: int | None, args: argparse.Namespace,
                 sample: SampleConfig) -> str:
    """Read, upscale and write one input (a progress bar of its network calls); returns what was written."""
    from idm.inference.tiling import tile_starts
    from idm.inference.upscaler import upscale_channels

    deep = bit_depth(job.src) == 16  # kept 16-bit end to end, into a 16-bit PNG
    image = (read_image_16(job.src, max_bytes=sample.max_bytes) if deep
             else read_image(job.src, max_bytes=sample.max_bytes, alpha=True))
    lr = image[..., :3]
    overlap = method.sample.tile_overlap
    count = 1 if tile is None else len(tile_starts(lr.shape[0], tile, overlap)) * len(tile_starts(lr.shape[1], tile, overlap))
    with network_progress(method, total=count * max(method.sample.steps, 1), name=job.src.name):
        out = upscale_channels(lambda rgb: method.upscale(rgb, size, tile), image, size)
    if deep and job.out.suffix.lower() != ".png":
        out = to_8_bit(out)
    write_image(job.out, out, compress_level=PNG_LEVEL)
    tiled = ""
    if tile is not None:  # say so: a tiled output can differ slightly from one run in one piece (docs/cli.md)
        need = method.peak_bytes(lr.shape[:2], size) / 2**30
        why = (f"--tile {args.tile}" if args.tile else
               f"in one piece it would need ~{need:.2f} GiB, above --max-memory-gb {args.max_memory_gb:g}")
        tiled = f" in {count} tiles of {tile} LR px ({why})"
    kept = (", alpha by bicubic" if image.shape[2] == 4 else "") + (", 16-bit" if out.dtype == np.uint16 else "")
    return f"{job.src} ({lr.shape[1]}x{lr.shape[0]}) -> {job.out} ({size[1]}x{size[0]}{kept}){tiled}"


@contextlib.contextmanager
def network_progress(method, *, total: int, name: str) -> Iterator[None]:
    """A progress bar (stderr) of `total` network calls of `method` — denoiser steps x tiles, or the
    encoder's tiles for the regression output — shown when there is more than one, so one long
    image is never silent."""
    module = method.model if method.sample.steps else method.model.encoder
    bar = tqdm(total=total, desc=name, unit="step" if method.sample.steps else "tile", leave=False, disable=total < 2)

    def tick(*_: object) -> None:  # returns None: a hook's return value would replace the module's output
        bar.update(1)

    hook = module.register_forward_hook(tick)
    try:
        yield
    finally:
        hook.remove()
        bar.close()


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one `idm: error:` line (no usage block), exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"idm: error: {' '.join(message.split())} (see idm upscale --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: a flag another tool has (Real-ESRGAN's --tile) must never be taken as ours abbreviated
    parser = _Parser(prog="idm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    up = sub.add_parser("upscale", help="super-resolve images by any scale", allow_abbrev=False)
    up.add_argument("images", nargs="+", type=Path, metavar="INPUT", help="image files and/or folders of images")
    up.add_argument("-r", "--recursive", action="store_true",
                    help="take the images in subfolders of folder inputs too, keeping the subfolders under --out")
    target = up.add_mutually_exclusive_group(required=True)
    target.add_argument("-s", "--scale", type=parse_scale, help="magnification, a number > 1 (e.g. 3.7)")
    target.add_argument("--size", type=parse_size, help="output size WIDTHxHEIGHT (e.g. 1920x1080)")
    up.add_argument("--model", default=DEFAULT_MODEL, help=f"'{DEFAULT_MODEL}' (the shipped model), a checkpoint path or an MLflow model URI "
                         f"such as models:/idm@champion (default {DEFAULT_MODEL})")
    up.add_argument("--steps", type=int, default=None,
                    help="denoising steps of a diffusion sample; 0: the regression output, no diffusion (default: the "
                         "model's: the regression output when it has one, like the shipped model, else preset balanced)")
    up.add_argument("--preset", choices=list(SAMPLE_PRESETS),
                    help="named sampler settings (bench/README.md, 'Perception-distortion'): fidelity = the regression "
                         "output; balanced = deterministic, more natural-looking (lower NIQE); perceptual = the lowest NIQE. "
                         "--steps, --sampler and --temperature override it")
    up.add_argument("--sampler", default=None, choices=sorted(SAMPLERS), help=f"(default {SAMPLE.sampler})")
    up.add_argument("--spacing", default=SAMPLE.spacing, choices=list(SPACINGS),
                    help=f"how the steps spread over the noise schedule (default {SAMPLE.spacing})")
    up.add_argument("--eta", type=float, default=SAMPLE.eta)
    up.add_argument("--temperature", type=float, default=None,
                    help=f"scale of the initial noise, 0-1: lower favours PSNR over detail (default {SAMPLE.temperature})")
    up.add_argument("--seed", type=int, default=SAMPLE.seed)
    up.add_argument("--int8", action="store_true", help="int8-quantized denoiser (CPU)")
    up.add_argument("--device", default="auto")
    up.add_argument("--threads", type=int, default=SAMPLE.threads,
                    help="CPU threads (default 0: one per physical core)")
    up.add_argument("--max-memory-gb", type=float, default=SAMPLE.max_memory_gb,
                    help=f"tile outputs that would need more (default {SAMPLE.max_memory_gb:g})")
    up.add_argument("--tile-norm", default=SAMPLE.tile_norm, choices=list(TILE_NORMS),
                    help="GroupNorm statistics of each tile (fast) or of the whole image (closer to the untiled "
                         f"result, much slower; see bench/README.md) (default {SAMPLE.tile_norm})")
    up.add_argument("--no-tiling", action="store_true", help="fail instead of tiling when over --max-memory-gb")
    up.add_argument("-t", "--tile", type=parse_tile, default=0,
                    help="LR tile side in px (default 0: automatic, tiles only above --max-memory-gb)")
    up.add_argument("-o", "--out", type=Path, default=Path("results"),
                    help="output folder (default: results), or the output file for one input (e.g. out.jpg)")
    up.add_argument("--suffix", type=parse_suffix, default=None,
                    help="output names are <stem>_<suffix>.<ext> (default: x<scale>, or <W>x<H> with --size; '' for none)")
    up.add_argument("--ext", default="auto", choices=("auto", *OUTPUT_EXTS),
                    help="output format (default auto: the input's when png, jpg or webp, else png; "
                         "inputs with alpha keep it, upscaled by bicubic, so they never become jpg)")
    up.add_argument("--keep-aspect", action="store_true",
                    help="with --size: fit the output inside WIDTHxHEIGHT at the input's aspect ratio "
                         "(without it a different ratio stretches the image, with a warning)")
    sub.add_parser("serve", help="Prefect server + MLflow UI + scheduled flows (same as make serve)")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    # Ctrl-C and SIGTERM unwind as KeyboardInterrupt from here on (pipeline.entry answered them
    # until now), so a half-written output's temporary file is removed.
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    if argv[:1] == ["serve"]:  # its own options: idm serve --help
        from pipeline.servers import main as serve

        sys.exit(serve(argv[1:]))
    args = build_parser().parse_args(argv)
    from pipeline.tracking import TrackingUnavailable

    try:
        upscale(args)
    except (ImageReadError, ValueError, OSError, TrackingUnavailable) as err:  # OSError: a full disk, permissions
        print(f"idm: error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        # the interrupt can land half way through a progress bar's line: start a line of our own
        print("\r" if sys.stderr.isatty() else "\n", end="", file=sys.stderr)
        print("idm: interrupted; outputs finished so far are complete, nothing half-written is left", file=sys.stderr)
        sys.exit(130)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":  # `python -m pipeline.entry` (the `idm` command) also answers Ctrl-C during imports
    main()
