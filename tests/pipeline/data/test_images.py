"""Image reading: every mode becomes 8-bit RGB, every bad file a one-line error naming it."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.data.images import ImageReadError, list_images, read_image, write_image
from tests.helpers import photo


def test_modes_become_rgb8(image_folder):
    for path in list_images(image_folder):
        img = read_image(path)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, path.name


def test_conversion_values(tmp_path):
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(grey).save(tmp_path / "l.png")
    assert (read_image(tmp_path / "l.png") == grey[..., None]).all()
    sixteen = (grey.astype(np.uint16) * 257)
    Image.fromarray(sixteen).save(tmp_path / "i16.png")
    assert (read_image(tmp_path / "i16.png") == grey[..., None]).all(), "16-bit rescaled, not clipped"
    rgba = np.dstack([photo(8, 8), np.full((8, 8), 7, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert (read_image(tmp_path / "rgba.png") == rgba[..., :3]).all()
    Image.fromarray(photo(8, 8)).convert("CMYK").save(tmp_path / "cmyk.jpg")
    assert read_image(tmp_path / "cmyk.jpg").shape == (8, 8, 3)


def test_palette_round_trip(tmp_path):
    pal = Image.fromarray(photo(20, 20)).convert("P")
    pal.save(tmp_path / "p.png")
    assert (read_image(tmp_path / "p.png") == np.asarray(pal.convert("RGB"))).all()


@pytest.mark.parametrize(
    "content",
    [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 10],
    ids=["zero-byte", "text", "bad-png"],
)
def test_unreadable_files_name_the_file(tmp_path, content):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_truncated_png(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(photo(64, 64)).save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:300])
    with pytest.raises(ImageReadError, match="cut.png: not a readable image"):
        read_image(cut)


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_decompression_bomb_refused_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(50_000, 50_000))
    with pytest.raises(ImageReadError, match="bomb.png: image too large"):
        read_image(bomb)
    small_limit = tmp_path / "big.png"
    small_limit.write_bytes(_png_header_only(5_000, 4_000))
    with pytest.raises(ImageReadError, match="declares 5000x4000 pixels, above the limit of 1000000"):
        read_image(small_limit, max_pixels=1_000_000)


def test_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "nope.png")


def test_one_pixel_image_reads(tmp_path):
    Image.new("RGB", (1, 1), (1, 2, 3)).save(tmp_path / "one.png")
    assert read_image(tmp_path / "one.png").tolist() == [[[1, 2, 3]]]


def test_write_image_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "out" / "a.png"
    write_image(path, photo(10, 12))
    assert (read_image(path) == photo(10, 12)).all()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        write_image(path, np.zeros((4, 4, 3), np.uint8))
    assert (read_image(path) == photo(10, 12)).all(), "previous file intact"
    assert [p.name for p in path.parent.iterdir()] == ["a.png"], "no temp file left"


def test_alpha_is_kept_on_request_and_formats_follow_the_suffix(tmp_path):
    rgba = np.dstack([photo(6, 7), np.arange(42, dtype=np.uint8).reshape(6, 7)])
    Image.fromarray(rgba).save(tmp_path / "a.png")
    assert read_image(tmp_path / "a.png").shape == (6, 7, 3)
    assert np.array_equal(read_image(tmp_path / "a.png", alpha=True), rgba)
    Image.fromarray(photo(6, 7)).save(tmp_path / "rgb.png")
    assert read_image(tmp_path / "rgb.png", alpha=True).shape == (6, 7, 3)  # no alpha to keep
    for name, fmt in (("o.png", "PNG"), ("o.jpg", "JPEG"), ("o.JPEG", "JPEG"), ("o.webp", "WEBP")):
        write_image(tmp_path / name, photo(6, 7))
        assert Image.open(tmp_path / name).format == fmt
    write_image(tmp_path / "alpha.webp", rgba)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "alpha.webp"))[..., 3], rgba[..., 3])  # alpha is lossless
    with pytest.raises(ValueError, match="JPEG has no alpha channel"):
        write_image(tmp_path / "alpha.jpg", rgba)
    with pytest.raises(ValueError, match=r"cannot write \.bmp"):
        write_image(tmp_path / "o.bmp", photo(6, 7))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "alpha.webp", "o.JPEG", "o.jpg", "o.png", "o.webp",
                                                          "rgb.png"]


def test_16_bit_colour_is_read_and_written_at_16_bits(tmp_path):
    import cv2
    import tifffile

    from pipeline.data.images import bit_depth, read_image_16, to_8_bit

    deep = ((photo(6, 7).astype(np.int64) * 257 + np.arange(42).reshape(6, 7, 1)) % 65536).astype(np.uint16)
    rgba = np.dstack([deep, np.full((6, 7), 40000, np.uint16)])
    cv2.imwrite(str(tmp_path / "rgb48.png"), deep[..., ::-1])  # OpenCV writes BGR
    cv2.imwrite(str(tmp_path / "rgba64.png"), rgba[..., [2, 1, 0, 3]])
    tifffile.imwrite(tmp_path / "rgb48.tif", deep)
    Image.fromarray(photo(6, 7)).save(tmp_path / "rgb24.png")
    Image.fromarray(deep[..., 0]).save(tmp_path / "grey16.png")  # Pillow's I;16
    assert [bit_depth(tmp_path / n) for n in ("rgb48.png", "rgba64.png", "rgb48.tif", "rgb24.png", "grey16.png")] \
        == [16, 16, 16, 8, 16]
    np.testing.assert_array_equal(read_image_16(tmp_path / "rgb48.png"), deep)
    np.testing.assert_array_equal(read_image_16(tmp_path / "rgb48.tif"), deep)
    np.testing.assert_array_equal(read_image_16(tmp_path / "rgba64.png"), rgba)
    np.testing.assert_array_equal(read_image_16(tmp_path / "grey16.png"), np.repeat(deep[..., :1], 3, axis=2))
    assert read_image(tmp_path / "rgb48.png").dtype == np.uint8  # Pillow's 8-bit view, as before
    with pytest.raises(ImageReadError, match="rgb24.png: not a readable 16-bit image"):
        read_image_16(tmp_path / "rgb24.png")

    write_image(tmp_path / "out.png", rgba)
    np.testing.assert_array_equal(read_image_16(tmp_path / "out.png"), rgba)
    with pytest.raises(ValueError, match="16-bit images are written as PNG only"):
        write_image(tmp_path / "out.jpg", deep)
    assert to_8_bit(np.array([0, 128, 257, 65535], np.uint16)).tolist() == [0, 0, 1, 255]


def test_list_images_skips_hidden_files(tmp_path):
    """macOS writes an AppleDouble `._name` beside each copied file; no dot-file is an image."""
    for name in ("b.png", "A.JPG", "._b.png", ".hidden.png", "notes.txt"):
        Image.fromarray(photo(4, 4)).save(tmp_path / name, format="PNG") if name.endswith("png") else \
            (tmp_path / name).write_bytes(b"\x00\x05\x16\x07 Mac OS X")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["A.JPG", "b.png"]


def test_32_bit_and_float_grey_are_rescaled_not_clipped(tmp_path):
    from pipeline.data.images import to_8_bit

    wide = np.array([[0, 257, 32768, 65535, 70000, -5]], np.int32)
    Image.fromarray(wide).save(tmp_path / "i32.tif")
    assert read_image(tmp_path / "i32.tif")[..., 0].tolist() == [[0, 1, 128, 255, 255, 0]]
    low = np.array([[0, 7, 255]], np.int32)  # all <= 255: already 8-bit levels
    Image.fromarray(low).save(tmp_path / "low.tif")
    assert read_image(tmp_path / "low.tif")[..., 0].tolist() == [[0, 7, 255]]
    unit = np.array([[0.0, 0.25, 0.5, 1.0]], np.float32)  # floats in [0, 1]
    Image.fromarray(unit).save(tmp_path / "f.tif")
    assert read_image(tmp_path / "f.tif")[..., 0].tolist() == [[0, 64, 128, 255]]
    assert to_8_bit(np.arange(65536, dtype=np.uint16).reshape(256, 256)).ravel().tolist() == \
        np.round(np.arange(65536) / 257).astype(int).tolist()


def test_decoding_holds_at_most_decoded_bytes(tmp_path):
    """numpy's share of the decode of a 16-bit grey image turned by its orientation (its
    conversion is the most memory-hungry path) stays within DECODE_BYTES_PER_PIXEL minus
    Pillow's own 4-byte buffer, which tracemalloc does not see."""
    import tracemalloc

    from pipeline.data.images import DECODE_BYTES_PER_PIXEL
    from tests.helpers import exif_bytes

    for mode, arr in (("I;16", (np.arange(512 * 384) % 65536).astype(np.uint16).reshape(384, 512)),
                      ("I", (np.arange(512 * 384) * 3).astype(np.int32).reshape(384, 512)),
                      ("F", np.linspace(0, 1, 512 * 384, dtype=np.float32).reshape(384, 512))):
        path = tmp_path / f"{mode[0]}.tif"
        Image.fromarray(arr).save(path, exif=exif_bytes(Orientation=6))
        assert Image.open(path).mode == mode
        tracemalloc.start()
        try:
            out = read_image(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert out.shape == (512, 384, 3)
        assert peak <= (DECODE_BYTES_PER_PIXEL - 4) * arr.size, f"{mode}: {peak / arr.size:.1f} bytes a pixel"


@pytest.mark.parametrize("magic", [b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n", b"P6\n8 8\n255\n" + bytes(192),
                                   b"\x00\x00\x01\x00\x01\x00\x08\x08\x00\x00\x01\x00\x18\x00"])  # EPS, PPM, ICO
def test_a_file_of_another_format_under_an_image_name_is_refused(tmp_path, magic):
    """Pillow chooses a decoder by content: only the project's formats may be used (no Ghostscript for EPS)."""
    path = tmp_path / "photo.png"
    path.write_bytes(magic)
    with pytest.raises(ImageReadError, match="photo.png"):
        read_image(path)
