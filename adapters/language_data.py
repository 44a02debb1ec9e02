"""Paired (volume, text) data for the language adapter, and the templated text of the real labels.

No radiology reports can be reached on these machines, so the built-in sources write their text
from real labels and metadata with fixed templates. Every such item carries
``meta["templated"] = True``, and every result built on them must say the text is templated.

* ``adrenalmnist3d``: AdrenalMNIST3D shape masks (MedMNIST v2, https://arxiv.org/abs/2110.14795),
  text ``"AdrenalMNIST3D adrenal shape mask: {class}."`` with the class name from the medmnist
  package's ``INFO`` (``normal`` or ``hyperplasia``). Split: the official ``train`` split for
  training, the official ``test`` split held out.
* ``totalseg``: crops (default 32 x 32 x 16 voxels at the encoder's 2 mm preprocessing, 64 x 64
  x 32 mm, thinner along the superior axis so that the 40 mm held-out DICOM slab fills a crop
  without padding) of real TotalSegmentator CT and MR volumes with their label maps, text
  ``"{modality} of the {region}. Structures: {a, b, c}."``. The modality is the volume's, the
  region comes from :data:`TOTALSEG_TRAIN` / :data:`TOTALSEG_TEST`, and the structures are the
  report terms (:func:`report_term`) with at least ``min_voxels`` voxels inside the crop, in the
  fixed order of :data:`TERM_ORDER` (``none`` when there are none). Split by volume: training
  crops come from three volumes, test crops from a fourth scan never seen in training
  (:data:`TOTALSEG_TEST`, another scanner and grid).
* A user's CSV of ``path,report`` rows: :class:`PairedVolumes` (not templated).

Every item is ``{"image": (C, X, Y, Z) float32, "text": str, "id": str, "meta": dict}``.
:func:`encode_tokens` runs the frozen encoder over a paired dataset once and keeps its tokens
(:class:`TokenSet`), which is what the projector trains on.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from omnienc.checkpoint import load_checkpoint_config, load_encoder
from omnienc.data.labeled import LabeledVolumes
from omnienc.data.labelnames import structure_names
from omnienc.data.medmnist import MedMNIST
from omnienc.data.root import resolve_data_root
from omnienc.embed import encoder_input
from omnienc.encoders import RANDOM_PREFIX, arch_name, parse_random_spec, random_encoder
from omnienc.encoders.base import Encoder
from omnienc.errors import DataError
from omnienc.io import read_volume
from omnienc.preprocessing import Preprocessing
from omnienc.transforms import preprocess_volume, select_foreground

ADRENAL = "adrenalmnist3d"
TOTALSEG = "totalseg"
BUILTIN_SOURCES = (ADRENAL, TOTALSEG)
SPLITS = ("train", "test")

# (TotalSegmentator structure name pattern, report term). Names matching no rule are not named
# in the text: ribs, costal cartilages, muscles, veins, spinal cord, limb bones. They are many
# small structures that would make every crop's text long without saying more about the organs.
_TERM_RULES: tuple[tuple[str, str], ...] = (
    (r"lung_.*", "lung"),
    (r"heart|atrial_appendage_left", "heart"),
    (r"aorta", "aorta"),
    (r"pulmonary_artery", "pulmonary artery"),
    (r"liver", "liver"),
    (r"gallbladder", "gallbladder"),
    (r"spleen", "spleen"),
    (r"stomach", "stomach"),
    (r"pancreas", "pancreas"),
    (r"adrenal_gland_(left|right)", "adrenal gland"),
    (r"kidney_(left|right|cyst_left|cyst_right)", "kidney"),
    (r"duodenum|small_bowel|colon", "bowel"),
    (r"urinary_bladder", "bladder"),
    (r"prostate", "prostate"),
    (r"vertebrae(_[CTLS]\d+)?|sacrum|intervertebral_discs", "spine"),
    (r"esophagus", "esophagus"),
    (r"trachea", "trachea"),
    (r"thyroid_gland", "thyroid gland"),
    (r"brain", "brain"),
)
TERM_ORDER: tuple[str, ...] = tuple(dict.fromkeys(term for _, term in _TERM_RULES))
"""The report terms, in the order a text lists them (head to pelvis, organs before the spine)."""


def report_term(name: str) -> str | None:
    """The report term of a TotalSegmentator structure name, or ``None`` if texts omit it.

    >>> report_term("kidney_left"), report_term("vertebrae_L1"), report_term("rib_left_7")
    ('kidney', 'spine', None)
    """
    for pattern, term in _TERM_RULES:
        if re.fullmatch(pattern, name):
            return term
    return None


def crop_report(modality: str, region: str, terms: Sequence[str]) -> str:
    """The templated text of a crop, e.g. ``"CT of the abdomen. Structures: liver, spleen."``."""
    return f"{modality} of the {region}. Structures: {', '.join(terms) if terms else 'none'}."


def adrenal_report(class_name: str) -> str:
    """The templated text of an AdrenalMNIST3D item, e.g. ``"... shape mask: normal."``."""
    return f"AdrenalMNIST3D adrenal shape mask: {class_name}."


def parse_crop_report(text: str) -> dict[str, Any]:
    """Read modality, region and structures back from a (generated) crop text.

    Args:
        text: Text in the form :func:`crop_report` writes; anything else parses partly or not.

    Returns:
        ``{"modality": str | None, "region": str | None, "structures": set of terms}``. Words
        after ``Structures:`` that are not report terms are dropped.
    """
    m = re.match(r"\s*(\S+) of the ([a-z ]+?)\.", text)
    structures: set[str] = set()
    s = re.search(r"Structures:(.*?)(\.|$)", text)
    if s:
        words = {w.strip() for w in s.group(1).split(",")}
        structures = {w for w in words if w in TERM_ORDER}
    return {
        "modality": m.group(1) if m else None,
        "region": m.group(2) if m else None,
        "structures": structures,
    }


def parse_adrenal_report(text: str, class_names: Sequence[str]) -> str | None:
    """The class name a (generated) AdrenalMNIST3D text states, or ``None``."""
    m = re.search(r"shape mask:\s*([a-z ]+?)\s*(\.|$)", text)
    if m and m.group(1) in class_names:
        return m.group(1)
    return None


@dataclass
class PairedItem:
    """One volume with its text.

    Attributes:
        image: ``(C, X, Y, Z)`` float32, preprocessed as the encoder expects.
        text: The report (templated for the built-in sources).
        id: Where it came from (file and crop start, or a MedMNIST id).
        meta: ``source``, ``templated`` and the labels the text was made from.
    """

    image: torch.Tensor
    text: str
    id: str
    meta: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The item in the dataset form ``{"image", "text", "id", "meta"}``."""
        return {"image": self.image, "text": self.text, "id": self.id, "meta": self.meta}


