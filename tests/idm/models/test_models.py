"""The IDM network and its configuration: shapes at any scale, modulation, presets, errors."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from idm.config import MODEL_PRESETS, DiffusionConfig, ModelConfig
from idm.models import IDM, Condition, scale_code
from idm.models.coords import make_coord_1d, nearest_source, query_nearest
from idm.models.layers import SelfAttention

# Small enough for fast CPU tests, yet with every part: attention, 3 levels, odd sizes.
TEST_CFG = replace(MODEL_PRESETS["tiny"], encoder_channels=8, base_channels=8, norm_groups=4,
                   implicit_hidden=16, modulation_hidden=8)


@pytest.fixture(scope="module")
def model() -> IDM:
    torch.manual_seed(0)
    return IDM(TEST_CFG).eval()


@pytest.mark.parametrize("lr_size", [(10, 14), (12, 12), (7, 5)])
@pytest.mark.parametrize("scale", [1.5, 2.5, 4.0, 6.0])
def test_shapes_at_any_scale_and_aspect(model: IDM, lr_size: tuple[int, int], scale: float) -> None:
    size = (round(lr_size[0] * scale), round(lr_size[1] * scale))
    lr = torch.rand(2, 3, *lr_size) * 2 - 1
    with torch.no_grad():
        cond = model.condition(lr, size)
        eps = model(torch.randn(2, 3, *size), torch.rand(2), cond)
    assert cond.x_con.shape == (2, 3, *size)
    assert cond.size == size and len(cond) == 2
    stride = 4  # TEST_CFG's UNet halves twice; its canvas has sides rounded up to multiples of 4
    canvas = [math.ceil(n / stride) * stride for n in size]
    expected = [(2, c, canvas[0] // 2**i, canvas[1] // 2**i) for i, c in enumerate(TEST_CFG.channels)]
    assert [tuple(p.shape) for p in cond.pyramid] == expected
    assert eps.shape == (2, 3, *size)
    assert torch.isfinite(eps).all()


def test_odd_target_size_and_gradients(model: IDM) -> None:
    lr = torch.rand(1, 3, 9, 13) * 2 - 1
    model.train()
    try:
        cond = model.condition(lr, (37, 53))
        eps = model(torch.randn(1, 3, 37, 53), torch.tensor([0.5]), cond)
        eps.square().mean().backward()
    finally:
        model.eval()
    assert eps.shape == (1, 3, 37, 53)
    # Every part of the network gets a gradient: encoder, pyramid, UNet, implicit MLPs.
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    model.zero_grad(set_to_none=True)
    assert missing == []


def test_a_crop_sees_the_same_picture_as_the_whole_image() -> None:
    """Without GroupNorm and attention, IDM is a convolutional net: a crop that starts on
    the coarsest grid (a multiple of 4 HR px) gives the whole image's eps exactly wherever
    it reaches past the receptive field, whatever its size. Before the UNet ran on a
    canvas of multiples of 4, a 213 px crop's levels (213 -> 107 -> 54) drifted apart,
    and differently from the whole image's (240 -> 120 -> 60): 5e-3 here."""
    cfg = replace(TEST_CFG, attention_levels=(), mid_attention=False)
    torch.manual_seed(0)
    model = IDM(cfg).eval()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.GroupNorm):
                setattr(module, name, torch.nn.Identity())
    lr, x_t, gamma = torch.rand(1, 3, 80, 80) * 2 - 1, torch.randn(1, 3, 240, 240), torch.tensor([0.5])
    with torch.no_grad():
        whole = model(x_t, gamma, model.condition(lr, (240, 240)))
        crop = model(x_t[..., 12:225, 12:225], gamma, model.condition(lr[..., 4:75, 4:75], (213, 213)))
    # HR px 108-128 are 96 px inside the crop on every side: past the receptive field.
    torch.testing.assert_close(crop[..., 96:117, 96:117], whole[..., 108:129, 108:129], rtol=0, atol=1e-5)


