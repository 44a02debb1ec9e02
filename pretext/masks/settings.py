"""The mask-cache settings of a pretraining config, for ``omnienc masks --config CFG.yaml``.

A mask cache entry is named after the preprocessed volume (its content and the preprocessing)
and the :class:`~omnienc.pretext.masks.MaskConfig`, so masks computed ahead of a run (for
example one ``omnienc masks --shard K/N`` job per array task on a cluster) are found by the run
only when they were computed with the run's ``data.preprocessing`` and ``data.masks``.
:func:`read_mask_settings` takes those, and ``data.cache_dir``, from the run's YAML config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from omnienc.errors import DataError
from omnienc.preprocessing import Preprocessing


@dataclass
class MaskSettings:
    """What of a pretraining config decides the mask cache.

    Attributes:
        preprocessing: ``data.preprocessing`` (defaults where the config is silent).
        masks: ``data.masks``, as given (fields of ``MaskConfig``).
        cache_dir: ``data.cache_dir``, when set (taken as the run takes it).
    """

    preprocessing: Preprocessing
    masks: dict[str, Any] = field(default_factory=dict)
    cache_dir: Path | None = None


def read_mask_settings(path: str | Path) -> MaskSettings:
    """Read ``data.preprocessing``, ``data.masks`` and ``data.cache_dir`` of a pretrain config.

    Args:
        path: A YAML config as ``omnienc pretrain --config`` takes it.

    Raises:
        DataError: The file is missing or not YAML, or those sections are not mappings or
            hold unknown keys.
    """
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise DataError(path, "no such config file") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise DataError(path, f"not a readable YAML config ({type(exc).__name__}: {exc})") from None
    data = (doc.get("data") or {}) if isinstance(doc, dict) else None
    if not isinstance(data, dict):
        raise DataError(path, "the config's `data` must be a mapping")
    pre, masks = data.get("preprocessing") or {}, data.get("masks") or {}
    if not isinstance(pre, dict) or not isinstance(masks, dict):
        raise DataError(path, "data.preprocessing and data.masks must be mappings")
    try:
        preprocessing = Preprocessing.from_dict(pre)
        from omnienc.pretext.masks import MaskConfig

        MaskConfig.from_dict(masks)  # checked here, so that the error names this file
    except (TypeError, ValueError) as exc:
        raise DataError(path, f"invalid data.preprocessing or data.masks: {exc}") from None
    cache_dir = data.get("cache_dir")
    return MaskSettings(preprocessing, dict(masks), Path(cache_dir) if cache_dir else None)
