"""``VolumeFolder``: every readable volume below a folder, preprocessed once and cached on disk.

The scan is recursive and never follows symbolic links into loops. DICOM files are grouped into
series (one volume per series); everything else with a suffix :func:`omnienc.io.read_volume`
knows is one volume. Unreadable files are skipped with one warning each and counted in a summary:
one bad file never stops a run; so are single 2D DICOM slices (not volumes) and files named like
label maps whose values are not integers. Label maps (integer-valued volumes of any data type
with few values, or named like segmentations: :mod:`omnienc.data.labelmaps`) are listed in the
manifest but not served as images unless asked; :func:`omnienc.data.pairing.pair_label_maps`
pairs them with the images on their grid.

Preprocessed arrays are cached under ``cache_dir`` (default ``$OMNIENC_CACHE`` or
``~/.cache/omnienc``), keyed by the file's content and the preprocessing parameters, and written
atomically; a corrupt cache entry is rebuilt with a warning.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from omnienc.atomic import atomic_target
from omnienc.data.labelmaps import classify_volume
from omnienc.data.labelmaps import is_label_map as is_label_map  # re-exported
from omnienc.errors import DataError, OmniencError
from omnienc.io import (
    DICOM_SUFFIXES,
    SUPPORTED_SUFFIXES,
    Volume,
    check_readable,
    file_suffix,
    list_dicom_series,
    read_volume,
)
from omnienc.preprocessing import Preprocessing
from omnienc.shard import Shard, relative_key
from omnienc.transforms import preprocess_volume

logger = logging.getLogger("omnienc")

# 2: entries record units and the native affine; single 2D DICOM slices and the new modality
# tokens (T1c, SPECT, ...) change what version 1 entries say.
CACHE_VERSION = 2
CACHE_ENV = "OMNIENC_CACHE"


def default_cache_dir() -> Path:
    """``$OMNIENC_CACHE`` or ``~/.cache/omnienc``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "omnienc"


@dataclass(frozen=True)
class VolumeSource:
    """Where one volume comes from: a file, or a DICOM folder and one of its series."""

    path: Path
    series_uid: str | None = None
    files: tuple[str, ...] = ()

    def __str__(self) -> str:
        return str(self.path) + (f" [series {self.series_uid}]" if self.series_uid else "")


@dataclass
class ManifestEntry:
    """One readable volume of a :class:`VolumeFolder`.

    Attributes:
        source: File or DICOM folder (as a string, for JSON).
        series_uid: DICOM SeriesInstanceUID when ``source`` is a folder.
        kind: ``image`` or ``label``.
        modality: ``CT``, ``MR``, ``PET``, ``SPECT`` or ``unknown`` and how it was found.
        shape: Native ``(X, Y, Z)`` in RAS order; ``spacing`` its voxel size in mm.
        intensity: ``(min, max)`` of the native voxels.
        preprocessed_shape: ``(X, Y, Z)`` after preprocessing.
        cache_file: The cached ``.npz`` with the preprocessed image.
        units: Units of the voxel values where the file states them (:attr:`Volume.units`).
        affine: Native ``(4, 4)`` voxel-to-RAS affine (nested lists), for pairing label maps
            with images on the same grid.
    """

    source: str
    series_uid: str | None
    kind: str
    modality: str
    modality_source: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    intensity: tuple[float, float]
    preprocessed_shape: tuple[int, int, int]
    cache_file: str
    units: str | None = None
    affine: list[list[float]] | None = None


def _is_dicom_file(path: Path) -> bool:
    if file_suffix(path) in DICOM_SUFFIXES:
        return True
    if path.suffix:
        return False
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def find_volume_sources(
    root: Path, errors: list[OSError] | None = None
) -> tuple[list[VolumeSource], int]:
    """List the volumes below ``root``.

    Args:
        root: A folder.
        errors: If given, every folder that could not be listed (permissions, a folder replaced
            while scanning) is appended to it as the ``OSError`` naming it; otherwise such
            folders are passed over silently.

    Returns:
        ``(sources, n_ignored)``: volume sources in a stable order, and how many files with
        other suffixes were passed over.
    """
    sources: list[VolumeSource] = []
    ignored = 0
    seen_dirs: set[tuple[int, int]] = set()
    onerror = errors.append if errors is not None else None
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=onerror):
        folder = Path(dirpath)
        try:
            st = folder.stat()
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        dicom_plain: list[Path] = []
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = folder / name
            if file_suffix(path) == ".dcm.gz":
                sources.append(VolumeSource(path))
            elif _is_dicom_file(path):
                dicom_plain.append(path)
            elif file_suffix(path) in SUPPORTED_SUFFIXES:
                sources.append(VolumeSource(path))
            else:
                ignored += 1
        if dicom_plain:
            series = list_dicom_series(folder)
            grouped = {f for _, files in series for f in files}
            for uid, files in series:
                if len(files) == 1:
                    sources.append(VolumeSource(Path(files[0])))
                else:
                    # An empty uid is a series too (GDCM's id when SeriesInstanceUID is blank):
                    # keep it, so that read_volume picks this series and no other.
                    sources.append(VolumeSource(folder, uid, tuple(files)))
            # DICOM files GDCM cannot place in a series are tried one by one (and reported).
            sources.extend(VolumeSource(p) for p in dicom_plain if str(p) not in grouped)
    return sources, ignored


