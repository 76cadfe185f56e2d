"""Frozen dataclasses to JSON-able data and back, driven by their type hints.

A union of dataclasses (an operation) is tagged with its class name so it can be rebuilt.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")
TAG = "@type"  # cannot collide with a field name


def to_data(obj: object) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: to_data(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return {TAG: type(obj).__name__, **fields}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, tuple | list):
        return [to_data(v) for v in obj]
    return obj


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
