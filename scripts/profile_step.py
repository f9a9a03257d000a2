"""Where a training step's time goes: torch.profiler over a few steps of the quickstart model, by category.

    python scripts/profile_step.py [--steps 5] [--warmup 3] [--precision 32-true] [--batch 8] [--seq-len 256]

The step is the loop's (litattn/loop.py): `collate` over a TokenWindows dataset (random tokens in a temporary
file), the model's `loss`, backward, gradient clipping, AdamW from litattn's own build functions, zero_grad.
After --warmup untimed steps, --steps steps run under the profiler; each op's self CPU time (its own, not its
children's) goes to one category:

    attention      the SDPA / flash-attention kernels, forward and backward
    matmuls        the blocks' linear layers (addmm, mm, bmm, linear, matmul), forward and backward
    norms          layer_norm, rms_norm
    activation     gelu, silu
    loss head      the lm_head matmuls and the cross-entropy, forward and backward (the fused head of
                   litattn/loss_head.py computes its gradients in its forward; on the plain path the backward
                   ops are found through the autograd sequence numbers)
    optimizer      gradient clipping, the AdamW step, zero_grad (Python time included)
    collation      collate and the dataset reads (Python time included)
    other ops      RoPE, residual adds, embedding, copies, views
    overhead       Python between ops, the autograd engine's own work

Times under the profiler run somewhat slower than without it; the shares are what to read.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

from litattn.args import OptimizerArgs
from litattn.config import Config
from litattn.cpu import detect_isa
from litattn.data.base import TokenWindows
from litattn.model import GPT
from litattn.training import collate, epoch_order, make_optimizer, parameter_groups
from litattn.validation import attention_batch

CATEGORIES = [
    "attention",
    "matmuls (blocks)",
    "norms",
    "activation",
    "loss head",
    "optimizer",
    "collation",
    "other ops",
]
OVERHEAD = "overhead (Python, autograd engine)"
PHASES = {"collate": "collation", "optimizer": "optimizer", "loss head": "loss head"}  # label -> category
NAMES = [  # (category, substrings of an op's name), first match wins
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention", "sdpa")),
    ("loss head", ("cross_entropy", "log_softmax", "nll_loss", "logsumexp")),
    ("matmuls (blocks)", ("addmm", "aten::mm", "bmm", "aten::linear", "aten::matmul")),
    ("norms", ("layer_norm", "rms_norm")),
    ("activation", ("gelu", "silu")),
]


class HeadLabel:
    """Opens a "loss head" profiler range when the head starts (the fused head + cross-entropy of
    litattn/loss_head.py, which computes its gradients in the forward pass, or lm_head on the plain path under
    autocast); the step closes it once the loss is computed, so the range holds the head's matmuls, the softmax
    and the cross-entropy."""

    def __init__(self, model: GPT) -> None:
        import litattn.model as model_module

        self.range = None
        model.lm_head.register_forward_pre_hook(self._open)
        fused = model_module.linear_cross_entropy

        def labelled(*args, **kwargs):
            self._open(None, None)
            return fused(*args, **kwargs)

        model_module.linear_cross_entropy = labelled

    def _open(self, module, args) -> None:
        self.range = record_function("loss head")
        self.range.__enter__()

    def close(self) -> None:
        if self.range is not None:
            self.range.__exit__(None, None, None)
            self.range = None


def build(precision: str, batch: int, seq_len: int, folder: Path):
    """The quickstart model and optimizer as `litattn pretrain` builds them, and a dataset of random tokens."""
    config = Config.from_name("quickstart")
    model = GPT(config)
    if precision == "bf16-true":
        model = model.to(torch.bfloat16)
    args = OptimizerArgs()
    optimizer = make_optimizer(parameter_groups(model, args), args, torch.device("cpu"))
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, 64 * batch * seq_len + 1, dtype=np.uint16)
    tokens.tofile(folder / "tokens.bin")
    return model, optimizer, TokenWindows(folder / "tokens.bin", seq_len, np.uint16)


def step(model, optimizer, dataset, windows: torch.Tensor, head: HeadLabel, autocast: bool) -> None:
    with record_function("collate"):
        batch = attention_batch(model, collate(dataset, windows, trim=model.trailing_positions_independent))
    with record_function("forward"):
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            loss = model.loss(batch.pop("input_ids"), batch.pop("labels"), **batch)
        head.close()
    with record_function("backward"):
        loss.backward()
    with record_function("optimizer"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def categorize(events) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Self CPU time (us) per category, and per op name (total, calls)."""
    head_sequence = set()  # autograd sequence numbers of the forward ops inside "loss head"
    for e in events:
        if e.sequence_nr >= 0 and _label(e, {"loss head"}):
            head_sequence.add(e.sequence_nr)
    by_category, by_name = defaultdict(float), defaultdict(lambda: [0.0, 0])
    for e in events:
        us = e.self_cpu_time_total
        by_category[_category(e, head_sequence)] += us
        if e.name not in ("forward", "backward", *PHASES) and not e.name.startswith("autograd::engine"):
            by_name[e.name][0] += us
            by_name[e.name][1] += 1
    return by_category, by_name


