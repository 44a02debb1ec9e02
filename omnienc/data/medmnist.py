"""MedMNIST v2 / MedMNIST+ classification sets as thin or cubic volumes for the 3D encoder.

The ``.npz`` files are opened through the medmnist package (its ``INFO`` dict and dataset
classes, https://arxiv.org/abs/2110.14795), so file names, keys and download URLs stay the
package's. Only its ``imgs`` / ``labels`` arrays are used: the PIL transform path is skipped.
3D sets give ``(1, S, S, S)`` volumes; 2D sets are lifted to ``(1, 16, S, S)`` by
:func:`omnienc.lifting.lift_2d` (RGB sets such as RetinaMNIST to luminance first). Images and
labels are checked against the set's INFO entry (:func:`check_labels`): RGB images in a grey set
(or the reverse), labels of another shape, or class indices outside ``0..C-1`` are a
:class:`~omnienc.errors.DataError` that names the file.

The medmnist package is imported lazily: its ``__init__`` pulls in pandas and scikit-learn
(about 1.4 s), and its ``info`` module creates ``~/.medmnist`` on import.

The helpers :func:`load_package_arrays` and :func:`image_to_volume` are shared with
:mod:`omnienc.data.medsegbench`, which opens MedSegBench files the same way.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from omnienc.data.root import resolve_data_root
from omnienc.errors import DataError
from omnienc.lifting import lift_2d

SPLITS = ("train", "val", "test")

# What np.load and NpzFile raise on a truncated, corrupt or incomplete .npz file.
_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile)


def parse_medmnist_spec(spec: str) -> tuple[str, int, str]:
    """Split a ``medmnist:FLAG:SIZE:SPLIT`` spec, e.g. ``medmnist:adrenalmnist3d:28:test``.

    Only the form is checked here; whether FLAG and SIZE exist is checked by :class:`MedMNIST`.

    Args:
        spec: The spec string.

    Returns:
        ``(flag, size, split)``, e.g. ``("adrenalmnist3d", 28, "test")``.

    Raises:
        ValueError: The spec does not have that form.
    """
    form = "expected medmnist:FLAG:SIZE:SPLIT, e.g. medmnist:adrenalmnist3d:28:test"
    parts = spec.split(":")
    if len(parts) != 4 or parts[0] != "medmnist":
        raise ValueError(f"bad MedMNIST spec {spec!r}: {form}")
    _, flag, size, split = parts
    if not flag:
        raise ValueError(f"bad MedMNIST spec {spec!r}: empty FLAG; {form}")
    if not size.isdigit():
        raise ValueError(f"bad MedMNIST spec {spec!r}: SIZE {size!r} is not a number; {form}")
    if split not in SPLITS:
        raise ValueError(f"bad MedMNIST spec {spec!r}: SPLIT {split!r} is not one of {SPLITS}")
    return flag, int(size), split


def load_package_arrays(
    dataset_cls: type[Any],
    split: str,
    size: int,
    folder: Path,
    file_name: str,
    url: str,
    download: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Open one split through a medmnist-style package class and return its raw arrays.

    Args:
        dataset_cls: The package's dataset class (medmnist or medsegbench), which takes
            ``split``, ``root``, ``size`` and ``download``.
        split: ``train``, ``val`` or ``test``.
        size: Image side length in pixels.
        folder: Folder that holds (or will receive) the ``.npz`` file.
        file_name: The file name the package expects, e.g. ``adrenalmnist3d_64.npz``.
        url: Where the package downloads the file from (for the error message).
        download: Let the package download a missing file.

    Returns:
        ``(imgs, labels)``: the package's ``imgs`` and ``labels`` arrays, first axis ``N``.

    Raises:
        DataError: The file is missing (and was not or could not be downloaded) or unreadable.
    """
    path = folder / file_name
    how = (
        f"on a machine with internet, pass download=True (`--download` on the command line), "
        f"or copy {file_name} into {folder} (source: {url})"
    )
    if not download and not path.is_file():
        raise DataError(path, f"{file_name} not found in {folder}; {how}")
    if download:
        folder.mkdir(parents=True, exist_ok=True)
    try:
        ds = dataset_cls(split=split, root=str(folder), size=size, download=download)
    except RuntimeError as err:  # both packages raise RuntimeError for missing / failed download
        raise DataError(
            path, f"{file_name} could not be downloaded into {folder} (no internet?); {how}"
        ) from err
    except _READ_ERRORS as err:
        raise DataError(path, f"cannot read the {split} split of {file_name}: {err}") from err
    return np.asarray(ds.imgs), np.asarray(ds.labels)


