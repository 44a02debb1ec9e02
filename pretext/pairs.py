"""Reference/query crop pairs with task masks, and their weak/strong views (MASS pretext data).

MASS (Gao et al., https://arxiv.org/abs/2603.13660) draws two overlapping crops of one volume,
the *reference* weakly augmented and the *query* strongly, and turns up to ``K`` class-agnostic
mask proposals into segmentation tasks. This module holds that data side, in numpy and MONAI:

* :class:`PairConfig`, :func:`sample_pair`: the two crops and the task masks, from masks in
  memory or bit-packed on disk (:class:`omnienc.pretext.corpus.PackedMasks`).

The weak and strong views of the pairs are in :mod:`omnienc.pretext.augment`; the head and loss
that consume the pairs in :mod:`omnienc.pretext.incontext`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from omnienc.config import JsonConfig, positive_int_triple
from omnienc.pretext.corpus import PackedMasks

# Proposals whose query-crop IoU exceeds this count as "the same structure" when picking tasks.
_VARIETY_IOU = 0.5
# Crop pairs tried when fewer than ``max_tasks`` proposals qualify in the first one.
_PAIR_ATTEMPTS = 4


# --------------------------------------------------------------------------------------------
# Reference/query pairs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairConfig(JsonConfig):
    """How :func:`sample_pair` draws a reference/query pair and its tasks.

    Attributes:
        crop_size: ``(S_x, S_y, S_z)`` voxels of both crops.
        min_overlap: Least fraction of the crop volume the two crops share, in ``(0, 1]``.
        max_tasks: ``K``, the most mask proposals used as tasks (>= 0).
        min_task_voxels: A proposal qualifies when it has at least this many voxels inside
            the reference crop and inside the query crop.
        whole_crop_task: Add task 0, "the reference crop itself": its reference mask is all ones
            and its query target is where the reference crop lies inside the query crop.
        absent_tasks: Extra task slots for *absent* structures: proposals with at least
            ``min_task_voxels`` voxels in the reference crop and none in the query crop, whose
            query target is empty. Without them every task's structure is in the query (the
            crops overlap and tasks must be in both), so the head never learns to answer "not
            here", and at inference, where most sliding windows hold none of the support's
            structure, it fires in them. Slots with no such proposal stay padding.
    """

    crop_size: tuple[int, int, int] = (64, 64, 64)
    min_overlap: float = 0.5
    max_tasks: int = 8
    min_task_voxels: int = 32
    whole_crop_task: bool = True
    absent_tasks: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "crop_size", positive_int_triple("crop_size", self.crop_size))
        if not 0.0 < float(self.min_overlap) <= 1.0:
            raise ValueError(f"min_overlap must be in (0, 1], got {self.min_overlap}")
        if self.max_tasks < 0:
            raise ValueError(f"max_tasks must be >= 0, got {self.max_tasks}")
        if self.min_task_voxels < 1:
            raise ValueError(f"min_task_voxels must be >= 1, got {self.min_task_voxels}")
        if self.absent_tasks < 0:
            raise ValueError(f"absent_tasks must be >= 0, got {self.absent_tasks}")
        if self.max_tasks == 0 and not self.whole_crop_task:
            raise ValueError("max_tasks=0 with whole_crop_task=False leaves no task at all")

    @property
    def num_tasks(self) -> int:
        """``T = int(whole_crop_task) + max_tasks + absent_tasks``, the task axis of every pair."""
        return int(self.whole_crop_task) + self.max_tasks + self.absent_tasks


def _crop(array: np.ndarray, origin: Sequence[int] | np.ndarray, size: Sequence[int]) -> np.ndarray:
    """``array[:, o0:o0+s0, o1:o1+s1, o2:o2+s2]`` (a view)."""
    (o0, o1, o2), (s0, s1, s2) = origin, size
    return array[:, o0 : o0 + s0, o1 : o1 + s1, o2 : o2 + s2]


def _sample_origins(
    shape: Sequence[int], size: Sequence[int], min_overlap: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draw two crop origins whose crops share at least ``min_overlap`` of the crop volume.

    A target overlap ``t ~ U(min_overlap, 1)`` is split over the axes as ``t = prod_a t**w_a``
    with Dirichlet weights ``w``; the offset along axis ``a`` is
    ``floor(S_a * (1 - t**w_a))`` with a random sign, flipped or shortened to keep the query
    inside the volume. Shortening only grows the overlap, so the guarantee holds exactly.

    Args:
        shape: ``(X, Y, Z)`` of the (padded) volume, each >= the crop size.
        size: ``(S_x, S_y, S_z)``.
        min_overlap: Least shared fraction of the crop volume.
        rng: Source of randomness.

    Returns:
        The reference and query origins, ``(3,)`` int64 each.
    """
    shape_a, size_a = np.asarray(shape), np.asarray(size)
    ref = np.array([rng.integers(0, n - s + 1) for n, s in zip(shape_a, size_a, strict=True)])
    target = rng.uniform(min_overlap, 1.0)
    per_axis = target ** rng.dirichlet(np.ones(3))
    offset = np.floor(size_a * (1.0 - per_axis)).astype(np.int64)
    offset *= rng.choice(np.array([-1, 1]), size=3)
    low, high = -ref, shape_a - size_a - ref  # feasible offsets keep the query inside
    offset = np.where((offset < low) | (offset > high), -offset, offset)
    offset = np.clip(offset, low, high)
    return ref.astype(np.int64), (ref + offset).astype(np.int64)


