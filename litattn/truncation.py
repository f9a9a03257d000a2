"""Attention-based truncation of inputs: drop a long input's least important tokens instead of its end.

The method: score every token by the attention the model gives it, average the scores per token id over a
corpus into an importance dictionary, and when a sequence is too long remove its lowest-scoring tokens (the
others keep their order) until it fits.

    token_scores(model, idx)               (B, T) the score of each token, under the model's own mechanism
    build_importance(model, batches)       Importance: token id -> mean score over a corpus (JSON, resumable)
    build_frequency(documents)             Importance: idf, log(N / doc_freq): the frequency-only control
    truncate(ids, max_length, importance)  exactly max_length tokens, order kept (lists, tensors, padded batches)
    truncate_live(model, ids, max_length)  the same, scored by the model on this very input
    build(...), apply(...)                 the `litattn truncate build | apply` entry points

Scores, for one layer (block application) and head of a row of T tokens, p_ij the probability query i gives key j:

    received (default)  s_j = sum_{i in Q_j} p_ij / |Q_j|         Q_j: the queries the mask lets see key j
    original            s_j = (sum_k p_jk + sum_i p_ij - p_jj) / T
                        the original method's: the attention token j pays (a softmax row: 1) plus the attention
                        it receives, its self-attention counted once, over the row's T tokens

then averaged over the chosen layers and heads. Under a causal mask "original" favours early tokens (T - j
queries add to a column, one normaliser); "received" compares tokens by the mean attention of their viewers.

|Q_j| (`visible`): "mask" counts, per key, the query rows that hold it in a second observed forward whose
queries are all zero. Every score is then equal, so each softmax row is uniform over exactly the keys its mask
allows (1/n >= 1/T, never 0): the count is the mask's for any mechanism (a window, Disrupt segments, hybrid's
bidirectional prefix), whatever the scoring pass's probabilities underflow to. It costs one more forward.
"causal" takes |Q_j| = T - j without it: exact for causal masks (causal, self_extend, ssa over causal) only.
Counting p_ij > 0 in the scoring pass was rejected: a visible key scored ~100 below its row's maximum
underflows to 0 in float32 and would drop out of its own count.

Memory: attention is computed one query chunk at a time (`GPT.observe`) and each chunk is reduced at once into
per-layer (B, T) totals, so no T x T tensor exists. The chunk size is the kernels': `kernels.MASK_BUDGET` bytes
of float32 scores (self_extend: `QUERY_BLOCK` queries); `GPT.observe` takes no chunk argument.

Truncation removes exactly len - max_length unprotected tokens, lowest score first (the original removed every
occurrence of the lowest-scoring id at once and could undershoot). Among equal scores the later position goes
first, so equal scores (an empty dictionary) give right truncation. Protected tokens (`Protect`) always stay.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from litattn.attention.observers import AttentionObserver
from litattn.data import DataModule

Variant = Literal["received", "original"]
"""received: mean attention over the queries that can see the token; original: (row + column - self) / T."""
Visible = Literal["mask", "causal"]
"""How the queries that can see a key are counted: "mask" (a second forward, any mechanism) or "causal" (T - j)."""
Method = Literal["attention", "idf"]
"""attention: mean token_scores per id; idf: log(documents / documents holding the id)."""

FORMAT = "litattn.importance"
FORMAT_VERSION = 1
MAX_TOKEN_ID = 2**24
"""Token ids of a dictionary are below this (the largest vocabularies have ~2**18): a larger one is a corrupt file,
not a table of that many entries to allocate."""
MAX_COUNT = 2**62
"""Occurrence and document counts are below this (int64, with room to add)."""
FIELDS = ("instruction", "input", "output")
"""The text fields of an instruction example (litattn.data.instructions)."""


def _check_choice(name: str, value: Any, choices: type) -> None:
    if value not in get_args(choices):
        raise ValueError(f"{name} must be one of {', '.join(get_args(choices))}, got {value!r}")


# ---------------------------------------------------------------------------------- scores
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
        _check_choice("variant", variant, Variant)
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
    from litattn.model import CausalSelfAttention

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
    from litattn.visualize import _indexes

    _check_choice("variant", variant, Variant)
    _check_choice("visible", visible, Visible)
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.is_floating_point():
        raise ValueError(f"idx must be a (B, T) tensor of token ids, got {_describe(idx)}")
    B, T = idx.shape
    layer_idx = _indexes(None if layers is None else list(layers), model.block_applications(), "layer")
    head_idx = _indexes(None if heads is None else list(heads), model.config.n_head, "head")
    valid = None
    if lengths is not None:
        lengths = _check_lengths(lengths, B, T).to(idx.device)
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
    from tqdm import tqdm

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


def _check_lengths(lengths, B: int, T: int) -> torch.Tensor:
    lengths = torch.as_tensor(lengths)
    if lengths.shape != (B,) or lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must be {B} integers (one per row), got {_describe(lengths)}")
    lengths = lengths.long()
    if B and not (0 <= int(lengths.min()) and int(lengths.max()) <= T):
        raise ValueError(f"lengths must be in [0, {T}] (the batch's width), got {lengths.tolist()}")
    return lengths


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


# ---------------------------------------------------------------------------------- importance dictionary
class Importance:
    """Token id -> importance, kept as per-id statistics of a corpus, so a build can stop, resume and be saved.

    method "attention": score = sums[id] / counts[id], the mean score of the id's occurrences.
    method "idf":       score = log(documents / counts[id]), counts[id] the documents holding the id: rare ids
                        score high, so truncation drops frequent ones first.
    An id never seen scores `default`; None: the mean score of the ids seen (an unknown token is neither kept nor
    dropped first). `info` records how the dictionary was built (and what a resumed build must match).
    """

    def __init__(self, method: Method = "attention", *, default: float | None = None, info: dict | None = None):
        _check_choice("method", method, Method)
        if default is not None and not _is_number(default):
            raise ValueError(f"default must be a number (or null for the mean score), got {_short_repr(default)}")
        self.method = method
        self.default = None if default is None else float(default)
        self.info: dict[str, Any] = dict(info or {})
        self.sums = torch.zeros(0, dtype=torch.float64)  # (V,) attention: the scores of each id, summed
        self.counts = torch.zeros(0, dtype=torch.int64)  # (V,) attention: occurrences; idf: documents holding it
        self.documents = 0
        self.source: Path | None = None  # the file `load` read
        self._table: torch.Tensor | None = None
        self._default = 0.0

    @classmethod
    def from_scores(cls, scores: Mapping[int, float], *, default: float | None = None) -> Importance:
        """A dictionary of given scores (each id one observation): how `truncate` reads a plain mapping."""
        imp = cls("attention", default=default)
        try:
            ids = torch.tensor([int(k) for k in scores], dtype=torch.long)
            values = torch.tensor([float(v) for v in scores.values()], dtype=torch.float64)
        except (TypeError, ValueError):
            raise TypeError("importance must map int token ids to float scores") from None
        if values.isnan().any():
            raise ValueError("importance scores must be numbers, got NaN")
        imp.add(ids, values)
        return imp

    # ------------------------------------------------------------------ building
    def add(self, ids: torch.Tensor, scores: torch.Tensor) -> None:
        """Count one occurrence of each id with its score (attention dictionaries); any matching shapes."""
        if self.method != "attention":
            raise ValueError(f"add() builds an attention dictionary; this one is {self.method!r} (use add_document)")
        ids, scores = torch.as_tensor(ids).reshape(-1).cpu().long(), torch.as_tensor(scores).reshape(-1).cpu()
        if ids.shape != scores.shape:
            raise ValueError(f"add(): {ids.numel()} ids but {scores.numel()} scores; pass one score per id")
        self._grow(ids)
        self.sums.index_add_(0, ids, scores.double())
        self.counts.index_add_(0, ids, torch.ones_like(ids))
        self._table = None

    def add_document(self, ids: torch.Tensor | Sequence[int]) -> None:
        """Count one document: each id it holds, once (idf dictionaries)."""
        if self.method != "idf":
            raise ValueError(f"add_document() builds an idf dictionary; this one is {self.method!r} (use add)")
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1).unique()
        self._grow(ids)
        self.counts[ids] += 1
        self.documents += 1
        self._table = None

    def _grow(self, ids: torch.Tensor) -> None:
        if ids.numel() == 0:
            return
        if int(ids.min()) < 0:
            raise ValueError(f"token ids must be >= 0, got {int(ids.min())}")
        if int(ids.max()) >= MAX_TOKEN_ID:
            raise ValueError(f"token ids must be below {MAX_TOKEN_ID:,}, got {int(ids.max()):,}")
        size = int(ids.max()) + 1
        if size > len(self.counts):
            self.sums = torch.cat([self.sums, self.sums.new_zeros(size - len(self.sums))])
            self.counts = torch.cat([self.counts, self.counts.new_zeros(size - len(self.counts))])

    # ------------------------------------------------------------------ reading
    def table(self) -> torch.Tensor:
        """(V,) float64: the score of every id below V = 1 + the largest id seen (the default where unseen)."""
        if self._table is None:
            seen = self.counts > 0
            if self.method == "attention":
                known = self.sums / self.counts.clamp(min=1)
            else:
                known = torch.log(self.documents / self.counts.clamp(min=1).double())
            default = self.default
            if default is None:
                default = float(known[seen].mean()) if seen.any() else 0.0
            self._table = torch.where(seen, known, default)
            self._default = default
        return self._table

    @property
    def default_score(self) -> float:
        """What an id never seen scores."""
        self.table()
        return self._default

    def score(self, token_id: int) -> float:
        """The importance of one id; the default for an id never seen (never a KeyError)."""
        table = self.table()
        return float(table[token_id]) if 0 <= token_id < len(table) else self.default_score

    def scores_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Scores of a tensor of ids, same shape, float64 (the default where unseen)."""
        table = self.table()
        ids = torch.as_tensor(ids).long().cpu()
        inside = (ids >= 0) & (ids < len(table))
        out = torch.full(ids.shape, self.default_score, dtype=torch.float64)
        out[inside] = table[ids[inside]]
        return out

    def as_dict(self) -> dict[int, float]:
        """id -> score of the ids seen."""
        seen = (self.counts > 0).nonzero().squeeze(1)
        return dict(zip(seen.tolist(), self.table()[seen].tolist(), strict=True))

    def __len__(self) -> int:
        return int((self.counts > 0).sum())

    def __contains__(self, token_id: object) -> bool:
        return isinstance(token_id, int) and 0 <= token_id < len(self.counts) and bool(self.counts[token_id] > 0)

    def __repr__(self) -> str:
        return f"Importance(method={self.method!r}, ids={len(self)}, default={self.default!r})"

    def check_tokenizer(self, tokenizer) -> None:
        """Refuse a tokenizer whose ids are not the ones the dictionary was built on: the fingerprint recorded by
        `litattn truncate build` (`info["tokenizer"]`) must be the tokenizer's; a dictionary without one (built
        before they were recorded) must at least hold no id beyond the tokenizer's vocabulary."""
        name = str(self.source) if self.source is not None else "the importance dictionary"
        recorded = self.info.get("tokenizer")
        if recorded is not None and recorded != tokenizer.fingerprint():
            built_from = self.info.get("checkpoint_dir")
            raise ValueError(
                f"{name} was built with another tokenizer (fingerprint {recorded}"
                + (f", of {built_from}" if built_from else "")
                + f") than {tokenizer.model_file}'s (fingerprint {tokenizer.fingerprint()}): its token ids mean "
                "other tokens here; build a dictionary with this checkpoint (`litattn truncate build "
                "--checkpoint_dir ...`) or use the tokenizer it was built with"
            )
        if recorded is None and len(self.counts) > tokenizer.vocab_size:
            raise ValueError(
                f"{name} holds token ids up to {len(self.counts) - 1}, beyond the {tokenizer.vocab_size}-token "
                f"vocabulary of {tokenizer.model_file}: it was built with another tokenizer; build a dictionary "
                "with this checkpoint (`litattn truncate build --checkpoint_dir ...`)"
            )

    # ------------------------------------------------------------------ files
    def save(self, path: Path | str) -> Path:
        """Write the dictionary as JSON (atomically: a crash leaves the old file or none, never half of one)."""
        from litattn.utils import atomic_write_text

        seen = (self.counts > 0).nonzero().squeeze(1)
        data = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "method": self.method,
            "default": self.default,
            "documents": self.documents,
            "info": self.info,
            "ids": seen.tolist(),
            "counts": self.counts[seen].tolist(),
        }
        if self.method == "attention":
            data["sums"] = self.sums[seen].tolist()
        path = Path(path)
        atomic_write_text(path, json.dumps(data) + "\n")
        return path

    @classmethod
    def load(cls, path: Path | str) -> Importance:
        """Read a dictionary `save` wrote; one-line errors for a missing or corrupt file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"Importance file {str(path)!r} does not exist; build one with `litattn truncate build`"
            )
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
            raise ValueError(f"{path} is not an importance file (not valid JSON: {e}); rebuild it") from None
        try:
            imp = cls._from_json(data)
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            problem = f"no {e} field" if isinstance(e, KeyError) else str(e)
            raise ValueError(
                f"{path} is not an importance file ({problem}); rebuild it with `litattn truncate build`"
            ) from None
        imp.source = path
        return imp

    @classmethod
    def _from_json(cls, data: Any) -> Importance:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"no {FORMAT!r} format marker")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"format version {data.get('version')!r}, this litattn reads {FORMAT_VERSION}")
        imp = cls(data["method"], default=data["default"], info=data["info"])
        ids, counts = data["ids"], data["counts"]
        sums = data["sums"] if imp.method == "attention" else [0.0] * len(ids)
        if not all(isinstance(x, list) for x in (ids, counts, sums)) or not len(ids) == len(counts) == len(sums):
            raise ValueError("ids, counts and sums must be lists of one length")
        _check_each(
            "ids", ids, lambda i: type(i) is int and 0 <= i < MAX_TOKEN_ID, f"integers in [0, {MAX_TOKEN_ID:,})"
        )
        if len(set(ids)) != len(ids):
            raise ValueError("ids must be distinct")
        _check_each("counts", counts, lambda c: type(c) is int and 1 <= c < MAX_COUNT, "integers in [1, 2**62)")
        _check_each("sums", sums, lambda x: _is_number(x) and math.isfinite(x), "finite numbers")
        if type(data["documents"]) is not int or not 0 <= data["documents"] < MAX_COUNT:
            raise ValueError(f"documents must be an integer in [0, 2**62), got {_short_repr(data['documents'])}")
        if not isinstance(imp.info, dict):
            raise ValueError("info must be a mapping")
        ids_t = torch.tensor(ids, dtype=torch.long)
        imp._grow(ids_t)
        imp.counts[ids_t] = torch.tensor(counts, dtype=torch.long)
        imp.sums[ids_t] = torch.tensor(sums, dtype=torch.float64)
        imp.documents = data["documents"]
        return imp


def _is_number(x: Any) -> bool:
    """An int or float that a float holds (a JSON integer of 400 digits does not), NaN excluded."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return not math.isnan(float(x))
    except OverflowError:
        return False


