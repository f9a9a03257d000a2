"""The one kernel layer: softmax attention under a mask, with the fastest path for the device.

Paths
- `sdpa`, no mask:   F.scaled_dot_product_attention(is_causal=True), the fused kernel.
- `sdpa`, a mask:    the mask is materialized one query chunk at a time (at most
                     `MASK_BUDGET` booleans per chunk), so memory is O(chunk x S), never T x S.
- `flex`:            FlexAttention with a BlockMask built from the same mask_mod (compiled on
                     CUDA, where it trains; on CPU PyTorch's compiled flex is inference-only, so
                     `auto` never picks it there).
`auto` picks flex on CUDA when a mask is given, SDPA otherwise. Tests check the paths
against each other and against a naive softmax reference.

With `return_lse=True`, `attend` also returns the log-sum-exp of the scaled scores over the
allowed keys: FlexAttention's own on CUDA (`auto` or `flex`), elsewhere an explicit softmax
computed one query chunk at a time (`_chunked_softmax`, at most `MASK_BUDGET` bytes of float32
scores per chunk). `merge_attention` combines attentions over disjoint key sets exactly from their
(y, lse). The same chunked softmax serves `attend_observed`, which hands each chunk's
probabilities to an observer (litattn.attention.observers) instead of keeping T x S maps.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

from litattn.attention.masks import MaskMod, materialize

KERNELS = ("auto", "sdpa", "flex")
MASK_BUDGET = 1 << 24  # booleans per materialized mask chunk (16 MiB); bytes of float32 scores per explicit chunk


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask_mod: MaskMod | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    kernel: str = "auto",
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention. q: (B, nh, T, hs); k, v: (B, ng, S, hs) with nh % ng == 0 -> (B, nh, T, hs).

    Either `is_causal` (key j visible to query i iff j <= i, SDPA's convention) or a `mask_mod`, or
    neither (full attention).

    With `return_lse=True` returns `(y, lse)`: lse (B, nh, T) float32 (float64 for float64 inputs) is the
    natural-log sum of exp of the scaled scores over the allowed keys. A query with no allowed key gets
    y = 0 and lse = -inf (no NaN, also in gradients). Gradients flow through both.
    """
    if mask_mod is not None and is_causal:
        raise ValueError("attend: pass either is_causal or a mask_mod, not both")
    if kernel not in KERNELS:
        raise ValueError(f"Unknown attention kernel {kernel!r}; choose one of {KERNELS}")
    gqa = q.shape[1] != k.shape[1]
    if kernel == "auto":
        kernel = "flex" if q.is_cuda and (mask_mod is not None or return_lse) else "sdpa"
    if return_lse:
        if kernel == "flex":
            return _flex(q, k, v, _causal_mod if is_causal else mask_mod, scale, return_lse=True)
        return _chunked_softmax(q, k, v, mask_mod=mask_mod, is_causal=is_causal, scale=scale)
    if mask_mod is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale, enable_gqa=gqa)
    if kernel == "flex":
        return _flex(q, k, v, mask_mod, scale)
    return _sdpa_chunked(q, k, v, mask_mod, scale, gqa)


