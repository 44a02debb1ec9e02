"""Cross-volume pairs: the query crop from another scan, registered onto the reference's scan.

Every other pretraining pair is two crops of *one* scan, so nothing in pretraining asks the
encoder to put the same organ of two people together, and the few-shot benchmark shows that it
does not: dense label transfer across two CTs is at its random-init floor
(``benchmarks/results/pretrain.md``, finding 47). Registration gives that correspondence
without a label: a partner scan registered onto a volume (affine, then demons;
:func:`omnienc.registration.register_atlas`) and resampled onto its grid is a second
subject's anatomy in the volume's coordinates. A pair whose query crop is taken from that
*partner view* keeps the volume's mask proposals as targets, so the head and the matching loss
must find the reference's structure in another person's scan.

* :class:`CrossConfig` (``data.cross``): which volumes may pair (``groups`` of path patterns:
  scans of one modality and body region, named by the user, since neither can be read from a
  file reliably), how often a pair crosses (``fraction``) and the registration's settings.
* :func:`partner_views`: registers every pair of a group once and caches each view beside the
  preprocessed volumes (a ``(1, X, Y, Z)`` float32 ``.npy``, written atomically, named after
  both cache keys and the registration settings, rebuilt if damaged). Where the partner does not
  reach (its field of view is smaller), the view holds the volume itself, so every target stays
  true there.
* :class:`PartnerViews`: decides whether a sample crosses, and draws its volume and view.

The targets inherit the registration's error (on the few-shot benchmark's two CTs, atlas
registration reaches a mean Dice of 0.34 over 9 structures), so cross pairs are noisy labels
of correspondence, mixed with the exact same-scan pairs rather than replacing them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np
import SimpleITK as sitk
from tqdm.auto import tqdm

from omnienc.config import JsonConfig
from omnienc.errors import DataError
from omnienc.pretext.corpus import CachedVolume, save_npy_atomic, sidecar_matches
from omnienc.registration import (
    QUICK_REGISTRATION,
    RegistrationConfig,
    register_atlas,
    to_sitk,
    working_image,
)

logger = logging.getLogger("omnienc")

VIEW_SUFFIX = ".view.npy"
VIEW_VERSION = 2
"""Part of every view's cache key: raised when :func:`partner_view` changes what it makes."""
LOW_COVERAGE = 0.25
"""A partner reaching less of a volume than this is warned about: its pairs barely cross."""


@dataclass(frozen=True)
class CrossConfig(JsonConfig):
    """Which corpus volumes pair across scans, and how (``data.cross``).

    Attributes:
        groups: Groups of path patterns (``pathlib`` patterns matched from the right, e.g.
            ``totalsegmentator/example_ct.nii.gz`` or ``brats/*/Flair*``); the volumes a group
            matches pair with each other, both ways. Empty: no cross pairs. Name scans of one
            modality and body region, and one scan per subject: two crops of one subject would
            teach nothing new.
        fraction: Share of all samples that are cross pairs, in ``[0, 1]``: a volume with
            partners (uniformly), its query crop from one of its partner views. The other
            samples are drawn as without cross pairs (``data.volume_weights``), so a small group
            in a large corpus still gets its share.
        spacing: Isotropic working grid of the registration, in mm.
        deformable: Demons after the affine (else affine only).
        z_search: Step in mm of the search over the longitudinal offset that starts the affine
            (:attr:`omnienc.registration.RegistrationConfig.z_search`; 0: none). Corpora mix
            whole scans with slabs of a few centimetres, which centring alone misplaces.
        control: The control experiment of cross pairs: the same share of samples from the
            same volumes, but each query crop comes from the volume's own scan instead of a
            partner, and nothing is registered. Where every volume has one partner the samples
            are the cross run's (same crops), so only the second subject changes.
    """

    config_name = "cross"

    groups: tuple[tuple[str, ...], ...] = ()
    fraction: float = 0.25
    spacing: float = 4.0
    deformable: bool = True
    z_search: float = 8.0
    control: bool = False

    def __post_init__(self) -> None:
        if any(isinstance(g, str) for g in self.groups):
            raise ValueError(
                f"cross.groups must be a list of lists of path patterns, got {list(self.groups)}"
            )
        groups = tuple(tuple(str(p) for p in g) for g in self.groups)
        object.__setattr__(self, "groups", groups)
        if not 0.0 <= float(self.fraction) <= 1.0:
            raise ValueError(f"cross.fraction must be in [0, 1], got {self.fraction}")
        if not self.spacing > 0:
            raise ValueError(f"cross.spacing must be > 0 mm, got {self.spacing}")
        if self.z_search < 0:
            raise ValueError(f"cross.z_search must be >= 0 mm, got {self.z_search}")
        for i, group in enumerate(groups):
            if not group or any(not p for p in group):
                raise ValueError(f"cross.groups[{i}] needs non-empty path patterns, got {group}")

    def registration(self) -> RegistrationConfig:
        """The registration settings: the benchmark's quick ones on ``spacing``, with the search."""
        return dataclasses.replace(
            QUICK_REGISTRATION,
            spacing=float(self.spacing),
            demons_shrink=QUICK_REGISTRATION.demons_shrink if self.deformable else (),
            demons_iterations=QUICK_REGISTRATION.demons_iterations if self.deformable else (),
            z_search=float(self.z_search),
        )


