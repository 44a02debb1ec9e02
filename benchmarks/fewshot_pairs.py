"""The few-shot benchmark's catalogue: which labelled scans pair, which do not, and why.

A pair is a support scan and a query scan of the same modality, body region (and MR sequence)
from two different subjects; the body region and the subject are stated here, since neither can
be read from the voxels. :data:`CATALOGUE` lists every labelled scan of ``../shared/data`` that
pairs with another one (paths below ``volumes/``), :data:`EXCLUDED` every labelled file that does
not, with the reason. :func:`cross_queries` turns the catalogue into ordered (supports, query)
scan sets; a structure is scored on a set when every scan holds at least ``min_voxels`` of it
on its native grid (the runner checks the voxels).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from omnienc.data.brats import SEQUENCES, TUMOUR_REGIONS
from omnienc.data.labelnames import TOTALSEG_CT


@dataclass(frozen=True)
class Structure:
    """A structure or label group: the union of some label values.

    Attributes:
        name: Its name in tables (a TotalSegmentator class, a BraTS region, ``lesion``).
        ids: The label values that make it up.
    """

    name: str
    ids: tuple[int, ...]


@dataclass(frozen=True)
class LabelledScan:
    """One labelled scan of the catalogue.

    Attributes:
        key: Short unique name used in results (``ct_sm``, ``brats_2013_pat0003_1/flair``).
        image: The image below ``volumes/``: a file or a DICOM series folder.
        labels: Its label map below ``volumes/``, on the image's voxel grid.
        modality: ``CT`` or ``MR`` (given, not inferred).
        region: Body region covered.
        group: Scans pair only within a group (modality, region and MR sequence).
        subject: Who was scanned; two scans of one subject never pair.
        structures: The structures it may be scored on.
        brats_case: The BraTS case folder name when the scan is read through
            :mod:`omnienc.data.brats` (labels checked to be 0..4).
    """

    key: str
    image: str
    labels: str
    modality: str
    region: str
    group: str
    subject: str
    structures: tuple[Structure, ...]
    brats_case: str | None = None


# Every class of TotalSegmentator v2's `total` task; --min-voxels decides which are scored.
TOTALSEG_STRUCTURES = tuple(Structure(name, (i,)) for i, name in TOTALSEG_CT.items())
BRATS_STRUCTURES = tuple(Structure(name, ids) for name, ids in TUMOUR_REGIONS.items())
LESION = (Structure("lesion", (1,)),)
BRATS_CASES = (
    "brats_2013_pat0003_1",
    "brats_2013_pat0004_1",
    "brats_2013_pat0005_1",
    "brats_2013_pat0006_1",
)
BRATS_GROUPS = {"flair": "BraTS-FLAIR", "t1c": "BraTS-T1c"}

CATALOGUE: tuple[LabelledScan, ...] = (
    LabelledScan(
        "ct_sm",
        "totalsegmentator/example_ct_sm.nii.gz",
        "totalsegmentator/example_seg.nii.gz",
        "CT",
        "abdomen",
        "CT",
        "totalsegmentator example_ct",
        TOTALSEG_STRUCTURES,
    ),
    LabelledScan(
        "ct_dicom",
        "totalsegmentator/example_ct_dicom",
        "totalsegmentator/example_seg_dicom.nii.gz",
        "CT",
        "abdomen",
        "CT",
        "totalsegmentator example_ct_dicom (another acquisition: scanner, field of view, grid)",
        TOTALSEG_STRUCTURES,
    ),
    *(
        LabelledScan(
            f"{case}/{seq}",
            f"brats/{case}/{SEQUENCES[seq]}",
            f"brats/{case}/OTMultiClass.nii.gz",
            "MR",
            "brain",
            BRATS_GROUPS[seq],
            case,
            BRATS_STRUCTURES,
            brats_case=case,
        )
        for seq in BRATS_GROUPS
        for case in BRATS_CASES
    ),
    *(
        LabelledScan(
            f"pyradiomics_{name}",
            f"pyradiomics/{name}_image.nrrd",
            f"pyradiomics/{name}_label.nrrd",
            "MR",
            "brain",
            "brain lesion",
            f"pyradiomics {name}",
            LESION,
        )
        for name in ("brain1", "brain2")
    ),
)

EXCLUDED: tuple[tuple[str, str], ...] = (
    (
        "totalsegmentator/example_ct.nii.gz",
        "no label map; example_ct_sm is a 30-slice crop of this very scan, so it is not a "
        "second subject",
    ),
    (
        "totalsegmentator/example_seg_fast.nii.gz",
        "a second (--fast) label map of example_ct_sm, not another scan",
    ),
    (
        "totalsegmentator/example_mr_sm.nii.gz + example_seg_mr.nii.gz",
        "the only labelled abdominal MR: nothing to pair with (CT is another modality)",
    ),
    (
        "totalsegmentator/pulmonary_ct_cropped.nii.gz + pulmonary_artery_seg.nii.gz",
        "the only labelled chest CT, and its one label (pulmonary artery) is no class of the "
        "abdominal CTs' label maps",
    ),
    (
        "dcmqi/ct-3slice + liver_seg / spine_seg / heart_seg / liver_spine_seg.nrrd",
        "3 slices of 1 mm (under 2 voxels at the encoder's 2 mm): too thin to pair with a 3D CT",
    ),
    (
        "monai/anatomical.nii + reoriented_anat_moved.nii (+ _label)",
        "one subject (the second is a moved, 4 mm resampling of the first, and "
        "nibabel/anatomical.nii is the same file): never a cross-scan pair",
    ),
    (
        "pyradiomics/breast1, pyradiomics/prostate_phantom_subvolume",
        "one labelled breast MR and one phantom: nothing of their kind to pair with",
    ),
    (
        "pyradiomics/brain1, brain2 x BraTS",
        "another lesion definition (one binary label vs the BraTS regions) and an unstated "
        "sequence at 6.5 mm slices: kept as their own group",
    ),
    (
        "BraTS FLAIR x T1c",
        "different MR contrasts: each sequence is its own group (and FLAIR -> T1c of one case "
        "would join one subject twice)",
    ),
    (
        "spm12/labels_Neuromorphometrics.nii, niivue/mni152_pveseg.nii.gz",
        "atlas / tissue maps of population templates, not scans",
    ),
    (
        "niivue/aparc.a2009s+aseg.mgz (+ norm.mgz)",
        "the only brain with a FreeSurfer parcellation: nothing to pair with",
    ),
    ("niivue/torsoLabel.nii.gz", "a label map whose image is not on these machines"),
)

# --quick: both CT directions, four BraTS FLAIR pairs on the whole tumour, both brain lesions.
# (as (support, query) indices into BRATS_CASES)
QUICK_BRATS_PAIRS = ((0, 1), (1, 0), (2, 3), (3, 2))


def scans_by_key(catalogue: Sequence[LabelledScan] = CATALOGUE) -> dict[str, LabelledScan]:
    """The catalogue as ``{key: scan}`` (keys are unique)."""
    out = {s.key: s for s in catalogue}
    if len(out) != len(catalogue):
        raise ValueError("catalogue keys must be unique")
    return out


def cross_queries(
    catalogue: Sequence[LabelledScan] = CATALOGUE, shots: int = 1
) -> list[tuple[tuple[str, ...], str]]:
    """Every (supports, query) set of scans for ``shots``-shot segmentation.

    For each query, the candidates are the other scans of its group from other subjects; with
    ``k = min(shots, candidates)`` every ``k``-subset of them is a support set (sorted), so one
    shot gives every ordered pair.

    Args:
        catalogue: The scans.
        shots: Supports per query, >= 1.

    Returns:
        ``[((support keys...), query key), ...]``, grouped by the catalogue's order.
    """
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    out = []
    for query in catalogue:
        others = [
            s.key
            for s in catalogue
            if s.group == query.group and s.subject != query.subject and s.key != query.key
        ]
        k = min(shots, len(others))
        out += [(combo, query.key) for combo in itertools.combinations(others, k)] if k else []
    return out


def in_quick_subset(group: str, supports: Sequence[str], query: str, structure: str) -> bool:
    """Whether a cross-scan query belongs to ``--quick``'s fixed subset (see the module)."""
    if group in ("CT", "brain lesion"):
        return True
    if group != "BraTS-FLAIR" or structure != "whole_tumour":
        return False
    if len(supports) > 1:  # k-shot: every whole-tumour FLAIR query (4 at 3 shots)
        return True
    case = {f"{c}/flair": i for i, c in enumerate(BRATS_CASES)}
    return (case.get(supports[0], -1), case.get(query, -1)) in QUICK_BRATS_PAIRS
