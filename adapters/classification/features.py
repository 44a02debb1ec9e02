"""Frozen features of a data set (:class:`FeatureSet`) and the ids of the weights that made them.

A :class:`FeatureSet` holds the pooled embeddings ``(N, E)`` every probe takes, the labels, the
item ids, which weights made them (``checkpoint``) and from what (``dataset``), and, when asked,
the deepest feature maps ``(N, E, d, h, w)`` that trained heads (attention pooling) attend over.
It saves to and loads from one ``.npz`` file, opened without unpickling.

Maps are kept in float32. For MedMNIST they are small (``E * ceil(S / 16)^3`` values an item:
8 for 28^3 cubes, 64 for 64^3, so 1188 AdrenalMNIST3D 64^3 cubes with a 256-wide encoder make
78 MB), and float32 keeps ``maps.mean((2, 3, 4)) == features`` up to rounding, with no second
precision to reason about when a head trains on them.

:func:`checkpoint_id` names the folder an encoder was loaded from, :func:`random_checkpoint_id`
a random-init encoder; the feature cache (:mod:`omnienc.adapters.classification.extract`) trusts
them.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from omnienc.atomic import write_bytes_atomic
from omnienc.checkpoint import load_checkpoint_config
from omnienc.data.medmnist import select_rows
from omnienc.errors import CheckpointError, DataError

__all__ = [
    "FeatureSet",
    "checkpoint_id",
    "random_checkpoint_id",
]

FORMAT = "omnienc-features"
FORMAT_VERSION = 1
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# What np.load and NpzFile raise on a truncated, corrupt or foreign file.
_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile)


@dataclass
class FeatureSet:
    """Frozen features of one data set.

    Attributes:
        features: ``(N, E)`` float32 pooled embeddings.
        labels: ``(N,)`` int64 single-label targets, ``(N, L)`` int64 multi-label targets, or
            ``None`` for unlabeled data.
        ids: ``N`` item ids (``flag:size:split:row`` for MedMNIST).
        checkpoint: Which weights made the features: ``sha256:HEX`` of an exported checkpoint
            (:func:`checkpoint_id`) or ``random:ARCH:SEED`` (:func:`random_checkpoint_id`).
        dataset: What was embedded, e.g. ``medmnist:adrenalmnist3d:28:train``.
        maps: ``(N, E, d, h, w)`` float32 deepest feature maps, or ``None``.
        meta: JSON-serialisable facts (preprocessing, MedMNIST task and class names, ...).

    Raises:
        ValueError: The arrays do not have these shapes or disagree on ``N``.
    """

    features: np.ndarray
    labels: np.ndarray | None
    ids: list[str]
    checkpoint: str
    dataset: str
    maps: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.features = np.asarray(self.features, dtype=np.float32)
        self.ids = [str(i) for i in self.ids]
        if self.features.ndim != 2:
            raise ValueError(f"features must be (N, E), got shape {self.features.shape}")
        n = len(self.features)
        if len(self.ids) != n:
            raise ValueError(f"{n} feature rows but {len(self.ids)} ids")
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64)
            if self.labels.ndim not in (1, 2) or len(self.labels) != n:
                raise ValueError(
                    f"labels must be (N,) or (N, L) with N = {n}, got shape {self.labels.shape}"
                )
        if self.maps is not None:
            self.maps = np.asarray(self.maps, dtype=np.float32)
            if self.maps.ndim != 5 or self.maps.shape[:2] != self.features.shape:
                raise ValueError(
                    f"maps must be (N, E, d, h, w) with (N, E) = {self.features.shape}, "
                    f"got shape {self.maps.shape}"
                )

    def __len__(self) -> int:
        return len(self.features)

    def subset(self, indices: Sequence[int] | np.ndarray) -> FeatureSet:
        """The rows ``indices`` (integer positions, or a boolean mask of length ``N``).

        Raises:
            IndexError: An index is out of range, or a mask has the wrong length.
        """
        idx = np.asarray(indices)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise IndexError(f"a boolean mask needs {len(self)} entries, got {idx.shape}")
            rows = np.flatnonzero(idx)
        else:
            rows = select_rows(idx.reshape(-1).tolist(), len(self))
        return FeatureSet(
            features=self.features[rows],
            labels=None if self.labels is None else self.labels[rows],
            ids=[self.ids[i] for i in rows],
            checkpoint=self.checkpoint,
            dataset=self.dataset,
            maps=None if self.maps is None else self.maps[rows],
            meta=dict(self.meta),
        )

    def save(self, path: str | Path) -> Path:
        """Write the set as ``.npz`` atomically (strings as unicode arrays, meta as JSON).

        Returns:
            ``path``.
        """
        header = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "checkpoint": self.checkpoint,
            "dataset": self.dataset,
            "meta": self.meta,
        }
        arrays: dict[str, Any] = {
            "features": self.features,
            "ids": np.asarray(self.ids, dtype=np.str_).reshape(len(self.ids)),
            "header": np.asarray(json.dumps(header, allow_nan=False)),
        }
        if self.labels is not None:
            arrays["labels"] = self.labels
        if self.maps is not None:
            arrays["maps"] = self.maps
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return write_bytes_atomic(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> FeatureSet:
        """Read a file written by :meth:`save`; never unpickles.

        Raises:
            DataError: The file is missing, unreadable, holds pickled objects, or is not a
                feature file.
        """
        path = Path(path)
        if not path.is_file():
            raise DataError(path, "feature file does not exist")
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = {"features", "ids", "header"} - set(z.files)
                if missing:
                    raise DataError(path, f"not an omnienc feature file: no {sorted(missing)}")
                header = json.loads(str(z["header"]))
                arrays = {k: z[k] for k in ("features", "ids", "labels", "maps") if k in z.files}
        except DataError:
            raise
        except _READ_ERRORS as exc:
            if "pickle" in str(exc):
                raise DataError(
                    path, f"holds pickled objects, which FeatureSet.load never unpickles ({exc})"
                ) from exc
            raise DataError(path, f"not a readable feature file: {exc}") from exc
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise DataError(path, f"not an omnienc feature file (format is not {FORMAT!r})")
        if header.get("format_version") != FORMAT_VERSION:
            raise DataError(
                path,
                f"unsupported format_version {header.get('format_version')!r}; this omnienc "
                f"reads version {FORMAT_VERSION}",
            )
        try:
            return cls(
                features=arrays["features"],
                labels=arrays.get("labels"),
                ids=arrays["ids"].tolist(),
                checkpoint=str(header["checkpoint"]),
                dataset=str(header["dataset"]),
                maps=arrays.get("maps"),
                meta=dict(header.get("meta") or {}),
            )
        except (KeyError, ValueError) as exc:
            raise DataError(path, f"inconsistent feature file: {exc}") from exc


def checkpoint_id(path: str | Path) -> str:
    """``sha256:HEX``, the weights hash an exported checkpoint folder records in its config.

    Raises:
        CheckpointError: The folder is not a checkpoint or records no valid hash.
    """
    weights = load_checkpoint_config(path)["weights"]
    digest = weights.get("sha256") if isinstance(weights, dict) else None
    if not isinstance(digest, str) or not _SHA256.match(digest):
        raise CheckpointError(path, f"config.json records no valid weights sha256: {digest!r}")
    return f"sha256:{digest}"


def random_checkpoint_id(arch: str, seed: int) -> str:
    """``random:ARCH:SEED``, the id of an encoder built with ``torch.manual_seed(seed)``."""
    return f"random:{arch}:{int(seed)}"
