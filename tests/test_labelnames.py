"""The TotalSegmentator name tables against known ids and the real label maps."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from omnienc.data.labelnames import TOTALSEG_CT, TOTALSEG_MR, readable, structure_names


def test_tables_have_totalsegmentators_ids() -> None:
    assert len(TOTALSEG_CT) == 117 and len(TOTALSEG_MR) == 50
    ct = {
        1: "spleen", 5: "liver", 7: "pancreas", 25: "sacrum", 26: "vertebrae_S1",
        27: "vertebrae_L5", 50: "vertebrae_C1", 51: "heart", 52: "aorta",
        64: "portal_vein_and_splenic_vein", 65: "iliac_artery_left", 68: "iliac_vena_right",
        69: "humerus_left", 78: "hip_right", 79: "spinal_cord", 86: "autochthon_left",
        89: "iliopsoas_right", 90: "brain", 91: "skull", 92: "rib_left_1",
        115: "rib_right_12", 116: "sternum", 117: "costal_cartilages",
    }  # fmt: skip
    mr = {
        10: "lung_left", 19: "vertebrae", 23: "aorta", 24: "inferior_vena_cava",
        26: "iliac_artery_left", 29: "iliac_vena_right", 30: "humerus_left", 39: "hip_right",
        40: "gluteus_maximus_left", 49: "iliopsoas_right", 50: "brain",
    }  # fmt: skip
    assert {k: TOTALSEG_CT[k] for k in ct} == ct
    assert {k: TOTALSEG_MR[k] for k in mr} == mr


@pytest.mark.parametrize(
    "name", ["example_seg.nii.gz", "example_seg_mr.nii.gz", "example_seg_dicom.nii.gz"]
)
def test_every_id_in_the_real_maps_has_a_name(data_root, name: str) -> None:
    path = data_root / "volumes" / "totalsegmentator" / name
    ids = set(np.unique(np.asarray(nib.load(path).dataobj)).tolist()) - {0}
    table = structure_names(path)
    assert (table is TOTALSEG_MR) == ("_mr" in name)
    assert ids <= set(table), sorted(ids - set(table))


def test_readable() -> None:
    assert readable("adrenal_gland_left") == "left adrenal gland"
    assert readable("liver") == "liver"