def _short_repr(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


def _check_each(name: str, values: list, ok, what: str) -> None:
    for value in values:
        if not ok(value):
            raise ValueError(f"{name} must be {what}, got {_short_repr(value)}")


class Batches:
    """A map-style dataset (items: dicts of tensors) as batches of `batch_size` items, in order, with a length:
    what `build_importance` reads from a data module's dataset."""

    def __init__(self, dataset, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size = dataset, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        from torch.utils.data import default_collate

        n = len(self.dataset)
        for start in range(0, n, self.batch_size):
            yield default_collate([self.dataset[i] for i in range(start, min(n, start + self.batch_size))])


def batch_lengths(batch: torch.Tensor | Mapping[str, Any]) -> torch.Tensor:
    """(B,) the real tokens of each row of a batch: its `lengths`; else, with `labels`, up to the last target
    (what follows it is padding: InstructionDataset); else the full width."""
    idx = batch if isinstance(batch, torch.Tensor) else batch["input_ids"]
    B, T = idx.shape
    if isinstance(batch, Mapping) and "lengths" in batch:
        return _check_lengths(batch["lengths"], B, T)
    if isinstance(batch, Mapping) and "labels" in batch:
        targets = torch.as_tensor(batch["labels"]) != -100  # (B, T)
        last = torch.where(targets, torch.arange(1, T + 1, device=targets.device), 0).amax(dim=1)
        return last.cpu()
    return torch.full((B,), T, dtype=torch.long)


def _unpack(batch, model) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(idx (B, T), lengths (B,), the metadata the mechanism reads) of a batch, on the model's device."""
    device = model.lm_head.weight.device
    if isinstance(batch, torch.Tensor):
        idx, metadata = batch, {}
    elif isinstance(batch, Mapping) and "input_ids" in batch:
        idx = batch["input_ids"]
        metadata = {k: torch.as_tensor(batch[k]).to(device) for k in model.mechanism.metadata_keys if k in batch}
    else:
        raise TypeError(f"a batch must be a (B, T) tensor of ids or a dict with 'input_ids', got {_describe(batch)}")
    if idx.dim() != 2:
        raise ValueError(f"a batch's input_ids must be (B, T), got shape {tuple(idx.shape)}")
    return idx.to(device), batch_lengths(batch).to(device), metadata


def partial_path(out: Path | str) -> Path:
    """Where a build writes its partial sums: `<out>.partial` beside the out file."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def build_importance(
    model,
    batches: Iterable[torch.Tensor | Mapping[str, Any]],
    *,
    variant: Variant = "received",
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    visible: Visible = "mask",
    default: float | None = None,
    max_batches: int | None = None,
    out: Path | str | None = None,
    checkpoint_every: int | None = 100,
    info: dict | None = None,
) -> Importance:
    """The mean `token_scores` of every token id over `batches` (tensors (B, T), or dicts with input_ids and
    optionally lengths, labels and the mechanism's metadata; see `batch_lengths` for padding).

    With `out`, the result is saved there, and every `checkpoint_every` batches the partial sums go to
    `partial_path(out)`: a build started again with the same settings and batches resumes after the last batch
    saved (skipping, not scoring, the batches before it); the partial file is removed when the build completes.
    `info` (e.g. the checkpoint and data) is stored with the settings; a partial file of other settings is an error.
    """
    from litattn.args import check_range
    from litattn.evaluate import _progress

    check_range("max_batches", max_batches, ge=1, null="every batch")
    check_range("checkpoint_every", checkpoint_every, ge=1, null="never")
    settings = {
        "variant": variant,
        "layers": None if layers is None else list(layers),
        "heads": None if heads is None else list(heads),
        "visible": visible,
        **(info or {}),
    }
    settings = json.loads(json.dumps(settings, default=str))  # as a saved file holds them: comparable
    imp = Importance("attention", default=default, info={**settings, "batches": 0})
    partial = None if out is None else partial_path(out)
    done = 0
    if partial is not None and partial.exists():
        imp = Importance.load(partial)
        done = imp.info.get("batches", 0)
        saved = {k: v for k, v in imp.info.items() if k != "batches"}
        differ = _differences({**saved, "default": imp.default}, {**settings, "default": default})
        if differ:
            raise ValueError(
                f"{partial} holds a build with other settings ({differ}); delete it to start afresh, or build with "
                "those settings to resume it"
            )
        if max_batches is not None and done > max_batches:
            raise ValueError(
                f"{partial} already covers {done} batches, more than max_batches {max_batches}: delete it to build "
                f"over {max_batches} batches, or set max_batches to {done} or more (or none) to resume it"
            )
    total = len(batches) if hasattr(batches, "__len__") else None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
        batches = itertools.islice(batches, max_batches)
    with _progress(total, "importance", unit="batch") as bar:
        for i, batch in enumerate(batches):
            bar.update(1)
            if i < done:  # scored before the build was interrupted
                continue
            idx, lengths, metadata = _unpack(batch, model)
            scores = token_scores(
                model, idx, lengths=lengths, variant=variant, layers=layers, heads=heads, visible=visible, **metadata
            )
            valid = torch.arange(idx.shape[1], device=idx.device) < lengths[:, None]
            imp.add(idx[valid], scores[valid])
            imp.info["batches"] = i + 1
            if partial is not None and checkpoint_every and (i + 1) % checkpoint_every == 0:
                imp.save(partial)
    if imp.info["batches"] < done:
        raise ValueError(f"{partial} covers {done} batches but the data has only {imp.info['batches']}; delete it")
    if out is not None:
        imp.save(out)
        partial.unlink(missing_ok=True)
    return imp


def _differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> str:
    """The settings that differ, each as `key: <saved> in the partial file, <now> now` (long values cut to the
    place where they differ)."""
    missing = object()

    def brief(value: Any, other: Any) -> str:
        if value is missing:
            return "absent"
        text, against = repr(value), repr(other)
        if len(text) <= 60:
            return text
        start = next((i for i, (a, b) in enumerate(zip(text, against, strict=False)) if a != b), len(against))
        start = max(0, min(start - 20, len(text) - 60))
        return ("..." if start else "") + text[start : start + 60] + ("..." if start + 60 < len(text) else "")

    parts = []
    for key in sorted(set(saved) | set(now)):
        before, after = saved.get(key, missing), now.get(key, missing)
        if before != after:
            parts.append(f"{key}: {brief(before, after)} in the partial file, {brief(after, before)} now")
    return "; ".join(parts)


def build_frequency(
    documents: Iterable[torch.Tensor | Sequence[int]], *, default: float | None = None, info: dict | None = None
) -> Importance:
    """idf of every token id over `documents` (each a sequence of ids): log(N / documents holding the id).

    The control for attention scores: truncation by it drops the most frequent tokens first, so an attention
    dictionary has to beat it to show that attention adds anything beyond frequency.
    """
    imp = Importance("idf", default=default, info=info)
    for doc in documents:
        imp.add_document(doc)
    return imp


# ---------------------------------------------------------------------------------- truncation
@dataclass(frozen=True)
class Protect:
    """Tokens `truncate` never removes: a token is protected when any rule holds."""

    ids: Collection[int] = ()
    """Token ids kept wherever they occur: special tokens (bos, eos, separators, <|endthought|>)."""
    spans: Sequence[tuple[int, int]] = ()
    """Position ranges [start, end) kept, e.g. the question; negative positions count from the end of the row,
    out-of-range ones are clipped (as in Python slices)."""
    first: int = 0
    """The first `first` tokens of each row."""
    last: int = 0
    """The last `last` tokens of each row (a prompt that ends with its question)."""

    def __post_init__(self) -> None:
        for name in ("first", "last"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Protect.{name} must be an integer >= 0, got {value!r}")
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in self.ids):
            raise TypeError(f"Protect.ids must be integer token ids, got {list(self.ids)!r}")
        for span in self.spans:
            if not (isinstance(span, (tuple, list)) and len(span) == 2 and all(isinstance(x, int) for x in span)):
                raise TypeError(f"Protect.spans must be (start, end) pairs of integers, got {span!r}")

    def mask(self, ids: torch.Tensor) -> torch.Tensor:
        """(n,) bool: the protected positions of one row of ids (n,)."""
        n = len(ids)
        keep = torch.zeros(n, dtype=torch.bool)
        if self.ids:
            keep |= torch.isin(ids, torch.tensor(sorted(self.ids), dtype=ids.dtype))
        for start, end in self.spans:
            keep[slice(start, end)] = True
        keep[: self.first] = True
        if self.last:
            keep[max(0, n - self.last) :] = True
        return keep


def truncate(
    ids: Sequence[int] | torch.Tensor,
    max_length: int,
    importance: Importance | Mapping[int, float] | None = None,
    *,
    scores: Sequence[float] | torch.Tensor | None = None,
    protect: Protect | Sequence[bool] | torch.Tensor | None = None,
    lengths: Sequence[int] | torch.Tensor | None = None,
    pad_id: int | None = None,
    return_positions: bool = False,
):
    """Remove the lowest-scoring tokens of ids until max_length remain; the survivors keep their order.

    ids: a list of ints (-> a list), a 1-D tensor (-> a tensor) or a right-padded batch (B, T) (-> a batch
        (B, min(T, max_length)), each row cut to at most max_length tokens and padded with pad_id (0 if None)).
        A batch's real lengths come from `lengths`, else from the trailing run of `pad_id`, else the full width.
    importance: an `Importance` or a mapping id -> score (an id it lacks scores its mean); or instead
    scores: one score per position (ids' shape): "live" scores of this input (`truncate_live`).
    protect: a `Protect`, or booleans of ids' shape marking positions kept.
    return_positions: also return the original position of every survivor (a list, or a tensor; -1 at padding),
        for `GPT.forward(..., positions=)` so kept tokens keep their positions.

    An input not longer than max_length comes back unchanged. Ties: the later position is removed first.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int):
        raise TypeError(f"max_length must be an integer, got {type(max_length).__name__}")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if (importance is None) == (scores is None):
        raise ValueError("pass either importance (a dictionary) or scores (one per position), not both or neither")
    idx, kind = _as_ids(ids)
    rows = _row_lengths(idx, kind, lengths, pad_id)
    table = _position_scores(idx, kind, importance, scores)
    guard = _protected(idx, kind, rows, protect)
    B, T = idx.shape
    kept = [
        _keep(table[b, : rows[b]], guard[b, : rows[b]], max_length, b if kind == "batch" else None) for b in range(B)
    ]
    if kind == "list":
        out = idx[0, kept[0]].tolist()
        return (out, kept[0].tolist()) if return_positions else out
    if kind == "tensor":
        out = ids[kept[0].to(ids.device)]
        return (out, kept[0].to(ids.device)) if return_positions else out
    width = min(T, max_length)
    out = torch.full((B, width), 0 if pad_id is None else pad_id, dtype=ids.dtype)
    positions = torch.full((B, width), -1, dtype=torch.long)
    for b, keep in enumerate(kept):
        out[b, : len(keep)] = idx[b, keep].to(ids.dtype)
        positions[b, : len(keep)] = keep
    out, positions = out.to(ids.device), positions.to(ids.device)
    return (out, positions) if return_positions else out


def _as_ids(ids) -> tuple[torch.Tensor, str]:
    """ids as a (B, T) CPU long tensor, and what they were: "list", "tensor" or "batch"."""
    if isinstance(ids, torch.Tensor):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool or ids.dim() not in (1, 2):
            raise TypeError(f"ids must be integer token ids, 1-D or a (B, T) batch, got {_describe(ids)}")
        if ids.numel() == 0:
            raise ValueError(f"ids is empty (shape {tuple(ids.shape)}): there is nothing to truncate")
        return (ids[None] if ids.dim() == 1 else ids).long().cpu(), "tensor" if ids.dim() == 1 else "batch"
    if isinstance(ids, (list, tuple)):
        bad = next((x for x in ids if isinstance(x, bool) or not isinstance(x, int)), None)
        if bad is not None:
            raise TypeError(f"ids must be a list of int token ids, got an element of type {type(bad).__name__}")
        if not ids:
            raise ValueError("ids is empty: there is nothing to truncate")
        return torch.tensor([list(ids)], dtype=torch.long), "list"
    raise TypeError(f"ids must be a list of ints, a 1-D tensor or a (B, T) tensor, got {type(ids).__name__}")


def _row_lengths(idx: torch.Tensor, kind: str, lengths, pad_id: int | None) -> list[int]:
    B, T = idx.shape
    if kind != "batch":
        if lengths is not None or pad_id is not None:
            raise ValueError("lengths and pad_id are for a (B, T) batch; a single sequence is all real tokens")
        return [T]
    if lengths is not None:
        return _check_lengths(lengths, B, T).tolist()
    if pad_id is not None:
        real = torch.where(idx != pad_id, torch.arange(1, T + 1), 0)
        return real.amax(dim=1).tolist()
    return [T] * B


def _position_scores(idx: torch.Tensor, kind: str, importance, scores) -> torch.Tensor:
    """(B, T) float64 score of every position."""
    if scores is not None:
        table = torch.as_tensor(scores).cpu()
        if table.dim() == 1 and kind != "batch":
            table = table[None]
        if table.shape != idx.shape or table.is_complex() or table.dtype == torch.bool:
            raise ValueError(
                f"scores must give one number per position, shape {tuple(idx.shape)}; got {_describe(table)}"
            )
        table = table.double()
        if table.isnan().any():
            raise ValueError("scores hold NaN; give every position a number")
        return table
    if isinstance(importance, Importance):
        return importance.scores_of(idx)
    if isinstance(importance, Mapping):
        return Importance.from_scores(importance).scores_of(idx)
    raise TypeError(f"importance must be an Importance or a mapping id -> score, got {type(importance).__name__}")


def _protected(idx: torch.Tensor, kind: str, rows: list[int], protect) -> torch.Tensor:
    """(B, T) bool: the positions truncation must keep."""
    if protect is None:
        return torch.zeros(idx.shape, dtype=torch.bool)
    if isinstance(protect, Protect):
        out = torch.zeros(idx.shape, dtype=torch.bool)
        for b, n in enumerate(rows):
            out[b, :n] = protect.mask(idx[b, :n])
        return out
    mask = torch.as_tensor(protect).cpu()
    if mask.dim() == 1 and kind != "batch":
        mask = mask[None]
    if mask.dtype != torch.bool or mask.shape != idx.shape:
        raise TypeError(f"protect must be a Protect or booleans of shape {tuple(idx.shape)}, got {_describe(mask)}")
    return mask


def _keep(scores: torch.Tensor, protected: torch.Tensor, max_length: int, row: int | None) -> torch.Tensor:
    """Sorted positions that survive in one row: all but its n - max_length lowest-scoring unprotected ones."""
    n = len(scores)
    if n <= max_length:
        return torch.arange(n)
    n_protected = int(protected.sum())
    if n_protected > max_length:
        where = "" if row is None else f" of row {row}"
        raise ValueError(
            f"max_length {max_length} is below the {n_protected} protected tokens{where}; raise max_length or "
            "protect fewer tokens"
        )
    candidates = (~protected).nonzero().squeeze(1).flip(0)  # latest first, so a stable sort drops it first on ties
    order = torch.sort(scores[candidates], stable=True).indices
    keep = torch.ones(n, dtype=torch.bool)
    keep[candidates[order[: n - max_length]]] = False
    return keep.nonzero().squeeze(1)


def truncate_live(
    model,
    ids: Sequence[int] | torch.Tensor,
    max_length: int,
    *,
    protect: Protect | Sequence[bool] | torch.Tensor | None = None,
    lengths: Sequence[int] | torch.Tensor | None = None,
    pad_id: int | None = None,
    return_positions: bool = False,
    variant: Variant = "received",
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    visible: Visible = "mask",
    **metadata: Any,
):
    """`truncate` with this input's own `token_scores` instead of a dictionary: the model reads the whole input
    (so it must fit the model's context; a context-extension mechanism such as self_extend reaches further).
    Inputs that already fit are returned without running the model. Arguments and results as in `truncate`."""
    idx, kind = _as_ids(ids)
    rows = _row_lengths(idx, kind, lengths, pad_id)
    scores = torch.zeros(idx.shape)
    if max(rows) > max_length:
        device = model.lm_head.weight.device
        scores = token_scores(
            model,
            idx.to(device),
            lengths=None if kind != "batch" else torch.tensor(rows),
            variant=variant,
            layers=layers,
            heads=heads,
            visible=visible,
            **metadata,
        ).cpu()
    if kind != "batch":
        scores = scores[0]
    return truncate(
        ids,
        max_length,
        scores=scores,
        protect=protect,
        lengths=lengths,
        pad_id=pad_id,
        return_positions=return_positions,
    )


# ---------------------------------------------------------------------------------- entry points
def build(
    checkpoint_dir: Path,
    out: Path,
    data: DataModule | None = None,
    method: Method = "attention",
    variant: Variant = "received",
    visible: Visible = "mask",
    layers: list[int] | None = None,
    heads: list[int] | None = None,
    seq_len: int | None = None,
    split: Literal["train", "val"] = "train",
    micro_batch_size: int = 8,
    max_batches: int | None = None,
    checkpoint_every: int = 100,
    default: float | None = None,
    attention: dict | None = None,
    cache_dir: Path = Path("cache"),
    precision: str = "32-true",
) -> Importance:
    """Build a token importance dictionary from a checkpoint's attention (or the idf control) over a corpus.

        litattn truncate build --checkpoint_dir out/pretrain/final --data TextFiles ... --out importance.json

    Args:
        checkpoint_dir: A checkpoint directory (model.safetensors, model_config.yaml, tokenizer).
        out: The JSON file to write; partial sums go to `<out>.partial` and a rerun resumes from them.
        data: Data module whose split is scored; default: the Python standard library (StdlibCorpus).
        method: attention (mean attention score per token id) or idf (log(documents / documents holding the id),
            each window or example one document: the frequency-only control; the weights are not loaded).
        variant: received (attention a token gets, over the queries that can see it) or original
            ((attention paid + received - self) / T, the original method's score).
        visible: How queries that can see a key are counted for `received`: mask (a second forward; right for
            any mechanism) or causal (T - j; exact for causal masks only, half the work).
        layers: Block applications to average (negative: from the end); default: all.
        heads: Heads to average; default: all.
        seq_len: Tokens per window (or per padded example); default: the model's block_size.
        split: train or val: which split of the data module is read.
        micro_batch_size: Windows per forward pass.
        max_batches: Read at most this many micro-batches (None: the whole split).
        checkpoint_every: Save the partial sums every this many micro-batches.
        default: The score of token ids never seen; default: the mean score of those seen.
        attention: Score with another attention spec than the checkpoint's, e.g. `{name: causal}`.
        cache_dir: Where tokenized data is cached.
        precision: Fabric precision: 32-true, bf16-mixed, bf16-true, ...

    Returns:
        The dictionary written to `out`.
    """
    from litattn.args import check_range, start_work
    from litattn.checkpoint import load_config
    from litattn.data import StdlibCorpus
    from litattn.tokenizer import Tokenizer

    checkpoint_dir, out = Path(checkpoint_dir), Path(out)
    _check_choice("method", method, Method)
    _check_choice("variant", variant, Variant)
    _check_choice("visible", visible, Visible)
    _check_choice("split", split, Literal["train", "val"])
    check_range("seq_len", seq_len, ge=1, null="block_size")
    check_range("micro_batch_size", micro_batch_size, ge=1)
    check_range("max_batches", max_batches, ge=1, null="the whole split")
    check_range("checkpoint_every", checkpoint_every, ge=1)
    start_work()
    data = StdlibCorpus() if data is None else data
    # what a resumed build must match (repr, not describe(): that says whether the token cache was reused)
    info = {"method": method, "checkpoint_dir": str(checkpoint_dir), "data": repr(data), "split": split}

    if method == "idf":
        config = load_config(checkpoint_dir)
        tokenizer = Tokenizer(checkpoint_dir)
        seq_len = seq_len or config.block_size
        data.setup(tokenizer, config.vocab_size, seq_len, Path(cache_dir))
        dataset = data.train_dataset() if split == "train" else data.val_dataset()
        info.update(seq_len=seq_len, tokenizer=tokenizer.fingerprint())
        batches = itertools.islice(Batches(dataset, micro_batch_size), max_batches)
        docs = (batch["input_ids"][b, :n] for batch in batches for b, n in enumerate(batch_lengths(batch).tolist()))
        imp = build_frequency(docs, default=default, info=info)
        imp.save(out)
        print(f"Saved {out}: idf of {len(imp):,} token ids over {imp.documents:,} documents")
        return imp

    from lightning_fabric import Fabric

    from litattn.checkpoint import load_with_tokenizer
    from litattn.evaluate import _weights_dtype

    fabric = Fabric(accelerator="auto", devices=1, precision=precision)
    fabric.launch()
    model, tokenizer, config = load_with_tokenizer(checkpoint_dir, fabric.device, _weights_dtype(precision), attention)
    model.eval()
    seq_len = seq_len or config.block_size
    data.setup(tokenizer, config.vocab_size, seq_len, Path(cache_dir))
    dataset = data.train_dataset() if split == "train" else data.val_dataset()
    info.update(seq_len=seq_len, tokenizer=tokenizer.fingerprint(), attention=config.attention, precision=precision)
    info.update(micro_batch_size=micro_batch_size)
    with fabric.autocast():
        imp = build_importance(
            model,
            Batches(dataset, micro_batch_size),
            variant=variant,
            layers=layers,
            heads=heads,
            visible=visible,
            default=default,
            max_batches=max_batches,
            out=out,
            checkpoint_every=checkpoint_every,
            info=info,
        )
    print(
        f"Saved {out}: {len(imp):,} token ids from {int(imp.counts.sum()):,} tokens in {imp.info['batches']:,} batches"
    )
    return imp


def apply(
    input: Path,
    output: Path,
    max_length: int,
    importance: Path,
    tokenizer_dir: Path,
    fields: list[str] | None = None,
    max_rounds: int = 8,
) -> dict[str, Any]:
    """Truncate an instruction dataset (JSON list or JSONL of instruction/input/output) to a token length.

        litattn truncate apply --input data.jsonl --output short.jsonl --max_length 512 --importance imp.json \\
            --tokenizer_dir out/pretrain/final

    An example's length is counted as finetuning counts it: the prompt template with instruction and input, the
    output and the eos. A longer one loses the least important tokens of `fields` (the other fields stay whole),
    decoded back to text; as re-encoding text can merge tokens differently, the length is measured again and the
    cut deepened until it fits (at most `max_rounds` times). Other keys of each record are kept.

    Args:
        input: JSON list or JSONL file of {"instruction", "input", "output"} records.
        output: Where the truncated records are written (same format; may be the input file).
        max_length: Tokens an example may have (e.g. finetuning's seq_len + 1).
        importance: An importance dictionary from `litattn truncate build`.
        tokenizer_dir: The checkpoint (or tokenizer) directory whose tokenizer the dictionary's ids belong to.
        fields: The fields tokens may be removed from; default: ["input"].
        max_rounds: Re-measurements before an example that still does not fit is left as it was.

    Returns:
        The report: examples, truncated, unfit (left as they were: the other fields alone are too long),
        tokens_before, tokens_after, tokens_removed and mean_fraction_removed (over the truncated examples).
    """
    from litattn.args import check_range, start_work
    from litattn.data.instructions import parse_example, read_records
    from litattn.tokenizer import Tokenizer
    from litattn.utils import atomic_write_text

    check_range("max_length", max_length, ge=1)
    check_range("max_rounds", max_rounds, ge=1)
    fields = ["input"] if fields is None else list(fields)
    if not fields or any(f not in FIELDS for f in fields) or len(set(fields)) < len(fields):
        raise ValueError(f"fields must be distinct names of {list(FIELDS)}, got {fields}")
    start_work()
    input, output = Path(input), Path(output)
    located, is_list = read_records(input)
    examples = [parse_example(input, where, record) for where, record in located]  # checks every record
    records = [record for _, record in located]
    imp = Importance.load(importance)
    tokenizer = Tokenizer(tokenizer_dir)
    imp.check_tokenizer(tokenizer)

    report = {"examples": len(records), "truncated": 0, "unfit": 0, "tokens_before": 0, "tokens_after": 0}
    fractions = []
    for record, example in zip(records, examples, strict=True):
        texts = {"instruction": example.instruction, "input": example.input, "output": example.output}
        before = after = _example_length(tokenizer, texts)
        if before > max_length:
            cut = _cut_fields(tokenizer, texts, fields, max_length, imp, max_rounds)
            if cut is None:
                report["unfit"] += 1
            else:
                texts, after = cut
                record.update({f: texts[f] for f in fields})
                report["truncated"] += 1
                fractions.append((before - after) / before)
        report["tokens_before"] += before
        report["tokens_after"] += after
    report["tokens_removed"] = report["tokens_before"] - report["tokens_after"]
    report["mean_fraction_removed"] = sum(fractions) / len(fractions) if fractions else 0.0

    if is_list:
        atomic_write_text(output, json.dumps(records, ensure_ascii=False, indent=2) + "\n")
    else:
        atomic_write_text(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    print(
        f"Truncated {report['truncated']:,} of {report['examples']:,} examples to {max_length} tokens: "
        f"{report['tokens_removed']:,} tokens removed, {report['mean_fraction_removed']:.1%} of a truncated example "
        f"on average"
    )
    if report["unfit"]:
        print(f"{report['unfit']:,} examples left as they were: without {fields} they still exceed {max_length} tokens")
    print(f"Saved {output}")
    return report


def _example_length(tokenizer, texts: Mapping[str, str]) -> int:
    """Tokens of an example as finetuning has them: bos? + prompt, output, eos (data.instructions)."""
    from litattn.data.instructions import format_prompt

    prompt = tokenizer.encode(format_prompt(texts["instruction"], texts["input"]), bos=tokenizer.use_bos)
    return len(prompt) + len(tokenizer.encode(texts["output"])) + 1


def _cut_fields(tokenizer, texts, fields, max_length, imp, max_rounds) -> tuple[dict[str, str], int] | None:
    """(texts with `fields` cut, their length) fitting max_length; None if emptying the fields is not enough."""
    pieces = [tokenizer.encode(texts[f]) for f in fields]
    owner = torch.tensor([i for i, piece in enumerate(pieces) for _ in piece], dtype=torch.long)
    flat = [t for piece in pieces for t in piece]
    budget = len(flat) - (_example_length(tokenizer, texts) - max_length)
    for _ in range(max_rounds):
        if budget >= 1:
            kept, positions = truncate(flat, budget, imp, return_positions=True)
            keep_owner = owner[positions].tolist()
        else:
            kept, keep_owner = [], []
        cut = dict(texts)
        for i, f in enumerate(fields):
            cut[f] = tokenizer.decode([t for t, o in zip(kept, keep_owner, strict=True) if o == i])
        length = _example_length(tokenizer, cut)
        if length <= max_length:
            return cut, length
        if budget < 1:
            return None
        budget -= length - max_length
    return None
