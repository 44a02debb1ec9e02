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
import json
import math
import platform
import sys
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
from omnienc.atomic import write_bytes_atomic
from omnienc.benchmarks.anchors import ANCHORS, CITATION
from omnienc.benchmarks.machine import cpu_model
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


def machine_facts() -> dict[str, Any]:
    """Where and with what a benchmark ran."""
    return {
        "cpu": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _budget_text(payload: dict[str, Any]) -> str:
    """The end-to-end budget of a payload, with the steps each fraction got."""
    if "budget" not in payload:  # payloads written before EndToEndBudget
        return f"{payload['finetune']['steps']} steps"
    text = EndToEndBudget(**payload["budget"]).describe()
    steps = {r["fraction"]: r["steps"] for r in payload["rows"] if "steps" in r}
    if steps and payload["budget"]["steps"] is None:
        text += " (" + ", ".join(f"{100 * f:g}%: {n}" for f, n in sorted(steps.items())) + ")"
    return text


def _task_text(payload: dict[str, Any]) -> str:
    """The INFO task, and how a set of more than two classes is scored."""
    task, n_classes = payload["task"], payload.get("n_classes", 2)
    if task.startswith("multi-label") or n_classes <= 2:
        return task
    return f"{task}, {n_classes} classes, scored as multi-class: macro one-vs-rest AUC, argmax ACC"


def _fmt(row: dict[str, Any] | None, metric: str = "auc") -> str:
    if row is None:
        return "–"
    value = row["metrics"][metric]
    lo, hi = row["intervals"].get(metric, (float("nan"), float("nan")))
    spread = row.get("spread", {}).get(metric)
    text = f"{value:.3f} [{lo:.2f}, {hi:.2f}]"
    return text + (f" ±{spread:.3f}" if spread is not None else "")


METHOD_NAMES = {
    "linear": "linear probe (frozen)",
    "knn": "kNN, cosine (frozen)",
    "attention": "attention-pool head (frozen)",
    "scratch": "supervised from scratch (end-to-end)",
    "finetune": "fine-tuned (end-to-end)",
}


def format_markdown(
    payloads: Sequence[dict[str, Any]], command: str, title: str = "Classification benchmark"
) -> str:
    """The Markdown report of one or more datasets' payloads."""
    lines = [
        f"# {title}",
        "",
        f"Command: `{command}`  ",
    ]
    if payloads:
        machine = payloads[0].get("machine", {})
        lines += [
            f"Machine: {machine.get('cpu')}, {machine.get('torch_threads')} torch threads, "
            f"GPU: {machine.get('gpu') or 'none'}; {machine.get('date')}",
            "",
            "Test-split AUC with its bootstrap 95% interval (attention head: mean of "
            f"{len(payloads[0]['head_seeds'])} seeds, ± their standard deviation). Each column "
            "trains on that fraction of the training labels (stratified, seed 0; at least one "
            "item per class); validation and test splits are whole. `pretrained` is the encoder "
            "under test, `random-init` a random-init encoder of the same shape.",
        ]
    for p in payloads:
        fracs = p["fractions"]
        ft = p["finetune"]
        lines += [
            "",
            f"## {p['dataset']} {p['size']} ({_task_text(p)}; train/val/test "
            f"{p['n']['train']}/{p['n']['val']}/{p['n']['test']})",
            "",
            f"Encoder: `{p['encoder']['source']}` ({p['encoder']['arch']}, "
            f"`{p['encoder']['checkpoint'][:19]}…`); data: "
            + ", ".join(f"`{k}` sha256 `{v[:12]}…`" for k, v in p["data_files"].items())
            + f"; {p['seconds'] / 60:.1f} min in all.",
            f"End-to-end budget: {_budget_text(p)} of batch {ft['batch_size']}, AdamW lr "
            f"{ft['lr']:g} (fine-tuning: encoder lr x{ft['encoder_lr_scale']:g}), random flips, "
            "best step on validation AUC.",
            "",
            "| encoder | method | "
            + " | ".join(
                f"AUC, {100 * f:g}% (n={sum(p['train_label_counts'][str(f)].values())})"
                for f in fracs
            )
            + " | ACC, 100% |",
            "|---|---|" + "---|" * (len(fracs) + 1),
        ]
        keys = []
        for r in p["rows"]:
            if (r["encoder"], r["method"]) not in keys:
                keys.append((r["encoder"], r["method"]))
        for enc, method in keys:
            by_f = {
                r["fraction"]: r for r in p["rows"] if r["encoder"] == enc and r["method"] == method
            }
            bold = "**" if enc == "pretrained" else ""
            lines.append(
                f"| {bold}{enc}{bold} | {METHOD_NAMES[method]} | "
                + " | ".join(_fmt(by_f.get(f)) for f in fracs)
                + f" | {_fmt(by_f.get(1.0), 'acc') if 1.0 in by_f else '–'} |"
            )
        anchors = ANCHORS.get((p["dataset"], p["size"]), [])
        if anchors:
            lines += [
                "",
                f"Published anchors, 100% of the labels (not re-run here; {CITATION}):",
                "",
                "| model | AUC | ACC | source we read it from |",
                "|---|---:|---:|---|",
            ]
            lines += [f"| {a.model} | {a.auc:.3f} | {a.acc:.3f} | {a.source} |" for a in anchors]
    return "\n".join(lines) + "\n"


def write_results(
    payloads: Sequence[dict[str, Any]],
    out: Path,
    command: str,
    segmentation: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``OUT.json`` and ``OUT.md`` atomically; return both paths.

    Args:
        payloads: :func:`run_classification` results (may be empty).
        out: Path without suffix.
        command: The command that made them.
        segmentation: A :func:`omnienc.benchmarks.segmentation.run_segmentation_suite` result.
    """
    from omnienc.benchmarks.segmentation import format_segmentation_markdown

    out.parent.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"command": command, "results": list(payloads)}
    title = "Benchmarks" if segmentation is not None else "Classification benchmark"
    text = (
        format_markdown(payloads, command, title)
        if payloads
        else f"# Benchmark\n\nCommand: `{command}`\n"
    )
    if segmentation is not None:
        doc["segmentation"] = segmentation
        text += "\n" + format_segmentation_markdown(segmentation)
    json_path = write_bytes_atomic(out.with_suffix(".json"), json.dumps(doc, indent=2).encode())
    md_path = write_bytes_atomic(out.with_suffix(".md"), text.encode())
    return json_path, md_path


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as the user typed it, for the results file."""
    args = list(sys.argv[1:] if argv is None else argv)
    return "omnienc " + " ".join(args)
