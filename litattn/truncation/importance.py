"""Importance dictionaries: token id -> mean score over a corpus (attention, or the idf control), resumable builds."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import default_collate

from litattn.args import check_choice, check_range
from litattn.truncation.options import FORMAT, FORMAT_VERSION, MAX_COUNT, MAX_TOKEN_ID, Method, Variant, Visible
from litattn.truncation.scores import check_lengths, describe, token_scores
from litattn.utils import atomic_write_text, progress_bar


class Importance:
    """Token id -> importance, kept as per-id statistics of a corpus, so a build can stop, resume and be saved.

    method "attention": score = sums[id] / counts[id], the mean score of the id's occurrences.
    method "idf":       score = log(documents / counts[id]), counts[id] the documents holding the id: rare ids
                        score high, so truncation drops frequent ones first.
    An id never seen scores `default`; None: the mean score of the ids seen (an unknown token is neither kept nor
    dropped first). `info` records how the dictionary was built (and what a resumed build must match).
    """

    def __init__(self, method: Method = "attention", *, default: float | None = None, info: dict | None = None):
        check_choice("method", method, Method)
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
        n = len(self.dataset)
        for start in range(0, n, self.batch_size):
            yield default_collate([self.dataset[i] for i in range(start, min(n, start + self.batch_size))])


def batch_lengths(batch: torch.Tensor | Mapping[str, Any]) -> torch.Tensor:
    """(B,) the real tokens of each row of a batch: its `lengths`; else, with `labels`, up to the last target
    (what follows it is padding: InstructionDataset); else the full width."""
    idx = batch if isinstance(batch, torch.Tensor) else batch["input_ids"]
    B, T = idx.shape
    if isinstance(batch, Mapping) and "lengths" in batch:
        return check_lengths(batch["lengths"], B, T)
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
        raise TypeError(f"a batch must be a (B, T) tensor of ids or a dict with 'input_ids', got {describe(batch)}")
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
    with progress_bar(total, "importance", unit="batch") as bar:
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
