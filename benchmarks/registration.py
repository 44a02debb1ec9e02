"""Atlas registration, the classical one-shot segmentation baseline (SimpleITK).

The support scan (the atlas) is registered onto the query and its label map is carried over:

1. both images go to an isotropic working grid (``spacing`` mm, Gaussian-smoothed before
   downsampling; CT clipped to [-1000, 1000] HU; every image shifted to start at 0);
2. **affine**: centre-of-mass (image moments) initialisation, then Mattes mutual information
   (Mattes et al., IEEE TMI 2003, https://doi.org/10.1109/TMI.2002.803111), which tolerates
   other scanners and intensity scales, with regular-step gradient descent over a
   multi-resolution pyramid; the metric samples a fixed random subset of voxels (seeded, so
   every run gives the same transform);
3. **deformable**: fast symmetric-forces demons (Vercauteren et al., MICCAI 2007,
   https://doi.org/10.1007/978-3-540-75757-3_39; Thirion's demons, MedIA 1998) on a two-level
   pyramid of the working grid, after histogram matching of the affinely aligned support to the
   query (outside the support's field of view demons see the query itself, so an empty border
   pulls nothing);
4. the support's label map is warped onto the query's **native** grid by nearest neighbour
   (:func:`warp_labels`), once per (support, query) pair for every structure;
5. several atlases are fused by majority vote (:func:`majority_vote`; multi-atlas
   segmentation, Heckemann et al., NeuroImage 2006, https://doi.org/10.1016/j.neuroimage.2006.05.061).

Physical coordinates are the RAS+ world of :func:`omnienc.io.read_volume` (both images use it,
so nothing is flipped to ITK's LPS).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from omnienc.config import JsonConfig

CT_CLIP = (-1000.0, 1000.0)


@dataclass(frozen=True)
class RegistrationConfig(JsonConfig):
    """Settings of :func:`register_atlas`.

    Attributes:
        spacing: Isotropic working grid in mm.
        histogram_bins: Bins of Mattes mutual information.
        sampling: Fraction of working-grid voxels the metric samples (random, seeded).
        affine_iterations: Most gradient-descent iterations per pyramid level.
        affine_shrink: Shrink factor of each affine pyramid level (of the working grid).
        affine_smoothing: Gaussian sigma of each level, in working-grid voxels.
        demons_shrink: Shrink factor of each demons pyramid level (of the working grid); each
            level starts from the previous level's field.
        demons_iterations: Demons iterations per level (empty: affine only).
        demons_sigma: Gaussian smoothing of the demons field, in mm.
        seed: Seed of the metric's voxel sample, >= 1 (SimpleITK takes 0 to mean "seed from the
            wall clock", which would make every run differ).
        threads: ITK threads of every filter :func:`register_atlas` runs (fixed, so that results
            do not depend on the machine, and 1 so that they do not change from run to run:
            the mutual-information metric sums over threads in an order that varies).
    """

    config_name = "registration"

    spacing: float = 3.0
    histogram_bins: int = 32
    sampling: float = 0.05
    affine_iterations: int = 60
    affine_shrink: tuple[int, ...] = (4, 2, 1)
    affine_smoothing: tuple[float, ...] = (2.0, 1.0, 0.0)
    demons_shrink: tuple[int, ...] = (2, 1)
    demons_iterations: tuple[int, ...] = (15, 5)
    demons_sigma: float = 1.5
    seed: int = 1
    threads: int = 1

    def __post_init__(self) -> None:
        if not self.spacing > 0 or not 0 < self.sampling <= 1:
            raise ValueError(f"need spacing > 0 and sampling in (0, 1], got {self}")
        if len(self.affine_shrink) != len(self.affine_smoothing) or not self.affine_shrink:
            raise ValueError("affine_shrink and affine_smoothing need one entry per level")
        if len(self.demons_shrink) != len(self.demons_iterations):
            raise ValueError("demons_shrink and demons_iterations need one entry per level")
        if self.affine_iterations < 1 or min(self.demons_iterations, default=1) < 1:
            raise ValueError(f"iteration counts must be >= 1 in {self}")
        if self.seed < 1:
            raise ValueError(
                f"seed must be >= 1 (0 is SimpleITK's wall-clock seed), got {self.seed}"
            )
        if self.threads < 1 or min((*self.affine_shrink, *self.demons_shrink)) < 1:
            raise ValueError(f"shrink factors and threads must be >= 1 in {self}")


QUICK_REGISTRATION = RegistrationConfig(
    spacing=4.0, affine_iterations=40, demons_shrink=(2,), demons_iterations=(15,)
)
"""The cheaper setting of ``--quick``: a 4 mm grid, fewer iterations, one demons level."""


def to_sitk(array: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A SimpleITK image of an ``(X, Y, Z)`` array whose physical space is ``affine``'s world.

    Args:
        array: ``(X, Y, Z)`` voxels.
        affine: ``(4, 4)`` voxel-to-world matrix.
    """
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)))
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in affine[:3, 3]])
    image.SetDirection([float(v) for v in (affine[:3, :3] / spacing).ravel()])
    return image


