"""Pluggable attention mechanisms: `register_attention`, `get_attention`, `available_attention`.

Each built-in mechanism lives in its own module, which registers it when the registry first looks its name up
(`registry.BUILTIN_MODULES`): importing this package imports no mechanism. `SelfExtendAttn` (the Self-Extend
op with the `selfextend` package's call shape) is importable from here too; it loads its module on first use.
"""

import importlib

from litattn.attention.base import AttentionContext, AttentionMechanism, AttentionOptions
from litattn.attention.registry import (
    available_attention,
    describe,
    get_attention,
    normalize_attention_spec,
    register_attention,
)

__all__ = [
    "AttentionContext",
    "AttentionMechanism",
    "AttentionOptions",
    "available_attention",
    "describe",
    "get_attention",
    "normalize_attention_spec",
    "register_attention",
    "SelfExtendAttn",
]

_LAZY = {"SelfExtendAttn": "litattn.attention.self_extend"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
