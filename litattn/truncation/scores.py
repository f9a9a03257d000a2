"""Token scores: the attention each token receives, through attention observers (no T x T tensor)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from litattn.args import check_choice, check_indexes
from litattn.attention.observers import AttentionObserver
from litattn.checkpoint import MODEL_FILE, load_with_tokenizer
from litattn.model import CausalSelfAttention
from litattn.tokenizer import Tokenizer
from litattn.truncation.options import Variant, Visible
from litattn.utils import file_digest


class ScoreObserver(AttentionObserver):
    """Reduces each chunk of probabilities to its share of the token scores, per layer: `totals[layer]` (B, S).

    layers: the block applications scored (others are ignored); heads: query head indexes; valid (B, S) bool or
    None: real tokens (False: padding, neither a query nor a key); counts: layer -> |Q_j| broadcastable to
    (B, H, S), for "received"; lengths (B,): the T of "original".
    """

    def __init__(
        self,
        layers: Sequence[int],
        heads: Sequence[int],
        variant: Variant = "received",
        *,
        valid: torch.Tensor | None = None,
        counts: Mapping[int, torch.Tensor] | None = None,
        lengths: torch.Tensor | None = None,
    ) -> None:
        check_choice("variant", variant, Variant)
        if variant == "received" and counts is None:
            raise ValueError("ScoreObserver: variant 'received' needs counts (the queries that can see each key)")
        self.layers, self.heads, self.variant = set(layers), list(heads), variant
        self.valid, self.counts, self.lengths = valid, counts, lengths
        self.totals: dict[int, torch.Tensor] = {}
        self._next: dict[int, int] = {}  # layer -> the query its next chunk must start at

    def observe(self, layer: int, q_start: int, probs: torch.Tensor) -> None:
        if layer not in self.layers:
            return
        B, _, c, S = probs.shape
        if q_start == 0:
            self.totals[layer] = torch.zeros(B, S, dtype=torch.float32, device=probs.device)
        elif self._next.get(layer) != q_start:
            raise RuntimeError(
                f"ScoreObserver: layer {layer}'s chunk starts at query {q_start}, not where the last one ended"
            )
        self._next[layer] = q_start + c
        if self.heads != list(range(probs.shape[1])):
            probs = probs[:, self.heads]  # (B, h, c, S)
        if self.valid is not None:
            probs = probs * (self.valid[:, None, q_start : q_start + c, None] & self.valid[:, None, None, :])
        share = probs.sum(dim=2)  # (B, h, S): the attention each key receives from this chunk
        if self.variant == "received":
            count = self.counts[layer]
            count = count[:, self.heads] if count.shape[1] > 1 else count
            share = torch.where(count > 0, share / count.clamp(min=1), 0.0)
        else:
            own = probs.sum(dim=3) - torch.diagonal(probs[..., q_start : q_start + c], dim1=-2, dim2=-1)  # (B, h, c)
            share[..., q_start : q_start + c] += own
            n = self.lengths if self.lengths is not None else torch.full((B,), S, device=probs.device)
            share = share / n.clamp(min=1).to(share.dtype).view(B, 1, 1)
        self.totals[layer] += share.sum(dim=1)

    def scores(self) -> torch.Tensor:
        """(B, S) the mean over the observed layers and the heads."""
        missing = sorted(self.layers - set(self.totals))
        if missing:
            raise RuntimeError(
                f"No attention probabilities reached the observer for layer(s) {missing}: the mechanism's attend() "
                "must hand its probabilities to ctx.observer when one is set"
            )
        for layer, total in self.totals.items():
            if self._next[layer] != total.shape[1]:
                raise RuntimeError(
                    f"ScoreObserver: layer {layer} ended at query {self._next[layer]} of {total.shape[1]}"
                )
        return sum(self.totals.values()) / (len(self.totals) * len(self.heads))

    def reset(self) -> None:
        self.totals.clear()
        self._next.clear()


class VisibleQueries(AttentionObserver):
    """`counts[layer]` (B, H or 1, S) float32: how many query rows give each key a probability > 0 (padding rows
    excluded). Meant for a forward with zeroed queries (`token_scores(visible="mask")`), where that is the mask's
    count; a layer whose heads agree keeps one head, and a layer equal to the previous one shares its tensor."""

    def __init__(self, valid: torch.Tensor | None = None) -> None:
        self.valid = valid
        self.counts: dict[int, torch.Tensor] = {}
        self._open: int | None = None

    def observe(self, layer: int, q_start: int, probs: torch.Tensor) -> None:
        B, H, c, S = probs.shape
        if q_start == 0:
            self._compact()
            self.counts[layer] = torch.zeros(B, H, S, dtype=torch.float32, device=probs.device)
            self._open = layer
        elif layer not in self.counts:
            raise RuntimeError(f"VisibleQueries: layer {layer}'s first chunk starts at query {q_start}, not 0")
        seen = probs > 0
        if self.valid is not None:
            seen = seen & self.valid[:, None, q_start : q_start + c, None]
        self.counts[layer] += seen.sum(dim=2, dtype=torch.float32)

    def _compact(self) -> None:
        if self._open is None:
            return
        count = self.counts[self._open]
        if (count == count[:, :1]).all():
            count = count[:, :1]
        for other in self.counts.values():  # most layers share one mask: keep one tensor for them
            if other is not count and other.shape == count.shape and torch.equal(other, count):
                count = other
                break
        self.counts[self._open] = count
        self._open = None

    def result(self) -> dict[int, torch.Tensor]:
        self._compact()
        return self.counts

    def reset(self) -> None:
        self.counts.clear()
        self._open = None


@contextmanager
def zeroed_queries(model) -> Iterator[None]:
    """Inside: every attention layer of `model` gets all-zero queries, so each softmax row is uniform over the keys
    its mask allows (what `visible="mask"` counts). Hooks the mechanism's forward(q, k, v, ctx)."""

    def zero(module, args):
        return (torch.zeros_like(args[0]), *args[1:])

    handles = [
        m.mechanism.register_forward_pre_hook(zero) for m in model.modules() if isinstance(m, CausalSelfAttention)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def token_scores(
    model,
    idx: torch.Tensor,
    *,
    lengths: torch.Tensor | Sequence[int] | None = None,
    variant: Variant = "received",
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    visible: Visible = "mask",
    **metadata: Any,
) -> torch.Tensor:
    """The score of every token of idx (B, T) -> (B, T) float32: the attention it gets (see the module docstring).

    lengths (B,): the real tokens of each row (the rest is right padding: neither scored nor a query; score 0).
    layers: block applications (negative: from the end), heads: query heads; default all. metadata: the
    mechanism's batch metadata (prefix_len, segment_ids). The model runs in eval mode and is restored after.
    """

    check_choice("variant", variant, Variant)
    check_choice("visible", visible, Visible)
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.is_floating_point():
        raise ValueError(f"idx must be a (B, T) tensor of token ids, got {describe(idx)}")
    B, T = idx.shape
    layer_idx = check_indexes(None if layers is None else list(layers), model.block_applications(), "layer")
    head_idx = check_indexes(None if heads is None else list(heads), model.config.n_head, "head")
    valid = None
    if lengths is not None:
        lengths = check_lengths(lengths, B, T).to(idx.device)
        valid = torch.arange(T, device=idx.device) < lengths[:, None]  # (B, T)
    if B == 0 or T == 0:
        return torch.zeros(B, T, device=idx.device)
    was_training = model.training
    model.eval()
    try:
        counts = None
        if variant == "received":
            if visible == "mask":
                counter = VisibleQueries(valid)
                with zeroed_queries(model):
                    model.observe(idx, counter, **metadata)
                counts = counter.result()
            else:
                n = torch.full((B,), T, device=idx.device) if lengths is None else lengths
                causal = (n[:, None] - torch.arange(T, device=idx.device)).clamp(min=0).float()[:, None]  # (B, 1, T)
                counts = dict.fromkeys(layer_idx, causal)
        observer = ScoreObserver(layer_idx, head_idx, variant, valid=valid, counts=counts, lengths=lengths)
        model.observe(idx, observer, **metadata)
    finally:
        model.train(was_training)
    return observer.scores()


@torch.no_grad()
def windowed_token_scores(model, sequences: Sequence[torch.Tensor], batch_size: int = 16) -> list[torch.Tensor]:
    """`token_scores` of sequences of any length: each cut into consecutive windows of the model's context,
    each window scored alone, the windows of all sequences in padded batches (longest first, so a batch is even).
    Returns one (len,) float32 tensor per sequence. A token's score then covers its own window only."""
    window = model.max_seq_length
    device = model.lm_head.weight.device
    pieces = [piece for s in sequences for piece in torch.as_tensor(s, dtype=torch.long).split(window)]
    order = sorted(range(len(pieces)), key=lambda i: -len(pieces[i]))
    scored: list[torch.Tensor | None] = [None] * len(pieces)
    batches = range(0, len(order), batch_size)
    for start in tqdm(batches, desc="scoring", unit="batch", leave=False, disable=len(batches) < 2):
        chosen = order[start : start + batch_size]
        lengths = torch.tensor([len(pieces[i]) for i in chosen])
        batch = torch.zeros(len(chosen), int(lengths.max()), dtype=torch.long)
        for row, i in enumerate(chosen):
            batch[row, : len(pieces[i])] = pieces[i]
        scores = token_scores(model, batch.to(device), lengths=lengths).cpu()  # (rows, width)
        for row, i in enumerate(chosen):
            scored[i] = scores[row, : len(pieces[i])]
    out, k = [], 0
    for s in sequences:
        n = -(-len(s) // window)
        out.append(torch.cat(scored[k : k + n]) if n else torch.zeros(0))
        k += n
    return out


def check_lengths(lengths, B: int, T: int) -> torch.Tensor:
    lengths = torch.as_tensor(lengths)
    if lengths.shape != (B,) or lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must be {B} integers (one per row), got {describe(lengths)}")
    lengths = lengths.long()
    if B and not (0 <= int(lengths.min()) and int(lengths.max()) <= T):
        raise ValueError(f"lengths must be in [0, {T}] (the batch's width), got {lengths.tolist()}")
    return lengths


def describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


class CheckpointScorer:
    """Token scores of prompts by a checkpoint's model, each prompt scored by itself (attention_live): what the data
    layer is handed instead of loading a checkpoint. The weights load on the first `scores` call; `digest` (of the
    weights file) is what a cache of cut prompts is keyed by."""

    def __init__(self, checkpoint_dir: Path, tokenizer: Tokenizer) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        weights = self.checkpoint_dir / MODEL_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"scorer {str(checkpoint_dir)!r} has no {MODEL_FILE}: pass a checkpoint directory")
        if Tokenizer(self.checkpoint_dir).fingerprint() != tokenizer.fingerprint():
            raise ValueError(
                f"scorer {str(checkpoint_dir)!r} has another tokenizer than the data's: score with a checkpoint of the "
                "same tokenizer (e.g. the one being finetuned)"
            )
        self.digest = file_digest(weights)
        self._model = None

    @property
    def model(self):
        if self._model is None:
            self._model = load_with_tokenizer(self.checkpoint_dir, torch.device("cpu"))[0]
        return self._model

    def scores(self, prompts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return windowed_token_scores(self.model, prompts)
