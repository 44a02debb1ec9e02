"""``LabeledVolumes``: image + label-map pairs on identical grids, preprocessed together.

Pairs come from the caller, or from a folder scan: :func:`omnienc.data.pairing.pair_label_maps`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from omnienc.errors import DataError
from omnienc.io import Volume, read_volume
from omnienc.preprocessing import Preprocessing
from omnienc.transforms import preprocess_volume

if TYPE_CHECKING:
    from omnienc.data.pairing import LabelPair

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

    Any data type is accepted (BraTS stores its labels as float32) as long as the values are
    integers.

    Raises:
        VolumeReadError: The file cannot be read (see :func:`omnienc.io.read_volume`).
        DataError: It holds non-integer or negative values.
    """
    label = read_volume(path, modality="unknown", **kwargs)
    arr = label.array
    if not np.array_equal(arr, np.round(arr)):
        fractional = arr[arr != np.round(arr)]
        raise DataError(
            path,
            f"label map has {fractional.size:,} non-integer voxels (e.g. "
            f"{float(fractional[0]):.4g}); expected integer labels (a probability map, or a "
            "label map resampled with linear interpolation?)",
        )
    if float(arr.min()) < 0:
        raise DataError(path, f"label map has negative labels (min {arr.min():g})")
    return label


class LabeledVolumes(Dataset):
    """Pairs of (image, label map) that share a voxel grid, preprocessed together.

    The label map follows the image through resampling (nearest neighbour) and cropping; it is
    never intensity-normalised.

    Args:
        pairs: ``[(image_path, label_path), ...]`` (an image path may be a DICOM folder), or
            :class:`~omnienc.data.pairing.LabelPair` s, which also pick a series of a folder.
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
        pairs: Sequence[tuple[str | Path, str | Path] | LabelPair],
        preprocessing: Preprocessing | None = None,
        modality: str | None = None,
    ) -> None:
        if not pairs:
            raise ValueError("LabeledVolumes needs at least one (image, label) pair")
        self.pairs: list[tuple[Path, Path]] = []
        self.series_uids: list[str | None] = []
        for pair in pairs:
            if isinstance(pair, tuple):
                image_path, label_path = pair
                self.pairs.append((Path(image_path), Path(label_path)))
                self.series_uids.append(None)
            else:
                self.pairs.append((pair.image, pair.label))
                self.series_uids.append(pair.series_uid)
        self.preprocessing = preprocessing or Preprocessing()
        self.modality = modality
        self._items: dict[int, dict[str, Any]] = {}
        # Check every pair up front: a mismatched grid is an error now, not mid-training.
        for index in range(len(self.pairs)):
            check_same_grid(self._read_image(index), read_label_map(self.pairs[index][1]))

    def _read_image(self, index: int) -> Volume:
        image_path = self.pairs[index][0]
        return read_volume(image_path, modality=self.modality, series_uid=self.series_uids[index])

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index not in self._items:
            image_path, label_path = self.pairs[index]
            image = self._read_image(index)
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
