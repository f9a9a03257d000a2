"""Training hooks: code a mechanism or a data module runs inside the training loop (litattn/loop.py).

    model.training_hooks()   the model's (GPT gathers each attention mechanism's)
    data.training_hooks()    the data module's
        -> [TrainingHook, ...]

    for each epoch:  hook.on_epoch_start(ctx)        before its first step
        for each step:  ... optimizer.step() ...
                     hook.on_step_end(ctx)           ctx.step = steps done

Pretraining and every finetuning method share the loop, so a hook runs in all of them. What a hook changes
in the model or the optimizer is saved with them in every checkpoint; a resumed run therefore calls
`on_epoch_start` only for epochs it begins (not again for the epoch it lands in the middle of), and
reproduces the uninterrupted run exactly as long as the hook draws its random numbers from
`ctx.generator()` (see `TrainingHook`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lightning_fabric import Fabric
    from torch.optim import Optimizer

    from litattn.model import GPT


def hook_generator(seed: int, epoch: int, salt: int = 0) -> torch.Generator:
    """A CPU generator that is a pure function of (seed, epoch, salt): the same on every rank, in a resumed
    run and on any machine, and independent of the global RNG and of the data order's generator."""
    digest = hashlib.sha256(f"litattn-hook:{seed}:{epoch}:{salt}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)  # 63 bits


@dataclass
class HookContext:
    """What a hook sees."""

    model: GPT
    """The unwrapped model (no Fabric or DDP wrapper): change its parameters in place, under torch.no_grad()."""
    optimizer: Optimizer
    """The run's optimizer (Fabric-wrapped; `optimizer.state[p]` holds the state of parameter p, e.g. AdamW's
    moments, which a hook that re-draws p may want to reset)."""
    epoch: int
    """The epoch starting (on_epoch_start), or the epoch of the step just done (on_step_end); 0-based."""
    step: int
    """Optimizer steps done so far in the run (0 at the start of a fresh run)."""
    seed: int
    """The run's seed."""
    fabric: Fabric
    """The run's Fabric (device, rank, world size, collectives)."""

    def generator(self, salt: int = 0) -> torch.Generator:
        """A CPU generator seeded from (seed, epoch, salt): draw from it (then move the result to the
        parameter's device) so every rank draws the same values and a resumed run the values of the
        uninterrupted one. Use a different `salt` for each independent draw of one epoch (e.g. per layer)."""
        return hook_generator(self.seed, self.epoch, salt)


class TrainingHook:
    """Called by both training loops (pretrain and finetune share `fit` in litattn/loop.py). Override what
    you need; the base methods do nothing.

    Rules that keep runs reproducible:

    - Never draw from the global RNG (`torch.rand(...)` without a generator, `random`, `numpy.random`): under
      DDP every rank must draw the same values (each rank applies the change to its own copy of the weights,
      and nothing re-synchronises parameters after a hook), and a resumed run restores the RNG state of the
      checkpoint, not of the moment the hook ran. Draw from `ctx.generator(salt)`, seeded by (seed, epoch,
      salt), instead.
    - Keep what a hook changes in the model's parameters or buffers, or in the optimizer's state: those are
      saved in every checkpoint, so a resumed run continues from them. State kept on the hook object itself
      is lost on --resume.
    - A hook runs on every rank; collectives through `ctx.fabric` are allowed (every rank calls them).
    """

    def on_epoch_start(self, ctx: HookContext) -> None:
        """Before the first step of each epoch, epoch 0 included. A run resumed in the middle of an epoch does
        not call it again for that epoch (the checkpoint holds its effect); one resumed exactly at an epoch
        boundary calls it for the epoch about to start, as the uninterrupted run did."""

    def on_step_end(self, ctx: HookContext) -> None:
        """After each optimizer step (gradients already zeroed); ctx.step counts the steps done, this one
        included, and ctx.epoch is the epoch this step belongs to."""


__all__ = ["HookContext", "TrainingHook", "hook_generator"]
