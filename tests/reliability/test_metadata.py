"""Photo metadata never breaks reading: EXIF, XMP, ICC and text blocks, valid or corrupt, in PNG,
JPEG, WebP and TIFF at 8 and 16 bits; EXIF orientation 1-8 gives the pixels a viewer shows in
`probe_image`, `read_image`, `decode_image` and `read_image_16` alike; a header declaring more
pixels than the limit is refused before anything is decoded; hidden files in a folder are skipped."""

from __future__ import annotations

import io
import struct
import tracemalloc
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image, ImageCms, ImageFile, PngImagePlugin

from pipeline.data.datasets import copy_folder, read_all
from pipeline.data.images import (
    ImageReadError,
    bit_depth,
    decode_image,
    list_images,
    probe_alpha,
    probe_image,
    read_image,
    read_image_16,
    to_8_bit,
)
from tests.helpers import declared_size_image, exif_bytes, png_bytes
from tests.pipeline.test_cli import checkpoint  # noqa: F401 -- an untrained tiny model, module-scoped

pytestmark = pytest.mark.reliability

H, W = 5, 7  # not square: a turn by 90 degrees shows in the shape
_R, _C = np.mgrid[0:H, 0:W]
STORED8 = np.stack([_R * 40 + 10, _C * 30 + 5, (_R * W + _C) * 7], axis=-1).astype(np.uint8)  # every pixel distinct
STORED16 = (np.arange(H * W * 4, dtype=np.int64).reshape(H, W, 4) * 467 + 1000).astype(np.uint16)


def shown(stored: np.ndarray, orientation: int) -> np.ndarray:
    """`stored` as a viewer shows it, from the EXIF definition (where the stored 0th row and
    column go), independently of the module's implementation."""
    h, w = stored.shape[:2]
    r, c = np.indices((w, h) if orientation >= 5 else (h, w))  # display row, column
    source = {1: (r, c), 2: (r, w - 1 - c), 3: (h - 1 - r, w - 1 - c), 4: (h - 1 - r, c),
              5: (c, r), 6: (h - 1 - c, r), 7: (h - 1 - c, w - 1 - r), 8: (c, w - 1 - r)}[orientation]
    return stored[source]


@dataclass(frozen=True)
class Variant:
    name: str
    suffix: str
    write: Callable[[Path], None]
    stored: np.ndarray | None  # RGB(A) as stored; None: Pillow's own decode of the (lossy) file
    orientation: int  # the one the readers must apply


def _rgb(grey: np.ndarray) -> np.ndarray:
    """Grey (H, W) or grey + alpha (H, W, 2) as the RGB(A) the readers return."""
    grey = grey if grey.ndim == 3 else grey[..., None]
    return np.concatenate([np.repeat(grey[..., :1], 3, axis=2), grey[..., 1:]], axis=2)


def _pillow(arr: np.ndarray, **save: object) -> Callable[[Path], None]:
    return lambda path: Image.fromarray(arr).save(path, **save)


def _bytes(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


def _tiff(arr: np.ndarray, orientation: int, **options: object) -> Callable[[Path], None]:
    if arr.ndim == 3 and "photometric" not in options:
        options["photometric"] = "rgb" if arr.shape[2] >= 3 else "minisblack"
    if arr.ndim == 3 and arr.shape[2] in (2, 4):
        options["extrasamples"] = ["unassalpha"]
    return lambda path: tifffile.imwrite(path, arr, extratags=[(274, "H", 1, orientation, True)], **options)


def _text_info(*chunks: tuple[str, str, str]) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    for kind, key, value in chunks:
        {"tEXt": info.add_text, "zTXt": lambda k, v: info.add_text(k, v, zip=True), "iTXt": info.add_itxt}[kind](key, value)
    return info


def _xmp(orientation: int) -> str:
    return ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            f'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="{orientation}"/>'
            "</rdf:RDF></x:xmpmeta>")


def _raw_profile(exif: bytes) -> str:  # ImageMagick's way of carrying EXIF in a PNG text chunk
    return f"\nexif\n{len(exif):8}\n{exif.hex()}\n"


SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
JPEG_EXIF = b"Exif\x00\x00"
# IFD0 with one entry, Orientation (274) of type ASCII holding "6": the wrong type for the tag
ASCII_ORIENTATION = b"MM\x00*\x00\x00\x00\x08\x00\x01" + struct.pack(">HHI4s", 274, 2, 2, b"6\x00\x00\x00") + bytes(4)
GREY16, GA16, RGB16, RGBA16 = STORED16[..., 0], STORED16[..., :2], STORED16[..., :3], STORED16
PALETTED = Image.fromarray(STORED8).convert("P")


