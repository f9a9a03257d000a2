"""`litattn evaluate perplexity`: loss and perplexity of a checkpoint on held-out text, at one or more lengths.

    litattn evaluate perplexity --checkpoint_dir out/pretrain/final [--lengths [256,512]]

The number is the training loop's own validation (`validation_loss` of litattn/loop.py: the mean loss
per target token), computed by that same function, so evaluating a run's final
checkpoint on its data reproduces the final `val_loss` it logged. Each length reads non-overlapping windows
of that many tokens from the same validation token file, so lengths differ only in how much context each
prediction gets (and in the count of windows that fit); `max_batches` takes windows evenly spaced over the file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from litattn.data import DataModule, StdlibCorpus, TokenWindows
from litattn.utils import atomic_write_text


def perplexity(
    checkpoint_dir: Path,
    data: DataModule | None = None,
    lengths: list[int] | None = None,
    micro_batch_size: int = 8,
    max_batches: int | None = None,
    attention: dict | None = None,
    out_file: Path | None = None,
    cache_dir: Path = Path("cache"),
    precision: str = "32-true",
    context: int | None = None,
) -> dict[str, Any]:
    """Loss and perplexity of a checkpoint on a data module's validation split.

    Args:
        checkpoint_dir: A checkpoint directory (model.safetensors, model_config.yaml, tokenizer).
        data: Data module whose validation split is read; default: the Python standard library (StdlibCorpus).
            It is tokenized with the checkpoint's tokenizer (the token cache is reused when it matches).
        lengths: Context lengths (tokens per window) to evaluate at; default: the model's block_size. A length
            beyond what the attention mechanism handles is reported as an error row.
        micro_batch_size: Windows per forward pass.
        max_batches: Evaluate at most this many micro-batches per length (None: the whole validation split).
        attention: Evaluate with another attention spec than the checkpoint's, e.g. `{name: causal, kernel: sdpa}`;
            keys without a `name` update the saved spec's options.
        out_file: Where to write the results as JSON; default: `<checkpoint_dir>/eval/perplexity.json`.
        cache_dir: Where tokenized data is cached.
        precision: Fabric precision: 32-true, bf16-mixed, bf16-true, ... (the run's, to reproduce its val_loss).
        context: Accept lengths up to this many tokens, beyond what the attention handles at block_size (RoPE
            positions extrapolate: the baseline for context extension); default: what the attention handles.

    Returns:
        The results written to out_file: the checkpoint, attention spec, data and one row per length with
        `windows`, `tokens`, `loss` and `perplexity` (or `error`).
    """
    from lightning_fabric import Fabric

    from litattn.args import check_range
    from litattn.checkpoint import load_with_tokenizer
    from litattn.loop import validation_loss

    checkpoint_dir = Path(checkpoint_dir)
    check_range("micro_batch_size", micro_batch_size, ge=1)
    check_range("max_batches", max_batches, ge=1, null="the whole validation split")
    check_range("context", context, ge=1, null="what the attention handles")
    if lengths is not None:
        if not lengths:
            raise ValueError("lengths must be a non-empty list of token counts >= 1 (or null for block_size), got []")
        for n in lengths:
            check_range(f"lengths (each of {list(lengths)})", n, ge=1)

    fabric = Fabric(accelerator="auto", devices=1, precision=precision)
    fabric.launch()
    model, tokenizer, config = load_with_tokenizer(
        checkpoint_dir, fabric.device, _weights_dtype(precision), attention, context
    )
    max_len = model.max_seq_length
    lengths = [int(n) for n in lengths] if lengths else [config.block_size]

    data = StdlibCorpus() if data is None else data
    shortest = min((n for n in lengths if n <= max_len), default=1)
    data.setup(tokenizer, config.vocab_size, shortest, Path(cache_dir))  # the token files do not depend on seq_len
    val = data.val_dataset()
    model = fabric.setup(model)

    rows = []
    for n in lengths:
        row: dict[str, Any] = {"length": n}
        if n > max_len:
            row["error"] = too_long(n, max_len, config)
            rows.append(row)
            continue
        try:  # the data module's own dataset at the length it was set up for; windows of its token file otherwise
            windows = val if n == shortest else TokenWindows(val.path, n, val.dtype)
        except ValueError:
            row["error"] = f"the validation split has {val.n_tokens} tokens, fewer than one window of {n + 1}"
            rows.append(row)
            continue
        except AttributeError:
            row["error"] = f"{type(val).__name__} is not a token file that can be cut into other window lengths"
            rows.append(row)
            continue
        count = len(windows) if max_batches is None else min(len(windows), max_batches * micro_batch_size)
        with _progress(count, f"length {n}") as bar:
            loss = validation_loss(fabric, model, _Ticking(windows, bar), micro_batch_size, max_batches)
        row.update(windows=count, tokens=count * n, loss=loss, perplexity=_exp(loss))
        rows.append(row)

    result = {
        "checkpoint_dir": str(checkpoint_dir),
        "attention": config.attention,
        "data": data.describe(),
        "precision": precision,
        "micro_batch_size": micro_batch_size,
        "max_batches": max_batches,
        "results": rows,
    }
    print(format_table(rows))
    out_file = checkpoint_dir / "eval" / "perplexity.json" if out_file is None else Path(out_file)
    atomic_write_text(out_file, json.dumps(result, indent=2) + "\n")
    print(f"Saved {out_file}")
    return result


def too_long(length: int, max_len: int, config) -> str:
    """The error row of a length beyond what the model accepts, naming the way past it."""
    return (
        f"{length} tokens exceed what the model handles ({max_len}: block_size {config.block_size}, "
        f"attention {config.attention['name']!r}); pass --context {length} to run it with RoPE extrapolation"
    )


def format_table(rows: list[dict[str, Any]]) -> str:
    """The results as an aligned text table, one line per length."""
    lines = [f"{'length':>8} {'windows':>8} {'tokens':>12} {'loss':>8} {'perplexity':>11}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['length']:>8} error: {r['error']}")
        else:
            lines.append(
                f"{r['length']:>8} {r['windows']:>8,} {r['tokens']:>12,} {r['loss']:>8.4f} {r['perplexity']:>11.3f}"
            )
    return "\n".join(lines)


def _weights_dtype(precision: str) -> torch.dtype:
    """The parameter dtype a precision computes in ("-true": the weights themselves; mixed: float32 masters)."""
    return {"64-true": torch.float64, "bf16-true": torch.bfloat16, "16-true": torch.float16}.get(
        str(precision), torch.float32
    )


def _exp(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


class _Ticking(torch.utils.data.Dataset):
    """A dataset view that advances a progress bar per window read: progress without touching the loop."""

    def __init__(self, dataset, bar) -> None:
        self.dataset, self.bar = dataset, bar

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        self.bar.update(1)
        return self.dataset[i]


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="window", delay=2.0, leave=False)  # shown only if it takes a while
