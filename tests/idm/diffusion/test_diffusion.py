"""Noise schedules, the training loss and the samplers."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Iterator

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from idm.config import MODEL_PRESETS, SCHEDULES, SampleConfig
from idm.diffusion.loss import training_loss
from idm.diffusion.noise import noise_levels
from idm.diffusion.prediction import PREDICTIONS, to_eps, training_target
from idm.diffusion.sampling import SAMPLER_FUNCTIONS as SAMPLERS
from idm.diffusion.sampling import (
    sample_ddim,
    sample_ddpm,
    spaced_timesteps,
    super_resolve,
)
from idm.diffusion.schedule import Schedule, cosine_betas, linear_betas, make_schedule
from idm.models import IDM, Condition

TINY = replace(MODEL_PRESETS["tiny"], encoder_blocks=1, encoder_channels=8, base_channels=8,
               channel_mults=(1, 2), norm_groups=4, attention_levels=(), implicit_hidden=16,
               modulation_hidden=8)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: one thread is several times faster than two fighting over them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_linear_schedule_golden_values() -> None:
    betas = linear_betas(2000, 1e-6, 1e-2)
    assert betas.dtype == torch.float64 and betas.shape == (2000,)
    assert betas[0].item() == 1e-6 and betas[-1].item() == 1e-2
    schedule = make_schedule("linear", 2000, beta_start=1e-6, beta_end=1e-2)
    assert schedule.timesteps == 2000 and schedule.alpha_bars[0].item() == 1.0
    assert bool((schedule.alpha_bars[1:] < schedule.alpha_bars[:-1]).all())
    expected = np.prod(1 - np.linspace(1e-6, 1e-2, 2000))
    assert schedule.alpha_bars[-1].item() == pytest.approx(expected, rel=1e-9)
    assert schedule.alpha_bars[-1].item() == pytest.approx(4.386e-5, rel=1e-3)


def test_cosine_schedule_golden_values() -> None:
    schedule = Schedule.from_betas(cosine_betas(1000, 0.0, 0.0))
    assert bool((schedule.alpha_bars[1:] < schedule.alpha_bars[:-1]).all())
    assert schedule.alpha_bars[-1].item() < 1e-6  # all signal gone at t = T
    assert schedule.betas.max().item() == pytest.approx(0.999)
    f = [math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2 for t in (0.0, 0.5)]
    assert schedule.alpha_bars[500].item() == pytest.approx(f[1] / f[0], rel=1e-9)


def test_unknown_schedule_and_bad_betas() -> None:
    assert sorted(SCHEDULES) == ["cosine", "linear"]
    with pytest.raises(ValueError, match=r"expected one of \['cosine', 'linear'\]"):
        make_schedule("sigmoid", 10)
    with pytest.raises(ValueError, match=r"values in \(0, 1\)"):
        Schedule.from_betas(torch.tensor([0.1, 1.0]))


def test_noise_levels_lie_in_the_sr3_intervals() -> None:
    one_step = make_schedule("linear", 1, beta_start=0.19, beta_end=0.19)
    gamma = noise_levels(one_step, 1000, generator=torch.Generator().manual_seed(0))
    assert gamma.min() >= math.sqrt(0.81) and gamma.max() <= 1.0
    assert gamma.std() > 0.01  # spread over the interval, not pinned to an end
    schedule = make_schedule("linear", 2000)
    draw = [noise_levels(schedule, 8, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    torch.testing.assert_close(draw[0], draw[1])
    assert draw[0].min() >= schedule.alpha_bars[-1].sqrt() and draw[0].max() <= 1.0


class Oracle(nn.Module):
    """Predicts the exact noise that turns a known clean image x0 into x_t."""

    def __init__(self, x0: Tensor) -> None:
        super().__init__()
        self.x0, self.calls = x0, 0

    def forward(self, x_t: Tensor, gamma: Tensor, cond: object) -> Tensor:
        self.calls += 1
        g = gamma[:, None, None, None]
        return (x_t - g * self.x0) / (1 - g**2).sqrt()


def test_training_loss_formula() -> None:
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    schedule = make_schedule("linear", 100, beta_start=1e-4, beta_end=0.05)
    gen = torch.Generator().manual_seed(0)
    exact = training_loss(Oracle(x0).double(), x0.double(), None, schedule=schedule, generator=gen)
    assert exact.item() < 1e-6  # x_t = gamma x0 + sqrt(1 - gamma^2) eps, eps is the target
    x0 = torch.zeros(64, 3, 16, 16)

    def zero(x_t: Tensor, gamma: Tensor, cond: object) -> Tensor:
        return torch.zeros_like(x_t)

    l1 = training_loss(zero, x0, None, schedule=schedule, loss="l1", generator=gen)
    l2 = training_loss(zero, x0, None, schedule=schedule, loss="l2", generator=gen)
    assert l1.item() == pytest.approx(math.sqrt(2 / math.pi), rel=0.02)  # E|N(0, 1)|
    assert l2.item() == pytest.approx(1.0, rel=0.03)
    with pytest.raises(ValueError, match=r"expected one of \['l1', 'l2'\]"):
        training_loss(zero, x0, None, schedule=schedule, loss="l3")


def _pattern() -> tuple[Tensor, Tensor]:
    """A smooth 16x16 HR image in [-1, 1] and its 8x8 LR version."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    hr = 0.9 * torch.stack([xx, yy, xx * yy])[None]
    return hr, nn.functional.avg_pool2d(hr, 2)


