"""The grid-free regression upscaler: feature bodies, LIIF local-ensemble decoder, point queries."""

from __future__ import annotations

import pytest
import torch

from idm.models.blocks import EDSRFeatures, SPANBlock, SPANFeatures
from idm.models.encoder import LREncoder
from idm.models.ensemble import EnsembleDecoder, ImplicitUpscaler, ensemble_taps
from idm.resize import resize


def test_ensemble_taps_match_linear_interpolation_at_a_non_integer_scale() -> None:
    index, offset, weight = ensemble_taps(4, 10, torch.zeros(()))
    assert index.shape == offset.shape == weight.shape == (2, 10)
    torch.testing.assert_close(weight.sum(0), torch.ones(10))
    src = torch.tensor([0.0, 1.0, 4.0, 9.0])
    blended = (weight * src[index]).sum(0)
    expected = torch.nn.functional.interpolate(src[None, None], size=10, mode="linear", align_corners=False)[0, 0]
    torch.testing.assert_close(blended, expected)
    # pixel 0's centre is at 0.5 * 0.4 - 0.5 = -0.3 source px: both taps are the edge pixel
    assert index[:, 0].tolist() == [0, 0]
    torch.testing.assert_close(offset[:, 0], torch.tensor([-0.3, -0.3]))


@pytest.mark.parametrize("body", [EDSRFeatures(8, 1), SPANFeatures(8, 2)])
def test_feature_bodies_keep_the_lr_size(body: torch.nn.Module) -> None:
    assert body(torch.randn(2, 3, 7, 5)).shape == (2, 8, 7, 5)


def test_span_block_is_the_identity_when_its_last_conv_outputs_zero() -> None:
    block = SPANBlock(4)
    torch.nn.init.zeros_(block.c3.weight)
    torch.nn.init.zeros_(block.c3.bias)
    x = torch.randn(1, 4, 5, 5)
    torch.testing.assert_close(block(x), x)  # sigmoid(0) - 0.5 = 0


def test_edsr_features_equal_the_shipped_encoders_features() -> None:
    torch.manual_seed(0)
    enc = LREncoder(channels=8, blocks=2, decoder_hidden=8)
    body = EDSRFeatures(8, 2)
    body.load_state_dict({k: v for k, v in enc.state_dict().items() if k.startswith(("head", "body"))})
    lr = torch.randn(1, 3, 6, 6)
    torch.testing.assert_close(body(lr), enc.features(lr))


@pytest.mark.parametrize("size", [(17, 13), (21, 21), (6, 6)])  # x2.83 x 2.6, x3.5, x1
def test_upscaler_shapes_and_point_queries_equal_the_whole_grid(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = ImplicitUpscaler(EDSRFeatures(8, 1), hidden=8)
    lr = torch.rand(2, 3, 6, 5) * 2 - 1
    with torch.no_grad():
        whole = model(lr, size)
        points = torch.stack([torch.randint(size[0], (2, 30)), torch.randint(size[1], (2, 30))], dim=-1)
        picked = model.query(lr, size, points)
    assert whole.shape == (2, 3, *size)
    expected = torch.stack([whole[b, :, points[b, :, 0], points[b, :, 1]] for b in range(2)])
    torch.testing.assert_close(picked, expected, rtol=1e-5, atol=1e-5)
    # bands of a few pixels give the same grid as one band
    torch.testing.assert_close(model.decoder.decode(model.features(lr), size, band_pixels=20),
                               whole - resize(lr, size), rtol=1e-5, atol=1e-5)


def _largest_step(row: torch.Tensor) -> float:
    return float(row.diff().abs().max() / (row.max() - row.min()))


def test_decoder_output_is_continuous_across_lr_pixel_edges() -> None:
    """Sampled 1000 times per LR pixel, a continuous output moves by a tiny fraction of its
    range between neighbours; the shipped decoder, which sees the offset in the nearest LR
    pixel, jumps at the edges."""
    torch.manual_seed(0)
    feat = torch.randn(1, 4, 1, 3)
    decoder = EnsembleDecoder(4, 16)
    shipped = LREncoder(channels=4, blocks=0, decoder_hidden=16)
    with torch.no_grad():
        ours = decoder.decode(feat, (1, 3000))[0, 0, 0]
        theirs = shipped(torch.zeros(1, 3, 1, 3), (1, 3000), feat=feat)[0, 0, 0]
    assert _largest_step(ours) < 0.01
    assert _largest_step(theirs) > 0.02


def test_upscaler_trains_on_points() -> None:
    torch.manual_seed(0)
    model = ImplicitUpscaler(SPANFeatures(8, 1), hidden=8)
    lr, points = torch.rand(1, 3, 4, 4), torch.tensor([[[0, 0], [9, 9], [5, 3]]])
    model.query(lr, (10, 10), points).abs().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bad_sizes_name_the_allowed_values() -> None:
    with pytest.raises(ValueError, match="channels and hidden must be >= 1"):
        EnsembleDecoder(0, 8)
    with pytest.raises(ValueError, match="channels and blocks must be >= 1"):
        SPANFeatures(8, 0)
