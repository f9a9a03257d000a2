"""Attention masks as `mask_mod(b, h, q_idx, kv_idx) -> bool` functions (True = may attend).

This is FlexAttention's convention, so one mask definition serves both kernels: flex builds a
sparse BlockMask from it, the SDPA path materializes it one query chunk at a time
(`materialize`), so no mask ever needs a full T x S tensor unless the kernel asks for one.

`q_idx` indexes the queries of the current call and `kv_idx` the keys. Keys sit at their KV-cache
slots (a token's position unless a forward gives positions apart from slots), queries at
`q_pos[q_idx]`, the queries' slots (`ctx.slots`).
Functions use only elementwise tensor ops and indexing, which both vmap (flex) and
broadcasting (dense) accept.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def causal(q_pos: torch.Tensor) -> MaskMod:
    """Key slot j is visible to query i iff j <= slot(i). q_pos: (T,) the queries' slots."""

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx <= q_pos[q_idx]

    return mask_mod


def sliding_window(q_pos: torch.Tensor, window: int) -> MaskMod:
    """Causal, and at most `window` most recent keys (the query itself included)."""

    def mask_mod(b, h, q_idx, kv_idx):
        qp = q_pos[q_idx]
        return (kv_idx <= qp) & (qp - kv_idx < window)

    return mask_mod


def materialize(
    mask_mod: MaskMod, batch: int, q_idx: torch.Tensor, kv_len: int, device: torch.device, kv_idx=None
) -> torch.Tensor:
    """Dense boolean mask for the queries `q_idx` (a chunk) against all `kv_len` keys, or against the key
    slots `kv_idx` (any subset, in any order) when given.

    Returns (B', 1, len(q_idx), n_keys) where B' is 1 if the mask does not depend on the batch
    row. Heads are assumed to share the mask (h is passed as 0).
    """
    b = torch.arange(batch, device=device).view(batch, 1, 1, 1)
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    q = q_idx.to(device).view(1, 1, -1, 1)
    kv = torch.arange(kv_len, device=device) if kv_idx is None else kv_idx.to(device)
    mask = mask_mod(b, h, q, kv.view(1, 1, 1, -1))
    return mask.expand(mask.shape[0], 1, q.shape[2], kv.shape[0])
