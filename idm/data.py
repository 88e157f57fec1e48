"""Training data: continuous-scale LR/HR batches, one per step, made by any process.

Batch `step` of a run is drawn from its own generator, seeded from (seed, rank, step)
alone (`batch_seed`). So a `torch.utils.data.DataLoader` with any number of workers
yields exactly the batches the training process would make itself, in order; a resumed
run starts at the batch after its checkpoint's step; and the stream is the same for 0,
1 or 8 workers. The images are (3, H, W) uint8 tensors held in memory, or
`DecodedImages`: arrays decoded once into .npy files and memory-mapped, so a dataset
larger than RAM streams from disk and no worker decodes a PNG twice.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from idm.config import TrainConfig
from idm.resize import resize


def hr_patch_side(cfg: TrainConfig) -> int:
    """The largest HR patch side `make_batch` draws: every training image needs at least this."""
    return max(1, round(cfg.lr_patch * cfg.scale_max)) if cfg.lr_patch else cfg.patch_size


def training_images(images: Sequence[np.ndarray], patch_size: int) -> list[Tensor]:
    """(H, W, 3) uint8 arrays -> (3, H, W) uint8 tensors, keeping those with both sides >= patch_size.

    Raises ValueError if no image is large enough.
    """
    kept = []
    for i, img in enumerate(images):
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"training image {i} must be an (H, W, 3) uint8 array, got {img.dtype} {img.shape}")
        if min(img.shape[:2]) >= patch_size:
            kept.append(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1))
    if not kept:
        sides = sorted({min(img.shape[:2]) for img in images}, reverse=True)
        raise ValueError(f"no training image is at least {patch_size}x{patch_size} px (patch_size); "
                         f"shortest sides: {sides[:5] or 'no images'}")
    return kept


class DecodedImages(Sequence[np.ndarray]):
    """Images decoded once into `folder`/<i>.npy ((H, W, 3) uint8) and read back memory-mapped.

    `DecodedImages.build(arrays, folder, patch_size)` writes them; indexing gives a
    read-only (3, H, W) uint8 numpy view, so a crop reads only the pages it touches. Each
    process maps the files itself (DataLoader workers included).
    """

    def __init__(self, folder: str | os.PathLike, shapes: Sequence[tuple[int, int]]) -> None:
        self.folder, self.shapes = Path(folder), [tuple(s) for s in shapes]
        self._maps: dict[int, np.ndarray] = {}

    @classmethod
    def build(cls, arrays: Callable[[], Iterator[np.ndarray]] | Sequence[np.ndarray], folder: str | os.PathLike,
              patch_size: int) -> "DecodedImages":
        """Write each (H, W, 3) uint8 array with both sides >= patch_size to folder/<i>.npy
        (each file atomically); `arrays` may be a function returning an iterator, so only one
        image need be in memory. ValueError, like `training_images`, for an array of another
        dtype or shape, or when no image is large enough."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        shapes = []
        for i, img in enumerate(arrays() if callable(arrays) else arrays):
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                raise ValueError(f"training image {i} must be an (H, W, 3) uint8 array, got {img.dtype} {img.shape}")
            if min(img.shape[:2]) < patch_size:
                continue
            path = folder / f"{len(shapes)}.npy"
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, np.ascontiguousarray(img))
            os.replace(tmp, path)
            shapes.append(img.shape[:2])
        if not shapes:
            raise ValueError(f"no training image is at least {patch_size}x{patch_size} px (patch_size)")
        return cls(folder, shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        """A (3, H, W) read-only view of image i (make_batch copies only its crops)."""
        if i not in self._maps:
            self._maps[i] = np.load(self.folder / f"{i}.npy", mmap_mode="r")
        return self._maps[i].transpose(2, 0, 1)

    def __getstate__(self) -> dict:  # a worker maps the files itself
        return {"folder": self.folder, "shapes": self.shapes, "_maps": {}}


def rand_int(high: int, generator: torch.Generator) -> int:
    """Uniform in [0, high)."""
    return int(torch.randint(high, (), generator=generator))


def make_batch(images: Sequence[Tensor] | Sequence[np.ndarray], cfg: TrainConfig,
               generator: torch.Generator) -> tuple[Tensor, Tensor, float]:
    """One continuous-scale training batch (LIIF protocol), drawn with `generator` only.

    images: (3, H, W) uint8 tensors from `training_images`, or `DecodedImages`. A scale
    s ~ U(scale_min, scale_max) for the whole batch; per sample a random P x P crop of a
    random image, randomly flipped. P = patch_size and the LR side p = round(P / s); or,
    with lr_patch > 0, p = lr_patch and P = round(p * s) (LIIF's protocol, which keeps the
    encoder's input large at every scale). The LR patch is `resize`d and rounded to 8
    bits, exactly as the prepare stage makes its LR images.
    Returns hr (B, 3, P, P), lr (B, 3, p, p), both in [-1, 1], and s.
    """
    scale = cfg.scale_min + (cfg.scale_max - cfg.scale_min) * float(
        torch.rand((), generator=generator, dtype=torch.float64))
    p = max(1, round(cfg.lr_patch * scale)) if cfg.lr_patch else cfg.patch_size
    patches = []
    for _ in range(cfg.batch_size):
        img = images[rand_int(len(images), generator)]
        top, left = rand_int(img.shape[1] - p + 1, generator), rand_int(img.shape[2] - p + 1, generator)
        patch = img[:, top : top + p, left : left + p]
        if isinstance(patch, np.ndarray):  # a memory-mapped image: copy the crop only
            patch = torch.from_numpy(np.ascontiguousarray(patch))
        if cfg.flips:
            for dim in (2, 1):  # horizontal, then vertical
                if torch.rand((), generator=generator) < 0.5:
                    patch = patch.flip(dim)
        patches.append(patch)
    hr = torch.stack(patches).float()  # [0, 255]
    lr_side = cfg.lr_patch or max(1, round(p / scale))
    lr = resize(hr, (lr_side, lr_side)).round_().clamp_(0, 255)
    return hr / 127.5 - 1, lr / 127.5 - 1, scale


def batch_seed(seed: int, rank: int, step: int) -> int:
    """The seed of batch `step` on `rank`: a hash of the three, so streams never overlap."""
    digest = hashlib.blake2b(f"{seed}/{rank}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch seeds are < 2**63


class TrainBatches(Dataset):
    """Map-style dataset: item `step` (1..cfg.steps) is (hr, lr) of that training step on `rank`."""

    def __init__(self, images: Sequence[Tensor] | Sequence[np.ndarray], cfg: TrainConfig, rank: int = 0) -> None:
        self.images, self.cfg, self.rank = images, cfg, rank

    def __len__(self) -> int:
        return self.cfg.steps

    def __getitem__(self, step: int) -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(batch_seed(self.cfg.seed, self.rank, step))
        hr, lr, _ = make_batch(self.images, self.cfg, generator)
        return hr, lr


def _one_thread(worker_id: int) -> None:
    torch.set_num_threads(1)  # workers share the cores with training


def batches(dataset: TrainBatches, start: int, *, workers: int = 0, pin_memory: bool = False,
            prefetch: int = 4) -> Iterator[tuple[Tensor, Tensor]]:
    """The batches of steps start+1 .. cfg.steps, in order: made here (workers 0) or by
    `workers` DataLoader processes, `prefetch` batches ahead each, pinned for CUDA copies."""
    steps = range(start + 1, len(dataset) + 1)
    if workers == 0:
        return (dataset[step] for step in steps)
    # Its own generator: DataLoader draws its workers' base seed from one, which would otherwise be
    # torch's global generator, the one dropout uses (and the batches need no worker seed).
    loader = DataLoader(dataset, batch_size=None, sampler=steps, num_workers=workers, pin_memory=pin_memory,
                        prefetch_factor=prefetch, worker_init_fn=_one_thread, persistent_workers=False,
                        generator=torch.Generator().manual_seed(0))
    return iter(loader)
