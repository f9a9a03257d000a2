"""Name -> mechanism class, and validation of the `attention:` spec of a model config.

A spec is a plain dict, as it appears in YAML: `{"name": "ssa", "beta_init": 2.0}`. The optional
key `module` names a Python module to import first, which is how a mechanism defined outside
litattn (decorated with `@register_attention`) is selected from a YAML file.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from litattn.attention.base import AttentionMechanism

_REGISTRY: dict[str, type[AttentionMechanism]] = {}


def register_attention(name: str) -> Callable[[type[AttentionMechanism]], type[AttentionMechanism]]:
    """Class decorator: make a mechanism selectable as `attention: {name: <name>}`."""

    def decorate(cls: type[AttentionMechanism]) -> type[AttentionMechanism]:
        existing = _REGISTRY.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(
                f"Attention mechanism {name!r} is already registered by {existing.__module__}.{existing.__qualname__}"
            )
        if not dataclasses.is_dataclass(cls.Options):
            raise TypeError(f"{cls.__qualname__}.Options must be a dataclass")
        cls.registered_name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def available_attention() -> list[str]:
    return sorted(_REGISTRY)


def get_attention(name: str) -> type[AttentionMechanism]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"Unknown attention mechanism {name!r}. Registered: {', '.join(available_attention())}"
            " (a mechanism of your own needs `module: your.module` in the attention spec)"
        ) from None


def describe(cls: type[AttentionMechanism]) -> str:
    """First line of the class docstring: what `litattn attention list` prints."""
    doc = (cls.__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def parse_options(cls: type[AttentionMechanism], values: dict[str, Any]) -> Any:
    """Build `cls.Options` from a dict; a misspelt key is an error, never a silent default."""
    fields = {f.name for f in dataclasses.fields(cls.Options)}
    unknown = sorted(set(values) - fields)
    if unknown:
        valid = ", ".join(sorted(fields)) or "none"
        raise ValueError(f"Unknown option(s) {unknown} for attention {cls.registered_name!r}. Valid options: {valid}")
    options = cls.Options(**values)
    cls.validate_options(options)
    return options


def normalize_attention_spec(spec: str | dict[str, Any] | None) -> dict[str, Any]:
    """Validate a spec and return it with every option filled in (what `model_config.yaml` stores)."""
    if spec is None:
        spec = {"name": "causal"}
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict):
        raise TypeError(f"attention must be a mapping like {{'name': 'causal'}}, got {spec!r}")
    values = dict(spec)
    name = values.pop("name", None)
    if not name:
        raise ValueError("The attention spec needs a `name`, e.g. attention: {name: causal}")
    module = values.pop("module", None)
    if module:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ValueError(f"Cannot import attention module {module!r} named in the attention spec: {e}") from e
    cls = get_attention(name)
    options = parse_options(cls, values)
    out: dict[str, Any] = {"name": name}
    if module:
        out["module"] = module
    out.update(dataclasses.asdict(options))
    return out


def split_spec(spec: dict[str, Any]) -> tuple[type[AttentionMechanism], Any]:
    """(mechanism class, typed options) from a normalized spec."""
    values = {k: v for k, v in spec.items() if k not in ("name", "module")}
    cls = get_attention(spec["name"])
    return cls, parse_options(cls, values)
