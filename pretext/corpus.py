"""The pretraining corpus on disk: memory-mapped volumes and bit-packed masks, read per sample.

The preprocessed-volume cache (:class:`omnienc.data.folder.VolumeFolder`) and the mask cache
(:func:`omnienc.pretext.masks.compute_folder_masks`) are ``.npz`` files (a zip, so not mappable,
and the masks packed over the flattened volume, so one crop would need every bit unpacked). Each
entry gets an uncompressed ``.npy`` sidecar beside it, made from it once, written atomically and
named after it, so it inherits its cache key (file content, preprocessing, mask config):

* ``KEY.image.npy``: the ``(1, X, Y, Z)`` float32 image;
* ``KEY-masks-DIGEST.zbits.npy``: the ``(M, X, Y, ceil(Z / 8))`` uint8 masks, bit-packed along
  the last axis (``np.packbits(axis=-1)``), so a crop reads and unpacks only its own bytes.

A :class:`CachedVolume` holds the two paths and the shapes; :meth:`CachedVolume.open` maps the
files (``np.load(mmap_mode="r")``) for one sample, and the maps close when the sample is done,
so the pages a crop touched leave the process and its memory does not grow with the corpus. A
sidecar that does not match its entry (wrong shape or type, truncated) is rebuilt with a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from omnienc.atomic import atomic_target
from omnienc.errors import DataError
from omnienc.pretext.masks import load_masks

logger = logging.getLogger("omnienc")

IMAGE_SIDECAR = ".image.npy"
MASK_SIDECAR = ".zbits.npy"


class PackedMasks:
    """``(M, X, Y, Z)`` bool masks held bit-packed along ``Z``; crops unpack only themselves.

    Args:
        packed: ``(M, X, Y, ceil(Z / 8))`` uint8 (``np.packbits(masks, axis=-1)``), an array
            or a read-only memory map.
        depth: ``Z``.
    """

    def __init__(self, packed: np.ndarray, depth: int) -> None:
        if packed.ndim != 4 or packed.shape[3] != (depth + 7) // 8:
            raise ValueError(f"packed masks {packed.shape} do not fit a depth of {depth}")
        self.packed = packed
        self.shape: tuple[int, int, int, int] = (*packed.shape[:3], depth)

    @classmethod
    def pack(cls, masks: np.ndarray) -> PackedMasks:
        """Pack ``(M, X, Y, Z)`` bool masks (in memory)."""
        masks = np.asarray(masks, dtype=bool)
        if masks.ndim != 4:
            raise ValueError(f"masks must be (M, X, Y, Z), got shape {masks.shape}")
        return cls(np.packbits(masks, axis=-1), masks.shape[3])

    ndim = 4

    def __len__(self) -> int:
        return self.shape[0]

    def crop(self, origin: Any, size: Any) -> np.ndarray:
        """The masks in the box ``[origin, origin + size)``; voxels outside the volume are False.

        Args:
            origin: ``(3,)`` ints, possibly negative or past the volume.
            size: ``(S_x, S_y, S_z)``.

        Returns:
            ``(M, S_x, S_y, S_z)`` bool (a new array).
        """
        o = np.asarray(origin, dtype=np.int64)
        s = np.asarray(size, dtype=np.int64)
        lo = np.maximum(o, 0)
        hi = np.minimum(o + s, self.shape[1:])
        out = np.zeros((self.shape[0], *(int(v) for v in s)), dtype=bool)
        if self.shape[0] == 0 or np.any(hi <= lo):
            return out
        (x0, y0, z0), (x1, y1, z1) = lo, hi
        block = self.packed[:, x0:x1, y0:y1, z0 // 8 : (z1 + 7) // 8]
        bits = np.unpackbits(block, axis=-1)[..., z0 % 8 : z0 % 8 + (z1 - z0)]
        a, b = lo - o, hi - o
        out[:, a[0] : b[0], a[1] : b[1], a[2] : b[2]] = bits.astype(bool)
        return out

    def unpack(self) -> np.ndarray:
        """All masks, ``(M, X, Y, Z)`` bool."""
        return self.crop((0, 0, 0), self.shape[1:])


@dataclass(frozen=True)
class CachedVolume:
    """One corpus volume as two memory-mappable files (see the module docstring).

    Attributes:
        image_file: The ``(1, X, Y, Z)`` float32 ``.npy``.
        mask_file: The ``(M, X, Y, ceil(Z / 8))`` uint8 ``.npy``.
        shape: ``(X, Y, Z)``.
        n_masks: ``M``.
    """

    image_file: str
    mask_file: str
    shape: tuple[int, int, int]
    n_masks: int

    def open(self) -> tuple[np.ndarray, PackedMasks]:
        """Map the image and the masks for one sample (nothing is read until it is indexed).

        Returns:
            ``(image, masks)``: ``(1, X, Y, Z)`` float32 read-only memory map and its
            :class:`PackedMasks` over a memory map.

        Raises:
            DataError: A sidecar disappeared or changed since :func:`cached_volume`.
        """
        try:
            image = np.load(self.image_file, mmap_mode="r", allow_pickle=False)
            packed = _map_npy(self.mask_file)
        except (OSError, ValueError) as exc:
            raise DataError(self.image_file, f"cannot map the cached volume ({exc})") from None
        return image, PackedMasks(packed, self.shape[2])


@dataclass(frozen=True)
class InMemoryVolume:
    """A volume held in memory (MedMNIST cubes: small, and read from one file per split).

    Attributes:
        image: ``(1, X, Y, Z)`` float32.
        masks: ``(M, X, Y, Z)`` bool.
    """

    image: np.ndarray
    masks: np.ndarray

    @property
    def n_masks(self) -> int:
        """``M``."""
        return int(self.masks.shape[0])

    def open(self) -> tuple[np.ndarray, np.ndarray]:
        """``(image, masks)`` as held."""
        return self.image, self.masks


def _map_npy(path: str | Path) -> np.ndarray:
    """Map a ``.npy`` sidecar read-only."""
    return np.load(path, mmap_mode="r", allow_pickle=False)


def sidecar_matches(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> bool:
    """Whether ``path`` is a complete ``.npy`` of ``shape`` and ``dtype`` (checked by mapping)."""
    if not path.exists():
        return False
    try:
        array = _map_npy(path)
        ok = array.shape == shape and array.dtype == dtype
        del array
    except (OSError, ValueError, EOFError) as exc:
        logger.warning("damaged cache sidecar %s (%s); rebuilding it", path, exc)
        return False
    if not ok:
        logger.warning("cache sidecar %s does not match its entry; rebuilding it", path)
    return ok


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to the ``.npy`` ``path`` atomically (a reader never sees half of it)."""
    with atomic_target(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)