def _pick_tasks(
    query_masks: np.ndarray, candidates: np.ndarray, k: int, rng: np.random.Generator
) -> list[int]:
    """Pick up to ``k`` candidates at random, preferring ones unlike those already picked.

    Candidates are visited in random order; one whose IoU (on a stride-4 subsample of the query
    crop) with an already picked mask exceeds ``_VARIETY_IOU`` is set aside and used only to
    fill the remaining slots.

    Args:
        query_masks: ``(M, S_x, S_y, S_z)`` bool proposals cropped to the query.
        candidates: Indices of the qualifying proposals.
        k: How many to pick.
        rng: Source of randomness.

    Returns:
        Indices into ``query_masks``, at most ``k``.
    """
    order = rng.permutation(candidates)
    if len(order) <= 1 or k <= 1:
        return [int(i) for i in order[:k]]
    small = query_masks[:, ::4, ::4, ::4][order].reshape(len(order), -1)
    picked: list[int] = []
    set_aside: list[int] = []
    for j in range(len(order)):
        if len(picked) == k:
            break
        if picked:
            inter = np.count_nonzero(small[picked] & small[j], axis=1)
            union = np.count_nonzero(small[picked] | small[j], axis=1)
            if np.any(inter > _VARIETY_IOU * np.maximum(union, 1)):
                set_aside.append(j)
                continue
        picked.append(j)
    picked += set_aside[: k - len(picked)]
    return [int(order[j]) for j in picked]


