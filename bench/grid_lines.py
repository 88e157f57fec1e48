"""Grid artefacts ("beaded lines"): how much an upscaler's output varies along a thin straight line.

Usage: python -m bench.grid_lines [--scales 4 3 3.7] [--angles 0 22.5 30 45 60 67.5] [--widths 1.25 2 3]
                                  [--size 192] [--threads 2]

A line `width` HR pixels wide at `angle` degrees (counter-clockwise from horizontal) is drawn
antialiased (area coverage, 8 x 8 supersampled) on a flat background, made into an LR image
as the prepare stage makes LR (pipeline.data.datasets.make_pair: idm.resize, antialiased
bicubic) and upscaled back by a method. Along the line, every quarter pixel, the ridge is the
largest Y value across the line (a cubic spline of the output, within 2 px of the line's
axis) above the background (the image's median); the measure is the ridge's coefficient of
variation (std / mean), `margin` pixels from the image border ignored. A method that beads
the line at the LR pixel period scores higher than bicubic (whose own variation comes from
where the LR grid cuts the line), a faithful method lower. The table gives each method's
variation and its ratio to bicubic's, for bicubic, `idm upscale`'s default output, the peers
of bench.peers when installed, and HR itself (what returning the original scores: its
antialiased pixels vary too).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/README.md: shared machines

import argparse  # noqa: E402
import math  # noqa: E402

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from bench.peers import ours, peer_methods  # noqa: E402
from idm.device import cpu_summary, use_threads  # noqa: E402
from idm.inference.upscaler import Bicubic, Method  # noqa: E402
from pipeline.data.datasets import make_pair  # noqa: E402
from pipeline.evaluation.metrics import rgb_to_y  # noqa: E402

LOW, HIGH = 64, 192  # background and line levels (uint8)
STEP = 0.25  # px between ridge samples along the line
REACH = 2.0  # px either side of the line's axis searched for the ridge
SUPERSAMPLE = 8
FLAT = 1e-6  # a variation below this is the spline's rounding: none


def default_point(size: int) -> tuple[float, float]:
    """(y, x) the lines pass through: near the centre, 0.3 px off the pixel grid's symmetry."""
    return size / 2 + 0.3, size / 2


