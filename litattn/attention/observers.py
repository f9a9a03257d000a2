"""Attention observers: softmax probabilities handed over one query chunk at a time.

Instead of collecting dense (B, H, T, S) maps of every layer, a forward computes attention with
`attend_observed` (litattn.attention.kernels), which calls `observer.observe(layer, q_start, probs)`
once per query chunk with probs (B, n_head, chunk, S) float32 (detached). An observer may keep them
(`DenseMaps`, what visualize needs) or reduce them (`ReceivedAttention`, the attention each key
receives, for truncation), so memory stays O(chunk x S) unless the observer itself keeps more.

Chunks of one call arrive in order, the first with q_start == 0; a chunk with q_start == 0 therefore
starts a new call for that layer and replaces what the observer held for it (so the observer describes
the latest forward; call `reset()` to drop everything).
"""

from __future__ import annotations

import torch

from litattn.attention.kernels import attend_observed

__all__ = ["AttentionObserver", "DenseMaps", "ReceivedAttention", "attend_observed"]


class AttentionObserver:
    """Receives attention probabilities one query chunk at a time."""

    def observe(self, layer: int, q_start: int, probs: torch.Tensor) -> None:
        """probs (B, n_head, chunk, S) float32: the softmax rows of queries q_start .. q_start + chunk - 1."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget everything observed so far."""


class DenseMaps(AttentionObserver):
    """Dense maps assembled from chunks: `maps[layer]` (B, H, T, S) float32. O(T x S) per layer by nature.

    `device`, when given (e.g. "cpu"), is where each chunk is kept, so accelerator memory stays O(chunk x S).
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = device
        self._chunks: dict[int, list[torch.Tensor]] = {}
        self._maps: dict[int, torch.Tensor] = {}

    def observe(self, layer: int, q_start: int, probs: torch.Tensor) -> None:
        if q_start == 0:
            self._chunks[layer] = []
        elif layer not in self._chunks:
            raise RuntimeError(f"DenseMaps: layer {layer}'s first chunk starts at query {q_start}, not 0")
        self._chunks[layer].append(probs if self.device is None else probs.to(self.device))
        self._maps.pop(layer, None)

    @property
    def maps(self) -> dict[int, torch.Tensor]:
        """layer -> (B, H, T, S) float32, in layer order."""
        for layer, chunks in self._chunks.items():
            if layer not in self._maps:
                self._maps[layer] = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=2)
                self._chunks[layer] = [self._maps[layer]]
        return {layer: self._maps[layer] for layer in sorted(self._chunks)}

    def __getitem__(self, layer: int) -> torch.Tensor:
        return self.maps[layer]

    def __len__(self) -> int:
        return len(self._chunks)

    def reset(self) -> None:
        self._chunks.clear()
        self._maps.clear()


class ReceivedAttention(AttentionObserver):
    """The attention each key receives, summed over queries: `sums[layer]` (B, H, S) float32.

    Column sums of the probabilities; memory O(B x H x S) per layer.
    """

    def __init__(self) -> None:
        self.sums: dict[int, torch.Tensor] = {}

    def observe(self, layer: int, q_start: int, probs: torch.Tensor) -> None:
        column = probs.sum(dim=2, dtype=torch.float32)
        if q_start == 0:
            self.sums[layer] = column
        elif layer not in self.sums:
            raise RuntimeError(f"ReceivedAttention: layer {layer}'s first chunk starts at query {q_start}, not 0")
        else:
            self.sums[layer] += column

    def __getitem__(self, layer: int) -> torch.Tensor:
        return self.sums[layer]

    def __len__(self) -> int:
        return len(self.sums)

    def reset(self) -> None:
        self.sums.clear()
