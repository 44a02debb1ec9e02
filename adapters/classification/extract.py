""":func:`extract_features`: a frozen encoder over a data set, with an on-disk cache.

:func:`extract_features` runs a frozen encoder over a MedMNIST split (``medmnist:FLAG:SIZE:SPLIT``)
or any dataset of ``{"image", "label", "id"}`` dicts and returns a
:class:`~omnienc.adapters.classification.features.FeatureSet`.

A MedMNIST split is cached under ``cache_dir/features/`` when ``cache_dir`` is given, keyed by
the checkpoint id, the spec, the ``.npz`` file's size and modification time, the maps flag and
the preprocessing (not by the batch size). A dataset object has no stable identity to key on,
so it is never cached. The cache trusts ``checkpoint_id``: pass
:func:`~omnienc.adapters.classification.features.checkpoint_id` of the folder the encoder was
loaded from, or :func:`~omnienc.adapters.classification.features.random_checkpoint_id` for a
random-init encoder. Files are written atomically and opened without unpickling; a corrupt cache
file is rebuilt with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from omnienc.adapters.classification.features import FORMAT_VERSION, FeatureSet
from omnienc.data.medmnist import MedMNIST, parse_medmnist_spec
from omnienc.data.root import resolve_data_root
from omnienc.embed import MEDMNIST_PREFIX, encoder_input
from omnienc.encoders.base import Encoder
from omnienc.errors import DataError
from omnienc.preprocessing import Preprocessing

logger = logging.getLogger("omnienc")
CACHE_SUBDIR = "features"


def extract_features(
    encoder: Encoder,
    data: str | Dataset[dict[str, Any]],
    *,
    checkpoint_id: str,
    preprocessing: Preprocessing | Mapping[str, Any] | None = None,
    medmnist_root: str | Path | None = None,
    batch_size: int = 32,
    maps: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    download: bool = False,
    name: str | None = None,
) -> FeatureSet:
    """Pooled features (and optionally deepest feature maps) of a data set, frozen encoder.

    The encoder runs in eval mode under ``torch.inference_mode``; each batch is padded to the
    encoder's coarsest stride as ``omnienc embed`` does (:func:`omnienc.embed.encoder_input`).

    Args:
        encoder: Any omnienc encoder; it is put in eval mode.
        data: ``medmnist:FLAG:SIZE:SPLIT``, or a dataset of dicts with ``image``
            ``(C, D, H, W)`` float32, optional ``label`` (int or ``(k,)``) and optional ``id``
            (default: the row index).
        checkpoint_id: Identifies the weights (see :func:`checkpoint_id`); part of the cache key.
        preprocessing: The encoder's preprocessing, recorded in ``meta`` and the cache key. It is
            not applied here: MedMNIST cubes are used as they are, and a dataset object brings
            its own.
        medmnist_root: Folder of the MedMNIST ``.npz`` files (default: ``medmnist/`` under the
            data root).
        batch_size: Items per forward pass; items of different sizes need ``batch_size=1``.
        maps: Also keep ``encoder.forward_features`` maps; ``features`` is then their mean.
        cache_dir: Cache root for MedMNIST splits (``None``: no cache; the CLI passes
            :func:`default_cache_dir`). Dataset objects are never cached.
        progress: Show a progress bar.
        download: Let the medmnist package download a missing file.
        name: The ``dataset`` string of a dataset object (default: its ``repr``).

    Returns:
        The :class:`FeatureSet`; single-column labels are squeezed to ``(N,)``.

    Raises:
        ValueError: Bad ``checkpoint_id``, ``batch_size`` or spec, or items that cannot be
            batched.
        DataError: The MedMNIST file is missing or unreadable.
    """
    if not isinstance(checkpoint_id, str) or not checkpoint_id.strip():
        raise ValueError(f"checkpoint_id must be a non-empty string, got {checkpoint_id!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    meta: dict[str, Any] = {"preprocessing": _preprocessing_dict(preprocessing)}
    if not isinstance(data, str):
        return _encode_dataset(
            encoder, data, name or repr(data), meta, checkpoint_id, maps, batch_size, progress
        )
    if not data.startswith(MEDMNIST_PREFIX):
        raise ValueError(f"data must be a Dataset or a medmnist:FLAG:SIZE:SPLIT spec, got {data!r}")
    flag, size, split = parse_medmnist_spec(data)
    root = Path(medmnist_root) if medmnist_root is not None else resolve_data_root() / "medmnist"
    dataset = None
    file = root / (f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz")  # the package's names
    if not file.is_file():  # download it, or raise the DataError that names it
        dataset = MedMNIST(flag, split, size=size, root=root, download=download)
    cache_file = None
    if cache_dir is not None:
        stat = file.stat()
        key = _cache_key(
            checkpoint=checkpoint_id,
            dataset=data,
            file={"name": file.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns},
            maps=maps,
            preprocessing=meta["preprocessing"],
        )
        meta["cache_key"] = key
        cache_file = Path(cache_dir) / CACHE_SUBDIR / f"{flag}_{size}_{split}-{key[:24]}.npz"
        cached = _read_cache(cache_file, key)
        if cached is not None:
            return cached
    if dataset is None:
        dataset = MedMNIST(flag, split, size=size, root=root, download=download)
    meta.update(task=dataset.task, class_names=dataset.class_names)
    out = _encode_dataset(encoder, dataset, data, meta, checkpoint_id, maps, batch_size, progress)
    if cache_file is not None:
        out.save(cache_file)
        logger.info("cached %s features in %s", data, cache_file)
    return out


def _preprocessing_dict(
    preprocessing: Preprocessing | Mapping[str, Any] | None,
) -> dict[str, Any] | None:
    if preprocessing is None:
        return None
    out = (
        preprocessing.to_dict() if isinstance(preprocessing, Preprocessing) else dict(preprocessing)
    )
    try:
        json.dumps(out, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"preprocessing must be JSON-serialisable: {exc}") from exc
    return out


def _cache_key(**parts: Any) -> str:
    payload = json.dumps({"format_version": FORMAT_VERSION, **parts}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _read_cache(cache_file: Path, key: str) -> FeatureSet | None:
    """The cached set, or ``None`` (absent, or corrupt: then a warning and a rebuild)."""
    if not cache_file.exists():
        return None
    try:
        cached = FeatureSet.load(cache_file)
        if cached.meta.get("cache_key") != key:
            raise DataError(cache_file, "its cache key does not match its name")
    except DataError as exc:
        logger.warning("corrupt feature cache %s (%s); rebuilding it", cache_file, exc.problem)
        return None
    logger.info("feature cache hit: %s", cache_file)
    return cached


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images; gather ids (``None`` where missing) and labels (``None`` unless all have)."""
    try:
        images = [torch.as_tensor(it["image"]) for it in items]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"dataset items must be dicts with an 'image' tensor: {exc!r}") from exc
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        raise ValueError(
            f"items of different shapes {sorted(shapes)} cannot share a batch; use batch_size=1"
        )
    has_label = ["label" in it for it in items]
    if any(has_label) and not all(has_label):
        raise ValueError("some dataset items have a 'label' and others do not")
    labels = None
    if all(has_label):
        labels = np.stack([np.asarray(it["label"]).reshape(-1) for it in items])
    ids = [None if it.get("id") is None else str(it["id"]) for it in items]
    return {"image": torch.stack(images), "label": labels, "id": ids}