def _variants() -> list[Variant]:
    v = [
        Variant("png-exif-make-only", ".png", _pillow(STORED8, exif=exif_bytes(Make="Apple")), STORED8, 1),
        Variant("png-exif-many-tags", ".png", _pillow(STORED8, exif=exif_bytes(
            Make="Canon", Model="EOS", Software="editor 1.0", DateTime="2024:01:02 03:04:05", XResolution=300.0,
            Orientation=3)), STORED8, 3),
        Variant("png-exif-after-image-data-is-not-read", ".png",  # PNG puts eXIf before IDAT; a header read
                _bytes(png_bytes(STORED8, after_idat=((b"eXIf", exif_bytes(Orientation=6)),))), STORED8, 1),
        Variant("png-exif-corrupt", ".png", _bytes(png_bytes(STORED8, before_idat=((b"eXIf", b"\xffgarbage" * 9),))),
                STORED8, 1),
        Variant("png-exif-cut-after-its-ifd-count", ".png",
                _bytes(png_bytes(STORED8, before_idat=((b"eXIf", exif_bytes(Make="A", Orientation=6)[:10]),))), STORED8, 1),
        Variant("png-exif-ifd-offset-past-the-end", ".png",
                _bytes(png_bytes(STORED8, before_idat=((b"eXIf", b"MM\x00*\x7f\xff\xff\xff"),))), STORED8, 1),
        Variant("png-orientation-0", ".png", _pillow(STORED8, exif=exif_bytes(Orientation=0)), STORED8, 1),
        Variant("png-orientation-9", ".png", _pillow(STORED8, exif=exif_bytes(Orientation=9)), STORED8, 1),
        Variant("png-orientation-as-text", ".png", _pillow(STORED8, exif=ASCII_ORIENTATION), STORED8, 1),
        Variant("png-xmp-orientation", ".png", _pillow(STORED8, pnginfo=_text_info(("iTXt", "XML:com.adobe.xmp",
                                                                                    _xmp(6)))), STORED8, 6),
        Variant("png-raw-profile-exif", ".png", _pillow(STORED8, pnginfo=_text_info(
            ("zTXt", "Raw profile type exif", _raw_profile(exif_bytes(Orientation=8))))), STORED8, 8),
        Variant("png-raw-profile-exif-corrupt", ".png", _pillow(STORED8, pnginfo=_text_info(
            ("tEXt", "Raw profile type exif", "\nexif\n 5\nzz-not-hex\n"))), STORED8, 1),
        Variant("png-icc-and-text", ".png", _pillow(STORED8, icc_profile=SRGB, pnginfo=_text_info(
            ("tEXt", "Comment", "hello"), ("zTXt", "Description", "x" * 500), ("iTXt", "Title", "caf\u00e9"))),
                STORED8, 1),
        Variant("png-grey-orientation-5", ".png", _pillow(STORED8[..., 0], exif=exif_bytes(Orientation=5)),
                _rgb(STORED8[..., 0]), 5),
        Variant("png-palette-orientation-6", ".png", lambda p: PALETTED.save(p, exif=exif_bytes(Orientation=6)),
                np.asarray(PALETTED.convert("RGB")), 6),
        Variant("png-rgba-orientation-7", ".png", _pillow(np.dstack([STORED8, STORED8[..., 1]]),
                                                          exif=exif_bytes(Orientation=7)),
                np.dstack([STORED8, STORED8[..., 1]]), 7),
        Variant("jpeg-exif-corrupt", ".jpg", _pillow(STORED8, quality=95, exif=JPEG_EXIF + b"\x00\x01junk" * 5), None, 1),
        Variant("jpeg-exif-make-only", ".jpg", _pillow(STORED8, quality=95, exif=JPEG_EXIF + exif_bytes(Make="A")),
                None, 1),
        Variant("jpeg-exif-xmp-icc", ".jpg", _pillow(STORED8, quality=95, icc_profile=SRGB, xmp=_xmp(3).encode(),
                                                     exif=JPEG_EXIF + exif_bytes(Orientation=3, Model="X")), None, 3),
        Variant("tiff-rgba8-orientation-6", ".tif", _tiff(np.dstack([STORED8, STORED8[..., 2]]), 6),
                np.dstack([STORED8, STORED8[..., 2]]), 6),
        Variant("webp-lossy-exif-corrupt", ".webp", _pillow(STORED8, quality=90, exif=b"\x00junk" * 4), None, 1),
    ]
    for o in range(1, 9):
        exif = exif_bytes(Orientation=o, Make="Phone")
        v += [Variant(f"png-orientation-{o}", ".png", _pillow(STORED8, exif=exif), STORED8, o),
              Variant(f"jpeg-orientation-{o}", ".jpg", _pillow(STORED8, quality=95, exif=JPEG_EXIF + exif), None, o),
              Variant(f"webp-orientation-{o}", ".webp", _pillow(STORED8, lossless=True, exif=exif), STORED8, o),
              Variant(f"tiff-rgb8-orientation-{o}", ".tif", _tiff(STORED8, o), STORED8, o),
              # uncompressed single-band: what Pillow memory-maps when it is given a file name
              Variant(f"tiff-grey8-orientation-{o}", ".tif", _tiff(STORED8[..., 0], o), _rgb(STORED8[..., 0]), o),
              Variant(f"tiff-grey8-deflate-orientation-{o}", ".tif", _tiff(STORED8[..., 0], o, compression="zlib"),
                      _rgb(STORED8[..., 0]), o),
              Variant(f"tiff16-lzw-grey-orientation-{o}", ".tif",  # LZW: tifffile needs imagecodecs, OpenCV reads it
                      _pillow(GREY16, compression="tiff_lzw", exif=exif_bytes(Orientation=o)), _rgb(GREY16), o)]
        for name, arr in (("grey", GREY16), ("grey-alpha", GA16), ("rgb", RGB16), ("rgba", RGBA16)):
            v.append(Variant(f"tiff16-{name}-orientation-{o}", ".tif", _tiff(arr, o), _rgb(arr) if arr.ndim == 2
                             or arr.shape[2] == 2 else arr, o))
        v.append(Variant(f"tiff16-rgb-planar-orientation-{o}", ".tif",
                         _tiff(np.moveaxis(RGB16, -1, 0), o, photometric="rgb", planarconfig="separate"), RGB16, o))
    for o in (1, 6, 7):
        for name, arr in (("grey", GREY16), ("grey-alpha", GA16), ("rgb", RGB16), ("rgba", RGBA16)):
            data = png_bytes(arr, before_idat=((b"eXIf", exif_bytes(Orientation=o, Make="Scanner")),))
            v.append(Variant(f"png16-{name}-orientation-{o}", ".png", _bytes(data),
                             _rgb(arr) if arr.ndim == 2 or arr.shape[2] == 2 else arr, o))
    return v


