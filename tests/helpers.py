"""Small helpers shared by tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth-plus-texture (H, W, 3) uint8 test image, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in range(3)], axis=-1)
    img = 127.5 + 90 * base + rng.normal(0, 12, (height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


# A model and training run small enough for tests: seconds, not minutes.
TINY: dict = {
    "model": {"preset": "tiny", "base_channels": 8, "channel_mults": [1, 2], "attention_levels": [], "norm_groups": 4,
              "encoder_channels": 8, "encoder_blocks": 1, "implicit_hidden": 8, "modulation_hidden": 8},
    "diffusion": {"timesteps": 50},
    "train": {"steps": 6, "batch_size": 2, "patch_size": 16, "checkpoint_every": 3, "log_every": 2,
              "sample_every": 3, "target": "residual", "device": "cpu"},
    "sample": {"steps": 2},
    "evaluate": {"methods": ["bicubic", "idm"]},
}


ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "datasets"


def tiny_train_section() -> dict:
    """TINY's train section with every other key at its default, written out: dvc.yaml tracks
    train's keys one by one, so a params.yaml run by DVC must have each of them."""
    from dataclasses import asdict

    from idm.config import TrainConfig
    from pipeline.params import TrainStageParams

    return {**asdict(TrainConfig()), **asdict(TrainStageParams()), **TINY["train"]}


def make_image_folder(folder: Path) -> Path:
    """A folder of small images in several modes: RGB, greyscale, RGBA, palette, 16-bit, JPEG."""
    folder.mkdir(parents=True)
    Image.fromarray(photo(60, 72, 1)).save(folder / "rgb.png")
    Image.fromarray(photo(64, 48, 2)).convert("L").save(folder / "grey.png")
    Image.fromarray(photo(50, 50, 3)).convert("RGBA").save(folder / "rgba.png")
    Image.fromarray(photo(56, 64, 4)).convert("P").save(folder / "palette.png")
    Image.fromarray((photo(48, 60, 5)[..., 0].astype(np.uint16) * 257)).save(folder / "sixteen.png")
    Image.fromarray(photo(66, 70, 6)).save(folder / "jpeg.jpg", quality=95)
    return folder


def stage_store_runs(filter_string: str) -> list:
    """Runs of experiment `idm` in the store the stage subprocesses log to ($MLFLOW_TRACKING_URI),
    newest first; other tests may have pointed this process's MLflow elsewhere."""
    import os

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("idm")
    return client.search_runs([experiment.experiment_id], filter_string, order_by=["attributes.start_time DESC"])


def stage_store_client():
    """An MlflowClient on the store the stage subprocesses log to."""
    import os

    import mlflow

    return mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])


def fabricated_weights(name: str) -> bytes:
    """A torch.save'd state dict with the keys and shapes of the LPIPS ('lpips': torchvision
    AlexNet) or FID ('fid': torch-fidelity Inception-v3) backbone, a few KB: every tensor is a
    stride-0 view of one seeded random value per output channel, over the
    fan-in so that activations stay finite through Inception's 90-odd layers."""
    import io

    import torch

    if name == "lpips":
        import torchvision

        state = torchvision.models.alexnet(weights=None).state_dict()
    else:
        state = inception_network().state_dict()
    gen = torch.Generator().manual_seed(0)
    small = {k: ((torch.rand(v.shape[0], generator=gen) + 0.5) / max(1, v[0].numel()))
             .view(-1, *[1] * (v.dim() - 1)).expand(v.shape) if v.dim() else v.clone() for k, v in state.items()}
    buf = io.BytesIO()
    torch.save(small, buf)
    return buf.getvalue()