def image_sidecar(cache_file: str | Path, shape: tuple[int, int, int]) -> Path:
    """The ``.image.npy`` sidecar of a preprocessed-volume cache entry, made if missing.

    Args:
        cache_file: The entry's ``KEY.npz`` (``ManifestEntry.cache_file``).
        shape: Its ``(X, Y, Z)`` (``ManifestEntry.preprocessed_shape``).

    Returns:
        ``KEY.image.npy``, holding ``(1, X, Y, Z)`` float32.

    Raises:
        DataError: The cache entry cannot be read.
    """
    npz = Path(cache_file)
    path = npz.with_suffix(IMAGE_SIDECAR)
    if sidecar_matches(path, (1, *shape), np.dtype(np.float32)):
        return path
    try:
        with np.load(npz, allow_pickle=False) as z:
            image = np.asarray(z["image"], dtype=np.float32)
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise DataError(npz, f"cannot read the preprocessed volume ({exc})") from None
    if image.shape != (1, *shape):
        raise DataError(npz, f"cached image {image.shape} differs from its manifest {shape}")
    save_npy_atomic(path, image)
    return path


def mask_sidecar(mask_file: str | Path, shape: tuple[int, int, int]) -> tuple[Path, int]:
    """The ``.zbits.npy`` sidecar of a mask cache entry, made if missing.

    Args:
        mask_file: The entry's ``.npz`` (``MaskResult.cache_file``).
        shape: The volume's ``(X, Y, Z)``.

    Returns:
        The sidecar, holding ``(M, X, Y, ceil(Z / 8))`` uint8, and ``M``.

    Raises:
        DataError: The mask cache entry is damaged or on another grid.
    """
    npz = Path(mask_file)
    path = npz.with_suffix(MASK_SIDECAR)
    if path.exists():
        try:
            n_masks = int(_map_npy(path).shape[0])
        except (OSError, ValueError, EOFError) as exc:
            logger.warning("damaged cache sidecar %s (%s); rebuilding it", path, exc)
        else:
            packed_shape = (n_masks, shape[0], shape[1], (shape[2] + 7) // 8)
            if sidecar_matches(path, packed_shape, np.dtype(np.uint8)):
                return path, n_masks
    masks = load_masks(npz)
    if masks.shape[1:] != shape:
        raise DataError(npz, f"mask grid {masks.shape[1:]} differs from the volume's {shape}")
    save_npy_atomic(path, np.packbits(masks, axis=-1))
    return path, int(masks.shape[0])


def cached_volume(
    image_file: str | Path, mask_file: str | Path, shape: tuple[int, int, int]
) -> CachedVolume:
    """A :class:`CachedVolume` for a volume and mask cache entry, its sidecars made if missing.

    Args:
        image_file: The preprocessed volume's ``.npz``.
        mask_file: Its mask proposals' ``.npz``.
        shape: ``(X, Y, Z)``.
    """
    shape = (int(shape[0]), int(shape[1]), int(shape[2]))
    image = image_sidecar(image_file, shape)
    masks, n_masks = mask_sidecar(mask_file, shape)
    return CachedVolume(str(image), str(masks), shape, n_masks)
