"""Image loading for training: decode once through the tagging path, keep uint8 pixels.

Every image is decoded and resized exactly as ``sdltag tag`` does it
(``sdltag.images.load_pixels`` with the model's ``InputSpec``: tagging's decode before its
normalisation) and stored as uint8 (3, H, W). Small datasets (the default budget is a few GB, e.g. 40k images of 96x96
need 1.1 GB) are decoded once, by ``--workers`` DataLoader processes, into one RAM
tensor; larger ones are decoded on the fly by the workers each epoch. Augmentation
happens afterwards on whole batches (``sdltag.nn.augment``).

An image that cannot be decoded is reported once (a warning on the ``sdltag`` logger
naming it and why) and left out; it never stops training.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from sdltag.modelfolder import InputSpec

logger = logging.getLogger(__name__)


def decode_uint8(path: Path, spec: InputSpec) -> np.ndarray:
    """Decode and resize one image as tagging does -> uint8 (3, H, W) in [0, 255]."""
    from sdltag.images import load_pixels

    return np.ascontiguousarray(load_pixels(path, spec).transpose(2, 0, 1))  # (H, W, 3) -> (3, H, W)


class DecodeDataset(Dataset):
    """Index -> (index, uint8 image (3, H, W) or zeros, error message or "")."""

    def __init__(self, paths: Sequence[Path], spec: InputSpec) -> None:
        self.paths = list(paths)
        self.spec = spec

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, Tensor, str]:
        try:
            pixels = torch.from_numpy(decode_uint8(self.paths[index], self.spec))
            return index, pixels, ""
        except Exception as exc:  # noqa: BLE001 - any decoder failure means "skip this image"
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return index, torch.zeros(3, self.spec.height, self.spec.width, dtype=torch.uint8), reason


def _collate(batch: list[tuple[int, Tensor, str]]) -> tuple[Tensor, Tensor, list[str]]:
    indices = torch.tensor([item[0] for item in batch], dtype=torch.long)
    images = torch.stack([item[1] for item in batch])  # (B, 3, H, W) uint8
    return indices, images, [item[2] for item in batch]


def _loader(dataset: Dataset, batches: Sequence[Sequence[int]], workers: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_sampler=[list(b) for b in batches],
        num_workers=workers,
        collate_fn=_collate,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )


def cache_bytes(count: int, spec: InputSpec) -> int:
    return count * 3 * spec.height * spec.width


class ImageStore:
    """The images of one split, readable by batches of indices as uint8 (B, 3, H, W).

    ``cached`` stores decode every image once up front; otherwise each batch is decoded by
    the workers when it is asked for. ``ok`` marks the images that decoded (unknown images
    count as fine until tried).
    """

    def __init__(self, paths: Sequence[Path], spec: InputSpec, *, cache: bool, workers: int = 0) -> None:
        self.paths = list(paths)
        self.spec = spec
        self.workers = workers
        self.dataset = DecodeDataset(self.paths, spec)
        self.ok = torch.ones(len(self.paths), dtype=torch.bool)
        self._reported: set[int] = set()
        self.pixels: Tensor | None = None
        if cache:
            self._fill_cache()

    @property
    def cached(self) -> bool:
        return self.pixels is not None

    def _note_failures(self, indices: Tensor, errors: list[str]) -> None:
        for index, reason in zip(indices.tolist(), errors, strict=True):
            if reason:
                self.ok[index] = False
                if index not in self._reported:
                    self._reported.add(index)
                    logger.warning(f"{self.paths[index]}: cannot decode ({reason}), skipped")

    def _fill_cache(self) -> None:
        pixels = torch.empty(len(self.paths), 3, self.spec.height, self.spec.width, dtype=torch.uint8)
        chunk = 64
        batches = [range(i, min(i + chunk, len(self.paths))) for i in range(0, len(self.paths), chunk)]
        for indices, images, errors in _loader(self.dataset, batches, self.workers):
            pixels[indices] = images
            self._note_failures(indices, errors)
        self.pixels = pixels

    def iter_batches(self, batches: Sequence[Sequence[int]]) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield (indices, uint8 images) per batch, bad images already removed (a batch may shrink)."""
        if self.pixels is not None:
            for batch in batches:
                indices = torch.as_tensor(list(batch), dtype=torch.long)
                indices = indices[self.ok[indices]]
                yield indices, self.pixels[indices]
            return
        for indices, images, errors in _loader(self.dataset, batches, self.workers):
            self._note_failures(indices, errors)
            good = torch.tensor([not e for e in errors], dtype=torch.bool)
            yield indices[good], images[good]


def normalise(images: Tensor, spec: InputSpec) -> Tensor:
    """[0, 1] float (B, 3, H, W) -> the model's input, ``(x - mean) / std`` per channel."""
    mean = torch.tensor(spec.mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std