def partner_indices(sources: Sequence[str], groups: Sequence[Sequence[str]]) -> list[list[int]]:
    """Each volume's partners: the other volumes of every group that matches it.

    Args:
        sources: The corpus volumes' source paths.
        groups: :attr:`CrossConfig.groups`.

    Returns:
        ``partners[i]``: indices into ``sources``, sorted, never ``i``.

    Raises:
        ValueError: A pattern matches no volume, or a group matches fewer than two.
    """
    partners: list[set[int]] = [set() for _ in sources]
    paths = [PurePath(s) for s in sources]
    for g, patterns in enumerate(groups):
        members: set[int] = set()
        for pattern in patterns:
            hits = {i for i, p in enumerate(paths) if p.match(pattern)}
            if not hits:
                raise ValueError(
                    f"cross.groups[{g}]: the pattern {pattern!r} matches no volume of the "
                    f"corpus ({len(sources)} volumes; patterns match paths from the right, "
                    "e.g. 'totalsegmentator/example_ct.nii.gz')"
                )
            members |= hits
        if len(members) < 2:
            raise ValueError(
                f"cross.groups[{g}] matches one volume only ({sources[min(members)]}): "
                "a group needs two scans to pair"
            )
        for i in members:
            partners[i] |= members - {i}
    return [sorted(p) for p in partners]


def _grid_affine(spacing: Sequence[float]) -> np.ndarray:
    """``(4, 4)`` voxel-to-world matrix of a preprocessed volume: its spacing, origin 0."""
    return np.diag([*map(float, spacing), 1.0])


def partner_view(
    image: np.ndarray,
    spacing: Sequence[float],
    partner: np.ndarray,
    partner_spacing: Sequence[float],
    config: RegistrationConfig,
) -> tuple[np.ndarray, float]:
    """Register ``partner`` onto ``image`` and resample it onto ``image``'s grid.

    Both are preprocessed corpus volumes; their world is their own voxel grid scaled by the
    spacing (different scanners' world coordinates would not agree anyway: the affine starts
    from the images' centres of mass).

    Args:
        image: ``(1, X, Y, Z)`` float32, the fixed volume.
        spacing: Its voxel size in mm.
        partner: ``(1, X', Y', Z')`` float32, the moving volume.
        partner_spacing: Its voxel size in mm.
        config: Registration settings.

    Returns:
        ``(view, coverage)``: the ``(1, X, Y, Z)`` float32 view (the partner where it reaches,
        ``image`` elsewhere) and the fraction of voxels the partner reaches.
    """
    fixed = working_image(image[0], _grid_affine(spacing), "MR", config.spacing)
    moving = working_image(partner[0], _grid_affine(partner_spacing), "MR", config.spacing)
    reg = register_atlas(moving, fixed, config)
    warped = sitk.Resample(
        to_sitk(np.asarray(partner[0], np.float32), _grid_affine(partner_spacing)),
        to_sitk(np.zeros(image.shape[1:], np.float32), _grid_affine(spacing)),
        reg.transform,
        sitk.sitkLinear,
        float("nan"),
        sitk.sitkFloat32,
    )
    view = np.ascontiguousarray(sitk.GetArrayFromImage(warped).transpose(2, 1, 0)[None])
    outside = np.isnan(view)
    view[outside] = np.asarray(image)[outside]
    return view.astype(np.float32, copy=False), 1.0 - float(outside.mean())


