"""A test-only attention mechanism with a training hook (tests/test_hooks.py): causal attention whose output is
scaled by 1 + mean(values) / 10, where `values` (4 per layer, trained) are re-drawn at the start of every epoch,
like Disrupt/SET's re-randomised tokens. A module of its own so that a `litattn` subprocess can select it:

    PYTHONPATH=tests litattn pretrain ... --model.attention '{name: test_redraw, module: redraw_mechanism}'
"""

from __future__ import annotations

import torch
from torch import nn

from litattn.attention import AttentionMechanism, register_attention
from litattn.hooks import HookContext, TrainingHook

N_VALUES = 4


def drawn_values(generator: torch.Generator) -> torch.Tensor:
    """What the hook puts into `values` (float32, on the CPU) from a generator."""
    return torch.randn(N_VALUES, generator=generator)


class Redraw(TrainingHook):
    def __init__(self, mechanism: RedrawAttention) -> None:
        self.mechanism = mechanism

    def on_epoch_start(self, ctx: HookContext) -> None:
        values = self.mechanism.values
        with torch.no_grad():
            values.copy_(drawn_values(ctx.generator(salt=self.mechanism.block_idx)).to(values))


@register_attention("test_redraw")
class RedrawAttention(AttentionMechanism):
    """Test only: causal attention scaled by 1 + mean(values) / 10; values re-drawn at each epoch start."""

    def __init__(self, config, block_idx, options) -> None:
        super().__init__(config, block_idx, options)
        self.values = nn.Parameter(torch.zeros(N_VALUES))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.values.zero_()

    def forward(self, q, k, v, ctx):
        if self.training:  # consume the global RNG, as dropout would: per micro-batch, so how much by an epoch's
            torch.rand(())  # start depends on the number of processes (a hook drawing from it would notice)
        return super().forward(q, k, v, ctx) * (1 + self.values.mean() / 10).to(q.dtype)

    def training_hooks(self) -> list[TrainingHook]:
        return [Redraw(self)]
