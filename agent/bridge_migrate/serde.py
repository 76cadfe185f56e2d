"""Frozen dataclasses to JSON-able data and back, driven by their type hints.

A union of dataclasses (an operation) is tagged with its class name so it can be rebuilt.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")
TAG = "@type"  # cannot collide with a field name


def to_data(obj: object) -> Any:
    kind: Any = type(obj)
    if kind in _PLAIN:  # most of a host's snapshot: the fast way out first
        return obj
    names = _field_names(kind)
    if names is not None:
        return {TAG: kind.__name__, **{n: to_data(getattr(obj, n)) for n in names}}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, tuple | list):
        return [to_data(v) for v in obj]
    return obj


_PLAIN = frozenset({str, int, float, bool, type(None)})  # exact types: enums are not plain


@functools.cache
def _field_names(kind: type) -> tuple[str, ...] | None:
    """A dataclass's field names, once per class (dataclasses.fields is slow in a loop)."""
    return (
        tuple(f.name for f in dataclasses.fields(kind)) if dataclasses.is_dataclass(kind) else None
    )


def from_data(hint: Any, data: Any) -> Any:
    """Rebuild a value of type `hint` (a dataclass, tuple, union, enum or plain type)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return _from_union(typing.get_args(hint), data)
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(from_data(args[0], v) for v in data)
        return tuple(from_data(a, v) for a, v in zip(args, data, strict=True))
    if origin is typing.Literal:
        if data not in typing.get_args(hint):
            raise ValueError(f"{data!r} is not one of {typing.get_args(hint)}")
        return data
    if dataclasses.is_dataclass(hint):
        return _from_dataclass(hint, data)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return hint(data)
    if hint is float and isinstance(data, int):
        return float(data)
    if hint is not Any and not isinstance(data, hint):
        raise ValueError(f"expected {hint.__name__}, found {data!r}")
    return data


def load(cls: type[T], data: Any) -> T:
    value: T = from_data(cls, data)
    return value


def _from_union(options: tuple[Any, ...], data: Any) -> Any:
    if data is None and type(None) in options:
        return None
    if isinstance(data, dict):
        for option in options:
            if isinstance(option, type) and option.__name__ == data.get(TAG):
                return _from_dataclass(option, data)
    for option in options:
        if option is type(None) or dataclasses.is_dataclass(option):
            continue
        try:
            return from_data(option, data)
        except (ValueError, TypeError):
            continue
    raise ValueError(f"{data!r} matches none of {options}")


def _from_dataclass(cls: Any, data: Any) -> Any:
    if not isinstance(data, dict) or data.get(TAG) != cls.__name__:
        raise ValueError(f"expected a {cls.__name__}, found {data!r}")
    hints = typing.get_type_hints(cls)
    # A field missing from older data takes its default (fields with none must be there).
    fields = {
        f.name: from_data(hints[f.name], data[f.name])
        for f in dataclasses.fields(cls)
        if f.name in data or f.default is dataclasses.MISSING
    }
    return cls(**fields)
