"""Tiled inference: exact geometry, noise crops, seamless blending, memory bound."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from idm.config import MODEL_PRESETS, DiffusionConfig, SampleConfig
from idm.diffusion.loss import training_loss
from idm.diffusion.sampling import spaced_timesteps, super_resolve
from idm.diffusion.schedule import make_schedule
from idm.diffusion.targets import decode, encode
from idm.inference import tiling
from idm.inference import upscaler as methods
from idm.inference.image_norm import ImageNorm
from idm.inference.memory import (
    choose_tile,
    estimate_peak_bytes,
)
from idm.inference.tiling import (
    hr_coord,
    input_span,
    plan_axis,
    tile_starts,
    tiled_apply,
    tiled_super_resolve,
)
from idm.models import IDM
from idm.resize import resize
from tests.helpers import photo

TINY = MODEL_PRESETS["tiny"]


def _image(height: int, width: int, seed: int = 1) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(photo(height, width, seed)).permute(2, 0, 1)[None].float() / 127.5 - 1


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1]."""
    return float(10 * torch.log10(4 / ((a - b) ** 2).mean()))


@pytest.fixture(scope="module")
def trained_tiny() -> tuple[IDM, object]:
    """The tiny IDM after 30 steps on x3 patches of a test photo (residual target), ~10 s.

    An untrained net's x0 estimates hit the clip everywhere, so its output says nothing
    about how tiles agree; a few steps make it predict small, image-like residuals.
    """
    torch.manual_seed(0)
    model, schedule = IDM(TINY), make_schedule("linear", 1000)
    image, g = _image(144, 192), torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(30):
        top = torch.randint(0, 144 - 36, (4,), generator=g).tolist()
        left = torch.randint(0, 192 - 36, (4,), generator=g).tolist()
        hr = torch.cat([image[..., a:a + 36, b:b + 36] for a, b in zip(top, left)])
        lr = resize(hr, (12, 12))
        loss = training_loss(model, encode(hr, lr, "residual", 0.5), model.condition(lr, (36, 36)),
                             schedule=schedule, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), schedule


def test_tiled_diffusion_matches_untiled_within_0_05_db(trained_tiny) -> None:
    model, schedule = trained_tiny
    hr = _image(144, 192)
    lr, size, steps = resize(hr, (48, 64)).clamp(-1, 1), (144, 192), spaced_timesteps(1000, 5)

    def run(tiled: bool) -> torch.Tensor:
        g = torch.Generator().manual_seed(1)
        sample = SampleConfig(sampler="ddim", eta=0.0, temperature=1.0, tile_overlap=16, tile_context=0)
        if tiled:
            x0 = tiled_super_resolve(model, lr, size, steps, schedule=schedule, sample=sample, tile=40, generator=g)
        else:
            x0 = super_resolve(model, lr, size, steps, schedule=schedule, sample=sample, generator=g)
        return decode(x0, lr, size, "residual", 0.5)

    untiled, tiled = run(False), run(True)
    assert abs(_psnr(tiled, hr) - _psnr(untiled, hr)) <= 0.05
    assert _psnr(tiled, untiled) >= 35.0
    # No seam: the step between neighbouring columns at tile boundaries is no larger
    # than the image's typical one (a hard seam would stand out).
    edges = [s.hr0 for s in plan_axis(64, 192, 40, 16)[1:]] + [s.hr1 for s in plan_axis(64, 192, 40, 16)[:-1]]
    step = (tiled[..., 1:] - tiled[..., :-1]).abs().mean(dim=(0, 1, 2))
    assert step[[e - 1 for e in edges]].mean() <= 1.5 * step.mean()


def _one_level_idm() -> IDM:
    """An untrained IDM whose only global operations are its GroupNorm layers: one UNet
    level (no down-sampling) and no attention, so its receptive field is a few dozen HR px."""
    torch.manual_seed(0)
    return IDM(dataclasses.replace(TINY, channel_mults=(1,), attention_levels=(), mid_attention=False)).eval()