VARIANTS = _variants()


def _stored(variant: Variant, path: Path) -> np.ndarray:
    if variant.stored is not None:
        return variant.stored
    with Image.open(path) as img:  # lossy: the decoder's own pixels, as stored (Pillow turns no JPEG or WebP)
        return np.asarray(img.convert("RGB"))


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.name for v in VARIANTS])
def test_every_reader_gives_the_pixels_a_viewer_shows(tmp_path, variant):
    path = tmp_path / f"image{variant.suffix}"
    variant.write(path)
    want = shown(_stored(variant, path), variant.orientation)
    deep = want.dtype == np.uint16
    want8 = to_8_bit(want) if deep else want
    assert probe_image(path) == want.shape[:2]
    assert bit_depth(path) == (16 if deep else 8)
    assert probe_alpha(path) == (want.shape[2] == 4)
    got = read_image(path, alpha=True)
    assert got.dtype == np.uint8 and got.shape == want8.shape
    assert np.array_equal(got, want8)  # 16 bits: exactly to_8_bit(read_image_16(path))
    assert np.array_equal(read_image(path), got[..., :3])
    assert np.array_equal(decode_image(path.read_bytes(), alpha=True), got)
    if deep:
        np.testing.assert_array_equal(read_image_16(path), want)


def test_the_readers_agree_with_pillow_exif_transpose():
    """A second oracle: Pillow's own ImageOps.exif_transpose on the same JPEGs."""
    from PIL import ImageOps

    for o in range(1, 9):
        buf = io.BytesIO()
        Image.fromarray(STORED8).save(buf, "JPEG", quality=95, exif=JPEG_EXIF + exif_bytes(Orientation=o))
        with Image.open(io.BytesIO(buf.getvalue())) as img:
            pillow = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
        assert np.array_equal(decode_image(buf.getvalue()), pillow), o


def _run(args: list[str]) -> int:
    from pipeline.cli import main

    try:
        main(args)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


@pytest.mark.parametrize("name", ["png-exif-make-only", "png-orientation-6", "jpeg-exif-corrupt",
                                  "tiff16-grey-alpha-orientation-8", "png16-rgb-orientation-7"])
def test_idm_upscale_takes_photo_metadata(tmp_path, checkpoint, capsys, name):  # noqa: F811
    variant = next(v for v in VARIANTS if v.name == name)
    path = tmp_path / f"in{variant.suffix}"
    variant.write(path)
    shape = shown(_stored(variant, path), variant.orientation).shape
    out = tmp_path / "out"
    code = _run(["upscale", str(path), "--scale", "2", "--out", str(out), "--model", str(checkpoint), "--steps", "1"])
    assert code == 0, capsys.readouterr().err
    (made,) = out.iterdir()
    assert bit_depth(made) == bit_depth(path)  # a 16-bit input gives a 16-bit PNG
    result = read_image_16(made) if bit_depth(path) == 16 else read_image(made, alpha=True)
    assert result.shape == (2 * shape[0], 2 * shape[1], shape[2]), made  # turned, then enlarged; alpha kept


