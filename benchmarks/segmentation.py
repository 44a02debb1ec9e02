"""Segmentation benchmark: a decoder trained on one labelled CT, tested on another CT scan.

The adapter of :mod:`omnienc.adapters.segmentation` (frozen encoder + FPN decoder; optionally
fine-tuned) is trained on random crops of one TotalSegmentator example CT and scored by Dice on a
different CT scan, for three large abdominal organs that both label maps contain. See
:func:`real_segmentation_split` for the exact split and :func:`run_segmentation_benchmark` for
what is measured. An encoder is a checkpoint folder or ``random:ARCH`` (a random-init encoder of
a registered architecture, the floor any pretraining must beat).
"""

from __future__ import annotations

import copy
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omnienc.adapters.segmentation import (
    SegDecoderConfig,
    SegItem,
    dice_scores,
    evaluate_segmentation,
    items_from_pairs,
    predict_volume,
    select_structures,
    train_segmentation,
)
from omnienc.checkpoint import load_checkpoint_config, load_encoder
from omnienc.data.labeled import check_same_grid, read_label_map
from omnienc.data.root import resolve_data_root
from omnienc.encoders import RANDOM_PREFIX, Encoder, arch_name, parse_random_spec, random_encoder
from omnienc.errors import DataError
from omnienc.io import Volume, read_volume
from omnienc.preprocessing import Preprocessing

# TotalSegmentator v2 class ids of the structures scored (all present in both label maps).
STRUCTURES: dict[int, str] = {1: "spleen", 5: "liver", 6: "stomach"}
TRAIN_PAIR = ("totalsegmentator/example_ct_sm.nii.gz", "totalsegmentator/example_seg.nii.gz")
TEST_PAIR = ("totalsegmentator/example_ct_dicom", "totalsegmentator/example_seg_dicom.nii.gz")
DEFAULT_CROP = (32, 32, 32)


def real_segmentation_split(
    data_root: str | Path | None = None, preprocessing: Preprocessing | None = None
) -> tuple[list[SegItem], list[SegItem], str]:
    """The train/test split of the segmentation benchmark, on real CT from ``volumes/``.

    * **Train**: ``totalsegmentator/example_ct_sm.nii.gz`` (abdominal CT, 122 x 101 x 30 voxels
      of 3 mm, covering 90 mm along the superior axis) with its TotalSegmentator label map
      ``example_seg.nii.gz``; the decoder sees random crops of it.
    * **Test**: the 20-slice DICOM CT series ``totalsegmentator/example_ct_dicom`` (512 x 512 x
      20 voxels of 0.98 x 0.98 x 2 mm, upper abdomen, Siemens Biograph40 mCT) with
      ``example_seg_dicom.nii.gz``: a different scan from another scanner, field of view and grid,
      never seen in training. Its DICOM header is anonymised, so that it is another patient
      cannot be checked from the files; it is certainly another acquisition.
    * **Structures**: spleen (id 1), liver (5), stomach (6), renumbered 1, 2, 3; every other
      label is background. These are the large organs present in both label maps (the kidneys
      are outside the test series' 40 mm slab, so they are left out).

    Both volumes get ``preprocessing`` (the encoder's). There is no validation split: training
    runs a fixed number of steps and nothing is chosen on the test scan.

    Args:
        data_root: The shared data folder (default :func:`~omnienc.data.root.resolve_data_root`).
        preprocessing: The encoder's preprocessing (default :class:`Preprocessing`).

    Returns:
        ``(train_items, test_items, description)``; one item each.

    Raises:
        DataError: A file is missing, a pair's grids differ, or a structure is absent.
    """
    vol = resolve_data_root(data_root) / "volumes"
    pre = preprocessing or Preprocessing()
    ids = list(STRUCTURES)
    train = items_from_pairs([(vol / TRAIN_PAIR[0], vol / TRAIN_PAIR[1])], pre, structures=ids)
    test = items_from_pairs([(vol / TEST_PAIR[0], vol / TEST_PAIR[1])], pre, structures=ids)
    for item, pair in ((train[0], TRAIN_PAIR), (test[0], TEST_PAIR)):
        counts = torch.bincount(item.label.flatten(), minlength=len(ids) + 1)
        missing = [STRUCTURES[ids[i - 1]] for i in range(1, len(ids) + 1) if counts[i] == 0]
        if missing:
            raise DataError(vol / pair[1], f"structures {missing} are absent after preprocessing")
    description = (
        f"train: crops of {TRAIN_PAIR[0]} + {TRAIN_PAIR[1]}; test: the whole of {TEST_PAIR[0]} "
        f"(DICOM, another scan, scanner and grid) + {TEST_PAIR[1]}; structures "
        + ", ".join(f"{name} (TotalSegmentator id {i})" for i, name in STRUCTURES.items())
        + f"; preprocessing spacing {pre.spacing} mm; Dice on the test scan's native grid"
    )
    return train, test, description


