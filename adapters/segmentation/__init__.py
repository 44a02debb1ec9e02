"""Segmentation on a frozen encoder: an FPN decoder, and the helpers of few-shot evaluation.

* :mod:`~omnienc.adapters.segmentation.decoder`: the decoder over
  ``encoder.forward_intermediates``, saved beside the exported encoder;
* :mod:`~omnienc.adapters.segmentation.items`: labelled items and class-balanced random crops;
* :mod:`~omnienc.adapters.segmentation.training`: :func:`train_segmentation` (Lightning);
* :mod:`~omnienc.adapters.segmentation.inference`: sliding-window prediction and Dice scores;
* :mod:`~omnienc.adapters.segmentation.windows`: a query's frozen features computed once and
  reused by sliding windows;
* :mod:`~omnienc.adapters.segmentation.prototype`: frozen-feature prototype matching, the
  training-free few-shot baseline.

Few-shot segmentation with the pretext head itself is :mod:`omnienc.pretext.segment`: it needs
the in-context head of the same checkpoint, so it lives with pretraining.
"""

from omnienc.adapters.segmentation.decoder import (
    DECODER_NAME,
    SegDecoderConfig,
    SegmentationDecoder,
    SegmentationModel,
    build_segmentation_model,
    load_segmentation_model,
    save_segmentation_model,
)
from omnienc.adapters.segmentation.inference import (
    dice_scores,
    evaluate_segmentation,
    predict_volume,
    resample_argmax,
    sliding_window_probabilities,
)
from omnienc.adapters.segmentation.items import (
    RandomCrops,
    SegItem,
    items_from_pairs,
    medsegbench_items,
    select_structures,
)
from omnienc.adapters.segmentation.prototype import (
    best_threshold,
    mean_prototypes,
    pool_prototypes,
    support_prototypes,
    window_similarity,
)
from omnienc.adapters.segmentation.training import SegmentationModule, train_segmentation
from omnienc.adapters.segmentation.windows import WindowFeatures, WindowFn, centred_crop

__all__ = [
    "DECODER_NAME",
    "RandomCrops",
    "SegDecoderConfig",
    "SegItem",
    "SegmentationDecoder",
    "SegmentationModel",
    "SegmentationModule",
    "WindowFeatures",
    "WindowFn",
    "best_threshold",
    "build_segmentation_model",
    "centred_crop",
    "dice_scores",
    "evaluate_segmentation",
    "items_from_pairs",
    "load_segmentation_model",
    "mean_prototypes",
    "medsegbench_items",
    "pool_prototypes",
    "predict_volume",
    "resample_argmax",
    "save_segmentation_model",
    "select_structures",
    "sliding_window_probabilities",
    "support_prototypes",
    "train_segmentation",
    "window_similarity",
]