def working_image(
    array: np.ndarray, affine: np.ndarray, modality: str, spacing: float
) -> sitk.Image:
    """The registration input: clipped (CT), shifted to start at 0, smoothed, resampled.

    Args:
        array: ``(X, Y, Z)`` native voxels.
        affine: Their ``(4, 4)`` voxel-to-world matrix.
        modality: ``CT`` is clipped to :data:`CT_CLIP` HU.
        spacing: Isotropic output spacing in mm.

    Returns:
        A float32 image covering the same field of view on the ``spacing`` grid.
    """
    values = np.clip(array, *CT_CLIP) if modality == "CT" else np.asarray(array)
    values = (values - values.min()).astype(np.float32)
    image = to_sitk(values, affine)
    native = np.asarray(image.GetSpacing())
    for axis, s in enumerate(native):  # anti-aliasing along the axes that get coarser
        if spacing > s:
            smooth = sitk.RecursiveGaussianImageFilter()
            smooth.SetSigma((spacing - s) / 2.0)  # mm
            smooth.SetDirection(axis)
            image = smooth.Execute(image)
    size = [max(1, round(n * s / spacing)) for n, s in zip(image.GetSize(), native, strict=True)]
    return sitk.Resample(
        image,
        size,
        sitk.Transform(),
        sitk.sitkLinear,
        image.GetOrigin(),
        [spacing] * 3,
        image.GetDirection(),
        0.0,
        sitk.sitkFloat32,
    )


@dataclass
class AtlasTransform:
    """A support-to-query registration: query point -> support point.

    Attributes:
        affine: The affine part.
        field: The demons displacement on the query's working grid (``None``: affine only).
        max_displacement: Largest length of ``field`` in mm (0 without one).
    """

    affine: sitk.Transform
    field: sitk.Transform | None
    max_displacement: float

    @property
    def transform(self) -> sitk.Transform:
        """Query point -> support point: the displacement first, then the affine."""
        if self.field is None:
            return self.affine
        return sitk.CompositeTransform([self.affine, self.field])


def _affine(fixed: sitk.Image, moving: sitk.Image, cfg: RegistrationConfig) -> sitk.Transform:
    init = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    reg = sitk.ImageRegistrationMethod()
    reg.SetNumberOfThreads(cfg.threads)
    reg.SetMetricAsMattesMutualInformation(cfg.histogram_bins)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(cfg.sampling, cfg.seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0,
        minStep=1e-2,
        numberOfIterations=cfg.affine_iterations,
        relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-6,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(cfg.affine_shrink))
    reg.SetSmoothingSigmasPerLevel(list(cfg.affine_smoothing))
    reg.SetInitialTransform(init, inPlace=False)
    return reg.Execute(fixed, moving)


@contextlib.contextmanager
def itk_threads(n: int) -> Iterator[None]:
    """Run every SimpleITK filter inside with ``n`` threads (the global default), then restore it.

    ``ImageRegistrationMethod.SetNumberOfThreads`` alone leaves the metric and the other filters
    on the global default (the machine's cores); with more than one thread their sums, and so
    the transforms, differed from run to run.
    """
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(n))
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


def register_atlas(
    support: sitk.Image, query: sitk.Image, config: RegistrationConfig | None = None
) -> AtlasTransform:
    """Register the support (atlas) onto the query, both from :func:`working_image`.

    Every filter runs on ``config.threads`` threads (:func:`itk_threads`), so a run of the same
    registrations in the same order gives the same transforms. Within one process an earlier
    registration can still move a later one in its last digits (state that ITK keeps between
    calls), so compare runs, not repeated calls.

    Args:
        support: The moving image.
        query: The fixed image.
        config: Settings (default :class:`RegistrationConfig`).

    Returns:
        The transform from query to support points.
    """
    cfg = config or RegistrationConfig()
    with itk_threads(cfg.threads):
        return _register(support, query, cfg)


def _register(support: sitk.Image, query: sitk.Image, cfg: RegistrationConfig) -> AtlasTransform:
    affine = _affine(query, support, cfg)
    if not cfg.demons_iterations:
        return AtlasTransform(affine, None, 0.0)
    moved = sitk.Resample(support, query, affine, sitk.sitkLinear, 0.0)
    moved = sitk.HistogramMatching(moved, query, 128, 7, True)
    # Outside the support's field of view there is nothing to match: show demons the query
    # there, so that no force pulls the field towards an empty border.
    ones = sitk.Image(support.GetSize(), sitk.sitkFloat32) + 1.0
    ones.CopyInformation(support)
    inside = sitk.Resample(ones, query, affine, sitk.sitkNearestNeighbor, 0.0)
    moved = moved * inside + query * (1.0 - inside)
    field = None
    for shrink, iterations in zip(cfg.demons_shrink, cfg.demons_iterations, strict=True):
        fixed = sitk.Shrink(query, [shrink] * 3) if shrink > 1 else query
        moving = sitk.Shrink(moved, [shrink] * 3) if shrink > 1 else moved
        demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
        demons.SetNumberOfThreads(cfg.threads)
        demons.SetNumberOfIterations(iterations)
        demons.SetStandardDeviations(cfg.demons_sigma)
        if field is None:
            field = demons.Execute(fixed, moving)
        else:  # start from the coarser level's field, resampled onto this level's grid
            start = sitk.Resample(
                field, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, field.GetPixelID()
            )
            field = demons.Execute(fixed, moving, start)
    assert field is not None
    if field.GetSize() != query.GetSize():
        field = sitk.Resample(
            field, query, sitk.Transform(), sitk.sitkLinear, 0.0, field.GetPixelID()
        )
    longest = float(np.sqrt((sitk.GetArrayViewFromImage(field) ** 2).sum(-1)).max())
    displacement = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    return AtlasTransform(affine, displacement, longest)


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
        f"regular-step gradient descent, <= {d['affine_iterations']} iterations at shrink "
        f"{list(d['affine_shrink'])}; deformable: fast symmetric-forces demons, "
        f"{list(d['demons_iterations'])} iterations at shrink {list(d['demons_shrink'])} (field "
        f"sigma {d['demons_sigma']:g} mm) after histogram matching; nearest-neighbour warp of the "
        "label map onto the query's native grid"
    )
