"""Sliding-window inference and Dice scores of a segmentation model.

:func:`evaluate_segmentation` sweeps whole volumes with MONAI's ``sliding_window_inference`` and
scores them with ``DiceMetric``; :func:`predict_volume` returns a label map on a file's own grid
(:func:`resample_argmax` takes the probabilities back to it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric
from monai.transforms import SpatialResample
from torch import nn

from omnienc.adapters.segmentation.decoder import SegmentationModel
from omnienc.adapters.segmentation.items import SegItem, _check_labels
from omnienc.io import Volume, read_volume
from omnienc.preprocessing import Preprocessing
from omnienc.transforms import preprocess_volume


def _device(module: nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def sliding_window_probabilities(
    model: nn.Module,
    image: torch.Tensor,
    roi_size: Sequence[int],
    overlap: float = 0.25,
    sw_batch_size: int = 4,
) -> torch.Tensor:
    """Class probabilities of a whole volume by MONAI's sliding-window inference.

    Windows of ``roi_size`` (the training crop) overlap by ``overlap``; their softmax
    probabilities are blended with Gaussian weights; a volume smaller than a window is padded
    with its minimum and the padding cut off again.

    Args:
        model: Maps ``(n, C, *roi_size)`` to ``(n, K, *roi_size)`` logits.
        image: ``(B, C, X, Y, Z)``.
        roi_size: Window size ``(S_x, S_y, S_z)``.
        overlap: In ``[0, 1)``.
        sw_batch_size: Windows per forward pass.

    Returns:
        ``(B, K, X, Y, Z)`` float32 probabilities on ``image``'s device.
    """
    device = _device(model)
    out = sliding_window_inference(
        image.to(device),
        roi_size=tuple(int(s) for s in roi_size),
        sw_batch_size=sw_batch_size,
        predictor=lambda w: torch.softmax(model(w).float(), dim=1),
        overlap=overlap,
        mode="gaussian",
        padding_mode="constant",
        cval=float(image.min()),
    )
    assert isinstance(out, torch.Tensor)
    return out.as_subclass(torch.Tensor).to(image.device)


def dice_scores(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Dice of every foreground class, by MONAI's ``DiceMetric`` on label maps.

    Args:
        pred: ``(B, 1, X, Y, Z)`` predicted labels.
        label: ``(B, 1, X, Y, Z)`` true labels.
        num_classes: ``K``, background included.

    Returns:
        ``(B, K - 1)``; NaN where a class is absent from ``label`` (``ignore_empty``).
    """
    metric = DiceMetric(include_background=False, reduction="none", num_classes=num_classes)
    scores = metric(pred.float(), label.float())
    assert isinstance(scores, torch.Tensor)
    return scores.float().cpu()


