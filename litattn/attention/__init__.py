"""Pluggable attention mechanisms: `register_attention`, `get_attention`, `available_attention`.

Each built-in mechanism lives in its own module, imported here so that it registers.
"""

from litattn.attention import (
    causal,  # noqa: E402,F401  (registers "causal")
    disrupt_set,  # noqa: E402,F401  (registers "disrupt_set")
    hybrid,  # noqa: E402,F401  (registers "hybrid")
    self_extend,  # noqa: E402,F401  (registers "self_extend")
    ssa,  # noqa: E402,F401  (registers "ssa")
)
from litattn.attention.base import AttentionContext, AttentionMechanism, AttentionOptions  # noqa: E402
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
