"""Readable files that are no usable volume: bad shapes and values, label maps that do not fit."""

from __future__ import annotations

import numpy as np

from omnienc.benchmarks.robustness.cases import (
    FOUR_D,
    GOOD,
    MHA,
    MR_SEG,
    BadInput,
    Expect,
    _file_expect,
    _label_expect,
    _nib_load,
    _nifti_bytes,
    _Writer,
)


def _shapes_and_values(w: _Writer) -> None:
    img = _nib_load(w.real(GOOD))
    affine = np.asarray(img.affine)
    data = np.asarray(img.dataobj, dtype=np.float32)
    w.file(
        "2D",
        "two-d",
        "slice2d.nii.gz",
        _nifti_bytes(data[:, :, data.shape[2] // 2], affine),
        GOOD,
        r"is 2D .*expects a 3D volume",
        "the middle axial slice",
    )
    w.file(
        "4D",
        "four-d",
        "functional.nii",
        w.real(FOUR_D).read_bytes(),
        FOUR_D,
        r"4D with 20 frames.*--frame",
        "real fMRI, 20 frames",
    )
    four = np.asarray(_nib_load(w.real(FOUR_D)).dataobj, dtype=np.float32)
    five = four.reshape((*four.shape[:3], 4, 5))
    w.file(
        "5D",
        "five-d",
        "functional5d.nii.gz",
        _nifti_bytes(five, np.asarray(_nib_load(w.real(FOUR_D)).affine)),
        FOUR_D,
        r"is 5D",
        "the 20 frames as 4x5",
    )
    nan = data.copy()
    nan[10:12, 10:12, 10:12] = np.nan
    w.file(
        "NaN/Inf",
        "nan-voxels",
        "nan.nii.gz",
        _nifti_bytes(nan, affine),
        GOOD,
        r"non-finite voxels \(8 NaN, 0 Inf",
        "8 NaN voxels",
    )
    inf = data.copy()
    inf[5, 5, 5], inf[6, 6, 6] = np.inf, -np.inf
    w.file(
        "NaN/Inf",
        "inf-voxels",
        "inf.nii.gz",
        _nifti_bytes(inf, affine),
        GOOD,
        r"non-finite voxels \(0 NaN, 2 Inf",
        "+Inf and -Inf voxels",
    )
    import SimpleITK as sitk

    mha = sitk.Cast(sitk.ReadImage(str(w.real(MHA))), sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(mha)
    arr.flat[:: max(1, arr.size // 5)] = np.nan
    nan_mha = sitk.GetImageFromArray(arr)
    nan_mha.CopyInformation(mha)
    folder = w.folder("nan-voxels-mha")
    path = folder / "nan.mha"
    sitk.WriteImage(nan_mha, str(path))
    w.cases.append(
        BadInput(
            "NaN/Inf",
            "nan-voxels-mha",
            path,
            folder,
            MHA,
            _file_expect(path, r"non-finite voxels \(\d+ NaN"),
            note="MetaImage (SimpleITK path) with NaN voxels",
        )
    )
    for value, name in ((0.0, "constant-zero"), (100.0, "constant-100")):
        const = np.full(data.shape, value, np.float32)
        path = w.folder(name) / "constant.nii.gz"
        path.write_bytes(_nifti_bytes(const, affine))
        problem = rf"constant volume \(every voxel is {value:g}\)"
        skip = Expect("skip", ((path, problem),))
        error = Expect("error", ((path, problem),))
        w.cases.append(
            BadInput(
                "constant",
                name,
                path,
                path.parent,
                GOOD,
                {
                    "read_volume": Expect("ok"),  # a valid volume: info can describe it
                    "VolumeFolder": skip,
                    "info": Expect("ok"),
                    "masks": skip,
                    "pretrain": skip,
                    "embed": error,
                    "segment": error,
                },
                note=f"every voxel {value:g} on the real grid",
            )
        )


def _label_maps(w: _Writer) -> None:
    seg_img = _nib_load(w.real(MR_SEG))
    seg = np.asarray(seg_img.dataobj).astype(np.uint8)
    affine = np.asarray(seg_img.affine)
    cases = []
    other = seg[:, :, :-2]
    cases.append(
        (
            "label grid",
            "label-other-shape",
            _nifti_bytes(other, affine),
            r"grid \(117, 91, 18\) differs from its image",
            "the real label map minus 2 slices",
        )
    )
    shifted = affine.copy()
    shifted[:3, 3] += (6.0, 0.0, 0.0)
    cases.append(
        (
            "label grid",
            "label-shifted",
            _nifti_bytes(seg, shifted),
            r"affine differs from its image",
            "same shape, origin moved 6 mm",
        )
    )
    frac = seg.astype(np.float32)
    frac[seg > 0] += 0.5
    cases.append(
        (
            "non-integer labels",
            "label-non-integer",
            _nifti_bytes(frac, affine),
            r"label map has [\d,]+ non-integer voxels",
            "every label + 0.5",
        )
    )
    neg = seg.astype(np.int16)
    neg[seg == 0] = -1
    cases.append(
        (
            "non-integer labels",
            "label-negative",
            _nifti_bytes(neg, affine),
            r"negative labels",
            "background -1",
        )
    )
    for kind, name, data, problem, note in cases:
        folder = w.folder(name, good=False)
        path = folder / "labels.nii.gz"
        path.write_bytes(data)
        cases_expect = _label_expect(path, problem)
        w.cases.append(
            BadInput(kind, name, path, folder, MR_SEG, cases_expect, role="label", note=note)
        )
