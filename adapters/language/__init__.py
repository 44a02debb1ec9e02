"""The language adapter: a projector from the frozen encoder into a frozen causal language model.

* :mod:`~omnienc.adapters.language.projector`: the projectors (``mlp``, ``resampler``);
* :mod:`~omnienc.adapters.language.model`: the frozen LM and :class:`VisionLanguageModel`;
* :mod:`~omnienc.adapters.language.checkpoint`: the projector folder, and :func:`describe`;
* :mod:`~omnienc.adapters.language.alignment`: training (:func:`align`, ``omnienc align``);
* :mod:`~omnienc.adapters.language.sources`, :mod:`~omnienc.adapters.language.items`,
  :mod:`~omnienc.adapters.language.reports`: the paired (volume, text) data and its templated
  text;
* :mod:`~omnienc.adapters.language.tokens`: the frozen-encoder tokens alignment trains on.
"""

from omnienc.adapters.language.alignment import (
    TRAINER_DEFAULTS,
    AlignConfig,
    AlignModule,
    align,
    build_parser,
    training_tokens,
)
from omnienc.adapters.language.checkpoint import (
    PROJECTOR_CONFIG,
    PROJECTOR_FORMAT,
    PROJECTOR_FORMAT_VERSION,
    PROJECTOR_WEIGHTS,
    Description,
    describe,
    load_projector,
    load_vision_language,
    save_projector,
)
from omnienc.adapters.language.items import LabelledVolume, PairedItem, PairedItems, PairedVolumes
from omnienc.adapters.language.model import (
    DEFAULT_PROMPT,
    LM_WEIGHT_SUFFIXES,
    VisionLanguageModel,
    lm_fingerprint,
    load_causal_lm,
)
from omnienc.adapters.language.projector import (
    PROJECTORS,
    MLPProjector,
    Projector,
    ProjectorConfig,
    ResamplerProjector,
    build_projector,
)
from omnienc.adapters.language.reports import (
    TERM_ORDER,
    adrenal_report,
    crop_report,
    parse_adrenal_report,
    parse_crop_report,
    report_term,
)
from omnienc.adapters.language.sources import (
    ADRENAL,
    BUILTIN_SOURCES,
    SPLITS,
    TOTALSEG,
    TOTALSEG_TEST,
    TOTALSEG_TRAIN,
    PairedDataConfig,
    adrenal_items,
    crop_items,
    grid_starts,
    paired_dataset,
    totalseg_items,
)
from omnienc.adapters.language.tokens import (
    TokenSet,
    collate_tokens,
    encode_tokens,
    grid_positions,
    load_encoder_spec,
    state_fingerprint,
    volume_tokens,
)

__all__ = [
    "ADRENAL",
    "BUILTIN_SOURCES",
    "DEFAULT_PROMPT",
    "LM_WEIGHT_SUFFIXES",
    "PROJECTORS",
    "PROJECTOR_CONFIG",
    "PROJECTOR_FORMAT",
    "PROJECTOR_FORMAT_VERSION",
    "PROJECTOR_WEIGHTS",
    "SPLITS",
    "TERM_ORDER",
    "TOTALSEG",
    "TOTALSEG_TEST",
    "TOTALSEG_TRAIN",
    "TRAINER_DEFAULTS",
    "AlignConfig",
    "AlignModule",
    "Description",
    "LabelledVolume",
    "MLPProjector",
    "PairedDataConfig",
    "PairedItem",
    "PairedItems",
    "PairedVolumes",
    "Projector",
    "ProjectorConfig",
    "ResamplerProjector",
    "TokenSet",
    "VisionLanguageModel",
    "adrenal_items",
    "adrenal_report",
    "align",
    "build_parser",
    "build_projector",
    "collate_tokens",
    "crop_items",
    "crop_report",
    "describe",
    "encode_tokens",
    "grid_positions",
    "grid_starts",
    "lm_fingerprint",
    "load_causal_lm",
    "load_encoder_spec",
    "load_projector",
    "load_vision_language",
    "paired_dataset",
    "parse_adrenal_report",
    "parse_crop_report",
    "report_term",
    "save_projector",
    "state_fingerprint",
    "totalseg_items",
    "training_tokens",
    "volume_tokens",
]
