"""Our bicubic on Set5 reproduces the published MATLAB-bicubic numbers."""

from __future__ import annotations

import numpy as np
import pytest

from idm.inference.upscaler import Bicubic
from pipeline.data.datasets import make_pair
from pipeline.data.images import list_images, read_image
from pipeline.evaluation import metrics
from tests.helpers import SHARED

SET5 = SHARED / "Set5"
PUBLISHED = {2: 33.66, 3: 30.39, 4: 28.42}  # Y-PSNR, MATLAB imresize bicubic (EDSR/SwinIR tables)
MEASURED = {2: 33.680, 3: 30.405, 4: 28.432}  # ours, at the time of writing


@pytest.mark.skipif(not SET5.is_dir(), reason=f"{SET5} not present (shared benchmark images)")
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_set5_bicubic_matches_published(scale):
    bicubic = Bicubic()
    scores = []
    for path in list_images(SET5):
        hr, lr = make_pair(read_image(path), scale)
        scores.append(metrics.psnr(bicubic(lr, hr.shape[:2]), hr, border=metrics.border_for(scale), y_channel=True))
    mean = float(np.mean(scores))
    assert len(scores) == 5
    assert abs(mean - PUBLISHED[scale]) <= 0.2
    assert mean == pytest.approx(MEASURED[scale], abs=0.005)
