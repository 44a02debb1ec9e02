"""What a label map is: the rule that tells a segmentation from an image in a folder scan.

A volume is a label map when its voxels are integers with few distinct values, whatever its data
type: BraTS ships its tumour labels (``OTMultiClass``) and brain masks as float32 holding 0..4
and 0/1, and they are label maps like any uint8 segmentation. A segmentation-like name
(``seg``, ``label``, ``mask``, ``aseg``, ...) allows more values. A file named like a label map
whose values are not integers is neither a label map nor an image to pretrain on (a probability
map, or a label map resampled with linear interpolation): :func:`classify_volume` refuses it.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from omnienc.errors import DataError

# Name tokens of segmentations (BIDS dseg, FreeSurfer aseg/aparc/wm/ribbon, "seg", "label", ...).
LABEL_TOKENS = frozenset(
    {
        "seg",
        "dseg",
        "pveseg",
        "label",
        "labels",
        "labelmap",
        "mask",
        "aseg",
        "aparc",
        "wmparc",
        "parc",
        "ribbon",
        "filled",
        "wm",
    }
)
# An integer volume with at most this many values is a label map whatever its name.
LABEL_MAX_VALUES = 64
# With a segmentation-like name, up to this many values (FreeSurfer parcellations have ~190).
NAMED_LABEL_MAX_VALUES = 1024
# Integer checks look at about this many voxels (a strided sample) of large volumes.
_SAMPLE = 1_000_000


def name_tokens(path: Path) -> set[str]:
    """Lower-case alphanumeric tokens of a name: ``brain1_label.nrrd`` -> brain1, label, nrrd."""
    return set(re.split(r"[^a-z0-9]+", path.name.lower())) - {""}


def label_tokens(path: Path) -> set[str]:
    """The segmentation tokens (:data:`LABEL_TOKENS`) in ``path``'s name."""
    return name_tokens(path) & LABEL_TOKENS


def _sample(array: np.ndarray) -> np.ndarray:
    return array.reshape(-1)[:: max(1, array.size // _SAMPLE)]


def is_label_map(array: np.ndarray, path: Path) -> bool:
    """Whether a volume looks like a segmentation rather than an image.

    Integer-valued volumes (of any data type, float32 included) with at most 64 distinct values
    are label maps; so are integer-valued volumes with up to 1024 values whose name has a
    segmentation token (``seg``, ``label``, ``mask``, ``aseg``, ``aparc``, ``wm``, ...).

    Args:
        array: ``(X, Y, Z)`` voxels.
        path: The file, for its name.
    """
    sample = _sample(array)
    if not np.array_equal(sample, np.round(sample)):
        return False
    n_values = len(np.unique(sample))
    if n_values <= LABEL_MAX_VALUES:
        return True
    return bool(label_tokens(path)) and n_values <= NAMED_LABEL_MAX_VALUES


def classify_volume(array: np.ndarray, path: Path) -> str:
    """``label`` or ``image`` for a folder scan (see :func:`is_label_map`).

    Args:
        array: ``(X, Y, Z)`` voxels.
        path: The file, for its name and the message.

    Returns:
        ``"label"`` or ``"image"``.

    Raises:
        DataError: The name says label map but the values are not integers; the message names
            the file, the token and an offending value.
    """
    if is_label_map(array, path):
        return "label"
    tokens = label_tokens(path)
    if tokens:
        sample = _sample(array)
        fractional = sample[sample != np.round(sample)]
        if fractional.size:
            token = sorted(tokens)[0]
            raise DataError(
                path,
                f"named like a label map ({token!r} in its name) but holds non-integer values "
                f"(e.g. {float(fractional[0]):.4g}): a probability map, or a label map "
                "resampled with linear interpolation? Neither a label map nor an image to "
                "train on: round it (or resample it with nearest neighbour), or rename it if "
                "it is an image",
            )
    return "image"
