"""Check a config value against a dataclass field's type hint, converting what a command line gives.

Why: model config fields and attention options arrive from YAML, from Python and from the command
line, where jsonargparse hands `--model.n_layer 2` or `--attention.beta_init 1e-3` to the entry point
as an untyped value (often the string itself). One checker, used by `Config` and by the attention
registry, turns such strings into the declared type and rejects what does not fit with a one-line
ValueError, instead of a TypeError deep inside the model (or a silently truthy "nope" for a bool).

Supported hints: bool, int, float, str, Literal[...], X | None (and other unions, tried in order),
dict / dict[K, V] / Mapping, list / list[T] / tuple, Any, and plain classes (an isinstance check).
A string is parsed with YAML (plus `float()` for forms like `1e-3` that PyYAML leaves as a string) when
the field is not a string. A bool is never an int or a float; an int is a float (converted).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import types
import typing
from typing import Any, Literal

import yaml

_MISSING = object()


def check_value(value: Any, hint: Any, where: str) -> Any:
    """`value` converted to `hint`; ValueError `"<where> expects <type>, got <value>"` when it does not fit."""
    out = _convert(value, hint)
    if out is _MISSING:
        raise ValueError(f"{where} expects {describe(hint)}, got {value!r}")
    return out


@functools.cache
def field_hints(cls: type) -> dict[str, Any]:
    """{field name: resolved type hint} of a dataclass; a hint that cannot be resolved is Any (not checked)."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # e.g. names only imported under TYPE_CHECKING: check what can be checked
        hints = {}
    return {f.name: hints.get(f.name, f.type if not isinstance(f.type, str) else Any) for f in dataclasses.fields(cls)}


def describe(hint: Any) -> str:
    """A type hint as an error message shows it: `int`, `float or null`, `one of 'rope', 'learned'`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(describe(a) for a in args)}]" if args else name
    return getattr(hint, "__name__", str(hint))


def _parse(text: str) -> Any:
    """What a command-line string means for a non-string field: YAML, then float() for `1e-3`."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _is_null(value: Any) -> bool:
    """None, or a string that YAML reads as null (`null`, `~`; not the empty string)."""
    return value is None or (isinstance(value, str) and bool(value.strip()) and _parse(value) is None)


def _convert(value: Any, hint: Any) -> Any:
    """The converted value, or _MISSING when it does not fit the hint."""
    if hint is Any or hint is object:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and _is_null(value):
            return None
        for arg in args:  # in the declared order: `dict | str` tries the mapping first
            out = _MISSING if arg is type(None) else _convert(value, arg)
            if out is not _MISSING:
                return out
        return _MISSING
    if hint is type(None):
        return None if _is_null(value) else _MISSING
    if origin is Literal:
        for candidate in (value, _parse(value) if isinstance(value, str) else _MISSING):
            for a in args:
                if type(candidate) is type(a) and candidate == a:
                    return a
        return _MISSING
    if hint is bool:
        value = _parse(value) if isinstance(value, str) else value
        return value if isinstance(value, bool) else _MISSING
    if hint is int:
        value = _parse(value) if isinstance(value, str) else value
        return value if isinstance(value, int) and not isinstance(value, bool) else _MISSING
    if hint is float:
        value = _parse(value) if isinstance(value, str) else value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        return _MISSING
    if hint is str:
        if isinstance(value, str):
            return value
        # a YAML or command-line `name: 2024` means the string
        return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _MISSING
    container = origin or hint
    if isinstance(container, type) and issubclass(container, collections.abc.Mapping):
        value = _parse(value) if isinstance(value, str) else value
        if not isinstance(value, collections.abc.Mapping):
            return _MISSING
        if len(args) != 2:
            return dict(value)
        out = {}
        for k, v in value.items():
            k, v = _convert(k, args[0]), _convert(v, args[1])
            if k is _MISSING or v is _MISSING:
                return _MISSING
            out[k] = v
        return out
    if isinstance(container, type) and container in (list, tuple, collections.abc.Sequence):
        value = _parse(value) if isinstance(value, str) else value
        if not isinstance(value, (list, tuple)):
            return _MISSING
        if not args:
            return list(value) if container is list else value
        item_hints = args if container is tuple and (len(args) != 2 or args[1] is not Ellipsis) else None
        if item_hints is not None and len(item_hints) != len(value):
            return _MISSING
        items = [_convert(v, item_hints[i] if item_hints else args[0]) for i, v in enumerate(value)]
        if any(i is _MISSING for i in items):
            return _MISSING
        return tuple(items) if container is tuple else items
    if isinstance(hint, type):
        return value if isinstance(value, hint) else _MISSING
    return value  # a hint this checker does not know (TypeVar, Callable, ...): not checked
