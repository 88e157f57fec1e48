"""Image reading and writing: any common format in, 8-bit RGB out; writes are atomic (idm.files).

Pillow does the decoding; this module normalises modes (greyscale, alpha, palette, CMYK,
16-bit) to 8-bit RGB, refuses decompression bombs from the header, before decoding, and
turns every decoding failure into one error that names the file. 16-bit colour, which
Pillow reduces to 8 bits, is read through OpenCV and tifffile (`read_image_16`). Every reader
takes size and EXIF orientation from one header parse (`_Header`) and turns the pixels
itself, so `probe_image` and both readers agree whatever the format or decoder version.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image

from idm.files import atomic_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# The only decoders Pillow may use, whatever a file's name: Pillow picks one by content, and a
# file named .png that is really EPS would otherwise start Ghostscript (JPEG includes phones' MPO).
PILLOW_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF")

# 16k x 16k: far above any SR test image, far below what would exhaust memory.
DEFAULT_MAX_PIXELS = 16384 * 16384


class ImageReadError(ValueError):
    """An input file is not a readable image (or is too large to decode safely)."""


def pixel_limit(max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """The most pixels a reader accepts: `max_pixels`, or Pillow's own refusal threshold
    (2 x Image.MAX_IMAGE_PIXELS, 178,956,970 by default) when that is set and smaller;
    Pillow refuses larger images itself, so the smaller of the two is the one in force."""
    pillow = Image.MAX_IMAGE_PIXELS
    return max_pixels if not pillow else min(max_pixels, 2 * int(pillow))


# Bytes per pixel that decoding and converting to 8-bit RGB may hold at once: Pillow's
# decoded buffer (up to 4 bands, or 4 bytes of a 32-bit band) and, for 16/32-bit grey, a
# 4-byte working copy and its 2-byte clip; for 16-bit colour instead the 8-byte samples and
# their RGB-ordered copy; then the (H, W, 4) result and its copy turned by the EXIF
# orientation. Counted from _to_rgb8, _samples and _orient, not measured.
DECODE_BYTES_PER_PIXEL = 24


def decoded_bytes(height: int, width: int) -> int:
    """Upper bound of the memory (bytes) `read_image` holds while decoding an image of that size."""
    return DECODE_BYTES_PER_PIXEL * height * width


@dataclass(frozen=True)
class _Header:
    """What an image file's header declares: size as stored, EXIF orientation (1-8), frames,
    transparency, bits per channel (8 or 16) and format."""

    width: int
    height: int
    orientation: int
    frames: int
    alpha: bool
    depth: int
    format: str

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) as a viewer shows it: orientations 5-8 turn the image by 90 degrees."""
        return (self.width, self.height) if self.orientation >= 5 else (self.height, self.width)


