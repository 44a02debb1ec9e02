"""Atlas registration, the classical one-shot segmentation baseline (SimpleITK).

The support scan (the atlas) is registered onto the query and its label map is carried over:

1. both images go to an isotropic working grid (``spacing`` mm, Gaussian-smoothed before
   downsampling; CT clipped to [-1000, 1000] HU; every image shifted to start at 0);
2. the support is registered onto the query, affine (Mattes mutual information) then demons
   (:func:`omnienc.registration.register_atlas`, where the methods and their references are);
3. the default demons run on a two-level pyramid of the working grid;
4. the support's label map is warped onto the query's **native** grid by nearest neighbour
   (:func:`warp_labels`), once per (support, query) pair for every structure;
5. several atlases are fused by majority vote (:func:`majority_vote`; multi-atlas
   segmentation, Heckemann et al., NeuroImage 2006, https://doi.org/10.1016/j.neuroimage.2006.05.061).

Physical coordinates are the RAS+ world of :func:`omnienc.io.read_volume` (both images use it,
so nothing is flipped to ITK's LPS).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import SimpleITK as sitk

from omnienc.registration import (
    CT_CLIP,
    QUICK_REGISTRATION,
    AtlasTransform,
    RegistrationConfig,
    itk_threads,
    register_atlas,
    to_sitk,
    working_image,
)

__all__ = [
    "CT_CLIP",
    "QUICK_REGISTRATION",
    "AtlasTransform",
    "RegistrationConfig",
    "describe",
    "itk_threads",
    "majority_vote",
    "register_atlas",
    "to_sitk",
    "warp_labels",
    "working_image",
]


def _query_box(
    reg: AtlasTransform,
    labels: np.ndarray,
    affine: np.ndarray,
    query_shape: tuple[int, int, int],
    query_affine: np.ndarray,
) -> tuple[slice, ...] | None:
    """Query voxels that can receive a label: a box that holds every warped label voxel.

    A query point ``x`` is labelled when ``affine(x + d(x))`` falls in the support's labelled
    box ``B``, so ``x`` lies within ``max |d|`` of ``affine^-1(B)``; the box of that set's
    corners, one voxel wider, is returned (``None``: no voxel).
    """
    nz = np.nonzero(labels)
    if not nz[0].size:
        return None
    lo = [int(a.min()) - 1 for a in nz]
    hi = [int(a.max()) + 1 for a in nz]
    inverse = reg.affine.GetInverse()
    to_query = np.linalg.inv(query_affine)
    corners = []
    for corner in itertools.product(*zip(lo, hi, strict=True)):
        world = affine @ np.array([*corner, 1.0])
        back = np.array([*inverse.TransformPoint([float(v) for v in world[:3]]), 1.0])
        corners.append((to_query @ back)[:3])
    pts = np.array(corners)
    margin = reg.max_displacement / np.linalg.norm(query_affine[:3, :3], axis=0) + 1.0
    start = np.maximum(np.floor(pts.min(0) - margin), 0).astype(int)
    stop = np.minimum(np.ceil(pts.max(0) + margin) + 1, query_shape).astype(int)
    if np.any(stop <= start):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))


def warp_labels(
    reg: AtlasTransform,
    labels: np.ndarray,
    affine: np.ndarray,
    query_shape: tuple[int, int, int],
    query_affine: np.ndarray,
) -> np.ndarray:
    """Carry a support label map onto the query's native grid (nearest neighbour).

    Only the box of query voxels that can receive a label is resampled (the rest stays 0), which
    gives the same labels as resampling the whole grid at a fraction of the cost.

    Args:
        reg: The transform from :func:`register_atlas`.
        labels: ``(X_s, Y_s, Z_s)`` integer labels of the support, on its native grid.
        affine: The support's ``(4, 4)`` voxel-to-world matrix.
        query_shape: ``(X_q, Y_q, Z_q)``.
        query_affine: The query's ``(4, 4)`` voxel-to-world matrix.

    Returns:
        ``(X_q, Y_q, Z_q)`` uint16 labels.
    """
    out = np.zeros(query_shape, dtype=np.uint16)
    box = _query_box(reg, labels, affine, query_shape, query_affine)
    if box is None:
        return out
    offset = np.eye(4)
    offset[:3, 3] = [s.start for s in box]
    reference = to_sitk(np.zeros([s.stop - s.start for s in box], np.uint8), query_affine @ offset)
    moving = to_sitk(labels.astype(np.uint16), affine)
    warped = sitk.Resample(moving, reference, reg.transform, sitk.sitkNearestNeighbor, 0)
    out[box] = sitk.GetArrayFromImage(warped).transpose(2, 1, 0)
    return out


def majority_vote(masks: list[np.ndarray]) -> np.ndarray:
    """Label fusion of warped atlas masks: a voxel is in when at least half the atlases say so.

    Args:
        masks: ``k`` bool arrays of one shape (one per atlas).

    Returns:
        The fused bool mask (for one atlas: that atlas's mask; for two: their union).
    """
    if not masks:
        raise ValueError("need at least one warped mask")
    votes = np.sum(np.stack(masks), axis=0, dtype=np.int32)
    return np.asarray(2 * votes >= len(masks))


def describe(config: RegistrationConfig) -> str:
    """The registration settings in one sentence, for results tables."""
    d = dataclasses.asdict(config)
    return (
        f"{d['spacing']:g} mm working grid; affine: moments initialisation, Mattes MI "
        f"({d['histogram_bins']} bins, {100 * d['sampling']:g}% of voxels, seed {d['seed']}), "
        + (
            f"started from the best longitudinal offset ({d['z_search']:g} mm steps), "
            if d["z_search"] > 0
            else ""
        )
        + f"regular-step gradient descent, <= {d['affine_iterations']} iterations at shrink "
        f"{list(d['affine_shrink'])}; deformable: fast symmetric-forces demons, "
        f"{list(d['demons_iterations'])} iterations at shrink {list(d['demons_shrink'])} (field "
        f"sigma {d['demons_sigma']:g} mm) after histogram matching; nearest-neighbour warp of the "
        "label map onto the query's native grid"
    )
