"""The paired (volume, text) data sources of the language adapter, and :func:`paired_dataset`.

No radiology reports can be reached on these machines, so the built-in sources write their text
from real labels and metadata with fixed templates (:mod:`omnienc.adapters.language.reports`).
Every such item carries ``meta["templated"] = True``, and every result built on them must say
the text is templated.

* ``adrenalmnist3d``: AdrenalMNIST3D shape masks (MedMNIST v2, https://arxiv.org/abs/2110.14795),
  text ``"AdrenalMNIST3D adrenal shape mask: {class}."`` with the class name from the medmnist
  package's ``INFO`` (``normal`` or ``hyperplasia``). Split: the official ``train`` split for
  training, the official ``test`` split held out.
* ``totalseg``: crops (default 32 x 32 x 16 voxels at the encoder's 2 mm preprocessing, 64 x 64
  x 32 mm, thinner along the superior axis so that the 40 mm held-out DICOM slab fills a crop
  without padding) of real TotalSegmentator CT and MR volumes with their label maps, text
  ``"{modality} of the {region}. Structures: {a, b, c}."``. The modality is the volume's, the
  region comes from :data:`TOTALSEG_TRAIN` / :data:`TOTALSEG_TEST`, and the structures are the
  report terms (:func:`~omnienc.adapters.language.reports.report_term`) with at least
  ``min_voxels`` voxels inside the crop, in the fixed order of
  :data:`~omnienc.adapters.language.reports.TERM_ORDER` (``none`` when there are none). Split by
  volume: training crops come from three volumes, test crops from a fourth scan never seen in
  training (:data:`TOTALSEG_TEST`, another scanner and grid).
* A user's CSV of ``path,report`` rows:
  :class:`~omnienc.adapters.language.items.PairedVolumes` (not templated).

Every item is ``{"image": (C, X, Y, Z) float32, "text": str, "id": str, "meta": dict}``.
:func:`~omnienc.adapters.language.tokens.encode_tokens` runs the frozen encoder over a paired
dataset once and keeps its tokens, which is what the projector trains on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from omnienc.adapters.language.items import LabelledVolume, PairedItem, PairedItems, PairedVolumes
from omnienc.adapters.language.reports import TERM_ORDER, adrenal_report, crop_report, report_term
from omnienc.config import positive_int_triple
from omnienc.data.labeled import LabeledVolumes
from omnienc.data.medmnist import MedMNIST
from omnienc.data.root import resolve_data_root
from omnienc.errors import DataError
from omnienc.preprocessing import Preprocessing
from omnienc.transforms import select_foreground

ADRENAL = "adrenalmnist3d"
TOTALSEG = "totalseg"
BUILTIN_SOURCES = (ADRENAL, TOTALSEG)
SPLITS = ("train", "test")


TOTALSEG_TRAIN: tuple[LabelledVolume, ...] = (
    LabelledVolume(
        "totalsegmentator/example_ct_sm.nii.gz", "totalsegmentator/example_seg.nii.gz", "abdomen"
    ),
    LabelledVolume(
        "totalsegmentator/example_mr_sm.nii.gz", "totalsegmentator/example_seg_mr.nii.gz", "abdomen"
    ),
    LabelledVolume(
        "totalsegmentator/pulmonary_ct_cropped.nii.gz",
        "totalsegmentator/pulmonary_artery_seg.nii.gz",
        "chest",
        ((1, "pulmonary_artery"),),  # a binary mask, not TotalSegmentator's class ids
    ),
)
"""Training volumes of the ``totalseg`` source: abdominal CT and MR, and a chest CT."""

TOTALSEG_TEST: tuple[LabelledVolume, ...] = (
    LabelledVolume(
        "totalsegmentator/example_ct_dicom",
        "totalsegmentator/example_seg_dicom.nii.gz",
        "abdomen",
    ),
)
"""Held-out volume of the ``totalseg`` source: a 20-slice upper-abdominal DICOM CT series from
another scanner, grid and field of view (the segmentation benchmark's test scan)."""


@dataclass
class PairedDataConfig:
    """Which paired data to use and how to cut the templated crops.

    Attributes:
        sources: Built-in sources (``adrenalmnist3d``, ``totalseg``) and/or paths of CSV files of
            ``path,report`` rows (a user's own reports; read with :class:`PairedVolumes`).
        adrenal_size: AdrenalMNIST3D cube side, 28 or 64.
        crop_size: ``(X, Y, Z)`` voxels of a ``totalseg`` crop after preprocessing.
        train_stride: Grid stride of the training crops (they overlap when below the crop size).
        test_stride: Grid stride of the held-out crops.
        min_voxels: Voxels a structure needs inside a crop to be named.
        min_foreground: Fraction of body voxels (:func:`~omnienc.transforms.select_foreground`)
            a crop needs to be kept.
        max_items: Keep at most this many items per source (evenly spaced), or ``None``.
    """

    sources: list[str] = field(default_factory=lambda: [ADRENAL, TOTALSEG])
    adrenal_size: int = 28
    crop_size: tuple[int, int, int] = (32, 32, 16)
    train_stride: int = 8
    test_stride: int = 16
    min_voxels: int = 64
    min_foreground: float = 0.25
    max_items: int | None = None

    def __post_init__(self) -> None:
        self.crop_size = positive_int_triple("crop_size", self.crop_size)
        if not self.sources:
            raise ValueError("data.sources is empty")
        if min(self.train_stride, self.test_stride, self.min_voxels) < 1:
            raise ValueError("strides and min_voxels must be >= 1")
        if not 0.0 <= self.min_foreground <= 1.0:
            raise ValueError(f"min_foreground must be in [0, 1], got {self.min_foreground}")
        for s in self.sources:
            if s not in BUILTIN_SOURCES and not str(s).endswith(".csv"):
                raise ValueError(
                    f"unknown data source {s!r}: use {', '.join(BUILTIN_SOURCES)} or a .csv file"
                )


def _evenly(items: list[Any], limit: int | None) -> list[Any]:
    """At most ``limit`` items, evenly spaced (all of them when ``limit`` is ``None``)."""
    if limit is None or len(items) <= limit:
        return items
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]


