"""The README's before/after picture: docs/images/before_after.png.

Usage: python -m bench.readme_figure [--out docs/images/before_after.png] [--scale 4]
       [--crop 96] [--centre 118 172] [--zoom 2] [--threads 2]

scikit-image's `chelsea` (held out from the shipped model's training: recipes/pretrain.yaml)
is cut to whole LR pixels and shrunk `--scale` times with the project's resize
(idm.resize.resize_uint8); the LR image is then enlarged back by bicubic and by what
`idm upscale` gives by default (the shipped model's regression output). The picture shows
the whole photo with the crop marked, then the same `--crop` px square (around the eye and
whiskers) of the HR photo, bicubic and IDM, each zoomed `--zoom` times by nearest neighbour
so pixels stay visible. Prints the whole image's Y-PSNR of both methods (BasicSR protocol).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/README.md: shared machines

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

GAP, LABEL_H, FONT_SIZE = 6, 24, 15


def crop_box(shape: tuple[int, ...], centre: tuple[int, int], side: int) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of a `side` px square around `centre` (row, col), moved inside `shape`;
    ValueError if the image is smaller than the square."""
    height, width = shape[:2]
    if side > min(height, width):
        raise ValueError(f"--crop {side} is larger than the image ({width}x{height})")
    top = min(max(centre[0] - side // 2, 0), height - side)
    left = min(max(centre[1] - side // 2, 0), width - side)
    return top, left, top + side, left + side


def panel(img: np.ndarray, label: str, font: ImageFont.ImageFont) -> Image.Image:
    """`img` (H, W, 3) uint8 under a white strip carrying `label`."""
    out = Image.new("RGB", (img.shape[1], img.shape[0] + LABEL_H), "white")
    out.paste(Image.fromarray(img), (0, LABEL_H))
    ImageDraw.Draw(out).text((img.shape[1] // 2, LABEL_H // 2), label, fill="black", font=font, anchor="mm")
    return out


def figure(hr: np.ndarray, crops: dict[str, np.ndarray], box: tuple[int, int, int, int], zoom: int) -> Image.Image:
    """The whole photo (scaled to the crops' height, `box` outlined) and each labelled crop, zoomed
    `zoom` times (nearest), side by side on white."""
    font = ImageFont.load_default(size=FONT_SIZE)
    side = (box[2] - box[0]) * zoom
    shrink = side / hr.shape[0]
    thumb = Image.fromarray(hr).resize((round(hr.shape[1] * shrink), side), Image.Resampling.LANCZOS)
    top, left, bottom, right = (round(v * shrink) for v in box)
    ImageDraw.Draw(thumb).rectangle((left, top, right, bottom), outline=(255, 40, 40), width=2)
    panels = [panel(np.asarray(thumb), "photo (crop marked)", font)]
    for label, img in crops.items():
        big = np.repeat(np.repeat(img[box[0]:box[2], box[1]:box[3]], zoom, axis=0), zoom, axis=1)
        panels.append(panel(big, label, font))
    canvas = Image.new("RGB", (sum(p.width for p in panels) + GAP * (len(panels) - 1), panels[0].height), "white")
    x = 0
    for p in panels:
        canvas.paste(p, (x, 0))
        x += p.width + GAP
    return canvas


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images/before_after.png"))
    parser.add_argument("--scale", type=int, default=4, help="integer magnification (default 4)")
    parser.add_argument("--crop", type=int, default=96, help="side of the shown square, HR px (default 96)")
    parser.add_argument("--centre", type=int, nargs=2, default=(118, 172), metavar=("ROW", "COL"),
                        help="centre of the square in the HR photo (default: the cat's left eye)")
    parser.add_argument("--zoom", type=int, default=2, help="nearest-neighbour zoom of the crops (default 2)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import skimage.data
    import torch

    from idm.inference.upscaler import DiffusionSR
    from idm.pretrained import weights
    from idm.resize import resize_uint8
    from pipeline.evaluation.metrics import border_for, psnr

    torch.set_num_threads(args.threads)
    photo = skimage.data.chelsea()
    h, w = (side - side % args.scale for side in photo.shape[:2])  # whole LR pixels
    hr = np.ascontiguousarray(photo[:h, :w])
    lr = resize_uint8(hr, (h // args.scale, w // args.scale))
    method = DiffusionSR.from_checkpoint(weights())  # the model's default: its regression output, as idm upscale
    outputs = {f"bicubic x{args.scale}": resize_uint8(lr, (h, w)), f"IDM x{args.scale} (idm upscale)": method(lr, (h, w))}
    for label, img in outputs.items():
        print(f"{label}: Y-PSNR {psnr(img, hr, border=border_for(args.scale), y_channel=True):.2f} dB "
              f"(chelsea {w}x{h}, LR {lr.shape[1]}x{lr.shape[0]})")
    box = crop_box(hr.shape, tuple(args.centre), args.crop)
    image = figure(hr, {"HR (original)": hr, **outputs}, box, args.zoom)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out, optimize=True)
    print(f"wrote {args.out} ({image.width}x{image.height}, {args.out.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
