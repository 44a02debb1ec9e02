"""Pooled features of volumes, folders and MedMNIST splits: the ``omnienc embed`` contract.

An input is a volume file, a folder (scanned by :class:`~omnienc.data.folder.VolumeFolder`), or a
MedMNIST split written ``medmnist:FLAG:SIZE:SPLIT``. The result is written as ``.npz`` with
``features`` ``(N, E)`` float32, ``ids`` ``(N,)``, ``inputs`` ``(N,)`` (which input each row came
from), ``labels`` ``(N, k)`` when every input has labels, and ``meta`` (a JSON string naming the
encoder and its preprocessing).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from omnienc.atomic import atomic_target
from omnienc.data.folder import VolumeFolder
from omnienc.data.medmnist import MedMNIST, parse_medmnist_spec
from omnienc.encoders.base import Encoder
from omnienc.io import read_volume
from omnienc.preprocessing import Preprocessing
from omnienc.transforms import preprocess_volume

logger = logging.getLogger("omnienc")

MEDMNIST_PREFIX = "medmnist:"


@dataclass
class Embeddings:
    """Features of a set of inputs.

    Attributes:
        features: ``(N, E)`` float32 pooled embeddings.
        ids: ``N`` item ids (file paths, or ``flag:size:split:index`` for MedMNIST).
        inputs: ``N`` input specs, the one each row came from.
        labels: ``(N, k)`` int64 labels when every input has them, else ``None``.
        meta: Encoder name/checkpoint and preprocessing.
    """

    features: np.ndarray
    ids: list[str]
    inputs: list[str]
    labels: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write the ``.npz`` atomically and return its path."""
        path = Path(path)
        arrays: dict[str, Any] = {
            "features": self.features.astype(np.float32),
            "ids": np.asarray(self.ids, dtype=str),
            "inputs": np.asarray(self.inputs, dtype=str),
            "meta": np.asarray(json.dumps(self.meta)),
        }
        if self.labels is not None:
            arrays["labels"] = self.labels
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        with atomic_target(path) as tmp:
            tmp.write_bytes(buf.getvalue())
        return path


def pad_to_stride(image: torch.Tensor, stride: int) -> torch.Tensor:
    """Pad every spatial axis to more than ``stride`` voxels, with the image minimum.

    Thin volumes (a few DICOM slices) would otherwise vanish before the deepest stage, and a
    deepest grid of one voxel cannot be instance-normalised.

    Args:
        image: ``(B, C, X, Y, Z)``.
        stride: The encoder's coarsest reduction.

    Returns:
        ``(B, C, max(X, stride + 1), ...)``, the original centred.
    """
    pads: list[int] = []
    for size in reversed(image.shape[2:]):
        extra = max(0, stride + 1 - int(size))
        pads += [extra // 2, extra - extra // 2]
    if not any(pads):
        return image
    return torch.nn.functional.pad(image, pads, value=float(image.min()))


def encoder_input(encoder: Encoder, batch: torch.Tensor) -> torch.Tensor:
    """A batch ready for ``encoder``: padded to its coarsest stride, on its device and dtype.

    Args:
        encoder: The encoder that will take the batch.
        batch: ``(B, C, X, Y, Z)``.

    Returns:
        ``(B, C, X', Y', Z')`` as :func:`pad_to_stride` makes it.
    """
    param = next(encoder.parameters())
    batch = pad_to_stride(batch, max(int(f["reduction"]) for f in encoder.feature_info))
    return batch.to(device=param.device, dtype=param.dtype)


@torch.inference_mode()
def _encode(encoder: Encoder, batch: torch.Tensor) -> np.ndarray:
    return encoder(encoder_input(encoder, batch)).float().cpu().numpy()


def _volume_items(
    spec: str,
    preprocessing: Preprocessing,
    frame: int | None,
    cache_dir: Path | None,
    progress: bool,
) -> Iterator[tuple[str, torch.Tensor]]:
    path = Path(spec)
    if path.is_dir():
        folder = VolumeFolder(
            path, preprocessing, cache_dir=cache_dir, frame=frame, progress=progress
        )
        for i in range(len(folder)):
            item = folder[i]
            yield item["id"], item["image"][None]
    else:
        volume = read_volume(path, frame=frame)
        out = preprocess_volume(volume, preprocessing)
        yield str(path), torch.from_numpy(out["image"])[None]


def embed_inputs(
    encoder: Encoder,
    preprocessing: Preprocessing,
    inputs: Sequence[str],
    medmnist_root: Path | None = None,
    batch_size: int = 32,
    frame: int | None = None,
    cache_dir: Path | None = None,
    download: bool = False,
    progress: bool = True,
) -> Embeddings:
    """Compute pooled features of every input with a frozen encoder.

    Args:
        encoder: Any registered encoder; it is put in eval mode.
        preprocessing: Applied to volumes (MedMNIST cubes are already preprocessed).
        inputs: Volume files, folders, or ``medmnist:FLAG:SIZE:SPLIT`` specs.
        medmnist_root: Folder holding MedMNIST ``.npz`` files.
        batch_size: MedMNIST batch size (volumes go one at a time, their sizes differ).
        frame: Frame to take from 4D volumes.
        cache_dir: Preprocessing cache for folders.
        download: Let the medmnist package download missing files.
        progress: Show progress bars.

    Returns:
        The :class:`Embeddings`.
    """
    encoder.eval()
    feats: list[np.ndarray] = []
    ids: list[str] = []
    sources: list[str] = []
    labels: list[np.ndarray | None] = []
    for spec in inputs:
        if spec.startswith(MEDMNIST_PREFIX):
            flag, size, split = parse_medmnist_spec(spec)
            if medmnist_root is None:
                raise ValueError("a medmnist input needs medmnist_root")
            ds = MedMNIST(flag, split, size=size, root=medmnist_root, download=download)
            loader = DataLoader(ds, batch_size=batch_size, shuffle=False)
            for batch in tqdm(loader, desc=spec, disable=not progress, unit="batch"):
                feats.append(_encode(encoder, batch["image"]))
                ids.extend(batch["id"])
                sources.extend([spec] * len(batch["id"]))
                labels.append(batch["label"].numpy())
        else:
            n0 = len(ids)
            for item_id, image in tqdm(
                _volume_items(spec, preprocessing, frame, cache_dir, progress),
                desc=spec,
                disable=not progress,
                unit="vol",
            ):
                feats.append(_encode(encoder, image))
                ids.append(item_id)
                sources.append(spec)
            labels.append(None)
            logger.info("%s: %d volumes embedded", spec, len(ids) - n0)
    label_array = (
        np.concatenate([lab for lab in labels if lab is not None])
        if labels and all(lab is not None for lab in labels)
        else None
    )
    return Embeddings(
        features=np.concatenate(feats) if feats else np.zeros((0, encoder.embed_dim), np.float32),
        ids=ids,
        inputs=sources,
        labels=label_array,
    )
