"""`litattn evaluate perplexity`: loss and perplexity of a checkpoint on held-out text, at one or more lengths
(and `litattn evaluate streaming`, `streaming_perplexity` below: one long text with a bounded KV cache).

    litattn evaluate perplexity --checkpoint_dir out/pretrain/final [--lengths [256,512]]

The number is the training loop's own validation (`validation_loss` of litattn/validation.py: the mean loss
per target token), computed by that same function, so evaluating a run's final
checkpoint on its data reproduces the final `val_loss` it logged. Each length reads non-overlapping windows
of that many tokens from the same validation token file, so lengths differ only in how much context each
prediction gets (and in the count of windows that fit); `max_batches` takes windows evenly spaced over the file.
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from litattn.args import check_range, start_work
from litattn.checkpoint import load_with_tokenizer, weights_dtype
from litattn.data import DataModule, StdlibCorpus, TokenWindows
from litattn.inference import inference_fabric
from litattn.precision import PrecisionChoice, check_precision
from litattn.streaming import SinkWindowCache, check_streamable
from litattn.utils import atomic_write_text, progress_bar
from litattn.validation import validation_loss


def perplexity(
    checkpoint_dir: Path,
    data: DataModule | None = None,
    lengths: list[int] | None = None,
    micro_batch_size: int = 8,
    max_batches: int | None = None,
    attention: dict | None = None,
    out_file: Path | None = None,
    cache_dir: Path = Path("cache"),
    precision: str = "auto",
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
        out_file: Where to write the results as JSON; default: a new file each run,
            `<checkpoint_dir>/eval/perplexity-<attention>-<UTC time>.json` (a previous result is never overwritten).
        cache_dir: Where tokenized data is cached.
        precision: auto (bf16-true where the device has native bf16, else 32-true: litattn/precision.py), or a
            Fabric precision: 32-true, bf16-mixed, bf16-true, ... (the run's, to reproduce its val_loss exactly).
        context: Accept lengths up to this many tokens, beyond what the attention handles at block_size (RoPE
            positions extrapolate: the baseline for context extension); default: what the attention handles.

    Returns:
        The results written to out_file: the checkpoint, attention spec, data and one row per length with
        `windows`, `tokens`, `loss` and `perplexity` (or `error`).
    """

    checkpoint_dir = Path(checkpoint_dir)
    check_range("micro_batch_size", micro_batch_size, ge=1)
    check_range("max_batches", max_batches, ge=1, null="the whole validation split")
    check_range("context", context, ge=1, null="what the attention handles")
    if lengths is not None:
        if not lengths:
            raise ValueError("lengths must be a non-empty list of token counts >= 1 (or null for block_size), got []")
        for n in lengths:
            check_range(f"lengths (each of {list(lengths)})", n, ge=1)
    check_precision(precision)
    start_work()

    fabric, choice = inference_fabric(precision)
    model, tokenizer, config = load_with_tokenizer(
        checkpoint_dir, fabric.device, weights_dtype(choice.precision), attention, context
    )
    max_len = model.max_seq_length
    lengths = [int(n) for n in lengths] if lengths else [config.block_size]
    if all(n > max_len for n in lengths):  # refused before the data is read
        require_some_run([{"length": n, "error": too_long(n, max_len, config)} for n in lengths])

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
        with progress_bar(count, f"length {n}") as bar:
            loss = validation_loss(fabric, model, _Ticking(windows, bar), micro_batch_size, max_batches)
        row.update(windows=count, tokens=count * n, loss=loss, perplexity=_exp(loss))
        rows.append(row)

    result = {
        **_describe_run(checkpoint_dir, config, data, choice),
        "micro_batch_size": micro_batch_size,
        "max_batches": max_batches,
        "results": rows,
    }
    print(choice.describe())
    print(format_table(rows))
    require_some_run(rows)
    out_file = new_result_file(checkpoint_dir / "eval", config.attention) if out_file is None else Path(out_file)
    atomic_write_text(out_file, json.dumps(result, indent=2) + "\n")
    print(f"Saved {out_file}")
    return result


def _describe_run(checkpoint_dir: Path, config, data: DataModule, precision: PrecisionChoice) -> dict[str, Any]:
    """What every evaluation result records of its inputs."""
    return {
        "checkpoint_dir": str(checkpoint_dir),
        "attention": config.attention,
        "data": data.describe(),
        "precision": precision.precision,
        "precision_reason": precision.reason,
    }