def _to_rgb8(img: Image.Image, alpha: bool = False) -> np.ndarray:
    """Convert any Pillow mode to an (H, W, 3) uint8 array, or (H, W, 4) RGBA when `alpha`
    and the image has transparency."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return np.repeat(_grey_to_8_bit(img)[..., None], 3, axis=2)
    if _has_alpha(img):
        img = img.convert("RGBA")
        if alpha:
            return np.asarray(img, dtype=np.uint8).copy()
    # Alpha is dropped (not composited): SR datasets score the colour channels only.
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def _grey_to_8_bit(img: Image.Image) -> np.ndarray:
    """A 16/32-bit integer or float greyscale image as (H, W) uint8, rescaled from [0, 65535]
    (16-bit modes, or any value above 255), [0, 255], or [0, 1] (floats all <= 1); Pillow's
    convert("L") clips instead. In place on one 4-byte copy, within DECODE_BYTES_PER_PIXEL."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        return to_8_bit(arr)
    top = arr.max(initial=0)
    if img.mode == "F":
        work = arr.astype(np.float32)
        work *= 255.0 / (1.0 if top <= 1.0 else 65535.0 if top > 255 else 255.0)
        np.rint(work, out=work)
        np.clip(work, 0, 255, out=work)
        return work.astype(np.uint8)
    if top > 255:
        return to_8_bit(np.clip(arr, 0, 65535).astype(np.uint16))
    return np.clip(arr, 0, 255).astype(np.uint8)


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def _orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """(H, W[, C]) `arr` as stored, as a viewer shows it for EXIF `orientation` 1-8 (what
    ImageOps.exif_transpose does), C-contiguous: 5-8 transpose, then 2, 3, 6, 7 mirror
    left-right and 3, 4, 7, 8 top-bottom."""
    if orientation >= 5:
        arr = arr.swapaxes(0, 1)
    if orientation in (2, 3, 6, 7):
        arr = arr[:, ::-1]
    if orientation in (3, 4, 7, 8):
        arr = arr[::-1]
    return np.ascontiguousarray(arr)


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8) as Pillow reads it (EXIF, else XMP's tiff:Orientation) from
    the header, 1 when absent, out of range or unparseable: metadata never makes a readable
    image unreadable. Image.Image.getexif, as PNG's own decodes the whole image first. Cached:
    after a TIFF is decoded it says 1 (Pillow's TIFF reader turns it and drops the tag)."""
    try:
        value = Image.Image.getexif(img).get(ExifTags.Base.Orientation, 1)
    except Exception:  # any parse failure of any metadata block
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _check_pixels(name: str, width: int, height: int, max_pixels: int) -> None:
    limit = pixel_limit(max_pixels)
    if width * height > limit:
        raise ImageReadError(f"{name}: image too large: it declares {width}x{height} pixels, above the "
                             f"limit of {limit} (a decompression bomb or an oversized input)")


def _depth(img: Image.Image, start: bytes) -> int:
    """16 if the file stores 16 bits per channel (Pillow's 16-bit grey modes, a PNG's IHDR,
    a TIFF's BitsPerSample), else 8; `start`: the file's first bytes."""
    if img.mode.startswith("I;16"):
        return 16
    if img.format == "PNG":
        return 16 if start[24:25] == b"\x10" else 8  # IHDR: 8 signature + 16 bytes, then the bit depth
    if img.format == "TIFF":
        bits = img.tag_v2.get(258, 8)
        return 16 if max(bits if isinstance(bits, tuple) else (bits,)) == 16 else 8
    return 8


def _pillow_header(img: Image.Image, start: bytes, name: str, max_pixels: int) -> _Header:
    # Pillow reports a TIFF's size already turned by its orientation; the tags hold it as stored.
    width, height = (img.tag_v2[256], img.tag_v2[257]) if img.format == "TIFF" else img.size
    _check_pixels(name, width, height, max_pixels)
    return _Header(width, height, _orientation(img), getattr(img, "n_frames", 1), _has_alpha(img),
                   _depth(img, start), img.format or "")


def _tiff_header(fp: BinaryIO, name: str, max_pixels: int) -> _Header:
    import tifffile

    with tifffile.TiffFile(fp) as tif:
        page = tif.pages.first
        _check_pixels(name, page.imagewidth, page.imagelength, max_pixels)
        tag = page.tags.get(ExifTags.Base.Orientation)
        orientation = tag.value if tag is not None and isinstance(tag.value, int) and 1 <= tag.value <= 8 else 1
        return _Header(page.imagewidth, page.imagelength, orientation, len(tif.pages), bool(page.extrasamples),
                       16 if page.bitspersample == 16 else 8, "TIFF")


_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


@contextlib.contextmanager
def _opened(fp: BinaryIO, name: str, max_pixels: int) -> Iterator[tuple[_Header, Image.Image | None]]:
    """The header of the image in `fp` (ImageReadError above `pixel_limit(max_pixels)`) and
    Pillow's image, not yet decoded; None for a TIFF that only tifffile reads."""
    start = fp.read(32)
    fp.seek(0)
    try:
        img = Image.open(fp, formats=PILLOW_FORMATS)
    except Image.UnidentifiedImageError:
        if start[:4] not in _TIFF_MAGIC:
            raise
        img = None
    if img is None:
        fp.seek(0)
        yield _tiff_header(fp, name, max_pixels), None
        return
    with img:
        yield _pillow_header(img, start, name, max_pixels), img


@contextlib.contextmanager
def _reading(name: str, max_pixels: int) -> Iterator[None]:
    """Turn every failure to open or decode `name` into one ImageReadError line naming it;
    Pillow's warnings (DecompressionBombWarning: pixel_limit rules; corrupt metadata) are muted."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except ImageReadError:
        raise
    except Image.DecompressionBombError:
        raise ImageReadError(f"{name}: image too large: it declares more than the limit of {pixel_limit(max_pixels)} "
                             "pixels (a decompression bomb or an oversized input)") from None
    except FileNotFoundError:
        raise ImageReadError(f"{name}: no such file") from None
    except MemoryError:
        raise ImageReadError(f"{name}: not enough memory to decode it") from None
    except Exception as err:  # decoders raise OSError, ValueError, SyntaxError, struct.error, ...
        raise ImageReadError(f"{name}: not a readable image ({' '.join(str(err).split()) or type(err).__name__})") \
            from None


@contextlib.contextmanager
def _open_file(path: Path) -> Iterator[BinaryIO]:
    """`path` opened, ImageReadError unless a regular file (a FIFO or device would block or
    never end). Pillow gets the open file, not the name: given a name it memory-maps
    uncompressed images, and maps a TIFF turned by its orientation at the wrong size."""
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
        fp = open(path, "rb")  # closed by the with below
    except OSError as err:
        raise ImageReadError(f"{path}: cannot be read ({err.strerror})") from None
    with fp:
        yield fp


@contextlib.contextmanager
def _image_file(path: str | os.PathLike, max_pixels: int, max_bytes: int | None, *,
                checks: bool = True) -> Iterator[tuple[_Header, Image.Image | None, BinaryIO]]:
    """The header, Pillow image and open file of the image at `path`; errors as `probe_image`
    lists (only the file and pixel-count ones without `checks`)."""
    path = Path(path)
    with _open_file(path) as fp, _reading(str(path), max_pixels), _opened(fp, str(path), max_pixels) as (head, img):
        if checks:
            _check_header(head, str(path), max_bytes)
        yield head, img, fp


def _check_header(head: _Header, name: str, max_bytes: int | None, *, single_frame: bool = True) -> None:
    if max_bytes is not None and decoded_bytes(head.height, head.width) > max_bytes:
        raise ImageReadError(f"{name}: decoding its {head.width}x{head.height} pixels needs "
                             f"~{decoded_bytes(head.height, head.width) / 2**30:.2f} GiB, above the bound of "
                             f"{max_bytes / 2**30:.2f} GiB")
    if single_frame and head.frames > 1:
        raise ImageReadError(f"{name}: has {head.frames} frames (an animation or a multi-page file); "
                             "idm reads single-frame images: save the frame you want as its own file")


def _check_shape(arr: np.ndarray, head: _Header, name: str) -> np.ndarray:
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageReadError(f"{name}: image has no pixels")
    if arr.shape[:2] != head.shape:
        raise ImageReadError(f"{name}: decodes to {arr.shape[1]}x{arr.shape[0]} pixels, but its header declares "
                             f"{head.shape[1]}x{head.shape[0]}; not a consistent image")
    return arr


def probe_alpha(path: str | os.PathLike) -> bool:
    """Whether the image at `path` has transparency (an alpha band or a transparent colour),
    from its header; ImageReadError as `probe_image` for a missing, unreadable or oversized file."""
    with _image_file(path, DEFAULT_MAX_PIXELS, None, checks=False) as (head, _, _):
        return head.alpha


def probe_image(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                max_bytes: int | None = None) -> tuple[int, int]:
    """(height, width) of the image file at `path` as `read_image` returns it (turned by its
    EXIF orientation), from its header only.

    Raises ImageReadError naming the file if it is not a regular file (a FIFO or device
    would block or never end), is not a readable image, has more than one frame (animated
    GIF/PNG/WebP, multi-page TIFF: refused, not cut to the first frame), declares more than
    `pixel_limit(max_pixels)` pixels, or would need more than `max_bytes` to decode (`decoded_bytes`).
    """
    with _image_file(path, max_pixels, max_bytes) as (head, _, _):
        return head.shape


def read_image(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_bytes: int | None = None, alpha: bool = False) -> np.ndarray:
    """Read an image file as an (H, W, 3) uint8 RGB array in [0, 255] ((H, W, 4) RGBA if
    `alpha` and the file has transparency; otherwise alpha is dropped).

    Greyscale, alpha, palette, CMYK and 16-bit inputs are converted; the EXIF orientation is
    applied (the pixels as a viewer shows them); metadata that cannot be parsed is ignored.
    Raises ImageReadError naming the file for anything `probe_image` refuses (checked from
    the header, before any pixel is decoded) and for anything unreadable, zero-byte,
    truncated or smaller than 1x1.
    """
    with _image_file(path, max_pixels, max_bytes) as (head, img, fp):
        return _decode(head, img, fp, str(path), alpha)


def decode_image(data: bytes, *, name: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_bytes: int | None = None, alpha: bool = False) -> np.ndarray:
    """`read_image` for an encoded file held in memory (PNG, JPEG, WebP, ... bytes); errors
    name it `name`. The pixel count (and `max_bytes`) is checked from the header, before
    decoding; the first frame of an animation is decoded."""
    fp = io.BytesIO(data)
    with _reading(name, max_pixels), _opened(fp, name, max_pixels) as (head, img):
        _check_header(head, name, max_bytes, single_frame=False)
        return _decode(head, img, fp, name, alpha)


def _decode(head: _Header, img: Image.Image | None, fp: BinaryIO, name: str, alpha: bool) -> np.ndarray:
    """8-bit RGB(A) pixels as a viewer shows them. 16-bit colour, which Pillow reduces to 8 bits
    (keeping the high byte; wrongly for planar TIFFs), and TIFFs only tifffile reads go through
    `_samples` and `to_8_bit`, so that this is `to_8_bit(read_image_16(...))` for them."""
    if img is None or (head.depth == 16 and img.mode in ("RGB", "RGBA", "LA")):
        arr = _samples(fp, head)
        arr = to_8_bit(arr) if arr.dtype == np.uint16 else arr
        if arr.dtype != np.uint8:
            raise ImageReadError(f"{name}: not a readable image ({arr.dtype} samples)")
        return _check_shape(_orient(arr if alpha and head.alpha else arr[..., :3], head.orientation), head, name)
    img.load()
    # Pillow's TIFF reader has turned the pixels itself (and _orientation now says 1); the rest is turned here.
    return _check_shape(_orient(_to_rgb8(img, alpha), _orientation(img)), head, name)


def bit_depth(path: str | os.PathLike) -> int:
    """16 if the file stores 16 bits per channel (a PNG's IHDR, a TIFF's BitsPerSample, Pillow's
    16-bit grey modes), else 8; from the header. Pillow decodes 16-bit colour to 8 bits, so
    such files are read with `read_image_16`. ImageReadError as `probe_alpha`."""
    with _image_file(path, DEFAULT_MAX_PIXELS, None, checks=False) as (head, _, _):
        return head.depth


def read_image_16(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                  max_bytes: int | None = None) -> np.ndarray:
    """A 16-bit PNG or TIFF (see `bit_depth`) as (H, W, 3) RGB or (H, W, 4) RGBA uint16 (grey
    becomes RGB, grey + alpha RGBA), turned by its EXIF orientation like `read_image`, after
    the same header checks. ImageReadError naming the file if it cannot be decoded or is not 16-bit."""
    with _image_file(path, max_pixels, None if max_bytes is None else max_bytes // 2) as (head, _, fp):
        if head.depth != 16:
            raise ImageReadError(f"{path}: not a readable 16-bit image")
        arr = _samples(fp, head)
        if arr.dtype != np.uint16:
            raise ImageReadError(f"{path}: not a readable 16-bit image")
        return _check_shape(_orient(arr, head.orientation), head, str(path))


def _samples(fp: BinaryIO, head: _Header) -> np.ndarray:
    """The file's samples at their own depth as (H, W, 3) RGB or (H, W, 4) RGBA, as stored (not
    turned): TIFFs through tifffile (`_tiff_samples`), the rest through OpenCV (IMREAD_UNCHANGED:
    any depth, no EXIF turn of its own)."""
    import cv2  # Pillow cannot decode 16-bit colour

    fp.seek(0)
    if head.format == "TIFF":
        arr, bgr = _tiff_samples(fp)
    else:
        arr, bgr = cv2.imdecode(np.frombuffer(fp.read(), np.uint8), cv2.IMREAD_UNCHANGED), True
    if arr is None or arr.ndim not in (2, 3) or (arr.ndim == 3 and not 1 <= arr.shape[2] <= 4):
        raise ValueError(f"OpenCV/tifffile decode it to {None if arr is None else arr.shape}, not 1-4 channels")
    arr = arr if arr.ndim == 3 else arr[..., None]
    if bgr and arr.shape[2] >= 3:
        arr = arr[..., [2, 1, 0, 3][: arr.shape[2]]]  # OpenCV's BGR(A) -> RGB(A)
    if arr.shape[2] <= 2:  # grey (+ alpha) -> RGB(A)
        arr = np.concatenate([np.repeat(arr[..., :1], 3, axis=2), arr[..., 1:]], axis=2)
    return np.ascontiguousarray(arr)


def _tiff_samples(fp: BinaryIO) -> tuple[np.ndarray | None, bool]:
    """(samples of the TIFF's first page as stored, whether in BGR order). tifffile reads grey
    and RGB in every sample layout exactly (grey + alpha, planar); the rest, and compressions it
    needs the optional imagecodecs for (LZW, JPEG), go to OpenCV, on a copy whose Orientation
    tag says 1, as OpenCV versions differ on whether they turn a TIFF themselves."""
    import cv2
    import tifffile

    with tifffile.TiffFile(fp) as tif:
        page = tif.pages.first
        if page.photometric in (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.RGB):
            try:
                arr = page.asarray()
                return (np.moveaxis(arr, 0, -1) if page.axes.startswith("S") else arr), False
            except ValueError as err:
                if "imagecodecs" not in str(err):
                    raise
        tag = page.tags.get(ExifTags.Base.Orientation)
        patch = (tif.byteorder + "H", tag.valueoffset) if tag is not None and tag.dtype == 3 else None
    fp.seek(0)
    data = bytearray(fp.read())
    if patch is not None:
        struct.pack_into(patch[0], data, patch[1], 1)
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED), True


def to_8_bit(img: np.ndarray) -> np.ndarray:
    """A uint16 array scaled to uint8 (x * 255 / 65535, rounded); a few rows at a time, so that
    its uint32 working copy stays small."""
    out = np.empty(img.shape, np.uint8)
    rows = max(1, 2**20 // max(1, img[:1].size))
    for start in range(0, len(img), rows):
        wide = img[start : start + rows].astype(np.uint32)
        wide *= 255
        wide += 32767
        wide //= 65535
        out[start : start + rows] = wide
    return out


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
    """Image files directly in `folder` (by suffix, case-insensitive), sorted by name. Hidden
    files (a name starting with '.', like the `._photo.png` AppleDouble file macOS writes
    beside each file it copies) are skipped: they are not images, and one would fail the folder."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir()
                  if not p.name.startswith(".") and p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
