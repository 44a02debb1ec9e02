"""The on-disk mask cache: one ``.npz`` of bit-packed masks per volume and mask config.

An entry is named after the preprocessed volume's cache key and a digest of the
:class:`~omnienc.pretext.masks.config.MaskConfig` (:func:`mask_cache_path`), and written
atomically (:func:`save_masks`); :func:`load_masks` reads it back without unpickling.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omnienc.atomic import atomic_target
from omnienc.data.folder import ManifestEntry
from omnienc.errors import DataError
from omnienc.pretext.masks.config import MaskConfig

# --------------------------------------------------------------------------------------------
# Cache


@dataclass
class MaskResult:
    """What :func:`compute_folder_masks` did for one volume.

    Attributes:
        source: The volume (as in the folder's manifest).
        n_masks: Number of proposals ``K``.
        seconds: Wall time spent on this volume in this call (loading, when cached).
        cache_file: The ``.npz`` holding the proposals (read it with :func:`load_masks`).
        cached: Whether the proposals came from the cache.
    """

    source: str
    n_masks: int
    seconds: float
    cache_file: str
    cached: bool


def mask_cache_path(entry: ManifestEntry, config: MaskConfig, cache_dir: str | Path) -> Path:
    """Where the proposals of one folder entry are cached.

    The name joins the preprocessed volume's cache key (the stem of ``entry.cache_file``, which
    covers file content and preprocessing) and :meth:`MaskConfig.digest`.
    """
    return Path(cache_dir) / f"{Path(entry.cache_file).stem}-masks-{config.digest()}.npz"


def save_masks(path: str | Path, masks: np.ndarray, config: MaskConfig, source: str = "") -> Path:
    """Write ``(K, X, Y, Z)`` bool masks bit-packed (``np.packbits``) to ``path``, atomically."""
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 4:
        raise ValueError(f"masks must be (K, X, Y, Z), got shape {masks.shape}")
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        packed=np.packbits(masks.reshape(masks.shape[0], int(np.prod(masks.shape[1:]))), axis=1),
        shape=np.asarray(masks.shape, dtype=np.int64),
        config=np.array(json.dumps(config.to_dict(), sort_keys=True)),
        source=np.array(source),
    )
    with atomic_target(path) as tmp:
        tmp.write_bytes(buf.getvalue())
    return Path(path)


def load_masks(cache_file: str | Path) -> np.ndarray:
    """Read proposals written by :func:`save_masks` / :func:`compute_folder_masks`.

    Returns:
        ``(K, X, Y, Z)`` bool.

    Raises:
        DataError: The file is missing, damaged, or not a mask cache entry.
    """
    path = Path(cache_file)
    try:
        with np.load(path, allow_pickle=False) as z:
            shape = tuple(int(s) for s in z["shape"])
            packed = z["packed"]
        if len(shape) != 4 or packed.shape[0] != shape[0]:
            raise ValueError(f"packed masks {packed.shape} do not match shape {shape}")
        voxels = shape[1] * shape[2] * shape[3]
        if packed.shape[1] != (voxels + 7) // 8:
            raise ValueError(f"packed masks {packed.shape} do not match shape {shape}")
        bits = np.unpackbits(packed, axis=1, count=voxels)
        return bits.astype(bool).reshape(shape)
    except FileNotFoundError:
        raise DataError(path, "no such mask cache file") from None
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(path, f"damaged mask cache file ({type(exc).__name__}: {exc})") from None
