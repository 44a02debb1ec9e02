"""Paired (volume, text) items of the language adapter, and the datasets that hold them.

Every item built from templated text carries ``meta["templated"] = True``, and every result
built on them must say the text is templated.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from omnienc.data.labelnames import structure_names
from omnienc.errors import DataError
from omnienc.io import read_volume
from omnienc.preprocessing import Preprocessing
from omnienc.transforms import preprocess_volume


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
