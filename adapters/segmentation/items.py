"""Labelled items of the segmentation adapter, and the class-balanced random crops it trains on.

Items are :class:`SegItem` objects: a preprocessed image ``(C, X, Y, Z)`` and its integer label
map ``(1, X, Y, Z)`` on the same grid, labels ``0..num_classes - 1`` (0 = background). Build them
from image/label files with :func:`items_from_pairs` (which keeps a chosen set of structures and
renumbers them) or from MedSegBench with :func:`medsegbench_items`. :class:`RandomCrops` cuts
class-balanced crops (MONAI's ``RandCropByLabelClassesd``).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import ClassesToIndicesd, RandCropByLabelClassesd
from torch.utils.data import Dataset

from omnienc.data.labeled import LabeledVolumes
from omnienc.data.medsegbench import MedSegBench
from omnienc.preprocessing import Preprocessing

_INDICES_KEY = "label_cls_indices"


@dataclass
class SegItem:
    """One labelled volume on one grid.

    Attributes:
        image: ``(C, X, Y, Z)`` float32, preprocessed as the encoder expects.
        label: ``(1, X, Y, Z)`` int64, ``0`` background, ``1..K-1`` structures.
        id: Where it came from (a file path, a MedSegBench id).
    """

    image: torch.Tensor
    label: torch.Tensor
    id: str

    def __post_init__(self) -> None:
        if self.image.ndim != 4 or self.label.ndim != 4 or self.label.shape[0] != 1:
            raise ValueError(
                f"{self.id}: expected image (C, X, Y, Z) and label (1, X, Y, Z), got "
                f"{tuple(self.image.shape)} and {tuple(self.label.shape)}"
            )
        if self.image.shape[1:] != self.label.shape[1:]:
            raise ValueError(
                f"{self.id}: image grid {tuple(self.image.shape[1:])} differs from its label "
                f"grid {tuple(self.label.shape[1:])}"
            )
        self.image = self.image.float()
        self.label = self.label.long()


def select_structures(label: torch.Tensor, structures: Sequence[int]) -> torch.Tensor:
    """Keep some labels and renumber them ``1..len(structures)``; everything else becomes 0.

    Args:
        label: Integer label map of any shape.
        structures: Label values to keep, in the order of their new numbers.

    Returns:
        int64 tensor of ``label``'s shape.
    """
    if not structures or len(set(structures)) != len(structures) or min(structures) < 1:
        raise ValueError(f"structures must be distinct labels >= 1, got {list(structures)}")
    out = torch.zeros_like(label, dtype=torch.long)
    for new, old in enumerate(structures, start=1):
        out[label == old] = new
    return out


def items_from_pairs(
    pairs: Sequence[tuple[str | Path, str | Path]],
    preprocessing: Preprocessing,
    structures: Sequence[int] | None = None,
    modality: str | None = None,
) -> list[SegItem]:
    """Preprocess image/label-map file pairs into items.

    Args:
        pairs: ``[(image_path, label_path), ...]`` on identical grids.
        preprocessing: The encoder's preprocessing (labels follow by nearest neighbour).
        structures: Keep only these label values, renumbered ``1..n`` (see
            :func:`select_structures`); ``None`` keeps the labels as stored.
        modality: Force the modality of every image.

    Raises:
        DataError: A label grid differs from its image (the message names both files) or a
            label map is not integer-valued.
        VolumeReadError: A file cannot be read.
    """
    ds = LabeledVolumes(pairs, preprocessing=preprocessing, modality=modality)
    items = []
    for i in range(len(ds)):
        d = ds[i]
        label = d["label"] if structures is None else select_structures(d["label"], structures)
        items.append(SegItem(d["image"], label, d["id"]))
    return items


def medsegbench_items(dataset: MedSegBench) -> list[SegItem]:
    """Items of a MedSegBench split: the lifted ``(1, 16, H, W)`` images and label maps.

    Train with ``num_classes=dataset.n_classes`` and a crop of depth 16 (the lifted depth,
    :data:`omnienc.lifting.LIFT_DEPTH`), e.g. ``(16, 64, 64)``. Dice on a lifted item is computed
    over its 16 identical slices.
    """
    return [
        SegItem(d["image"], d["mask"], d["id"]) for d in (dataset[i] for i in range(len(dataset)))
    ]


def _check_labels(items: Sequence[SegItem], num_classes: int) -> None:
    for item in items:
        top = int(item.label.max())
        if top >= num_classes or int(item.label.min()) < 0:
            raise ValueError(
                f"{item.id}: labels run from {int(item.label.min())} to {top}, but the decoder "
                f"has num_classes={num_classes} (labels 0..{num_classes - 1}); select and "
                "renumber structures first (items_from_pairs(..., structures=[...]))"
            )


def _pad_min(item: SegItem, size: Sequence[int]) -> dict[Hashable, torch.Tensor]:
    """Image and label padded (symmetrically; image minimum, label 0) to at least ``size``."""
    pads: list[int] = []
    for n, s in zip(reversed(item.image.shape[1:]), reversed(tuple(size)), strict=True):
        extra = max(0, int(s) - int(n))
        pads += [extra // 2, extra - extra // 2]
    image = F.pad(item.image, pads, value=float(item.image.min()))
    return {"image": image, "label": F.pad(item.label, pads, value=0)}


class RandomCrops(Dataset[dict[str, torch.Tensor]]):
    """``length`` class-balanced random crops of labelled items, fixed by ``seed`` and index.

    Each crop is centred on a voxel of a class drawn uniformly among the classes present in a
    uniformly drawn item (MONAI ``RandCropByLabelClassesd``, background counting as a class),
    so a small organ is seen as often as the background.

    Args:
        items: The training items (padded here to at least ``crop_size``).
        crop_size: ``(S_x, S_y, S_z)``.
        num_classes: ``K``.
        length: Number of crops (steps x batch size).
        seed: Fixes every crop.
    """

    def __init__(
        self,
        items: Sequence[SegItem],
        crop_size: Sequence[int],
        num_classes: int,
        length: int,
        seed: int,
    ) -> None:
        if not items:
            raise ValueError("RandomCrops needs at least one item")
        indexer = ClassesToIndicesd(keys="label", num_classes=num_classes)
        self._data = [indexer(_pad_min(item, crop_size)) for item in items]
        self.cropper = RandCropByLabelClassesd(
            keys=["image", "label"],
            label_key="label",
            spatial_size=tuple(int(s) for s in crop_size),
            num_classes=num_classes,
            indices_key=_INDICES_KEY,
            warn=False,
        )
        self.length, self.seed = int(length), int(seed)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, index])
        data = self._data[int(rng.integers(len(self._data)))]
        self.cropper.set_random_state(seed=int(rng.integers(2**31)))
        out = self.cropper(data)[0]
        return {k: torch.as_tensor(out[k]).as_subclass(torch.Tensor) for k in ("image", "label")}
