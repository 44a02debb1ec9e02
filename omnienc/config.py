"""What omnienc's config dataclasses share: JSON round trips with strict keys.

A config is a frozen dataclass that subclasses :class:`JsonConfig`::

    @dataclass(frozen=True)
    class MaskConfig(JsonConfig):
        config_name = "mask config"  # how error messages name it
        ...

and gets ``to_dict()`` (tuples become lists) and ``from_dict(d)`` (lists become tuples; missing
keys take their defaults; an unknown key is a ``ValueError`` that lists the known ones).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

T = TypeVar("T")
J = TypeVar("J", bound="JsonConfig")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-serialisable dict of a config dataclass (tuples become lists)."""
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()
    }


def config_from_dict(cls: type[T], d: Mapping[str, Any], what: str | None = None) -> T:
    """Build config dataclass ``cls`` from a dict; lists become tuples.

    Args:
        cls: The dataclass.
        d: Its fields; missing ones take their defaults.
        what: How the error message names the config (default: the class name).

    Raises:
        ValueError: A key is unknown (the message lists the known ones) or a value is invalid.
    """
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(d) - known
    if unknown:
        label = what or cls.__name__
        raise ValueError(f"unknown {label} keys {sorted(unknown)}; known: {sorted(known)}")
    kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return cls(**kwargs)


class JsonConfig:
    """Mixin of config dataclasses: :meth:`to_dict` and :meth:`from_dict` with strict keys.

    Attributes:
        config_name: How error messages name the config (default: the class name).
    """

    config_name: ClassVar[str | None] = None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (tuples become lists)."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls: type[J], d: Mapping[str, Any]) -> J:
        """Inverse of :meth:`to_dict`; missing keys take their defaults.

        Raises:
            ValueError: A key is unknown or a value is invalid.
        """
        return config_from_dict(cls, d, cls.config_name)
