"""Read and write 3D medical volumes: ``read_volume(path) -> Volume``, one module per format family.

Every reader returns the voxel array in canonical RAS+ axis order (the first array axis points to
the subject's Right, the second Anterior, the third Superior; nibabel's
``as_closest_canonical``), as float32, with its 4x4 voxel-to-world affine (RAS+ world, mm), the
voxel size in mm, and the modality.

Formats:
    NIfTI (``.nii``, ``.nii.gz``), MGH/MGZ and ECAT (``.v``) through nibabel
    (:mod:`~omnienc.io.nifti`); MetaImage (``.mha``/``.mhd``), NRRD (``.nrrd``/``.nhdr``) through
    SimpleITK (:mod:`~omnienc.io.sitk_formats`); a DICOM series folder, a multi-frame DICOM file
    (``.dcm``, also gzipped ``.dcm.gz``) through SimpleITK/GDCM (:mod:`~omnienc.io.dicom`), which
    also decodes JPEG 2000 pixel data and applies every file's RescaleSlope/RescaleIntercept (a
    series is read as float32, so that slices with fractional slopes are not truncated). A single
    2D DICOM slice is not a volume: it is refused (:func:`read_dicom_slice` reads one). DICOM
    headers, units and slice geometry are in :mod:`~omnienc.io.dicom_header`.

:func:`read_volume` and :func:`write_volume` are in :mod:`~omnienc.io.read`, :class:`Volume` and
what every reader shares in :mod:`~omnienc.io.volume`, the checks a path passes before any reader
sees it in :mod:`~omnienc.io.checks`. Every problem raises
:class:`~omnienc.errors.VolumeReadError`, whose message names the file and what is wrong with it.
"""

from omnienc.io.checks import check_readable
from omnienc.io.dicom import list_dicom_series
from omnienc.io.dicom_header import (
    SPACING_REL_TOLERANCE,
    DicomHeader,
    SliceSpacing,
    TagLookup,
    check_slice_spacing,
    header_from_itk,
    modality_from_dicom,
    plain_dicom,
    read_dicom_header,
    read_dicom_slice,
    single_slice_problem,
    slice_spacing,
)
from omnienc.io.read import infer_modality, read_volume, write_volume
from omnienc.io.volume import (
    DEFAULT_MAX_VOXELS,
    DICOM_SUFFIXES,
    NIBABEL_SUFFIXES,
    SITK_SUFFIXES,
    SUPPORTED_SUFFIXES,
    Volume,
    file_suffix,
    is_volume_path,
    spacing_from_affine,
)

__all__ = [
    "DEFAULT_MAX_VOXELS",
    "DICOM_SUFFIXES",
    "NIBABEL_SUFFIXES",
    "SITK_SUFFIXES",
    "SPACING_REL_TOLERANCE",
    "SUPPORTED_SUFFIXES",
    "DicomHeader",
    "SliceSpacing",
    "TagLookup",
    "Volume",
    "check_readable",
    "check_slice_spacing",
    "file_suffix",
    "header_from_itk",
    "infer_modality",
    "is_volume_path",
    "list_dicom_series",
    "modality_from_dicom",
    "plain_dicom",
    "read_dicom_header",
    "read_dicom_slice",
    "read_volume",
    "single_slice_problem",
    "slice_spacing",
    "spacing_from_affine",
    "write_volume",
]
