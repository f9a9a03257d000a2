"""A run's closing figures: the "Done:" line and out_dir/summary.json (what `litattn ablate` tabulates)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from litattn.cpu import describe_machine, format_flops
from litattn.precision import PrecisionChoice
from litattn.train_state import TrainState
from litattn.training import flops_per_token
from litattn.utils import WriteError, atomic_write_text, write_failure


def write_summary(fabric, model, seq_len: int, state: TrainState, out_dir: Path, precision: PrecisionChoice) -> None:
    """Print the run's figures and write them to out_dir/summary.json (what `litattn ablate` tabulates). Time,
    tokens/s and peak memory cover every session of a resumed run; a figure an earlier session did not record
    is null (never 0). `precision`: what the run computed in and why."""

    seconds, memory = state.train_seconds, state.peak_memory_bytes
    tokens_per_sec = state.tokens / seconds if seconds else None
    dtype = torch.bfloat16 if "bf16" in precision.precision else torch.float32
    machine = describe_machine(fabric.device)  # the CPU's ISA and both matmul peaks, measured once per process
    peak = machine["matmul_peak_bf16" if dtype == torch.bfloat16 else "matmul_peak_fp32"]
    mfu = flops_per_token(model, seq_len) * tokens_per_sec / fabric.world_size / peak if tokens_per_sec else None
    val_loss, val_step, batches = state.val_loss, state.val_step, state.val_batches
    if state.validated_in_full():
        val_label = "final val loss"
    else:
        val_label = f"last val loss ({batches or 'all'} batches, step {val_step})"
    unknown = "unknown (an earlier session's checkpoint does not record it)"
    fabric.print(
        f"Done: {state.tokens:,} tokens in "
        + (f"{seconds:.1f}s = {tokens_per_sec:,.0f} tokens/s; " if tokens_per_sec else f"a training time {unknown}; ")
        + (f"peak memory {memory / 2**30:.2f} GiB; " if memory is not None else f"peak memory {unknown}; ")
        + (f"MFU {mfu:.1%} of {format_flops(peak)} measured matmul peak ({dtype}); " if mfu is not None else "")
        + f"precision {precision.precision} ({precision.reason}); "
        + f"CPU {machine['cpu_isa']}{' (native bf16)' if machine['cpu_native_bf16'] else ''}, "
        f"{fabric.device.type} matmul peaks fp32 {format_flops(machine['matmul_peak_fp32'])}, "
        f"bf16 {format_flops(machine['matmul_peak_bf16'])}; "
        + (f"{val_label} {val_loss:.4f} (ppl {math.exp(val_loss):.2f}); " if val_loss is not None else "")
        + f"saved {out_dir / 'final'}"
    )
    summary = {
        "step": state.step,
        "tokens": state.tokens,
        "epoch": state.epoch,
        "elapsed_s": seconds,
        "tokens_per_sec": tokens_per_sec,
        "peak_memory_bytes": memory,
        "mfu": mfu,
        "precision": precision.precision,
        "precision_reason": precision.reason,
        **machine,
        "val_loss": val_loss,
        "val_loss_is": val_label if val_loss is not None else None,
        "parameters": model.num_parameters(),
        "mechanism_parameters": model.mechanism_parameters(),
    }
    if fabric.global_rank == 0:
        path = out_dir / "summary.json"
        try:
            atomic_write_text(path, json.dumps(summary, indent=2))
        except OSError as e:
            raise WriteError(f"Could not write {path}: {write_failure(path, e)}") from e
