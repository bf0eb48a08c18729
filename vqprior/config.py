"""Frozen dataclass configs: strict ``from_dict``, YAML round trip, dotted overrides.

Every component config subclasses :class:`Config` and is declared
``@dataclass(frozen=True, kw_only=True)``. ``from_dict`` rejects unknown keys (a typo is an
error, not a silent default), rebuilds nested configs and coerces YAML scalars such as
``"1e-3"`` to the annotated type.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key and what is allowed."""


def check_choice(name: str, value: object, choices: typing.Iterable[object]) -> None:
    """Raise :class:`ConfigError` unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not allowed; choose one of {list(choices)}")


def check_range(
    name: str, value: float, low: float | None = None, high: float | None = None
) -> None:
    """Raise :class:`ConfigError` unless ``low <= value <= high`` (either bound optional)."""
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ConfigError(f"{name}={value!r} must lie in [{lo}, {hi}]")


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Convert a YAML/JSON value to ``annotation``; raise ConfigError naming ``name`` if it can't."""
    origin = get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, value, arg)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{name}: bad value {value!r}")
    if origin is Literal:
        check_choice(name, value, get_args(annotation))
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        args = get_args(annotation)
        inner = args[0] if args else Any
        items = [_coerce(f"{name}[{i}]", v, inner) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, got {value!r}")
        return dict(value)
    if isinstance(annotation, type) and issubclass(annotation, Config):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping of {annotation.__name__} fields")
        return annotation.from_dict(value, prefix=f"{name}.")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name} must be a string, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Base of every config: dict/YAML round trip with strict keys."""

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any] | None, prefix: str = "") -> C:
        """Build from a mapping; unknown keys and values of the wrong type raise ConfigError."""
        data = dict(data or {})
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            import difflib

            close = difflib.get_close_matches(str(unknown[0]), sorted(known), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(
                f"unknown config key {prefix}{unknown[0]!s} for {cls.__name__}{hint}; "
                f"known keys: {', '.join(sorted(known))}"
            )
        kwargs = {k: _coerce(prefix + k, v, hints[k]) for k, v in data.items()}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples become lists) that YAML and JSON can hold."""

        def plain(v: Any) -> Any:
            if isinstance(v, Config):
                return v.to_dict()
            if isinstance(v, (list, tuple)):
                return [plain(x) for x in v]
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return v

        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` applied and validated."""
        return type(self).from_dict({**self.to_dict(), **changes})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls: type[C], text_or_path: str | Path) -> C:
        text = Path(text_or_path).read_text() if isinstance(text_or_path, Path) else text_or_path
        return cls.from_dict(yaml.safe_load(text) or {})


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"model.channels=64"`` -> (["model", "channels"], 64); values parse as YAML scalars."""
    if "=" not in item:
        raise ConfigError(
            f"override {item!r} must look like key=value (for example model.channels=64)"
        )
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    return key.split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """Return a deep copy of ``data`` with dotted ``key=value`` overrides applied.

    Keys are checked later by ``Config.from_dict``; here a path through a non-mapping fails.
    """
    import copy

    out = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return out
