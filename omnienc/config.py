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


def positive_int_triple(name: str, value: Any) -> tuple[int, int, int]:
    """``value`` (a crop or grid size) as three positive ints.

    Raises:
        ValueError: ``value`` is not three positive whole numbers; the message names ``name``.
    """
    try:
        size = tuple(int(s) for s in value)
        whole = size == tuple(value)
    except (TypeError, ValueError):
        size, whole = (), False
    if len(size) != 3 or min(size) < 1 or not whole:
        raise ValueError(f"{name} must be three positive ints, got {value!r}")
    return size[0], size[1], size[2]


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


def trainer_config_parser(
    prog: str, description: str, config_cls: type, trainer_defaults: Mapping[str, Any]
) -> Any:
    """A jsonargparse parser for a run config dataclass with Lightning Trainer overrides.

    The config's fields become arguments (nested dataclasses as dotted groups), ``--config``
    reads YAML files, and the Trainer's own ``__init__`` arguments sit under ``trainer.*``
    (keyword arguments, not an instance, as in LightningCLI) with ``trainer_defaults``. Unknown
    keys are errors. Used by ``omnienc pretrain`` and ``omnienc align``.

    Args:
        prog: The command's name, for help and errors.
        description: The ``--help`` text.
        config_cls: The run config dataclass; its ``trainer`` field is skipped (it is the
            ``trainer.*`` group).
        trainer_defaults: Defaults of ``trainer.*``.

    Returns:
        The ``jsonargparse.ArgumentParser``.
    """
    import pytorch_lightning as pl
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog=prog, description=description, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config file(s)")
    parser.add_class_arguments(config_cls, skip={"trainer"}, sub_configs=True)
    parser.add_method_arguments(
        pl.Trainer,
        "__init__",
        "trainer",
        skip={"callbacks", "logger", "plugins", "default_root_dir", "enable_checkpointing"},
        fail_untyped=False,
    )
    parser.set_defaults({f"trainer.{k}": v for k, v in trainer_defaults.items()})
    return parser
