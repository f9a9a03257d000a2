"""Argument groups shared by the training entry points.

Each field's docstring becomes its `--help` text; YAML files in config_hub/ and the command
line override these defaults, which live here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


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

    def limits(self) -> str:
        given = {k: getattr(self, k) for k in ("max_steps", "max_tokens", "epochs", "max_time")}
        return ", ".join(f"{k}={v}" for k, v in given.items() if v is not None) or "epochs=1"


@dataclass
class EvalArgs:
    interval: int = 100
    """Validate every this many optimizer steps."""
    max_iters: int | None = 50
    """Micro-batches per validation run, spread evenly over the validation set (None: all of it)."""
    initial_validation: bool = False
    """Validate before the first step (the untrained baseline)."""
    final_validation: bool = True
    """Validate on the whole validation set at the end."""


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
    beta2: float = 0.95
    eps: float = 1e-8


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