def test_a_folder_with_metadata_and_hidden_files_is_prepared(tmp_path):
    """The prepare stage's path (copy_folder, read_all): AppleDouble `._x.png` files and other
    dot-files beside the images are skipped, the images read with their metadata applied."""
    src = tmp_path / "raw"
    src.mkdir()
    for name in ("png-exif-make-only", "jpeg-orientation-6", "tiff16-rgba-orientation-5"):
        variant = next(v for v in VARIANTS if v.name == name)
        variant.write(src / f"{name}{variant.suffix}")
    (src / "._png-exif-make-only.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    (src / ".hidden.jpg").write_bytes(b"not an image")
    (src / ".thumbs").mkdir()
    assert [p.name for p in list_images(src)] == ["jpeg-orientation-6.jpg", "png-exif-make-only.png",
                                                  "tiff16-rgba-orientation-5.tif"]
    images = read_all(copy_folder(src, tmp_path / "copy"))
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == sorted(p.name for p in list_images(src))
    assert {k: v.shape for k, v in images.items()} == {"jpeg-orientation-6": (W, H, 3), "png-exif-make-only": (H, W, 3),
                                                      "tiff16-rgba-orientation-5": (W, H, 3)}
    assert np.array_equal(images["png-exif-make-only"], STORED8)


DECLARED = [("png", 8, 3), ("png", 16, 3), ("png", 16, 2), ("tiff", 8, 3), ("tiff", 16, 1), ("tiff", 16, 2),
            ("bmp", 8, 3), ("gif", 8, 3), ("jpeg", 8, 3)]
LIMITS = [  # (width = height, reader limits, what the one-line error says)
    (13000, {"max_pixels": 10**8}, r"image too large: it declares 13000x13000 pixels, above the limit of 100000000"),
    (13000, {"max_bytes": 2**31}, r"decoding its 13000x13000 pixels needs ~3\.78 GiB, above the bound of"),
    # above Pillow's own refusal threshold (2 x Image.MAX_IMAGE_PIXELS), below DEFAULT_MAX_PIXELS
    (13500, {}, r"image too large: it declares (13500x13500 pixels, above|more than) the limit of 178956970"),
    (17000, {}, r"image too large: it declares (17000x17000 pixels, above|more than) the limit of 178956970"),
]


def _no_decoding(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every pixel decoder record its call (and fail), so a test sees any decode."""
    calls: list[str] = []

    def refuse(what: str) -> Callable:
        def decode(*args: object, **kwargs: object) -> None:
            calls.append(what)
            raise AssertionError(f"{what} called")
        return decode

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse("Pillow load"))
    monkeypatch.setattr(cv2, "imdecode", refuse("cv2.imdecode"))
    monkeypatch.setattr(tifffile.TiffPage, "asarray", refuse("tifffile asarray"))
    return calls


@pytest.mark.parametrize("fmt,depth,samples", DECLARED, ids=[f"{f}{d}x{s}" for f, d, s in DECLARED])
@pytest.mark.parametrize("side,limits,message", LIMITS, ids=["13000-max_pixels", "13000-max_bytes", "13500", "17000"])
def test_a_declared_size_over_the_limit_is_refused_from_the_header(tmp_path, monkeypatch, fmt, depth, samples, side,
                                                                  limits, message):
    data = declared_size_image(fmt, side, side, depth=depth, samples=samples)
    path = tmp_path / f"big.{fmt}"
    path.write_bytes(data)
    assert len(data) < 200
    calls = _no_decoding(monkeypatch)
    readers = [lambda: probe_image(path, **limits), lambda: read_image(path, **limits),
               lambda: read_image_16(path, **limits), lambda: decode_image(data, name=str(path), **limits)]
    if not limits:
        readers += [lambda: probe_alpha(path), lambda: bit_depth(path)]
    for read in readers:
        tracemalloc.start()
        try:
            with pytest.raises(ImageReadError, match=message) as err:
                read()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)
        assert peak < 4 * 2**20, f"{peak / 2**20:.1f} MiB traced"
    assert calls == []


def test_a_size_within_the_limits_is_read_without_pillow_warnings(tmp_path):
    """12000 x 12000 (above Image.MAX_IMAGE_PIXELS, where Pillow warns) is within the limits:
    probed, no DecompressionBombWarning reaches the caller."""
    path = tmp_path / "wide.png"
    path.write_bytes(declared_size_image("png", 12000, 12000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert probe_image(path) == (12000, 12000)
        assert probe_alpha(path) is False and bit_depth(path) == 8
