"""Argument groups shared by the training entry points.

Each field's docstring becomes its `--help` text; YAML files in config_hub/ and the command
line override these defaults, which live here and nowhere else.

Every group checks its values when it is built (`__post_init__`), so a value out of range stops the
command before any work with one line that names it, e.g. `train.max_steps must be >= 1 (or null for
no limit), got 0`; `check_range` gives every such message, here and in the other entry points, one form.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from litattn.precision import check_precision

MAX_SEED = 2**32 - 1
"""The largest seed Lightning's seed_everything (numpy's generator) accepts."""


def check_choice(name: str, value: Any, choices: Any, null: bool = False) -> None:
    """`value` one of a Literal's choices (or None when `null`): else a one-line ValueError that lists them."""
    allowed = list(get_args(choices))
    if value is None and null:
        return
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}{' (or null)' if null else ''}, got {value!r}")


def check_range(
    name: str,
    value: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    null: str | None = None,
    bound_name: str | None = None,
) -> None:
    """Raise ValueError("<name> must be <range> [(or null for <null>)], got <value>") unless value is in range.

    ge/gt/le/lt are the bounds (>=, >, <=, <); null says what None means where None is allowed
    (e.g. "no limit"); bound_name names the argument an upper bound comes from (`<= optimizer.lr (0.0006)`).
    Non-finite numbers (nan, inf) are always out of range.
    """
    low = f">= {_number(ge)}" if ge is not None else f"> {_number(gt)}" if gt is not None else None
    high = f"<= {_number(le)}" if le is not None else f"< {_number(lt)}" if lt is not None else None
    if bound_name and high:
        high = high.replace(" ", f" {bound_name} (", 1) + ")"
    if low and high and not bound_name:  # an interval reads better: in [0, 1)
        allowed = (
            f"in {'[' if ge is not None else '('}{low[2:].strip()}, {high[2:].strip()}{']' if le is not None else ')'}"
        )
    else:
        allowed = " and ".join(b for b in (low, high) if b) or "a finite number"
    if null is not None:
        allowed += f" (or null for {null})"
    if value is None:
        if null is None:
            raise ValueError(f"{name} must be {allowed}, got null")
        return
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = is_number and math.isfinite(value)
    ok = ok and (ge is None or value >= ge) and (gt is None or value > gt)
    ok = ok and (le is None or value <= le) and (lt is None or value < lt)
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {_number(value) if is_number else repr(value)}")


def _number(x: Any) -> str:
    """1.0 -> 1, 0.0006 -> 0.0006, 1e+300 -> 1e+300."""
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e16:
        return str(int(x))
    return repr(x) if isinstance(x, float) else str(x)