def adrenal_items(
    split: str,
    size: int = 28,
    medmnist_root: str | Path | None = None,
    limit: int | None = None,
) -> list[PairedItem]:
    """AdrenalMNIST3D items with their templated text.

    Args:
        split: ``train`` or ``test`` (the official MedMNIST splits).
        size: 28 or 64.
        medmnist_root: Folder of the ``.npz`` files (default ``medmnist/`` of the data root).
        limit: Keep at most this many items, evenly spaced through the split.

    Returns:
        Items with ``image`` ``(1, S, S, S)`` in [0, 1] and ``meta`` ``{"source", "templated",
        "label", "class"}``.
    """
    ds = MedMNIST(ADRENAL, split, size=size, root=medmnist_root)
    items = []
    for i in _evenly(list(range(len(ds))), limit):
        d = ds[i]
        label = int(d["label"][0])
        name = ds.class_names[str(label)]
        meta = {"source": ADRENAL, "templated": True, "label": label, "class": name}
        items.append(PairedItem(d["image"], adrenal_report(name), d["id"], meta))
    return items


def grid_starts(size: int, crop: int, stride: int) -> list[int]:
    """Start offsets of crops along one axis: every ``stride``, plus one flush with the end."""
    if size <= crop:
        return [0]
    starts = list(range(0, size - crop + 1, stride))
    if starts[-1] != size - crop:
        starts.append(size - crop)
    return starts


