"""Statistics of attention distributions, reduced one query chunk at a time (no T x T tensor is kept).

The quantities the seeds argue with: attention *dilution* (entropy that grows with the number of visible keys,
SSA's motivation), *spikiness* (the largest probability of a row), *sinks* (the mass on the first k positions,
StreamingLLM's and Disrupt/SET's) and, for mechanisms with segments, the mass a query keeps inside its own
segment. Each is averaged over query rows, per layer (and per head on request), grouped by query position in
powers of two (bucket b holds 1-based positions 2**b .. 2**(b+1) - 1), so a curve over buckets shows how a
statistic moves as the context grows.

Entropy is reported raw (nats) and normalised by ln(number of visible keys): 1 is a uniform row over what the
query may see, 0 all mass on one key. The visible keys are those with non-zero probability: a masked key gets
exactly 0 from the softmax; an unmasked one underflows to 0 in float32 only at a logit gap above ~100, where it
is then counted as masked. Rows that see a single key have no normalised entropy (ln 1 = 0) and are left out
of that mean only.
"""

from __future__ import annotations

import math

import torch

from litattn.attention.observers import AttentionObserver

STATS = ("entropy", "normalized_entropy", "max_prob", "segment_mass")
"""Per-row statistics kept besides the sink masses (`sink_1` .. `sink_k`)."""


def bucket_of(position: torch.Tensor) -> torch.Tensor:
    """Bucket of 0-based query positions: floor(log2(position + 1))."""
    return torch.floor(torch.log2(position.double() + 1)).long()


def bucket_label(b: int, length: int | None = None) -> str:
    """1-based positions of bucket b, e.g. `4-7` (cut at `length`, the last position, when given)."""
    low, high = 2**b, 2 ** (b + 1) - 1 if length is None else min(2 ** (b + 1) - 1, length)
    return str(low) if low == high else f"{low}-{high}"


class AttentionStatistics(AttentionObserver):
    """Sums of per-row statistics by layer, head and position bucket; `summary()` turns them into means.

    `sinks`: the k of the sink masses (mass on the first 1 .. k positions). `segments` (B, S) long, optional:
    a segment id per key position (the query at position i belongs to segment segments[:, i]); with it each
    row's mass on keys of its own segment is kept. Queries are assumed to sit at positions q_start .. of the
    keys (a forward over the whole sequence, as `GPT.observe` runs it).
    """

    def __init__(self, sinks: int = 4, segments: torch.Tensor | None = None) -> None:
        if sinks < 1:
            raise ValueError(f"sinks must be >= 1, got {sinks}")
        self.sinks = sinks
        self.segments = segments
        self.columns = [*STATS, *(f"sink_{k}" for k in range(1, sinks + 1))]
        self.sums: dict[int, torch.Tensor] = {}  # layer -> (H, buckets, columns) float64
        self.counts: dict[int, torch.Tensor] = {}  # layer -> (H, buckets, columns) float64: rows in each sum

    def observe(self, layer: int, q_start: int, probs: torch.Tensor) -> None:
        p = probs.double()  # (B, H, c, S)
        B, H, c, S = p.shape
        visible = (p > 0).sum(-1)  # (B, H, c)
        entropy = -torch.where(p > 0, p * torch.log(p.clamp_min(1e-300)), torch.zeros_like(p)).sum(-1)
        normalized = torch.where(visible > 1, entropy / torch.log(visible.clamp_min(2).double()), math.nan)
        sink = p[..., : self.sinks].cumsum(-1)  # (B, H, c, <= sinks): mass on the first 1 .. k keys
        if sink.shape[-1] < self.sinks:  # fewer keys than sinks: every key is a sink
            sink = torch.cat([sink, sink[..., -1:].expand(*sink.shape[:-1], self.sinks - sink.shape[-1])], -1)
        if self.segments is not None:
            seg = self.segments.to(p.device)  # (B, S)
            own = seg[:, q_start : q_start + c]  # (B, c): each query's segment
            same = (seg[:, None, :] == own[:, :, None]).double()  # (B, c, S)
            segment_mass = (p * same[:, None]).sum(-1)
        else:
            segment_mass = torch.full_like(entropy, math.nan)
        per_row = torch.stack([entropy, normalized, p.amax(-1), segment_mass], -1)  # (B, H, c, 4)
        values = torch.cat([per_row, sink], -1)  # (B, H, c, columns)
        buckets = bucket_of(torch.arange(q_start, q_start + c, device=p.device))  # (c,)
        n_buckets = int(bucket_of(torch.tensor(q_start + c - 1))) + 1
        known = ~torch.isnan(values)
        index = buckets[None, None, :, None].expand_as(values)
        sums = torch.zeros(B, H, n_buckets, values.shape[-1], dtype=torch.float64, device=p.device)
        counts = torch.zeros_like(sums)
        sums.scatter_add_(2, index, torch.where(known, values, 0.0))
        counts.scatter_add_(2, index, known.double())
        self._add(layer, q_start, sums.sum(0).cpu(), counts.sum(0).cpu())

    def _add(self, layer: int, q_start: int, sums: torch.Tensor, counts: torch.Tensor) -> None:
        if layer not in self.sums:
            if q_start != 0:
                raise RuntimeError(f"AttentionStatistics: layer {layer}'s first chunk starts at query {q_start}, not 0")
            self.sums[layer], self.counts[layer] = sums, counts
            return
        old_s, old_c = self.sums[layer], self.counts[layer]
        n = max(old_s.shape[1], sums.shape[1])
        self.sums[layer] = _pad(old_s, n) + _pad(sums, n)  # several forwards accumulate (unlike DenseMaps)
        self.counts[layer] = _pad(old_c, n) + _pad(counts, n)

    def summary(self, per_head: bool = False) -> dict[int, dict[str, torch.Tensor]]:
        """layer -> column -> means by bucket: (buckets,) averaged over heads, or (H, buckets) per head; NaN
        where no row had the statistic. Also `rows`: the rows in each bucket (per head)."""
        out = {}
        for layer in sorted(self.sums):
            s, n = self.sums[layer], self.counts[layer]
            if not per_head:
                s, n = s.sum(0), n.sum(0)
            means = s / n  # NaN where n == 0
            out[layer] = {name: means[..., i] for i, name in enumerate(self.columns)}
            out[layer]["rows"] = n[..., self.columns.index("entropy")]
        return out

    def overall(self) -> dict[int, dict[str, float]]:
        """layer -> column -> mean over every row of every head and bucket."""
        out = {}
        for layer in sorted(self.sums):
            s, n = self.sums[layer].sum((0, 1)), self.counts[layer].sum((0, 1))
            out[layer] = {name: float(s[i] / n[i]) if n[i] else math.nan for i, name in enumerate(self.columns)}
        return out

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()


def _pad(x: torch.Tensor, buckets: int) -> torch.Tensor:
    """(H, b, C) zero-padded to (H, buckets, C)."""
    return torch.nn.functional.pad(x, (0, 0, 0, buckets - x.shape[1]))