def floor_spec_of(encoder_spec: str) -> str | None:
    """``random:ARCH`` of a checkpoint's architecture (its floor); ``None`` for a random spec."""
    if parse_random_spec(encoder_spec) is not None:
        return None
    encoder, _, _ = build_benchmark_encoder(encoder_spec, seed=0)
    return RANDOM_PREFIX + arch_name(encoder)


def summarize_runs(
    runs: Sequence[dict[str, Any]], modes: Sequence[str], names: Sequence[str]
) -> dict[str, Any]:
    """Mean and SD over seeds of each structure's Dice and of the mean Dice, per mode.

    Args:
        runs: One dict per seed and mode, with ``mode``, ``dice`` (name -> value or ``None``
            where the structure is absent) and ``mean_dice``.
        modes: The modes to summarise, e.g. ``["frozen", "fine-tune"]``.
        names: The structures.

    Returns:
        ``{mode: {name or "mean": {"mean", "sd", "n"} or None when no run has a value}}``.
    """
    summary: dict[str, Any] = {}
    for mode in modes:
        rows = [r for r in runs if r["mode"] == mode]
        table = {n: [r["dice"][n] for r in rows if r["dice"][n] is not None] for n in names}
        table["mean"] = [r["mean_dice"] for r in rows if r["mean_dice"] is not None]
        summary[mode] = {
            k: {"mean": float(np.mean(v)), "sd": float(np.std(v)), "n": len(v)} if v else None
            for k, v in table.items()
        }
    return summary


def build_benchmark_encoder(spec: str, seed: int) -> tuple[Encoder, Preprocessing, dict[str, Any]]:
    """An encoder from a checkpoint folder or ``random:ARCH``.

    Args:
        spec: Checkpoint folder, or ``random:ARCH`` with ``ARCH`` in ``ENCODERS``.
        seed: Seeds a random-init encoder (a checkpoint ignores it).

    Returns:
        ``(encoder, preprocessing, meta)``; ``meta`` is the checkpoint's (``{}`` for random).
    """
    parsed = parse_random_spec(spec)
    if parsed is not None:
        arch, spec_seed = parsed
        return random_encoder(arch, seed if spec_seed is None else spec_seed), Preprocessing(), {}
    encoder, pre = load_encoder(spec)
    return encoder, pre, load_checkpoint_config(spec).get("meta") or {}


def _native_test(data_root: Path) -> tuple[Volume, torch.Tensor]:
    """The test scan as read from disk, and its scored structures ``(X, Y, Z)`` on that grid."""
    vol = data_root / "volumes"
    image = read_volume(vol / TEST_PAIR[0])
    truth_volume = read_label_map(vol / TEST_PAIR[1])
    check_same_grid(image, truth_volume)
    truth = select_structures(torch.from_numpy(truth_volume.array).long(), list(STRUCTURES))
    return image, truth


def _native_dice(
    model: Any, pre: Preprocessing, image: Volume, truth: torch.Tensor, num_classes: int
) -> list[float]:
    """Dice per structure of the test scan, predicted and scored on its own grid."""
    pred = predict_volume(model, image, pre)
    pred_t = torch.from_numpy(pred.array).long()
    scores = dice_scores(pred_t[None, None], truth[None, None], num_classes)[0]
    return [float(v) for v in scores]