def check_images(imgs: np.ndarray, item_shape: tuple[int, ...], path: Path) -> None:
    """Raise DataError unless ``imgs`` is uint8 of shape ``(N, *item_shape)``."""
    if imgs.dtype != np.uint8 or imgs.shape[1:] != item_shape:
        raise DataError(
            path,
            f"expected uint8 images of shape (N, {', '.join(map(str, item_shape))}), "
            f"found {imgs.dtype} {imgs.shape}",
        )


def _check_colour(imgs: np.ndarray, rgb: bool, flag: str, split: str, path: Path) -> None:
    """Raise DataError when a 2D split holds RGB images where the set is grey, or the reverse."""
    has_rgb, has_grey = imgs.ndim == 4 and imgs.shape[-1] == 3, imgs.ndim == 3
    if (has_rgb and not rgb) or (has_grey and rgb):  # other shapes: check_images says so
        found, wanted = ("RGB", "greyscale") if has_rgb else ("greyscale", "RGB")
        shape = "(N, S, S, 3)" if rgb else "(N, S, S)"
        raise DataError(
            path,
            f"the {split} split holds {found} images {imgs.shape}, but {flag} is {wanted} "
            f"(medmnist INFO n_channels): expected {shape}; is this the right file?",
        )


def check_labels(
    labels: np.ndarray, task: str, n_classes: int, n_images: int, split: str, path: Path
) -> np.ndarray:
    """Validate one split's labels against the set's INFO task and class count.

    Args:
        labels: The file's labels: ``(N, 1)`` (or ``(N,)``) class indices, ``(N, C)`` 0/1
            indicators for ``multi-label`` tasks.
        task: INFO task, e.g. ``binary-class``, ``multi-class``, ``ordinal-regression``.
        n_classes: Entries of INFO's label dict (``C``).
        n_images: Images in the split (``N``).
        split: Split name, for the message.
        path: The ``.npz`` file, for the message.

    Returns:
        ``(N, 1)`` int64 class indices in ``0..C-1``, or ``(N, C)`` int64 0/1 indicators.

    Raises:
        DataError: The labels do not match the images in number, have another shape, are not
            integers, or hold values outside ``0..C-1`` (``{0, 1}`` for multi-label sets).
    """
    multilabel = task.startswith("multi-label")
    if labels.ndim == 1:
        labels = labels[:, None]  # tolerate files saved as (N,)
    width = n_classes if multilabel else 1
    if labels.ndim != 2 or labels.shape[1] != width:
        raise DataError(
            path,
            f"the {split} labels have shape {labels.shape}; a {task} set of {n_classes} classes "
            f"needs (N, {width})",
        )
    if len(labels) != n_images:
        raise DataError(path, f"{split}: {n_images} images but {len(labels)} labels")
    if labels.dtype.kind not in "biu" and not (
        labels.dtype.kind == "f" and np.array_equal(labels, np.round(labels))
    ):
        raise DataError(path, f"the {split} labels must be integers, found {labels.dtype}")
    high = 1 if multilabel else n_classes - 1
    bad = np.unique(labels[(labels < 0) | (labels > high)])
    if bad.size:
        raise DataError(
            path,
            f"the {split} labels hold values {bad[:10].tolist()} outside 0..{high} "
            f"({'0/1 indicators' if multilabel else f'{n_classes} classes'} of a {task} set)",
        )
    return labels.astype(np.int64)


def image_to_volume(img: np.ndarray, is_3d: bool) -> torch.Tensor:
    """Turn one uint8 image into a float32 volume in ``[0, 1]``.

    Args:
        img: ``(D, H, W)`` if ``is_3d``, else ``(H, W)`` or ``(H, W, 3)``.
        is_3d: Whether ``img`` is already a volume.

    Returns:
        ``(1, D, H, W)``; 2D images are lifted to ``(1, LIFT_DEPTH, H, W)``.
    """
    x = torch.as_tensor(img, dtype=torch.float32) / 255.0
    if is_3d:
        return x.unsqueeze(0)
    chw = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)  # (C, H, W)
    # Luminance of an RGB pixel can round a hair above 1.
    return lift_2d(chw.unsqueeze(0))[0].clamp_(0.0, 1.0)


def make_ids(flag: str, size: int, split: str, rows: np.ndarray, n_split: int) -> list[str]:
    """Stable ids ``flag:size:split:row`` (row index in the full split, zero-padded)."""
    width = max(4, len(str(n_split - 1)))
    return [f"{flag}:{size}:{split}:{int(r):0{width}d}" for r in rows]


