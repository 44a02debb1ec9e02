"""Image registration with SimpleITK: affine (Mattes mutual information) then demons.

The core that both the few-shot benchmark's atlas baseline
(:mod:`omnienc.benchmarks.registration`) and the cross-volume pretraining pairs
(:mod:`omnienc.pretext.crossvolume`) use. Both images go to an isotropic working grid
(:func:`working_image`), then the moving image is registered onto the fixed one:

1. **affine**: centre-of-mass (image moments) initialisation, then Mattes mutual information
   (Mattes et al., IEEE TMI 2003, https://doi.org/10.1109/TMI.2002.803111), which tolerates
   other scanners and intensity scales, with regular-step gradient descent over a
   multi-resolution pyramid; the metric samples a fixed random subset of voxels (seeded, so
   every run gives the same transform); optionally the start is moved along the longitudinal
   axis to the best of a grid of offsets (``z_search``), for slabs of a longer scan;
2. **deformable**: fast symmetric-forces demons (Vercauteren et al., MICCAI 2007,
   https://doi.org/10.1007/978-3-540-75757-3_39; Thirion's demons, MedIA 1998) on a pyramid of
   the fixed image's grid, after histogram matching of the affinely aligned moving image to the
   fixed one (outside the moving image's field of view demons see the fixed image itself, so an
   empty border pulls nothing).

The result, :class:`AtlasTransform`, maps fixed (query) points to moving (support) points, as
``sitk.Resample`` expects.
"""

from __future__ import annotations

import contextlib
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
        z_search: Step in mm of a search over the initial offset along the third (RAS: the
            longitudinal) axis; 0: none, the centres of mass are aligned. Where one scan is a
            slab of the other's body (a 40 mm series against a whole abdomen), centring the
            slab on the abdomen's centre puts it on the wrong organs and the optimiser does not
            get out: the search evaluates the metric at every offset that keeps the shorter
            scan inside the longer one, and the affine starts from the best.
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
    z_search: float = 0.0

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
        if self.z_search < 0:
            raise ValueError(f"z_search must be >= 0 mm, got {self.z_search}")


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


def _metric(cfg: RegistrationConfig) -> sitk.ImageRegistrationMethod:
    """A registration method with the seeded, sampled Mattes metric of ``cfg``."""
    reg = sitk.ImageRegistrationMethod()
    reg.SetNumberOfThreads(cfg.threads)
    reg.SetMetricAsMattesMutualInformation(cfg.histogram_bins)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(cfg.sampling, cfg.seed)
    reg.SetInterpolator(sitk.sitkLinear)
    return reg


def _z_translations(fixed: sitk.Image, moving: sitk.Image, step: float) -> np.ndarray:
    """Longitudinal translations (mm, fixed to moving) that keep the shorter scan in the longer.

    Centred on the translation that aligns the two scans' geometric centres (not their centres
    of mass, which a tapering or partly empty scan moves off centre), in steps of ``step``. The
    third voxel axis is taken as the longitudinal world axis (as on RAS grids).
    """
    extents = [img.GetSize()[2] * img.GetSpacing()[2] for img in (fixed, moving)]
    centres = [
        img.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in img.GetSize()])[2]
        for img in (fixed, moving)
    ]
    half = abs(extents[0] - extents[1]) / 2.0
    n = int(np.floor(half / step))
    return centres[1] - centres[0] + step * np.arange(-n, n + 1, dtype=np.float64)


def _initial(fixed: sitk.Image, moving: sitk.Image, cfg: RegistrationConfig) -> sitk.Transform:
    """Moments initialisation, moved along the third axis to the best offset (``z_search``)."""
    init = sitk.AffineTransform(
        sitk.CenteredTransformInitializer(
            fixed, moving, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS
        )
    )
    if cfg.z_search <= 0:
        return init
    best, best_value = init, np.inf
    tx, ty, _ = init.GetTranslation()
    for tz in _z_translations(fixed, moving, cfg.z_search):
        candidate = sitk.AffineTransform(init)
        candidate.SetTranslation([float(tx), float(ty), float(tz)])
        reg = _metric(cfg)
        reg.SetInitialTransform(candidate)
        try:
            value = reg.MetricEvaluate(fixed, moving)
        except RuntimeError:  # too few samples overlap at this offset
            continue
        if value < best_value:
            best, best_value = candidate, value
    return best


def _affine(fixed: sitk.Image, moving: sitk.Image, cfg: RegistrationConfig) -> sitk.Transform:
    init = _initial(fixed, moving, cfg)
    reg = _metric(cfg)
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
    """Register the support (atlas, moving) onto the query (fixed).

    Both are float32 images on isotropic working grids with non-negative intensities
    (:func:`working_image`).

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
