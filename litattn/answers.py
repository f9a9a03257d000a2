"""`litattn evaluate answers`: how well a checkpoint answers held-out prompts, by loss and by what it writes.

    litattn evaluate answers --checkpoint_dir out/finetune/final --data PyDocQA [--items 64] [--rethink_every 4]

Items are a data module's validation items with a prompt and an answer: labels -100 on the prompt, targets on
the answer (instruction data: AlpacaJSON, PyDocQA; PrefixTask). For each item:

    answer loss   the mean next-token loss of the answer's tokens given the prompt (teacher forcing; the
                  validation loss of the same items when nothing else is set)
    generation    the model's greedy continuation of the prompt (KV cache), at most as many tokens as the
                  reference answer, stopping at the end-of-text token; scored against the reference:
                  exact match (every token), first-line match (the first non-empty line of each, stripped,
                  equal) and token F1 (the overlap of their lower-cased whitespace-separated words, as SQuAD
                  scores answers: 2 P R / (P + R) over the bags of words; 1 when both are empty)

An item's attention metadata (e.g. `prefix_len`, the prompt as hybrid's thought prefix) goes with it. With
`rethink_every` k (or the attention's own `rethink_every`), generation re-reads the prompt and its output as
one prefix after every k new tokens (`litattn.generate`), and the answer loss is computed the same way: answer
token j is predicted from a forward whose prefix is the prompt plus the first k * floor(j / k) answer tokens.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from litattn.args import check_range, start_work
from litattn.attention.hybrid import PREFIX_LEN
from litattn.checkpoint import load_with_tokenizer
from litattn.data.base import DataModule
from litattn.data.instructions import IGNORE_INDEX
from litattn.generate import check_rethink, generate
from litattn.utils import atomic_write_text, progress_bar


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1 over lower-cased whitespace-separated words: 2 P R / (P + R) of the bags of words."""
    pred, ref = prediction.lower().split(), reference.lower().split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def first_line(text: str) -> str:
    """The first line with visible text, stripped ("" if none)."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def score_answer(written: list[int], reference: list[int], tokenizer) -> dict[str, Any]:
    """Exact match (the same tokens), first-line match and token F1 of a written answer against the reference;
    the texts are decoded without end-of-text tokens."""
    text = tokenizer.decode([t for t in written if t != tokenizer.eos_id])
    wanted = tokenizer.decode([t for t in reference if t != tokenizer.eos_id])
    return {
        "exact_match": float(written == reference),
        "first_line_match": float(first_line(text) == first_line(wanted)),
        "token_f1": token_f1(text, wanted),
        "written": text,
        "reference": wanted,
    }


def split_item(item: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(prompt ids, answer ids, metadata) of an item whose labels are -100 on the prompt and targets after it."""
    labels = item["labels"]
    targets = (labels != IGNORE_INDEX).nonzero().flatten()
    if not len(targets):
        raise ValueError("an item has no target: answers needs items with a prompt and an answer")
    start, end = int(targets[0]), int(targets[-1]) + 1
    if start == 0 or not bool((labels[start:end] != IGNORE_INDEX).all()):
        raise ValueError(
            "answers needs items whose labels are -100 on a prompt and then targets on one answer (instruction "
            "data, PrefixTask); these items' targets start at position 0 or have gaps"
        )
    metadata = {k: v for k, v in item.items() if k not in ("input_ids", "labels")}
    return item["input_ids"][: start + 1], labels[start:end], metadata


@torch.no_grad()
def answer_losses(model, prompt: torch.Tensor, answer: torch.Tensor, prefix_len: int | None, every: int | None):
    """The loss of each answer token given the prompt (and the answer before it); with `every` k, token j is
    predicted with the prompt and the first k * floor(j / k) answer tokens as the prefix. -> (len(answer),)"""
    ids = torch.cat([prompt, answer[:-1]])
    n, p = len(answer), len(prompt)
    spans = [(0, n)] if every is None else [(s, min(s + every, n)) for s in range(0, n, every)]
    losses = []
    for first, last in spans:  # answer tokens first..last-1, predicted at input positions p-1+first ..
        extent = p + first if first > 0 else prefix_len  # a rethink's prefix: the prompt and the answer so far
        metadata = {}
        if extent is not None and PREFIX_LEN in model.mechanism.metadata_keys:
            metadata[PREFIX_LEN] = torch.tensor([extent], device=ids.device)
        logits = model(ids[None, : p - 1 + last], **metadata)[0, p - 1 + first : p - 1 + last]
        losses.append(F.cross_entropy(logits.float(), answer[first:last], reduction="none"))
    return torch.cat(losses)


