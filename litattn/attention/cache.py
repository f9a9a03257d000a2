"""Key/value cache for incremental decoding, indexed by slot.

Slot s holds the key and value written at `input_pos` s (the token's position, unless a forward
gives positions apart from slots), so masks compare slots directly. A mechanism decides what it
stores: rotated keys (causal), keys before RoPE plus each slot's position (Self-Extend, which
re-rotates them under two position maps), and any per-slot extras it declares (e.g. segment ids).
"""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    def __init__(
        self,
        batch_size: int,
        n_heads: int,
        max_seq_length: int,
        k_size: int,
        v_size: int,
        *,
        extras: dict[str, torch.dtype] | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        # (B, n_query_groups, max_seq_length, head_size); not part of the state dict.
        self.register_buffer(
            "k", torch.zeros(batch_size, n_heads, max_seq_length, k_size, device=device, dtype=dtype), persistent=False
        )
        self.register_buffer(
            "v", torch.zeros(batch_size, n_heads, max_seq_length, v_size, device=device, dtype=dtype), persistent=False
        )
        # name -> (B, max_seq_length): per-slot values written with the keys
        self.extras = {
            name: torch.zeros(batch_size, max_seq_length, dtype=extra_dtype, device=device)
            for name, extra_dtype in (extras or {}).items()
        }

    @property
    def max_seq_length(self) -> int:
        return self.k.shape[2]

    def update(
        self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int, **extras: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, ng, T, hs) and every declared extra (B, T) at slots input_pos (T,);
        return the first kv_len slots of k and v (the extras are read from `self.extras`)."""
        B = k.shape[0]
        if B > self.k.shape[0]:
            raise ValueError(
                f"Batch of {B} exceeds the KV cache's batch size {self.k.shape[0]}; call set_kv_cache again"
            )
        if set(extras) != set(self.extras):
            raise ValueError(f"KV cache extras: expected values for {sorted(self.extras)}, got {sorted(extras)}")
        if self.k.dtype != k.dtype:  # e.g. the model was cast after set_kv_cache
            self.k, self.v = self.k.to(k.dtype), self.v.to(v.dtype)
        self.k[:B].index_copy_(2, input_pos, k)
        self.v[:B].index_copy_(2, input_pos, v)
        for name, value in extras.items():
            store = self.extras[name]
            if store.device != value.device:
                store = self.extras[name] = store.to(value.device)
            store[:B].index_copy_(1, input_pos, value.to(store.dtype))
        return self.k[:B, :, :kv_len], self.v[:B, :, :kv_len]
