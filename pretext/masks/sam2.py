"""SAM2 mask proposals: automatic masks on seed slices, propagated through the volume.

MASS (Gao et al., CVPR 2026, https://arxiv.org/abs/2603.13660) makes its class-agnostic 3D masks
with SAM2 (Ravi et al., "SAM 2: Segment Anything in Images and Videos",
https://arxiv.org/abs/2408.00714). This module follows its protocol on transformers'
``Sam2Model`` (image) and ``Sam2VideoModel`` (video), with weights from a local folder or a hub
id (``from_pretrained``; nothing is downloaded unless the user names a hub id and has internet):

1. Seed slices every ``seed_interval`` slices of ``axis`` across the body's extent.
2. Each slice becomes uint8 RGB, one intensity window per channel: for CT three HU windows
   (:data:`CT_WINDOWS`, per data set as in MASS), for MR/PET three percentile windows of the
   body's intensities.
3. Automatic masks on each seed slice: SAM2 prompted with a grid of single points inside the
   body (three masks per point), kept by predicted IoU and stability score, then 2D NMS. This
   is SAM's point-grid automatic mode on ``Sam2Model`` (one crop, no crop layers), written here
   because transformers' mask-generation pipeline targets SAM 1.
4. Each seed slice's masks are tracked forward and backward through every slice with
   ``Sam2VideoModel`` (mask prompts in a ``Sam2VideoInferenceSession``; the video API runs on
   CPU or GPU alike), giving one 3D mask per seed mask; as in MASS each keeps the largest
   connected component that touches its seed mask.
5. 3D NMS by IoU, best seed score (predicted IoU x stability) first (MASS: largest first).

:func:`omnienc.pretext.masks.propose_masks` then applies the usual body, size and IoU filters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from omnienc.config import JsonConfig
from omnienc.pretext.masks.sam2_checkpoint import Sam2Models, load_sam2

if TYPE_CHECKING:
    from omnienc.pretext.masks import MaskConfig, MaskProvider


# (center, width) in HU of the three channels. ``general``: soft tissue, lung, bone; the others
# are MASS's abdomen and chest CT windows.
CT_WINDOWS: dict[str, tuple[tuple[float, float], ...]] = {
    "general": ((40.0, 400.0), (-600.0, 1500.0), (400.0, 1800.0)),
    "abdomen": ((60.0, 350.0), (15.0, 250.0), (150.0, 1200.0)),
    "chest": ((-600.0, 1500.0), (50.0, 350.0), (500.0, 2000.0)),
}
# (low, high) percentiles of the body's intensities, one per channel (MR, PET, unknown).
PERCENTILE_WINDOWS = ((0.5, 99.5), (2.0, 98.0), (10.0, 90.0))
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # what SAM2's image and video processors normalise with
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Sam2MaskConfig(JsonConfig):
    """Parameters of the SAM2 protocol (MASS's values where it states them).

    Attributes:
        axis: Axis of the ``(X, Y, Z)`` RAS volume that seed slices cut (2: axial).
        seed_interval: One seed slice every this many slices.
        modality: ``CT`` (the image is omnienc's CT normalisation, ``ct_range`` mapped to
            [0, 1]), ``MR`` (percentile windows; also PET) or ``auto`` (CT when every voxel lies
            in [0, 1], which z-scored MR/PET never do).
        ct_windows: Key of :data:`CT_WINDOWS`.
        ct_range: The HU window the preprocessing mapped to [0, 1] (``Preprocessing.ct_window``).
        points_per_side: The point grid of the automatic mode is ``points_per_side`` squared
            (points outside the body are skipped).
        points_per_batch: Points per mask-decoder call.
        pred_iou_thresh: Keep masks whose predicted IoU is at least this.
        stability_score_thresh: Keep masks whose stability score is at least this.
        stability_score_offset: Logit offset of the stability score.
        min_pixels: Smallest seed mask (pixels of the slice).
        max_masks_per_slice: Seed masks kept per slice (best predicted IoU x stability first).
        slice_nms_iou: 2D NMS threshold among one slice's masks.
        nms_iou: 3D NMS threshold among the propagated masks.
        feature_cache_frames: Slices whose image features the video session keeps (0: all,
            which encodes each slice once; about 16 MB per slice at 1024^2 input).
    """

    config_name = "SAM2 mask config"

    axis: int = 2
    seed_interval: int = 8
    modality: str = "auto"
    ct_windows: str = "general"
    ct_range: tuple[float, float] = (-1000.0, 1000.0)
    points_per_side: int = 16
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.4
    stability_score_thresh: float = 0.7
    stability_score_offset: float = 1.0
    min_pixels: int = 30
    max_masks_per_slice: int = 16
    slice_nms_iou: float = 0.7
    nms_iou: float = 0.7
    feature_cache_frames: int = 0

    def __post_init__(self) -> None:
        choices = (("axis", (0, 1, 2)), ("modality", ("auto", "CT", "MR")))
        for name, allowed in (*choices, ("ct_windows", tuple(CT_WINDOWS))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        lo, hi = (float(v) for v in self.ct_range)
        if not lo < hi:
            raise ValueError(f"ct_range must be (low, high) with low < high, got {self.ct_range}")
        object.__setattr__(self, "ct_range", (lo, hi))
        positive = ("seed_interval", "points_per_side", "points_per_batch", "min_pixels")
        for name in (*positive, "max_masks_per_slice", "feature_cache_frames"):
            if int(getattr(self, name)) < (name != "feature_cache_frames"):
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("stability_score_thresh", "slice_nms_iou", "nms_iou"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if not math.isfinite(float(self.pred_iou_thresh)):
            raise ValueError(f"pred_iou_thresh must be finite, got {self.pred_iou_thresh!r}")


def seed_slices(body: np.ndarray, axis: int, interval: int) -> list[int]:
    """Seed slice indices: every ``interval`` slices of ``axis``, centred on the body's extent.

    Args:
        body: ``(X, Y, Z)`` bool.
        axis: The slicing axis.
        interval: Slices between seeds.

    Returns:
        Increasing indices, all on slices that contain body; empty without body.
    """
    present = np.flatnonzero(body.any(axis=tuple(a for a in range(3) if a != axis)))
    if present.size == 0:
        return []
    lo, hi = int(present[0]), int(present[-1])
    n = (hi - lo) // interval + 1
    start = lo + (hi - lo - (n - 1) * interval) // 2
    return [int(i) for i in range(start, hi + 1, interval) if body.take(i, axis=axis).any()]


def window_rgb(image: np.ndarray, body: np.ndarray, config: Sam2MaskConfig) -> np.ndarray:
    """The volume as uint8 RGB, one intensity window per channel.

    Args:
        image: ``(X, Y, Z)`` preprocessed float image.
        body: ``(X, Y, Z)`` bool.
        config: ``modality``, ``ct_windows`` and ``ct_range`` pick the windows.

    Returns:
        ``(X, Y, Z, 3)`` uint8.
    """
    is_ct = config.modality == "CT" or (
        config.modality == "auto" and float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    )
    if is_ct:
        lo, hi = config.ct_range
        hu = lo + image.astype(np.float32) * (hi - lo)
        bounds = [(c - w / 2, c + w / 2) for c, w in CT_WINDOWS[config.ct_windows]]
    else:
        hu = image.astype(np.float32)
        values = image[body] if body.any() else image.reshape(-1)
        bounds = [tuple(np.percentile(values, p)) for p in PERCENTILE_WINDOWS]
    channels = [np.clip((hu - a) / max(b - a, 1e-6), 0.0, 1.0) * 255.0 for a, b in bounds]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def _pixels(rgb: np.ndarray, size: int, device: torch.device) -> torch.Tensor:
    """``(N, H, W, 3)`` uint8 slices -> ``(N, 3, size, size)`` float32, resized and normalised."""
    x = torch.from_numpy(np.ascontiguousarray(rgb)).to(device).permute(0, 3, 1, 2).float() / 255
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


def _mask_nms(masks: torch.Tensor, scores: torch.Tensor, iou: float) -> list[int]:
    """Greedy NMS of ``(M, H, W)`` bool masks by mask IoU, best ``scores`` first."""
    flat = masks.reshape(len(masks), -1).float()
    inter = flat @ flat.T
    sizes = flat.sum(dim=1)
    ious = inter / (sizes[:, None] + sizes[None, :] - inter).clamp_min(1.0)
    kept: list[int] = []
    for i in torch.argsort(scores, descending=True).tolist():
        if all(float(ious[i, k]) < iou for k in kept):
            kept.append(i)
    return kept


@torch.inference_mode()
def automatic_masks(
    models: Sam2Models, pixels: torch.Tensor, body: np.ndarray, config: Sam2MaskConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's point-grid automatic mode on one slice.

    Args:
        models: The loaded models.
        pixels: ``(1, 3, S, S)`` the slice as the model's input.
        body: ``(H, W)`` bool body of the slice (grid points outside it are skipped; a mask
            needs 90% of its pixels inside it, as in MASS).
        config: Grid, thresholds and NMS.

    Returns:
        ``masks`` ``(M, H, W)`` bool and ``scores`` ``(M,)`` (predicted IoU x stability), best
        first, ``M <= max_masks_per_slice``.
    """
    h, w = body.shape
    n, size = config.points_per_side, models.image_size
    centres = (np.arange(n) + 0.5) / n
    rows, cols = np.meshgrid(centres * h, centres * w, indexing="ij")
    inside = body[rows.astype(int), cols.astype(int)]
    # Points as (x, y) = (column, row) in the model's S x S input.
    points = np.stack([cols[inside] / w * size, rows[inside] / h * size], axis=-1)
    device = models.device
    body_t = torch.from_numpy(body).to(device)
    embeddings = models.image.get_image_embeddings(pixels)
    kept_masks, kept_scores = [], []
    for start in range(0, len(points), config.points_per_batch):
        batch = torch.as_tensor(points[start : start + config.points_per_batch], device=device)
        out = models.image(
            image_embeddings=embeddings,
            input_points=batch.float()[None, :, None, :],
            input_labels=torch.ones(1, len(batch), 1, dtype=torch.long, device=device),
            multimask_output=True,
        )
        logits = F.interpolate(
            out.pred_masks[0].float(), size=(h, w), mode="bilinear"
        )  # (P, 3, H, W)
        iou = out.iou_scores[0].float()  # (P, 3)
        high = (logits > config.stability_score_offset).sum(dim=(-1, -2)).float()
        low = (logits > -config.stability_score_offset).sum(dim=(-1, -2)).float()
        stability = torch.where(low > 0, high / low.clamp_min(1.0), torch.zeros_like(low))
        masks = logits > 0
        area = masks.sum(dim=(-1, -2))
        in_body = (masks & body_t).sum(dim=(-1, -2))
        keep = (
            (iou >= config.pred_iou_thresh)
            & (stability >= config.stability_score_thresh)
            & (area >= config.min_pixels)
            & (in_body >= 0.9 * area)
        )
        kept_masks.append(masks[keep])
        kept_scores.append((iou.clamp(0, 1) * stability)[keep])
    if not kept_masks or sum(len(m) for m in kept_masks) == 0:
        return torch.zeros((0, h, w), dtype=torch.bool, device=device), torch.zeros(0)
    masks, scores = torch.cat(kept_masks), torch.cat(kept_scores)
    order = _mask_nms(masks, scores, config.slice_nms_iou)[: config.max_masks_per_slice]
    return masks[order], scores[order].cpu()


@dataclass
class Sam2Result:
    """What :func:`sam2_volume_masks` did for one volume.

    Attributes:
        masks: ``(K, X, Y, Z)`` bool, best first, after 3D NMS.
        scores: ``(K,)`` seed scores (predicted IoU x stability).
        seeds: The seed slice indices along ``axis``.
        visited: ``(seed, slice, reverse)`` for every slice the video model predicted, in order.
    """

    masks: np.ndarray
    scores: np.ndarray
    seeds: list[int]
    visited: list[tuple[int, int, bool]] = field(default_factory=list)


def _largest_touching(volume: np.ndarray, seed: int, seed_mask: np.ndarray) -> np.ndarray:
    """The largest 3D component of ``(D, H, W)`` ``volume`` that meets ``seed_mask`` at ``seed``."""
    labels, n = ndi.label(volume)
    if n <= 1:
        return volume
    touching = np.unique(labels[seed][seed_mask & volume[seed]])
    touching = touching[touching > 0]
    if touching.size == 0:
        return np.zeros_like(volume)
    sizes = np.bincount(labels.reshape(-1), minlength=n + 1)
    return labels == touching[np.argmax(sizes[touching])]


def nms_3d(masks: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """Greedy 3D NMS: indices of the kept masks, best score first.

    Args:
        masks: ``(K, ...)`` bool.
        scores: ``(K,)``.
        iou: A mask whose IoU with a kept one is at least this is dropped.
    """
    flat = masks.reshape(len(masks), -1)
    sizes = flat.sum(axis=1)
    kept: list[int] = []
    for i in np.argsort(-np.asarray(scores), kind="stable").tolist():
        if sizes[i] == 0:
            continue
        inter = [int(np.count_nonzero(flat[i] & flat[k])) for k in kept]
        if all(x / (sizes[i] + sizes[k] - x) < iou for x, k in zip(inter, kept, strict=True)):
            kept.append(i)
    return kept


@torch.inference_mode()
def sam2_volume_masks(
    image: np.ndarray, body: np.ndarray, models: Sam2Models, config: Sam2MaskConfig
) -> Sam2Result:
    """MASS's SAM2 protocol on one preprocessed volume (see the module docstring).

    Args:
        image: ``(X, Y, Z)`` preprocessed float image (RAS).
        body: ``(X, Y, Z)`` bool body mask.
        models: From :func:`load_sam2`; everything runs on their device.
        config: Protocol parameters.

    Returns:
        The 3D masks on the input grid and a record of the seeds and the propagation.
    """
    from transformers.models.sam2_video.modeling_sam2_video import Sam2VideoInferenceSession

    axis, device, size = config.axis, models.device, models.image_size
    seeds = seed_slices(body, axis, config.seed_interval)
    rgb = np.moveaxis(window_rgb(image, body, config), axis, 0)  # (D, H, W, 3)
    body_d = np.moveaxis(body, axis, 0)  # (D, H, W)
    depth, h, w = body_d.shape
    frames = _pixels(rgb, size, device)  # (D, 3, S, S)
    session = Sam2VideoInferenceSession(
        video=frames,
        video_height=h,
        video_width=w,
        inference_device=device,
        inference_state_device=device,
        video_storage_device=device,
        dtype=torch.float32,
        max_vision_features_cache_size=config.feature_cache_frames or depth,
    )
    volumes, scores, visited = [], [], []
    for seed in seeds:
        masks, seed_scores = automatic_masks(models, frames[seed : seed + 1], body_d[seed], config)
        if len(masks) == 0:
            continue
        session.reset_tracking_data()
        prompts = F.interpolate(masks[:, None].float(), size=(size, size), mode="bilinear")
        for obj_id, prompt in enumerate(prompts):
            session.add_mask_inputs(
                session.obj_id_to_idx(obj_id), seed, (prompt[None] >= 0.5).float()
            )
        session.obj_with_new_inputs = list(range(len(masks)))
        tracked = np.zeros((len(masks), depth, h, w), dtype=bool)
        for reverse in (False, True):
            for out in models.video.propagate_in_video_iterator(
                session, start_frame_idx=seed, reverse=reverse
            ):
                logits = F.interpolate(out.pred_masks.float(), size=(h, w), mode="bilinear")
                tracked[:, out.frame_idx] = (logits[:, 0] > 0).cpu().numpy()
                visited.append((seed, int(out.frame_idx), reverse))
        seed_np = masks.cpu().numpy()
        for k in range(len(masks)):
            volumes.append(_largest_touching(tracked[k], seed, seed_np[k]))
            scores.append(float(seed_scores[k]))
    if not volumes:
        return Sam2Result(np.zeros((0, *image.shape), dtype=bool), np.zeros(0), seeds, visited)
    stack, score_arr = np.stack(volumes), np.asarray(scores)
    kept = nms_3d(stack, score_arr, config.nms_iou)
    out_masks = np.moveaxis(stack[kept], 1, axis + 1)  # back to (K, X, Y, Z)
    return Sam2Result(np.ascontiguousarray(out_masks), score_arr[kept], seeds, visited)


def build_sam2_provider(source: str, config: Sam2MaskConfig | None = None) -> MaskProvider:
    """A mask provider with its own SAM2 checkpoint and parameters.

    Register it under a new name (the cache key holds only the name), e.g.
    ``MASK_PROVIDERS["sam2-abdomen"] = build_sam2_provider(path, Sam2MaskConfig(ct_windows=
    "abdomen"))``.
    """
    params = config or Sam2MaskConfig()

    def provider(image: np.ndarray, body: np.ndarray, mask_config: MaskConfig) -> list[np.ndarray]:
        result = sam2_volume_masks(image, body, load_sam2(source), params)
        return list(result.masks[: mask_config.max_masks * 4])

    return provider


DEFAULT_CONFIG = Sam2MaskConfig()


def sam2_masks(image: np.ndarray, body: np.ndarray, config: MaskConfig) -> list[np.ndarray]:
    """The ``sam2`` provider: checkpoint ``config.sam2``, parameters :data:`DEFAULT_CONFIG`.

    Returns:
        ``(X, Y, Z)`` bool masks, best first (the filters of ``propose_masks`` follow).

    Raises:
        ValueError: ``config.sam2`` is empty.
        CheckpointError: The checkpoint cannot be loaded (see :func:`load_sam2`).
    """
    if not config.sam2:
        raise ValueError(
            "mask provider 'sam2' needs a checkpoint: MaskConfig.sam2 (omnienc masks --sam2 "
            "PATH_OR_ID), a local folder or a hub id such as facebook/sam2.1-hiera-tiny"
        )
    return build_sam2_provider(config.sam2, DEFAULT_CONFIG)(image, body, config)
