"""Key/value cache for incremental decoding, indexed by absolute position.

Slot p holds the key and value of the token at position p, so masks can compare positions
directly. A mechanism decides what it stores (rotated keys for causal attention, keys before
RoPE for Self-Extend, which re-rotates them under two position maps).
"""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    def __init__(
        self, batch_size: int, n_heads: int, max_seq_length: int, k_size: int, v_size: int, *, device=None, dtype=None
    ):
        super().__init__()
        # (B, n_query_groups, max_seq_length, head_size); not part of the state dict.
        self.register_buffer(
            "k", torch.zeros(batch_size, n_heads, max_seq_length, k_size, device=device, dtype=dtype), persistent=False
        )
        self.register_buffer(
            "v", torch.zeros(batch_size, n_heads, max_seq_length, v_size, device=device, dtype=dtype), persistent=False
        )

    @property
    def max_seq_length(self) -> int:
        return self.k.shape[2]

    def update(
        self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, ng, T, hs) at positions input_pos (T,); return the first kv_len slots."""
        B = k.shape[0]
        if B > self.k.shape[0]:
            raise ValueError(
                f"Batch of {B} exceeds the KV cache's batch size {self.k.shape[0]}; call set_kv_cache again"
            )
        if self.k.dtype != k.dtype:  # e.g. the model was cast after set_kv_cache
            self.k, self.v = self.k.to(k.dtype), self.v.to(v.dtype)
        self.k[:B].index_copy_(2, input_pos, k)
        self.v[:B].index_copy_(2, input_pos, v)
        return self.k[:B, :, :kv_len], self.v[:B, :, :kv_len]

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()