def draw_line(size: int, angle: float, width: float, point: tuple[float, float] | None = None) -> np.ndarray:
    """(size, size, 3) uint8 grey image: background LOW, a straight line of `width` px through
    `point` (y, x in pixel units, pixel (i, j) covering [i, i + 1) x [j, j + 1); default
    `default_point`) at `angle` degrees, each pixel LOW + (HIGH - LOW) x the fraction of it the
    line covers (measured on a SUPERSAMPLE x SUPERSAMPLE grid). ValueError for size < 1 or width <= 0."""
    if size < 1 or not width > 0:
        raise ValueError(f"size must be >= 1 and width > 0, got size {size}, width {width}")
    py, px = default_point(size) if point is None else point
    ny, nx = _normal(angle)
    c = (np.arange(size * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    distance = (c[:, None] - py) * ny + (c[None, :] - px) * nx
    inside = (np.abs(distance) <= width / 2).reshape(size, SUPERSAMPLE, size, SUPERSAMPLE)
    grey = np.round(LOW + (HIGH - LOW) * inside.mean(axis=(1, 3))).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def _normal(angle: float) -> tuple[float, float]:
    """Unit normal (dy, dx) of a line at `angle` degrees counter-clockwise (y points down)."""
    theta = math.radians(angle)
    return math.cos(theta), math.sin(theta)


def ridge_variation(image: np.ndarray, angle: float, point: tuple[float, float], margin: float) -> float:
    """Coefficient of variation of a drawn line's ridge in an (H, W, 3) uint8 RGB `image`.

    The line passes through `point` (y, x, as in `draw_line`) at `angle` degrees. At every
    STEP px along it whose whole cross-section (+-REACH px) lies `margin` px or more inside
    the image, the ridge is the maximum of the Y channel's cubic spline across the line
    minus the image's median Y. Returns std / mean of the ridge. ValueError when fewer than
    16 samples fit, or the ridge is on average less than one grey level above the background
    (no line).
    """
    y = rgb_to_y(image)
    height, width = y.shape
    ny, nx = _normal(angle)
    dy, dx = -nx, ny  # along the line
    reach = int(round(max(height, width) / STEP))
    along = np.arange(-reach, reach + 1) * STEP
    across = np.arange(-REACH, REACH + 1e-9, 0.05)
    # pixel units -> array indices (a pixel's centre is at its index + 0.5)
    rows = point[0] - 0.5 + along[:, None] * dy + across[None, :] * ny
    cols = point[1] - 0.5 + along[:, None] * dx + across[None, :] * nx
    keep = ((rows >= margin) & (rows <= height - 1 - margin) & (cols >= margin) & (cols <= width - 1 - margin)).all(1)
    if keep.sum() < 16:
        raise ValueError(f"fewer than 16 ridge samples fit {margin} px inside a {height}x{width} image")
    values = ndimage.map_coordinates(y, [rows[keep].ravel(), cols[keep].ravel()], order=3, mode="nearest")
    ridge = values.reshape(-1, across.size).max(axis=1) - np.median(y)
    if not ridge.mean() >= 1:
        raise ValueError(f"no line: the ridge is {ridge.mean():.2g} grey levels above the background")
    return float(ridge.std() / ridge.mean())


def margin_for(scale: float) -> int:
    """HR px ignored at the border: 4 LR pixels, past the reach of every method's border effects."""
    return 4 * math.ceil(scale)


def beading(method: Method, scale: float, angle: float, width: float, size: int = 192) -> float:
    """`ridge_variation` of `method`'s upscale of a `draw_line(size, angle, width)` made LR at `scale`."""
    point = default_point(size)
    hr, lr = make_pair(draw_line(size, angle, width, point), scale)
    return ridge_variation(method(lr, hr.shape[:2]), angle, point, margin_for(scale))


def beading_ratio(method: Method, scale: float, angle: float, width: float, size: int = 192) -> float:
    """`beading` of `method` over bicubic's on the same line; where bicubic's is none (under FLAT:
    a horizontal or vertical line), 1 if the method's is none too, else inf."""
    reference = beading(Bicubic(), scale, angle, width, size)
    value = beading(method, scale, angle, width, size)
    if reference >= FLAT:
        return value / reference
    return 1.0 if value < FLAT else math.inf


class HighRes:
    """The perfect method: returns the HR image the LR was made from (set `hr` first)."""

    name = "HR"
    hr: np.ndarray

    def __call__(self, lr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        return self.hr[: size[0], : size[1]]


def table(methods: list, scales: list[float], angles: list[float], widths: list[float], size: int) -> list[str]:
    """Markdown rows: scale, width, angle, then per method its variation (%) and ratio to bicubic's."""
    names = ["HR"] + [m.name for m in methods]
    rows = ["| scale | width | angle | " + " | ".join(names) + " |", "|---" * (3 + len(names)) + "|"]
    perfect = HighRes()
    for scale in scales:
        for width in widths:
            for angle in angles:
                perfect.hr = draw_line(size, angle, width)
                values = [beading(m, scale, angle, width, size) for m in [perfect, *methods]]
                reference = values[1]  # bicubic
                cells = [f"{100 * v:.1f}%" + (f" ({v / reference:.2f}x)" if reference >= 0.005 else "")
                         for v in values]
                rows.append(f"| x{scale:g} | {width:g} | {angle:g} | " + " | ".join(cells) + " |")
                print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", type=float, nargs="+", default=[4, 3, 3.7])
    parser.add_argument("--angles", type=float, nargs="+", default=[0, 22.5, 30, 45, 60, 67.5])
    parser.add_argument("--widths", type=float, nargs="+", default=[1.25, 2, 3])
    parser.add_argument("--size", type=int, default=192, help="HR side (px)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    use_threads(args.threads)
    print(f"CPU: {cpu_summary()}")
    methods = [Bicubic(), ours()] + peer_methods(args.threads)
    rows = table(methods, args.scales, args.angles, args.widths, args.size)
    print("\nRidge variation along the line (std / mean) and its ratio to bicubic's (no ratio where "
          "bicubic's is under 0.5%):\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