def check_seed(name: str, seed: Any) -> None:
    """A seed: an int from 0 to 2**32 - 1 (what Lightning's seed_everything and numpy accept)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{name} must be an integer in [0, {MAX_SEED}], got {seed!r}")
    check_range(name, seed, ge=0, le=MAX_SEED)


class ChecksPassed(BaseException):
    """Raised by `start_work` when the CLI runs an entry point only for its checks (`--print_config`)."""


_checks_only = contextvars.ContextVar("checks_only", default=False)


def start_work() -> None:
    """Where an entry point's checks of its arguments end and its work begins: every entry point calls it once
    the checks that need no files have passed (ranges, combinations), before it reads a checkpoint, writes
    anything or starts a device. `litattn <command> --print_config` runs the entry point up to here (see
    `checks_only`), so a value out of range is the same one-line error, exit 2, it is when the command runs."""
    if _checks_only.get():
        raise ChecksPassed


@contextlib.contextmanager
def checks_only():
    """Within it, an entry point stops at `start_work` by raising ChecksPassed: it has checked its arguments."""
    token = _checks_only.set(True)
    try:
        yield
    finally:
        _checks_only.reset(token)


def checking() -> bool:
    """Whether entry points run only for their checks now (inside `checks_only`)."""
    return _checks_only.get()


def check_run_args(*, seed: Any = 0, devices: Any = 1, num_nodes: Any = 1, train: TrainArgs | None = None) -> None:
    """The scalar arguments of the training entry points (pretrain, finetune), checked before any work:
    seed, devices, num_nodes and, where the device count is known here, the global batch against it."""
    check_seed("seed", seed)
    world = _device_count(devices)
    check_range("num_nodes", num_nodes, ge=1)
    if train is not None and world is not None:
        world *= num_nodes
        if train.global_batch_size % (train.micro_batch_size * world):
            raise ValueError(
                f"train.global_batch_size must be a multiple of micro_batch_size x devices x num_nodes = "
                f"{train.micro_batch_size} x {world}, got {train.global_batch_size}"
            )


def _device_count(devices: Any) -> int | None:
    """The number of devices per node `devices` asks for (None: decided by Fabric: auto, -1 for all);
    ValueError for a value Fabric would not take."""
    allowed = "devices must be >= 1, -1 (all), 'auto' or a list of device indexes such as '0,1'"
    if isinstance(devices, bool):
        raise ValueError(f"{allowed}, got {devices!r}")
    if isinstance(devices, int):
        if devices == -1:
            return None
        if devices < 1:
            raise ValueError(f"{allowed}, got {devices}")
        return devices
    text = str(devices).strip()
    if text == "auto" or text == "-1":
        return None
    if text.isdigit() and int(text) >= 1:
        return int(text)
    parts = [p.strip() for p in text.split(",")]
    if "," in text and all(p.isdigit() for p in parts if p) and any(parts):
        indexes = [int(p) for p in parts if p]
        if len(set(indexes)) == len(indexes):
            return len(indexes)
    raise ValueError(f"{allowed}, got {devices!r}")


@dataclass
class TrainArgs:
    global_batch_size: int = 64
    """Sequences per optimizer step, over all devices (reached by gradient accumulation)."""
    micro_batch_size: int = 8
    """Sequences per forward/backward pass on one device."""
    max_seq_length: int | None = None
    """Tokens per training sequence; defaults to the model's block_size."""
    max_steps: int | None = None
    """Stop after this many optimizer steps."""
    max_tokens: int | None = None
    """Stop after this many training tokens (over all devices), counted as global_batch_size x max_seq_length
    per step (padding included)."""
    epochs: int | None = None
    """Stop after this many passes over the training data. With no limit set at all: 1."""
    max_time: float | None = None
    """Stop (and save) after this many seconds of training; the LR schedule ignores it."""
    lr_warmup_steps: int = 100
    """Linear warmup steps before the cosine decay."""
    max_norm: float | None = 1.0
    """Clip the gradient norm to this value (None: no clipping)."""
    save_interval: int | None = 1000
    """Save a resumable checkpoint every this many optimizer steps (None: only at the end)."""
    log_interval: int = 10
    """Log training metrics every this many optimizer steps."""
    loss_chunk_size: int | None = None
    """Compute the output head and loss over chunks of this many tokens (saves the full logits' memory)."""

    def __post_init__(self) -> None:
        check_range("train.global_batch_size", self.global_batch_size, ge=1)
        check_range("train.micro_batch_size", self.micro_batch_size, ge=1)
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size must be a multiple of micro_batch_size (train.micro_batch_size="
                f"{self.micro_batch_size}), got {self.global_batch_size}"
            )
        check_range("train.max_seq_length", self.max_seq_length, ge=1, null="the model's block_size")
        for limit in ("max_steps", "max_tokens", "epochs"):
            check_range(f"train.{limit}", getattr(self, limit), ge=1, null="no limit")
        check_range("train.max_time", self.max_time, gt=0, null="no limit")
        check_range("train.lr_warmup_steps", self.lr_warmup_steps, ge=0)
        check_range("train.max_norm", self.max_norm, gt=0, null="no clipping")
        check_range("train.save_interval", self.save_interval, ge=1, null="saving only at the end")
        check_range("train.log_interval", self.log_interval, ge=1)
        check_range("train.loss_chunk_size", self.loss_chunk_size, ge=1, null="no chunks")

    def limits(self) -> str:
        given = {k: getattr(self, k) for k in ("max_steps", "max_tokens", "epochs", "max_time")}
        return ", ".join(f"{k}={v}" for k, v in given.items() if v is not None) or "epochs=1"


@dataclass
class EvalArgs:
    interval: int = 100
    """Validate every this many optimizer steps (0: never during training)."""
    max_iters: int | None = 50
    """Micro-batches per validation run, spread evenly over the validation set (None: all of it)."""
    initial_validation: bool = False
    """Validate before the first step (the untrained baseline)."""
    final_validation: bool = True
    """Validate on the whole validation set at the end."""

    def __post_init__(self) -> None:
        check_range("eval.interval", self.interval, ge=0)
        check_range("eval.max_iters", self.max_iters, ge=1, null="the whole validation set")


