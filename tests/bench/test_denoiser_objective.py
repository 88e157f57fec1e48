"""bench.denoiser_objective's sampler wrapper and measures, on cases whose answer is known."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from bench.denoiser_objective import ClippedX0, flat_bright, scores, seed_spread
from idm.config import MODEL_PRESETS
from idm.diffusion.sampling import sample_ddim, sample_ddpm, spaced_timesteps
from idm.diffusion.schedule import make_schedule
from idm.models import IDM


def _tiny_model(prediction: str) -> IDM:
    torch.manual_seed(0)
    cfg = replace(MODEL_PRESETS["tiny"], base_channels=8, channel_mults=(1, 2), attention_levels=(), norm_groups=4,
                  prediction=prediction)
    return IDM(cfg).eval()


def test_clipped_x0_at_bound_1_is_the_samplers_own_clipping():
    model = _tiny_model("x0")
    lr = torch.rand(1, 3, 8, 8) * 2 - 1
    cond = model.condition(lr, (16, 16))
    schedule = make_schedule("linear", 100)
    steps = spaced_timesteps(100, 4)
    for sampler in (sample_ddim, sample_ddpm):
        x_t = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 3
        ours = ClippedX0(model, 1.0)
        got = sampler(ours, cond, x_t, steps, schedule=schedule, clip_x0=False,
                      generator=torch.Generator().manual_seed(2))
        want = sampler(model, cond, x_t, steps, schedule=schedule, clip_x0=True,
                       generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.last_x0, got, atol=1e-5, rtol=1e-5)  # the output before the final clamp


def test_clipped_x0_keeps_values_beyond_1_up_to_its_bound():
    model = _tiny_model("v")
    lr = torch.rand(1, 3, 8, 8) * 2 - 1
    cond = model.condition(lr, (16, 16))
    wrapped = ClippedX0(model, 5.0)
    x_t = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 10
    sample_ddim(wrapped, cond, x_t, [100, 50], schedule=make_schedule("linear", 100), clip_x0=False)
    assert wrapped.last_x0.abs().max() <= 5.0 + 1e-6
    assert wrapped.last_x0.abs().max() > 1.0


def test_flat_bright_mask():
    bright, dark = np.full((32, 32, 3), 230, np.uint8), np.full((32, 32, 3), 40, np.uint8)
    assert flat_bright(bright).all() and not flat_bright(dark).any()
    noisy = bright.copy()
    noisy[::2] = 150  # bright on average but striped: not flat
    assert not flat_bright(noisy)[8:24, 8:24].any()


def test_scores_and_seed_spread_of_known_images():
    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    hr[:20] = 230  # a flat bright half for the stain measure
    lr = hr[::4, ::4].copy()
    same = scores(hr, hr, lr, hr)
    assert same["psnr_y"] == float("inf") and same["hf_ratio"] == 1.0 and same["stain"] == 0.0
    tinted = hr.copy()
    tinted[..., 2] = np.minimum(tinted[..., 2].astype(int) + 20, 255).astype(np.uint8)  # bluer everywhere
    assert scores(tinted, hr, lr, hr)["stain"] > 5.0
    std, corr = seed_spread(hr, hr, hr)
    assert std == 0.0 and np.isnan(corr)
    shifted = hr.astype(int)
    shifted[20:] += 10  # the textured half varies between "seeds", the flat half does not
    std, corr = seed_spread(hr, np.clip(shifted, 0, 255).astype(np.uint8), hr)
    assert std > 0 and corr > 0.5