def test_training_loss_falls_when_overfitting_one_image() -> None:
    torch.manual_seed(0)
    model = IDM(TINY)
    hr, lr = _pattern()
    schedule = make_schedule("linear", 2000)

    def held_out_loss() -> float:  # same noise and levels every time
        with torch.no_grad():
            cond = model.condition(lr.expand(32, -1, -1, -1), (16, 16))
            return training_loss(model, hr.expand(32, -1, -1, -1), cond, schedule=schedule,
                                 generator=torch.Generator().manual_seed(123)).item()

    initial = held_out_loss()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        cond = model.condition(lr.expand(8, -1, -1, -1), (16, 16))
        loss = training_loss(model, hr.expand(8, -1, -1, -1), cond, schedule=schedule, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert held_out_loss() / initial < 0.3


@pytest.mark.parametrize("sampler", [sample_ddpm, sample_ddim])
@pytest.mark.parametrize("timesteps", [list(range(50, 0, -1)), [50, 31, 12, 3]])
def test_samplers_recover_x0_from_an_exact_noise_predictor(sampler, timesteps: list[int]) -> None:
    schedule = make_schedule("linear", 50, beta_start=1e-4, beta_end=0.2)
    x0 = (torch.rand(2, 3, 6, 5, dtype=torch.float64) * 1.8 - 0.9)
    oracle = Oracle(x0)
    x_T = torch.randn(2, 3, 6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = sampler(oracle, None, x_T, timesteps, schedule=schedule,
                  generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, x0, atol=1e-9, rtol=0)
    assert oracle.calls == len(timesteps)


@pytest.fixture(scope="module")
def tiny_model() -> IDM:
    torch.manual_seed(0)
    return IDM(TINY).eval()


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampler_range_shape_and_determinism(tiny_model: IDM, name: str) -> None:
    schedule = make_schedule("linear", 2000)
    steps = spaced_timesteps(2000, 6)
    with torch.no_grad():
        cond = tiny_model.condition(torch.rand(2, 3, 6, 7) * 2 - 1, (15, 17))

    def run() -> Tensor:
        gen = torch.Generator().manual_seed(7)
        x_T = torch.randn(2, 3, 15, 17, generator=gen)
        return SAMPLERS[name](tiny_model, cond, x_T, steps, schedule=schedule, eta=1.0, generator=gen)

    first, second = run(), run()
    assert first.shape == (2, 3, 15, 17)
    assert first.min() >= -1.0 and first.max() <= 1.0
    torch.testing.assert_close(first, second, atol=0, rtol=0)


def test_condition_is_computed_once_per_image(tiny_model: IDM, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"encoder": 0, "pyramid": 0, "unet": 0}
    for name in calls:
        module = getattr(tiny_model, name)
        original = module.forward

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, "forward", counted)
    schedule = make_schedule("linear", 2000)
    out = super_resolve(tiny_model, torch.rand(2, 3, 5, 6) * 2 - 1, (12, 15), [2000, 1500, 900, 400, 10],
                        schedule=schedule, sample=SampleConfig(sampler="ddpm", eta=1.0, temperature=1.0),
                        generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 12, 15)
    assert calls == {"encoder": 1, "pyramid": 1, "unet": 5}


def test_spaced_timesteps() -> None:
    assert spaced_timesteps(2000, 4) == [2000, 1500, 1000, 500]
    assert spaced_timesteps(10, 10) == list(range(10, 0, -1))
    steps = spaced_timesteps(2000, 200)
    assert len(steps) == 200 and steps[0] == 2000 and steps[-1] >= 1
    with pytest.raises(ValueError, match=r"steps must be in \[1, 10\]"):
        spaced_timesteps(10, 11)


def test_quadratic_spacing_crowds_the_steps_at_low_noise() -> None:
    assert spaced_timesteps(1000, 5, "quadratic") == [1000, 640, 360, 160, 40]
    # where rounding would repeat a step, the next free lower step is taken: still distinct
    assert spaced_timesteps(10, 4, "quadratic") == [10, 6, 2, 1]
    assert spaced_timesteps(10, 10, "quadratic") == list(range(10, 0, -1))
    for total in (7, 50, 1000):
        for steps in range(1, total + 1, 3):
            got = spaced_timesteps(total, steps, "quadratic")
            assert len(got) == steps and got[0] == total and got[-1] >= 1
            assert all(a > b for a, b in zip(got, got[1:]))
    with pytest.raises(ValueError, match="unknown spacing 'cosine'"):
        spaced_timesteps(10, 4, "cosine")


@pytest.mark.parametrize("timesteps", [[], [1, 2], [5, 5, 1], [11, 3], [4, 0]])
def test_samplers_reject_bad_timesteps(timesteps: list[int]) -> None:
    schedule = make_schedule("linear", 10)
    cond = Condition(torch.zeros(1, 3, 2, 2), [], torch.zeros(1))
    with pytest.raises(ValueError, match=r"strictly descending sequence of steps in \[1, 10\]"):
        sample_ddpm(Oracle(torch.zeros(1, 3, 2, 2)), cond, torch.zeros(1, 3, 2, 2), timesteps,
                    schedule=schedule)


# ---------------------------------------------------------------- parameterizations (idm.diffusion.prediction)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_each_prediction_target_maps_back_to_the_noise(prediction: str) -> None:
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 5, 5, dtype=torch.float64, generator=gen) * 2 - 1
    eps = torch.randn(4, 3, 5, 5, dtype=torch.float64, generator=gen)
    gamma = torch.tensor([0.05, 0.5, 0.9, 0.999], dtype=torch.float64)[:, None, None, None]
    x_t = gamma * x0 + (1 - gamma**2).sqrt() * eps
    target = training_target(prediction, x0, eps, gamma)
    torch.testing.assert_close(to_eps(prediction, target, x_t, gamma), eps, atol=1e-9, rtol=0)


