"""Names of the structures in TotalSegmentator label maps.

The label maps in ``volumes/totalsegmentator`` use TotalSegmentator's class ids: the CT maps
(``example_seg*``) the v2 ``total`` task (117 classes), the MR map (``example_seg_mr``) the
``total_mr`` task (50 classes). The tables below follow ``class_map`` in TotalSegmentator's
``totalsegmentator/map_to_binary.py``; they are built from runs (vertebrae, ribs) rather than
spelled out, and a test checks the ids the real files contain.

>>> TOTALSEG_CT[5], TOTALSEG_MR[10]
('liver', 'lung_left')
"""

from __future__ import annotations

from pathlib import Path


def _vertebrae() -> list[str]:
    """``S1, L5..L1, T12..T1, C7..C1``, the order TotalSegmentator v2 numbers them in."""
    return (
        ["vertebrae_S1"]
        + [f"vertebrae_L{i}" for i in range(5, 0, -1)]
        + [f"vertebrae_T{i}" for i in range(12, 0, -1)]
        + [f"vertebrae_C{i}" for i in range(7, 0, -1)]
    )


def _pairs(*names: str) -> list[str]:
    """``name_left, name_right`` for each name (the order both tasks use)."""
    return [f"{n}_{side}" for n in names for side in ("left", "right")]


_ABDOMEN = [
    "spleen",
    "kidney_right",
    "kidney_left",
    "gallbladder",
    "liver",
    "stomach",
    "pancreas",
    "adrenal_gland_right",
    "adrenal_gland_left",
]
_LIMB_GIRDLE = _pairs("humerus", "scapula", "clavicula", "femur", "hip")
_MUSCLES = _pairs("gluteus_maximus", "gluteus_medius", "gluteus_minimus", "autochthon", "iliopsoas")

_CT_NAMES: list[str] = [
    *_ABDOMEN,
    "lung_upper_lobe_left",
    "lung_lower_lobe_left",
    "lung_upper_lobe_right",
    "lung_middle_lobe_right",
    "lung_lower_lobe_right",
    "esophagus",
    "trachea",
    "thyroid_gland",
    "small_bowel",
    "duodenum",
    "colon",
    "urinary_bladder",
    "prostate",
    "kidney_cyst_left",
    "kidney_cyst_right",
    "sacrum",
    *_vertebrae(),
    "heart",
    "aorta",
    "pulmonary_vein",
    "brachiocephalic_trunk",
    "subclavian_artery_right",
    "subclavian_artery_left",
    "common_carotid_artery_right",
    "common_carotid_artery_left",
    "brachiocephalic_vein_left",
    "brachiocephalic_vein_right",
    "atrial_appendage_left",
    "superior_vena_cava",
    "inferior_vena_cava",
    "portal_vein_and_splenic_vein",
    *_pairs("iliac_artery", "iliac_vena"),
    *_LIMB_GIRDLE,
    "spinal_cord",
    *_MUSCLES,
    "brain",
    "skull",
    *[f"rib_left_{i}" for i in range(1, 13)],
    *[f"rib_right_{i}" for i in range(1, 13)],
    "sternum",
    "costal_cartilages",
]

_MR_NAMES: list[str] = [
    *_ABDOMEN,
    "lung_left",
    "lung_right",
    "esophagus",
    "small_bowel",
    "duodenum",
    "colon",
    "urinary_bladder",
    "prostate",
    "sacrum",
    "vertebrae",
    "intervertebral_discs",
    "spinal_cord",
    "heart",
    "aorta",
    "inferior_vena_cava",
    "portal_vein_and_splenic_vein",
    *_pairs("iliac_artery", "iliac_vena"),
    *_LIMB_GIRDLE,
    *_MUSCLES,
    "brain",
]

TOTALSEG_CT: dict[int, str] = dict(enumerate(_CT_NAMES, start=1))
"""TotalSegmentator v2 ``total`` (CT): class id -> structure name, ids 1..117."""

TOTALSEG_MR: dict[int, str] = dict(enumerate(_MR_NAMES, start=1))
"""TotalSegmentator ``total_mr`` (MR): class id -> structure name, ids 1..50."""


def structure_names(label_path: str | Path) -> dict[int, str]:
    """The id -> name table for a TotalSegmentator label map, chosen by its file name.

    Files whose name contains ``_mr`` use the MR table, every other one the CT table.

    Args:
        label_path: The label map's path.

    Returns:
        The class id -> name table.
    """
    return TOTALSEG_MR if "_mr" in Path(label_path).name else TOTALSEG_CT


def readable(name: str) -> str:
    """A structure name as words: ``'adrenal_gland_left'`` -> ``'left adrenal gland'``."""
    words = name.split("_")
    side = [w for w in words if w in ("left", "right")]
    rest = [w for w in words if w not in ("left", "right")]
    return " ".join(side + rest)
