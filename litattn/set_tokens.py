"""SET tokens re-drawn during training (Disrupt/SET): their embeddings never settle, so the model cannot
memorise them and must read them from context; the method's claim is that this keeps it from overfitting.

`SETRedraw` is a training hook (litattn/hooks.py). At every epoch start (or every `every_steps` optimizer
steps) it re-draws the SET tokens' embedding rows, and their output-head rows when the head is not tied to the
embedding, from the model's init distribution N(0, model.init_std), and zeroes those rows' AdamW moments. The
draw is a pure function of (seed, period), so a resumed run and every rank draw the same values. With
`freeze`, the rows also get back their drawn values after every optimizer step: they train never, only
change at each re-draw.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from litattn.hooks import HookContext, TrainingHook, hook_generator

STEP_SALT = 1 << 20
"""Added to the period index of step-periodic draws, so they never reuse an epoch draw's generator."""


class SETRedraw(TrainingHook):
    """Re-draw the rows of `ids` in the token embedding (and an untied output head) each epoch or N steps."""

    def __init__(
        self, ids: Sequence[int], every_steps: int | None = None, freeze: bool = False, redraw: bool = True
    ) -> None:
        """every_steps: re-draw every N optimizer steps instead of every epoch. freeze: undo every optimizer update
        of the rows. redraw=False (with freeze): draw once at the start of training and keep those values."""
        if not ids:
            raise ValueError("SETRedraw: no SET token ids to re-draw")
        if every_steps is not None and every_steps < 1:
            raise ValueError(f"SET re-draw every_steps must be >= 1 (or null for every epoch), got {every_steps}")
        self.ids = sorted(set(int(i) for i in ids))
        self.every_steps = every_steps
        self.freeze = freeze
        self.redraw = redraw

    def period(self, ctx: HookContext) -> int:
        """Which draw the rows hold now: the epoch, the step period (offset by STEP_SALT), or 0 if drawn once."""
        if not self.redraw:
            return 0
        return ctx.epoch if self.every_steps is None else STEP_SALT + ctx.step // self.every_steps

    def on_epoch_start(self, ctx: HookContext) -> None:
        if ctx.step == 0 or (self.redraw and self.every_steps is None):
            self._redraw(ctx, period=self.period(ctx), announce=f"epoch {ctx.epoch}")

    def on_step_end(self, ctx: HookContext) -> None:
        if self.redraw and self.every_steps is not None and ctx.step % self.every_steps == 0:
            self._redraw(ctx, period=self.period(ctx), announce=f"step {ctx.step}")
        elif self.freeze:  # undo this step's update: the rows keep their drawn values
            self._redraw(ctx, period=self.period(ctx), announce=None)

    def rows(self, model) -> list[torch.nn.Parameter]:
        """The parameters whose rows are SET tokens: the embedding, and the output head unless tied to it."""
        params = [model.transformer.wte.weight]
        if model.lm_head.weight is not model.transformer.wte.weight:
            params.append(model.lm_head.weight)
        return params

    def drawn(self, model, seed: int, period: int) -> list[torch.Tensor]:
        """The values a draw puts in each of `rows(model)`, (len(ids), n_embd) float32 on the CPU."""
        return [
            torch.randn(len(self.ids), p.shape[1], generator=hook_generator(seed, period, salt)) * model.init_std
            for salt, p in enumerate(self.rows(model))
        ]

    def _redraw(self, ctx: HookContext, period: int, announce: str | None) -> None:
        model = ctx.model
        vocab = model.transformer.wte.weight.shape[0]
        if self.ids[-1] >= vocab:
            raise ValueError(f"SET token id {self.ids[-1]} is outside the model's vocabulary ({vocab})")
        for param, values in zip(self.rows(model), self.drawn(model, ctx.seed, period), strict=True):
            index = torch.tensor(self.ids, device=param.device)
            with torch.no_grad():
                param.index_copy_(0, index, values.to(param))
            state = ctx.optimizer.state.get(param, {})
            for moment in ("exp_avg", "exp_avg_sq"):
                if moment in state:
                    state[moment].index_fill_(0, index, 0.0)
        if announce is not None:
            ctx.fabric.print(f"{announce}: re-drew the {len(self.ids)} SET token rows (seed {ctx.seed})")
