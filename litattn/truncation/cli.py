"""`litattn truncate build | apply`: importance dictionaries from a checkpoint, and cutting a JSONL file."""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from litattn.args import check_choice, check_range, start_work
from litattn.checkpoint import load_config, load_with_tokenizer, weights_dtype
from litattn.data import DataModule, StdlibCorpus
from litattn.data.instructions import format_prompt, parse_example, read_records
from litattn.inference import inference_fabric
from litattn.precision import check_precision
from litattn.tokenizer import Tokenizer
from litattn.truncation.cut import truncate
from litattn.truncation.importance import Batches, Importance, batch_lengths, build_frequency, build_importance
from litattn.truncation.options import FIELDS, Method, Variant, Visible
from litattn.utils import atomic_write_text


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
    precision: str = "auto",
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
        precision: auto (bf16-true where the device has native bf16, else 32-true: litattn/precision.py), or a
            Fabric precision: 32-true, bf16-mixed, bf16-true, ...

    Returns:
        The dictionary written to `out`.
    """
    checkpoint_dir, out = Path(checkpoint_dir), Path(out)
    check_choice("method", method, Method)
    check_choice("variant", variant, Variant)
    check_choice("visible", visible, Visible)
    check_choice("split", split, Literal["train", "val"])
    check_range("seq_len", seq_len, ge=1, null="block_size")
    check_range("micro_batch_size", micro_batch_size, ge=1)
    check_range("max_batches", max_batches, ge=1, null="the whole split")
    check_range("checkpoint_every", checkpoint_every, ge=1)
    check_precision(precision)
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

    fabric, choice = inference_fabric(precision)
    model, tokenizer, config = load_with_tokenizer(
        checkpoint_dir, fabric.device, weights_dtype(choice.precision), attention
    )
    model.eval()
    seq_len = seq_len or config.block_size
    data.setup(tokenizer, config.vocab_size, seq_len, Path(cache_dir))
    dataset = data.train_dataset() if split == "train" else data.val_dataset()
    info.update(
        seq_len=seq_len, tokenizer=tokenizer.fingerprint(), attention=config.attention, precision=choice.precision
    )
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
        f"Saved {out}: {len(imp):,} token ids from {int(imp.counts.sum()):,} tokens in {imp.info['batches']:,} batches "
        f"(precision {choice.precision}, {choice.reason})"
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
