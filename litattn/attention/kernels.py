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
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from litattn.attention.masks import MaskMod, materialize

KERNELS = ("auto", "sdpa", "flex")
MASK_BUDGET = 1 << 24  # booleans per materialized mask chunk (16 MiB)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask_mod: MaskMod | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """Softmax attention. q: (B, nh, T, hs); k, v: (B, ng, S, hs) with nh % ng == 0 -> (B, nh, T, hs).

    Either `is_causal` (q and k aligned, T == S) or a `mask_mod`, or neither (full attention).
    """
    if mask_mod is not None and is_causal:
        raise ValueError("attend: pass either is_causal or a mask_mod, not both")
    gqa = q.shape[1] != k.shape[1]
    if mask_mod is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale, enable_gqa=gqa)
    if kernel == "auto":
        kernel = "flex" if q.is_cuda else "sdpa"
    if kernel == "flex":
        return _flex(q, k, v, mask_mod, scale)
    if kernel != "sdpa":
        raise ValueError(f"Unknown attention kernel {kernel!r}; choose one of {KERNELS}")
    return _sdpa_chunked(q, k, v, mask_mod, scale, gqa)


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


def _flex(q, k, v, mask_mod, scale):
    from torch.nn.attention.flex_attention import create_block_mask

    if not q.is_cuda and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise RuntimeError(
            "The flex kernel cannot train on CPU in this PyTorch (compiled flex on CPU is inference-only); "
            "use kernel: sdpa (or auto) for CPU training"
        )
    B, nh, T, _ = q.shape
    S = k.shape[2]
    block_mask = create_block_mask(mask_mod, B, None, T, S, device=q.device)
    return _flex_fn(q.is_cuda)(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


@functools.cache
def _flex_fn(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        import warnings

        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention
    return torch.compile(flex_attention, dynamic=False)


def attention_probs(
    q: torch.Tensor, k: torch.Tensor, mask_mod: MaskMod | None, scale: float | None = None
) -> torch.Tensor:
    """Explicit softmax probabilities (B, nh, T, S) in float32: O(T x S) memory, for inspection only."""
    nh, ng = q.shape[1], k.shape[1]
    k = k.repeat_interleave(nh // ng, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if mask_mod is not None:
        mask = materialize(mask_mod, q.shape[0], torch.arange(q.shape[2], device=q.device), k.shape[2], q.device)
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1)
