"""``omnienc bench classification``: frozen probes, baselines and label efficiency on MedMNIST.

For one MedMNIST set and one encoder (an exported checkpoint, or ``random:ARCH``), every method
runs on the same splits with the same code, at each fraction of the training labels
(stratified, seeded; validation and test stay whole):

* frozen encoder: ``linear`` (logistic regression), ``knn`` (cosine kNN), ``attention`` (an
  attention-pooling head on the deepest feature map, mean and spread over seeds), for the
  encoder under test and for a random-init encoder of the same shape (the floor);
* ``scratch``: the same architecture trained end-to-end with labels from random init, under a
  stated budget (:class:`EndToEndBudget`: epochs over the labelled subset, clamped to a step
  range, so that 1% of the labels is not trained for as many steps as 100%);
* ``finetune``: the encoder under test trained end-to-end from its weights, same budget, encoder
  learning rate 0.1x.

The result is a JSON payload (every metric with its bootstrap interval, the exact command, the
checkpoint and data-file hashes, the machine and the time taken) and a Markdown table beside the
published anchors of :mod:`omnienc.benchmarks.anchors`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omnienc.adapters.classification import (
    FeatureSet,
    FinetuneConfig,
    ProbeResult,
    checkpoint_id,
    copy_encoder,
    extract_features,
    knn_probe,
    label_counts,
    linear_probe,
    random_checkpoint_id,
    stratified_fraction,
    train_classifier,
    train_head_probe,
)
from omnienc.checkpoint import file_sha256, load_encoder
from omnienc.data.medmnist import MedMNIST
from omnienc.encoders import (
    RANDOM_PREFIX,
    arch_name,
    parse_random_spec,
    random_encoder,
    random_like,
)
from omnienc.encoders.base import Encoder

FROZEN_METHODS = ("linear", "knn", "attention")
TRAINED_METHODS = ("scratch", "finetune")
METHODS = FROZEN_METHODS + TRAINED_METHODS
DEFAULT_FRACTIONS = (0.01, 0.1, 1.0)


@dataclass(frozen=True)
class EndToEndBudget:
    """Optimizer steps of the end-to-end baselines (``scratch``, ``finetune``) per label fraction.

    A fixed step count trains 1% of the labels for as many steps as 100% (hundreds of epochs of
    a dozen items against a handful of the whole set); at 200 steps AdrenalMNIST3D's 100%
    column came out below its 10% one. So the budget is ``epochs`` passes over the labelled
    subset, clamped to ``[min_steps, max_steps]``; ``steps`` fixes it for every fraction instead.

    Attributes:
        epochs: Passes over the labelled training subset.
        min_steps: Fewest steps of any run.
        max_steps: Most steps of any run.
        steps: A fixed budget for every fraction (overrides the three above).
    """

    epochs: float = 20.0
    min_steps: int = 200
    max_steps: int = 1000
    steps: int | None = None

    def __post_init__(self) -> None:
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not self.epochs > 0 or not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(
                f"need epochs > 0 and 1 <= min_steps <= max_steps, got {self.epochs}, "
                f"{self.min_steps}, {self.max_steps}"
            )

    def steps_for(self, n_train: int, batch_size: int) -> int:
        """Steps for a labelled subset of ``n_train`` items in batches of ``batch_size``."""
        if self.steps is not None:
            return self.steps
        wanted = math.ceil(self.epochs * n_train / batch_size)
        return min(self.max_steps, max(self.min_steps, wanted))

    def describe(self) -> str:
        """The budget in words, for results tables."""
        if self.steps is not None:
            return f"{self.steps} steps"
        return (
            f"{self.epochs:g} epochs of the labelled subset, at least {self.min_steps} and at "
            f"most {self.max_steps} steps"
        )


@dataclass
class EncoderUnderTest:
    """An encoder with the identifiers a result must carry.

    Attributes:
        encoder: The (frozen) encoder.
        checkpoint: ``sha256:HEX`` of an exported checkpoint or ``random:ARCH:SEED``.
        arch: Registered architecture name.
        source: What the user passed (a folder or ``random:ARCH``).
    """

    encoder: Encoder
    checkpoint: str
    arch: str
    source: str

    @property
    def is_random(self) -> bool:
        """Whether this is a random-init encoder."""
        return self.checkpoint.startswith(RANDOM_PREFIX)


def resolve_encoder(spec: str | Path, seed: int = 0) -> EncoderUnderTest:
    """An exported checkpoint folder, or ``random:ARCH`` / ``random:ARCH:SEED``.

    Raises:
        ValueError: Unknown architecture.
        CheckpointError: The folder is not a loadable checkpoint.
    """
    parsed = parse_random_spec(spec)
    if parsed is not None:
        arch, spec_seed = parsed
        seed = seed if spec_seed is None else spec_seed
        return EncoderUnderTest(
            random_encoder(arch, seed),
            random_checkpoint_id(arch, seed),
            arch,
            random_checkpoint_id(arch, seed),
        )
    encoder, _ = load_encoder(spec)
    return EncoderUnderTest(encoder, checkpoint_id(spec), arch_name(encoder), str(spec))


def floor_of(under_test: EncoderUnderTest, seed: int = 0) -> EncoderUnderTest:
    """A random-init encoder of the same shape (same family and config), seeded."""
    cid = random_checkpoint_id(under_test.arch, seed)
    return EncoderUnderTest(random_like(under_test.encoder, seed), cid, under_test.arch, cid)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _result_row(
    encoder: str, method: str, fraction: float, result: ProbeResult, seconds: float
) -> dict[str, Any]:
    params = {k: v for k, v in result.params.items() if k != "history"}
    return {
        "encoder": encoder,
        "method": method,
        "fraction": fraction,
        "n_train": result.n.get("train"),
        "metrics": result.metrics,
        "intervals": result.intervals,
        "params": params,
        "spread": result.spread,
        "seed_metrics": result.seed_metrics,
        "seconds": round(seconds, 1),
    }


def _split(
    fs: FeatureSet, rows: np.ndarray | None = None, maps: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    assert fs.labels is not None, f"{fs.dataset} has no labels"
    x = fs.maps if maps else fs.features
    assert x is not None, f"{fs.dataset} was extracted without maps"
    if rows is None:
        return x, fs.labels
    return x[rows], fs.labels[rows]


def run_classification(
    flag: str,
    size: int,
    encoder: str | Path,
    *,
    medmnist_root: Path,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    methods: Sequence[str] = METHODS,
    head_seeds: Sequence[int] = (0, 1, 2),
    finetune: FinetuneConfig | None = None,
    budget: EndToEndBudget | None = None,
    floor: bool = True,
    cache_dir: Path | None = None,
    batch_size: int = 64,
    progress: bool = True,
    log: Any = print,
) -> dict[str, Any]:
    """Run the benchmark on one MedMNIST set; return the JSON-able payload.

    Args:
        flag: MedMNIST flag (any flag the medmnist package knows, file on disk).
        size: Image size.
        encoder: Exported checkpoint folder, or ``random:ARCH[:SEED]``.
        medmnist_root: Folder of the ``.npz`` files.
        fractions: Fractions of the training labels, each in ``(0, 1]``.
        methods: Subset of :data:`METHODS`.
        head_seeds: Seeds of the attention head (mean and spread).
        finetune: Optimiser of ``scratch`` and ``finetune`` (its ``encoder_lr_scale`` applies
            to ``finetune``; ``scratch`` uses 1; its ``steps`` are replaced by ``budget``'s).
        budget: Steps of the end-to-end runs per fraction (default :class:`EndToEndBudget`).
        floor: Also run the frozen methods on a random-init encoder of the same shape.
        cache_dir: Feature cache (``None``: no cache).
        batch_size: Feature-extraction batch size.
        progress: Progress bars.
        log: Called with one line per finished row.

    Returns:
        ``{"dataset", "size", "task", "encoder", "rows": [...], "data_files", ...}``.
    """
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    start_all = time.perf_counter()
    finetune = finetune or FinetuneConfig(encoder_lr_scale=0.1)
    budget = budget or EndToEndBudget()
    under_test = resolve_encoder(encoder)
    suts = [("random-init" if under_test.is_random else "pretrained", under_test)]
    if floor and not under_test.is_random:
        suts.append(("random-init", floor_of(under_test)))
    splits = {s: MedMNIST(flag, s, size=size, root=medmnist_root) for s in ("train", "val", "test")}
    want_maps = "attention" in methods
    frozen = [m for m in methods if m in FROZEN_METHODS]
    features: dict[str, dict[str, FeatureSet]] = {}
    if frozen:
        for label, sut in suts:
            features[label] = {
                s: extract_features(
                    sut.encoder,
                    f"medmnist:{flag}:{size}:{s}",
                    checkpoint_id=sut.checkpoint,
                    medmnist_root=medmnist_root,
                    batch_size=batch_size,
                    maps=want_maps,
                    cache_dir=cache_dir,
                    progress=progress,
                )
                for s in ("train", "val", "test")
            }
    train_labels = splits["train"].labels
    rows: list[dict[str, Any]] = []
    counts: dict[str, dict[str, int]] = {}
    for fraction in fractions:
        idx = stratified_fraction(train_labels, fraction, seed=0)
        counts[str(fraction)] = label_counts(train_labels[idx])
        for label, _ in suts:
            feats = features.get(label)
            for method in frozen:
                assert feats is not None
                t0 = time.perf_counter()
                if method == "attention":
                    with _one_thread():  # tiny heads: threads only add overhead
                        result = train_head_probe(
                            _split(feats["train"], idx, maps=True),
                            _split(feats["val"], maps=True),
                            _split(feats["test"], maps=True),
                            kind="attention",
                            seeds=tuple(head_seeds),
                        )
                else:
                    probe = linear_probe if method == "linear" else knn_probe
                    result = probe(
                        _split(feats["train"], idx), _split(feats["val"]), _split(feats["test"])
                    )
                rows.append(_result_row(label, method, fraction, result, time.perf_counter() - t0))
                log(_row_line(flag, size, rows[-1]))
        sub_train = MedMNIST(flag, "train", size=size, root=medmnist_root, indices=idx)
        steps = budget.steps_for(len(idx), finetune.batch_size)
        for method in (m for m in methods if m in TRAINED_METHODS):
            if method == "scratch":
                enc = random_like(under_test.encoder, 0)
                cfg = dataclasses.replace(finetune, steps=steps, encoder_lr_scale=1.0)
                label = "random-init"
            else:
                if under_test.is_random:
                    continue  # fine-tuning a random-init encoder is training from scratch
                enc, label = copy_encoder(under_test.encoder), "pretrained"
                cfg = dataclasses.replace(finetune, steps=steps)
            t0 = time.perf_counter()
            result = train_classifier(enc, sub_train, splits["val"], splits["test"], cfg)
            rows.append(_result_row(label, method, fraction, result, time.perf_counter() - t0))
            rows[-1]["steps"] = steps
            log(_row_line(flag, size, rows[-1]))
    suffix = "" if size == 28 else f"_{size}"
    data_file = Path(medmnist_root) / f"{flag}{suffix}.npz"
    return {
        "dataset": flag,
        "size": size,
        "task": splits["train"].task,
        "n_classes": splits["train"].n_classes,
        "encoder": {
            "source": under_test.source,
            "checkpoint": under_test.checkpoint,
            "arch": under_test.arch,
        },
        "floor": floor_of(under_test).checkpoint if floor else None,
        "fractions": list(fractions),
        "train_label_counts": counts,
        "n": {s: len(d) for s, d in splits.items()},
        "finetune": finetune.to_dict(),
        "budget": dataclasses.asdict(budget),
        "head_seeds": list(head_seeds),
        "data_files": {data_file.name: file_sha256(data_file)} if data_file.is_file() else {},
        "rows": rows,
        "seconds": round(time.perf_counter() - start_all, 1),
    }


def _row_line(flag: str, size: int, row: dict[str, Any]) -> str:
    m = row["metrics"]
    return (
        f"{flag} {size} | {row['encoder']:<11} {row['method']:<9} {100 * row['fraction']:g}% "
        f"(n={row['n_train']}): AUC {m['auc']:.3f} ACC {m['acc']:.3f} ({row['seconds']:.0f} s)"
    )
