"""Few-shot in-context segmentation with a pretrained encoder and its MASS head.

Given one annotated *support* volume and an unannotated *query* volume, the in-context head
from pretraining (:class:`omnienc.pretext.incontext.InContextHead`) segments in the query the
structure the support mask shows, with no training: the support crop around the mask and the
mask itself play the reference and its task, and the query is swept by MONAI's sliding-window
inference (MASS, https://arxiv.org/abs/2603.13660, evaluates its pretrained model this way).

* :func:`segment_fewshot` works on :class:`~omnienc.io.Volume` objects and returns the
  probability map and the mask on the query's native grid;
* :func:`segment_files` reads a checkpoint and files, checks them, and writes the mask as a
  uint8 NIfTI aligned voxel-for-voxel with the query file.

Both default the reference crop and the query windows to :func:`default_window`: MASS's
192 mm field of view at the encoder's spacing (96 voxels at 2 mm), not the pretraining crop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.inferers import sliding_window_inference
from nibabel import orientations
from scipy import ndimage
from torch import nn

from omnienc.checkpoint import load_checkpoint_config, load_encoder, load_extra, state_mismatch
from omnienc.config import positive_int_triple
from omnienc.data.folder import check_not_constant
from omnienc.data.labeled import check_same_grid, read_label_map
from omnienc.encoders import Encoder
from omnienc.errors import CheckpointError, DataError
from omnienc.io import Volume, file_suffix, read_volume, write_volume
from omnienc.preprocessing import Preprocessing
from omnienc.pretext.incontext import HeadConfig, InContextHead
from omnienc.transforms import centred_crop, fewshot_window, preprocess_volume

HEAD_NAME = "incontext_head"
DEFAULT_CROP = (64, 64, 64)
# Formats whose voxel order segment_files restores in its output (nibabel reads their affine).
_NIBABEL_GRID_SUFFIXES = (".nii", ".nii.gz", ".mgh", ".mgz")


def resample_to_grid(
    array: np.ndarray,
    affine: np.ndarray,
    shape: Sequence[int],
    target_affine: np.ndarray,
    order: int = 1,
) -> np.ndarray:
    """Resample a volume onto another voxel grid of the same world (trilinear by default).

    Target voxel ``o`` takes the value at source index ``inv(affine) @ target_affine @ o``
    (voxel centres at integer indices, as NIfTI and MONAI define them); outside the source the
    nearest edge value is used.

    Args:
        array: ``(X, Y, Z)`` source values.
        affine: ``(4, 4)`` voxel-to-world matrix of ``array``.
        shape: ``(X', Y', Z')`` of the target grid.
        target_affine: ``(4, 4)`` voxel-to-world matrix of the target grid.
        order: Spline order (0 nearest, 1 trilinear).

    Returns:
        ``(X', Y', Z')`` float32.
    """
    m = np.linalg.inv(np.asarray(affine, np.float64)) @ np.asarray(target_affine, np.float64)
    out = ndimage.affine_transform(
        np.asarray(array, np.float32),
        m[:3, :3],
        offset=m[:3, 3],
        output_shape=tuple(int(s) for s in shape),
        order=order,
        mode="nearest",
    )
    return np.asarray(out, dtype=np.float32)


def _check_args(crop_size: Sequence[int], overlap: float, batch_size: int) -> tuple[int, int, int]:
    """Validate the sliding-window arguments; returns the crop size as three ints."""
    size = positive_int_triple("crop_size", crop_size)
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return size


def default_window(
    encoder: Encoder,
    preprocessing: Preprocessing,
    pretraining_crop: Sequence[int] | None = None,
) -> tuple[int, int, int]:
    """The reference crop and window size of few-shot segmentation unless one is asked for.

    :data:`~omnienc.transforms.FEWSHOT_FIELD_OF_VIEW_MM` at the preprocessing spacing, a
    multiple of the encoder's deepest stride (:func:`~omnienc.transforms.fewshot_window`); an
    encoder that keeps the native grid (``spacing=None``) gets its pretraining crop, else
    :data:`DEFAULT_CROP`.

    Args:
        encoder: The encoder (its ``feature_info`` reductions give the stride).
        preprocessing: Its preprocessing.
        pretraining_crop: The checkpoint's ``meta["crop_size"]``, if any.

    Returns:
        ``(S_x, S_y, S_z)`` voxels.
    """
    stride = max(int(f["reduction"]) for f in encoder.feature_info)
    window = fewshot_window(preprocessing.spacing, stride)
    if window is None:
        c = [int(v) for v in pretraining_crop or DEFAULT_CROP]
        window = (c[0], c[1], c[2])
    return window


def _device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter (CPU for a module without parameters)."""
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def segment_fewshot(
    encoder: Encoder,
    head: InContextHead,
    preprocessing: Preprocessing,
    support_image: Volume,
    support_mask: np.ndarray,
    query_image: Volume,
    crop_size: Sequence[int] | None = None,
    overlap: float = 0.5,
    threshold: float = 0.5,
    batch_size: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """Segment in the query what the support mask shows in the support image.

    Both volumes get the checkpoint's orientation, spacing and intensity normalisation but no
    foreground crop and no pad/crop to a fixed size, so the query grid maps back exactly. The
    reference is the ``crop_size`` support crop centred on the mask's bounding box (padded
    where the volume ends), with the mask as its one task; its features are computed once.
    The query is swept with ``sliding_window_inference`` (Gaussian blending of the per-window
    sigmoid probabilities), and the probability map is resampled trilinearly onto the query's
    native grid.

    Args:
        encoder: A (pretrained) encoder; its device is used.
        head: The in-context head built for ``encoder.feature_info``.
        preprocessing: The preprocessing the encoder was trained with.
        support_image: The annotated volume.
        support_mask: ``(X, Y, Z)`` bool mask on ``support_image``'s grid.
        query_image: The volume to segment.
        crop_size: ``(S_x, S_y, S_z)`` of the reference crop and the sliding windows; default
            :func:`default_window` (192 mm at the preprocessing spacing; :data:`DEFAULT_CROP`
            for a native-grid encoder, where :func:`segment_files` uses the checkpoint's
            pretraining crop). Memory grows with the window times ``batch_size``.
        overlap: Fraction of a window shared with its neighbours, in ``[0, 1)``.
        threshold: Probability above which a voxel is in the mask.
        batch_size: Windows per encoder call.

    Returns:
        ``(probabilities, mask)``, ``(X_q, Y_q, Z_q)`` float32 in [0, 1] and bool, on
        ``query_image``'s grid (``query_image.shape``, ``query_image.affine``).

    Raises:
        ValueError: The mask does not match the support grid, is empty, or is empty after
            resampling to the preprocessing spacing; or an argument is out of range.
    """
    window = default_window(encoder, preprocessing) if crop_size is None else crop_size
    size = _check_args(window, overlap, batch_size)
    if support_mask.shape != support_image.shape:
        raise ValueError(
            f"support mask shape {support_mask.shape} differs from the support image "
            f"{support_image.shape}"
        )
    if not support_mask.any():
        raise ValueError("the support mask is empty")
    pre = dataclasses.replace(preprocessing, crop_foreground=False, spatial_size=None)
    support = preprocess_volume(support_image, pre, label=support_mask.astype(np.uint8))
    mask = support["label"][0] > 0
    if not mask.any():
        raise ValueError(
            f"the support mask ({int(support_mask.sum())} voxels) vanished when resampled to "
            f"{pre.spacing} mm spacing; use a coarser structure or a finer spacing"
        )
    ref_image, ref_mask = centred_crop(support["image"][0], mask, size)
    query = preprocess_volume(query_image, pre)
    q = query["image"]

    device = _device(encoder)
    modes = (encoder.training, head.training)
    encoder.eval()
    head.eval()
    try:
        with torch.inference_mode():
            ref = torch.from_numpy(ref_image)[None, None].to(device)
            ref_masks = torch.from_numpy(ref_mask)[None, None].to(device)
            ref_feats = encoder.forward_intermediates(ref)

            def predict(windows: torch.Tensor) -> torch.Tensor:
                n = windows.shape[0]
                query_feats = encoder.forward_intermediates(windows)
                logits = head(
                    [f.expand(n, -1, -1, -1, -1) for f in ref_feats],
                    ref_masks.expand(n, -1, -1, -1, -1),
                    query_feats,
                    windows.shape[2:],
                )
                return torch.sigmoid(logits.float())

            prob_t = sliding_window_inference(
                torch.from_numpy(q)[None].to(device),
                roi_size=size,
                sw_batch_size=batch_size,
                predictor=predict,
                overlap=overlap,
                mode="gaussian",
                padding_mode="constant",
                cval=float(q.min()),
            )
        assert isinstance(prob_t, torch.Tensor)
        prob_pre = prob_t.as_subclass(torch.Tensor)[0, 0].float().cpu().numpy()
    finally:
        encoder.train(modes[0])
        head.train(modes[1])
    prob = resample_to_grid(prob_pre, query["affine"], query_image.shape, query_image.affine)
    np.clip(prob, 0.0, 1.0, out=prob)  # in place: one native-grid float32 copy fewer
    return prob, prob > threshold


def _to_file_order(array: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """Undo :func:`omnienc.io.read_volume`'s reorientation to RAS for a NIfTI/MGH file.

    Args:
        array: ``(X, Y, Z)`` on the RAS grid ``read_volume(path)`` returned.
        path: The file it was read from.

    Returns:
        The array in the file's own voxel order and the file's affine, or ``None`` for formats
        whose header nibabel does not read (they are written on the RAS grid).
    """
    if file_suffix(path) not in _NIBABEL_GRID_SUFFIXES or not path.is_file():
        return None
    img = nib.load(path)
    affine = np.asarray(img.affine, dtype=np.float64)  # type: ignore[attr-defined]
    back = orientations.ornt_transform(
        orientations.axcodes2ornt(("R", "A", "S")), orientations.io_orientation(affine)
    )
    out = orientations.apply_orientation(array, back)
    if tuple(out.shape) != tuple(img.shape[:3]):  # type: ignore[attr-defined]
        return None
    return np.ascontiguousarray(out), affine


def load_incontext_head(
    checkpoint_dir: str | Path, encoder: Encoder
) -> tuple[InContextHead, dict[str, Any]]:
    """Load the in-context head saved beside an encoder by ``omnienc pretrain``.

    Args:
        checkpoint_dir: The checkpoint folder.
        encoder: The encoder loaded from it (its ``feature_info`` shapes the head).

    Returns:
        The head in eval mode and the checkpoint's ``meta`` dict.

    Raises:
        CheckpointError: The checkpoint has no head, or its config or weights do not fit.
    """
    path = Path(checkpoint_dir)
    config = load_checkpoint_config(path)
    meta = config.get("meta") or {}
    if HEAD_NAME not in (config.get("extra") or {}) or HEAD_NAME not in meta:
        raise CheckpointError(
            path,
            f"the checkpoint has no in-context head ({HEAD_NAME!r} weights and meta config): "
            "it was not made by `omnienc pretrain`, so it cannot do few-shot segmentation",
        )
    try:
        head = InContextHead(encoder.feature_info, HeadConfig.from_dict(meta[HEAD_NAME]))
    except (TypeError, ValueError) as e:
        raise CheckpointError(path, f"invalid in-context head config in meta: {e}") from e
    state = load_extra(path, HEAD_NAME)
    problems = state_mismatch(head.state_dict(), state)
    if problems:
        raise CheckpointError(
            path,
            f"{HEAD_NAME} weights do not match the head that its config and the encoder "
            f"({encoder.family}, feature channels {[f['num_chs'] for f in encoder.feature_info]}) "
            "build: " + "; ".join(problems),
        )
    head.load_state_dict(state, strict=True)
    return head.eval(), meta


def segment_files(
    checkpoint_dir: str | Path,
    support_image_path: str | Path,
    support_mask_path: str | Path,
    query_path: str | Path,
    output_path: str | Path,
    label: int | None = None,
    *,
    crop_size: Sequence[int] | None = None,
    overlap: float = 0.5,
    threshold: float = 0.5,
    batch_size: int = 4,
    probabilities_path: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> Path:
    """Few-shot segmentation from files: support image + mask, query -> query mask file.

    Args:
        checkpoint_dir: A checkpoint written by ``omnienc pretrain``: encoder, preprocessing,
            ``incontext_head`` weights, and ``meta["incontext_head"]`` (a ``HeadConfig`` dict)
            and ``meta["crop_size"]``.
        support_image_path: The annotated volume.
        support_mask_path: Its label map on the same grid.
        query_path: The volume to segment.
        output_path: ``.nii`` or ``.nii.gz`` file for the binary mask (uint8).
        label: Segment the voxels of this label value; ``None`` means every label ``> 0``.
        crop_size: Reference crop and window size; default :func:`default_window` (192 mm at
            the checkpoint's spacing; ``meta["crop_size"]`` for a native-grid encoder).
        overlap: Sliding-window overlap in ``[0, 1)``.
        threshold: Probability threshold of the mask.
        batch_size: Windows per encoder call.
        probabilities_path: Optionally also write the float32 probability map here.
        device: Where to run the encoder and head.

    Returns:
        ``output_path``. The mask has the query file's shape and affine: for NIfTI/MGH queries
        its own voxel order, for other formats (DICOM, MHA, NRRD) the RAS grid
        :func:`omnienc.io.read_volume` gives, which covers the same voxels.

    Raises:
        CheckpointError: The checkpoint is unreadable or has no in-context head.
        VolumeReadError: A volume cannot be read.
        DataError: Support image and mask grids differ, the selected label is absent, or the
            support image or the query is constant.
    """
    checkpoint_dir, mask_path = Path(checkpoint_dir), Path(support_mask_path)
    query_path, output_path = Path(query_path), Path(output_path)
    encoder, preprocessing = load_encoder(checkpoint_dir)
    head, meta = load_incontext_head(checkpoint_dir, encoder)
    encoder.to(device)
    head.to(device)
    if crop_size is None:
        crop_size = default_window(encoder, preprocessing, meta.get("crop_size"))
    size = _check_args(crop_size, overlap, batch_size)

    support = read_volume(support_image_path)
    check_not_constant(support, "nothing to segment")
    labels = read_label_map(mask_path)
    check_same_grid(support, labels)
    mask = labels.array == label if label is not None else labels.array > 0
    if not mask.any():
        present = np.unique(labels.array)
        present = present[present > 0][:20]
        what = f"no voxel has label {label}" if label is not None else "no voxel is labelled"
        raise DataError(
            mask_path,
            f"support mask is empty: {what} (labels present: "
            f"{', '.join(str(int(v)) for v in present) or 'none'})",
        )
    query = read_volume(query_path)
    check_not_constant(query, "nothing to segment")
    try:
        prob, binary = segment_fewshot(
            encoder,
            head,
            preprocessing,
            support,
            mask,
            query,
            crop_size=size,
            overlap=overlap,
            threshold=threshold,
            batch_size=batch_size,
        )
    except ValueError as e:  # the arguments are checked above: this is about the mask
        raise DataError(mask_path, str(e)) from e

    outputs: list[tuple[Path, np.ndarray, type]] = [
        (output_path, binary.astype(np.uint8), np.uint8)
    ]
    if probabilities_path is not None:
        outputs.append((Path(probabilities_path), prob, np.float32))
    for path, array, dtype in outputs:
        restored = _to_file_order(array, query_path)
        data, affine = restored if restored is not None else (array, query.affine)
        write_volume(data, path, affine=affine, dtype=dtype)
    return output_path
