"""What a latent map is made of: its inputs, its colourings, and the gathered points.

What the encoder learned, as a picture and as numbers. Inputs of four kinds can be mixed:

* a volume file or a folder of volumes (embedded by :func:`omnienc.embed.embed_inputs`, as
  ``omnienc embed`` does; the modality is the one :func:`omnienc.io.read_volume` infers);
* ``medmnist:FLAG:SIZE:SPLIT``, a MedMNIST split (label = its class name);
* ``structures:IMAGE:LABELS[:NAME]``, one fixed-size crop around every sufficiently large
  structure of a label map on the image's grid (:mod:`omnienc.adapters.latent.crops`;
  label = the TotalSegmentator structure name, ``NAME`` for every structure of a binary
  mask, or ``label K`` with ``NAME`` = ``ids`` for label maps of other conventions).

Every point gets a ``modality``, a ``dataset`` (the subfolder a volume lies in, the MedMNIST
flag and size, or the image the crops come from), a fine ``label`` and a coarse ``group`` (the
organ group of a structure, the class of a MedMNIST item); whole volumes have no label.

This module checks the inputs (:func:`check_inputs`) and holds the gathered points
(:class:`LatentSet`) and their options (:class:`LatentOptions`);
:func:`~omnienc.adapters.latent.gather.gather_latent` embeds them. The 2D map and the numbers
beside it are in :mod:`omnienc.adapters.latent.metrics`, the PNG/CSV writers and the whole run
per encoder in :mod:`omnienc.adapters.latent.maps`, the interactive page in
:mod:`omnienc.adapters.latent.html`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omnienc.data.medmnist import parse_medmnist_spec
from omnienc.embed import MEDMNIST_PREFIX
from omnienc.errors import PathError

STRUCTURES_PREFIX = "structures:"
BY_ID = "ids"
"""``structures:IMAGE:LABELS:ids`` names structures ``label K`` instead of TotalSegmentator's."""
COLOURINGS = ("modality", "dataset", "label", "group")
MISSING = "(none)"
"""The value of a colouring a point does not have (a whole volume has no label)."""
UNKNOWN_MODALITY = "unknown"

# What the pixels of each MedMNIST set are (from the medmnist package's INFO descriptions).
# AdrenalMNIST3D and VesselMNIST3D hold binary shape masks, not intensities.
MEDMNIST_MODALITY: dict[str, str] = {
    "pathmnist": "pathology",
    "chestmnist": "X-ray",
    "dermamnist": "dermatoscopy",
    "octmnist": "OCT",
    "pneumoniamnist": "X-ray",
    "retinamnist": "fundus photo",
    "breastmnist": "US",
    "bloodmnist": "microscopy",
    "tissuemnist": "microscopy",
    "organamnist": "CT",
    "organcmnist": "CT",
    "organsmnist": "CT",
    "organmnist3d": "CT",
    "nodulemnist3d": "CT",
    "adrenalmnist3d": "CT shape mask",
    "fracturemnist3d": "CT",
    "vesselmnist3d": "MRA shape mask",
    "synapsemnist3d": "EM",
}


def parse_structures_spec(spec: str) -> tuple[Path, Path, str | None]:
    """Split ``structures:IMAGE:LABELS[:NAME]``.

    Args:
        spec: e.g. ``structures:ct.nii.gz:seg.nii.gz`` or
            ``structures:ct.nii.gz:artery.nii.gz:pulmonary_artery``.

    Returns:
        ``(image, labels, name)``; ``name`` is ``None`` unless given.

    Raises:
        ValueError: The spec does not have that form (paths with ``:`` cannot be given).
    """
    form = "expected structures:IMAGE:LABELS or structures:IMAGE:LABELS:NAME"
    parts = spec.split(":")
    if parts[0] != STRUCTURES_PREFIX[:-1] or len(parts) not in (3, 4) or not all(parts[1:]):
        raise ValueError(f"bad structures spec {spec!r}: {form} (paths may not contain ':')")
    name = parts[3] if len(parts) == 4 else None
    return Path(parts[1]), Path(parts[2]), name


