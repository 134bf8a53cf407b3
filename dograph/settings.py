"""Typed settings of mixers and objectives: one dataclass per method, the schema of its ``conf/<group>/*.yaml``.

A method declares its settings next to the code that reads them (``settings_class`` on the mixer
or objective class): one field per key of its yaml file, ``Literal[...]`` for a choice, a comment
per field, no defaults (the yaml file holds the values and says where each comes from).
``dograph.config.register_configs`` stores :func:`omegaconf_schema` of each as
``schema/<group>/<name>``; the yaml file composes onto it (``defaults: [/schema/mixer/NAME@_here_,
_self_]``), so Hydra refuses a wrong key or a wrong type or choice while composing, before any
work, with its own message naming the key (``full_key: mixer.buffer_size``).

What types cannot say (ranges, relations between fields) each class checks in :meth:`Settings.check`,
which runs when the composed config is converted (:func:`validated_node`, called by
``RunConfig.__post_init__``), still before the corpus is read. The method then receives the node as
a plain dict, as before (its constructor's keyword arguments): constructors no longer check settings.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import types
import typing
from typing import Any, ClassVar, Literal

from dograph.errors import ConfigError


def require(cond: bool, key: str, message: str, value: Any) -> None:
    """A one-line :class:`ConfigError` ``"<key> <message> (got <value>)"`` unless ``cond`` holds."""
    if not cond:
        raise ConfigError(f"{key} {message} (got {value!r})")


def require_number(value: float, key: str, *, low: float = -math.inf, high: float = math.inf,
                   low_open: bool = False, high_open: bool = False) -> None:
    """``value`` finite and within ``low .. high`` (each end closed unless ``*_open``)."""
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    require(math.isfinite(value) and above and below, key, _interval(low, high, low_open, high_open), value)


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    if math.isinf(low) and math.isinf(high):
        return "must be a finite number"
    if math.isinf(high):
        return f"must be a finite number {'>' if low_open else '>='} {low:g}"
    if math.isinf(low):
        return f"must be a finite number {'<' if high_open else '<='} {high:g}"
    return f"must be in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


class Settings:
    """Base of the settings dataclasses; ``key`` is the config node they describe (for messages)."""

    key: ClassVar[str] = "mixer"

    def __post_init__(self) -> None:
        for name, choices in literal_fields(type(self)).items():  # Python does not enforce Literal
            value = getattr(self, name)
            require(value in choices, f"{self.key}.{name}", f"must be one of {', '.join(map(str, choices))}",
                    value)
        self.check()

    def check(self) -> None:
        """Ranges and relations between fields; a one-line ConfigError naming the key (default: none)."""


@functools.cache
def literal_fields(cls: type) -> dict[str, tuple[Any, ...]]:
    """The choices of each ``Literal`` (or optional ``Literal``) field of a settings class."""
    choices = {}
    for name, hint in typing.get_type_hints(cls).items():
        options = [a for a in _union_members(hint) if typing.get_origin(a) is Literal]
        if options:
            choices[name] = (*typing.get_args(options[0]), *((None,) if _is_optional(hint) else ()))
    return choices


def _union_members(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _is_optional(hint: Any) -> bool:
    return type(None) in _union_members(hint)


@functools.cache
def omegaconf_schema(cls: type[Settings]) -> type:
    """``cls`` as OmegaConf can type it: each ``Literal`` becomes an Enum of the same strings.

    OmegaConf 2.3 has no ``Literal``; an Enum node refuses any other value while composing
    ("Invalid value 'x', expected one of [...]"). Nested settings classes are translated too.
    The copy remembers ``cls`` (``settings_class``) for :func:`validated_node`.
    """
    hints = typing.get_type_hints(cls)
    spec = [(f.name, _omegaconf_type(hints[f.name], f.name),
             dataclasses.field(default=f.default, default_factory=f.default_factory))
            for f in dataclasses.fields(cls)]
    return dataclasses.make_dataclass(cls.__name__, spec, namespace={"settings_class": cls, "__doc__": cls.__doc__})


def _omegaconf_type(hint: Any, name: str) -> Any:
    if typing.get_origin(hint) is Literal:
        return enum.Enum(name, [(str(choice), choice) for choice in typing.get_args(hint)])
    if _is_optional(hint):
        (inner,) = [a for a in _union_members(hint) if a is not type(None)]
        return _omegaconf_type(inner, name) | None
    if isinstance(hint, type) and issubclass(hint, Settings):
        return omegaconf_schema(hint)
    return hint


def validated_node(node: Any) -> Any:
    """A mixer or objective node converted by OmegaConf, checked by its settings class, as a plain dict.

    ``node`` is an instance of an :func:`omegaconf_schema` class; anything else (a plain dict: a
    stage's mixer, a saved run's config; None) is returned unchanged. A key added with Hydra's ``+``
    is not a field (OmegaConf keeps it as an attribute): refused here, naming it.
    """
    settings_class = getattr(type(node), "settings_class", None)
    if settings_class is None:
        return node
    return dataclasses.asdict(_settings(settings_class, node))


def _settings(cls: type[Settings], node: Any) -> Settings:
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(vars(node)) - set(names))
    if unknown:
        raise ConfigError(f"{cls.key}: unknown key(s) {', '.join(unknown)} (its keys: "
                          f"{', '.join(n for n in names if not n.startswith('_'))})")
    return cls(**{name: _plain(getattr(node, name)) for name in names})


def _plain(value: Any) -> Any:
    """Enum members back to their strings, nested schema instances to their settings (lists and dicts walked)."""
    settings_class = getattr(type(value), "settings_class", None)
    if settings_class is not None:
        return _settings(settings_class, value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
