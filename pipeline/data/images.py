"""Image reading and writing: any common format in, 8-bit RGB out; writes are atomic (idm.files).

Pillow does the decoding; this module only normalises modes (greyscale, alpha,
palette, CMYK, 16-bit) to 8-bit RGB, refuses decompression bombs before decoding,
and turns every decoding failure into one error that names the file. 16-bit colour,
which Pillow cannot hold, is read and written through OpenCV (`read_image_16`).
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps

from idm.files import atomic_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# 16k x 16k: far above any SR test image, far below what would exhaust memory.
DEFAULT_MAX_PIXELS = 16384 * 16384


class ImageReadError(ValueError):
    """An input file is not a readable image (or is too large to decode safely)."""


def _to_rgb8(img: Image.Image, alpha: bool = False) -> np.ndarray:
    """Convert any Pillow mode to an (H, W, 3) uint8 array, or (H, W, 4) RGBA when `alpha`
    and the image has transparency."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16/32-bit greyscale: Pillow's convert("L") clips instead of rescaling.
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if img.mode == "F" and arr.max(initial=0) <= 1.0:
            peak = 1.0
        grey = np.clip(np.round(arr / peak * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if _has_alpha(img):
        img = img.convert("RGBA")
        if alpha:
            return np.asarray(img, dtype=np.uint8).copy()
    # Alpha is dropped (not composited): SR datasets score the colour channels only.
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def probe_alpha(path: str | os.PathLike) -> bool:
    """Whether the image at `path` has transparency (an alpha band or a transparent colour), from its header."""
    try:
        with Image.open(path) as img:
            return _has_alpha(img)
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageReadError(f"{path}: not a readable image ({err})") from None


# Bytes per pixel that decoding and converting to 8-bit RGB may hold at once: Pillow's
# decoded buffer (up to 4 bands, or 4 bytes of a 32-bit band), a float64 greyscale copy for
# 16/32-bit inputs and its rounding, the RGB array. Counted from _to_rgb8, not measured.
DECODE_BYTES_PER_PIXEL = 24


def decoded_bytes(height: int, width: int) -> int:
    """Upper bound of the memory (bytes) `read_image` holds while decoding an image of that size."""
    return DECODE_BYTES_PER_PIXEL * height * width


def _check_pixels(name: str, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageReadError(f"{name}: image too large: it declares {width}x{height} pixels, above the "
                             f"limit of {max_pixels} (a decompression bomb or an oversized input)")


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8) from the header only: Pillow's getexif() decodes a PNG whole."""
    exif = img.info.get("exif")
    if img.format == "PNG":
        return Image.Exif().load(exif).get(ExifTags.Base.Orientation, 1) if exif else 1
    return img.getexif().get(ExifTags.Base.Orientation, 1)


def probe_image(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                max_bytes: int | None = None) -> tuple[int, int]:
    """(height, width) of the image file at `path` as `read_image` returns it, from its header only.

    Raises ImageReadError naming the file if it is not a regular file (a FIFO or device
    would block or never end), is not a readable image, has more than one frame (animated
    GIF/PNG/WebP, multi-page TIFF: refused, not cut to the first frame), declares more than
    `max_pixels` pixels, or would need more than `max_bytes` to decode (`decoded_bytes`).
    """
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: no such file") from None
    except OSError as err:
        raise ImageReadError(f"{path}: cannot be read ({err.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file (a pipe, socket or device)"
        raise ImageReadError(f"{path}: {kind}; give an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                _check_pixels(str(path), width, height, max_pixels)
                if max_bytes is not None and decoded_bytes(height, width) > max_bytes:
                    raise ImageReadError(f"{path}: decoding its {width}x{height} pixels needs "
                                         f"~{decoded_bytes(height, width) / 2**30:.2f} GiB, above the bound of "
                                         f"{max_bytes / 2**30:.2f} GiB")
                frames = getattr(img, "n_frames", 1)
                if frames > 1:
                    raise ImageReadError(f"{path}: has {frames} frames (an animation or a multi-page file); "
                                         "idm reads single-frame images: save the frame you want as its own file")
                if _orientation(img) in (5, 6, 7, 8):  # EXIF: rotated by 90 degrees
                    width, height = height, width
    except ImageReadError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageReadError(f"{path}: image too large: {err}") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageReadError(f"{path}: not a readable image ({err})") from None
    return height, width


def read_image(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_bytes: int | None = None, alpha: bool = False) -> np.ndarray:
    """Read an image file as an (H, W, 3) uint8 RGB array in [0, 255] ((H, W, 4) RGBA if
    `alpha` and the file has transparency; otherwise alpha is dropped).

    Greyscale, alpha, palette, CMYK and 16-bit inputs are converted; EXIF rotation is
    applied. Raises ImageReadError naming the file for anything `probe_image` refuses
    (checked from the header, before any pixel is decoded) and for anything unreadable,
    zero-byte, truncated or smaller than 1x1.
    """
    path = Path(path)
    probe_image(path, max_pixels=max_pixels, max_bytes=max_bytes)
    return _decode(path, str(path), max_pixels, alpha)


def decode_image(data: bytes, *, name: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS,
                 alpha: bool = False) -> np.ndarray:
    """`read_image` for an encoded file held in memory (PNG, JPEG, WebP, ... bytes); errors
    name it `name`. The pixel count is checked from the header, before decoding."""
    return _decode(io.BytesIO(data), name, max_pixels, alpha)


def _decode(source: Path | io.BytesIO, name: str, max_pixels: int, alpha: bool) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                _check_pixels(name, img.width, img.height, max_pixels)
                img.load()
                img = ImageOps.exif_transpose(img)
                arr = _to_rgb8(img, alpha)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageReadError(f"{name}: image too large: {err}") from None
    except FileNotFoundError:
        raise ImageReadError(f"{name}: no such file") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageReadError(f"{name}: not a readable image ({err})") from None
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageReadError(f"{name}: image has no pixels")
    return arr


def bit_depth(path: str | os.PathLike) -> int:
    """16 if the file stores 16 bits per channel (a PNG's IHDR, a TIFF's BitsPerSample, Pillow's
    16-bit grey modes), else 8; from the header. Pillow decodes 16-bit colour to 8 bits, so
    such files are read with `read_image_16`."""
    with Image.open(path) as img:
        if img.mode.startswith("I;16"):
            return 16
        if img.format == "PNG":
            with open(path, "rb") as f:
                return 16 if f.read(25)[24:25] == b"\x10" else 8  # IHDR: 8 signature + 16 bytes, then bit depth
        if img.format == "TIFF":
            return 16 if max(img.tag_v2.get(258, (8,))) == 16 else 8
    return 8


def read_image_16(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                  max_bytes: int | None = None) -> np.ndarray:
    """A 16-bit PNG or TIFF (see `bit_depth`) as (H, W, 3) RGB or (H, W, 4) RGBA uint16 (grey
    becomes RGB), checked by `probe_image` first. EXIF rotation is not applied. ImageReadError
    naming the file if it cannot be decoded or is not 16-bit."""
    import cv2  # Pillow cannot decode 16-bit colour

    probe_image(path, max_pixels=max_pixels, max_bytes=None if max_bytes is None else max_bytes // 2)
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.dtype != np.uint16:
        raise ImageReadError(f"{path}: not a readable 16-bit image")
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=2)
    return np.ascontiguousarray(arr[..., [2, 1, 0, 3][: arr.shape[2]]])  # OpenCV's BGR(A) -> RGB(A)


def to_8_bit(img: np.ndarray) -> np.ndarray:
    """A uint16 array scaled to uint8 (x * 255 / 65535, rounded)."""
    return ((img.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


_WRITE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def write_image(path: str | os.PathLike, img: np.ndarray, *, compress_level: int = 6, quality: int = 95) -> None:
    """Write an (H, W, 3), (H, W, 4) RGBA or (H, W) uint8 array atomically, as PNG, JPEG or
    WebP by the path's suffix. `compress_level` is PNG's zlib level, 0-9: PIL's default 6 for
    the pipeline's files, lower for `idm upscale`'s outputs (faster); `quality` is JPEG's and
    WebP's (lossy). A uint16 array is written as a 16-bit PNG. ValueError for another suffix,
    alpha to JPEG, or 16 bits to anything but PNG."""
    if img.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"write_image expects uint8 or uint16, got {img.dtype}")
    fmt = _WRITE_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: cannot write {Path(path).suffix or 'a file without a suffix'}; "
                         f"use {', '.join(_WRITE_FORMATS)}")
    if fmt == "JPEG" and img.ndim == 3 and img.shape[2] == 4:
        raise ValueError(f"{path}: JPEG has no alpha channel")
    if img.dtype == np.uint16:
        if fmt != "PNG":
            raise ValueError(f"{path}: 16-bit images are written as PNG only")
        import cv2  # Pillow cannot encode 16-bit colour

        bgr = img if img.ndim == 2 else img[..., [2, 1, 0, 3][: img.shape[2]]]
        ok, data = cv2.imencode(".png", np.ascontiguousarray(bgr), [cv2.IMWRITE_PNG_COMPRESSION, compress_level])
        if not ok:
            raise ValueError(f"{path}: OpenCV could not encode a {img.shape} image")
        with atomic_path(path) as tmp:
            Path(tmp).write_bytes(data.tobytes())
        return
    options = {"compress_level": compress_level} if fmt == "PNG" else {"quality": quality}
    with atomic_path(path) as tmp:
        Image.fromarray(img).save(tmp, format=fmt, **options)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly in `folder` (by suffix, case-insensitive), sorted by name."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
