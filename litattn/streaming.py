"""A sink + recent-window KV cache (StreamingLLM): generation and evaluation of any length in bounded memory.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024 (released code:
mit-han-lab/streaming-llm, `StartRecentKVCache`). The cache keeps the first S tokens of the stream (the
attention sinks) and the latest W tokens, in S + W slots:

    slot     0 ........ S-1   S ................................ S+W-1
    token    t_0 ...... t_S-1 t_n-W ............................ t_n-1      (after n tokens, n > S + W)
    position 0 ........ S-1   S ................................ S+W-1      (re-assigned: position = slot)

When tokens arrive and the slots are full, the oldest non-sink tokens are evicted: the slots after them move
down and the newcomers take the last slots. Positions are re-assigned inside the cache: the key in slot s is
rotated at position s at every step, and a query sits at its own slot, just after the last cached key. So
the model never sees a position beyond S + W - 1, however long the stream runs.

How it works with any RoPE model and any mechanism that decodes with the KV cache, through generic hooks:
- every attention mechanism of the model is switched to keep keys before RoPE (`cache_before_rope`, an
  option the base mechanism honours: the cache stores each slot's position, and the mechanism rotates the
  cached keys at their stored positions on every step, as Self-Extend does under its own maps);
- the model is called with the slots as `input_pos`, and the positions default to them, so the stored
  position of slot s is s;
- eviction moves keys, values and every per-slot extra (e.g. segment ids) down by the evicted count and
  leaves the stored positions where they are: a moved key is re-rotated at its new slot.

Exactness: the keys and values of layer 0 depend on the token alone, so a one-layer model's streaming logits
equal a plain forward over the visible tokens at positions 0..n-1. In deeper layers a cached key keeps the
context it was computed in (tokens since evicted), as in StreamingLLM; the method accepts this approximation.

Chunks: a piece of several tokens is written at once, after evicting as many old tokens as it needs room
for, and attends causally within itself. `feed(idx, chunk)` first fills the free slots in one piece (no
eviction: exact), then goes `chunk` tokens at a time: the i-th token of a chunk (from 0) then sees the sinks
and W - chunk + i + 1 recent tokens. chunk 1 is StreamingLLM's token-by-token rule.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from litattn.args import check_range
from litattn.attention.base import AttentionMechanism

if TYPE_CHECKING:
    from litattn.model import GPT

DEFAULT_SINK_SIZE = 4
"""StreamingLLM's sink count, used when only the window is given."""


def check_streaming_args(stream_window: int | None, sink_size: int | None, stream_chunk: int | None = None) -> None:
    """ValueError (one line, naming the argument) for streaming arguments out of range; all None: not streaming."""
    if stream_window is None:
        if sink_size is not None:
            raise ValueError(
                "sink_size needs stream_window: pass --stream_window W to stream with a sink + window cache"
            )
        if stream_chunk is not None:
            raise ValueError("stream_chunk needs stream_window: pass --stream_window W to stream")
        return
    check_range("stream_window", stream_window, ge=1, null="no streaming")
    check_range("sink_size", sink_size, ge=0, null=f"{DEFAULT_SINK_SIZE}")
    check_range("stream_chunk", stream_chunk, ge=1, le=stream_window, bound_name="stream_window", null="the default")


def check_streamable(model: GPT, capacity: int) -> None:
    """ValueError (one line) unless the model can stream with a cache of `capacity` slots."""
    config = model.config
    if config.positional_embedding != "rope" or model.rope is None:
        raise ValueError(
            f"streaming re-assigns RoPE positions inside the cache, but {config.name!r} has learned absolute "
            "positions (GPT-2 style); generate or evaluate it without --stream_window"
        )
    if capacity > model.max_seq_length:
        raise ValueError(
            f"sink_size + stream_window = {capacity} exceeds the model's context of {model.max_seq_length} "
            "(the cache's slots are the positions the model sees); lower them"
        )


