""":func:`gather_latent`: frozen features of mixed inputs -> one :class:`~.points.LatentSet`.

Volumes are embedded as ``omnienc embed`` does, MedMNIST splits through
:func:`~omnienc.adapters.classification.extract.extract_features`, and structure crops
(:mod:`omnienc.adapters.latent.crops`) one crop a structure; every point gets its colourings.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from omnienc.adapters.classification import extract_features
from omnienc.adapters.latent.crops import (
    DEFAULT_CROP,
    CropDataset,
    structure_crops,
    structure_group,
)
from omnienc.adapters.latent.points import (
    BY_ID,
    MEDMNIST_MODALITY,
    MISSING,
    STRUCTURES_PREFIX,
    UNKNOWN_MODALITY,
    LatentOptions,
    LatentSet,
    check_inputs,
    medmnist_file,
    parse_structures_spec,
)
from omnienc.data.folder import VolumeFolder
from omnienc.data.labelnames import readable
from omnienc.data.medmnist import MedMNIST, parse_medmnist_spec
from omnienc.embed import MEDMNIST_PREFIX, embed_inputs
from omnienc.encoders.base import Encoder
from omnienc.io import read_volume
from omnienc.preprocessing import Preprocessing

logger = logging.getLogger("omnienc")


def _subset_rows(n: int, limit: int | None, seed: int) -> np.ndarray:
    if limit is None or n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def _volume_points(
    encoder: Encoder, pre: Preprocessing, spec: str, opts: LatentOptions, progress: bool
) -> LatentSet:
    emb = embed_inputs(
        encoder, pre, [spec], frame=opts.frame, cache_dir=opts.cache_dir, progress=progress
    )
    path = Path(spec)
    if path.is_dir():
        # The folder scan is cached by embed_inputs above; this pass only reads the manifest.
        folder = VolumeFolder(path, pre, cache_dir=opts.cache_dir, frame=opts.frame, progress=False)
        modality = {folder[i]["id"]: e.modality for i, e in enumerate(folder.entries)}
    else:
        modality = {str(path): read_volume(path, frame=opts.frame).modality}
    sources, datasets = [], []
    for item_id in emb.ids:
        source = Path(item_id.split("#", 1)[0])
        sources.append(str(source))
        if path.is_dir():
            rel = source.relative_to(path).parts
            datasets.append(rel[0] if len(rel) > 1 else path.resolve().name)
        else:
            datasets.append(source.resolve().parent.name)
    n = len(emb.ids)
    return LatentSet(
        features=emb.features,
        ids=list(emb.ids),
        sources=sources,
        inputs=[spec] * n,
        modality=[modality.get(i, UNKNOWN_MODALITY) for i in emb.ids],
        dataset=datasets,
        label=[MISSING] * n,
        group=[MISSING] * n,
    )


def _medmnist_points(
    encoder: Encoder,
    spec: str,
    medmnist_root: Path,
    checkpoint: str,
    opts: LatentOptions,
    progress: bool,
) -> LatentSet:
    flag, size, split = parse_medmnist_spec(spec)
    full = MedMNIST(flag, split, size=size, root=medmnist_root, download=opts.download)
    rows = _subset_rows(len(full), opts.max_per_input, opts.seed)
    ds = (
        full
        if len(rows) == len(full)
        else MedMNIST(flag, split, size, medmnist_root, indices=rows.tolist())
    )
    fs = extract_features(
        encoder,
        ds,
        checkpoint_id=checkpoint,
        batch_size=opts.batch_size,
        progress=progress,
        name=spec,
    )
    assert fs.labels is not None  # MedMNIST items always have labels
    if fs.labels.ndim == 1:
        label = [f"{flag}: {full.class_names[str(int(v))]}" for v in fs.labels]
    else:  # multi-label sets: no single class to colour by
        label = [MISSING] * len(fs)
    n = len(fs)
    file = medmnist_file(medmnist_root, flag, size)
    return LatentSet(
        features=fs.features,
        ids=fs.ids,
        sources=[str(file)] * n,
        inputs=[spec] * n,
        modality=[MEDMNIST_MODALITY.get(flag, UNKNOWN_MODALITY)] * n,
        dataset=[f"{flag} {size}"] * n,
        label=label,
        group=list(label),
    )


def _structure_points(
    encoder: Encoder,
    pre: Preprocessing,
    spec: str,
    checkpoint: str,
    crop_size: Sequence[int],
    opts: LatentOptions,
    progress: bool,
) -> LatentSet:
    image_path, label_path, name = parse_structures_spec(spec)
    names: str | dict[int, str] | None = {} if name == BY_ID else name
    crops, modality = structure_crops(
        image_path, label_path, pre, crop_size, min_voxels=opts.min_voxels, names=names
    )
    rows = _subset_rows(len(crops), opts.max_per_input, opts.seed)
    crops = [crops[i] for i in rows]
    ids = [
        f"{image_path}#{c.structure_id}:{c.name}@{c.centre[0]},{c.centre[1]},{c.centre[2]}"
        for c in crops
    ]
    fs = extract_features(
        encoder,
        CropDataset(crops, ids),
        checkpoint_id=checkpoint,
        batch_size=opts.batch_size,
        progress=progress,
        name=spec,
    )
    n = len(crops)
    stem = image_path.name.split(".")[0]
    return LatentSet(
        features=fs.features,
        ids=fs.ids,
        sources=[f"{image_path} (labels: {label_path})"] * n,
        inputs=[spec] * n,
        modality=[modality] * n,
        dataset=[f"crops of {stem}"] * n,
        label=[readable(c.name) for c in crops],
        group=[structure_group(c.name) for c in crops],
    )


def gather_latent(
    encoder: Encoder,
    preprocessing: Preprocessing,
    inputs: Sequence[str],
    *,
    checkpoint: str,
    medmnist_root: Path | None = None,
    crop_size: Sequence[int] = DEFAULT_CROP,
    options: LatentOptions | None = None,
    progress: bool = True,
) -> LatentSet:
    """Frozen features of mixed inputs, with what each point is.

    Args:
        encoder: Any omnienc encoder (put in eval mode).
        preprocessing: The encoder's preprocessing (volumes and structure crops).
        inputs: Volume files, folders, ``medmnist:FLAG:SIZE:SPLIT`` and
            ``structures:IMAGE:LABELS[:NAME]`` specs.
        checkpoint: Identifies the weights (recorded by feature extraction).
        medmnist_root: Folder of the MedMNIST ``.npz`` files.
        crop_size: Structure crop size, when ``options.crop_size`` is unset.
        options: Subsetting, crops, batch size (default :class:`LatentOptions`).
        progress: Show progress bars.

    Returns:
        The :class:`LatentSet`, points in input order.
    """
    opts = options or LatentOptions()
    check_inputs(inputs, medmnist_root, opts.download)
    encoder.eval()
    parts: list[LatentSet] = []
    for spec in inputs:
        if spec.startswith(MEDMNIST_PREFIX):
            assert medmnist_root is not None  # check_inputs
            part = _medmnist_points(encoder, spec, medmnist_root, checkpoint, opts, progress)
        elif spec.startswith(STRUCTURES_PREFIX):
            size = opts.crop_size or crop_size
            part = _structure_points(encoder, preprocessing, spec, checkpoint, size, opts, progress)
        else:
            part = _volume_points(encoder, preprocessing, spec, opts, progress)
            part = part.subset(_subset_rows(len(part), opts.max_per_input, opts.seed))
        logger.info("%s: %d points", spec, len(part))
        parts.append(part)
    return LatentSet.concat(parts)