def _causal_mod(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def _sdpa_chunked(q, k, v, mask_mod, scale, gqa):
    B, _, T, _ = q.shape
    S = k.shape[2]
    chunk = max(1, min(T, MASK_BUDGET // max(1, B * S)))
    outs = []
    for start in range(0, T, chunk):
        q_idx = torch.arange(start, min(T, start + chunk), device=q.device)
        mask = materialize(mask_mod, B, q_idx, S, q.device)
        outs.append(
            F.scaled_dot_product_attention(
                q[:, :, start : start + chunk], k, v, attn_mask=mask, scale=scale, enable_gqa=gqa
            )
        )
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _chunked_softmax(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask_mod: MaskMod | None,
    is_causal: bool = False,
    scale: float | None = None,
    chunk: int | None = None,
    observe: Callable[[int, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit softmax attention, one query chunk at a time: the one implementation behind the lse and
    observer paths. Memory O(chunk x S) per chunk (default chunk: `MASK_BUDGET` bytes of float32 scores,
    B x nh x chunk x S of them); GQA without repeating k or v. Works in float32 (float64 when an input is float64).

    Returns (y in v's dtype, lse in the working dtype). `observe(q_start, probs)`, when given, receives
    each chunk's probabilities (B, nh, chunk, S), detached.
    """
    B, nh, T, hs = q.shape
    ng, S = k.shape[1], k.shape[2]
    if nh % ng:
        raise ValueError(f"attend: {nh} query heads are not a multiple of {ng} key/value heads")
    r = nh // ng
    work = torch.float64 if torch.float64 in (q.dtype, k.dtype, v.dtype) else torch.float32
    scale = hs**-0.5 if scale is None else scale
    if chunk is None:
        chunk = MASK_BUDGET // max(1, 4 * B * nh * S)  # smaller chunks than the booleans': measured faster
    chunk = max(1, min(T, chunk)) if T else 1
    kt = k.to(work).transpose(-1, -2)  # (B, ng, hs, S)
    vw = v.to(work)
    kv_idx = torch.arange(S, device=q.device)
    ys, lses = [], []
    for start in range(0, T, chunk):
        end = min(T, start + chunk)
        c = end - start
        # (B, nh, c, hs) -> (B, ng, r * c, hs): query head g * r + j reads KV head g (repeat_interleave order)
        qc = (q[:, :, start:end].to(work) * scale).reshape(B, ng, r * c, hs)
        scores = (qc @ kt).view(B, ng, r, c, S)
        if mask_mod is not None:
            q_idx = torch.arange(start, end, device=q.device)
            allowed = materialize(mask_mod, B, q_idx, S, q.device).unsqueeze(2)  # (B', 1, 1, c, S)
        elif is_causal:
            allowed = kv_idx <= torch.arange(start, end, device=q.device).unsqueeze(-1)  # (c, S)
        else:
            allowed = None
        if allowed is not None:
            scores = torch.where(allowed, scores, float("-inf"))
        # lse = log(sum exp(x - m)) + m for any constant m: a detached, finite m keeps exp in range and the
        # gradient exact; rows with no allowed key (sum 0) take the where's other branch, so no NaN.
        # In place: nothing saves `scores` for backward (matmul saves its inputs, where its condition).
        m = scores.detach().amax(-1, keepdim=True)
        m = torch.where(m == float("-inf"), 0.0, m)
        e = scores.sub_(m).exp_()
        total = e.sum(-1, keepdim=True)
        nonempty = total > 0
        total = torch.where(nonempty, total, 1.0)
        lse = torch.where(nonempty, torch.log(total) + m, float("-inf"))
        y = (e.view(B, ng, r * c, S) @ vw).view(B, ng, r, c, -1) / total  # (B, ng, r, c, hs_v)
        if observe is not None:
            observe(start, (e.detach() / total.detach()).view(B, nh, c, S))
        ys.append(y.view(B, nh, c, -1))
        lses.append(lse.view(B, nh, c))
    if not ys:  # T == 0
        return q.new_zeros(B, nh, 0, v.shape[-1], dtype=v.dtype), q.new_zeros(B, nh, 0, dtype=work)
    y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=2)
    lse = lses[0] if len(lses) == 1 else torch.cat(lses, dim=2)
    return y.to(v.dtype), lse


def attend_observed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask_mod: MaskMod | None,
    scale: float | None = None,
    observer,
    layer: int,
    chunk: int | None = None,
) -> torch.Tensor:
    """Attention computed explicitly one query chunk at a time (probs in float32, O(chunk x S)), handing
    each chunk's probs to `observer.observe(layer, q_start, probs)`; returns y (B, nh, T, hs) in v's dtype.

    `mask_mod` None means full attention (no mask); for causal pass `masks.causal(positions)`. `chunk`
    defaults to `MASK_BUDGET` bytes of float32 scores per chunk. probs (B, nh, chunk, S) are detached.
    """
    y, _ = _chunked_softmax(
        q,
        k,
        v,
        mask_mod=mask_mod,
        scale=scale,
        chunk=chunk,
        observe=lambda q_start, probs: observer.observe(layer, q_start, probs),
    )
    return y


def merge_attention(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over the union of disjoint key sets from each set's `(y, lse)` (as `attend(...,
    return_lse=True)` returns them) for the same queries.

    lse = logsumexp_i lse_i and y = sum_i exp(lse_i - lse) * y_i. Parts with lse = -inf (no allowed key)
    weigh 0; where every part is -inf the result is y = 0, lse = -inf, with no NaN in values or gradients.
    y keeps the parts' dtype; the weights are computed in float32 (float64 for float64 lse).
    """
    if not parts:
        raise ValueError("merge_attention: no parts to merge")
    ys = [y for y, _ in parts]
    lses = [lse for _, lse in parts]
    for y, lse in parts:
        if y.shape != ys[0].shape or lse.shape != lses[0].shape or y.shape[:-1] != lse.shape:
            raise ValueError(
                f"merge_attention: parts disagree in shape: y {tuple(y.shape)}, lse {tuple(lse.shape)}; "
                f"expected y {tuple(ys[0].shape)} and lse {tuple(ys[0].shape[:-1])}"
            )
    work = torch.float32
    for lse in lses:
        work = torch.promote_types(work, lse.dtype)
    stacked = torch.stack([lse.to(work) for lse in lses])  # (P, ...)
    m = stacked.detach().amax(0)
    m = torch.where(m == float("-inf"), 0.0, m)
    w = torch.exp(stacked - m)  # 0 for -inf parts
    total = w.sum(0)
    nonempty = total > 0
    total = torch.where(nonempty, total, 1.0)
    w = w / total
    lse = torch.where(nonempty, torch.log(total) + m, float("-inf"))
    y_work = torch.promote_types(ys[0].dtype, work)
    y = sum(w[i].unsqueeze(-1) * ys[i].to(y_work) for i in range(len(ys)))
    return y.to(ys[0].dtype), lse


def attend_parts_cpu(
    parts: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, Callable[[], torch.Tensor] | None]],
    scale: float,
) -> torch.Tensor:
    """Exact softmax attention of one set of query rows over several key parts, each part with its own query
    tensor (e.g. queries rotated under different position maps), on PyTorch's fused CPU flash kernel.

    parts: (q (B, H, R, D), k and v (B, H, S_i, D), allowed) with allowed None (every key) or a function
    returning a (R, S_i) boolean mask (called in forward and again in backward, so masks are never stored).
    A pair (row, key) must be allowed in at most one part; every row in at least one. Returns (B, H, R, D).

    Each part runs the fused kernel with its log-sum-exp, the parts are merged by their lse, and backward
    runs the fused backward of each part against the merged output and lse, which is the exact gradient of
    the merged softmax (the ring-attention identity); memory is the inputs and outputs only.
    """
    qkv = [t for q, k, v, _ in parts for t in (q, k, v)]
    return _FusedParts.apply(scale, [allowed for *_, allowed in parts], *qkv)


class _FusedParts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scale, masks, *qkv):
        outs, lses = [], []
        for i, mask_fn in enumerate(masks):
            q, k, v = qkv[3 * i : 3 * i + 3]
            allowed = None if mask_fn is None else mask_fn()
            y, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, False, attn_mask=_additive(allowed, q.dtype), scale=scale
            )
            if allowed is not None:  # the kernel gives rows with no allowed key lse 0 and y 0: make them weigh 0
                lse = lse.masked_fill(~allowed.any(-1), float("-inf"))
            outs.append(y)
            lses.append(lse)
        work = torch.promote_types(qkv[2].dtype, torch.float32)
        stacked = torch.stack(lses).to(work)  # (P, B, H, R)
        lse = torch.logsumexp(stacked, 0)
        out = sum(torch.exp(stacked[i] - lse).unsqueeze(-1) * outs[i].to(work) for i in range(len(outs)))
        out = out.to(qkv[2].dtype).contiguous()
        ctx.scale, ctx.masks = scale, masks
        ctx.save_for_backward(*qkv, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        *qkv, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grads = []
        for i, mask_fn in enumerate(ctx.masks):
            q, k, v = qkv[3 * i : 3 * i + 3]
            mask = None if mask_fn is None else _additive(mask_fn(), q.dtype)
            grads += torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad_out, q, k, v, out, lse, 0.0, False, attn_mask=mask, scale=ctx.scale
            )
        return (None, None, *grads)


def _additive(allowed: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask as the additive float mask the fused CPU kernel takes (0 allowed, -inf not)."""
    if allowed is None:
        return None
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def _flex(q, k, v, mask_mod, scale, return_lse=False):
    if not q.is_cuda and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise RuntimeError(
            "The flex kernel cannot train on CPU in this PyTorch (compiled flex on CPU is inference-only); "
            "use kernel: sdpa (or auto) for CPU training"
        )
    B, nh, T, _ = q.shape
    S = k.shape[2]
    block_mask = None if mask_mod is None else create_block_mask(mask_mod, B, None, T, S, device=q.device)
    fn = _flex_fn(q.is_cuda)
    gqa = q.shape[1] != k.shape[1]
    if not return_lse:
        return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    # PyTorch 2.13's public flex_attention returns the lse in natural log: its kernels work in log2 and
    # `_finalize_outputs` multiplies by ln 2 (older releases' `return_lse` differed; re-check on upgrade).
    # Fully masked rows: y = 0, lse = -inf, as on the explicit path.
    y, aux = fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa, return_aux=AuxRequest(lse=True))
    return y, aux.lse


@functools.cache
def _flex_fn(compiled: bool):
    if not compiled:
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention
    return torch.compile(flex_attention, dynamic=False)