def _content_hash(source: VolumeSource) -> str:
    h = hashlib.blake2b(digest_size=16)
    files = source.files or (str(source.path),)
    for name in files:
        h.update(os.path.basename(name).encode())
        try:
            with open(name, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        except OSError:
            check_readable(name)  # raises VolumeReadError saying why
            raise
    return h.hexdigest()


def check_not_constant(volume: Volume, purpose: str = "nothing to learn") -> None:
    """Refuse a volume whose voxels all have one value (a blank or failed export).

    Args:
        volume: The volume.
        purpose: What cannot be done with it, for the message.

    Raises:
        DataError: Every voxel has the same value; the message names the file.
    """
    lo, hi = float(volume.array.min()), float(volume.array.max())
    if lo == hi:
        raise DataError(volume.source, f"constant volume (every voxel is {lo:g}): {purpose}")


def _save_npz_atomic(path: Path, **arrays: Any) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with atomic_target(path) as tmp:
        tmp.write_bytes(buf.getvalue())


class VolumeFolder(Dataset):
    """Unlabelled volumes below a folder, preprocessed and cached.

    Args:
        root: Folder to scan recursively.
        preprocessing: Parameters of the deterministic pipeline.
        cache_dir: Where preprocessed arrays go (default :func:`default_cache_dir`).
        include_labels: Also serve label maps as images (they are always in the manifest).
        frame: Frame to take from 4D files; ``None`` skips 4D files with a warning.
        min_size: Skip volumes smaller than this along any axis after preprocessing.
        progress: Show a progress bar while scanning.
        shard: Keep only this shard of the volumes found (:mod:`omnienc.shard`: split by path
            relative to ``root``), before anything is read or preprocessed.

    Raises:
        DataError: ``root`` is missing, not a folder, or holds no readable volume.

    Items are ``{"image": (1, X, Y, Z) float32 tensor, "affine": (4, 4) float64 array,
    "modality": str, "id": str}``.
    """

    def __init__(
        self,
        root: str | Path,
        preprocessing: Preprocessing | None = None,
        cache_dir: str | Path | None = None,
        include_labels: bool = False,
        frame: int | None = None,
        min_size: int = 1,
        progress: bool = True,
        shard: Shard | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.exists() and not self.root.is_symlink():
            raise DataError(self.root, "no such folder")
        check_readable(self.root, DataError)  # dangling or looping links, permissions
        if not self.root.is_dir():
            raise DataError(self.root, "is a file; VolumeFolder scans a folder")
        self.preprocessing = preprocessing or Preprocessing()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.frame = frame
        self.min_size = min_size
        self.manifest: list[ManifestEntry] = []
        self.skipped: list[tuple[str, str]] = []
        unlisted: list[OSError] = []
        sources, self.n_ignored = find_volume_sources(self.root, unlisted)
        if shard is not None:
            sources = shard.select(
                sources, key=lambda s: relative_key(self.root, s.path, s.series_uid)
            )
        for err in unlisted:
            where = Path(err.filename) if err.filename else self.root
            problem = (
                "permission denied: the folder cannot be listed, so its volumes are left out"
                if isinstance(err, PermissionError)
                else f"cannot be listed ({err.strerror}), so its volumes are left out"
            )
            self.skipped.append((str(where), f"{where}: {problem}"))
            logger.warning("skipping %s: %s", where, problem)
        for source in tqdm(
            sources, desc=f"scanning {self.root.name}", disable=not progress, unit="vol"
        ):
            try:
                self.manifest.append(self._prepare(source))
            except OmniencError as exc:
                self.skipped.append((str(source), str(exc)))
                logger.warning("skipping %s", exc)
            except (OSError, ValueError, RuntimeError) as exc:  # a library failed on a bad file
                self.skipped.append((str(source), f"{source}: {type(exc).__name__}: {exc}"))
                logger.warning("skipping %s: %s: %s", source, type(exc).__name__, exc)
        self.entries = [
            e
            for e in self.manifest
            if (include_labels or e.kind == "image") and min(e.preprocessed_shape) >= min_size
        ]
        logger.info("%s", self.summary())
        if not self.entries:
            raise DataError(self.root, f"no usable volume found ({self.summary()})")

    def summary(self) -> str:
        """One line: volumes found, used, label maps and their pairs, too small, skipped, others."""
        from omnienc.data.pairing import find_pairs  # pairing builds on this module

        n_labels = sum(e.kind == "label" for e in self.manifest)
        n_pairs = len(find_pairs(self.manifest)[0])
        n_small = sum(min(e.preprocessed_shape) < self.min_size for e in self.manifest)
        entries = getattr(self, "entries", [])
        return (
            f"{self.root}: {len(self.manifest)} volumes read, {len(entries)} used, "
            f"{n_labels} label maps ({n_pairs} image/label-map pairs), "
            f"{n_small} smaller than {self.min_size} voxels, "
            f"{len(self.skipped)} unreadable skipped, {self.n_ignored} other files ignored"
        )

    def _key(self, source: VolumeSource) -> str:
        h = hashlib.blake2b(digest_size=16)
        params = {
            "version": CACHE_VERSION,
            "content": _content_hash(source),
            "series": source.series_uid,
            "frame": self.frame,
            "preprocessing": self.preprocessing.to_dict(),
        }
        h.update(json.dumps(params, sort_keys=True).encode())
        return h.hexdigest()

    def _prepare(self, source: VolumeSource) -> ManifestEntry:
        check_readable(source.path)
        key = self._key(source)
        cache_file = self.cache_dir / f"{key}.npz"
        if cache_file.exists():
            try:
                with np.load(cache_file, allow_pickle=False) as z:
                    entry = ManifestEntry(**json.loads(str(z["entry"])))
                    # Reading the arrays checks their CRC: a damaged entry fails here, at scan
                    # time, not in __getitem__ halfway through training.
                    if z["image"].shape[1:] != tuple(entry.preprocessed_shape) or z[
                        "affine"
                    ].shape != (4, 4):
                        raise ValueError("cached arrays do not match the manifest entry")
                entry.source, entry.cache_file = str(source.path), str(cache_file)
                return entry
            except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, EOFError) as exc:
                logger.warning("corrupt cache entry %s (%s); rebuilding it", cache_file, exc)
        volume = read_volume(source.path, series_uid=source.series_uid, frame=self.frame)
        check_not_constant(volume)
        lo, hi = float(volume.array.min()), float(volume.array.max())
        kind = classify_volume(volume.array, source.path)
        if kind == "label":
            # Label maps are listed, not normalised: keep them on their native grid.
            image = volume.array[None]
            affine = volume.affine
        else:
            out = preprocess_volume(volume, self.preprocessing)
            image, affine = out["image"], out["affine"]
        entry = ManifestEntry(
            source=str(source.path),
            series_uid=source.series_uid,
            kind=kind,
            modality=volume.modality,
            modality_source=volume.modality_source,
            shape=volume.shape,
            spacing=tuple(round(s, 6) for s in volume.spacing),  # type: ignore[arg-type]
            intensity=(lo, hi),
            preprocessed_shape=tuple(int(s) for s in image.shape[1:]),  # type: ignore[arg-type]
            cache_file=str(cache_file),
            units=volume.units,
            affine=volume.affine.tolist(),
        )
        _save_npz_atomic(
            cache_file,
            image=image.astype(np.float32, copy=False),
            affine=affine,
            entry=np.array(json.dumps(asdict(entry))),
        )
        return entry

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry = self.entries[index]
        with np.load(entry.cache_file, allow_pickle=False) as z:
            image, affine = z["image"], z["affine"]
        return {
            "image": torch.from_numpy(image),
            "affine": affine,
            "modality": entry.modality,
            "id": entry.source + (f"#{entry.series_uid}" if entry.series_uid else ""),
        }

    def manifest_rows(self) -> list[dict[str, Any]]:
        """The manifest as plain dicts (for tables, CSV or JSON)."""
        return [asdict(e) for e in self.manifest]
