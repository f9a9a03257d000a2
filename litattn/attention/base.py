"""What every attention mechanism receives, and the base class whose steps variants override.

The model projects x to q, k, v and hands them to the mechanism **before RoPE**, together
with an `AttentionContext` built once per forward pass. The base class is plain causal
attention, split into steps so a variant overrides only what differs:

    forward(q, k, v, ctx)
      q, k = rotate(q, k, ctx)           positions: RoPE at ctx.positions (Self-Extend: two maps)
      k, v = cache(k, v, ctx)            KV cache write + read when decoding
      y    = attend(q, k, v, ctx)        kernel under mask_mod(ctx) (None = plain causal)

Shapes: q (B, n_head, T, hs), k and v (B, n_query_groups, T, hs); returns (B, n_head, T, hs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from litattn.attention import masks
from litattn.attention.cache import KVCache
from litattn.attention.kernels import KERNELS, attend, attention_probs

if TYPE_CHECKING:
    from litattn.config import Config


@dataclass
class AttentionContext:
    """Per-forward inputs shared by all layers. The model fills it without interpreting `metadata`."""

    positions: torch.Tensor
    """(T,) absolute position of each query token."""
    cos: torch.Tensor | None
    sin: torch.Tensor | None
    """(T, rope_n_elem) RoPE tables at `positions`; None with learned absolute positions."""
    rope: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None
    """positions -> (cos, sin), for mechanisms that rotate at other positions."""
    input_pos: torch.Tensor | None = None
    """Set when decoding with the KV cache (then equal to `positions`)."""
    kv_len: int = 0
    """With the KV cache: number of cache slots the queries may read (max position + 1)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Batch attention metadata (segment_ids, prefix_len, ...), passed through from the data."""
    memo: dict[str, Any] = field(default_factory=dict)
    """Objects built once per forward and shared by the layers (e.g. a block mask)."""
    attention_maps: list[torch.Tensor] | None = None
    """When a list, each layer appends its attention probabilities (B, n_head, T, S) (for visualization)."""

    def memoize(self, key: str, build: Callable[[], Any]) -> Any:
        if key not in self.memo:
            self.memo[key] = build()
        return self.memo[key]

    @property
    def causal_aligned(self) -> bool:
        """Queries are positions 0..T-1 and see exactly the keys 0..T-1: the fused causal path applies."""
        return self.input_pos is None or self.kv_len == self.positions.shape[0]


@dataclass
class AttentionOptions:
    """Options every mechanism has. A mechanism's Options subclass this and add its own."""

    kernel: str = "auto"
    """auto | sdpa | flex: the kernel for masked attention (see litattn.attention.kernels)."""


def rotate_half_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (rotate-half / GPT-NeoX layout) on the first cos.shape[-1] dims of x (..., T, hs)."""
    n = cos.shape[-1]
    if n == 0:
        return x
    x_rope, x_pass = x[..., :n], x[..., n:]
    x1, x2 = x_rope[..., : n // 2], x_rope[..., n // 2 :]
    rotated = torch.cat((-x2, x1), dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    out = x_rope * cos + rotated * sin
    return torch.cat((out, x_pass), dim=-1) if x_pass.shape[-1] else out


class AttentionMechanism(nn.Module):
    """Causal softmax attention; the base every mechanism derives from."""

    Options: ClassVar[type] = AttentionOptions
    registered_name: ClassVar[str] = ""
    # What the mechanism can do; the model asks the instance, so a wrapper may set these from its base.
    supports_training: bool = True
    supports_kv_cache: bool = True
    kernels: ClassVar[tuple[str, ...]] = KERNELS

    def __init__(self, config: Config, block_idx: int, options: AttentionOptions):
        super().__init__()
        self.config = config
        self.block_idx = block_idx
        self.options = options
        self.kv_cache: KVCache | None = None

    # ------------------------------------------------------------------ declarations
    @classmethod
    def validate_options(cls, options: AttentionOptions) -> None:
        """Raise ValueError for option values this mechanism cannot run with."""
        if options.kernel not in cls.kernels:
            raise ValueError(
                f"Attention {cls.registered_name!r} supports kernels {list(cls.kernels)}, not {options.kernel!r}"
            )

    @classmethod
    def max_seq_length(cls, config: Config, options: AttentionOptions) -> int:
        """Longest sequence the mechanism handles for a model trained at config.block_size."""
        return config.block_size

    def reset_parameters(self) -> None:
        """Initialise the mechanism's own parameters (called after the model's init)."""

    def parameter_overhead(self) -> int:
        """Parameters this mechanism adds to the layer (0 for the baseline)."""
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ the steps
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        q, k = self.rotate(q, k, ctx)
        k, v = self.cache(k, v, ctx)
        return self.attend(q, k, v, ctx)

    def rotate(self, q, k, ctx: AttentionContext):
        if ctx.cos is None:
            return q, k
        return rotate_half_rope(q, ctx.cos, ctx.sin), rotate_half_rope(k, ctx.cos, ctx.sin)

    def cache(self, k, v, ctx: AttentionContext):
        if ctx.input_pos is None:
            return k, v
        if self.kv_cache is None:
            raise RuntimeError(
                "input_pos was given but the KV cache is not set: call model.set_kv_cache(batch_size) first"
            )
        return self.kv_cache.update(ctx.input_pos, k, v, ctx.kv_len)

    def mask_mod(self, ctx: AttentionContext) -> masks.MaskMod | None:
        """The mask beyond plain causal; None means plain causal (the fused path when aligned)."""
        window = self.config.sliding_window_size
        span = ctx.kv_len if ctx.input_pos is not None else ctx.positions.shape[0]
        if window is not None and span > window:
            return ctx.memoize("sliding_window", lambda: masks.sliding_window(ctx.positions, window))
        return None

    def attend(self, q, k, v, ctx: AttentionContext) -> torch.Tensor:
        mask_mod = self.mask_mod(ctx)
        if mask_mod is None:
            if ctx.causal_aligned and ctx.attention_maps is None:
                return attend(q, k, v, is_causal=True)
            mask_mod = ctx.memoize("causal", lambda: masks.causal(ctx.positions))
        if ctx.attention_maps is not None:
            probs = attention_probs(q, k, mask_mod)
            ctx.attention_maps.append(probs)
            return probs.to(v.dtype) @ v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        return attend(q, k, v, mask_mod=mask_mod, kernel=self.options.kernel)

    # ------------------------------------------------------------------ KV cache
    def set_kv_cache(self, batch_size: int, max_seq_length: int, device=None, dtype=None) -> None:
        self.kv_cache = self.build_kv_cache(batch_size, max_seq_length, device=device, dtype=dtype)

    def clear_kv_cache(self) -> None:
        self.kv_cache = None

    def build_kv_cache(self, batch_size: int, max_seq_length: int, device=None, dtype=None) -> KVCache:
        """The cache this mechanism decodes with; override to store something else."""
        cfg = self.config
        return KVCache(
            batch_size, cfg.n_query_groups, max_seq_length, cfg.head_size, cfg.head_size, device=device, dtype=dtype
        )