def require_some_run(rows: list[dict[str, Any]]) -> None:
    """ValueError (nothing is written) when no requested length could run; a note on stderr when some could not."""
    failed = [r for r in rows if "error" in r]
    if failed and len(failed) == len(rows):
        more = f" (and {len(failed) - 1} more length(s))" if len(failed) > 1 else ""
        raise ValueError(f"no requested length could run, nothing written: length {failed[0]['length']}: "
                         f"{failed[0]['error']}{more}")  # fmt: skip
    if failed:
        lengths = ", ".join(str(r["length"]) for r in failed)
        print(f"note: length(s) {lengths} could not run (see their rows); the others are saved", file=sys.stderr)


def new_result_file(folder: Path, attention: dict[str, Any]) -> Path:
    """`folder/perplexity-<attention name>-<UTC time>.json`, a name no earlier result has."""
    stem = f"perplexity-{attention['name']}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    path, n = folder / f"{stem}.json", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}.json"
    return path


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


# ---------------------------------------------------------------------------------- streaming
STREAMING_METHODS = ("window", "sink_window", "recompute")
"""window: sink + window cache with no sinks; sink_window: with `sink_size` sinks; recompute: a fresh forward over
the last `stream_window` tokens for each prediction (exact for that context, and slow)."""


def streaming_perplexity(
    checkpoint_dir: Path,
    data: DataModule | None = None,
    length: int | None = None,
    stream_window: int | None = None,
    sink_size: int = 4,
    stream_chunk: int = 1,
    stride: int = 1,
    methods: list[str] | None = None,
    attention: dict | None = None,
    out_file: Path | None = None,
    cache_dir: Path = Path("cache"),
    precision: str = "auto",
    context: int | None = None,
    first_token: str | None = None,
) -> dict[str, Any]:
    """Perplexity of one long text with a bounded context (StreamingLLM): window, sinks + window, recomputation.

        litattn evaluate streaming --checkpoint_dir out/pretrain/final [--length 4096] [--stream_window 60]

    A table with a row per method: loss, perplexity, seconds and peak memory. The text is the first `length` + 1
    tokens of the data module's validation split; every method predicts each of its `length` tokens from what came
    before, through its own view of the past:

        window       the latest `stream_window` tokens in a streaming cache (sink_size 0), positions re-assigned
        sink_window  the first `sink_size` tokens (attention sinks) + the latest `stream_window` (litattn.streaming)
        recompute    a fresh forward over the latest `stream_window` tokens, at positions 0.. (exact, slow)

    Args:
        checkpoint_dir: A checkpoint directory (model.safetensors, model_config.yaml, tokenizer); a RoPE model.
        data: Data module whose validation split is read; default: the Python standard library (StdlibCorpus).
        length: Tokens to predict; default: 16 x block_size, or what the validation split holds (with a note).
        stream_window: W, the recent tokens each method keeps; default: block_size - sink_size (the sink row then
            has a cache of block_size slots). W counts the token being processed, StreamingLLM's `recent_size`
            does not: their recent_size R is stream_window R + 1 here.
        sink_size: S, the attention-sink tokens of the sink_window row.
        stream_chunk: Tokens per forward of the streaming rows once the cache is full (1: token by token, exact
            StreamingLLM; c: each chunk evicts c tokens, its i-th token sees W - c + i + 1 recent ones).
        stride: Predictions per forward of the recompute row (1: a forward per token, exact; s: each forward over
            the latest W tokens scores its last s predictions, which then see W - s + 1 to W tokens).
        methods: Rows to run, of window, sink_window, recompute; default: all three.
        attention: Evaluate with another attention spec than the checkpoint's, e.g. `{name: ssa}`.
        out_file: Where to write the results as JSON; default: `<checkpoint_dir>/eval/streaming.json`.
        cache_dir: Where tokenized data is cached.
        precision: auto (bf16-true where the device has native bf16, else 32-true), or a Fabric precision:
            32-true, bf16-mixed, bf16-true, ...
        context: Accept sink_size + stream_window up to this many tokens, beyond what the attention handles at
            block_size (RoPE positions extrapolate).
        first_token: A special token put before the text, e.g. `<|disrupt|>` for a model pretrained with one at
            the start of every window (`InjectTokens` with `disrupt: {every: null, window_start: true}`: the
            dedicated sink token of StreamingLLM's pretraining experiment); the text then holds `length` tokens
            and the first prediction is made from this token alone.

    Returns:
        The results written to out_file: the checkpoint, attention spec, data, settings and one row per method
        with `sink_size`, `window`, `tokens`, `loss`, `perplexity`, `seconds`, `peak_memory_bytes` (CUDA:
        torch.cuda.max_memory_allocated above what was allocated before the row; CPU: growth of the process's
        peak resident set over the row, Linux VmHWM; None where it cannot be measured) and, for the streaming
        rows, `cache_bytes` (the KV cache: constant in the length).
    """

    checkpoint_dir = Path(checkpoint_dir)
    check_range("length", length, ge=1, null="16 x block_size")
    check_range("stream_window", stream_window, ge=1, null="block_size - sink_size")
    check_range("sink_size", sink_size, ge=0)
    check_range("context", context, ge=1, null="what the attention handles")
    if stream_window is not None:
        check_range("stream_chunk", stream_chunk, ge=1, le=stream_window, bound_name="stream_window")
        check_range("stride", stride, ge=1, le=stream_window, bound_name="stream_window")
    else:
        check_range("stream_chunk", stream_chunk, ge=1)
        check_range("stride", stride, ge=1)
    methods = list(STREAMING_METHODS) if methods is None else list(methods)
    unknown = [m for m in methods if m not in STREAMING_METHODS]
    if not methods or unknown or len(set(methods)) < len(methods):
        raise ValueError(f"methods must be distinct names of {list(STREAMING_METHODS)}, got {methods}")
    check_precision(precision)
    start_work()

    fabric, choice = inference_fabric(precision)
    model, tokenizer, config = load_with_tokenizer(
        checkpoint_dir, fabric.device, weights_dtype(choice.precision), attention, context
    )
    model.eval()
    if stream_window is None:
        stream_window = config.block_size - sink_size
        check_range(f"stream_window (default: block_size {config.block_size} - sink_size)", stream_window, ge=1)
        check_range("stream_chunk", stream_chunk, ge=1, le=stream_window, bound_name="stream_window")
        check_range("stride", stride, ge=1, le=stream_window, bound_name="stream_window")
    check_streamable(model, sink_size + stream_window)
    first = tokenizer.special_id(first_token) if first_token is not None else None

    data = StdlibCorpus() if data is None else data
    data.setup(tokenizer, config.vocab_size, 1, Path(cache_dir))
    val = data.val_dataset()
    try:
        tokens = np.memmap(val.path, dtype=val.dtype, mode="r")
    except AttributeError:
        raise ValueError(f"{type(val).__name__} is not a token file that a long text can be read from") from None
    available = len(tokens) - 1
    if length is None:
        length = 16 * config.block_size
        if length > available:
            print(
                f"litattn: note: length lowered from {length} (16 x block_size) to {available}, the tokens the "
                "validation split holds",
                file=sys.stderr,
            )
            length = available
    if length > available or length < 1:
        raise ValueError(
            f"length {length} needs {length + 1} tokens but the validation split holds {len(tokens)}; lower --length"
        )
    text = torch.from_numpy(tokens[: length + 1].astype(np.int64))
    if first_token is not None:
        text = torch.cat([torch.tensor([first]), text[:length]])
    text = text.to(fabric.device)[None]  # (1, length + 1)

    settings = {
        "window": (0, stream_window),
        "sink_window": (sink_size, stream_window),
        "recompute": (0, stream_window),
    }
    with torch.no_grad(), fabric.autocast():  # warm up, so that the first row's peak memory holds no one-off setup
        model(text[:, : min(8, length)])
    rows = []
    for method in methods:
        sinks, window = settings[method]
        row: dict[str, Any] = {"method": method, "sink_size": sinks, "window": window}
        with progress_bar(length, method, unit="token") as bar, _PeakMemory(fabric.device) as memory, fabric.autocast():
            start = time.perf_counter()
            if method == "recompute":
                loss_sum = _recompute_loss_sum(model, text, window, stride, bar.update)
            else:
                loss_sum, cache_bytes = _streaming_loss_sum(model, text, sinks, window, stream_chunk, bar.update)
                row["cache_bytes"] = cache_bytes
            seconds = time.perf_counter() - start
        loss = loss_sum / length
        row.update(
            tokens=length,
            loss=loss,
            perplexity=_exp(loss),
            seconds=seconds,
            peak_memory_bytes=memory.peak,
        )
        rows.append(row)

    result = {
        **_describe_run(checkpoint_dir, config, data, choice),
        "length": length,
        "block_size": config.block_size,
        "stream_window": stream_window,
        "sink_size": sink_size,
        "stream_chunk": stream_chunk,
        "stride": stride,
        "first_token": first_token,
        "memory": _PeakMemory.describe(fabric.device),
        "results": rows,
    }
    print(choice.describe())
    print(format_streaming_table(rows))
    out_file = checkpoint_dir / "eval" / "streaming.json" if out_file is None else Path(out_file)
    atomic_write_text(out_file, json.dumps(result, indent=2) + "\n")
    print(f"Saved {out_file}")
    return result