def test_image_norm_tiles_a_groupnorm_network_like_the_whole_image() -> None:
    """With the whole image's GroupNorm statistics (norm="image") and context beyond the
    receptive field, tiled sampling gives the untiled output; with each tile's own
    statistics (norm="tile") it does not. x3 from 20 x 30 px, 3 x 4 tiles. (Not x2.5:
    there some HR pixel centres fall exactly on LR pixel edges, and the encoder's
    nearest-feature lookup breaks those ties differently in floating point for a tile.)"""
    model, schedule, steps = _one_level_idm(), make_schedule("linear", 1000), spaced_timesteps(1000, 3)
    lr, size = _image(20, 30), (60, 90)
    whole = super_resolve(model, lr, size, steps, schedule=schedule, clip_x0=False,
                          sample=SampleConfig(sampler="ddim", eta=0.0, temperature=1.0),
                          generator=torch.Generator().manual_seed(2))
    out = {norm: tiled_super_resolve(model, lr, size, steps, schedule=schedule, clip_x0=False, tile=10,
                                     sample=SampleConfig(eta=0.0, temperature=1.0, tile_overlap=3, tile_context=48,
                                                         tile_norm=norm),
                                     generator=torch.Generator().manual_seed(2)) for norm in ("tile", "image")}
    assert out["image"].shape == whole.shape == (1, 3, 60, 90)
    torch.testing.assert_close(out["image"], whole, atol=2e-4, rtol=0)
    assert (out["tile"] - whole).abs().max() > 1e-2
    assert not any(n._forward_hooks for n in ImageNorm(model).norms)  # the hooks were removed


