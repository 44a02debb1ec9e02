"""BraTS cases for the label-efficiency benchmark: decoder classes, rotations, native-grid Dice.

Each case is read and preprocessed once (:func:`prepare_cases`) and reused by every method and
rotation. The decoder predicts three nested classes built from the BraTS labels
(:data:`omnienc.data.brats.TUMOUR_REGIONS`): 0 background, 1 the whole tumour outside the core
(oedema, label 2), 2 the tumour core (labels 1, 3, 4); the scored regions are read back from
them: whole tumour = class 1 or 2, tumour core = class 2. One softmax decoder thus predicts both
regions and they stay nested (the core is always inside the whole tumour).

Dice is scored on each test case's native grid (240 x 240 x 155 at 1 mm): the sliding-window
probabilities on the encoder's 2 mm grid are resampled onto the native voxels (trilinear, class
by class, argmax: :func:`omnienc.adapters.segmentation.resample_argmax`) inside the native box
that the preprocessed field of view covers; outside it (no brain there, the preprocessing crops
to the brain with a margin) the prediction is background.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from omnienc.adapters.segmentation import SegItem, resample_argmax, sliding_window_probabilities
from omnienc.data.brats import TUMOUR_REGIONS, BratsCase, find_brats_cases, tumour_region
from omnienc.errors import DataError
from omnienc.preprocessing import Preprocessing
from omnienc.transforms import preprocess_volume

SEQUENCE = "flair"  # the input channel (the encoder takes one)
OUTER, INNER = "whole_tumour", "tumour_core"  # the scored regions, the core inside the whole
SCORED_REGIONS = (OUTER, INNER)
REGION_KEYS = {OUTER: "wt", INNER: "tc"}  # short names for metric keys
CLASS_NAMES = ("background", "whole tumour outside the core", "tumour core")
if not set(TUMOUR_REGIONS[INNER]) < set(TUMOUR_REGIONS[OUTER]):  # pragma: no cover
    raise AssertionError("the class scheme needs the tumour core inside the whole tumour")


def tumour_classes(labels: np.ndarray) -> np.ndarray:
    """The decoder's classes of BraTS labels.

    Args:
        labels: ``(X, Y, Z)`` integer labels 0..4.

    Returns:
        ``(X, Y, Z)`` int64: 0 background, 1 whole tumour outside the core (label 2),
        2 tumour core (labels 1, 3, 4).
    """
    classes = np.zeros(labels.shape, np.int64)
    classes[tumour_region(labels, OUTER)] = 1
    classes[tumour_region(labels, INNER)] = 2
    return classes


def regions_of_classes(classes: np.ndarray) -> dict[str, np.ndarray]:
    """The scored regions of a class map (of :func:`tumour_classes` or a prediction).

    Args:
        classes: ``(X, Y, Z)`` classes 0..2.

    Returns:
        ``{"whole_tumour": (X, Y, Z) bool, "tumour_core": (X, Y, Z) bool}``.
    """
    return {OUTER: classes >= 1, INNER: classes == 2}


@dataclass
class PreparedCase:
    """One case, preprocessed once for every run.

    Attributes:
        name: The case folder's name.
        item: FLAIR ``(1, X', Y', Z')`` and classes ``(1, X', Y', Z')`` on the encoder's grid.
        affine: ``(4, 4)`` voxel-to-world matrix of that grid.
        native_classes: ``(X, Y, Z)`` uint8 classes on the file's own grid.
        native_affine: ``(4, 4)`` voxel-to-world matrix of the file's grid.
        files: ``{path relative to the data root's brats folder: file}`` of the files used.
    """

    name: str
    item: SegItem
    affine: np.ndarray
    native_classes: np.ndarray
    native_affine: np.ndarray
    files: dict[str, Path]

    def voxels(self) -> dict[str, int]:
        """Voxels of each scored region on the native grid."""
        return {r: int(m.sum()) for r, m in regions_of_classes(self.native_classes).items()}


def prepare_case(case: BratsCase, preprocessing: Preprocessing) -> PreparedCase:
    """Read one case's FLAIR and labels, check them, and preprocess them together.

    Raises:
        DataError: The label grid differs from the image's, or a label is outside 0..4 (the
            message names the label file).
        VolumeReadError: A file cannot be read.
    """
    image = case.read_image(SEQUENCE)
    classes = tumour_classes(case.read_labels(image))
    out = preprocess_volume(image, preprocessing, label=classes)
    item = SegItem(torch.from_numpy(out["image"]), torch.from_numpy(out["label"]), case.name)
    files = {f"{case.name}/{p.name}": p for p in (case.image_path(SEQUENCE), case.label_path)}
    return PreparedCase(
        case.name, item, out["affine"], classes.astype(np.uint8), image.affine.copy(), files
    )


def prepare_cases(data_root: str | Path, preprocessing: Preprocessing) -> list[PreparedCase]:
    """Every BraTS case under ``data_root``, preprocessed (sorted by name).

    Raises:
        DataError: Fewer than two cases (nothing to train on and test on), or a bad case.
    """
    cases = find_brats_cases(data_root)
    if len(cases) < 2:
        raise DataError(
            cases[0].folder.parent,
            f"found {len(cases)} BraTS case ({cases[0].name}); label efficiency needs at least "
            "2 (decoders train on some cases and are tested on the others)",
        )
    return [prepare_case(c, preprocessing) for c in cases]


@dataclass(frozen=True)
class Rotation:
    """One split of the cases: train on ``train``, test on every other case.

    Attributes:
        n_train: Labelled training cases.
        index: Rank among the rotations of this ``n_train``.
        train: Training case names.
        test: Test case names (the rest; never one of ``train``).
    """

    n_train: int
    index: int
    train: tuple[str, ...]
    test: tuple[str, ...]


def label_rotations(
    names: Sequence[str], n_train: int, n_rotations: int, seed: int = 0
) -> list[Rotation]:
    """Seeded training subsets of ``n_train`` cases, the other cases as their test set.

    The subsets are distinct; among the ``C(N, n_train)`` possible ones (in a seeded order), each
    next one is the first that tests the most cases not tested so far, so that few rotations
    still test every case (with 4 cases and 2 rotations of 2, the second is the first's
    complement).

    Args:
        names: Case names, ``N >= 2`` distinct.
        n_train: Training cases per rotation, ``1 <= n_train < N``.
        n_rotations: Rotations wanted (at most ``C(N, n_train)`` are returned).
        seed: Orders the subsets.

    Returns:
        The rotations, ``index`` 0, 1, ...

    Raises:
        ValueError: Bad ``n_train`` or ``n_rotations``, or repeated names.
    """
    names = list(names)
    if len(set(names)) != len(names):
        raise ValueError(f"case names must be distinct, got {names}")
    if not 1 <= n_train < len(names):
        raise ValueError(
            f"n_train must be in 1..{len(names) - 1} (one case at least is tested), got {n_train}"
        )
    if n_rotations < 1:
        raise ValueError(f"n_rotations must be >= 1, got {n_rotations}")
    combos = list(itertools.combinations(sorted(names), n_train))
    order = np.random.default_rng([seed, n_train]).permutation(len(combos))
    pool = [combos[i] for i in order]
    tested: set[str] = set()
    out: list[Rotation] = []
    while pool and len(out) < n_rotations:
        best = max(pool, key=lambda c: len(set(names) - set(c) - tested))  # first of the best
        pool.remove(best)
        test = tuple(n for n in sorted(names) if n not in best)
        tested.update(test)
        out.append(Rotation(n_train, len(out), best, test))
    return out


def dice(pred: np.ndarray, truth: np.ndarray) -> float | None:
    """Dice of two boolean arrays; ``None`` when ``truth`` is empty (the region is absent)."""
    n_truth = int(truth.sum())
    if n_truth == 0:
        return None
    return 2.0 * int(np.logical_and(pred, truth).sum()) / (int(pred.sum()) + n_truth)


def _native_box(case: PreparedCase) -> tuple[tuple[slice, ...], np.ndarray, tuple[int, ...]]:
    """The native voxels the preprocessed grid covers: slices, the box's affine, its shape."""
    shape = np.array(case.item.image.shape[1:])
    corners = np.array(list(itertools.product(*[(-0.5, s - 0.5) for s in shape])))  # (8, 3)
    world = np.c_[corners, np.ones(8)] @ case.affine.T
    native = world @ np.linalg.inv(case.native_affine).T
    full = np.array(case.native_classes.shape)
    lo = np.clip(np.floor(native[:, :3].min(0)).astype(int), 0, full)
    hi = np.clip(np.ceil(native[:, :3].max(0)).astype(int) + 1, lo, full)
    shift = np.eye(4)
    shift[:3, 3] = lo
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    return box, case.native_affine @ shift, tuple(int(v) for v in hi - lo)


