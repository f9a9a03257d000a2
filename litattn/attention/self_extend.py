"""Self-Extend: training-free context extension of a RoPE model by grouped + neighbour attention.

Jin et al., "LLM Maybe LongLM: Self-Extend LLM Context Window Without Tuning", ICML 2024
(released code: datamllab/LongLM). For query position i and key position j, with group size G
and neighbour window W (floor division):

    neighbour branch, 0 <= i - j < W:  RoPE at i for the query and j for the key (as trained)
    grouped branch,   i - j >= W:      RoPE at floor(i/G) + W - floor(W/G) for the query, floor(j/G)
                                       for the key: distant tokens share coarse positions
    one softmax over the scores of both branches (the causal keys of each query split between them)

so the relative distances the model sees never exceed what it was trained on, for inputs up to
(L - W) * G + W tokens (L = block_size). A sequence not longer than W is exactly causal attention.

Memory is linear in T: queries go in blocks; a block's neighbour keys are the band of at most
block + W keys behind it, its grouped keys those at least W behind; scores exist only per block
(block x (T + W)), and with gradients each block is recomputed in the backward pass (activation
checkpointing), so no T x T tensor exists in training either. Keys are cached before RoPE
(`cache_before_rope`) and re-rotated under both maps at every decoding step, which makes chunked
prefill and decoding equal to the full forward.

Differences from the released code: chunked prefill works (the released code needs a query length of
1 or the whole sequence), batch > 1 works (its flash path breaks), floor division everywhere (one of
its files uses `/`, wrong when G does not divide W).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from litattn.attention.base import AttentionContext, AttentionMechanism, AttentionOptions, rotate_half_rope
from litattn.attention.registry import register_attention

if TYPE_CHECKING:
    from litattn.config import Config

QUERY_BLOCK = 256
"""Queries per block: scores of one block are (B, H, QUERY_BLOCK, <= T + W) float32."""


@dataclass
class SelfExtendOptions(AttentionOptions):
    group_size: int = 8
    """G: distant keys share positions in groups of G (the extension factor, roughly)."""
    window: int = 1024
    """W: keys closer than W to the query keep their exact positions (must be below the trained context)."""
    scale_base: float | None = None
    """The authors' query log-scaling on the grouped branch for long passkey tests:
    q *= max(1, ln(pos + 1) / ln(scale_base)). None: off."""


@register_attention("self_extend")
class SelfExtend(AttentionMechanism):
    """Self-Extend: grouped + neighbour attention for training-free context extension (ICML 2024)."""

    Options = SelfExtendOptions
    kernels = ("auto", "sdpa")
    cache_before_rope = True

    def __init__(self, config: Config, block_idx: int, options: SelfExtendOptions):
        super().__init__(config, block_idx, options)
        if config.rope_n_elem == 0:
            raise ValueError(
                "self_extend regroups RoPE positions; this model has learned absolute positions (GPT-2 style) "
                "and cannot use it"
            )
        if config.sliding_window_size is not None and block_idx == 0:
            warnings.warn(
                f"self_extend: the model's sliding window ({config.sliding_window_size}) is turned off, as the "
                "method requires",
                stacklevel=2,
            )

    @classmethod
    def validate_options(cls, options: SelfExtendOptions) -> None:
        super().validate_options(options)
        if options.group_size < 1:
            raise ValueError(f"self_extend: group_size must be >= 1, got {options.group_size}")
        if options.window < 1:
            raise ValueError(f"self_extend: window must be >= 1, got {options.window}")
        if options.scale_base is not None and not options.scale_base > 1:
            raise ValueError(f"self_extend: scale_base must be > 1 (or null), got {options.scale_base}")

    @classmethod
    def max_seq_length(cls, config: Config, options: SelfExtendOptions) -> int:
        if options.window >= config.block_size:
            raise ValueError(
                f"self_extend: window={options.window} must be smaller than the trained context "
                f"(block_size={config.block_size})"
            )
        return (config.block_size - options.window) * options.group_size + options.window

    # ------------------------------------------------------------------ the steps
    def rotate(self, q, k, ctx: AttentionContext, key_positions: torch.Tensor | None = None):
        """Nothing here: `attend` rotates under both position maps."""
        return q, k

    def attend(self, q, k, v, ctx: AttentionContext) -> torch.Tensor:
        if ctx.observer is not None:
            raise RuntimeError("self_extend does not report attention maps yet (no observer support)")
        opts = self.options
        return grouped_neighbour_attention(
            q, k, v, ctx.positions, self.key_positions(ctx), ctx.rope, opts.group_size, opts.window, opts.scale_base
        )


def grouped_neighbour_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    rope,
    group_size: int,
    window: int,
    scale_base: float | None = None,
    scale: float | None = None,
    block: int = QUERY_BLOCK,
) -> torch.Tensor:
    """Self-Extend attention on tensors before RoPE: q (B, H, T, D), k and v (B, Hkv, S, D), q_pos (T,) and
    k_pos (S,) positions (keys in increasing position order, as the cache and a forward give them), rope:
    positions -> (cos, sin). Returns (B, H, T, D). Causal: key j is visible to query i iff k_pos[j] <= q_pos[i].
    """
    B, H, T, D = q.shape
    rep = H // k.shape[1]
    if rep > 1:  # GQA: each key/value head serves `rep` query heads (linear memory)
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scale = D**-0.5 if scale is None else scale
    g_q_pos = torch.div(q_pos, group_size, rounding_mode="floor") + window - window // group_size
    g_k_pos = torch.div(k_pos, group_size, rounding_mode="floor")
    cos_n, sin_n = rope(k_pos)
    cos_g, sin_g = rope(g_k_pos)
    k_n, k_g = rotate_half_rope(k, cos_n, sin_n), rotate_half_rope(k, cos_g, sin_g)
    q_cos, q_sin = rope(q_pos)
    gq_cos, gq_sin = rope(g_q_pos)
    q_n, q_g = rotate_half_rope(q, q_cos, q_sin), rotate_half_rope(q, gq_cos, gq_sin)
    if scale_base is not None:
        log_scale = (torch.log1p(q_pos.float()) / math.log(scale_base)).clamp(min=1.0)
        q_g = q_g * log_scale.to(q_g.dtype)[:, None]
    outs = []
    for start in range(0, T, block):
        end = min(T, start + block)
        args = (q_n[:, :, start:end], q_g[:, :, start:end], k_n, k_g, v, q_pos[start:end], k_pos, window, scale)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            outs.append(checkpoint(_block, *args, use_reentrant=False))
        else:
            outs.append(_block(*args))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _block(q_n, q_g, k_n, k_g, v, q_pos, k_pos, window: int, scale: float) -> torch.Tensor:
    """One query block: one softmax over its neighbour band and its grouped keys."""
    first, last = int(q_pos.min()), int(q_pos.max())
    # neighbour band: keys with last - W < pos <= last; grouped: keys with pos <= last - W
    lo = int(torch.searchsorted(k_pos, torch.tensor(first - window + 1, device=k_pos.device)))
    hi = int(torch.searchsorted(k_pos, torch.tensor(last, device=k_pos.device), right=True))
    g_hi = int(torch.searchsorted(k_pos, torch.tensor(last - window, device=k_pos.device), right=True))
    dt = torch.promote_types(q_n.dtype, torch.float32)  # scores in float32 at least
    dist_n = q_pos[:, None] - k_pos[None, lo:hi]  # (Tq, band)
    s_n = (q_n.to(dt) @ k_n[:, :, lo:hi].to(dt).transpose(-1, -2)) * scale
    s_n = s_n.masked_fill(~((dist_n >= 0) & (dist_n < window)), float("-inf"))
    if g_hi > 0:
        dist_g = q_pos[:, None] - k_pos[None, :g_hi]
        s_g = (q_g.to(dt) @ k_g[:, :, :g_hi].to(dt).transpose(-1, -2)) * scale
        s_g = s_g.masked_fill(~(dist_g >= window), float("-inf"))
        scores, values = torch.cat([s_n, s_g], dim=-1), torch.cat([v[:, :, lo:hi], v[:, :, :g_hi]], dim=2)
    else:
        scores, values = s_n, v[:, :, lo:hi]
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query with no visible key (padding) gets zeros
    return (probs.to(values.dtype) @ values).to(v.dtype)


# ---------------------------------------------------------------------------------- standalone API
def self_extend_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group_size: int,
    window: int,
    rope_base: float = 10000.0,
    scale: float | None = None,
) -> torch.Tensor:
    """Self-Extend on pre-RoPE tensors q (B, H, T, D), k and v (B, H_kv, T, D) (H_kv divides H), positions
    0..T-1, rotate-half RoPE over the full head dimension with `rope_base`. Returns (B, H, T, D)."""
    D = q.shape[-1]
    inv_freq = 1.0 / (rope_base ** (torch.arange(0, D, 2, dtype=torch.float32, device=q.device) / D))

    def rope(positions: torch.Tensor):
        freqs = positions.float()[:, None] * inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()

    positions = torch.arange(q.shape[2], device=q.device)
    return grouped_neighbour_attention(q, k, v, positions, positions, rope, group_size, window, scale=scale)


class SelfExtendAttention(nn.Module):
    """Self-Extend as a drop-in attention op: `module(q, k, v, pos)` on (B, T, dim) projections before RoPE
    (dim = n_head x head size), pos (T,) positions; returns (B, T, dim)."""

    def __init__(self, dim: int, n_head: int, group_size: int, window: int, rope_base: float = 10000.0) -> None:
        super().__init__()
        if dim % n_head:
            raise ValueError(f"dim={dim} must be a multiple of n_head={n_head}")
        self.n_head, self.group_size, self.window = n_head, group_size, window
        head = dim // n_head
        self.register_buffer(
            "inv_freq", 1.0 / (rope_base ** (torch.arange(0, head, 2, dtype=torch.float32) / head)), persistent=False
        )

    def rope(self, positions: torch.Tensor):
        freqs = positions.float()[:, None] * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        B, T, dim = q.shape
        heads = [x.view(B, T, self.n_head, -1).transpose(1, 2) for x in (q, k, v)]
        y = grouped_neighbour_attention(*heads, pos, pos, self.rope, self.group_size, self.window)
        return y.transpose(1, 2).reshape(B, T, dim)