def _label(event, labels: set[str]) -> str | None:
    """The innermost of `labels` among the event and its parents."""
    while event is not None:
        if event.name in labels:
            return event.name
        event = event.cpu_parent
    return None


def _category(event, head_sequence: set[int]) -> str:
    phase = _label(event, set(PHASES))
    if phase:
        return PHASES[phase]
    node = event  # in backward: the autograd node that ran this op, whose sequence number is its forward op's
    while node is not None and not node.name.startswith("autograd::engine::evaluate_function"):
        node = node.cpu_parent
    if node is not None and node.sequence_nr in head_sequence:
        return "loss head"
    if event.name in ("forward", "backward") or event.name.startswith("autograd::engine") or "Backward" in event.name:
        return OVERHEAD  # the label's or the autograd node's own time: Python and engine work between ops
    for category, parts in NAMES:
        if any(p in event.name for p in parts):
            return category
    return "other ops"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="profiled steps")
    parser.add_argument("--warmup", type=int, default=3, help="steps before profiling")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "bf16-true"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model, optimizer, dataset = build(args.precision, args.batch, args.seq_len, Path(tmp))
        head = HeadLabel(model)
        order = epoch_order(len(dataset), seed=0, epoch=0).view(-1, args.batch)
        autocast = args.precision == "bf16-mixed"
        for i in range(args.warmup):
            step(model, optimizer, dataset, order[i % len(order)], head, autocast)
        walls = []
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            for i in range(args.steps):
                start = time.perf_counter()
                step(model, optimizer, dataset, order[(args.warmup + i) % len(order)], head, autocast)
                walls.append(time.perf_counter() - start)
    by_category, by_name = categorize(prof.events())
    step_ms = 1e3 * sum(walls) / args.steps

    def ms(us: float) -> float:
        return us / 1e3 / args.steps

    isa = detect_isa()
    print(
        f"quickstart ({model.num_parameters():,} parameters), {args.precision}, batch {args.batch} x {args.seq_len}; "
        f"CPU {isa.name}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"{args.steps} profiled steps after {args.warmup}: {step_ms:.1f} ms per step under the profiler\n"
    )
    print("| category | ms / step | % of step |\n| --- | --- | --- |")
    for category in [*CATEGORIES, OVERHEAD]:
        print(f"| {category} | {ms(by_category[category]):.2f} | {ms(by_category[category]) / step_ms:.1%} |")
    total = ms(sum(by_category.values()))
    print(f"| all of the above (vs the step's wall time) | {total:.2f} | {total / step_ms:.1%} |")
    print("\nTop 10 ops by self CPU time:\n\n| op | calls / step | ms / step | % of step |\n| --- | --- | --- | --- |")
    for name, (us, calls) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:10]:
        print(f"| {name} | {calls / args.steps:g} | {ms(us):.2f} | {ms(us) / step_ms:.1%} |")


if __name__ == "__main__":
    main()