@dataclass
class OptimizerArgs:
    lr: float = 6e-4
    """Peak learning rate (AdamW)."""
    min_lr: float = 6e-5
    """Learning rate at the end of the cosine decay."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to weight matrices only (not norms, biases, embeddings)."""
    mechanism_lr: float | None = None
    """Peak learning rate of the attention mechanism's own parameters (SSA's beta and temperature vectors),
    which then form their own group without weight decay and follow the same schedule scaled by
    mechanism_lr / lr (SSA's authors train beta 100-1000x faster than the weights). None: lr, in the usual groups."""
    beta1: float = 0.9
    """AdamW's decay rate of the gradient mean."""
    beta2: float = 0.95
    """AdamW's decay rate of the squared-gradient mean."""
    eps: float = 1e-8
    """AdamW's denominator term."""

    def __post_init__(self) -> None:
        check_range("optimizer.lr", self.lr, gt=0)
        check_range("optimizer.min_lr", self.min_lr, ge=0, le=self.lr, bound_name="optimizer.lr")
        check_range("optimizer.weight_decay", self.weight_decay, ge=0)
        check_range("optimizer.mechanism_lr", self.mechanism_lr, gt=0, null="optimizer.lr")
        check_range("optimizer.beta1", self.beta1, ge=0, lt=1)
        check_range("optimizer.beta2", self.beta2, ge=0, lt=1)
        check_range("optimizer.eps", self.eps, gt=0)


@dataclass
class LogArgs:
    logger: Literal["csv", "tensorboard"] = "csv"
    """Where metrics go (under out_dir/logs): csv, or tensorboard (needs `pip install tensorboard`)."""
    sample_prompt: str | None = "def "
    """Generate from this prompt after training (None: no sample)."""
    sample_tokens: int = 100
    """Tokens to generate for the sample."""
    sample_at_validation: bool = False
    """Also generate the sample after each validation (finetuning: watch the answers change)."""
    progress_bar: bool = True
    """Show a progress bar while training."""

    def __post_init__(self) -> None:
        check_range("log.sample_tokens", self.sample_tokens, ge=1)


@dataclass
class LoRAArgs:
    """Low-rank adapters (Hu et al., 2021): W x + (alpha / r) B A x, with A (r, in) and B (out, r), B = 0 at start."""

    r: int = 8
    """Rank of the adapters."""
    alpha: float = 16.0
    """Scale numerator: the update is multiplied by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapters' input."""
    targets: list[str] = field(default_factory=lambda: ["attn.qkv", "attn.proj"])
    """Linear layers that get an adapter, by the end of their module name: attn.qkv, attn.proj, mlp.fc, mlp.fc_1,
    mlp.fc_2, mlp.proj, lm_head (the lm_head only when it is not tied to the embedding)."""

    def __post_init__(self) -> None:
        check_range("lora.r", self.r, ge=1)
        check_range("lora.alpha", self.alpha, gt=0)
        check_range("lora.dropout", self.dropout, ge=0, lt=1)
        if not self.targets or not all(isinstance(t, str) and t.strip() for t in self.targets):
            raise ValueError(
                f"lora.targets must be a non-empty list of layer names such as attn.qkv, got {self.targets}"
            )


def check_indexes(requested: list[int] | None, n: int, what: str) -> list[int]:
    """Indexes of `n` layers or heads (negative: from the end) as 0..n-1; None: all; a one-line error otherwise."""
    if requested is None:
        return list(range(n))
    if not requested:
        raise ValueError(f"{what}s: none chosen: pass at least one {what} index, or null for all")
    bad = [i for i in requested if not -n <= i < n]
    if bad:
        raise ValueError(
            f"{what}s: {what} index(es) {bad} out of range: the model has {n} {what}s (0..{n - 1}, or -{n}..-1 "
            "from the end)"
        )
    return [i % n for i in requested]


@dataclass
class RuntimeArgs:
    """Where and how a training run computes, shared by pretrain, finetune and the loop. The entry points take
    these as flat command-line arguments (`--precision bf16-mixed`, as Lit-GPT's do), their defaults from here."""

    precision: str = "auto"
    """auto (bf16-mixed where the device has native bf16, else 32-true: litattn/precision.py), or a Fabric
    precision: 32-true, bf16-mixed, bf16-true, 16-mixed, ..."""
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"
    compile: bool = False
    seed: int = 42
    cache_dir: Path = Path("cache")

    def __post_init__(self) -> None:
        check_precision(self.precision)
        self.cache_dir = Path(self.cache_dir)
