"""End-to-end classifier training (supervised from scratch, fine-tuning) on real MedMNIST."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from omnienc.adapters.classification import (
    FinetuneConfig,
    copy_encoder,
    label_counts,
    stratified_fraction,
    train_classifier,
)
from omnienc.data.medmnist import MedMNIST
from omnienc.encoders import build_encoder


@pytest.fixture(scope="module")
def adrenal(data_root: Path) -> dict[str, MedMNIST]:
    """AdrenalMNIST3D 28^3: 160 training cubes, the full val split, 100 test cubes."""
    root = data_root / "medmnist"
    train_full = MedMNIST("adrenalmnist3d", "train", root=root)
    rows = stratified_fraction(train_full.labels, 160 / len(train_full), seed=0)
    return {
        "train": MedMNIST("adrenalmnist3d", "train", root=root, indices=rows),
        "val": MedMNIST("adrenalmnist3d", "val", root=root),
        "test": MedMNIST("adrenalmnist3d", "test", root=root, indices=range(100)),
    }


def test_stratified_fraction_keeps_every_class(data_root: Path):
    labels = MedMNIST("adrenalmnist3d", "train", root=data_root / "medmnist").labels
    counts = label_counts(labels)
    one = stratified_fraction(labels, 0.01, seed=0)
    assert set(label_counts(labels[one])) == set(counts)  # both classes survive 1%
    assert len(one) == sum(max(1, round(0.01 * c)) for c in counts.values())
    assert np.array_equal(one, stratified_fraction(labels, 0.01, seed=0))
    assert not np.array_equal(one, stratified_fraction(labels, 0.01, seed=1))
    assert len(stratified_fraction(labels, 1.0)) == len(labels)
    with pytest.raises(ValueError, match="fraction"):
        stratified_fraction(labels, 0.0)


def test_training_from_scratch_learns_and_changes_the_encoder(adrenal):
    torch.manual_seed(0)  # the encoder's init must not depend on which tests ran before
    encoder = build_encoder("resconv_tiny")
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    config = FinetuneConfig(steps=60, batch_size=16, lr=2e-3, eval_every=20, seed=0)
    result = train_classifier(encoder, adrenal["train"], adrenal["val"], adrenal["test"], config)
    assert result.n == {"train": 160, "val": 98, "test": 100}
    assert result.params["best_step"] in (20, 40, 60)
    assert [h["step"] for h in result.params["history"]] == [20, 40, 60]
    assert all(np.isfinite(v) for v in result.metrics.values())
    aucs = [h["auc"] for h in result.params["history"]]
    assert max(aucs[1:]) > aucs[0] + 0.05  # validation AUC rises as it trains (0.50 -> 0.64)
    assert result.params["val_auc"] == max(aucs)
    changed = [k for k, v in encoder.state_dict().items() if not torch.equal(v, before[k])]
    assert changed


def test_encoder_lr_scale_zero_keeps_the_encoder(adrenal):
    encoder = build_encoder("resconv_tiny")
    tuned = copy_encoder(encoder)
    config = FinetuneConfig(
        steps=10, batch_size=8, eval_every=10, encoder_lr_scale=0.0, weight_decay=0.0
    )
    train_classifier(tuned, adrenal["train"], adrenal["val"], adrenal["test"], config)
    for (name, a), b in zip(encoder.state_dict().items(), tuned.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_bad_splits_are_clear_errors(adrenal, data_root: Path):
    root = data_root / "medmnist"
    labels = MedMNIST("adrenalmnist3d", "train", root=root).labels
    one_class = np.flatnonzero(labels[:, 0] == 0)[:10]
    train = MedMNIST("adrenalmnist3d", "train", root=root, indices=one_class)
    with pytest.raises(ValueError, match="single class"):
        train_classifier(
            build_encoder("resconv_tiny"),
            train,
            adrenal["val"],
            adrenal["test"],
            FinetuneConfig(steps=1, eval_every=1),
        )
    empty = MedMNIST("adrenalmnist3d", "test", root=root, indices=[])
    with pytest.raises(ValueError, match="test split is empty"):
        train_classifier(
            build_encoder("resconv_tiny"),
            adrenal["train"],
            adrenal["val"],
            empty,
            FinetuneConfig(steps=1, eval_every=1),
        )
    with pytest.raises(ValueError, match="steps"):
        FinetuneConfig(steps=0)
