"""Named public datasets (`source: url, preset: ...` in params.yaml) and where they live."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    """A known public dataset: where it lives and which folder inside it holds the HR images."""

    url: str
    sha256: str | None  # None: not published by the host, so not checked
    subdir: str | None  # folder inside the archive holding the images; None: the whole tree
    description: str


def _edsr_benchmark(name: str, description: str) -> Preset:
    """One HR set from the benchmark archive linked by the EDSR-PyTorch README (~250 MB)."""
    return Preset(
        url="https://cv.snu.ac.kr/research/EDSR/benchmark.tar",
        sha256=None,
        subdir=f"benchmark/{name}/HR",
        description=f"{description} (EDSR benchmark archive)",
    )


PRESETS: dict[str, Preset] = {
    "div2k-train-hr": Preset(
        url="https://data.vision.ee.ethz.ch/cvl/DIV2K/DIV2K_train_HR.zip",
        sha256=None,
        subdir="DIV2K_train_HR",
        description="DIV2K training set, 800 2K-resolution HR images (~3.5 GB)",
    ),
    "div2k-valid-hr": Preset(
        url="https://data.vision.ee.ethz.ch/cvl/DIV2K/DIV2K_valid_HR.zip",
        sha256=None,
        subdir="DIV2K_valid_HR",
        description="DIV2K validation set, 100 2K-resolution HR images (~450 MB)",
    ),
    "set5": _edsr_benchmark("Set5", "Set5, 5 HR images"),
    "set14": _edsr_benchmark("Set14", "Set14, 14 HR images"),
    "b100": _edsr_benchmark("B100", "B100 (BSD100 test split), 100 HR images"),
    "urban100": _edsr_benchmark("Urban100", "Urban100, 100 HR images"),
}
