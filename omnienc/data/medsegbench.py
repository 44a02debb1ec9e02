"""MedSegBench 2D segmentation sets as thin volumes with label maps for the 3D encoder.

The ``{flag}_{size}.npz`` files (keys ``{split}_images``, ``{split}_label``) are opened through
the medsegbench package (https://github.com/zekikus/MedSegBench), exactly as
:mod:`omnienc.data.medmnist` opens MedMNIST files. Images and label maps are both lifted by
:func:`omnienc.lifting.lift_2d`, so every slice of the mask matches every slice of the image.

The package is imported lazily; its ``info`` module creates ``~/.medsegbench`` on import.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from omnienc.data.medmnist import (
    SPLITS,
    check_images,
    image_to_volume,
    load_package_arrays,
    make_ids,
    select_rows,
)
from omnienc.data.root import resolve_data_root
from omnienc.errors import DataError
from omnienc.lifting import lift_2d


def available_sizes(info: dict[str, Any]) -> list[int]:
    """Image sizes a MedSegBench flag comes in, read from its ``url_<size>`` INFO keys."""
    return sorted(int(k.removeprefix("url_")) for k in info if k.startswith("url_"))


class MedSegBench(Dataset[dict[str, Any]]):
    """One split of a MedSegBench set, as lifted images with lifted label maps.

    Args:
        flag: MedSegBench flag, e.g. ``busi`` or ``kvasir``.
        split: ``train``, ``val`` or ``test``.
        size: Image side: 128, 256 or 512.
        root: Folder holding the ``.npz`` files (the medsegbench package's ``root``). Default:
            ``medsegbench/`` under :func:`~omnienc.data.root.resolve_data_root`.
        download: Let the medsegbench package download a missing file (needs internet).
        indices: Keep only these rows of the split (ids keep the rows' original index).

    Attributes:
        task: INFO task, ``binary`` or ``multi-class``.
        n_classes: Number of pixel labels, background included.
        class_names: INFO's pixel label dict, ``{"0": "background", "1": "foreground"}``.
        ids: ``N`` strings ``flag:size:split:row``.

    Items are ``{"image": (1, 16, H, W) float32 in [0, 1], "mask": (1, 16, H, W) int64,
    "id": str}``; mask values are the stored pixel labels (binary sets: 0 and 1).

    Raises:
        DataError: Unknown flag, or the file is missing or unreadable.
        ValueError: Bad split or a size the flag does not come in.
    """

    def __init__(
        self,
        flag: str,
        split: str,
        size: int = 128,
        root: str | Path | None = None,
        download: bool = False,
        indices: Sequence[int] | None = None,
    ) -> None:
        import medsegbench

        folder = Path(root) if root is not None else resolve_data_root() / "medsegbench"
        if flag not in medsegbench.INFO:
            raise DataError(
                folder, f"unknown MedSegBench flag {flag!r}; known: {', '.join(medsegbench.INFO)}"
            )
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        info = medsegbench.INFO[flag]
        sizes = available_sizes(info)
        if size not in sizes:
            raise ValueError(f"{flag} comes in sizes {sizes}, not {size}")
        file_name = f"{flag}_{size}.npz"
        cls = getattr(medsegbench, info["python_class"])
        imgs, masks = load_package_arrays(
            cls, split, size, folder, file_name, info[f"url_{size}"], download
        )

        self.flag, self.split, self.size = flag, split, size
        self.task: str = info["task"]
        self.class_names: dict[str, str] = dict(info["pixel_labels"])
        self.n_classes = len(self.class_names)
        path = folder / file_name
        rgb = info["n_channels_im"] == 3
        check_images(imgs, (size, size, 3) if rgb else (size, size), path)
        if masks.shape != (len(imgs), size, size) or masks.dtype.kind not in "iub":
            raise DataError(
                path,
                f"{split}_label: expected integer label maps of shape ({len(imgs)}, {size}, "
                f"{size}), found {masks.dtype} {masks.shape}",
            )

        rows = select_rows(indices, len(imgs))
        self._imgs, self._masks = imgs[rows], masks[rows]
        self.ids = make_ids(flag, size, split, rows, len(imgs))

    def __len__(self) -> int:
        return len(self._imgs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        mask = torch.as_tensor(self._masks[i].astype(np.int64))  # (H, W)
        return {
            "image": image_to_volume(self._imgs[i], is_3d=False),
            "mask": lift_2d(mask[None, None])[0],  # (1, 16, H, W)
            "id": self.ids[i],
        }

    def __repr__(self) -> str:
        return f"MedSegBench({self.flag!r}, {self.split!r}, size={self.size}, n={len(self)})"