@torch.no_grad()
def _streaming_loss_sum(model, text: torch.Tensor, sink_size: int, window: int, chunk: int, advance) -> tuple:
    """(sum of the next-token losses over text (1, N + 1) fed through a sink + window cache, the cache's bytes)."""

    total = torch.zeros((), dtype=torch.float64, device=text.device)
    done = 0
    with SinkWindowCache(model, sink_size, window) as cache:
        for logits in cache.feed(text[:, :-1], chunk):  # (1, n, vocab) per piece
            n = logits.shape[1]
            targets = text[0, done + 1 : done + n + 1]
            total += F.cross_entropy(logits[0].float(), targets, reduction="sum").double()
            done += n
            advance(n)
        cache_bytes = cache.cache_bytes()
    return total.item(), cache_bytes


@torch.no_grad()
def _recompute_loss_sum(model, text: torch.Tensor, window: int, stride: int, advance) -> float:
    """Sum of the next-token losses over text (1, N + 1), each forward a fresh one over the latest `window`
    tokens (positions 0..) scoring its last `stride` predictions."""
    N = text.shape[1] - 1
    total = torch.zeros((), dtype=torch.float64, device=text.device)
    done = 0
    while done < N:
        end = min(done + stride, N)
        lo = max(0, end - window)
        hidden = model.hidden_states(text[:, lo:end])[:, done - lo :]  # the predictions done..end-1
        logits = model.lm_head(hidden)[0].float()
        total += F.cross_entropy(logits, text[0, done + 1 : end + 1], reduction="sum").double()
        advance(end - done)
        done = end
    return total.item()


