"""The one resize function and the LR/HR size arithmetic."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from idm.resize import check_scale, paired_sizes, resize, resize_uint8, target_size
from tests.helpers import photo


@pytest.mark.parametrize(
    "hr, scale, expected",
    [
        ((512, 512), 2, ((512, 512), (256, 256))),
        ((513, 301), 3, ((513, 300), (171, 100))),
        ((512, 510), 2.5, ((510, 510), (204, 204))),  # LR side even so that HR is whole
        ((256, 256), 12, ((252, 252), (21, 21))),
        ((74, 37), 3.7, ((74, 37), (20, 10))),
    ],
)
def test_paired_sizes_make_whole_lr(hr, scale, expected):
    assert paired_sizes(hr, scale) == expected
    (hr_h, hr_w), (lr_h, lr_w) = paired_sizes(hr, scale)
    assert hr_h == lr_h * scale and hr_w == lr_w * scale


def test_paired_sizes_without_exact_multiple_rounds():
    # 100 / 3.7: LR 27, 26, 25 give no whole HR side, so HR = round(27 * 3.7) = 100.
    assert paired_sizes((100, 37), 3.7) == ((100, 37), (27, 10))


@pytest.mark.parametrize("bad", [1, 1.0, 0.5, -2, math.nan, math.inf, "x", None])
def test_check_scale_rejects(bad):
    with pytest.raises(ValueError, match="scale must be"):
        check_scale(bad)


def test_image_too_small_for_scale():
    with pytest.raises(ValueError, match="too small for scale x12"):
        paired_sizes((8, 100), 12)


def test_target_size_rounds():
    assert target_size((10, 14), 2.5) == (25, 35)
    assert target_size((10, 14), 1.5) == (15, 21)


def test_downscale_matches_pil_bicubic():
    """Same kernel as PIL's antialiased BICUBIC (and MATLAB imresize): within rounding."""
    img = photo(96, 120)
    ours = resize_uint8(img, (32, 40)).astype(int)
    pil = np.asarray(Image.fromarray(img).resize((40, 32), Image.BICUBIC)).astype(int)
    assert np.abs(ours - pil)[2:-2, 2:-2].max() <= 1
    assert np.abs(ours - pil).mean() < 0.2


def test_upscale_matches_pil_bicubic():
    img = photo(30, 40)
    ours = resize_uint8(img, (75, 100)).astype(int)
    pil = np.asarray(Image.fromarray(img).resize((100, 75), Image.BICUBIC)).astype(int)
    assert np.abs(ours - pil)[3:-3, 3:-3].max() <= 1


def test_resize_shapes_and_identity():
    x = torch.rand(2, 3, 17, 23)
    assert resize(x, (40, 9)).shape == (2, 3, 40, 9)
    assert resize(x[0], (5, 5)).shape == (3, 5, 5)
    torch.testing.assert_close(resize(x, (17, 23)), x)
    with pytest.raises(TypeError):
        resize(x.to(torch.uint8), (4, 4))
    with pytest.raises(ValueError, match="at least 1x1"):
        resize(x, (0, 4))


def test_16_bit_arrays_keep_their_precision_through_the_model_range_and_resize():
    from idm.resize import to_model_range, to_uint16

    deep = np.array([[[0, 1, 65535], [32768, 257, 12345]]], np.uint16)
    x = to_model_range(deep)
    assert x.shape == (1, 3, 1, 2) and float(x.min()) == -1.0 and float(x.max()) == 1.0
    np.testing.assert_array_equal(to_uint16(x), deep)  # exact round trip, all 65536 levels kept
    up = resize_uint8(np.repeat(np.repeat(deep, 4, axis=0), 4, axis=1), (8, 16))
    assert up.dtype == np.uint16 and up.shape == (8, 16, 3)
    eight = resize_uint8((deep // 257).astype(np.uint8).repeat(4, 0).repeat(4, 1), (8, 16))
    assert np.abs(up.astype(int) / 257 - eight).max() <= 1  # the same filter at both depths


def test_resize_uint8_gives_a_c_contiguous_array():
    """Image libraries that take the buffer (Pillow's frombuffer, ncnn) ignore numpy strides."""
    img = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    out = resize_uint8(img, (14, 18))
    assert out.shape == (14, 18, 3) and out.flags["C_CONTIGUOUS"]
