"""Pluggable attention mechanisms: `register_attention`, `get_attention`, `available_attention`.

Each built-in mechanism lives in its own module, which registers it when the registry first looks its name up
(`registry.BUILTIN_MODULES`): importing this package imports no mechanism.
"""

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
]