def inception_network():
    """torch-fidelity's Inception-v3 feature extractor with its default (random) init: the
    architecture only, neither downloaded nor loaded."""
    from unittest import mock

    from torch_fidelity import feature_extractor_inceptionv3 as fidelity

    with mock.patch.object(fidelity, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, s: None):
        return fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(pixels: np.ndarray, *, before_idat: tuple[tuple[bytes, bytes], ...] = (),
              after_idat: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    """A PNG of (H, W[, C]) uint8 or uint16 `pixels` (C = 1-4: grey, grey + alpha, RGB, RGBA),
    with extra (chunk type, data) chunks before and after the image data; written by hand as
    Pillow writes neither 16-bit colour nor chunks after IDAT."""
    import struct
    import zlib

    px = pixels if pixels.ndim == 3 else pixels[..., None]
    height, width, channels = px.shape
    depth = 16 if px.dtype == np.uint16 else 8
    rows = px.astype(">u2" if depth == 16 else "u1").reshape(height, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 on every row
    ihdr = struct.pack(">IIBBBBB", width, height, depth, {1: 0, 2: 4, 3: 2, 4: 6}[channels], 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + b"".join(_png_chunk(k, d) for k, d in before_idat)
            + _png_chunk(b"IDAT", zlib.compress(raw)) + b"".join(_png_chunk(k, d) for k, d in after_idat)
            + _png_chunk(b"IEND", b""))


def exif_bytes(**tags: object) -> bytes:
    """An EXIF block (TIFF header and IFD0, without the JPEG 'Exif\\0\\0' prefix) holding `tags`,
    named as in PIL.ExifTags.Base (Orientation=6, Make='Apple')."""
    from PIL import ExifTags

    exif = Image.Exif()
    for name, value in tags.items():
        exif[ExifTags.Base[name]] = value
    return exif.tobytes().removeprefix(b"Exif\x00\x00")


def declared_size_image(fmt: str, width: int, height: int, *, depth: int = 8, samples: int = 3) -> bytes:
    """A file of under 200 bytes whose header declares width x height pixels (of `samples`
    channels of `depth` bits for 'png' and 'tiff') and that holds no pixel data: 'png',
    'tiff', 'bmp', 'gif' or 'jpeg'."""
    import struct
    import zlib

    if fmt == "png":
        ihdr = struct.pack(">IIBBBBB", width, height, depth, {1: 0, 2: 4, 3: 2, 4: 6}[samples], 0, 0, 0)
        return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b""))
                + _png_chunk(b"IEND", b""))
    if fmt == "tiff":
        return _declared_tiff(width, height, depth, samples)
    if fmt == "bmp":
        return b"BM" + struct.pack("<IHHI", 54, 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24,
                                                                        0, 0, 2835, 2835, 0, 0)
    if fmt == "gif":
        return (b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff" + b","
                + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x01\x2c\x00;")
    if fmt == "jpeg":
        sof = struct.pack(">BHHB", 8, height, width, 3) + b"\x01\x11\x00\x02\x11\x00\x03\x11\x00"
        sos = b"\x03\x01\x00\x02\x00\x03\x00\x00\x3f\x00"
        return (b"\xff\xd8\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + b"\xff\xda"
                + struct.pack(">H", len(sos) + 2) + sos + b"\xff\xd9")
    raise ValueError(f"fmt must be png, tiff, bmp, gif or jpeg, got {fmt!r}")


def _declared_tiff(width: int, height: int, depth: int, samples: int) -> bytes:
    """A little-endian TIFF header and IFD for one uncompressed strip that is not there."""
    import struct

    entries = [(256, 4, [width]), (257, 4, [height]), (258, 3, [depth] * samples), (259, 3, [1]),
               (262, 3, [2 if samples >= 3 else 1]), (273, 4, [8]), (277, 3, [samples]), (278, 4, [height]),
               (279, 4, [min(width * height * samples * depth // 8, 2**32 - 1)])]
    entries += [(338, 3, [2])] if samples in (2, 4) else []  # ExtraSamples: unassociated alpha
    extra_at = 8 + 2 + 12 * len(entries) + 4
    ifd, extra = struct.pack("<H", len(entries)), b""
    for tag, kind, values in entries:
        data = struct.pack("<" + ("H" if kind == 3 else "I") * len(values), *values)
        if len(data) <= 4:
            field = data.ljust(4, b"\x00")
        else:
            field, extra = struct.pack("<I", extra_at + len(extra)), extra + data
        ifd += struct.pack("<HHI", tag, kind, len(values)) + field
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + extra
