"""Independent oracles for the tests: plain, slow, obviously-correct implementations."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from litattn.attention import AttentionMechanism, AttentionOptions, masks, register_attention


def naive_attention(q, k, v, mask=None, scale=None):
    """softmax(q k^T * scale, masked) v in float64. q (B, nh, T, hs); k, v (B, ng, S, hs); mask bool (.., T, S)."""
    nh, ng = q.shape[1], k.shape[1]
    k = k.repeat_interleave(nh // ng, dim=1).double()
    v = v.repeat_interleave(nh // ng, dim=1).double()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q.double() @ k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).to(q.dtype)


def naive_attention_probs(q, k, mask=None, scale=None):
    """softmax(q k^T * scale, masked) in float64, (B, nh, T, S): the probabilities naive_attention weighs v with."""
    nh, ng = q.shape[1], k.shape[1]
    k = k.repeat_interleave(nh // ng, dim=1).double()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q.double() @ k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1)


def causal_mask(q_pos, kv_len, window=None):
    """Loop-built boolean mask (T, S): key j visible to query at position p iff j <= p (and p - j < window)."""
    mask = torch.zeros(len(q_pos), kv_len, dtype=torch.bool)
    for i, p in enumerate(q_pos.tolist()):
        for j in range(kv_len):
            mask[i, j] = j <= p and (window is None or p - j < window)
    return mask


def naive_rope(x, positions, n_elem, base):
    """Rotate-half RoPE computed pair by pair with explicit angles (float64)."""
    out = x.double().clone()
    half = n_elem // 2
    for t, p in enumerate(positions.tolist()):
        for i in range(half):
            theta = p / base ** (2 * i / n_elem)
            a, b = x[..., t, i].double(), x[..., t, i + half].double()
            out[..., t, i] = a * math.cos(theta) - b * math.sin(theta)
            out[..., t, i + half] = b * math.cos(theta) + a * math.sin(theta)
    return out.to(x.dtype)


def gpt2_byte_symbols() -> dict[int, str]:
    """GPT-2's bytes_to_unicode: byte value -> the printable character byte-level BPE uses for it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return symbols


# ------------------------------------------------------------- a mechanism for override tests
@dataclass
class WindowOptions(AttentionOptions):
    window: int = 8


@register_attention("test_window")
class WindowAttention(AttentionMechanism):
    """Sliding-window causal attention that claims 4x the trained context (a test mechanism: evaluate and
    visualize tests run a checkpoint with it as an attention override)."""

    Options = WindowOptions

    @classmethod
    def max_seq_length(cls, config, options):
        return 4 * config.block_size

    def mask_mod(self, ctx):
        return masks.sliding_window(ctx.positions, self.options.window)


def assert_same_gradients(attend, reference, leaves, generator, atol=1e-9):
    """q, k, v gradients of attend(q, k, v) and reference(q, k, v) under one random output weighting agree
    (leaves: float64 q, k, v with requires_grad)."""
    q = leaves[0]
    weights = torch.randn(q.shape, dtype=q.dtype, generator=generator)
    grads = [torch.autograd.grad((fn(*leaves) * weights).sum(), leaves) for fn in (attend, reference)]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)