class PairedItems(Dataset[dict[str, Any]]):
    """A list of :class:`PairedItem` as a dataset of ``{"image", "text", "id", "meta"}`` dicts."""

    def __init__(self, items: Sequence[PairedItem]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i].as_dict()


class PairedVolumes(Dataset[dict[str, Any]]):
    """(volume file, report) pairs, read and preprocessed when an item is asked for.

    Args:
        pairs: ``[(path, report), ...]``; a path is a volume file or a DICOM series folder.
        preprocessing: The encoder's preprocessing.
        modality: Force the modality of every volume (else inferred per file).

    Raises:
        DataError: A file does not exist or a report is empty (named in the message).
    """

    def __init__(
        self,
        pairs: Sequence[tuple[str | Path, str]],
        preprocessing: Preprocessing | None = None,
        modality: str | None = None,
    ) -> None:
        if not pairs:
            raise ValueError("PairedVolumes needs at least one (path, report) pair")
        self.pairs = [(Path(p), str(text)) for p, text in pairs]
        self.preprocessing = preprocessing or Preprocessing()
        self.modality = modality
        for path, text in self.pairs:
            if not path.exists():
                raise DataError(path, "volume file does not exist")
            if not text.strip():
                raise DataError(path, "its report is empty")

    @classmethod
    def from_csv(
        cls,
        csv_path: str | Path,
        preprocessing: Preprocessing | None = None,
        modality: str | None = None,
    ) -> PairedVolumes:
        """Read ``path,report`` rows (a header row naming both columns comes first).

        Relative paths are taken relative to the CSV file's folder.

        Raises:
            DataError: The CSV is missing, unreadable, lacks the columns, has no rows, or a row
                has an empty path or report or names a file that does not exist; the message
                names the CSV, the row and the file.
        """
        csv_path = Path(csv_path)
        if not csv_path.is_file():
            raise DataError(csv_path, "CSV of (path, report) pairs does not exist")
        try:
            with open(csv_path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                rows = list(reader)
                header = [h.strip() for h in reader.fieldnames or []]
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise DataError(csv_path, f"cannot read the CSV: {exc}") from exc
        missing = [c for c in ("path", "report") if c not in header]
        if missing:
            raise DataError(
                csv_path,
                f"CSV lacks the column(s) {missing}; its header is {header} (expected a first "
                "row `path,report`)",
            )
        if not rows:
            raise DataError(csv_path, "CSV has a header but no rows")
        pairs: list[tuple[str | Path, str]] = []
        for n, raw in enumerate(rows, start=2):  # row 1 is the header
            row = {k.strip(): v for k, v in raw.items() if isinstance(k, str)}
            path_text = (row.get("path") or "").strip()
            report = (row.get("report") or "").strip()
            if not path_text or not report:
                raise DataError(csv_path, f"row {n} has an empty path or report")
            path = Path(path_text)
            path = path if path.is_absolute() else csv_path.parent / path
            if not path.exists():
                raise DataError(path, f"volume file listed in {csv_path} row {n} does not exist")
            pairs.append((path, report))
        return cls(pairs, preprocessing, modality)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path, text = self.pairs[i]
        out = preprocess_volume(read_volume(path, modality=self.modality), self.preprocessing)
        return {
            "image": torch.from_numpy(out["image"]),
            "text": text,
            "id": str(path),
            "meta": {"source": "csv", "templated": False, "modality": out["modality"]},
        }


@dataclass(frozen=True)
class LabelledVolume:
    """A real volume with a label map on its grid, as a source of templated crops.

    Attributes:
        image: Path under ``volumes/`` (a file or a DICOM series folder).
        label: Path of its label map under ``volumes/``.
        region: Body region the text names.
        names: ``(id, structure name)`` pairs of the label map, or empty for the TotalSegmentator
            table chosen by the file name (:func:`omnienc.data.labelnames.structure_names`).
    """

    image: str
    label: str
    region: str
    names: tuple[tuple[int, str], ...] = ()

    def name_table(self) -> dict[int, str]:
        """Label id -> structure name."""
        return dict(self.names) if self.names else structure_names(self.label)


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
        self.crop_size = tuple(int(c) for c in self.crop_size)  # type: ignore[assignment]
        if not self.sources:
            raise ValueError("data.sources is empty")
        if len(self.crop_size) != 3 or min(self.crop_size) < 1:
            raise ValueError(f"crop_size must be three positive ints, got {self.crop_size}")
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


# -------------------------------------------------------------------- frozen encoder tokens


def state_fingerprint(module: nn.Module) -> str:
    """``sha256:HEX`` of a module's state dict (names, dtypes, shapes and values).

    Two encoders with equal weights get the same fingerprint however they were saved or built.
    """
    h = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        t = value.detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return f"sha256:{h.hexdigest()}"


def load_encoder_spec(spec: str | Path) -> tuple[Encoder, Preprocessing, dict[str, Any]]:
    """An encoder from a checkpoint folder or ``random:ARCH[:SEED]``, frozen, with its facts.

    Returns:
        ``(encoder, preprocessing, info)``; ``info`` holds ``source``, ``fingerprint``
        (:func:`state_fingerprint`), ``arch``, ``embed_dim`` and the checkpoint's ``meta``.

    Raises:
        CheckpointError: The folder is not a loadable encoder checkpoint.
        ValueError: Unknown architecture in ``random:ARCH``.
    """
    text = str(spec)
    parsed = parse_random_spec(text)
    if parsed is not None:
        arch, seed = parsed[0], parsed[1] or 0
        encoder = random_encoder(arch, seed)
        pre, meta = Preprocessing(), {"random_init": f"{RANDOM_PREFIX}{arch}:{seed}"}
    else:
        encoder, pre = load_encoder(spec)
        meta = load_checkpoint_config(spec).get("meta") or {}
    encoder.requires_grad_(False).eval()
    info = {
        "source": text,
        "fingerprint": state_fingerprint(encoder),
        "arch": arch_name(encoder),
        "embed_dim": encoder.embed_dim,
        "meta": meta,
    }
    return encoder, pre, info


def grid_positions(grid: Sequence[int]) -> torch.Tensor:
    """Centres of a ``(d, h, w)`` token grid in ``[-1, 1]``, raster order: ``(d h w, 3)``."""
    axes = [(torch.arange(n, dtype=torch.float32) + 0.5) / n * 2 - 1 for n in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


@dataclass
class TokenSet(Dataset[dict[str, Any]]):
    """Frozen encoder tokens of paired items, with their texts.

    Attributes:
        tokens: Per item ``(N_i, E)`` float32: the deepest feature map flattened in raster order.
        positions: Per item ``(N_i, 3)`` token-grid centres in ``[-1, 1]``.
        texts: Per item text.
        ids: Per item id.
        metas: Per item ``meta`` of the paired dataset.
    """

    tokens: list[torch.Tensor]
    positions: list[torch.Tensor]
    texts: list[str]
    ids: list[str]
    metas: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"tokens": self.tokens[i], "positions": self.positions[i], "text": self.texts[i]}

    def subset(self, rows: Sequence[int]) -> TokenSet:
        """The items at ``rows``, in that order."""
        return TokenSet(
            [self.tokens[i] for i in rows],
            [self.positions[i] for i in rows],
            [self.texts[i] for i in rows],
            [self.ids[i] for i in rows],
            [self.metas[i] for i in rows] if self.metas else [],
        )


@torch.inference_mode()
def volume_tokens(encoder: Encoder, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens of a batch of same-shape volumes.

    Args:
        encoder: The frozen encoder.
        images: ``(B, C, X, Y, Z)`` preprocessed volumes.

    Returns:
        ``(tokens (B, N, E), positions (N, 3))`` from the deepest feature map ``(B, E, d, h, w)``.
    """
    maps = encoder.forward_features(encoder_input(encoder, images)).float().cpu()
    return maps.flatten(2).transpose(1, 2).contiguous(), grid_positions(maps.shape[2:])


def encode_tokens(
    encoder: Encoder,
    dataset: Dataset[dict[str, Any]],
    batch_size: int = 32,
    progress: bool = False,
) -> TokenSet:
    """Run the frozen encoder once over a paired dataset and keep its tokens.

    Consecutive items of the same shape are encoded together, ``batch_size`` at a time.

    Args:
        encoder: The frozen encoder (put in eval mode).
        dataset: Items ``{"image": (C, X, Y, Z), "text", "id", "meta"}``.
        batch_size: Volumes per forward pass.
        progress: Show a progress bar.
    """
    encoder.eval()
    out = TokenSet([], [], [], [], [])
    pending: list[dict[str, Any]] = []

    def flush() -> None:
        if not pending:
            return
        tokens, pos = volume_tokens(encoder, torch.stack([p["image"] for p in pending]))
        for p, t in zip(pending, tokens, strict=True):
            out.tokens.append(t.clone())
            out.positions.append(pos)
            out.texts.append(p["text"])
            out.ids.append(p["id"])
            out.metas.append(dict(p.get("meta") or {}))
        pending.clear()

    n = len(dataset)  # type: ignore[arg-type]
    for i in tqdm(range(n), desc="encoder tokens", disable=not progress, unit="item"):
        item = dataset[i]
        if pending and (
            len(pending) >= batch_size or pending[0]["image"].shape != item["image"].shape
        ):
            flush()
        pending.append(item)
    flush()
    return out


def collate_tokens(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pad a list of :class:`TokenSet` items to a batch.

    Returns:
        ``{"tokens": (B, N, E), "positions": (B, N, 3), "mask": (B, N) bool (True: a real
        token), "text": list of B strings}`` with ``N`` the longest item's token count.
    """
    n = max(int(it["tokens"].shape[0]) for it in items)
    e = int(items[0]["tokens"].shape[1])
    tokens = torch.zeros(len(items), n, e)
    positions = torch.zeros(len(items), n, 3)
    mask = torch.zeros(len(items), n, dtype=torch.bool)
    for b, it in enumerate(items):
        k = int(it["tokens"].shape[0])
        tokens[b, :k], positions[b, :k], mask[b, :k] = it["tokens"], it["positions"], True
    return {
        "tokens": tokens,
        "positions": positions,
        "mask": mask,
        "text": [i["text"] for i in items],
    }
