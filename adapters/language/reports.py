"""The templated text of the language adapter's built-in sources, and its parsers.

No radiology reports can be reached on these machines, so the built-in sources write their text
from real labels and metadata with fixed templates (:func:`crop_report`, :func:`adrenal_report`,
the terms in :data:`TERM_ORDER`); the parsers read the terms back from generated text, so a
generated report can be scored against the truth term by term.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

# (TotalSegmentator structure name pattern, report term). Names matching no rule are not named
# in the text: ribs, costal cartilages, muscles, veins, spinal cord, limb bones. They are many
# small structures that would make every crop's text long without saying more about the organs.
_TERM_RULES: tuple[tuple[str, str], ...] = (
    (r"lung_.*", "lung"),
    (r"heart|atrial_appendage_left", "heart"),
    (r"aorta", "aorta"),
    (r"pulmonary_artery", "pulmonary artery"),
    (r"liver", "liver"),
    (r"gallbladder", "gallbladder"),
    (r"spleen", "spleen"),
    (r"stomach", "stomach"),
    (r"pancreas", "pancreas"),
    (r"adrenal_gland_(left|right)", "adrenal gland"),
    (r"kidney_(left|right|cyst_left|cyst_right)", "kidney"),
    (r"duodenum|small_bowel|colon", "bowel"),
    (r"urinary_bladder", "bladder"),
    (r"prostate", "prostate"),
    (r"vertebrae(_[CTLS]\d+)?|sacrum|intervertebral_discs", "spine"),
    (r"esophagus", "esophagus"),
    (r"trachea", "trachea"),
    (r"thyroid_gland", "thyroid gland"),
    (r"brain", "brain"),
)
TERM_ORDER: tuple[str, ...] = tuple(dict.fromkeys(term for _, term in _TERM_RULES))
"""The report terms, in the order a text lists them (head to pelvis, organs before the spine)."""


def report_term(name: str) -> str | None:
    """The report term of a TotalSegmentator structure name, or ``None`` if texts omit it.

    >>> report_term("kidney_left"), report_term("vertebrae_L1"), report_term("rib_left_7")
    ('kidney', 'spine', None)
    """
    for pattern, term in _TERM_RULES:
        if re.fullmatch(pattern, name):
            return term
    return None


def crop_report(modality: str, region: str, terms: Sequence[str]) -> str:
    """The templated text of a crop, e.g. ``"CT of the abdomen. Structures: liver, spleen."``."""
    return f"{modality} of the {region}. Structures: {', '.join(terms) if terms else 'none'}."


def adrenal_report(class_name: str) -> str:
    """The templated text of an AdrenalMNIST3D item, e.g. ``"... shape mask: normal."``."""
    return f"AdrenalMNIST3D adrenal shape mask: {class_name}."


def parse_crop_report(text: str) -> dict[str, Any]:
    """Read modality, region and structures back from a (generated) crop text.

    Args:
        text: Text in the form :func:`crop_report` writes; anything else parses partly or not.

    Returns:
        ``{"modality": str | None, "region": str | None, "structures": set of terms}``. Words
        after ``Structures:`` that are not report terms are dropped.
    """
    m = re.match(r"\s*(\S+) of the ([a-z ]+?)\.", text)
    structures: set[str] = set()
    s = re.search(r"Structures:(.*?)(\.|$)", text)
    if s:
        words = {w.strip() for w in s.group(1).split(",")}
        structures = {w for w in words if w in TERM_ORDER}
    return {
        "modality": m.group(1) if m else None,
        "region": m.group(2) if m else None,
        "structures": structures,
    }


def parse_adrenal_report(text: str, class_names: Sequence[str]) -> str | None:
    """The class name a (generated) AdrenalMNIST3D text states, or ``None``."""
    m = re.search(r"shape mask:\s*([a-z ]+?)\s*(\.|$)", text)
    if m and m.group(1) in class_names:
        return m.group(1)
    return None
