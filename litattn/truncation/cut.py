"""The cut: remove the lowest-scoring unprotected tokens until exactly the budget is left, order kept."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from litattn.truncation.importance import Importance
from litattn.truncation.options import Variant, Visible
from litattn.truncation.scores import check_lengths, describe, token_scores


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
            raise TypeError(f"ids must be integer token ids, 1-D or a (B, T) batch, got {describe(ids)}")
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
        return check_lengths(lengths, B, T).tolist()
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
                f"scores must give one number per position, shape {tuple(idx.shape)}; got {describe(table)}"
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
        raise TypeError(f"protect must be a Protect or booleans of shape {tuple(idx.shape)}, got {describe(mask)}")
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