def _nan_to_none(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def evaluate_segmentation(
    model: SegmentationModel,
    items: Sequence[SegItem],
    class_names: Sequence[str] | None = None,
    roi_size: Sequence[int] | None = None,
    overlap: float = 0.25,
    sw_batch_size: int = 4,
) -> dict[str, Any]:
    """Dice per structure on whole items (their preprocessed grid), by sliding windows.

    Args:
        model: A trained model.
        items: Labelled volumes.
        class_names: Names of classes ``1..K-1`` (default ``"1"``, ``"2"``, ...).
        roi_size: Window size (default ``model.roi_size``).
        overlap: Sliding-window overlap.
        sw_batch_size: Windows per forward pass.

    Returns:
        ``{"dice": {name: mean over the items that contain it, or None}, "mean_dice": mean of
        those, "per_item": [{"id", "dice": {name: value or None}}], "n_items"}``.
    """
    k = model.decoder.num_classes
    names = list(class_names) if class_names is not None else [str(i) for i in range(1, k)]
    if len(names) != k - 1:
        raise ValueError(f"need {k - 1} class names (background excluded), got {len(names)}")
    roi = roi_size or model.roi_size
    if roi is None:
        raise ValueError(
            "give roi_size: the model has none (it was not made by train_segmentation)"
        )
    _check_labels(items, k)
    was_training = model.training
    model.eval()
    rows = []
    try:
        with torch.inference_mode():
            for item in items:
                prob = sliding_window_probabilities(
                    model, item.image[None], roi, overlap, sw_batch_size
                )
                rows.append(dice_scores(prob.argmax(1, keepdim=True), item.label[None], k)[0])
    finally:
        model.train(was_training)
    scores = torch.stack(rows) if rows else torch.full((0, k - 1), float("nan"))
    per_class = [_nan_to_none(float(v)) for v in torch.nanmean(scores, dim=0)]
    present = [v for v in per_class if v is not None]
    return {
        "dice": dict(zip(names, per_class, strict=True)),
        "mean_dice": float(np.mean(present)) if present else None,
        "per_item": [
            {
                "id": it.id,
                "dice": {n: _nan_to_none(float(v)) for n, v in zip(names, r, strict=True)},
            }
            for it, r in zip(items, rows, strict=True)
        ],
        "n_items": len(items),
    }


def resample_argmax(
    prob: torch.Tensor, affine: np.ndarray, shape: Sequence[int], target_affine: np.ndarray
) -> np.ndarray:
    """Resample class probabilities onto another grid of the same world and take the argmax.

    One class at a time (MONAI ``SpatialResample``, trilinear, edge values outside), keeping a
    running maximum, so memory stays at two target-sized maps whatever ``K`` is.

    Args:
        prob: ``(K, X', Y', Z')`` probabilities on the grid of ``affine``.
        affine: ``(4, 4)`` voxel-to-world matrix of ``prob``.
        shape: ``(X, Y, Z)`` of the target grid.
        target_affine: ``(4, 4)`` voxel-to-world matrix of the target grid.

    Returns:
        ``(X, Y, Z)`` int64 labels.
    """
    resample = SpatialResample(mode="bilinear", padding_mode="border")
    src = torch.as_tensor(np.asarray(affine, np.float64))
    dst = torch.as_tensor(np.asarray(target_affine, np.float64))
    size = tuple(int(s) for s in shape)
    best = torch.full(size, -1.0)
    labels = torch.zeros(size, dtype=torch.long)
    for k in range(prob.shape[0]):
        p = resample(MetaTensor(prob[k : k + 1].float().cpu(), affine=src), dst, spatial_size=size)
        p = torch.as_tensor(p).as_subclass(torch.Tensor)[0].float()
        better = p > best
        best = torch.where(better, p, best)
        labels[better] = k
    return labels.numpy()


def predict_volume(
    model: nn.Module,
    volume_path: str | Path | Volume,
    preprocessing: Preprocessing,
    roi_size: Sequence[int] | None = None,
    overlap: float = 0.25,
    sw_batch_size: int = 4,
    modality: str | None = None,
) -> Volume:
    """Segment a volume file and return the label map on its own grid.

    The volume gets ``preprocessing`` without the foreground crop and the fixed-size pad/crop,
    so that the preprocessed grid covers the whole file; the sliding-window probabilities are
    resampled onto the grid :func:`omnienc.io.read_volume` gives (the file's voxels in RAS axis
    order, its affine) and the most probable class is taken per voxel.

    Args:
        model: A trained :class:`SegmentationModel` (any module mapping ``(n, C, *roi)`` to
            ``(n, K, *roi)`` logits works).
        volume_path: Image file or DICOM folder, or a :class:`~omnienc.io.Volume` already read
            with :func:`~omnienc.io.read_volume`.
        preprocessing: The preprocessing the model was trained with.
        roi_size: Window size (default ``model.roi_size``).
        overlap: Sliding-window overlap.
        sw_batch_size: Windows per forward pass.
        modality: Force the image modality.

    Returns:
        A :class:`~omnienc.io.Volume` like :func:`omnienc.data.labeled.read_label_map` returns:
        ``array`` ``(X, Y, Z)`` float32 holding integer labels, and the image's ``affine``,
        ``spacing`` and ``source``. Write it with ``write_volume(vol, path, dtype=np.uint8)``.

    Raises:
        VolumeReadError: The file cannot be read.
        ValueError: No ``roi_size`` given and the model has none.
    """
    roi = roi_size or getattr(model, "roi_size", None)
    if roi is None:
        raise ValueError(
            "give roi_size: the model has none (it was not made by train_segmentation)"
        )
    volume = (
        volume_path
        if isinstance(volume_path, Volume)
        else read_volume(volume_path, modality=modality)
    )
    pre = dataclasses.replace(preprocessing, crop_foreground=False, spatial_size=None)
    out = preprocess_volume(volume, pre)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            image = torch.from_numpy(out["image"])[None]
            prob = sliding_window_probabilities(model, image, roi, overlap, sw_batch_size)[0]
    finally:
        model.train(was_training)
    labels = resample_argmax(prob, out["affine"], volume.shape, volume.affine)
    return Volume(
        array=labels.astype(np.float32),
        affine=volume.affine.copy(),
        spacing=volume.spacing,
        modality="unknown",
        modality_source="none",
        source=volume.source,
    )