def test_diffusion_sr_tiles_with_its_tile_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    """DiffusionSR (what evaluate, the pyfunc model and `idm upscale` use) passes its
    tile_norm on when an output is over its memory bound, and rejects unknown ones."""
    model, size = _one_level_idm(), (60, 90)
    lr = ((_image(20, 30)[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
    bound = estimate_peak_bytes(model.cfg, size) - 1
    assert choose_tile(model.cfg, (20, 30), size, max_bytes=bound, overlap=2, context=16, norm="image") is not None
    seen, original = [], tiling.tiled_super_resolve
    monkeypatch.setattr(methods, "tiled_super_resolve",
                        lambda *a, **k: seen.append(k["sample"].tile_norm) or original(*a, **k))
    diffusion, sample = DiffusionConfig(timesteps=1000, clip_x0=False), SampleConfig(steps=2, temperature=1.0)
    untiled = methods.DiffusionSR(model, diffusion=diffusion, sample=sample)(lr, size)
    tiled = {norm: methods.DiffusionSR(model, diffusion=diffusion, sample=dataclasses.replace(
                 sample, max_memory_gb=bound / 2**30, tile_overlap=2, tile_context=16, tile_norm=norm))(lr, size)
             for norm in ("tile", "image")}
    assert seen == ["tile", "image"]
    difference = {norm: np.abs(out.astype(int) - untiled).max() for norm, out in tiled.items()}
    assert difference["image"] <= 1 < difference["tile"]
    with pytest.raises(ValueError, match=r"tile_norm must be one of \['tile', 'image'\], got 'batch'"):
        dataclasses.replace(sample, tile_norm="batch")


def test_image_norm_outside_run_changes_nothing() -> None:
    model = _one_level_idm()
    x, gamma = torch.randn(1, 3, 20, 20), torch.full((1,), 0.5)
    cond = model.condition(_image(10, 10), (20, 20))
    with torch.no_grad():
        before = model(x, gamma, cond)
        with ImageNorm(model) as norm:
            inside = model(x, gamma, cond)
            # one tile covering the image: run() must reproduce the plain forward
            (ran,) = norm.run([(lambda: model(x, gamma, cond), torch.ones(20, 20))])
        after = model(x, gamma, cond)
    torch.testing.assert_close(inside, before, atol=0, rtol=0)
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    torch.testing.assert_close(ran, before, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="context manager"):
        ImageNorm(model).run([(lambda: model(x, gamma, cond), torch.ones(20, 20))])


def test_image_norm_brings_the_full_model_closer_to_untiled(trained_tiny) -> None:
    """The tiny preset (three levels, attention): whole-image GroupNorm statistics make the
    tiled output agree with the untiled one far better than per-tile statistics; what is
    left comes from attention and the receptive field beyond the tile's context."""
    model, schedule = trained_tiny
    lr, size, steps = resize(_image(144, 192), (48, 64)).clamp(-1, 1), (144, 192), spaced_timesteps(1000, 3)
    whole = super_resolve(model, lr, size, steps, schedule=schedule,
                          sample=SampleConfig(sampler="ddim", eta=0.0, temperature=1.0),
                          generator=torch.Generator().manual_seed(1))
    sample = SampleConfig(eta=0.0, temperature=1.0, tile_overlap=8, tile_context=24)
    agreement = {norm: _psnr(tiled_super_resolve(model, lr, size, steps, schedule=schedule, tile=24,
                                                 sample=dataclasses.replace(sample, tile_norm=norm),
                                                 generator=torch.Generator().manual_seed(1)), whole)
                 for norm in ("tile", "image")}
    assert agreement["image"] >= agreement["tile"] + 5, agreement  # measured 41.4 vs 35.1 dB


def _local_strided_net(seed: int = 0):
    """A network with everything of the UNet but its global operations: a 3x3 conv on
    the LR image, a resize to the target size, an average over a stride-2 grid and a
    nearest up-sampling back. Its output at a pixel depends on a few LR pixels around
    it, on the phase of the stride-2 grid, and on the exact LR->HR scale."""
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)
    torch.nn.init.normal_(conv.weight, std=0.3)

    @torch.no_grad()
    def net(lr: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        coarse = F.avg_pool2d(resize(conv(lr), size), 2, ceil_mode=True)
        return F.interpolate(coarse, scale_factor=2, mode="nearest")[..., :size[0], :size[1]]

    return net


@pytest.mark.parametrize("lr_size, size", [((30, 44), (90, 132)), ((30, 44), (75, 110)), ((28, 28), (98, 98))])
def test_context_and_alignment_make_a_local_network_exact(lr_size, size) -> None:
    """x3, x2.5 and x3.5: with context beyond the receptive field and tiles aligned to the
    whole image's grids, tiling a network without global operations changes nothing."""
    net, lr = _local_strided_net(), _image(*lr_size)
    whole = net(lr, size)
    exact = tiled_apply(net, lr, size, tile=16, overlap=3, context=12, align=2)
    torch.testing.assert_close(exact, whole, atol=1e-5, rtol=0)


def test_without_context_or_alignment_tiles_differ() -> None:
    """x3 from 30 x 44 px, tiles starting at LR 3 / 5 px after context: HR 9 / 15, odd,
    so without alignment the stride-2 grid is out of phase; without context the conv
    and resize see zero / replicated padding at inner tile edges."""
    net, lr, size = _local_strided_net(), _image(30, 44), (90, 132)
    whole = net(lr, size)
    no_context = tiled_apply(net, lr, size, tile=16, overlap=3, context=0, align=2)
    no_align = tiled_apply(net, lr, size, tile=16, overlap=3, context=12, align=1)
    assert (no_context - whole).abs().max() > 1e-2
    assert (no_align - whole).abs().max() > 1e-2


@pytest.mark.parametrize("lr_len, hr_len, tile, overlap, context, align",
                         [(76, 190, 32, 8, 16, 4), (96, 192, 32, 8, 0, 4), (100, 370, 24, 8, 8, 16),
                          (97, 211, 20, 4, 4, 4), (64, 64, 16, 4, 0, 2)])
def test_input_span_covers_the_tile_and_lands_on_the_grids(lr_len, hr_len, tile, overlap, context, align) -> None:
    for span in plan_axis(lr_len, hr_len, tile, overlap):
        a0, a1 = input_span(span, lr_len, hr_len, context=context, align=align)
        slack = (span.lr1 - span.lr0) // 4
        assert max(span.lr0 - context, 0) - slack <= a0 <= max(span.lr0 - context, 0)
        assert min(span.lr1 + context, lr_len) <= a1 <= min(span.lr1 + context + slack, lr_len)
        if (a0 * hr_len) % lr_len == 0:  # an exact start is also on the UNet grid
            assert (a0 * hr_len // lr_len) % align == 0
    # x2.5 from 76 px: every even LR pixel has an exact HR position, every 8th a multiple of 4
    assert [input_span(s, 76, 190, context=16, align=4) for s in plan_axis(76, 190, 32, 8)] == \
        [(0, 48), (0, 70), (24, 76)]


def test_bad_context_or_align_raises() -> None:
    for bad in ({"context": -1}, {"context": 2.0}, {"align": 0}, {"align": True}):
        with pytest.raises(ValueError, match="context|align"):
            tiled_apply(resize, torch.rand(1, 3, 20, 20), (40, 40), tile=8, overlap=2, **bad)


def test_noise_crops_line_up_with_the_whole_image() -> None:
    lr, noise = torch.zeros(2, 3, 13, 29), torch.randn(2, 3, 41, 77)
    out = tiled_apply(lambda lr_tile, size, noise_tile: noise_tile, lr, (41, 77), tile=8, overlap=3, noise=noise)
    torch.testing.assert_close(out, noise)


def test_local_method_is_unchanged_by_tiling() -> None:
    lr, size = _image(30, 44), (75, 110)  # x2.5, non-square
    out = tiled_apply(resize, lr, size, tile=12, overlap=6)
    assert _psnr(out, resize(lr, size)) > 40


@pytest.mark.parametrize("lr_size, size", [((13, 29), (41, 77)), ((17, 17), (40, 23)), ((5, 9), (5, 9)),
                                           ((31, 20), (100, 64))])
def test_shapes_for_non_integer_scales_and_non_square_images(lr_size, size) -> None:
    out = tiled_apply(lambda lr, s: resize(lr, s), torch.rand(1, 3, *lr_size), size, tile=7, overlap=2)
    assert out.shape == (1, 3, *size)


@pytest.mark.parametrize("lr_len, hr_len, tile, overlap", [(13, 41, 8, 3), (64, 192, 40, 16), (50, 50, 50, 10),
                                                           (7, 30, 3, 2), (100, 250, 16, 0)])
def test_tiles_cover_the_grid_exactly(lr_len, hr_len, tile, overlap) -> None:
    spans = plan_axis(lr_len, hr_len, tile, overlap)
    assert spans[0].lr0 == spans[0].hr0 == 0 and spans[-1].lr1 == lr_len and spans[-1].hr1 == hr_len
    for prev, nxt in zip(spans, spans[1:]):
        assert prev.lr1 - nxt.lr0 >= overlap and nxt.lr0 > prev.lr0
        assert (nxt.hr0, prev.hr1) == (hr_coord(nxt.lr0, lr_len, hr_len), hr_coord(prev.lr1, lr_len, hr_len))
    for s in spans:
        assert s.lr1 - s.lr0 <= tile and s.weight.shape == (s.hr1 - s.hr0,) and bool((s.weight > 0).all())


def test_hr_coord_rounds_like_round_half_up() -> None:
    for lr_len, hr_len in [(13, 41), (4, 10), (7, 7)]:
        for a in range(lr_len + 1):
            assert hr_coord(a, lr_len, hr_len) == math.floor(a * hr_len / lr_len + 0.5)


@pytest.mark.parametrize("tile, overlap", [(0, 0), (-4, 0), (8, 8), (8, 9), (8, -1), (8.0, 2), (8, True)])
def test_bad_tile_sizes_raise(tile, overlap) -> None:
    with pytest.raises(ValueError, match="tile|overlap"):
        tile_starts(100, tile, overlap)


def test_fn_returning_the_wrong_size_raises() -> None:
    with pytest.raises(ValueError, match="fn returned"):
        tiled_apply(lambda lr, s: torch.zeros(1, 3, 5, 5), torch.rand(1, 3, 20, 20), (40, 40), tile=8, overlap=2)
