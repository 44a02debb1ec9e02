"""Encoders: one architecture family per file, and the plain dicts that name them.

* ``ENCODERS``: registered name -> builder; ``build_encoder(name, **overrides)`` calls it, and a
  builder takes keyword overrides of its config's fields (``build_encoder("resconv_tiny",
  in_chans=2)``).
* ``FAMILIES``: family -> function that builds an encoder from a config dict, as stored in a
  checkpoint; ``encoder_from_config(family, config_dict)`` calls it.

Every encoder follows the contract of :class:`omnienc.encoders.base.Encoder`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from omnienc.encoders.base import Encoder, EncoderConfig
from omnienc.encoders.resconv import RESCONV_SIZES, ResConvConfig, ResConvEncoder
from omnienc.encoders.vit3d import VIT3D_SIZES, ViT3DConfig, ViT3DEncoder


def build_resconv_tiny(**overrides: Any) -> Encoder:
    """Residual conv encoder, widths 8-16-32-64, one block per stage."""
    return ResConvEncoder(RESCONV_SIZES["resconv_tiny"].replace(**overrides))


def build_resconv_small(**overrides: Any) -> Encoder:
    """Residual conv encoder, widths 16-32-64-128, blocks 1-1-2-2."""
    return ResConvEncoder(RESCONV_SIZES["resconv_small"].replace(**overrides))


def build_resconv_base(**overrides: Any) -> Encoder:
    """Residual conv encoder, widths 32-64-128-256, blocks 1-2-2-2."""
    return ResConvEncoder(RESCONV_SIZES["resconv_base"].replace(**overrides))


def build_resconv_mass(**overrides: Any) -> Encoder:
    """MASS-like GPU encoder: widths 32-64-128-256-512, blocks 1-2-2-2-2, unstrided stem."""
    return ResConvEncoder(RESCONV_SIZES["resconv_mass"].replace(**overrides))


def build_vit3d_tiny(**overrides: Any) -> Encoder:
    """3D ViT, patch 16, width 192, 6 blocks, 3 heads."""
    return ViT3DEncoder(VIT3D_SIZES["vit3d_tiny"].replace(**overrides))


def build_vit3d_small(**overrides: Any) -> Encoder:
    """3D ViT, patch 16, width 384, 12 blocks, 6 heads."""
    return ViT3DEncoder(VIT3D_SIZES["vit3d_small"].replace(**overrides))


ENCODERS: dict[str, Callable[..., Encoder]] = {
    "resconv_tiny": build_resconv_tiny,
    "resconv_small": build_resconv_small,
    "resconv_base": build_resconv_base,
    "resconv_mass": build_resconv_mass,
    "vit3d_tiny": build_vit3d_tiny,
    "vit3d_small": build_vit3d_small,
}

# Family and preset config of every registered name, to name an encoder's arch when saving it.
_PRESETS: dict[str, tuple[str, EncoderConfig]] = {
    **{name: (ResConvEncoder.family, cfg) for name, cfg in RESCONV_SIZES.items()},
    **{name: (ViT3DEncoder.family, cfg) for name, cfg in VIT3D_SIZES.items()},
}


def build_resconv(config: Mapping[str, Any]) -> Encoder:
    """Residual conv encoder from a :class:`ResConvConfig` dict."""
    return ResConvEncoder(ResConvConfig.from_dict(config))


def build_vit3d(config: Mapping[str, Any]) -> Encoder:
    """3D ViT from a :class:`ViT3DConfig` dict."""
    return ViT3DEncoder(ViT3DConfig.from_dict(config))


FAMILIES: dict[str, Callable[[Mapping[str, Any]], Encoder]] = {
    ResConvEncoder.family: build_resconv,
    ViT3DEncoder.family: build_vit3d,
}


def build_encoder(name: str, **overrides: Any) -> Encoder:
    """Build a registered encoder.

    Args:
        name: A key of ``ENCODERS``.
        **overrides: Config fields to change, e.g. ``in_chans=2``.

    Raises:
        ValueError: The name is not registered, or an override is unknown or invalid.
    """
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; known: {', '.join(sorted(ENCODERS))}")
    return ENCODERS[name](**overrides)


def encoder_from_config(family: str, config: Mapping[str, Any]) -> Encoder:
    """Build an encoder of a family from its config dict (the inverse of ``config.to_dict()``).

    Raises:
        ValueError: The family is unknown, or a config key is unknown or a value invalid.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown encoder family {family!r}; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[family](config)


def random_encoder(name: str, seed: int) -> Encoder:
    """A random-init registered encoder, its weights drawn after ``torch.manual_seed(seed)``.

    Raises:
        ValueError: The name is not registered.
    """
    torch.manual_seed(seed)
    return build_encoder(name)


RANDOM_PREFIX = "random:"
"""Prefix of an encoder spec that means a random-init registered encoder: ``random:ARCH[:SEED]``."""


def parse_random_spec(spec: object) -> tuple[str, int | None] | None:
    """``random:ARCH[:SEED]`` -> ``(ARCH, SEED or None)``; any other spec -> ``None``.

    Raises:
        ValueError: ``SEED`` is not an integer.
    """
    text = str(spec)
    if not text.startswith(RANDOM_PREFIX):
        return None
    arch, _, seed = text.removeprefix(RANDOM_PREFIX).partition(":")
    try:
        return arch, int(seed) if seed else None
    except ValueError:
        raise ValueError(f"{text}: the seed in random:ARCH:SEED must be an integer") from None


def random_like(encoder: Encoder, seed: int) -> Encoder:
    """A random-init encoder of the same family and config (the floor any pretraining must beat)."""
    torch.manual_seed(seed)
    return encoder_from_config(encoder.family, encoder.config.to_dict())


def arch_name(encoder: Encoder) -> str:
    """The registered name whose preset config equals ``encoder.config``, else its family."""
    for name, (family, preset) in _PRESETS.items():
        if family == encoder.family and preset == encoder.config:
            return name
    return encoder.family


def arch_family(name: str) -> str:
    """The family of a registered encoder name.

    Raises:
        ValueError: The name is not registered.
    """
    if name not in _PRESETS:
        raise ValueError(f"unknown encoder {name!r}; known: {', '.join(sorted(ENCODERS))}")
    return _PRESETS[name][0]


__all__ = [
    "ENCODERS",
    "FAMILIES",
    "RANDOM_PREFIX",
    "Encoder",
    "EncoderConfig",
    "ResConvConfig",
    "ResConvEncoder",
    "ViT3DConfig",
    "ViT3DEncoder",
    "arch_family",
    "arch_name",
    "build_encoder",
    "encoder_from_config",
    "parse_random_spec",
    "random_encoder",
    "random_like",
]
