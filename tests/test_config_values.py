"""Shared value checks of the config dataclasses (omnienc.config)."""

from __future__ import annotations

import numpy as np
import pytest

from omnienc.config import positive_int_triple
from omnienc.preprocessing import Preprocessing


@pytest.mark.parametrize(
    ("value", "expected"),
    [((32, 32, 32), (32, 32, 32)), ([16, 24, 8], (16, 24, 8)), (np.array([4.0, 4, 4]), (4, 4, 4))],
)
def test_three_positive_whole_numbers_pass(value, expected):
    assert positive_int_triple("crop_size", value) == expected


@pytest.mark.parametrize(
    "value", [(32, 32), (32, 0, 32), (32.5, 32, 32), "abc", None, (1, 2, 3, 4)]
)
def test_anything_else_is_refused_by_name(value):
    with pytest.raises(ValueError, match="crop_size must be three positive ints"):
        positive_int_triple("crop_size", value)


def test_the_adapters_refuse_fractional_crop_sizes(tmp_path):
    """Every adapter that takes a crop size uses the shared check (no silent truncation)."""
    from omnienc.adapters.language.sources import PairedDataConfig
    from omnienc.adapters.latent.crops import structure_crops
    from omnienc.adapters.segmentation.training import train_segmentation

    with pytest.raises(ValueError, match="crop_size must be three positive ints"):
        PairedDataConfig(crop_size=(32, 32.5, 16))
    with pytest.raises(ValueError, match="crop_size must be three positive ints"):
        structure_crops(
            tmp_path / "a.nii.gz", tmp_path / "b.nii.gz", Preprocessing(), (32, 32, 2.5)
        )
    with pytest.raises(ValueError, match="crop_size must be three positive ints"):
        train_segmentation(None, [], None, None, (32.5, 32, 32), steps=1)