@pytest.mark.parametrize("grad", [False, True])
def test_self_attention_is_softmax_attention_and_takes_the_flash_kernel_in_inference(grad: bool) -> None:
    """Only SDPA's flash kernel allowed, inference raises unless q, k, v have the layout
    that kernel needs (strided ones fall back to the math kernel's N x N maps, which made
    large outputs need tiling). Training keeps the math kernel (idm.models.layers). Both
    give plain softmax attention."""
    torch.manual_seed(0)
    layer, x = SelfAttention(16, groups=4), torch.randn(2, 16, 6, 7, requires_grad=grad)
    backends = [SDPBackend.MATH] if grad else [SDPBackend.FLASH_ATTENTION]
    with torch.set_grad_enabled(grad), sdpa_kernel(backends):
        y = layer(x)
    if grad:
        y.sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():
        q, k, v = layer.qkv(layer.norm(x)).flatten(2).chunk(3, dim=1)  # (B, C, N) each
        weights = torch.softmax(q.transpose(1, 2) @ k / 16**0.5, dim=-1)  # (B, N, N)
        expected = x + layer.out((v @ weights.transpose(1, 2)).reshape(2, 16, 6, 7))
    torch.testing.assert_close(y.detach(), expected, atol=1e-5, rtol=1e-5)


def test_scale_code_is_log_scale() -> None:
    assert scale_code((16, 16), (64, 64)) == pytest.approx(math.log(4))
    assert scale_code((10, 14), (15, 21)) == pytest.approx(math.log(1.5))
    assert scale_code((10, 10), (10, 40)) == pytest.approx(math.log(2))  # geometric mean
    assert scale_code((8, 8), (8, 8)) == 0.0


def test_modulation_weights_have_unit_norm(model: IDM) -> None:
    scales = torch.tensor([1.0, 1.1, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 30.0])
    for layer, channels in zip(model.unet.modulate, TEST_CFG.channels):
        s1, s2 = layer.mixing_weights(scales.log())
        assert s1.shape == s2.shape == (len(scales), channels)
        torch.testing.assert_close(s1**2 + s2**2, torch.ones_like(s1), atol=1e-6, rtol=0)


def test_modulation_depends_on_scale(model: IDM) -> None:
    layer = model.unet.modulate[0]
    s1_small, _ = layer.mixing_weights(torch.tensor([math.log(1.5)]))
    s1_large, _ = layer.mixing_weights(torch.tensor([math.log(12.0)]))
    assert not torch.allclose(s1_small, s1_large)


def test_forward_rejects_mismatched_condition(model: IDM) -> None:
    with torch.no_grad():
        cond = model.condition(torch.zeros(1, 3, 8, 8), (16, 16))
        with pytest.raises(ValueError, match="does not match"):
            model(torch.zeros(1, 3, 16, 17), torch.ones(1), cond)
        with pytest.raises(ValueError, match=r"noise_level must be \(B,\)"):
            model(torch.zeros(1, 3, 16, 16), torch.tensor(1.0), cond)
        with pytest.raises(ValueError, match=r"\(B, 3, h, w\)"):
            model.condition(torch.zeros(1, 1, 8, 8), (16, 16))


def test_paper_preset_size() -> None:
    cfg = MODEL_PRESETS["paper"]
    assert cfg.channels == (64, 128, 256, 512, 512)
    net = IDM(cfg)
    count = sum(p.numel() for p in net.parameters())
    # EDSR-baseline 1.22M (the paper quotes ~1.2M) + LR pyramid 3.91M + UNet 93.28M.
    assert sum(p.numel() for p in net.encoder.parameters()) == 1_222_147
    assert count == 98_413_254


def test_unet_stride_is_the_coarsest_levels_reduction() -> None:
    assert (MODEL_PRESETS["paper"].unet_stride, MODEL_PRESETS["tiny"].unet_stride) == (16, 4)
    assert replace(TEST_CFG, channel_mults=(1,), attention_levels=()).unet_stride == 1
    paper = MODEL_PRESETS["paper"]
    assert paper.canvas((33, 48)) == (48, 48) and paper.canvas((1, 16)) == (16, 16)


def test_tiny_preset_is_small() -> None:
    net = IDM(MODEL_PRESETS["tiny"])
    assert sum(p.numel() for p in net.parameters()) < 500_000
    with torch.no_grad():
        cond = net.condition(torch.zeros(1, 3, 12, 12), (48, 48))
        assert net(torch.zeros(1, 3, 48, 48), torch.ones(1), cond).shape == (1, 3, 48, 48)


