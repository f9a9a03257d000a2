"""Validation loss as the training loop computes it, and the batch a model's attention reads: shared by the loop
(litattn/loop.py) and `litattn evaluate`, which imports it without the loop."""

from __future__ import annotations

import warnings

import torch

from litattn.training import collate


@torch.no_grad()
def validation_loss(fabric, model, val_data, micro_batch_size: int, max_iters: int | None) -> float:
    """Mean loss per target token (labels != -100) over the validation sequences, split over ranks and
    reduced: the same number `litattn evaluate` reports. For pretraining windows every position has a
    target, so this is also the mean of window means.

    max_iters limits the work to max_iters micro-batches per rank, taken evenly spaced over the whole split
    (its first windows are one file, or one module's questions: no sample of the rest); None: every sequence.
    """
    model.eval()
    n_all = len(val_data)
    n = n_all if max_iters is None else min(n_all, max_iters * micro_batch_size * fabric.world_size)
    chosen = torch.linspace(0, n_all - 1, n).round().long() if n < n_all else torch.arange(n_all)
    total = torch.zeros(2, device=fabric.device, dtype=torch.float64)  # (sum of token losses, target tokens)
    mine = chosen[fabric.global_rank :: fabric.world_size]
    for chunk in mine.split(micro_batch_size):
        batch = collate(val_data, chunk, trim=may_trim(model))
        batch = {k: v.to(fabric.device) for k, v in attention_batch(model, batch).items()}
        idx, labels = batch.pop("input_ids"), batch.pop("labels")
        logits = model(idx, **batch).float()
        loss_sum = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
        )
        total += torch.stack([loss_sum.double(), (labels != -100).sum().double()])
    total = fabric.all_reduce(total, reduce_op="sum")
    model.train()
    if total[1] == 0:
        raise ValueError("The validation data has no target token (every label is -100); check the data module")
    return (total[0] / total[1]).item()


def attention_batch(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """input_ids, labels and the metadata the model's attention reads. Other keys (e.g. the `segment_ids` of
    injected Disrupt tokens, under causal attention for a baseline on the same data) are dropped, with a
    warning once: the same data runs with every mechanism."""
    reads = unwrap(model).mechanism.metadata_keys
    dropped = sorted(set(batch) - {"input_ids", "labels", *reads})
    if dropped:
        name = unwrap(model).config.attention["name"]
        warnings.warn(f"the batch's {dropped} are not read by attention {name!r}; ignored", stacklevel=2)
    return {k: v for k, v in batch.items() if k not in dropped}


def unwrap(model):
    """The module inside Fabric's (and DDP's) wrapper: the GPT itself; a bare model is returned as it is."""
    return getattr(model, "module", model)


def may_trim(model) -> bool:
    """Whether `collate` may drop trailing padding columns: the mechanism says so (causal attention)."""
    return getattr(unwrap(model), "trailing_positions_independent", True)
