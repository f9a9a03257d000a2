"""Name -> mechanism class, and validation of the `attention:` spec of a model config.

A spec is a plain dict, as it appears in YAML: `{"name": "ssa", "beta_init": 2.0}`. The optional
key `module` names a Python module to import first, which is how a mechanism defined outside
litattn (decorated with `@register_attention`) is selected from a YAML file.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from litattn.typecheck import check_value, field_hints

if TYPE_CHECKING:
    from litattn.attention.base import AttentionMechanism

_REGISTRY: dict[str, type[AttentionMechanism]] = {}
# Built-in mechanisms register when their module is first imported, on first use of their name: so the config and
# the model can import this registry without importing every mechanism (none of which imports them back).
BUILTIN_MODULES = {
    "causal": "litattn.attention.causal",
    "disrupt_set": "litattn.attention.disrupt_set",
    "hybrid": "litattn.attention.hybrid",
    "self_extend": "litattn.attention.self_extend",
    "ssa": "litattn.attention.ssa",
}


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
    for name, module in BUILTIN_MODULES.items():
        if name not in _REGISTRY:
            importlib.import_module(module)
    return sorted(_REGISTRY)


def get_attention(name: str) -> type[AttentionMechanism]:
    if name not in _REGISTRY and name in BUILTIN_MODULES:
        importlib.import_module(BUILTIN_MODULES[name])
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
    """Build `cls.Options` from a dict; a misspelt key is an error, never a silent default.

    Every value is checked against its field's type hint (and a command-line string converted to it,
    `"2"` -> 2.0 for a float) here, once for every mechanism, so `validate_options` sees typed values.
    """
    hints = field_hints(cls.Options)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        valid = ", ".join(sorted(hints)) or "none"
        raise ValueError(f"Unknown option(s) {unknown} for attention {cls.registered_name!r}. Valid options: {valid}")
    values = {
        key: check_value(value, hints[key], f"attention {cls.registered_name!r} option {key!r}")
        for key, value in values.items()
    }
    options = cls.Options(**values)
    cls.validate_options(options)
    return options


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """An `attention:` spec parsed once: the mechanism class, its typed options, and, for a mechanism that wraps
    another (SSA's `base` option), the wrapped one's spec, parsed too. The model and the mechanisms read this;
    `to_dict()` is the YAML form (every option filled in) that `model_config.yaml` stores."""

    name: str
    mechanism: type[AttentionMechanism]
    options: Any  # mechanism.Options
    module: str | None = None
    base: AttentionSpec | None = None

    @classmethod
    def parse(cls, spec: str | dict[str, Any] | AttentionSpec | None) -> AttentionSpec:
        if isinstance(spec, AttentionSpec):
            return spec
        if spec is None:
            spec = {"name": "causal"}
        if isinstance(spec, str):
            spec = {"name": spec}
        if not isinstance(spec, dict):
            raise ValueError(f"attention must be a mapping like {{'name': 'causal'}}, got {spec!r}")
        values = dict(spec)
        name = values.pop("name", None)
        if not name:
            raise ValueError("The attention spec needs a `name`, e.g. attention: {name: causal}")
        module = values.pop("module", None)
        if module:
            _import_module(module)
        mechanism = get_attention(name)
        options = parse_options(mechanism, values)
        # a mechanism that wraps another (SSA) parses the wrapped spec in its validate_options, as `base_spec`
        return cls(name, mechanism, options, module or None, getattr(options, "base_spec", None))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.module:
            out["module"] = self.module
        out.update(dataclasses.asdict(self.options))
        return out


def normalize_attention_spec(spec: str | dict[str, Any] | None) -> dict[str, Any]:
    """Validate a spec and return it with every option filled in (what `model_config.yaml` stores)."""
    return AttentionSpec.parse(spec).to_dict()


def split_spec(spec: dict[str, Any]) -> tuple[type[AttentionMechanism], Any]:
    """(mechanism class, typed options) from a spec."""
    parsed = AttentionSpec.parse(spec)
    return parsed.mechanism, parsed.options


def merge_attention_specs(old: Any, new: Any, where: str = "attention") -> Any:
    """`new` (an override, perhaps partial) merged into the spec `old`, key by key at any depth.

    Same mechanism (or `new` names none): a deep merge. A different `name` switches mechanism: the old
    options the new mechanism also has are kept (`kernel`, say), the others are dropped with one warning
    that names them. Mapping-valued options (SSA's `base` spec) merge by the same rule. Strings are
    names (`"ssa"` means `{name: ssa}`); None or a non-mapping `old` is simply replaced.
    """
    if isinstance(new, str):
        new = {"name": new}
    if isinstance(old, str) and isinstance(new, dict):
        old = {"name": old}
    if not isinstance(old, dict) or not isinstance(new, dict):
        return copy.deepcopy(new)
    old_name, new_name = old.get("name"), new.get("name")
    out = copy.deepcopy(old)
    if old_name is not None and new_name is not None and new_name != old_name:
        if new.get("module"):
            _import_module(new["module"])
        shared = {f.name for f in dataclasses.fields(get_attention(new_name).Options)}
        dropped = [k for k in old if k not in shared and k not in ("name", "module")]
        if dropped:
            warnings.warn(
                f"{where}: switching {old_name!r} -> {new_name!r} drops option(s) {', '.join(dropped)} "
                f"({new_name!r} does not have them)",
                stacklevel=2,
            )
        out = {"name": new_name, **{k: v for k, v in out.items() if k in shared}}
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(out.get(key), (dict, str)) and key not in ("name", "module"):
            out[key] = merge_attention_specs(out[key], value, f"{where}.{key}")
        else:
            out[key] = copy.deepcopy(value)
    return out


def _import_module(module: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"Cannot import attention module {module!r} named in the attention spec: {e}") from e
