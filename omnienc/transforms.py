"""Deterministic preprocessing as MONAI dictionary-transform pipelines.

``build_preprocessing(pre)`` turns a :class:`~omnienc.preprocessing.Preprocessing` into a MONAI
``Compose`` over dictionaries with an ``"image"`` (and optionally a ``"label"``) channel-first
``MetaTensor`` and a ``"modality"`` string:

1. ``Orientationd`` to RAS (a no-op for volumes from :func:`omnienc.io.read_volume`);
2. ``Spacingd`` to ``pre.spacing`` (bilinear for images, nearest for labels);
3. :class:`ModalityNormalized`: CT is clipped to the HU window and scaled to [0, 1]; MR, PET,
   SPECT and unknown volumes are clipped to percentiles and z-scored with foreground statistics;
4. ``CropForegroundd`` to the body (see :func:`select_foreground`);
5. a symmetric pad (images with their minimum, labels with 0) and centre crop to
   ``pre.spatial_size``.

:func:`centred_crop` cuts the fixed-size crop centred on a mask (the reference crop of
few-shot segmentation) and :func:`fewshot_window` sizes it and the query windows from a field
of view in mm. Randomness never lives here: random views belong to the pretext.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    CropForegroundd,
    MapTransform,
    Orientationd,
    Spacingd,
    SpatialPad,
    Transform,
)

from omnienc.io import Volume
from omnienc.preprocessing import Preprocessing


class ModalityNormalize(Transform):
    """Per-modality intensity normalisation of one channel-first image.

    CT: clip to ``ct_window`` (HU) and scale linearly to [0, 1]. MR, PET, SPECT and unknown: clip
    to the ``percentiles`` of the volume, then z-score with the mean and standard deviation of
    the foreground (voxels above the lower clip value; all voxels if fewer than 1% are). A
    constant volume becomes all zeros.

    Args:
        ct_window: ``(low, high)`` in HU.
        percentiles: ``(low, high)`` in percent.
    """

    def __init__(self, ct_window: tuple[float, float], percentiles: tuple[float, float]) -> None:
        self.ct_window = ct_window
        self.percentiles = percentiles

    def __call__(self, img: torch.Tensor, modality: str) -> torch.Tensor:  # type: ignore[override]
        """Normalise ``img``.

        Args:
            img: ``(C, X, Y, Z)`` float tensor.
            modality: ``CT``, ``MR``, ``PET``, ``SPECT`` or ``unknown``.

        Returns:
            ``(C, X, Y, Z)`` float32, same type (MetaTensor stays MetaTensor).
        """
        x = img.float()
        if modality == "CT":
            lo, hi = self.ct_window
            return (x.clamp(lo, hi) - lo) / (hi - lo)
        flat = x.detach().reshape(-1)
        if flat.numel() > 2_000_000:  # quantile cost: estimate on a strided subsample
            flat = flat[:: flat.numel() // 2_000_000 + 1]
        q = torch.tensor([self.percentiles[0] / 100.0, self.percentiles[1] / 100.0])
        lo_t, hi_t = torch.quantile(flat.float().as_subclass(torch.Tensor), q)
        lo, hi = float(lo_t), float(hi_t)
        x = x.clamp(lo, hi)
        fg = x > lo
        if int(fg.sum()) < 0.01 * x.numel():
            fg = torch.ones_like(x, dtype=torch.bool)
        values = x.as_subclass(torch.Tensor)[fg.as_subclass(torch.Tensor)]
        mean = float(values.mean())
        std = float(values.std()) if values.numel() > 1 else 0.0
        return (x - mean) / std if std > 1e-8 else x - mean


class ModalityNormalized(MapTransform):
    """Dictionary wrapper of :class:`ModalityNormalize`; the modality comes from the data."""

    def __init__(
        self,
        keys: KeysCollection,
        ct_window: tuple[float, float],
        percentiles: tuple[float, float],
        modality_key: str = "modality",
    ) -> None:
        super().__init__(keys)
        self.normalize = ModalityNormalize(ct_window, percentiles)
        self.modality_key = modality_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        modality = str(d.get(self.modality_key, "unknown"))
        for key in self.key_iterator(d):
            d[key] = self.normalize(d[key], modality)
        return d


class PadWithBackgroundd(MapTransform):
    """Pad symmetrically to at least ``spatial_size``: images with their minimum, labels with 0.

    ``np.pad``'s ``"minimum"`` mode pads each line with that line's own minimum, which copies
    tissue into the margin; the image-wide minimum is the background after normalisation.
    """

    def __init__(self, keys: KeysCollection, spatial_size: tuple[int, int, int]) -> None:
        super().__init__(keys)
        self.spatial_size = spatial_size

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = 0.0 if key == "label" else float(d[key].min())
            d[key] = SpatialPad(self.spatial_size, mode="constant", value=value)(d[key])
        return d


def select_foreground(img: torch.Tensor) -> torch.Tensor:
    """Body mask for cropping: voxels above the minimum plus 5% of the (minimum, p99) range.

    After normalisation the background (air in CT, empty space in MR) sits at the image minimum;
    5% of the range above it keeps lung and soft tissue and drops scanner noise. A constant
    image has no foreground; then the whole image is kept.

    Args:
        img: ``(C, X, Y, Z)`` normalised image.

    Returns:
        ``(C, X, Y, Z)`` boolean mask.
    """
    flat = img.detach().reshape(-1).float().as_subclass(torch.Tensor)
    if flat.numel() > 2_000_000:
        flat = flat[:: flat.numel() // 2_000_000 + 1]
    vmin = float(flat.min())
    p99 = float(torch.quantile(flat, 0.99))
    mask = img > vmin + 0.05 * (p99 - vmin)
    return mask if bool(mask.any()) else torch.ones_like(img, dtype=torch.bool)


def build_preprocessing(pre: Preprocessing, with_label: bool = False) -> Compose:
    """Build the MONAI pipeline for ``pre``.

    Args:
        pre: The recorded preprocessing parameters.
        with_label: Also transform a ``"label"`` entry (nearest-neighbour, never normalised).

    Returns:
        A ``Compose`` over dicts ``{"image": MetaTensor (1, X, Y, Z), ["label": ...,]
        "modality": str}``.
    """
    keys = ["image", "label"] if with_label else ["image"]
    interp = ["bilinear", "nearest"] if with_label else ["bilinear"]
    # Explicit labels: RAS means nibabel's convention (axes point to Right, Anterior, Superior).
    steps: list[Any] = [
        Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))
    ]
    if pre.spacing is not None:
        steps.append(Spacingd(keys=keys, pixdim=pre.spacing, mode=interp))
    steps.append(
        ModalityNormalized(keys="image", ct_window=pre.ct_window, percentiles=pre.percentiles)
    )
    if pre.crop_foreground:
        steps.append(
            CropForegroundd(
                keys=keys,
                source_key="image",
                select_fn=select_foreground,
                margin=pre.foreground_margin,
                allow_smaller=True,
            )
        )
    if pre.spatial_size is not None:
        steps.append(PadWithBackgroundd(keys=keys, spatial_size=pre.spatial_size))
        steps.append(CenterSpatialCropd(keys=keys, roi_size=pre.spatial_size))
    return Compose(steps)


def preprocess_volume(
    volume: Volume, pre: Preprocessing, label: np.ndarray | None = None
) -> dict[str, Any]:
    """Run the pipeline on one volume (and its label map on the same grid).

    Args:
        volume: A volume from :func:`omnienc.io.read_volume`.
        pre: Preprocessing parameters.
        label: Optional ``(X, Y, Z)`` integer label map on ``volume``'s grid.

    Returns:
        ``{"image": (1, X', Y', Z') float32 ndarray, "affine": (4, 4) ndarray,
        ["label": (1, X', Y', Z') int64 ndarray,] "modality": str}``.
    """
    data: dict[str, Any] = {
        "image": MetaTensor(
            torch.from_numpy(volume.array[None]), affine=torch.from_numpy(volume.affine)
        ),
        "modality": volume.modality,
    }
    if label is not None:
        data["label"] = MetaTensor(
            torch.from_numpy(np.asarray(label, dtype=np.float32)[None]),
            affine=torch.from_numpy(volume.affine),
        )
    out = build_preprocessing(pre, with_label=label is not None)(data)
    image = out["image"]
    result: dict[str, Any] = {
        "image": image.as_subclass(torch.Tensor).numpy().astype(np.float32, copy=False),
        "affine": np.asarray(image.affine, dtype=np.float64),
        "modality": volume.modality,
    }
    if label is not None:
        result["label"] = np.rint(out["label"].as_subclass(torch.Tensor).numpy()).astype(np.int64)
    return result


def centred_crop(
    image: np.ndarray, mask: np.ndarray, size: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """The ``size`` crop centred on the mask's bounding box, padded where the volume ends.

    The reference crop of few-shot segmentation, the pretext's
    (:func:`omnienc.pretext.segment.segment_fewshot`) and the frozen-feature adapters' alike:
    the centre of the box rounds up; a mask larger than the crop is cut at its border.

    Args:
        image: ``(X, Y, Z)`` preprocessed image.
        mask: ``(X, Y, Z)`` bool, not empty.
        size: ``(S_x, S_y, S_z)``.

    Returns:
        The image crop (padded with the image minimum) and the mask crop (padded with 0), both
        ``(S_x, S_y, S_z)`` float32.

    Raises:
        ValueError: The mask is empty.
    """
    nz = np.nonzero(mask)
    if not nz[0].size:
        raise ValueError("the mask is empty")
    starts = [
        (int(a.min()) + int(a.max()) + 1) // 2 - s // 2 for a, s in zip(nz, size, strict=True)
    ]
    pad = [
        (max(0, -st), max(0, st + s - n))
        for st, s, n in zip(starts, size, image.shape, strict=True)
    ]
    box = tuple(
        slice(st + lo, st + lo + s) for st, (lo, _), s in zip(starts, pad, size, strict=True)
    )
    img = np.pad(np.asarray(image, np.float32), pad, constant_values=float(image.min()))[box]
    msk = np.pad(np.asarray(mask, np.float32), pad, constant_values=0.0)[box]
    return img, msk


FEWSHOT_FIELD_OF_VIEW_MM = 192.0
"""Field of view of few-shot segmentation's reference crop and query windows, in mm per axis.

MASS (https://arxiv.org/abs/2603.13660, its ``inference.py`` in Stanford-AIMI/MASS) pretrains
and segments with 128^3 windows of 1.5 mm: 192 mm of anatomy, enough to hold a whole organ or
brain and the tissue around it, so the head sees where a structure is *not*. The head pools
its task over a mask and scores voxels by dot products, so nothing ties it to its pretraining
crop; with the 64 mm pretraining crop it fired far from the structure
(``benchmarks/results/pretrain.md``, findings 19-22)."""


def fewshot_window(
    spacing: Sequence[float] | None,
    multiple: int = 16,
    field_of_view_mm: float = FEWSHOT_FIELD_OF_VIEW_MM,
) -> tuple[int, int, int] | None:
    """The window, in voxels, that covers ``field_of_view_mm`` at an encoder's voxel spacing.

    Each axis is ``field_of_view_mm / spacing`` rounded to the nearest multiple of ``multiple``
    (the encoder's deepest stride, so every window tiles its feature grid), at least two
    ``multiple`` (instance normalisation needs more than one voxel in the deepest feature map):
    96 at 2 mm, 128 at 1.5 mm, 48 at 4 mm for 192 mm.

    Args:
        spacing: ``(s_x, s_y, s_z)`` mm of the encoder's preprocessing, or ``None`` when it keeps
            the native grid (no window can be derived: the caller falls back).
        multiple: Round each axis to a multiple of this many voxels.
        field_of_view_mm: Extent of the window along each axis.

    Returns:
        ``(S_x, S_y, S_z)``, or ``None`` for ``spacing=None``.

    Raises:
        ValueError: A spacing, the field of view or ``multiple`` that is not positive.
    """
    if multiple < 1 or not field_of_view_mm > 0:
        raise ValueError(
            f"multiple and field_of_view_mm must be positive, got {multiple}, {field_of_view_mm}"
        )
    if spacing is None:
        return None
    mm = [float(s) for s in spacing]
    if len(mm) != 3 or not min(mm) > 0:
        raise ValueError(f"spacing must be three positive numbers in mm, got {list(spacing)}")
    size = [max(2, round(field_of_view_mm / s / multiple)) * multiple for s in mm]
    return size[0], size[1], size[2]
