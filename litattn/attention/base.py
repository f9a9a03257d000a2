"""What every attention mechanism receives, and the base class whose steps variants override.

The model projects x to q, k, v and hands them to the mechanism **before RoPE**, together
with an `AttentionContext` built once per forward pass. The base class is plain causal
attention, split into steps so a variant overrides only what differs:

    prepare_context(ctx)                 once per forward, before the layers: metadata from ctx.idx
    forward(q, k, v, ctx)
      q, k = rotate(q, k, ctx)           positions: RoPE at ctx.positions
      k, v = cache(k, v, ctx)            KV cache write at ctx.input_pos (slots) + read when decoding
                                         (cache_before_rope: cache first, then rotate the cached keys
                                         at their stored positions; Self-Extend re-rotates them)
      y    = attend(q, k, v, ctx)        kernel under mask_mod(ctx) (None = plain causal)
    run_blocks(blocks, x, ctx)           the layer loop (default: each block once)

Shapes: q (B, n_head, T, hs), k and v (B, n_query_groups, T, hs); returns (B, n_head, T, hs).
Positions (RoPE, and what position-aware masks compare) and cache slots (where keys are written,
what `kv_idx` indexes) are the same unless a forward is given both: kept tokens of a truncated
input keep their original positions in contiguous slots.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from litattn.attention import masks
from litattn.attention.cache import KVCache
from litattn.attention.kernels import KERNELS, attend, attend_observed

if TYPE_CHECKING:
    from litattn.config import Config


@dataclass
class AttentionContext:
    """Per-forward inputs shared by all layers. The model fills it without interpreting `metadata`."""

    positions: torch.Tensor
    """(T,) position of each query token: what RoPE rotates by and what position terms (SSA) read."""
    cos: torch.Tensor | None
    sin: torch.Tensor | None
    """(T, rope_n_elem) RoPE tables at `positions`; None with learned absolute positions."""
    rope: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None
    """positions -> (cos, sin), for mechanisms that rotate at other positions."""
    input_pos: torch.Tensor | None = None
    """(T,) KV-cache slots the queries' keys are written to, when decoding with the cache."""
    kv_len: int = 0
    """Number of key slots the queries may read: T without the cache, max slot + 1 with it."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Batch attention metadata (segment_ids, prefix_len, ...): given by the caller or derived from `idx`
    by the mechanism's `prepare_context`; only the keys the mechanism declares in `metadata_keys`."""
    idx: torch.Tensor | None = None
    """(B, T) the batch's token ids, from which a mechanism may derive its metadata."""
    observer: Any = None
    """An AttentionObserver (litattn.attention.observers): attention then runs explicitly, one query chunk at
    a time, and each chunk's probabilities go to observer.observe(application, q_start, probs)."""
    head: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Final norm + output head: hidden states (B, T, n_embd) -> logits (B, T, padded_vocab_size), for a layer
    loop that scores its own intermediate states (hybrid's gradient refinement)."""
    applied_blocks: list[int] = field(default_factory=list)
    """Indexes of the blocks applied so far in this forward, in order (a layer loop may repeat blocks)."""
    memo: dict[str, Any] = field(default_factory=dict, init=False)
    """Objects built once per context and shared by the layers (e.g. a mask). Not an init field, so
    `dataclasses.replace(ctx, positions=...)` (a sub-pass) starts with an empty memo of its own."""

    def memoize(self, key: str, build: Callable[[], Any]) -> Any:
        if key not in self.memo:
            self.memo[key] = build()
        return self.memo[key]

    @property
    def slots(self) -> torch.Tensor:
        """(T,) the key slot of each query: `input_pos` when decoding with the cache, else 0..T-1."""
        if self.input_pos is not None:
            return self.input_pos
        return self.memoize("slots", lambda: torch.arange(self.positions.shape[-1], device=self.positions.device))

    @property
    def application(self) -> int:
        """Index of the block application running now (the layer index when each block runs once)."""
        return len(self.applied_blocks) - 1

    @property
    def causal_aligned(self) -> bool:
        """Queries are slots 0..T-1 and see exactly the keys 0..T-1: the fused causal path applies."""
        return self.input_pos is None or self.kv_len == self.positions.shape[-1]


@dataclass
class AttentionOptions:
    """Options every mechanism has. A mechanism's Options subclass this and add its own."""

    kernel: str = "auto"
    """auto | sdpa | flex: the kernel for masked attention (see litattn.attention.kernels)."""


def integer_metadata(
    owner: str, name: str, given: Any, shape: tuple[int, ...], meaning: str, device=None
) -> torch.Tensor:
    """Batch metadata `name` as a long tensor of exactly `shape` (a tensor, array or nested list of integers),
    else a one-line ValueError that names the expected and the given shape and type. Nothing is broadcast or
    cut: a (B, 8) array for 16 tokens is an error, not 8 segments padded with attention that silently differs."""
    expected = f"{name} must be integers of shape {tuple(shape)}, {meaning}"
    try:
        value = torch.as_tensor(given, device=device)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{owner}: {expected}, got {type(given).__name__} {_brief(given)}") from None
    if value.dtype == torch.bool or value.is_floating_point() or value.is_complex() or tuple(value.shape) != shape:
        dtype = str(value.dtype).removeprefix("torch.")
        raise ValueError(f"{owner}: {expected}, got {dtype} of shape {tuple(value.shape)}")
    return value.long()


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
    metadata_keys: ClassVar[dict[str, str]] = {}
    """The batch metadata the mechanism reads, name -> "shape: meaning" (e.g. {"segment_ids": "(B, T) long:
    the segment of each token"}). Metadata the mechanism does not declare is an error, never ignored."""
    segment_key: ClassVar[str | None] = None
    """The metadata key of per-token segment ids (B, T) long, once `prepare_context` has run, for a mechanism
    that splits a sequence into segments; `litattn evaluate attention` reports the mass kept in a query's own
    segment from it."""
    cache_before_rope: bool = False
    """Cache keys before RoPE and rotate the cached keys at their stored positions on every step
    (the cache then keeps each slot's position), instead of caching rotated keys. A class default an instance
    may override: litattn.streaming turns it on in every mechanism, so keys moved to other slots by eviction
    are rotated at their new positions."""
    cached_extras: ClassVar[dict[str, torch.dtype]] = {}
    """Per-slot tensors the KV cache keeps besides k and v (name -> dtype, stored (B, slots)); `cache_values`
    gives their values for the tokens being written."""
    trailing_positions_independent: ClassVar[bool] = True
    """No position depends on a later one (causal), so dropping trailing padding columns of a batch leaves
    every loss unchanged (what `collate` asks before trimming)."""
    rethink_every: int | None = None
    """For a mechanism that reads a prefix (`prefix_len` metadata): generation extends the prefix over all the
    text so far every this many new tokens and reads it again from the start, rebuilding the KV cache (hybrid's
    `rethink_every` option sets it); None: never. `generate(rethink_every=...)` overrides it."""

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
    def check_token_id_option(cls, options: AttentionOptions, name: str) -> None:
        """An option naming a token id (None: the id litattn's tokenizers give the token) is >= 0."""
        value = getattr(options, name)
        if value is not None and value < 0:
            raise ValueError(f"{cls.registered_name}: {name} must be a token id >= 0 (or null), got {value}")

    def token_id_option(self, name: str, default: int, what: str) -> int:
        """The token id option `name` (None: `default`), checked against the model's vocabulary."""
        value = getattr(self.options, name)
        token = default if value is None else value
        if token >= self.config.padded_vocab_size:
            raise ValueError(
                f"{self.registered_name}: {name} {token} is outside the vocabulary ({self.config.padded_vocab_size}); "
                f"set attention.{name} to the id of {what} in this model's tokenizer"
            )
        return token

    @classmethod
    def max_seq_length(cls, config: Config, options: AttentionOptions) -> int:
        """Longest sequence the mechanism handles for a model trained at config.block_size."""
        return config.block_size

    def build_modules(self, make_block: Callable[[int], nn.Module]) -> None:
        """Called once, right after construction, with `make_block(block_idx)`, a factory of new model blocks of
        this config and mechanism: a mechanism whose parts are built from the model's own (hybrid's added
        thought layers) makes them here, as mechanisms do not import the model. Nothing by default."""

    def reset_parameters(self) -> None:
        """Initialise the mechanism's own parameters (called after the model's init)."""

    def parameter_overhead(self) -> int:
        """Parameters this mechanism adds to the layer (0 for the baseline)."""
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ model-level hooks (asked of layer 0)
    def prepare_context(self, ctx: AttentionContext) -> None:
        """Once per forward, before the layers: derive metadata from ctx.idx (and the given metadata) into
        ctx.metadata. Training, generate, evaluate and visualize all call it, so none needs mechanism code."""

    def run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """The layer loop: each block once, in order. A mechanism may repeat or reorder blocks; it then
        also overrides `block_applications`, which FLOPs accounting reads."""
        for block in blocks:
            x = block(x, ctx)
        return x

    def block_applications(self, n_layer: int) -> int:
        """How many block applications one forward runs (n_layer for one pass over the blocks)."""
        return n_layer

    def training_hooks(self) -> list:
        """TrainingHooks (litattn.hooks) the training loops call at epoch start and after each step."""
        return []

    # ------------------------------------------------------------------ the steps
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        if self.cache_before_rope:
            k, v = self.cache(k, v, ctx)
            q, k = self.rotate(q, k, ctx, key_positions=self.key_positions(ctx))
        else:
            q, k = self.rotate(q, k, ctx)
            k, v = self.cache(k, v, ctx)
        return self.attend(q, k, v, ctx)

    def rotate(self, q, k, ctx: AttentionContext, key_positions: torch.Tensor | None = None):
        """RoPE on q at ctx.positions and on k at `key_positions` (default: the same positions)."""
        if ctx.cos is None:
            return q, k
        q = rotate_half_rope(q, ctx.cos, ctx.sin)
        if key_positions is None:
            return q, rotate_half_rope(k, ctx.cos, ctx.sin)
        cos, sin = ctx.rope(key_positions)
        return q, rotate_half_rope(k, cos, sin)

    def key_positions(self, ctx: AttentionContext) -> torch.Tensor:
        """(S,) positions of the keys `cache` returned: the queries' own without the cache, else the
        positions stored in its slots (needs cache_before_rope, which stores them)."""
        if ctx.input_pos is None:
            return ctx.positions
        return self.kv_cache.extras["positions"][0, : ctx.kv_len]

    def cache_values(self, ctx: AttentionContext, batch_size: int) -> dict[str, torch.Tensor]:
        """The per-slot extras (`cached_extras`, plus positions with cache_before_rope) of the tokens being
        written: name -> (B, T). Override to add your own (e.g. segment ids from ctx.metadata)."""
        if not self.cache_before_rope:
            return {}
        return {"positions": ctx.positions.expand(batch_size, -1)}

    def cache(self, k, v, ctx: AttentionContext):
        if ctx.input_pos is None:
            return k, v
        if self.kv_cache is None:
            raise RuntimeError(
                "input_pos was given but the KV cache is not set: call model.set_kv_cache(batch_size) first"
            )
        return self.kv_cache.update(ctx.input_pos, k, v, ctx.kv_len, **self.cache_values(ctx, k.shape[0]))

    def mask_mod(self, ctx: AttentionContext) -> masks.MaskMod | None:
        """The mask beyond plain causal, over cache slots; None means plain causal (the fused path when aligned)."""
        window = self.config.sliding_window_size
        span = ctx.kv_len if ctx.input_pos is not None else ctx.positions.shape[-1]
        if window is not None and span > window:
            return ctx.memoize("sliding_window", lambda: masks.sliding_window(ctx.slots, window))
        return None

    def attend(self, q, k, v, ctx: AttentionContext) -> torch.Tensor:
        mask_mod = self.mask_mod(ctx)
        if ctx.observer is not None:
            mask_mod = mask_mod or ctx.memoize("causal", lambda: masks.causal(ctx.slots))
            return attend_observed(q, k, v, mask_mod=mask_mod, observer=ctx.observer, layer=ctx.application)
        if mask_mod is None:
            if ctx.causal_aligned:
                return attend(q, k, v, is_causal=True)
            mask_mod = ctx.memoize("causal", lambda: masks.causal(ctx.slots))
        return attend(q, k, v, mask_mod=mask_mod, kernel=self.options.kernel)

    # ------------------------------------------------------------------ KV cache
    def set_kv_cache(self, batch_size: int, max_seq_length: int, device=None, dtype=None) -> None:
        self.kv_cache = self.build_kv_cache(batch_size, max_seq_length, device=device, dtype=dtype)

    def clear_kv_cache(self) -> None:
        self.kv_cache = None

    def build_kv_cache(self, batch_size: int, max_seq_length: int, device=None, dtype=None) -> KVCache:
        """The cache this mechanism decodes with: k, v and the per-slot extras it declares."""
        cfg = self.config
        extras = dict(self.cached_extras)
        if self.cache_before_rope:
            extras["positions"] = torch.long
        return KVCache(
            batch_size,
            cfg.n_query_groups,
            max_seq_length,
            cfg.head_size,
            cfg.head_size,
            extras=extras,
            device=device,
            dtype=dtype,
        )
