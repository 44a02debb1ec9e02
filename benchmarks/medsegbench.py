"""``omnienc bench medsegbench``: the segmentation adapter on a MedSegBench set.

MedSegBench's 2D sets (https://github.com/zekikus/MedSegBench) come through the medsegbench
package as ``{flag}_{size}.npz`` files; :class:`~omnienc.data.medsegbench.MedSegBench` lifts each
image and its label map to a thin ``(1, 16, H, W)`` volume, the decoder trains on random crops of
the training split (frozen encoder; optionally a fine-tuned one), picks nothing on the test split,
and is scored by Dice per pixel class on the whole test images. A random-init encoder of the same
shape is the floor.

The files are on Zenodo only, which the machines omnienc is developed on cannot reach: this job
is tested on a small file in the package's format and its numbers are still to be produced on a
machine with internet (``--download`` lets the package fetch the file).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from omnienc.adapters.segmentation import (
    SegDecoderConfig,
    evaluate_segmentation,
    medsegbench_items,
    train_segmentation,
)
from omnienc.benchmarks.segmentation import (
    build_benchmark_encoder,
    floor_spec_of,
    summarize_runs,
)
from omnienc.checkpoint import file_sha256
from omnienc.data.medsegbench import MedSegBench
from omnienc.data.root import resolve_data_root
from omnienc.lifting import LIFT_DEPTH


def _subset(n: int, limit: int | None, seed: int) -> list[int] | None:
    """Seeded rows ``[0, n)`` to keep at most ``limit`` of them (``None``: all)."""
    if limit is None or limit >= n:
        return None
    return sorted(np.random.default_rng(seed).choice(n, size=limit, replace=False).tolist())


def run_medsegbench_benchmark(
    encoder_spec: str,
    flag: str,
    size: int = 128,
    *,
    root: str | Path | None = None,
    steps: int = 300,
    seeds: Sequence[int] = (0,),
    batch_size: int = 4,
    crop: Sequence[int] = (LIFT_DEPTH, 64, 64),
    max_train: int | None = 500,
    max_test: int | None = None,
    fine_tune: bool = False,
    width: int = 32,
    lr: float = 1e-3,
    download: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Train the segmentation adapter of one encoder on a MedSegBench set; Dice on its test split.

    Args:
        encoder_spec: Checkpoint folder or ``random:ARCH``.
        flag: MedSegBench flag, e.g. ``busi``.
        size: Image side (128, 256 or 512, as the flag comes).
        root: Folder of the ``.npz`` files (default ``medsegbench/`` under the data root).
        steps: Optimizer steps per run.
        seeds: One run per seed (decoder init, crops, a random encoder's weights).
        batch_size: Crops per step.
        crop: Training crop ``(16, h, w)`` and sliding window.
        max_train: Training images used (a seeded subset; ``None``: all).
        max_test: Test images scored (a seeded subset; ``None``: all).
        fine_tune: Also train a copy of the encoder (at 0.1 x ``lr``).
        width: Decoder width.
        lr: Decoder learning rate.
        download: Let the medsegbench package download a missing file.
        progress: Progress bars.

    Returns:
        A JSON-able dict: ``encoder``, ``dataset``, ``size``, ``classes``, the settings,
        ``n`` (train/test images used), ``data_files`` (sha256), ``runs`` (per seed and mode:
        ``dice`` per class, ``mean_dice``), ``summary`` (per mode: mean and SD over seeds) and
        ``seconds``.
    """
    start = time.perf_counter()
    train_ds = MedSegBench(flag, "train", size, root, download)
    train_ds = MedSegBench(flag, "train", size, root, indices=_subset(len(train_ds), max_train, 0))
    test_ds = MedSegBench(flag, "test", size, root, download)
    test_ds = MedSegBench(flag, "test", size, root, indices=_subset(len(test_ds), max_test, 0))
    names = [train_ds.class_names[str(k)] for k in range(1, train_ds.n_classes)]
    train_items, test_items = medsegbench_items(train_ds), medsegbench_items(test_ds)
    modes = ["frozen", "fine-tune"] if fine_tune else ["frozen"]
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        encoder, _, _ = build_benchmark_encoder(encoder_spec, seed)
        for mode in modes:
            config = SegDecoderConfig(
                num_classes=train_ds.n_classes, width=width, lr=lr, freeze_encoder=mode == "frozen"
            )
            model, history = train_segmentation(
                copy.deepcopy(encoder),
                train_items,
                None,
                config,
                tuple(crop),
                steps,
                batch_size=batch_size,
                seed=seed,
                progress=progress,
            )
            result = evaluate_segmentation(model.cpu(), test_items, names)
            runs.append(
                {
                    "seed": int(seed),
                    "mode": mode,
                    "dice": result["dice"],
                    "mean_dice": result["mean_dice"],
                    "final_loss": float(np.mean(history["loss"][-10:])),
                    "train_seconds": round(history["seconds"], 1),
                }
            )
    summary = summarize_runs(runs, modes, names)
    folder = Path(root) if root is not None else resolve_data_root() / "medsegbench"
    data_file = folder / f"{flag}_{size}.npz"
    return {
        "encoder": encoder_spec,
        "dataset": flag,
        "size": size,
        "classes": names,
        "n": {"train": len(train_ds), "test": len(test_ds)},
        "data_files": {data_file.name: file_sha256(data_file)} if data_file.is_file() else {},
        "steps": steps,
        "batch_size": batch_size,
        "crop_size": [int(c) for c in crop],
        "width": width,
        "lr": lr,
        "seeds": [int(s) for s in seeds],
        "runs": runs,
        "summary": summary,
        "seconds": round(time.perf_counter() - start, 1),
    }