class SinkWindowCache:
    """Drives a model's KV caches as S sinks + the latest W tokens; use as a context manager (or call `close`).

    `forward(idx)` feeds one piece of tokens (B, T) and returns its logits (B, T, padded_vocab); `feed(idx,
    chunk)` feeds a sequence of any length piece by piece. `slot_tokens[:length]` holds the stream index of
    the token in each slot (what is visible).
    """

    def __init__(self, model: GPT, sink_size: int | None, window: int, batch_size: int = 1) -> None:
        sink_size = DEFAULT_SINK_SIZE if sink_size is None else sink_size
        check_streaming_args(window, sink_size)
        self.model = model
        self.sink_size, self.window = int(sink_size), int(window)
        self.capacity = self.sink_size + self.window
        check_streamable(model, self.capacity)
        self.device = model.lm_head.weight.device
        self.length = 0  # slots taken
        self.seen = 0  # tokens fed so far
        self.slot_tokens = torch.zeros(self.capacity, dtype=torch.long)
        # Keys before RoPE in every mechanism (a wrapper's base included: it is a submodule), then the caches.
        self._mechanisms = [m for m in model.modules() if isinstance(m, AttentionMechanism)]
        self._saved = [m.__dict__.get("cache_before_rope") for m in self._mechanisms]
        for m in self._mechanisms:
            m.cache_before_rope = True
        try:
            model.set_kv_cache(batch_size, max_seq_length=self.capacity)
            self._cached = [m for m in self._mechanisms if m.kv_cache is not None]
            lacking = [m for m in self._cached if "positions" not in m.kv_cache.extras]
            if not self._cached or lacking:
                name = model.config.attention["name"]
                raise RuntimeError(
                    f"attention {name!r} cannot keep keys before RoPE in its KV cache (it builds its own), which "
                    "streaming needs to re-assign positions"
                )
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ feeding
    @torch.no_grad()
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Feed the next tokens idx (B, T): evict the oldest non-sink tokens they need room for, write them at
        the slots after the cached ones (positions = slots), return their logits (B, T, padded_vocab)."""
        T = idx.shape[1]
        if T < 1:
            raise ValueError("streaming needs at least one token per piece")
        evict = self.length + T - self.capacity
        if evict > 0:
            if T > self.window:
                raise ValueError(
                    f"a piece of {T} tokens does not fit the window of {self.window} once the cache is full; "
                    "feed it in chunks (SinkWindowCache.feed)"
                )
            self._evict(evict)
        slots = torch.arange(self.length, self.length + T, device=self.device)
        logits = self.model(idx.to(self.device), input_pos=slots)
        self.slot_tokens[self.length : self.length + T] = torch.arange(self.seen, self.seen + T)
        self.length += T
        self.seen += T
        return logits

    def feed(self, idx: torch.Tensor, chunk: int = 1) -> Iterator[torch.Tensor]:
        """Feed idx (B, T) of any length: first the free slots in one piece, then `chunk` tokens at a time.
        Yields each piece's logits (B, piece, padded_vocab) in order (consume them as they come: memory)."""
        check_range("stream_chunk", chunk, ge=1, le=self.window, bound_name="stream_window")
        start, T = 0, idx.shape[1]
        while start < T:
            room = self.capacity - self.length
            n = min(T - start, room if room > 0 else chunk)
            yield self.forward(idx[:, start : start + n])
            start += n

    def _evict(self, n: int) -> None:
        """Drop the n oldest non-sink tokens: slots S+n..length-1 move to S..length-n-1. The stored positions
        stay with the slots (a slot's position is the slot), so the moved keys are rotated at their new slots."""
        lo, hi = self.sink_size, self.length
        for m in self._cached:
            cache = m.kv_cache
            for t in (cache.k, cache.v):  # (B, groups, slots, hs)
                t[:, :, lo : hi - n] = t[:, :, lo + n : hi].clone()
            for name, t in cache.extras.items():  # (B, slots)
                if name != "positions":
                    t[:, lo : hi - n] = t[:, lo + n : hi].clone()
        self.slot_tokens[lo : hi - n] = self.slot_tokens[lo + n : hi].clone()
        self.length -= n

    # ------------------------------------------------------------------ state
    def cache_bytes(self) -> int:
        """Bytes held by every layer's cache (keys, values, extras): constant for a stream of any length."""
        total = 0
        for m in self._cached:
            cache = m.kv_cache
            total += cache.k.nbytes + cache.v.nbytes + sum(t.nbytes for t in cache.extras.values())
        return total

    def close(self) -> None:
        """Free the caches and give every mechanism its own cache_before_rope back."""
        self.model.clear_kv_cache()
        for m, saved in zip(self._mechanisms, self._saved, strict=True):
            if saved is None:
                m.__dict__.pop("cache_before_rope", None)
            else:
                m.cache_before_rope = saved
        self._cached = []

    def __enter__(self) -> SinkWindowCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