def format_streaming_table(rows: list[dict[str, Any]]) -> str:
    """The streaming results as an aligned text table, one line per method."""
    lines = [
        f"{'method':<12} {'sinks':>5} {'window':>7} {'tokens':>9} {'loss':>8} {'perplexity':>11} {'seconds':>8} "
        f"{'peak MiB':>9}"
    ]
    for r in rows:
        peak = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:.1f}"
        lines.append(
            f"{r['method']:<12} {r['sink_size']:>5} {r['window']:>7} {r['tokens']:>9,} {r['loss']:>8.4f} "
            f"{r['perplexity']:>11.3f} {r['seconds']:>8.2f} {peak:>9}"
        )
    return "\n".join(lines)


class _PeakMemory:
    """Peak memory of the work inside `with`: on CUDA, torch.cuda.max_memory_allocated above what was allocated at
    the start (tensors); on Linux CPUs, the growth of the process's peak resident set (VmHWM, reset through
    /proc/self/clear_refs after a malloc_trim), which counts every page touched. `peak` is None where neither
    can be measured."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.peak: int | None = None
        self._before: int | None = None

    @staticmethod
    def describe(device) -> str:
        if torch.device(device).type == "cuda":
            return "torch.cuda.max_memory_allocated above the memory allocated before the row"
        return "growth of the process's peak resident set (VmHWM) over the row"

    def __enter__(self) -> _PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory back to the OS, so the row starts low
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak resident set to the current one
            self._before = _proc_status_bytes("VmRSS")
        except (OSError, ValueError):
            self._before = None
        return self

    def __exit__(self, *exc) -> None:
        if self._before is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._before
        else:
            try:
                self.peak = max(_proc_status_bytes("VmHWM") - self._before, 0)
            except (OSError, ValueError):
                self.peak = None


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
    if match is None:
        raise ValueError(f"/proc/self/status has no {key}")
    return int(match.group(1)) * 1024
