"""bench.grid_lines' beaded-line measure on cases whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.grid_lines import (
    HIGH,
    LOW,
    HighRes,
    beading,
    beading_ratio,
    default_point,
    draw_line,
    margin_for,
    ridge_variation,
)
from idm.inference.upscaler import Bicubic

SIZE = 192


class Nearest:
    """Nearest-neighbour upscaling by a whole factor: every LR pixel a block, so lines become staircases."""

    name = "nearest"

    def __call__(self, lr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        fy, fx = size[0] // lr.shape[0], size[1] // lr.shape[1]
        assert (fy * lr.shape[0], fx * lr.shape[1]) == tuple(size)
        return np.repeat(np.repeat(lr, fy, axis=0), fx, axis=1)


class Beaded:
    """Bicubic times a pattern with the LR pixel period (+-30%): beads where a grid artefact puts them."""

    name = "beaded"

    def __call__(self, lr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        period = size[0] / lr.shape[0]
        y, x = np.meshgrid(*(2 * np.pi * (np.arange(n) + 0.5) / period for n in size), indexing="ij")
        pattern = 1 + 0.3 * np.cos(y) * np.cos(x)
        return np.clip(np.round(Bicubic()(lr, size) * pattern[..., None]), 0, 255).astype(np.uint8)


def perfect(angle: float, width: float) -> HighRes:
    method = HighRes()
    method.hr = draw_line(SIZE, angle, width)
    return method


def test_a_drawn_line_covers_its_width_in_every_column():
    image = draw_line(SIZE, 0, 1.25)
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
    assert (image[..., 0] == image[..., 2]).all()
    coverage = (image[..., 0].astype(float) - LOW) / (HIGH - LOW)
    np.testing.assert_allclose(coverage.sum(axis=0), 1.25, atol=2 / (HIGH - LOW))
    # the line spans y 95.675-96.925: 3 and 7 of the 8 sub-rows of rows 95 and 96
    assert sorted(np.unique(image[:, 5, 0])) == [LOW, LOW + 48, LOW + 112]
    assert image[95, 5, 0] == LOW + 48 and image[96, 5, 0] == LOW + 112


def test_a_drawn_line_runs_at_its_angle():
    image = draw_line(SIZE, 45, 2.0)[..., 0]
    py, px = default_point(SIZE)
    for step in (-40, 0, 40):  # up-right from the point: y falls as x grows
        row, col = int(py - step), int(px + step)
        assert image[row, col] > LOW + 100 and image[row + 6, col] == LOW


def test_a_horizontal_line_does_not_vary_along_itself():
    point = default_point(SIZE)
    assert ridge_variation(draw_line(SIZE, 0, 1.25, point), 0, point, margin=8) == pytest.approx(0, abs=1e-12)
    assert beading(Bicubic(), 4, 0, 1.25, SIZE) == pytest.approx(0, abs=1e-12)


def test_bicubic_scores_its_measured_variation_and_a_ratio_of_one():
    assert beading(Bicubic(), 4, 45, 1.25, SIZE) == pytest.approx(0.1046, abs=5e-4)
    assert beading_ratio(Bicubic(), 4, 45, 1.25, SIZE) == 1.0


@pytest.mark.parametrize("scale", [3, 4])
@pytest.mark.parametrize("width", [1.25, 2.0])
def test_nearest_neighbour_staircases_score_clearly_above_bicubic(scale, width):
    assert beading_ratio(Nearest(), scale, 45, width, SIZE) > 1.5


@pytest.mark.parametrize("angle", [30, 45, 60])
def test_a_pattern_at_the_lr_pixel_period_scores_clearly_above_bicubic(angle):
    assert beading_ratio(Beaded(), 4, angle, 1.25, SIZE) > 1.5


@pytest.mark.parametrize("scale", [3, 3.7, 4])
@pytest.mark.parametrize("angle", [22.5, 30, 45, 60, 67.5])
def test_returning_the_original_scores_below_bicubic(scale, angle):
    assert beading_ratio(perfect(angle, 1.25), scale, angle, 1.25, SIZE) < 1


def test_errors_name_what_is_wrong():
    point = default_point(SIZE)
    with pytest.raises(ValueError, match="no line"):
        ridge_variation(np.full((SIZE, SIZE, 3), LOW, np.uint8), 30, point, margin=8)
    with pytest.raises(ValueError, match="fewer than 16 ridge samples fit 95 px inside a 192x192 image"):
        ridge_variation(draw_line(SIZE, 30, 1.25), 30, point, margin=95)
    with pytest.raises(ValueError, match="width > 0"):
        draw_line(SIZE, 30, 0)


def test_against_a_flat_bicubic_ridge_the_ratio_is_one_or_infinite():
    assert margin_for(3.7) == 16
    assert beading_ratio(Bicubic(), 4, 0, 1.25, SIZE) == 1.0
    assert math.isinf(beading_ratio(Beaded(), 4, 0, 1.25, SIZE))
