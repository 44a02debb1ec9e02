"""Small helpers shared by omnienc's config dataclasses: JSON round trips with strict keys."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


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
