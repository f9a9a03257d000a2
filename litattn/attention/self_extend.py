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

Memory is linear in T: queries go in blocks, keys in tiles, with an online softmax (flash-attention
style); a block's neighbour keys are the band of at most block + W keys behind it, its grouped keys
those at least W behind; queries are rotated block by block and keys tile by tile under the
branch's map; scores exist one (block x tile) at a time, and with gradients each query block is
recomputed in the backward pass (activation checkpointing), so no T x T tensor exists in training
either. Keys are cached before RoPE
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

from litattn.attention.base import (
    AttentionContext,
    AttentionMechanism,
    AttentionOptions,
    integer_metadata,
    rotate_half_rope,
)
from litattn.attention.kernels import attend_parts_cpu
from litattn.attention.registry import parse_options, register_attention

if TYPE_CHECKING:
    from litattn.config import Config

QUERY_BLOCK = 256
"""Queries per block."""
KEY_TILE = 512
"""Keys per tile: one tile's scores are (B, H, QUERY_BLOCK, KEY_TILE) float32 (2 MiB for 4 heads)."""
FUSED_CPU = True
"""On CPU, run each query block on PyTorch's fused flash kernel (`attend_parts_cpu`) rather than the
portable online-softmax tiles (the path of other devices)."""


@dataclass
class SelfExtendOptions(AttentionOptions):
    group_size: int = 8
    """G: distant keys share positions in groups of G (the extension factor, roughly)."""
    window: int = 1024
    """W: keys closer than W to the query keep their exact positions (must be below the trained context)."""
    scale_base: float | None = None
    """The authors' query log-scaling for long passkey tests: q *= max(1, ln(pos + 1) / ln(scale_base)) at the
    query's absolute position, before both rotations (neighbour and grouped branch alike). None: off."""


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
        opts = self.options
        args = (
            q,
            k,
            v,
            ctx.positions,
            self.key_positions(ctx),
            ctx.rope,
            opts.group_size,
            opts.window,
            opts.scale_base,
        )
        if ctx.observer is not None:
            return observed_attention(*args, observe=lambda start, p: ctx.observer.observe(ctx.application, start, p))
        return grouped_neighbour_attention(*args)


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
    block: int | None = None,
) -> torch.Tensor:
    """Self-Extend attention on tensors before RoPE: q (B, H, T, D), k and v (B, Hkv, S, D), q_pos (T,) and
    k_pos (S,) positions (keys in increasing position order, as the cache and a forward give them), rope:
    positions -> (cos, sin). Returns (B, H, T, D). Causal: key j is visible to query i iff k_pos[j] <= q_pos[i].

    Flash-style: query blocks x key tiles with an online softmax, keys rotated tile by tile, so memory is
    O(block x tile) beyond the inputs and output; with gradients each query block is recomputed in backward.
    """
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    rep = H // Hkv
    block = block or QUERY_BLOCK
    scale = D**-0.5 if scale is None else scale
    fused = q.device.type == "cpu" and FUSED_CPU
    if fused:  # keys rotated once under each map; every block reads slices of them
        k_near = rotate_half_rope(k, *rope(k_pos))
        k_grouped = rotate_half_rope(k, *rope(torch.div(k_pos, group_size, rounding_mode="floor")))
    outs = []
    for start in range(0, T, block):
        end = min(T, start + block)
        pos = q_pos[start:end]
        qn, qg = _rotate_queries(q[:, :, start:end], pos, rope, group_size, window, scale_base)
        # GQA without copying keys: the `rep` query heads of a KV head become rows, (B, Hkv, rep * Tq, D)
        qn, qg = (x.reshape(B, Hkv, rep * (end - start), D) for x in (qn, qg))
        if fused:
            y = _fused_block(qn, qg, k_near, k_grouped, v, pos.repeat(rep), k_pos, window, scale)
        else:
            args = (qn, qg, k, v, pos.repeat(rep), k_pos, rope, group_size, window, scale)
            if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
                y = checkpoint(_block, *args, use_reentrant=False)
            else:
                y = _block(*args)
        outs.append(y.view(B, H, end - start, D))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _rotate_queries(q, pos, rope, group_size: int, window: int, scale_base: float | None):
    """q (B, H, Tq, D) at absolute positions pos (Tq,) rotated under the neighbour map (pos) and the grouped map.
    With scale_base, q is first scaled by max(1, ln(pos + 1) / ln(scale_base)), as the authors scale it: one
    scaled query feeds both rotations, so the neighbour branch is scaled too."""
    if scale_base is not None:
        q = q * (torch.log1p(pos.float()) / math.log(scale_base)).clamp(min=1.0).to(q.dtype)[:, None]
    qn = rotate_half_rope(q, *rope(pos))
    qg = rotate_half_rope(q, *rope(torch.div(pos, group_size, rounding_mode="floor") + window - window // group_size))
    return qn, qg


def observed_attention(
    q, k, v, q_pos, k_pos, rope, group_size: int, window: int, scale_base: float | None = None, *, observe
) -> torch.Tensor:
    """Self-Extend computed explicitly one query block at a time, handing each block's merged softmax
    probabilities (B, H, block, S) float32 to `observe(q_start, probs)` (visualize, truncation scores).
    Same arguments and result as `grouped_neighbour_attention`; memory O(block x S)."""
    B, H, T, D = q.shape
    rep = H // k.shape[1]
    k_near = rotate_half_rope(k, *rope(k_pos)).float().repeat_interleave(rep, dim=1)
    k_grouped = rotate_half_rope(k, *rope(torch.div(k_pos, group_size, rounding_mode="floor")))
    k_grouped = k_grouped.float().repeat_interleave(rep, dim=1)
    vf = v.float().repeat_interleave(rep, dim=1)
    outs = []
    for start in range(0, T, QUERY_BLOCK):
        pos = q_pos[start : start + QUERY_BLOCK]
        qn, qg = _rotate_queries(q[:, :, start : start + QUERY_BLOCK], pos, rope, group_size, window, scale_base)
        dist = pos[:, None] - k_pos[None, :]  # (block, S)
        scores = torch.where(
            dist < window, qn.float() @ k_near.transpose(-1, -2), qg.float() @ k_grouped.transpose(-1, -2)
        )
        probs = (scores * D**-0.5).masked_fill(dist < 0, float("-inf")).softmax(-1)
        observe(start, probs.detach())
        outs.append((probs @ vf).to(v.dtype))
    return torch.cat(outs, dim=2)


def _fused_block(qn, qg, k_near, k_grouped, v, q_pos, k_pos, window: int, scale: float) -> torch.Tensor:
    """One query block on the fused CPU kernel, in up to three parts merged exactly (`attend_parts_cpu`):
    grouped keys every query of the block sees (no mask), grouped keys at the block's edge (masked) and the
    neighbour band (masked). Keys were rotated once; masks are (rows x at most block + W keys)."""
    first, last = int(q_pos.min()), int(q_pos.max())

    def index(position: int, right: bool = False) -> int:
        return int(torch.searchsorted(k_pos, torch.tensor(position, device=k_pos.device), right=right))

    grouped_all = index(first - window, right=True)  # keys at least W behind every query of the block
    grouped_hi = index(last - window, right=True)
    band_lo, band_hi = index(first - window + 1), index(last, right=True)

    def mask(lo: int, hi: int, grouped: bool):
        def allowed() -> torch.Tensor:
            dist = q_pos[:, None] - k_pos[None, lo:hi]  # (rows, keys)
            return dist >= window if grouped else (dist >= 0) & (dist < window)

        return allowed

    parts = []
    if grouped_all > 0:
        parts.append((qg, k_grouped[:, :, :grouped_all], v[:, :, :grouped_all], None))
    if grouped_hi > grouped_all:
        lo, hi = grouped_all, grouped_hi
        parts.append((qg, k_grouped[:, :, lo:hi], v[:, :, lo:hi], mask(lo, hi, True)))
    parts.append((qn, k_near[:, :, band_lo:band_hi], v[:, :, band_lo:band_hi], mask(band_lo, band_hi, False)))
    return attend_parts_cpu(parts, scale)


def _block(qn, qg, k, v, q_pos, k_pos, rope, group_size: int, window: int, scale: float) -> torch.Tensor:
    """One query block: an online softmax over key tiles of its neighbour band and of its grouped keys."""
    first, last = int(q_pos.min()), int(q_pos.max())
    band_lo = int(torch.searchsorted(k_pos, torch.tensor(first - window + 1, device=k_pos.device)))
    band_hi = int(torch.searchsorted(k_pos, torch.tensor(last, device=k_pos.device), right=True))
    grouped_hi = int(torch.searchsorted(k_pos, torch.tensor(last - window, device=k_pos.device), right=True))
    dt = torch.promote_types(qn.dtype, torch.float32)  # the softmax in float32 at least
    m = torch.full(qn.shape[:-1], float("-inf"), dtype=dt, device=qn.device)  # running max (B, Hkv, R)
    denom = torch.zeros_like(m)
    acc = torch.zeros(*qn.shape[:-1], v.shape[-1], dtype=dt, device=qn.device)
    tiles = [(lo, min(lo + KEY_TILE, band_hi), False) for lo in range(band_lo, band_hi, KEY_TILE)]
    tiles += [(lo, min(lo + KEY_TILE, grouped_hi), True) for lo in range(0, grouped_hi, KEY_TILE)]
    for lo, hi, grouped in tiles:
        pos = k_pos[lo:hi]
        cos, sin = rope(torch.div(pos, group_size, rounding_mode="floor") if grouped else pos)
        kt = rotate_half_rope(k[:, :, lo:hi], cos, sin)
        dist = q_pos[:, None] - pos[None, :]  # (R, tile)
        allowed = dist >= window if grouped else (dist >= 0) & (dist < window)
        scores = ((qg if grouped else qn).to(dt) @ kt.to(dt).transpose(-1, -2)) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        m_new = torch.maximum(m, scores.amax(dim=-1))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # rows with nothing yet
        probs = torch.exp(scores - m_safe[..., None])
        correction = torch.exp(m - m_safe)
        denom = denom * correction + probs.sum(dim=-1)
        acc = acc * correction[..., None] + probs @ v[:, :, lo:hi].to(dt)
        m = m_new
    return (acc / denom.clamp(min=torch.finfo(dt).tiny)[..., None]).to(v.dtype)


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
    """Self-Extend on pre-RoPE tensors q (B, H, T, D), k and v (B, H_kv, T, D) (H_kv divides H, D even), positions
    0..T-1, rotate-half RoPE over the full head dimension with `rope_base`. Returns (B, H, T, D).
    Arguments that do not fit are one-line ValueErrors."""
    group_size, window = _checked_options("self_extend_attention", group_size, window)
    _check_heads("self_extend_attention", q, k, v)
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
        group_size, window = _checked_options("SelfExtendAttention", group_size, window)
        for name, value in (("dim", dim), ("n_head", n_head)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SelfExtendAttention: {name} must be an integer >= 1, got {value!r}")
        if dim % n_head or (dim // n_head) % 2:
            raise ValueError(
                f"SelfExtendAttention: dim={dim} must be n_head={n_head} x an even head size (RoPE rotates pairs)"
            )
        self.dim, self.n_head, self.group_size, self.window = dim, n_head, group_size, window
        head = dim // n_head
        self.register_buffer("inv_freq", _inv_freq(head, rope_base), persistent=False)

    def rope(self, positions: torch.Tensor):
        return _cos_sin(positions, self.inv_freq)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        shapes = [tuple(x.shape) for x in (q, k, v)]
        if len(shapes[0]) != 3 or shapes[0][-1] != self.dim or len(set(shapes)) > 1:
            shapes = ", ".join(map(str, shapes))
            raise ValueError(f"SelfExtendAttention: q, k and v must be (B, T, {self.dim}) alike, got shapes {shapes}")
        B, T, dim = q.shape
        pos = integer_metadata("SelfExtendAttention", "pos", pos, (T,), "one position per token", q.device)
        if T > 1 and bool((pos[1:] < pos[:-1]).any()):
            raise ValueError("SelfExtendAttention: pos must be non-decreasing (tokens in position order)")
        heads = [x.view(B, T, self.n_head, -1).transpose(1, 2) for x in (q, k, v)]
        y = grouped_neighbour_attention(*heads, pos, pos, self.rope, self.group_size, self.window)
        return y.transpose(1, 2).reshape(B, T, dim)


class SelfExtendAttn(nn.Module):
    """Self-Extend with the call shape of the `selfextend` package (`from se_attn import SelfExtendAttn`): swap
    the import and the same lines run.

        attn = SelfExtendAttn(dim=512, g_size=2, w_size=4, qk_norm=True)
        out = attn(q, k, v, pos)  # q, k, v (B, T, dim); pos (T,), (1, T) or (B, T); out (B, T, dim)

    Self-Extend regroups RoPE positions, so it needs rotary position encoding: q and k are the projections
    before RoPE, and this module rotates them itself (rotate-half RoPE over each head's features with
    `rope_base`), under the neighbour and the grouped position map. It cannot be added to a model with learned
    or additive sine/cosine position embeddings.

    dim = heads x head size (even). g_size: G, the group size; w_size: W, the neighbour window. pos: the tokens'
    absolute positions, non-negative and non-decreasing along each row; a (B, T) pos gives each row its own
    positions (equal to B separate calls). Keys see queries causally by position: key j is visible to query i
    iff pos[j] <= pos[i]. Scores are scaled by 1/sqrt(head size).

    qk_norm: RMSNorm over each head's features (eps 1e-6, a learnable gain initialised to 1; one for q, one
    for k), applied before the rotations, as QK-norm is in recent Llama-style models; its gains are the only
    parameters. scale_base: the authors' query log-scaling (see `SelfExtendOptions.scale_base`), off by
    default. Memory is linear in T (the kernel of `self_extend_attention`).
    """

    def __init__(
        self,
        dim: int,
        g_size: int,
        w_size: int,
        qk_norm: bool = True,
        heads: int = 1,
        rope_base: float = 10000.0,
        scale_base: float | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("g_size", g_size), ("w_size", w_size), ("heads", heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SelfExtendAttn: {name} must be an integer >= 1, got {value!r}")
        if dim % heads or (dim // heads) % 2:
            raise ValueError(
                f"SelfExtendAttn: dim={dim} must be heads={heads} x an even head size (RoPE rotates pairs)"
            )
        for name, value, low in (("rope_base", rope_base, 0.0), ("scale_base", scale_base, 1.0)):
            if value is None and name == "scale_base":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > low:
                raise ValueError(f"SelfExtendAttn: {name} must be a number > {low:g}, got {value!r}")
        self.dim, self.g_size, self.w_size, self.heads = dim, g_size, w_size, heads
        self.scale_base = None if scale_base is None else float(scale_base)
        head = dim // heads
        self.q_norm = nn.RMSNorm(head, eps=1e-6) if qk_norm else None
        self.k_norm = nn.RMSNorm(head, eps=1e-6) if qk_norm else None
        self.register_buffer("inv_freq", _inv_freq(head, rope_base), persistent=False)

    def rope(self, positions: torch.Tensor):
        return _cos_sin(positions, self.inv_freq)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos) -> torch.Tensor:
        shapes = [tuple(x.shape) for x in (q, k, v)]
        if len(shapes[0]) != 3 or shapes[0][-1] != self.dim or len(set(shapes)) > 1:
            shapes = ", ".join(map(str, shapes))
            raise ValueError(f"SelfExtendAttn: q, k and v must be (B, T, {self.dim}) alike, got shapes {shapes}")
        B, T, dim = q.shape
        pos = self._positions(pos, B, T, q.device)  # (R, T) with R = 1 or B
        heads = [x.view(B, T, self.heads, -1).transpose(1, 2) for x in (q, k, v)]
        if self.q_norm is not None:
            heads[0], heads[1] = self.q_norm(heads[0]), self.k_norm(heads[1])
        if pos.shape[0] == 1 or bool((pos == pos[:1]).all()):
            y = self._attend(*heads, pos[0])
        else:  # each row at its own positions
            y = torch.cat([self._attend(*(x[b : b + 1] for x in heads), pos[b]) for b in range(B)])
        return y.transpose(1, 2).reshape(B, T, dim)

    def _attend(self, q, k, v, pos):
        return grouped_neighbour_attention(q, k, v, pos, pos, self.rope, self.g_size, self.w_size, self.scale_base)

    @staticmethod
    def _positions(pos, B: int, T: int, device) -> torch.Tensor:
        """pos as a (1, T) or (B, T) long tensor, checked: one-line ValueErrors."""
        try:
            shape = tuple(torch.as_tensor(pos).shape)
        except (TypeError, ValueError, RuntimeError):
            shape = (T,)  # integer_metadata names what it got
        expected = (T,) if len(shape) == 1 else ((1, T) if shape[:1] == (1,) else (B, T))
        meaning = "one position per token, for all rows ((T,) or (1, T)) or per row ((B, T))"
        pos = integer_metadata("SelfExtendAttn", "pos", pos, expected, meaning, device).view(-1, T)
        if bool((pos < 0).any()):
            raise ValueError(f"SelfExtendAttn: pos must be >= 0, got a minimum of {int(pos.min())}")
        if T > 1 and bool((pos[:, 1:] < pos[:, :-1]).any()):
            raise ValueError("SelfExtendAttn: pos must be non-decreasing along each row (tokens in position order)")
        return pos


def _checked_options(owner: str, group_size: int, window: int) -> tuple[int, int]:
    """group_size and window checked as the registry checks them in a model config (integers >= 1)."""
    try:
        options = parse_options(SelfExtend, {"group_size": group_size, "window": window})
    except ValueError as e:
        raise ValueError(f"{owner}: {e}") from None
    return options.group_size, options.window


def _check_heads(owner: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q (B, H, T, D), k and v (B, H_kv, T, D) with H_kv dividing H and D even, else a one-line ValueError."""
    shapes = ", ".join(str(tuple(x.shape)) for x in (q, k, v))
    if any(x.dim() != 4 for x in (q, k, v)) or k.shape != v.shape:
        raise ValueError(f"{owner}: q must be (B, H, T, D) and k, v (B, H_kv, T, D) alike, got shapes {shapes}")
    (B, H, T, D), (Bk, Hkv, S, Dk) = q.shape, k.shape
    if (B, T, D) != (Bk, S, Dk):
        raise ValueError(f"{owner}: q, k and v must agree in batch, length and head size, got shapes {shapes}")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"{owner}: the {Hkv} key/value heads must divide the {H} query heads, got shapes {shapes}")
    if D % 2:
        raise ValueError(f"{owner}: the head size must be even (RoPE rotates pairs of dimensions), got {D}")


def _inv_freq(head_size: int, rope_base: float) -> torch.Tensor:
    """RoPE's inverse frequencies of a head (the standalone ops build their own tables; the model has its RoPE)."""
    return 1.0 / (rope_base ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size))


def _cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = positions.float()[:, None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()