def run_medsegbench_suite(
    encoder_spec: str, flag: str, size: int = 128, *, floor: bool = True, **kwargs: Any
) -> dict[str, Any]:
    """:func:`run_medsegbench_benchmark` for the encoder and its random-init floor.

    Returns:
        ``{"encoder", "floor", "benchmarks": [payloads], "seconds"}``.
    """
    start = time.perf_counter()
    floor_spec = floor_spec_of(encoder_spec) if floor else None
    specs = [encoder_spec] + ([floor_spec] if floor_spec else [])
    payloads = [run_medsegbench_benchmark(spec, flag, size, **kwargs) for spec in specs]
    return {
        "encoder": encoder_spec,
        "floor": floor_spec,
        "benchmarks": payloads,
        "seconds": round(time.perf_counter() - start, 1),
    }


def _cell(summary: dict[str, Any] | None) -> str:
    return "–" if summary is None else f"{summary['mean']:.3f} ± {summary['sd']:.3f}"


def format_medsegbench_markdown(suite: dict[str, Any], command: str, machine: str) -> str:
    """A Markdown page for :func:`run_medsegbench_suite`'s result."""
    first = suite["benchmarks"][0]
    names = first["classes"]
    lines = [
        f"# MedSegBench: {first['dataset']} {first['size']}",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine}; {suite['seconds'] / 60:.1f} min in all.  ",
        "Data: "
        + (", ".join(f"`{k}` sha256 `{v[:12]}…`" for k, v in first["data_files"].items()) or "–")
        + f"; {first['n']['train']} training images, {first['n']['test']} test images, lifted "
        f"to {LIFT_DEPTH} identical slices.  ",
        f"Each run: {first['steps']} steps of {first['batch_size']} crops of "
        f"{'x'.join(map(str, first['crop_size']))}, decoder width {first['width']}, lr "
        f"{first['lr']:g}; Dice per class on the whole test images, mean ± SD over seeds "
        f"{first['seeds']}.",
        "",
        "| encoder | mode | " + " | ".join(names) + " | mean |",
        "|---|---|" + "---:|" * (len(names) + 1),
    ]
    for payload in suite["benchmarks"]:
        for mode, summary in payload["summary"].items():
            cells = [_cell(summary[n]) for n in [*names, "mean"]]
            lines.append(f"| `{payload['encoder']}` | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