@pytest.mark.parametrize("cfg", [ModelConfig(), MODEL_PRESETS["tiny"], TEST_CFG])
def test_config_round_trips_through_asdict_and_json(cfg: ModelConfig) -> None:
    assert ModelConfig(**asdict(cfg)) == cfg
    from_json = ModelConfig(**json.loads(json.dumps(asdict(cfg))))  # tuples become lists
    assert from_json == cfg and isinstance(from_json.channel_mults, tuple)
    diff = DiffusionConfig(schedule="cosine", timesteps=100)
    assert DiffusionConfig(**json.loads(json.dumps(asdict(diff)))) == diff


@pytest.mark.parametrize(("field", "value", "message"), [
    ("base_channels", 0, r"base_channels must be an integer >= 1"),
    ("encoder_channels", -4, r"encoder_channels must be an integer >= 1"),
    ("encoder_blocks", -1, r"encoder_blocks must be an integer >= 0"),
    ("res_blocks", 1.5, r"res_blocks must be an integer >= 1"),
    ("channel_mults", (), r"channel_mults must list at least one level"),
    ("channel_mults", (1, 0), r"every channel_mults entry must be an integer >= 1"),
    ("channel_mults", 4, r"channel_mults must be a sequence"),
    ("attention_levels", (5,), r"attention_levels must be level indices in \[0, 1, 2, 3, 4\]"),
    ("dropout", 1.0, r"dropout must be a number in \[0, 1\)"),
    ("dropout", -0.1, r"dropout must be a number in \[0, 1\)"),
    ("norm_groups", 48, r"norm_groups=48 must divide .* \[64, 128, 256, 512, 512\]"),
    ("mid_attention", "yes", r"mid_attention must be True or False"),
])
def test_bad_model_config_names_what_is_allowed(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{field: value})


@pytest.mark.parametrize(("field", "value", "message"), [
    ("schedule", "quadratic", r"unknown schedule 'quadratic'; expected one of \['cosine', 'linear'\]"),
    ("loss", "huber", r"unknown loss 'huber'; expected one of \['l1', 'l2'\]"),
    ("timesteps", 0, r"timesteps must be an integer >= 1"),
    ("beta_start", 0.0, r"beta_start must be a number in \(0, 1\)"),
    ("beta_end", 1.5, r"beta_end must be a number in \(0, 1\)"),
    ("beta_start", 0.5, r"beta_start must be <= beta_end"),
    ("clip_x0", 1, r"clip_x0 must be True or False"),
])
def test_bad_diffusion_config_names_what_is_allowed(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DiffusionConfig(**{field: value})


def test_unknown_config_key_fails() -> None:
    with pytest.raises(TypeError):
        ModelConfig(base_chanels=32)  # type: ignore[call-arg]


def test_make_coord_1d() -> None:
    torch.testing.assert_close(make_coord_1d(2), torch.tensor([-0.5, 0.5]))
    torch.testing.assert_close(make_coord_1d(4), torch.tensor([-0.75, -0.25, 0.25, 0.75]))


def test_nearest_source_integer_and_fractional_ratios() -> None:
    index, offset = nearest_source(2, 4)
    assert index.tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(offset, torch.tensor([-0.25, 0.25, -0.25, 0.25]))
    index, offset = nearest_source(2, 5)  # x2.5
    assert index.tolist() == [0, 0, 1, 1, 1]
    assert offset.abs().max() <= 0.5


def test_query_nearest_at_same_size_is_identity() -> None:
    feat = torch.randn(2, 5, 7, 9)
    near, geometry = query_nearest(feat, (7, 9))
    torch.testing.assert_close(near, feat)
    assert geometry.shape == (1, 4, 7, 9)
    torch.testing.assert_close(geometry[0, :2], torch.zeros(2, 7, 9))
    torch.testing.assert_close(geometry[0, 2:], torch.ones(2, 7, 9))


def test_condition_is_a_frozen_dataclass() -> None:
    cond = Condition(torch.zeros(1, 3, 4, 4), [torch.zeros(1, 8, 4, 4)], torch.zeros(1))
    with pytest.raises(AttributeError):
        cond.x_con = torch.ones(1, 3, 4, 4)  # type: ignore[misc]