def _encode_dataset(
    encoder: Encoder,
    dataset: Dataset[dict[str, Any]],
    name: str,
    meta: dict[str, Any],
    checkpoint: str,
    maps: bool,
    batch_size: int,
    progress: bool,
) -> FeatureSet:
    """Run the frozen encoder over ``dataset`` in order."""
    encoder.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=_collate)
    pooled: list[np.ndarray] = []
    fmaps: list[np.ndarray] = []
    ids: list[str] = []
    labels: list[np.ndarray | None] = []
    with torch.inference_mode():
        for batch in tqdm(loader, desc=name, disable=not progress, unit="batch"):
            x = encoder_input(encoder, batch["image"])
            if maps:
                fmap = encoder.forward_features(x).float()  # (B, E, d, h, w)
                fmaps.append(fmap.cpu().numpy())
                # The encoder contract: forward(x) is this global average.
                pooled.append(fmap.mean(dim=(2, 3, 4)).cpu().numpy())
            else:
                pooled.append(encoder(x).float().cpu().numpy())
            ids += [str(len(ids) + j) if i is None else i for j, i in enumerate(batch["id"])]
            labels.append(batch["label"])
    if not pooled:
        raise ValueError(f"{name}: the dataset is empty")
    if any(lab is None for lab in labels) and not all(lab is None for lab in labels):
        raise ValueError(f"{name}: some dataset items have a 'label' and others do not")
    label_array = None if labels[0] is None else _stack_labels(name, labels)
    map_array = None
    if maps:
        grids = {m.shape[2:] for m in fmaps}
        if len(grids) > 1:
            raise ValueError(f"{name}: items give feature maps of different grids {sorted(grids)}")
        map_array = np.concatenate(fmaps)
    return FeatureSet(
        features=np.concatenate(pooled),
        labels=label_array,
        ids=ids,
        checkpoint=checkpoint,
        dataset=name,
        maps=map_array,
        meta=meta,
    )


def _stack_labels(name: str, labels: list[Any]) -> np.ndarray:
    """``(N,)`` for single-column labels, ``(N, L)`` otherwise, int64."""
    widths = {lab.shape[1] for lab in labels}
    if len(widths) > 1:
        raise ValueError(f"{name}: items have labels of different lengths {sorted(widths)}")
    stacked = np.concatenate(labels)
    if stacked.dtype.kind not in "biu" and not (
        stacked.dtype.kind == "f" and np.array_equal(stacked, np.round(stacked))
    ):
        raise ValueError(f"{name}: labels must be integers, got {stacked.dtype} values")
    stacked = stacked.astype(np.int64)
    return stacked[:, 0] if stacked.shape[1] == 1 else stacked