def answers(
    checkpoint_dir: Path,
    data: DataModule,
    items: int | None = 64,
    rethink_every: int | None = None,
    attention: dict | None = None,
    out_file: Path | None = None,
    cache_dir: Path = Path("cache"),
    context: int | None = None,
    seq_len: int | None = None,
) -> dict[str, Any]:
    """Answer loss and greedy-answer scores (exact, first line, token F1) of a checkpoint on held-out items.

    Args:
        checkpoint_dir: A checkpoint directory (model.safetensors, model_config.yaml, tokenizer).
        data: Data module whose validation items have a prompt and an answer (PyDocQA, AlpacaJSON, PrefixTask).
        items: Validation items scored, spread evenly over the split (None: all).
        rethink_every: Re-read prompt + output as the prefix every this many new tokens, in generation and in the
            answer loss (hybrid attention); default: the attention's `rethink_every` option (none).
        attention: Evaluate with another attention spec than the checkpoint's; keys without a `name` update the
            saved spec's options (e.g. `{rethink_every: 4}`).
        out_file: Where to write the results as JSON; default: `<checkpoint_dir>/eval/answers.json`.
        cache_dir: Where tokenized data is cached.
        context: Accept items up to this many tokens, beyond what the attention handles at block_size.
        seq_len: The length the data module cuts items to (a truncation budget, as in training); default: the
            model's context.

    Returns:
        The results written to out_file: the settings and one row (`length`: the items' length) with `items`,
        `answer_loss` (mean over answer tokens), `exact_match`, `first_line_match`, `token_f1` (means over items),
        and each item's figures under `per_item`.
    """
    checkpoint_dir = Path(checkpoint_dir)
    check_range("items", items, ge=1, null="all")
    check_range("rethink_every", rethink_every, ge=1, null="the attention's option")
    check_range("context", context, ge=1, null="what the attention handles")
    check_range("seq_len", seq_len, ge=2, null="the model's context")
    start_work()
    model, tokenizer, config = load_with_tokenizer(checkpoint_dir, attention=attention, context=context)
    model.eval()
    every = check_rethink(model, rethink_every, streaming=False)
    if seq_len is not None and seq_len > model.max_seq_length:
        raise ValueError(f"seq_len {seq_len} exceeds the model's context of {model.max_seq_length}; lower it")
    data.setup(tokenizer, config.vocab_size, seq_len or model.max_seq_length, Path(cache_dir))
    val = data.val_dataset()
    if len(val) == 0:
        raise ValueError("The validation split has no items; add data")
    count = len(val) if items is None else min(items, len(val))
    chosen = torch.linspace(0, len(val) - 1, count).round().long().tolist()
    device = model.lm_head.weight.device
    per_item, loss_sum, tokens = [], 0.0, 0
    with progress_bar(count, "answers") as bar:
        for i in chosen:
            prompt, answer, metadata = split_item(val[i])
            prompt, answer = prompt.to(device), answer.to(device)
            prefix = int(metadata[PREFIX_LEN]) if PREFIX_LEN in metadata else None
            losses = answer_losses(model, prompt, answer, prefix, every)
            with torch.no_grad():
                out = generate(
                    model, prompt, len(answer), temperature=0, eos_id=tokenizer.eos_id, prefix_len=prefix,
                    rethink_every=every,
                )  # fmt: skip
            scores = score_answer(out[len(prompt) :].tolist(), answer.tolist(), tokenizer)
            per_item.append({"index": i, "answer_loss": float(losses.mean()), **scores})
            loss_sum += float(losses.sum())
            tokens += len(answer)
            bar.update(1)
    mean = lambda key: sum(r[key] for r in per_item) / len(per_item)  # noqa: E731
    row = {
        "length": len(val[chosen[0]]["input_ids"]),
        "items": len(per_item),
        "answer_tokens": tokens,
        "answer_loss": loss_sum / tokens,
        "exact_match": mean("exact_match"),
        "first_line_match": mean("first_line_match"),
        "token_f1": mean("token_f1"),
    }
    result = {
        "checkpoint_dir": str(checkpoint_dir),
        "attention": config.attention,
        "data": data.describe(),
        "rethink_every": every,
        "results": [row],
        "per_item": per_item,
    }
    ppl = math.exp(min(row["answer_loss"], 50))
    print(
        f"{row['items']} items: answer loss {row['answer_loss']:.4f} (ppl {ppl:.2f}), exact match "
        f"{row['exact_match']:.3f}, first line {row['first_line_match']:.3f}, token F1 {row['token_f1']:.3f}"
    )
    out_file = checkpoint_dir / "eval" / "answers.json" if out_file is None else Path(out_file)
    atomic_write_text(out_file, json.dumps(result, indent=2) + "\n")
    print(f"Saved {out_file}")
    return result
