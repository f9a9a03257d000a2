"""Disrupt / SET attention: attention resets at Disrupt tokens, with attention sinks (after StreamingLLM).

The method's hypothesis: a Disrupt token makes the model drop everything before it and attend afresh,
while the first `num_sink` tokens stay visible to every query as attention sinks (Xiao et al., 2023).
With segment ids s (a Disrupt token starts a new segment and belongs to it, `litattn.tokens.segment_ids`):

    query i may see key j  iff  j <= i  and  (s[j] == s[i]  or  j < num_sink)

Every segment id equal: exactly causal attention, on the fused causal kernel. The segment ids are batch
metadata (`segment_ids`, what token injection puts in the batch); without them the mechanism derives them
from the token ids (option `disrupt_id`), so generate, evaluate and visualize need no Disrupt code and a
prompt holding `<|disrupt|>` behaves as in training. The KV cache keeps each key's segment id, so cached
decoding continues the segments of the prompt (and of a Disrupt token generated mid-way).

Kernel: on CUDA FlexAttention's block-sparse mask; elsewhere each block of queries attends, on SDPA, to the
sinks plus the keys from its earliest segment start to its last query (the band a segment allows), with a
mask over that band only: no T x T mask, and work proportional to the segments' length rather than T^2.
SET tokens (re-drawn embeddings, litattn/set_tokens.py) need nothing from attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from litattn.attention import masks
from litattn.attention.base import AttentionContext, AttentionMechanism, AttentionOptions, integer_metadata
from litattn.attention.registry import register_attention
from litattn.tokenizer import SPECIAL_TOKENS

if TYPE_CHECKING:
    from litattn.config import Config

QUERY_BLOCK = 128
"""Queries per block on the SDPA path: each attends to the sinks and the band from its earliest segment start."""
DISRUPT_ID = SPECIAL_TOKENS.index("<|disrupt|>")
"""The id tokenizers trained by litattn give `<|disrupt|>`."""


@dataclass
class DisruptSETOptions(AttentionOptions):
    num_sink: int = 1
    """Keys at the first `num_sink` cache slots stay visible to every later query (StreamingLLM uses 4)."""
    disrupt_id: int | None = None
    """Token id that starts a new segment, when the batch has no `segment_ids`. None: `<|disrupt|>` of a litattn
    tokenizer (id 2); set it for a tokenizer that gives the token another id (e.g. one added to a converted one)."""


SEGMENT_IDS = "segment_ids"
"""The batch metadata key of each token's segment: written by token injection (litattn/data/inject.py) or derived
here from the token ids, read by this mechanism."""


@register_attention("disrupt_set")
class DisruptSET(AttentionMechanism):
    """Causal attention within segments started by Disrupt tokens, plus attention sinks."""

    Options = DisruptSETOptions
    metadata_keys = {SEGMENT_IDS: "(B, T) long: the segment of each token (a Disrupt token starts one)"}
    cached_extras = {SEGMENT_IDS: torch.long}
    segment_key = SEGMENT_IDS

    def __init__(self, config: Config, block_idx: int, options: DisruptSETOptions):
        super().__init__(config, block_idx, options)
        self.disrupt_id = self.token_id_option("disrupt_id", DISRUPT_ID, "the Disrupt token")

    @classmethod
    def validate_options(cls, options: DisruptSETOptions) -> None:
        super().validate_options(options)
        if options.num_sink < 0:
            raise ValueError(f"disrupt_set: num_sink must be >= 0, got {options.num_sink}")
        cls.check_token_id_option(options, "disrupt_id")

    # ------------------------------------------------------------------ metadata
    def prepare_context(self, ctx: AttentionContext) -> None:
        """Segment ids from the token ids unless the batch gives them; when decoding, counting on from the
        segment of the cached token before the first new one."""
        if SEGMENT_IDS in ctx.metadata:
            given, shape = ctx.metadata[SEGMENT_IDS], tuple(ctx.idx.shape)
            ctx.metadata[SEGMENT_IDS] = integer_metadata(
                "disrupt_set", SEGMENT_IDS, given, shape, "one per token of the batch", ctx.idx.device
            )
            return
        segments = (ctx.idx == self.disrupt_id).long().cumsum(dim=1)  # (B, T)
        if ctx.input_pos is not None and self.kv_cache is not None:
            first = int(ctx.input_pos[0])
            if first > 0:
                segments = segments + self.kv_cache.extras[SEGMENT_IDS][: ctx.idx.shape[0], first - 1, None]
        ctx.metadata[SEGMENT_IDS] = segments

    def cache_values(self, ctx: AttentionContext, batch_size: int) -> dict[str, torch.Tensor]:
        return {**super().cache_values(ctx, batch_size), SEGMENT_IDS: ctx.metadata[SEGMENT_IDS]}

    def _key_segments(self, ctx: AttentionContext) -> torch.Tensor:
        """(B, S) the segment of each key slot."""
        q_seg = ctx.metadata[SEGMENT_IDS]
        if ctx.input_pos is None:
            return q_seg
        return self.kv_cache.extras[SEGMENT_IDS][: q_seg.shape[0], : ctx.kv_len]

    def _segmented(self, ctx: AttentionContext) -> bool:
        """Whether any query and key differ in segment (else this is causal attention). One check per forward."""

        def check() -> bool:
            q_seg, k_seg = ctx.metadata[SEGMENT_IDS], self._key_segments(ctx)
            low = torch.minimum(q_seg.min(), k_seg.min()) if k_seg.numel() else q_seg.min()
            high = torch.maximum(q_seg.max(), k_seg.max()) if k_seg.numel() else q_seg.max()
            return bool(low != high)

        return ctx.memoize("disrupt_set.segmented", check)

    # ------------------------------------------------------------------ mask and kernel
    def mask_mod(self, ctx: AttentionContext) -> masks.MaskMod | None:
        base = super().mask_mod(ctx)  # a sliding window, if the model config has one
        if not self._segmented(ctx):
            return base

        def build() -> masks.MaskMod:
            q_seg, k_seg, slots = ctx.metadata[SEGMENT_IDS], self._key_segments(ctx), ctx.slots
            num_sink = self.options.num_sink
            causal = base or masks.causal(slots)

            def mask_mod(b, h, q_idx, kv_idx):
                return causal(b, h, q_idx, kv_idx) & ((k_seg[b, kv_idx] == q_seg[b, q_idx]) | (kv_idx < num_sink))

            return mask_mod

        return ctx.memoize("disrupt_set.mask", build)

    def attend(self, q, k, v, ctx: AttentionContext) -> torch.Tensor:
        mask_mod = self.mask_mod(ctx)
        if mask_mod is None or ctx.observer is not None or q.is_cuda or self.options.kernel == "flex":
            return super().attend(q, k, v, ctx)  # causal, observed, or FlexAttention's block-sparse mask
        plan = ctx.memoize(  # the same blocks and masks in every layer: built once per forward
            "disrupt_set.bands",
            lambda: _band_plan(mask_mod, ctx.slots, self._key_segments(ctx), self.options.num_sink, q.device),
        )
        return _segment_bands(q, k, v, plan)


def _band_plan(mask_mod, slots, k_seg, num_sink: int, device) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """Per block of queries [q0, q1): the key slots it reads (the sinks below its band, then the band from the
    earliest segment start of its queries to its last query's slot) and its mask over them (B', 1, block, keys).
    slots (T,) the queries' key slots; k_seg (B, S) the keys' segments (non-decreasing along a row)."""
    B, S = k_seg.shape
    T = slots.shape[0]
    if S > 1 and bool((k_seg[:, 1:] < k_seg[:, :-1]).any()):
        raise ValueError("disrupt_set: segment_ids must not decrease along a sequence (a count of Disrupt tokens)")
    # the first key slot of each key's segment: the band of a query starts at its own segment's first key
    key_idx = torch.arange(S, device=device)
    new_segment = torch.ones_like(k_seg, dtype=torch.bool)
    new_segment[:, 1:] = k_seg[:, 1:] != k_seg[:, :-1]
    segment_start = torch.where(new_segment, key_idx, 0).cummax(dim=1).values  # (B, S)
    starts = segment_start.gather(1, slots.clamp(max=S - 1).expand(B, -1)).amin(dim=0)  # (T,) over the batch
    plan = []
    for q0 in range(0, T, QUERY_BLOCK):
        q1 = min(T, q0 + QUERY_BLOCK)
        lo, hi = int(starts[q0:q1].min()), int(slots[q0:q1].max()) + 1
        sink = min(num_sink, lo)  # sink slots below the band (those inside it are in the band anyway)
        keys = torch.cat([key_idx[:sink], key_idx[lo:hi]])
        q_idx = torch.arange(q0, q1, device=device)
        plan.append((q0, q1, keys, masks.materialize(mask_mod, B, q_idx, S, device, kv_idx=keys)))
    return plan


def _segment_bands(q, k, v, plan) -> torch.Tensor:
    """Query blocks on SDPA, each over its key slots of `_band_plan` (keys outside them are masked for every
    query of the block: other segments, the future). q (B, H, T, D), k and v (B, Hkv, S, D)."""
    gqa = q.shape[1] != k.shape[1]
    outs = []
    for q0, q1, keys, allowed in plan:
        kb, vb = k.index_select(2, keys), v.index_select(2, keys)
        outs.append(F.scaled_dot_product_attention(q[:, :, q0:q1], kb, vb, attn_mask=allowed, enable_gqa=gqa))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
