"""Image data without torchvision: Fashion-MNIST idx files, tensor transforms, dataset wrappers.

Images travel as ``uint8`` tensors (H, W) or (H, W, C) until :class:`ImageTransform` turns them into
normalised float (C, S, S) tensors — with random crop-with-padding and horizontal flips for training,
the usual light augmentation for 28x28 clothing images.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "FASHION_MNIST_LABELS",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "read_idx",
    "load_fashion_mnist",
    "ImageTransform",
    "TensorImageDataset",
    "HubImageDataset",
    "collate_images",
]

FASHION_MNIST_LABELS = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
#: Mean and standard deviation of the training pixels scaled to [0, 1].
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (the MNIST format; ``.gz`` or raw): magic 0 0 dtype ndim, big-endian dims, data."""
    path = Path(path)
    with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file (bad magic number {data[:4]!r}).")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=_IDX_DTYPES[data[2]], offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but the file holds {array.size} values.")
    return array.reshape(dims)


def _idx(folder: Path, stem: str) -> np.ndarray:
    plain = folder / stem
    return read_idx(plain if plain.is_file() else folder / f"{stem}.gz")


def load_fashion_mnist(folder: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{"train": (images, labels), "test": (...)}``: uint8 (N, 28, 28) images and int64 labels."""
    folder = Path(folder)
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = torch.from_numpy(_idx(folder, f"{prefix}-images-idx3-ubyte").copy())
        labels = torch.from_numpy(_idx(folder, f"{prefix}-labels-idx1-ubyte").astype(np.int64))
        if len(images) != len(labels):
            raise ValueError(f"{folder}: {len(images)} {split} images but {len(labels)} labels.")
        out[split] = (images, labels)
    return out


class ImageTransform:
    """uint8 image (H, W) or (H, W, C) -> float (num_channels, size, size), normalised, optionally augmented."""

    def __init__(
        self,
        size: int,
        num_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = False,
        pad: int = 2,
    ) -> None:
        self.size, self.num_channels, self.augment, self.pad = size, num_channels, augment, pad
        self.mean = torch.tensor(_per_channel(mean, num_channels, "image_mean")).view(-1, 1, 1)
        self.std = torch.tensor(_per_channel(std, num_channels, "image_std")).view(-1, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        x = image.to(torch.float32) / 255.0
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)  # (C, H, W)
        if x.shape[0] != self.num_channels:
            if x.shape[0] == 1:
                x = x.expand(self.num_channels, -1, -1)
            elif self.num_channels == 1:  # luminance, ITU-R 601
                x = (x[:3] * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
            else:
                x = x[: self.num_channels]
        if x.shape[1:] != (self.size, self.size):
            x = F.interpolate(x[None], size=(self.size, self.size), mode="bilinear", align_corners=False)[0]
        if self.augment:
            x = self._augment(x)
        return (x - self.mean) / self.std

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        # random crop of a zero-padded copy, then a coin-flip horizontal mirror (uses torch's global RNG,
        # which Trainer seeds)
        padded = F.pad(x, (self.pad,) * 4)
        top, left = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
        x = padded[:, top : top + self.size, left : left + self.size]
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x


def _per_channel(values: Sequence[float], channels: int, name: str) -> list[float]:
    values = list(values)
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise ValueError(f"{name} has {len(values)} values for {channels} channels.")
    return values


class TensorImageDataset(torch.utils.data.Dataset):
    """Images held in one uint8 tensor, transformed on access."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: ImageTransform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"pixel_values": self.transform(self.images[index]), "labels": int(self.labels[index])}


class HubImageDataset(torch.utils.data.Dataset):
    """A ``datasets`` split with a PIL image column and an integer label column."""

    def __init__(self, dataset, image_column: str, label_column: str, transform: ImageTransform) -> None:
        self.dataset, self.image_column, self.label_column, self.transform = (
            dataset,
            image_column,
            label_column,
            transform,
        )

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.dataset[index]
        image = row[self.image_column]
        if hasattr(image, "convert") and image.mode not in ("L", "RGB"):  # PIL: palette, RGBA, 16-bit, ...
            image = image.convert("RGB")
        return {
            "pixel_values": self.transform(torch.from_numpy(np.array(image, dtype=np.uint8))),
            "labels": int(row[self.label_column]),
        }


def collate_images(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.stack([f["pixel_values"] for f in features]),
        "labels": torch.tensor([f["labels"] for f in features], dtype=torch.long),
    }