def crop_items(
    volume: LabelledVolume,
    volumes_root: str | Path,
    preprocessing: Preprocessing,
    crop_size: Sequence[int] = (32, 32, 16),
    stride: int = 16,
    min_voxels: int = 64,
    min_foreground: float = 0.25,
) -> list[PairedItem]:
    """Grid crops of one labelled volume with their templated text.

    The image and its label map are preprocessed together, padded to at least ``crop_size``
    (image with its minimum, labels with 0) and cut on a grid of ``stride``; crops with less than
    ``min_foreground`` body voxels are dropped.

    Returns:
        Items with ``image`` ``(1, *crop_size)`` and ``meta`` ``{"source", "templated",
        "modality", "region", "structures", "volume", "start"}``.

    Raises:
        DataError: A file is missing or a pair's grids differ.
        VolumeReadError: A file cannot be read.
    """
    root = Path(volumes_root)
    pair = (root / volume.image, root / volume.label)
    for p in pair:
        if not p.exists():
            raise DataError(p, "labelled volume for templated crops does not exist")
    d = LabeledVolumes([pair], preprocessing)[0]
    image, label, modality = d["image"], d["label"], d["modality"]
    pads: list[int] = []
    for size, c in zip(reversed(image.shape[1:]), reversed(list(crop_size)), strict=True):
        extra = max(0, int(c) - int(size))
        pads += [extra // 2, extra - extra // 2]
    if any(pads):
        image = torch.nn.functional.pad(image, pads, value=float(image.min()))
        label = torch.nn.functional.pad(label, pads, value=0)
    body = select_foreground(image)
    table = volume.name_table()
    max_id = max(int(label.max()), max(table, default=0))
    # term of each label id (None: not named); label ids missing from the table are not named.
    id_terms = {i: report_term(n) for i, n in table.items()}
    cx, cy, cz = (int(c) for c in crop_size)
    items = []
    for x in grid_starts(image.shape[1], cx, stride):
        for y in grid_starts(image.shape[2], cy, stride):
            for z in grid_starts(image.shape[3], cz, stride):
                box = (slice(None), slice(x, x + cx), slice(y, y + cy), slice(z, z + cz))
                if float(body[box].float().mean()) < min_foreground:
                    continue
                counts = torch.bincount(label[box].flatten(), minlength=max_id + 1)
                per_term: dict[str, int] = {}
                for i, term in id_terms.items():
                    if term is not None and i < len(counts):
                        per_term[term] = per_term.get(term, 0) + int(counts[i])
                terms = [t for t in TERM_ORDER if per_term.get(t, 0) >= min_voxels]
                meta = {
                    "source": TOTALSEG,
                    "templated": True,
                    "modality": modality,
                    "region": volume.region,
                    "structures": terms,
                    "volume": volume.image,
                    "start": [x, y, z],
                }
                items.append(
                    PairedItem(
                        image[box].clone(),
                        crop_report(modality, volume.region, terms),
                        f"{volume.image}@{x},{y},{z}",
                        meta,
                    )
                )
    return items


def totalseg_items(
    split: str,
    preprocessing: Preprocessing,
    config: PairedDataConfig | None = None,
    data_root: str | Path | None = None,
    progress: bool = False,
) -> list[PairedItem]:
    """Templated crops of :data:`TOTALSEG_TRAIN` (``train``) or :data:`TOTALSEG_TEST` (``test``).

    Training crops use ``config.train_stride``, held-out crops ``config.test_stride``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    config = config or PairedDataConfig()
    root = resolve_data_root(data_root) / "volumes"
    vols = TOTALSEG_TRAIN if split == "train" else TOTALSEG_TEST
    stride = config.train_stride if split == "train" else config.test_stride
    items: list[PairedItem] = []
    for vol in tqdm(vols, desc=f"templated crops ({split})", disable=not progress, unit="vol"):
        items += crop_items(
            vol,
            root,
            preprocessing,
            config.crop_size,
            stride,
            config.min_voxels,
            config.min_foreground,
        )
    return _evenly(items, config.max_items)


def paired_dataset(
    config: PairedDataConfig,
    split: str,
    preprocessing: Preprocessing,
    data_root: str | Path | None = None,
    progress: bool = False,
) -> Mapping[str, Dataset[dict[str, Any]]]:
    """One dataset per source of ``config.sources`` for ``split``.

    CSV sources have no split of their own: they are used whole for either split.

    Returns:
        Source name (or CSV path) -> dataset of ``{"image", "text", "id", "meta"}`` dicts.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    out: dict[str, Dataset[dict[str, Any]]] = {}
    for source in config.sources:
        if source == ADRENAL:
            medmnist_root = resolve_data_root(data_root) / "medmnist"
            out[source] = PairedItems(
                adrenal_items(split, config.adrenal_size, medmnist_root, config.max_items)
            )
        elif source == TOTALSEG:
            out[source] = PairedItems(
                totalseg_items(split, preprocessing, config, data_root, progress)
            )
        else:
            out[source] = PairedVolumes.from_csv(source, preprocessing)
    return out
