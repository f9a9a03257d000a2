"""Pieces every training loop shares: optimizer groups, LR schedule, data order, stop signals,
validation and the throughput summary."""

from __future__ import annotations

import contextlib
import math
import resource
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from litattn.args import OptimizerArgs
from litattn.model import Block, is_mechanism_parameter


# ---------------------------------------------------------------------------------- optimizer
def parameter_groups(model: nn.Module, args: OptimizerArgs) -> list[dict]:
    """AdamW groups of the trainable parameters: weight matrices decay; norms, biases and embeddings do not.
    With `args.mechanism_lr`, the mechanism's own parameters form a third group (no decay, own lr)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, mechanism, seen = [], [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if args.mechanism_lr is not None and is_mechanism_parameter(name):
            mechanism.append(p)
        elif p.ndim >= 2 and id(p) not in embeddings:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if mechanism:
        groups.append({"params": mechanism, "weight_decay": 0.0, "lr_scale": args.mechanism_lr / args.lr})
    return [g for g in groups if g["params"]]


def make_optimizer(groups: list[dict], args: OptimizerArgs, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; the fused implementation where this PyTorch has one for the device (CPU and CUDA)."""
    for g in groups:
        g.setdefault("lr_scale", 1.0)  # a group's lr = schedule(step) * lr_scale (e.g. new attention params)
    kwargs = dict(lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps)
    try:
        return torch.optim.AdamW(groups, fused=device.type in ("cpu", "cuda"), **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, **kwargs)


def lr_at(step: int, args: OptimizerArgs, warmup_steps: int, total_steps: int | None) -> float:
    """Linear warmup to args.lr, then cosine decay to args.min_lr at total_steps (constant if unknown)."""
    if step < warmup_steps:
        return args.lr * (step + 1) / warmup_steps
    if not total_steps or total_steps <= warmup_steps:
        return args.lr
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


# ---------------------------------------------------------------------------------- data order
def epoch_order(n_windows: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of training windows for one epoch: a pure function of (seed, epoch), so a
    resumed run, or a run on more devices, sees exactly the same windows at the same step."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_windows, generator=generator)


def collate(dataset, indices: torch.Tensor, multiple: int = 8, trim: bool = True) -> dict[str, torch.Tensor]:
    """Stack the items; then, with `trim`, drop the trailing columns that no row has a target in (padding of
    short instruction examples), keeping a multiple of `multiple` columns. Pass the model's
    `trailing_positions_independent`: under causal attention nothing before a position depends on it, so the
    loss is exactly that of the full batch, and a batch of short answers costs short sequences."""
    items = [dataset[int(i)] for i in indices]
    batch = {k: torch.stack([item[k] for item in items]) for k in items[0]}
    labels = batch.get("labels")
    if not trim or labels is None or labels.ndim != 2 or (labels[:, -1] != -100).any():
        return batch
    has_target = (labels != -100).any(dim=0).nonzero()
    keep = int(has_target[-1]) + 1 if len(has_target) else 1
    keep = min(labels.shape[1], -(-keep // multiple) * multiple)
    return {k: v[:, :keep] if v.ndim == 2 and v.shape[1] == labels.shape[1] else v for k, v in batch.items()}


# ---------------------------------------------------------------------------------- stopping
class Interrupted(BaseException):
    """Raised by `StopSignal` when a signal arrives inside an interruptible section (validation, sampling).

    A BaseException, like KeyboardInterrupt, so no `except Exception` on the way swallows it."""


class StopSignal:
    """SIGINT/SIGTERM stop a run without losing it. Outside sections the signal sets `received`, which
    the loop checks after each optimizer step (then saves and exits); inside `section()` (validation,
    sampling: work that saves nothing and may take long) it raises `Interrupted` at once, so the loop
    saves what it has. A second signal exits immediately: any checkpoint being written is atomic,
    so the last complete one survives.

    With several processes (`interrupt_sections=False`) a signal never interrupts a section, since the
    other ranks would wait in a collective: the stop is agreed on after the step (`should_stop`)."""

    def __init__(self, interrupt_sections: bool = True) -> None:
        self.received: str | None = None
        self.interrupt_sections = interrupt_sections
        self._depth = 0
        self._previous = {}

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some launchers): keep default handling
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.received:
            sys.exit(128 + signum)
        self.received = signal.Signals(signum).name
        if self._depth and self.interrupt_sections:
            print(f"\n{self.received} received: stopping (send again to quit now)", file=sys.stderr)
            raise Interrupted(self.received)
        print(
            f"\n{self.received} received: saving a checkpoint after this step (send again to quit now)", file=sys.stderr
        )

    @contextlib.contextmanager
    def section(self) -> Iterator[None]:
        """Work that a signal may cut short (raising Interrupted), also when it came just before."""
        if self.received and self.interrupt_sections:
            raise Interrupted(self.received)
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1

    def should_stop(self, fabric) -> bool:
        """Whether any rank received a signal (one collective per call with several processes)."""
        if fabric.world_size == 1:
            return self.received is not None
        flag = torch.tensor(float(self.received is not None), device=fabric.device)
        return bool(fabric.all_reduce(flag, reduce_op="sum").item() > 0)

    @property
    def exit_code(self) -> int:
        """128 + the signal's number: the shell's code for a process that a signal ended."""
        return 128 + signal.Signals[self.received].value if self.received else 0

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------- metrics
def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: per matmul weight, 2 for the forward and 2 for the activations' gradient,
    plus 2 for the weight's own gradient when it trains (6 x parameters when everything trains: the PaLM /
    nanoGPT convention; 4 x for a frozen weight, as in SSA-only or LoRA finetuning), plus 12 x d x T per
    block application for attention scores (causal masking is not discounted; LoRA's small matmuls are not
    counted). A layer loop that applies blocks more than once (`model.block_applications()`) costs
    proportionally more block FLOPs (the blocks are taken as equal in size; blocks a mechanism adds, e.g.
    hybrid's thought layers, count among them)."""

    def cost(weights) -> int:
        return sum((6 if w.requires_grad else 4) * w.numel() for w in weights)

    config = model.config
    in_blocks = {id(m.weight) for m in model.transformer.h.modules() if isinstance(m, nn.Linear)}
    n_blocks = sum(isinstance(m, Block) for m in model.transformer.h.modules())  # n_layer + any a mechanism adds
    weights = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Linear)}  # tied: once
    block_cost = cost(w for i, w in weights.items() if i in in_blocks)
    other_cost = cost(w for i, w in weights.items() if i not in in_blocks)
    applications = model.block_applications()
    attention = 12 * config.n_head * config.head_size * seq_len
    return other_cost + applications * (block_cost / n_blocks + attention)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@dataclass
class Throughput:
    """Elapsed time and tokens since the start of training (not since the epoch of 1970)."""

    start: float = field(default_factory=time.perf_counter)
    tokens: int = 0
    steps: int = 0

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens / max(self.elapsed, 1e-9)