def test_v_target_golden_value() -> None:
    # v = gamma * eps - sqrt(1 - gamma^2) * x0 (Salimans & Ho 2022): gamma 0.6 -> sigma 0.8
    v = training_target("v", torch.tensor([0.5]), torch.tensor([2.0]), torch.tensor([0.6]))
    assert v.item() == pytest.approx(0.6 * 2.0 - 0.8 * 0.5)
    with pytest.raises(ValueError, match=r"expected one of \['eps', 'x0', 'v'\]"):
        training_target("score", torch.zeros(1), torch.zeros(1), torch.ones(1))


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_idm_forward_returns_the_noise_whatever_it_predicts(prediction: str) -> None:
    torch.manual_seed(0)
    model = IDM(replace(TINY, prediction=prediction)).eval()
    x_t = torch.randn(2, 3, 12, 10)
    gamma = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        cond = model.condition(torch.rand(2, 3, 6, 5) * 2 - 1, (12, 10))
        raw, eps = model(x_t, gamma, cond, raw=True), model(x_t, gamma, cond)
    torch.testing.assert_close(eps, to_eps(prediction, raw, x_t, gamma[:, None, None, None]))
    assert not torch.allclose(raw, eps)


def test_training_loss_uses_the_models_parameterization() -> None:
    """An oracle that outputs the exact x0 has zero loss as an x0-predictor, not as an eps-predictor."""
    x0 = torch.rand(4, 3, 8, 8, dtype=torch.float64) * 2 - 1
    schedule = make_schedule("linear", 100, beta_start=1e-4, beta_end=0.05)

    def exact_x0(x_t: Tensor, gamma: Tensor, cond: object, raw: bool = False) -> Tensor:
        return x0

    as_x0 = training_loss(exact_x0, x0, None, schedule=schedule, prediction="x0",
                          generator=torch.Generator().manual_seed(0))
    as_eps = training_loss(exact_x0, x0, None, schedule=schedule, prediction="eps",
                           generator=torch.Generator().manual_seed(0))
    assert as_x0.item() == 0.0 and as_eps.item() > 0.3


def test_bad_prediction_in_the_model_config_lists_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown prediction 'score'; expected one of \['eps', 'x0', 'v'\]"):
        replace(TINY, prediction="score")


# ---------------------------------------------------------------- temperature


def test_temperature_zero_is_deterministic_and_the_noise_scales_with_it(tiny_model: IDM) -> None:
    schedule = make_schedule("linear", 2000)
    lr = torch.rand(1, 3, 5, 6) * 2 - 1

    def run(seed: int, temperature: float) -> Tensor:
        return super_resolve(tiny_model, lr, (10, 12), [2000, 1000, 10], schedule=schedule,
                             sample=SampleConfig(sampler="ddim", temperature=temperature),
                             generator=torch.Generator().manual_seed(seed))

    torch.testing.assert_close(run(0, 0.0), run(1, 0.0), atol=0, rtol=0)
    assert not torch.allclose(run(0, 1.0), run(1, 1.0))
    assert not torch.allclose(run(0, 1.0), run(0, 0.5))
    for bad in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="temperature must be a number in"):
            run(0, temperature=bad)
