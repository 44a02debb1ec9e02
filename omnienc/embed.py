"""Pooled features of volumes, folders and MedMNIST splits: the ``omnienc embed`` contract.

An input is a volume file, a folder (scanned by :class:`~omnienc.data.folder.VolumeFolder`), or a
MedMNIST split written ``medmnist:FLAG:SIZE:SPLIT``. The result is written as ``.npz`` with
``features`` ``(N, E)`` float32, ``ids`` ``(N,)``, ``inputs`` ``(N,)`` (which input each row came
from), ``labels`` ``(N, k)`` when every input has labels, and ``meta`` (a JSON string naming the
encoder and its preprocessing).

Memory: a volume is encoded on its preprocessed grid (the checkpoint's ``spacing``, 2 mm for the
shipped encoder, after the foreground crop). A grid larger than ``window`` voxels (default 128)
along any axis is encoded by sliding windows of at most ``window`` voxels per axis
(:func:`pooled_features`), so the encoder's activations are bounded by one window, not by the
volume: about 110 MB for a 128^3 window of ``resconv_small`` on a CPU. What remains proportional to
the volume is reading and resampling it (the native voxels as float32, a few copies), capped by
:data:`omnienc.io.DEFAULT_MAX_VOXELS`. ``benchmarks/robustness/memory.py`` measures the peaks.
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
from monai.inferers import sliding_window_inference
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from omnienc.atomic import atomic_target
from omnienc.data.folder import VolumeFolder, check_not_constant
from omnienc.data.medmnist import MedMNIST, parse_medmnist_spec
from omnienc.encoders.base import Encoder
from omnienc.io import read_volume
from omnienc.preprocessing import Preprocessing
from omnienc.shard import Shard
from omnienc.transforms import preprocess_volume

logger = logging.getLogger("omnienc")

MEDMNIST_PREFIX = "medmnist:"
# Largest preprocessed grid, in voxels per axis, encoded in one piece (256 mm at 2 mm spacing).
DEFAULT_WINDOW = 128
WINDOW_OVERLAP = 0.25


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
def pooled_features(
    encoder: Encoder,
    batch: torch.Tensor,
    window: int | None = DEFAULT_WINDOW,
    overlap: float = WINDOW_OVERLAP,
) -> np.ndarray:
    """Pooled embeddings of a batch, by sliding windows where the grid is larger than ``window``.

    A grid of at most ``window`` voxels along every axis (after :func:`encoder_input`) goes
    through the encoder in one piece: the result is ``encoder(batch)`` exactly. A larger grid is
    swept by MONAI's ``sliding_window_inference`` with windows of ``min(window, size)`` voxels per
    axis, one window at a time; the deepest feature maps ``(E, w/r, ...)`` of the windows (``r``
    the coarsest stride, 16 for ``resconv``) are stitched (averaged where windows overlap) into
    one map of the whole grid, whose spatial mean is the embedding, as :meth:`Encoder.forward`
    takes it. The two agree closely but not exactly: instance normalisation sees one window at a
    time, not the whole grid. Peak memory of the encoder is that of one window, whatever the grid.

    Args:
        encoder: The frozen encoder (eval mode).
        batch: ``(B, C, X, Y, Z)``.
        window: Largest window side in voxels, at least twice the encoder's coarsest stride;
            ``None`` or ``0`` encodes any grid in one piece.
        overlap: Fraction of a window shared with its neighbours, in ``[0, 1)``.

    Returns:
        ``(B, E)`` float32.

    Raises:
        ValueError: ``window`` is too small for the encoder or ``overlap`` is out of range.
    """
    x = encoder_input(encoder, batch)
    size = tuple(int(s) for s in x.shape[2:])
    if not window or all(s <= window for s in size):
        return encoder(x).float().cpu().numpy()
    stride = max(int(f["reduction"]) for f in encoder.feature_info)
    if window < 2 * stride:
        raise ValueError(f"window must be >= {2 * stride} voxels for this encoder, got {window}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    fmap = sliding_window_inference(
        x,
        roi_size=tuple(min(window, s) for s in size),
        sw_batch_size=1,
        predictor=encoder.forward_features,
        overlap=overlap,
        mode="constant",
    )
    assert isinstance(fmap, torch.Tensor)
    return fmap.as_subclass(torch.Tensor).mean(dim=(2, 3, 4)).float().cpu().numpy()


def _volume_items(
    spec: str,
    preprocessing: Preprocessing,
    frame: int | None,
    cache_dir: Path | None,
    progress: bool,
    shard: Shard | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    path = Path(spec)
    if path.is_dir():
        folder = VolumeFolder(
            path, preprocessing, cache_dir=cache_dir, frame=frame, progress=progress, shard=shard
        )
        for i in range(len(folder)):
            item = folder[i]
            yield item["id"], item["image"][None]
    else:
        volume = read_volume(path, frame=frame)
        check_not_constant(volume, "nothing to embed")
        image = preprocess_volume(volume, preprocessing)["image"]
        del volume  # the native grid is not needed while the encoder runs
        yield str(path), torch.from_numpy(image)[None]


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
    window: int | None = DEFAULT_WINDOW,
    shard: Shard | None = None,
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
        window: Volumes whose preprocessed grid is larger than this along an axis are encoded
            by sliding windows of this size (:func:`pooled_features`); ``None`` or ``0``
            encodes every volume in one piece.
        shard: Embed only this shard (:mod:`omnienc.shard`) of every input: of each folder's
            volumes (by path relative to the folder), of the volume files given directly (by
            their path as given), and of each MedMNIST split (by index). The N shards' rows
            together are the unsharded run's rows.

    Returns:
        The :class:`Embeddings`.

    Raises:
        VolumeReadError: A volume file given as an input cannot be read (files inside a folder
            input are skipped with a warning instead).
        DataError: A volume file given as an input is constant, or a folder holds no usable
            volume.
    """
    encoder.eval()
    feats: list[np.ndarray] = []
    ids: list[str] = []
    sources: list[str] = []
    labels: list[np.ndarray | None] = []
    files = [s for s in inputs if not s.startswith(MEDMNIST_PREFIX) and not Path(s).is_dir()]
    kept_files = set(shard.select(files, key=str) if shard else files)
    for spec in inputs:
        if spec in files and spec not in kept_files:
            continue
        if spec.startswith(MEDMNIST_PREFIX):
            flag, size, split = parse_medmnist_spec(spec)
            if medmnist_root is None:
                raise ValueError("a medmnist input needs medmnist_root")
            ds: Dataset = MedMNIST(flag, split, size=size, root=medmnist_root, download=download)
            if shard is not None:
                ds = Subset(ds, range(shard.index - 1, len(ds), shard.count))  # type: ignore[arg-type]
            loader = DataLoader(ds, batch_size=batch_size, shuffle=False)
            for batch in tqdm(loader, desc=spec, disable=not progress, unit="batch"):
                feats.append(pooled_features(encoder, batch["image"], window))
                ids.extend(batch["id"])
                sources.extend([spec] * len(batch["id"]))
                labels.append(batch["label"].numpy())
        else:
            n0 = len(ids)
            for item_id, image in tqdm(
                _volume_items(spec, preprocessing, frame, cache_dir, progress, shard),
                desc=spec,
                disable=not progress,
                unit="vol",
            ):
                feats.append(pooled_features(encoder, image, window))
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
