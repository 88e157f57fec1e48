"""The lean preset's pieces: windowed attention, the MLP decoder of x_con, crops and point queries."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from idm.config import MODEL_PRESETS, ConfigError, ModelConfig, TrainConfig
from idm.models import IDM
from idm.models.layers import SelfAttention
from idm.resize import resize

LEAN = replace(MODEL_PRESETS["lean"], encoder_channels=8, encoder_blocks=1, decoder_hidden=8)


def _global(attn: SelfAttention, x: torch.Tensor) -> torch.Tensor:
    """Reference: attention over exactly the given pixels, with the layer's weights."""
    b, c, h, w = x.shape
    q, k, v = attn.qkv(attn.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
    return attn.out(F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, h, w))


@torch.no_grad()
def test_windowed_attention_equals_global_when_the_map_fits_one_window() -> None:
    torch.manual_seed(0)
    windowed = SelfAttention(8, groups=2, window=6)
    x = torch.randn(2, 8, 6, 5)
    torch.testing.assert_close(windowed(x), x + _global(windowed, x))


@torch.no_grad()
def test_windowed_attention_attends_within_each_window_only() -> None:
    """Each 4x4 block (the last row/column of blocks partial) is attention over that block
    alone; changing a pixel in one block leaves every other block's output unchanged."""
    torch.manual_seed(0)
    attn = SelfAttention(8, groups=2, window=4)
    x = torch.randn(1, 8, 10, 7)
    y = attn(x)
    normed = attn.norm(x)  # GroupNorm statistics are the whole map's
    qkv = attn.qkv(normed)
    for top, left in [(0, 0), (4, 4), (8, 0), (8, 4)]:
        block = qkv[..., top : top + 4, left : left + 4]
        h, w = block.shape[-2:]
        q, k, v = block.reshape(1, 3, 8, h * w).transpose(-1, -2).unbind(1)
        ref = attn.out(F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(1, 8, h, w))
        torch.testing.assert_close(y[..., top : top + h, left : left + w], x[..., top : top + h, left : left + w] + ref)


def test_windowed_attention_cost_per_pixel_is_bounded() -> None:
    """The attention maps a windowed layer builds hold window**2 entries per pixel, whatever the size."""
    torch.manual_seed(0)
    attn = SelfAttention(4, groups=1, window=4)
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append(k.shape[-2])
        return real(q, k, v, **kwargs)

    for side in (8, 32):
        with pytest.MonkeyPatch.context() as mp, torch.no_grad():
            mp.setattr(F, "scaled_dot_product_attention", spy)
            attn(torch.randn(1, 4, side, side))
    assert seen == [16, 16]  # keys per query: the window's 4 x 4


@pytest.mark.parametrize("grad", [False, True])
def test_windowed_attention_same_in_training_and_inference(grad: bool) -> None:
    torch.manual_seed(0)
    attn = SelfAttention(8, groups=2, window=4)
    x = torch.randn(2, 8, 9, 11)
    with torch.set_grad_enabled(grad):
        y = attn(x)
    with torch.no_grad():
        torch.testing.assert_close(y, attn(x), atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_mlp_decoder_crop_and_points_equal_the_whole_grid() -> None:
    torch.manual_seed(0)
    model = IDM(LEAN).eval()
    lr = torch.rand(2, 3, 13, 11) * 2 - 1
    size = (61, 50)
    whole = model.encoder(lr, size)
    assert whole.shape == (2, 3, 61, 50)
    crop = model.encoder(lr, size, (5, 7, 30, 20))
    torch.testing.assert_close(crop, whole[..., 5:35, 7:27], atol=1e-5, rtol=1e-5)
    points = torch.stack([torch.randint(61, (2, 40)), torch.randint(50, (2, 40))], dim=-1)
    queried = model.encoder.query(lr, size, points)
    expected = torch.stack([whole[b][:, points[b, :, 0], points[b, :, 1]] for b in range(2)])
    torch.testing.assert_close(queried, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(61, 50), (13, 11), (40, 127)])
def test_mlp_decoder_in_bands_equals_the_autograd_path(size: tuple[int, int]) -> None:
    """Inference decodes x_con band by band with the first layer moved to LR; training's
    path builds the full-size features. Same numbers, for any band height and scale."""
    torch.manual_seed(0)
    model = IDM(LEAN).eval()
    for p in model.parameters():  # a trained-looking decoder: random biases and geometry weights too
        p.data.normal_(0, 0.3)
    lr = torch.rand(2, 3, 13, 11) * 2 - 1
    with torch.enable_grad():
        reference = model.encoder(lr, size).detach()
    with torch.no_grad():
        assert model.encoder(lr, size).shape == (2, 3, *size)
        torch.testing.assert_close(model.encoder(lr, size), reference, atol=1e-5, rtol=1e-5)
        feat = model.encoder.features(lr)
        for band_pixels in (1, size[1] * 3 + 1, 10**6):  # one row, three rows and a bit, all at once
            decoded = model.encoder._decode_rows(feat, size, band_pixels)
            torch.testing.assert_close(decoded, reference - resize(lr, size), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_mlp_decoder_starts_near_bicubic_and_depends_on_the_scale() -> None:
    """x_con = bicubic + an MLP correction per pixel that also sees the scale code."""
    from idm.resize import resize

    torch.manual_seed(0)
    model = IDM(LEAN).eval()
    lr = torch.rand(1, 3, 8, 8) * 2 - 1
    x2, x6 = (model.encoder(lr, (n, n)) - resize(lr, (n, n)) for n in (16, 48))
    assert not torch.allclose(x2, x2.mean())  # a per-pixel correction, not a constant
    # pixel (0, 0) at x2 and (1, 1) at x6 sit at the same LR position (0.25, 0.25): the same
    # bilinear feature and offset, so only the scale code tells them apart
    assert not torch.allclose(x2[..., 0, 0], x6[..., 1, 1], atol=1e-6)


def test_point_queries_need_the_mlp_decoder() -> None:
    model = IDM(replace(LEAN, decoder_hidden=0))
    with pytest.raises(ValueError, match="decoder_hidden"):
        model.encoder.query(torch.zeros(1, 3, 4, 4), (8, 8), torch.zeros(1, 2, 2, dtype=torch.long))


@pytest.mark.parametrize(("field", "value"), [("attention_window", -1), ("decoder_hidden", 1.5)])
def test_bad_lean_fields_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{field: value})


def test_train_config_crop_settings() -> None:
    with pytest.raises(ConfigError, match="unet_patch"):
        TrainConfig(unet_patch=32, target="residual")
    with pytest.raises(ConfigError, match="lr_patch"):
        TrainConfig(lr_patch=-1)
    assert TrainConfig(lr_patch=48, unet_patch=48, condition_points=100, target="refine").unet_patch == 48


def test_old_checkpoints_keep_their_decoder() -> None:
    """A config saved before these fields existed rebuilds with the nearest + conv decoder."""
    old = {k: v for k, v in MODEL_PRESETS["tiny"].__dict__.items() if k not in ("decoder_hidden", "attention_window")}
    cfg = ModelConfig(**old)
    assert cfg.decoder_hidden == 0 and isinstance(IDM(cfg).encoder.to_image, torch.nn.Conv2d)