def predict_native(
    model: nn.Module,
    case: PreparedCase,
    roi_size: Sequence[int],
    overlap: float = 0.25,
    sw_batch_size: int = 4,
) -> np.ndarray:
    """A model's classes for one case on its native grid.

    Args:
        model: Maps ``(n, 1, *roi_size)`` to ``(n, 3, *roi_size)`` logits, in eval mode.
        case: The case.
        roi_size: Sliding window (the training crop).
        overlap: Window overlap.
        sw_batch_size: Windows per forward pass.

    Returns:
        ``(X, Y, Z)`` uint8 classes on the native grid (background outside the preprocessed
        field of view).
    """
    with torch.inference_mode():
        prob = sliding_window_probabilities(
            model, case.item.image[None], roi_size, overlap, sw_batch_size
        )[0]
    return to_native(prob, case)


def to_native(prob: torch.Tensor, case: PreparedCase) -> np.ndarray:
    """Class probabilities on the case's preprocessed grid -> classes on its native grid.

    Args:
        prob: ``(K, X', Y', Z')`` probabilities on the grid of ``case.item``.
        case: The case.

    Returns:
        ``(X, Y, Z)`` uint8 argmax classes; background outside the preprocessed field of view.
    """
    box, affine, shape = _native_box(case)
    pred = np.zeros(case.native_classes.shape, np.uint8)
    pred[box] = resample_argmax(prob, case.affine, shape, affine)
    return pred


def native_dice(pred: np.ndarray, case: PreparedCase) -> dict[str, float | None]:
    """Dice of each scored region of a native-grid class map against the case's labels."""
    truth = regions_of_classes(case.native_classes)
    return {r: dice(m, truth[r]) for r, m in regions_of_classes(pred).items()}


def case_bootstrap(
    per_case: Mapping[str, Sequence[float]],
    n_boot: int = 2000,
    seed: int = 0,
    min_cases: int = 3,
) -> tuple[float, float] | None:
    """95% percentile interval of the mean Dice, resampling test cases.

    Each case's value is the mean of its Dice over the rotations that tested it; the cases are
    resampled with replacement.

    Args:
        per_case: ``{case: [Dice in each rotation that tested it]}``.
        n_boot: Resamples.
        seed: Seeds them.
        min_cases: Fewest distinct cases for an interval (below it: ``None``).

    Returns:
        ``(low, high)`` or ``None``.
    """
    values = np.array([float(np.mean(v)) for v in per_case.values() if len(v)])
    if len(values) < min_cases:
        return None
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n_boot, len(values)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)