def _view_file(image_file: str, partner_file: str, config: RegistrationConfig) -> Path:
    """``KEY-x-DIGEST.view.npy`` beside the volume's image sidecar ``KEY.image.npy``."""
    path = Path(image_file)
    key = json.dumps(
        [VIEW_VERSION, path.name, Path(partner_file).name, config.to_dict()], sort_keys=True
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return path.with_name(f"{path.name.split('.')[0]}-x-{digest}{VIEW_SUFFIX}")


def partner_views(
    volumes: Sequence[CachedVolume],
    spacings: Sequence[Sequence[float]],
    partners: Sequence[Sequence[int]],
    config: CrossConfig,
    progress: bool = True,
) -> list[list[str]]:
    """Each volume's cached partner views, registered and written where missing.

    Args:
        volumes: The corpus volumes.
        spacings: Each volume's voxel size in mm.
        partners: :func:`partner_indices` of the volumes.
        config: The cross-pair settings.
        progress: Show a progress bar over the registrations still to do.

    Returns:
        ``views[i]``: paths of volume ``i``'s partner views, one per partner.
    """
    reg = config.registration()
    files = [
        [_view_file(v.image_file, volumes[j].image_file, reg) for j in partners[i]]
        for i, v in enumerate(volumes)
    ]
    todo = [
        (i, j, f)
        for i, v in enumerate(volumes)
        for j, f in zip(partners[i], files[i], strict=True)
        if not sidecar_matches(f, (1, *v.shape), np.dtype(np.float32))
    ]
    for i, j, f in tqdm(todo, desc="registering cross-volume partners", disable=not progress):
        image = np.load(volumes[i].image_file, allow_pickle=False)
        partner = np.load(volumes[j].image_file, allow_pickle=False)
        try:
            view, coverage = partner_view(image, spacings[i], partner, spacings[j], reg)
        except RuntimeError as exc:  # SimpleITK's errors name no file
            raise DataError(
                volumes[i].image_file,
                f"cannot register the cross-volume partner {volumes[j].image_file} onto it "
                f"({str(exc).strip().splitlines()[-1] if str(exc).strip() else exc})",
            ) from None
        save_npy_atomic(f, view)
        log = logger.warning if coverage < LOW_COVERAGE else logger.info
        log(
            "cross-volume partner %s onto %s: reaches %.0f%% of it%s",
            Path(volumes[j].image_file).name,
            Path(volumes[i].image_file).name,
            100 * coverage,
            " (its pairs mostly crop the volume itself)" if coverage < LOW_COVERAGE else "",
        )
    return [[str(f) for f in fs] for fs in files]


def corpus_partners(
    volumes: Sequence[CachedVolume | object],
    sources: Sequence[str],
    spacings: Sequence[Sequence[float]],
    config: CrossConfig,
) -> PartnerViews | None:
    """The partner views of a pretraining corpus, registered where not yet cached.

    Args:
        volumes: The corpus's cached volumes (in-memory ones cannot pair and must not be here).
        sources: Their source paths, matched against ``config.groups``.
        spacings: Their voxel sizes in mm.
        config: The cross-pair settings.

    Returns:
        The views, or ``None`` without ``config.groups`` or with a zero ``fraction`` (nothing
        is registered then).
    """
    if not config.groups or config.fraction <= 0.0:
        return None
    cached = [v for v in volumes if isinstance(v, CachedVolume)]
    if len(cached) != len(volumes):
        raise ValueError("cross-volume pairs need cached volumes only (no MedMNIST cubes)")
    partners = partner_indices(sources, config.groups)
    if config.control:
        views = [[v.image_file] if p else [] for v, p in zip(cached, partners, strict=True)]
    else:
        views = partner_views(cached, spacings, partners, config)
    logger.info("cross-volume pairs: %d partner views", sum(map(len, views)))
    return PartnerViews(views, config.fraction)


class PartnerViews:
    """The partner views of a corpus, and the share of samples that cross.

    Args:
        views: ``views[i]``: paths of volume ``i``'s partner views (``(1, X, Y, Z)`` float32
            ``.npy`` on its grid); volumes past the list's end (MedMNIST cubes) have none.
        fraction: Share of all samples that are cross pairs.
    """

    def __init__(self, views: Sequence[Sequence[str]], fraction: float) -> None:
        self.views = [list(v) for v in views]
        self.fraction = float(fraction)
        self.members = [i for i, v in enumerate(self.views) if v]

    def draw(self, rng: np.random.Generator) -> tuple[int, np.ndarray] | None:
        """A cross pair's volume and partner view (memory-mapped), or ``None`` (a same-scan pair).

        With probability ``fraction`` a volume with partners is drawn uniformly, then one of its
        partner views.

        Raises:
            DataError: The view cannot be mapped.
        """
        if not self.members or self.fraction <= 0.0 or rng.random() >= self.fraction:
            return None
        volume = self.members[int(rng.integers(len(self.members)))]
        path = self.views[volume][int(rng.integers(len(self.views[volume])))]
        try:
            return volume, np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(path, f"cannot map the cross-volume partner view ({exc})") from None