def run_segmentation_benchmark(
    encoder_spec: str,
    data_root: str | Path | None = None,
    steps: int = 300,
    seeds: Sequence[int] = (0,),
    batch_size: int = 4,
    crop_size: Sequence[int] | None = None,
    fine_tune: bool = False,
    width: int = 32,
    lr: float = 1e-3,
    progress: bool = False,
) -> dict[str, Any]:
    """Train and test the segmentation adapter of one encoder on :func:`real_segmentation_split`.

    For every seed a decoder is trained on a frozen copy of the encoder (and, with
    ``fine_tune``, a second run trains a copy of the encoder too, at 0.1 x ``lr``); a
    ``random:ARCH`` encoder is re-drawn with each seed. Each run is scored on the test scan twice:
    on its native grid (``dice``, the headline: the prediction resampled back as
    :func:`~omnienc.adapters.segmentation.predict_volume` does) and on the preprocessed grid
    (``dice_preprocessed``).

    Args:
        encoder_spec: Checkpoint folder or ``random:ARCH``.
        data_root: The shared data folder.
        steps: Optimizer steps per run.
        seeds: One run per seed (decoder init, crops, random encoder).
        batch_size: Crops per step.
        crop_size: Training crop and sliding window (default: the checkpoint's pretraining crop,
            else 32^3).
        fine_tune: Also fine-tune the encoder.
        width: Decoder width.
        lr: Decoder learning rate.
        progress: Show progress bars.

    Returns:
        A JSON-able dict: ``encoder``, ``split`` (the description), ``structures``, the settings,
        ``runs`` (one per seed and mode with ``dice``, ``mean_dice``, ``dice_preprocessed``,
        ``final_loss``, ``train_seconds``), ``summary`` (per mode: mean and SD over seeds of each
        structure's Dice and of the mean), ``seconds`` (wall time of everything) and ``machine``.
    """
    start = time.perf_counter()
    root = resolve_data_root(data_root)
    _, pre, meta = build_benchmark_encoder(encoder_spec, seed=0)
    crop = tuple(int(s) for s in (crop_size or meta.get("crop_size") or DEFAULT_CROP))
    train_items, test_items, description = real_segmentation_split(root, pre)
    test_image, test_truth = _native_test(root)
    names = list(STRUCTURES.values())
    modes = ["frozen", "fine-tune"] if fine_tune else ["frozen"]
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        encoder, _, _ = build_benchmark_encoder(encoder_spec, seed)
        for mode in modes:
            config = SegDecoderConfig(
                num_classes=len(STRUCTURES) + 1,
                width=width,
                lr=lr,
                freeze_encoder=mode == "frozen",
            )
            model, history = train_segmentation(
                copy.deepcopy(encoder),
                train_items,
                None,
                config,
                crop,
                steps,
                batch_size=batch_size,
                seed=seed,
                progress=progress,
            )
            model.cpu()
            native = _native_dice(model, pre, test_image, test_truth, config.num_classes)
            on_pre = evaluate_segmentation(model, test_items, names)
            runs.append(
                {
                    "seed": int(seed),
                    "mode": mode,
                    "dice": dict(zip(names, native, strict=True)),
                    "mean_dice": float(np.mean(native)),
                    "dice_preprocessed": on_pre["dice"],
                    "final_loss": float(np.mean(history["loss"][-10:])),
                    "train_seconds": round(history["seconds"], 1),
                }
            )
    summary = summarize_runs(runs, modes, names)
    return {
        "encoder": encoder_spec,
        "split": description,
        "structures": {str(i): n for i, n in STRUCTURES.items()},
        "steps": steps,
        "batch_size": batch_size,
        "crop_size": list(crop),
        "width": width,
        "lr": lr,
        "seeds": [int(s) for s in seeds],
        "runs": runs,
        "summary": summary,
        "seconds": round(time.perf_counter() - start, 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
    }


def run_segmentation_suite(
    encoder_spec: str,
    *,
    floor: bool = True,
    fine_tune: bool = True,
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 300,
    data_root: str | Path | None = None,
    progress: bool = False,
    log: Any = print,
) -> dict[str, Any]:
    """The encoder under test and its random-init floor, each frozen and (optionally) trained.

    With ``fine_tune``, the floor's trained run is the supervised-from-scratch baseline (a
    random-init encoder of the same architecture trained end-to-end with the decoder).

    Returns:
        ``{"encoder", "floor", "benchmarks": [run_segmentation_benchmark payloads], "seconds"}``.
    """
    start = time.perf_counter()
    floor_spec = floor_spec_of(encoder_spec) if floor else None
    specs = [encoder_spec] + ([floor_spec] if floor_spec else [])
    payloads = []
    for spec in specs:
        payload = run_segmentation_benchmark(
            spec, data_root, steps=steps, seeds=seeds, fine_tune=fine_tune, progress=progress
        )
        for mode, summary in payload["summary"].items():
            log(
                f"segmentation | {spec} {mode}: mean Dice {summary['mean']['mean']:.3f} "
                f"(liver {summary['liver']['mean']:.3f})"
            )
        payloads.append(payload)
    return {
        "encoder": encoder_spec,
        "floor": floor_spec,
        "benchmarks": payloads,
        "seconds": round(time.perf_counter() - start, 1),
    }


def format_segmentation_markdown(suite: dict[str, Any]) -> str:
    """A Markdown section for :func:`run_segmentation_suite`'s result."""
    first = suite["benchmarks"][0]
    names = list(first["structures"].values())
    lines = [
        "## Segmentation: decoder on one labelled CT, tested on another",
        "",
        f"Split: {first['split']}.  ",
        f"Each run: {first['steps']} steps of {first['batch_size']} crops of "
        f"{first['crop_size'][0]}^3, decoder width {first['width']}, lr {first['lr']:g} "
        f"(fine-tuned encoders at 0.1x); Dice on the test scan's native grid, mean ± SD over "
        f"seeds {first['seeds']}; {suite['seconds'] / 60:.1f} min in all.",
        "",
        "| encoder | encoder training | " + " | ".join(names) + " | mean |",
        "|---|---|" + "---:|" * (len(names) + 1),
    ]
    for payload in suite["benchmarks"]:
        random = payload["encoder"].startswith(RANDOM_PREFIX)
        who = "random-init" if random else "**pretrained**"
        for mode, summary in payload["summary"].items():
            how = (
                "frozen" if mode == "frozen" else "trained from scratch" if random else "fine-tuned"
            )
            cells = [f"{summary[k]['mean']:.3f} ± {summary[k]['sd']:.3f}" for k in [*names, "mean"]]
            lines.append(f"| {who} (`{payload['encoder']}`) | {how} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