def sample_pair(
    image: np.ndarray,
    masks: np.ndarray | PackedMasks,
    config: PairConfig,
    rng: np.random.Generator,
    query_source: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Draw a reference/query crop pair of one volume and its tasks (MASS's pretext sample).

    A volume smaller than the crop is padded symmetrically (the image with its minimum, the
    masks with ``False``); origins are given in the padded volume, whose offset from the input
    is ``pad_low``. Up to ``_PAIR_ATTEMPTS`` pairs are drawn until one has ``max_tasks``
    qualifying proposals (else the pair with the most is kept).

    Args:
        image: ``(1, X, Y, Z)`` float32 preprocessed volume (an array or a memory map: only
            the crops are read, unless the volume is smaller than the crop).
        masks: ``(M, X, Y, Z)`` bool class-agnostic proposals on the same grid, as an array or
            as :class:`~omnienc.pretext.corpus.PackedMasks` (only the crops are unpacked; the
            result is the same); ``M`` may be 0.
        config: Crop size, overlap and task settings.
        rng: Source of randomness (e.g. ``np.random.default_rng(seed)``).
        query_source: ``(1, X, Y, Z)`` float32 on ``image``'s grid to crop the query image from
            instead of ``image`` (a registered partner scan,
            :mod:`omnienc.pretext.crossvolume`); the crops, tasks and targets are drawn as
            without it, from ``masks``.

    Returns:
        A dict of numpy arrays, with ``S = crop_size`` and ``T = config.num_tasks``:

        * ``ref_image``, ``query_image``: ``(1, *S)`` float32;
        * ``ref_masks``, ``query_masks``: ``(T, *S)`` float32 in {0, 1}; task ``t`` is the same
          proposal cropped to the reference and to the query. With ``whole_crop_task`` task 0's
          reference mask is all ones and its query mask the overlap of the crops; the last
          ``absent_tasks`` slots hold proposals absent from the query (empty query masks);
        * ``task_valid``: ``(T,)`` bool; padding tasks are all zeros and ``False``;
        * ``ref_origin``, ``query_origin``: ``(3,)`` int64 crop corners in the padded volume;
        * ``pad_low``: ``(3,)`` int64 voxels of padding before the input along each axis.

    Raises:
        ValueError: ``image`` or ``masks`` has the wrong shape.
    """
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"image must be (1, X, Y, Z), got shape {image.shape}")
    if masks.ndim != 4 or masks.shape[1:] != image.shape[1:]:
        raise ValueError(
            f"masks must be (M, {', '.join(map(str, image.shape[1:]))}), got {masks.shape}"
        )
    if query_source is not None and query_source.shape != image.shape:
        raise ValueError(f"query_source must be {image.shape} as image, got {query_source.shape}")
    size = config.crop_size
    pad_low = np.array([max(s - n, 0) // 2 for n, s in zip(image.shape[1:], size, strict=True)])
    padded = any(n < s for n, s in zip(image.shape[1:], size, strict=True))
    if padded:
        widths = [(0, 0)] + [
            (int(lo), max(s - n, 0) - int(lo))
            for n, s, lo in zip(image.shape[1:], size, pad_low, strict=True)
        ]
        image = np.pad(image, widths, constant_values=float(image.min()))
        if query_source is not None:
            query_source = np.pad(query_source, widths, constant_values=float(query_source.min()))
    crop_masks: Callable[[np.ndarray], np.ndarray]
    if isinstance(masks, PackedMasks):
        packed = masks

        def crop_masks(origin: np.ndarray) -> np.ndarray:
            return packed.crop(origin - pad_low, size)  # False outside the unpadded volume

    else:
        dense = masks.astype(bool, copy=False)
        if padded:
            dense = np.pad(dense, widths, constant_values=False)

        def crop_masks(origin: np.ndarray) -> np.ndarray:
            return _crop(dense, origin, size)

    n_masks = masks.shape[0]
    none = np.zeros(0, dtype=np.int64)
    # (reference origin, query origin, qualifying proposals, absent ones, their two crops)
    best: (
        tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]
        | None
    )
    best = None
    for _ in range(_PAIR_ATTEMPTS):
        ref_o, query_o = _sample_origins(image.shape[1:], size, config.min_overlap, rng)
        if config.max_tasks + config.absent_tasks == 0 or n_masks == 0:
            best = (ref_o, query_o, none, none, None, None)
            break
        ref_crop, query_crop = crop_masks(ref_o), crop_masks(query_o)
        in_ref = np.count_nonzero(ref_crop, axis=(1, 2, 3))
        in_query = np.count_nonzero(query_crop, axis=(1, 2, 3))
        ok = np.flatnonzero(
            (in_ref >= config.min_task_voxels) & (in_query >= config.min_task_voxels)
        )
        absent = np.flatnonzero((in_ref >= config.min_task_voxels) & (in_query == 0))
        if best is None or len(ok) > len(best[2]):
            best = (ref_o, query_o, ok, absent, ref_crop, query_crop)
        if len(ok) >= config.max_tasks:
            break
    assert best is not None
    ref_o, query_o, candidates, absent, ref_crops, query_crops = best

    chosen = (
        [] if query_crops is None else _pick_tasks(query_crops, candidates, config.max_tasks, rng)
    )
    t = config.num_tasks
    ref_masks = np.zeros((t, *size), dtype=np.float32)
    query_masks = np.zeros((t, *size), dtype=np.float32)
    valid = np.zeros(t, dtype=bool)
    first = int(config.whole_crop_task)
    if config.whole_crop_task:
        ref_masks[0] = 1.0
        lo = np.maximum(ref_o, query_o) - query_o
        hi = np.minimum(ref_o, query_o) + np.asarray(size) - query_o
        query_masks[0, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = 1.0
        valid[0] = True
    if chosen:
        assert ref_crops is not None and query_crops is not None
        n = len(chosen)
        ref_masks[first : first + n] = ref_crops[chosen]
        query_masks[first : first + n] = query_crops[chosen]
        valid[first : first + n] = True
    if config.absent_tasks and len(absent):
        assert ref_crops is not None
        gone = rng.permutation(absent)[: config.absent_tasks]
        start = first + config.max_tasks
        ref_masks[start : start + len(gone)] = ref_crops[gone]  # query target stays empty
        valid[start : start + len(gone)] = True
    return {
        # Copies, never views: the volume may be a memory map that is closed after the sample.
        "ref_image": np.array(_crop(image, ref_o, size), dtype=np.float32),
        "query_image": np.array(
            _crop(image if query_source is None else query_source, query_o, size),
            dtype=np.float32,
        ),
        "ref_masks": ref_masks,
        "query_masks": query_masks,
        "task_valid": valid,
        "ref_origin": ref_o,
        "query_origin": query_o,
        "pad_low": pad_low.astype(np.int64),
    }