def medmnist_file(medmnist_root: Path, flag: str, size: int) -> Path:
    """The ``.npz`` file the medmnist package reads for ``flag`` at ``size``."""
    return medmnist_root / (f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz")


def check_inputs(inputs: Sequence[str], medmnist_root: Path | None, download: bool = False) -> None:
    """Fail early, before any encoder runs, on inputs that cannot be read.

    Args:
        inputs: Input specs.
        medmnist_root: Folder of the MedMNIST files (needed for ``medmnist:`` inputs).
        download: Missing MedMNIST files will be downloaded (so they are not an error here).

    Raises:
        ValueError: A malformed ``medmnist:`` or ``structures:`` spec, or no inputs.
        PathError: A file or folder that does not exist (MedMNIST: the ``.npz`` file).
    """
    if not inputs:
        raise ValueError("give at least one input")
    for spec in inputs:
        if spec.startswith(MEDMNIST_PREFIX):
            flag, size, _ = parse_medmnist_spec(spec)
            if medmnist_root is None:
                raise ValueError(f"{spec}: a medmnist input needs the MedMNIST folder")
            file = medmnist_file(medmnist_root, flag, size)
            if not download and not file.is_file():
                raise PathError(
                    file,
                    f"no such file (input {spec!r}); copy {file.name} into {medmnist_root}, or "
                    "pass --download on a machine with internet",
                )
            continue
        paths = parse_structures_spec(spec)[:2] if spec.startswith(STRUCTURES_PREFIX) else (spec,)
        for p in paths:
            if not Path(p).exists():
                raise PathError(p, f"no such file or folder (input {spec!r})")


@dataclass
class LatentSet:
    """Features of mixed inputs and what each point is.

    Attributes:
        features: ``(N, E)`` float32 pooled embeddings.
        ids: ``N`` item ids.
        sources: ``N`` files each point comes from (shown on hover).
        inputs: ``N`` input specs, the one each point came from.
        modality: ``N`` modalities (``unknown`` where omnienc cannot tell).
        dataset: ``N`` dataset names.
        label: ``N`` fine labels (:data:`MISSING` for whole volumes).
        group: ``N`` coarse labels (:data:`MISSING` for whole volumes).
    """

    features: np.ndarray
    ids: list[str]
    sources: list[str]
    inputs: list[str]
    modality: list[str]
    dataset: list[str]
    label: list[str]
    group: list[str]

    def __post_init__(self) -> None:
        self.features = np.asarray(self.features, dtype=np.float32)
        n = len(self.features)
        for name in ("ids", "sources", "inputs", *COLOURINGS):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{n} feature rows but {len(getattr(self, name))} {name}")

    def __len__(self) -> int:
        return len(self.features)

    def column(self, name: str) -> list[str]:
        """One of :data:`COLOURINGS` (or ``ids``, ``sources``, ``inputs``) as a list."""
        return list(getattr(self, name))

    def subset(self, rows: Sequence[int] | np.ndarray) -> LatentSet:
        """The points ``rows`` (integer positions)."""
        idx = [int(i) for i in rows]
        return LatentSet(
            features=self.features[idx],
            **{
                k: [getattr(self, k)[i] for i in idx]
                for k in ("ids", "sources", "inputs", *COLOURINGS)
            },
        )

    @staticmethod
    def concat(parts: Sequence[LatentSet]) -> LatentSet:
        """All points of ``parts`` in order.

        Raises:
            ValueError: ``parts`` is empty or the feature widths differ.
        """
        if not parts:
            raise ValueError("nothing to concatenate")
        return LatentSet(
            features=np.concatenate([p.features for p in parts]),
            **{
                k: [v for p in parts for v in getattr(p, k)]
                for k in ("ids", "sources", "inputs", *COLOURINGS)
            },
        )


def palette(values: Sequence[str]) -> dict[str, str]:
    """A stable colour per category, by sorted name: tab10, tab20's light shades, tab20b, tab20c.

    Missing values (:data:`MISSING`, ``unknown``) are grey. The same categories get the same
    colours in every map (and in the PNG and the HTML).
    """
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    # tab10's distinct colours first, then tab20's lighter shades, then tab20b and tab20c.
    colours = [to_hex(colormaps["tab10"](i)) for i in range(10)]
    colours += [to_hex(colormaps["tab20"](i)) for i in range(1, 20, 2)]
    colours += [to_hex(colormaps[name](i)) for name in ("tab20b", "tab20c") for i in range(20)]
    cats = sorted({v for v in values if v not in (MISSING, UNKNOWN_MODALITY)})
    out = {c: colours[i % len(colours)] for i, c in enumerate(cats)}
    out.update({v: "#b0b0b0" for v in values if v in (MISSING, UNKNOWN_MODALITY)})
    return out


@dataclass
class LatentOptions:
    """How inputs are gathered and mapped.

    Attributes:
        max_per_input: Keep at most this many points of each input (seeded random subset;
            MedMNIST subsets are drawn before embedding). ``None``: all.
        crop_size: Structure crop size in preprocessed voxels (default: the checkpoint's
            pretraining crop, else 32^3).
        min_voxels: Smallest structure cropped, in preprocessed voxels.
        n_neighbors: UMAP neighbourhood (capped at ``N - 1``).
        min_dist: UMAP ``min_dist``.
        seed: Seeds UMAP, subsets and the cross-validation folds.
        batch_size: MedMNIST and crop batch size.
        frame: Frame of 4D volumes (``None``: folders skip 4D files, a 4D file given alone is an
            error naming it).
        cache_dir: Preprocessing cache of folders (default ``~/.cache/omnienc``).
        download: Let the medmnist package download missing files.
    """

    max_per_input: int | None = None
    crop_size: tuple[int, int, int] | None = None
    min_voxels: int = 100
    n_neighbors: int = 15
    min_dist: float = 0.1
    seed: int = 0
    batch_size: int = 32
    frame: int | None = None
    cache_dir: Path | None = None
    download: bool = False