def select_rows(indices: Sequence[int] | None, n: int) -> np.ndarray:
    """Validate a subset of row indices into a split of ``n`` rows; ``None`` means all."""
    if indices is None:
        return np.arange(n)
    rows = np.asarray(indices, dtype=np.int64).reshape(-1)
    bad = rows[(rows < 0) | (rows >= n)]
    if bad.size:
        raise IndexError(f"indices {bad[:5].tolist()} out of range for a split of {n} items")
    return rows


class MedMNIST(Dataset[dict[str, Any]]):
    """One split of a MedMNIST set, as volumes for the 3D encoder.

    Args:
        flag: MedMNIST flag, e.g. ``adrenalmnist3d`` or ``breastmnist``.
        split: ``train``, ``val`` or ``test``.
        size: Image side: 28 or 64 for 3D sets; 28, 64, 128 or 224 for 2D sets.
        root: Folder holding the ``.npz`` files (the medmnist package's ``root``). Default:
            ``medmnist/`` under :func:`~omnienc.data.root.resolve_data_root`.
        download: Let the medmnist package download a missing file (needs internet).
        indices: Keep only these rows of the split (ids keep the rows' original index).

    Attributes:
        task: INFO task, e.g. ``binary-class``, ``multi-class``, ``multi-label, binary-class``,
            ``ordinal-regression``.
        n_classes: Number of entries in INFO's label dict.
        class_names: INFO's label dict, ``{"0": "normal", ...}``.
        is_3d: Whether items are cubes rather than lifted 2D images.
        labels: ``(N, k)`` int64; ``k = 1`` except for multi-label sets.
        ids: ``N`` strings ``flag:size:split:row``.

    Items are ``{"image": (1, D, H, W) float32 in [0, 1], "label": (k,) int64, "id": str}``,
    with ``D = H = W = size`` for 3D sets and ``D = 16`` for 2D sets.

    Raises:
        DataError: Unknown flag; the file is missing or unreadable; or its images or labels do
            not match INFO (shape, colour, class indices outside ``0..C-1``).
        ValueError: Bad split or a size the flag does not come in.
    """

    def __init__(
        self,
        flag: str,
        split: str,
        size: int = 28,
        root: str | Path | None = None,
        download: bool = False,
        indices: Sequence[int] | None = None,
    ) -> None:
        import medmnist
        from medmnist.dataset import MedMNIST3D

        folder = Path(root) if root is not None else resolve_data_root() / "medmnist"
        if flag not in medmnist.INFO:
            raise DataError(
                folder, f"unknown MedMNIST flag {flag!r}; known: {', '.join(medmnist.INFO)}"
            )
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        info = medmnist.INFO[flag]
        cls = getattr(medmnist, info["python_class"])
        if size not in cls.available_sizes:
            raise ValueError(f"{flag} comes in sizes {cls.available_sizes}, not {size}")
        suffix = "" if size == 28 else f"_{size}"
        file_name = f"{flag}{suffix}.npz"
        imgs, labels = load_package_arrays(
            cls, split, size, folder, file_name, info[f"url{suffix}"], download
        )

        self.flag, self.split, self.size = flag, split, size
        self.task: str = info["task"]
        self.class_names: dict[str, str] = dict(info["label"])
        self.n_classes = len(self.class_names)
        self.is_3d = issubclass(cls, MedMNIST3D)
        rgb = info["n_channels"] == 3 and not self.is_3d
        item_shape = (size,) * 3 if self.is_3d else (size, size, 3) if rgb else (size, size)
        path = folder / file_name
        if not self.is_3d:
            _check_colour(imgs, rgb, flag, split, path)
        check_images(imgs, item_shape, path)
        labels = check_labels(labels, self.task, self.n_classes, len(imgs), split, path)

        rows = select_rows(indices, len(imgs))
        self._imgs = imgs[rows]
        self.labels: np.ndarray = labels[rows]
        self.ids = make_ids(flag, size, split, rows, len(imgs))

    def __len__(self) -> int:
        return len(self._imgs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "image": image_to_volume(self._imgs[i], self.is_3d),
            "label": torch.from_numpy(self.labels[i].copy()),
            "id": self.ids[i],
        }

    def __repr__(self) -> str:
        return f"MedMNIST({self.flag!r}, {self.split!r}, size={self.size}, n={len(self)})"
