"""``LabeledVolumes``: image + label-map pairs on identical grids, preprocessed together."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from omnienc.errors import DataError
from omnienc.io import Volume, read_volume
from omnienc.preprocessing import Preprocessing
from omnienc.transforms import preprocess_volume

# Two grids agree when their affines differ by less than this (mm, and direction cosines).
GRID_ATOL = 1e-3


def check_same_grid(image: Volume, label: Volume) -> None:
    """Refuse an image/label pair whose voxel grids differ.

    Raises:
        DataError: Shapes or affines differ; the message names both files and the difference.
    """
    if image.shape != label.shape:
        raise DataError(
            label.source,
            f"label map grid {label.shape} differs from its image {image.source} grid "
            f"{image.shape}; resample the label map onto the image grid first",
        )
    if not np.allclose(image.affine, label.affine, atol=GRID_ATOL):
        diff = float(np.abs(image.affine - label.affine).max())
        raise DataError(
            label.source,
            f"label map affine differs from its image {image.source} by up to {diff:.4g} "
            f"(same shape {image.shape}, different position/orientation/spacing): "
            f"image affine {_rows(image.affine)}, label affine {_rows(label.affine)}",
        )


def _rows(affine: np.ndarray) -> str:
    """A 4x4 matrix on one line: ``[a b c d; e f g h; ...]``."""
    return "[" + "; ".join(" ".join(f"{v:.4g}" for v in row) for row in affine) + "]"


def read_label_map(path: str | Path, **kwargs: Any) -> Volume:
    """Read a label map and check that every voxel is a non-negative integer.

    Raises:
        VolumeReadError: The file cannot be read (see :func:`omnienc.io.read_volume`).
        DataError: It holds non-integer or negative values.
    """
    label = read_volume(path, modality="unknown", **kwargs)
    arr = label.array
    if not np.array_equal(arr, np.round(arr)):
        n = int((arr != np.round(arr)).sum())
        raise DataError(path, f"label map has {n:,} non-integer voxels; expected integer labels")
    if float(arr.min()) < 0:
        raise DataError(path, f"label map has negative labels (min {arr.min():g})")
    return label


class LabeledVolumes(Dataset):
    """Pairs of (image, label map) that share a voxel grid, preprocessed together.

    The label map follows the image through resampling (nearest neighbour) and cropping; it is
    never intensity-normalised.

    Args:
        pairs: ``[(image_path, label_path), ...]``; an image path may be a DICOM folder.
        preprocessing: Parameters of the deterministic pipeline.
        modality: Force the modality of every image (else inferred per file).

    Raises:
        DataError: A pair's grids differ, or a label map is not integer-valued.
        VolumeReadError: A file cannot be read.

    Items are ``{"image": (1, X, Y, Z) float32 tensor, "label": (1, X, Y, Z) int64 tensor,
    "affine": (4, 4) array, "modality": str, "id": str}``.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[str | Path, str | Path]],
        preprocessing: Preprocessing | None = None,
        modality: str | None = None,
    ) -> None:
        if not pairs:
            raise ValueError("LabeledVolumes needs at least one (image, label) pair")
        self.pairs = [(Path(i), Path(lab)) for i, lab in pairs]
        self.preprocessing = preprocessing or Preprocessing()
        self.modality = modality
        self._items: dict[int, dict[str, Any]] = {}
        # Check every pair up front: a mismatched grid is an error now, not mid-training.
        for image_path, label_path in self.pairs:
            image = read_volume(image_path, modality=modality)
            check_same_grid(image, read_label_map(label_path))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index not in self._items:
            image_path, label_path = self.pairs[index]
            image = read_volume(image_path, modality=self.modality)
            label = read_label_map(label_path)
            out = preprocess_volume(image, self.preprocessing, label=label.array)
            self._items[index] = {
                "image": torch.from_numpy(out["image"]),
                "label": torch.from_numpy(out["label"]),
                "affine": out["affine"],
                "modality": out["modality"],
                "id": str(image_path),
            }
        return self._items[index]
