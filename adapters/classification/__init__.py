"""Classification on a frozen encoder: features, probes, heads, metrics, end-to-end baselines.

* :mod:`~omnienc.adapters.classification.features`: :class:`FeatureSet` (pooled embeddings
  ``(N, E)``, labels, ids, optional token maps) and the ids of the weights that made them;
* :mod:`~omnienc.adapters.classification.extract`: :func:`extract_features` with its on-disk cache;
* :mod:`~omnienc.adapters.classification.probes`: linear and kNN probes, and
  :func:`run_linear_probe` behind ``omnienc probe``;
* :mod:`~omnienc.adapters.classification.heads`: attention-pooling and MLP heads trained on
  frozen features;
* :mod:`~omnienc.adapters.classification.metrics`: the task of a label set, splits, ACC / AUC /
  F1 / balanced accuracy with bootstrap intervals;
* :mod:`~omnienc.adapters.classification.finetune`: the end-to-end baselines that train the
  encoder itself (supervised from scratch, fine-tuning).
"""

from omnienc.adapters.classification.extract import CACHE_SUBDIR, extract_features
from omnienc.adapters.classification.features import (
    FORMAT,
    FORMAT_VERSION,
    FeatureSet,
    checkpoint_id,
    random_checkpoint_id,
)
from omnienc.adapters.classification.finetune import (
    Classifier,
    FinetuneConfig,
    copy_encoder,
    dataset_labels,
    label_counts,
    predict_proba,
    stratified_fraction,
    train_classifier,
)
from omnienc.adapters.classification.heads import (
    HEADS,
    AttentionPoolHead,
    HeadProbeModule,
    HeadTraining,
    MLPHead,
    train_head_probe,
)
from omnienc.adapters.classification.metrics import (
    MULTILABEL_THRESHOLD,
    M,
    P,
    ProbeResult,
    Split,
    Task,
    as_targets,
    best_on_val,
    bootstrap_intervals,
    check_splits,
    classification_metrics,
    split_sizes,
    task_of,
    test_result,
    val_score,
)
from omnienc.adapters.classification.probes import (
    DEFAULT_CS,
    DEFAULT_KS,
    knn_probe,
    linear_probe,
    run_linear_probe,
)

__all__ = [
    "CACHE_SUBDIR",
    "DEFAULT_CS",
    "DEFAULT_KS",
    "FORMAT",
    "FORMAT_VERSION",
    "HEADS",
    "MULTILABEL_THRESHOLD",
    "AttentionPoolHead",
    "Classifier",
    "FeatureSet",
    "FinetuneConfig",
    "HeadProbeModule",
    "HeadTraining",
    "M",
    "MLPHead",
    "P",
    "ProbeResult",
    "Split",
    "Task",
    "as_targets",
    "best_on_val",
    "bootstrap_intervals",
    "check_splits",
    "checkpoint_id",
    "classification_metrics",
    "copy_encoder",
    "dataset_labels",
    "extract_features",
    "knn_probe",
    "label_counts",
    "linear_probe",
    "predict_proba",
    "random_checkpoint_id",
    "run_linear_probe",
    "split_sizes",
    "stratified_fraction",
    "task_of",
    "test_result",
    "train_classifier",
    "train_head_probe",
    "val_score",
]
