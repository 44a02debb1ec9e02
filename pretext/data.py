"""Pretraining data: reference/query pairs with task masks, as a Lightning DataModule.

Each training sample is drawn from a random volume, as two overlapping crops with up to K
proposal masks (:func:`omnienc.pretext.pairs.sample_pair`), then augmented (reference weakly,
query strongly; :mod:`omnienc.pretext.augment`). Sample ``j`` of rank ``r`` at global step ``g``
has the index ``(g * world_size + r) * batch_size + j`` and its randomness comes only from
``(seed, index)``, so a resumed run replays exactly the batches an uninterrupted run would have
seen, however the trainer counts epochs.

The volumes stay on disk (:mod:`omnienc.pretext.corpus`): every sample maps its volume's cached
image and bit-packed masks and reads only its two crops. Where the augmentation runs is
``data.augment_on``: in the DataLoader (``cpu``), or batched on the accelerator after the
transfer (``device``, in :meth:`PretrainDataModule.on_after_batch_transfer`); ``auto`` picks
``device`` when the trainer's accelerator is not the CPU. The view parameters are drawn in the
loader from the sample's generator either way, so both give the same batches.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from omnienc.atomic import atomic_target
from omnienc.data.folder import VolumeFolder
from omnienc.data.medmnist import MedMNIST, parse_medmnist_spec
from omnienc.data.root import resolve_data_root
from omnienc.errors import DataError
from omnienc.preprocessing import Preprocessing
from omnienc.pretext.augment import ViewConfig, augment_sample, augment_views, draw_view_params
from omnienc.pretext.corpus import CachedVolume, InMemoryVolume, cached_volume
from omnienc.pretext.crossvolume import CrossConfig, PartnerViews, corpus_partners
from omnienc.pretext.masks import MaskConfig, compute_folder_masks, propose_masks
from omnienc.pretext.pairs import PairConfig, sample_pair

AUGMENT_ON = ("auto", "cpu", "device")
VOLUME_WEIGHTS = ("equal", "voxels")
PAIR_KEYS = ("ref_image", "query_image", "ref_masks", "query_masks", "task_valid")

logger = logging.getLogger("omnienc")


@dataclass
class DataConfig:
    """Where pretraining data comes from and how it is sampled.

    Attributes:
        roots: Volume folders, absolute or relative to the data root (``--data``).
        medmnist: Unlabelled MedMNIST 3D splits to add, ``FLAG:SIZE:SPLIT`` (labels unused).
        medmnist_fraction: Share of samples drawn from the MedMNIST splits (0 = none).
        min_size: Volumes smaller than this along any axis after preprocessing are skipped.
        preprocessing: Deterministic preprocessing (recorded in the exported checkpoint).
        masks: Mask-proposal parameters for the volumes.
        medmnist_masks: Mask-proposal parameters for MedMNIST cubes (small structures: a lower
            size floor, no cap relative to the body).
        pair: Crop size, overlap and number of tasks.
        view: Probabilities and ranges of the reference's and the query's random views.
        batch_size: Pairs per step (per device).
        steps_per_epoch: Steps per epoch; checkpoints are written at epoch ends.
        num_workers: DataLoader worker processes.
        cache_dir: Preprocessing and mask cache (default ``~/.cache/omnienc``).
        mask_workers: Processes for computing mask proposals.
        augment_on: Where the random views are computed: ``cpu`` (DataLoader), ``device``
            (batched, after the transfer to the accelerator) or ``auto`` (``device`` unless the
            trainer runs on the CPU). The batches are the same either way.
        volume_weights: How often each volume is drawn: ``equal`` (every volume as often) or
            ``voxels`` (in proportion to its preprocessed voxels, so that every voxel of the
            corpus is as likely to be seen: a large scan is no longer drawn as often as a
            small crop). MedMNIST cubes keep ``medmnist_fraction`` either way.
        cross: Cross-volume pairs (:mod:`omnienc.pretext.crossvolume`): groups of scans that
            pair, registered once; default none.
    """

    roots: list[str] = field(default_factory=lambda: ["volumes"])
    medmnist: list[str] = field(default_factory=list)
    medmnist_fraction: float = 0.0
    min_size: int = 16
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    masks: MaskConfig = field(default_factory=MaskConfig)
    medmnist_masks: MaskConfig = field(
        default_factory=lambda: MaskConfig(min_voxels=8, max_body_fraction=1.0)
    )
    pair: PairConfig = field(default_factory=PairConfig)
    view: ViewConfig = field(default_factory=ViewConfig)
    batch_size: int = 4
    steps_per_epoch: int = 50
    num_workers: int = 0
    cache_dir: str | None = None
    mask_workers: int = 1
    augment_on: str = "auto"
    volume_weights: str = "equal"
    cross: CrossConfig = field(default_factory=CrossConfig)

    def __post_init__(self) -> None:
        if self.augment_on not in AUGMENT_ON:
            raise ValueError(f"augment_on must be one of {AUGMENT_ON}, got {self.augment_on!r}")
        if self.volume_weights not in VOLUME_WEIGHTS:
            raise ValueError(
                f"volume_weights must be one of {VOLUME_WEIGHTS}, got {self.volume_weights!r}"
            )
        if not 0.0 <= self.medmnist_fraction <= 1.0:
            raise ValueError(f"medmnist_fraction must be in [0, 1], got {self.medmnist_fraction}")
        if self.medmnist_fraction > 0 and not self.medmnist:
            raise ValueError("medmnist_fraction > 0 needs at least one medmnist split")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2 (the contrastive loss needs negatives)")
        if self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {self.steps_per_epoch}")


class StepBatchSampler(Sampler[list[int]]):
    """Batches of sample indices keyed on the global step (and the rank under DDP).

    One epoch is ``steps_per_epoch`` batches starting at ``start_step``, which the training
    module sets to the trainer's global step at every epoch start.
    """

    def __init__(self, batch_size: int, steps_per_epoch: int, rank: int = 0, world_size: int = 1):
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.rank = rank
        self.world_size = world_size
        self.start_step = 0

    def __iter__(self) -> Iterator[list[int]]:
        # A generator: start_step is read at the first batch, after the epoch-start hook.
        for step in range(self.start_step, self.start_step + self.steps_per_epoch):
            base = (step * self.world_size + self.rank) * self.batch_size
            yield list(range(base, base + self.batch_size))

    def __len__(self) -> int:
        return self.steps_per_epoch


Volume: TypeAlias = "CachedVolume | InMemoryVolume"


class PairDataset(Dataset):
    """Deterministic stream of reference/query pairs; sample ``i`` depends on ``i`` only.

    Args:
        volumes: The corpus: :class:`~omnienc.pretext.corpus.CachedVolume` (on disk, mapped
            per sample) or :class:`~omnienc.pretext.corpus.InMemoryVolume`.
        weights: Sampling probability of each volume (normalised here).
        pair: Crop and task parameters.
        seed: Base seed.
        augment: Apply the views here (the CPU path); otherwise items carry the view
            parameters (:data:`omnienc.pretext.augment.PARAM_KEYS`) for
            :func:`omnienc.pretext.augment.augment_views` to apply after the transfer.
        view: Probabilities and ranges of the views (default
            :class:`~omnienc.pretext.augment.ViewConfig`).
        partners: Cross-volume partner views: a share of the samples takes its query crop from
            one (:class:`~omnienc.pretext.crossvolume.PartnerViews`).

    Items are dicts of tensors: ``ref_image``/``query_image`` ``(1, S, S, S)`` float32,
    ``ref_masks``/``query_masks`` ``(T, S, S, S)`` float32, ``task_valid`` ``(T,)`` bool, and
    without ``augment`` the view parameters.
    """

    def __init__(
        self,
        volumes: list[Volume],
        weights: np.ndarray,
        pair: PairConfig,
        seed: int,
        augment: bool = True,
        view: ViewConfig | None = None,
        partners: PartnerViews | None = None,
    ) -> None:
        if not volumes:
            raise ValueError("PairDataset needs at least one volume")
        self.volumes = volumes
        self.weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        self.pair = pair
        self.seed = seed
        self.augment = augment
        self.view = view or ViewConfig()
        self.partners = partners

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, index])
        cross = self.partners.draw(rng) if self.partners is not None else None
        v, other = cross if cross else (int(rng.choice(len(self.volumes), p=self.weights)), None)
        image, masks = self.volumes[v].open()
        pair = sample_pair(image, masks, self.pair, rng, query_source=other)
        del image, masks, other, cross  # unmaps the volumes: only the crops stay
        params = draw_view_params(rng, self.pair.crop_size, self.view)
        item = {
            key: torch.as_tensor(np.ascontiguousarray(value)).reshape(np.shape(value))
            for key, value in [*((k, pair[k]) for k in PAIR_KEYS), *params.items()]
        }
        return augment_sample(item, self.view) if self.augment else item


class PretrainDataModule(pl.LightningDataModule):
    """Volumes (and optional MedMNIST cubes) with cached mask proposals, served as pairs.

    ``prepare_data`` (rank 0 only) preprocesses every volume and computes its mask proposals
    into the cache; ``setup`` (every rank) makes the memory-mappable sidecars of the cache
    entries where they are missing and keeps only their paths (MedMNIST cubes are held in
    memory).

    Args:
        config: The :class:`DataConfig`.
        data_root: Root that relative ``roots`` are resolved against (``None``: the default).
        seed: Base seed of the sample stream.
    """

    def __init__(self, config: DataConfig, data_root: str | Path | None = None, seed: int = 0):
        super().__init__()
        self.config = config
        self.data_root = data_root
        self.seed = seed
        self.dataset: PairDataset | None = None
        self.sources: list[str] = []
        # Built once per process: prepare_data and setup both need the folders, and building
        # them again would warn twice about every skipped file.
        self._folder_list: list[VolumeFolder] | None = None

    def cache_dir(self) -> Path:
        """The preprocessing and mask cache: ``data.cache_dir``, else the default cache."""
        from omnienc.data.folder import default_cache_dir

        return Path(self.config.cache_dir) if self.config.cache_dir else default_cache_dir()

    def _root_paths(self) -> list[Path]:
        paths = []
        for root in self.config.roots:
            p = Path(root).expanduser()
            if not p.is_absolute():
                p = resolve_data_root(self.data_root) / p
            paths.append(p)
        return paths

    def volume_folders(self, progress: bool = False) -> list[VolumeFolder]:
        """The scanned volume folders of ``data.roots``, built once per process."""
        if self._folder_list is None:
            self._folder_list = [
                VolumeFolder(
                    root,
                    self.config.preprocessing,
                    cache_dir=self.cache_dir(),
                    min_size=self.config.min_size,
                    progress=progress,
                )
                for root in self._root_paths()
            ]
        return self._folder_list

    def prepare_data(self) -> None:
        for folder in self.volume_folders(progress=True):
            compute_folder_masks(
                folder,
                self.config.masks,
                self.cache_dir(),
                workers=self.config.mask_workers,
                progress=True,
            )

    def _medmnist(self) -> tuple[list[InMemoryVolume], list[str]]:
        volumes: list[InMemoryVolume] = []
        ids: list[str] = []
        root = resolve_data_root(self.data_root) / "medmnist"
        for spec in self.config.medmnist:
            flag, size, split = parse_medmnist_spec(f"medmnist:{spec}")
            ds = MedMNIST(flag, split, size=size, root=root)
            if not ds.is_3d:
                raise DataError(root, f"pretraining takes 3D MedMNIST sets; {flag} is 2D")
            cubes = [ds[i]["image"].numpy() for i in range(len(ds))]
            masks = self._cube_masks(f"{flag}_{size}_{split}", cubes)
            volumes += [InMemoryVolume(c, m) for c, m in zip(cubes, masks, strict=True)]
            ids += list(ds.ids)
        return volumes, ids

    def _cube_masks(self, name: str, cubes: list[np.ndarray]) -> list[np.ndarray]:
        """Mask proposals of MedMNIST cubes, cached in one packed file per split and config."""
        cfg = self.config.medmnist_masks
        key = hashlib.blake2b(
            json.dumps([name, cfg.to_dict(), len(cubes)], sort_keys=True).encode(),
            digest_size=12,
        ).hexdigest()
        path = self.cache_dir() / f"medmnist-masks-{name}-{key}.npz"
        shape = cubes[0].shape[1:]
        if path.exists():
            try:
                with np.load(path) as z:
                    counts, bits = z["counts"], z["bits"]
                flat = np.unpackbits(bits, count=int(counts.sum()) * int(np.prod(shape)))
                stack = flat.reshape(-1, *shape).astype(bool)
                return list(np.split(stack, np.cumsum(counts)[:-1]))
            except (OSError, ValueError, KeyError) as exc:
                logger.warning("corrupt mask cache %s (%s); rebuilding it", path, exc)
        out = [propose_masks(c[0], cfg) for c in tqdm(cubes, desc=f"masks {name}", unit="cube")]
        counts = np.array([len(m) for m in out], dtype=np.int64)
        stack = np.concatenate(out) if counts.sum() else np.zeros((0, *shape), bool)
        buf = io.BytesIO()
        np.savez(buf, counts=counts, bits=np.packbits(stack.reshape(-1)))
        with atomic_target(path) as tmp:
            tmp.write_bytes(buf.getvalue())
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        volumes: list[Volume] = []
        voxels: list[int] = []
        spacings: list[tuple[float, float, float]] = []
        for folder in self.volume_folders(progress=False):
            results = compute_folder_masks(
                folder, self.config.masks, self.cache_dir(), workers=1, progress=False
            )
            by_source = {r.source: r for r in results}
            for entry in folder.entries:
                mask_file = by_source[entry.source].cache_file
                volumes.append(cached_volume(entry.cache_file, mask_file, entry.preprocessed_shape))
                voxels.append(int(np.prod(entry.preprocessed_shape)))
                spacings.append(self.config.preprocessing.spacing or entry.spacing)
                self.sources.append(entry.source)
        n_volumes = len(volumes)
        partners = corpus_partners(volumes, self.sources, spacings, self.config.cross)
        if self.config.volume_weights == "voxels" and n_volumes:
            weights = np.asarray(voxels, np.float64) / float(sum(voxels))
        else:
            weights = np.full(n_volumes, 1.0 / max(n_volumes, 1))
        if self.config.medmnist and self.config.medmnist_fraction > 0:
            cubes, mm_ids = self._medmnist()
            volumes += cubes
            self.sources += mm_ids
            f = self.config.medmnist_fraction
            weights = np.concatenate([(1 - f) * weights, np.full(len(cubes), f / len(cubes))])
        logger.info(
            "pretraining on %d volumes (+%d MedMNIST cubes), %d mask proposals in all",
            n_volumes,
            len(volumes) - n_volumes,
            sum(v.n_masks for v in volumes),
        )
        self.dataset = PairDataset(
            volumes,
            weights,
            self.config.pair,
            seed=self.seed,
            view=self.config.view,
            partners=partners,
        )
        trainer = getattr(self, "trainer", None)
        self.sampler = StepBatchSampler(
            self.config.batch_size,
            self.config.steps_per_epoch,
            rank=trainer.global_rank if trainer is not None else 0,
            world_size=trainer.world_size if trainer is not None else 1,
        )

    def set_step(self, step: int) -> None:
        """Start the next epoch's batches at global step ``step`` (called at each epoch start)."""
        self.sampler.start_step = step

    def augment_where(self) -> str:
        """``cpu`` or ``device``: where the views are computed (``data.augment_on`` resolved)."""
        if self.config.augment_on != "auto":
            return self.config.augment_on
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return "cpu"
        from pytorch_lightning.accelerators import CPUAccelerator

        return "cpu" if isinstance(trainer.accelerator, CPUAccelerator) else "device"

    def train_dataloader(self) -> DataLoader:
        assert self.dataset is not None, "call setup() first"
        self.dataset.augment = self.augment_where() == "cpu"
        return DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            num_workers=self.config.num_workers,
            persistent_workers=False,
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Apply the views on the batch's device when the loader left them (``device``).

        Args:
            batch: A collated batch (see :class:`PairDataset`), already on the device.
            dataloader_idx: Unused.

        Returns:
            The augmented batch; a batch augmented in the loader passes unchanged.
        """
        return augment_views(batch, self.config.view) if isinstance(batch, dict) else batch
