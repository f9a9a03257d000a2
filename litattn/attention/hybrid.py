"""Hybrid attention: a bidirectional, iteratively refined "thought" prefix, then causal attention.

A prefix-LM (T5's decoder-only prefix LM, t5x `inputs_bidirectional_attention`; GLM) whose first layers
loop over the prefix as a looped transformer does (input re-injection z <- f(z + x), backpropagation through
the last few loops only: Huginn, `seal-rg/recurrent-pretraining`), with the hybrid-attention proposal's
refinements between loops. With P = `prefix_len` of a row (batch metadata, (B,) int64):

    mask      query i may see key j  iff  j <= i  or  (j < P and i < P)
              (the prefix sees itself bidirectionally; the rest is causal and sees the whole prefix)
    thought   f = the thought blocks: the model's first `thought_layers` blocks, or as many new blocks
              inserted after the embeddings (`add_thought_layers`); x = the prefix's input embeddings
              z_0 = 0;  for t = 1 .. n (`iterations`):
                  y   = f(z_{t-1} + x)                                   re-injection of the input
                  y_i = y_i * (1 + tanh(w * c_i + b))                    `reweighting`, with c_i: "mean", the
                        c_i = mean_{j < P, j != i} cos(y_i, y_j)         mean cosine similarity of y_i to the
                                                                         other prefix states (past and future);
                        c_i = cos(y_i, y_{P-1})                          "focus", to the focus: the row's last
                                                                         prefix state. Both O(P d)
                  z_t = a * y + (1 - a) * z_{t-1}    (t >= 2)            `interpolation`, a learnable
    then      the remaining blocks run once over the whole sequence, the prefix entering as z_n

w, b (init 0: scale 1) and a (init 1: the newest iterate) are scalars of the one thought group; with
`iterations: 1` and both refinements off this is exactly the plain prefix-LM, and with P = 0 everywhere it is
exactly causal attention over the same blocks (the loop is skipped, attention takes the fused causal kernel).

Added thought layers (`add_thought_layers`) are blocks owned by block 0's mechanism (so `.attn.mechanism.` keys:
a checkpoint without them loads, and `finetune --method ssa` trains them with the refinements), built with this
mechanism (an SSA wrapping hybrid gives them no temperatures). Their residual output projections start at zero,
so each is the identity and the model starts as exactly the checkpoint's function with `iterations: 1` (its
prefix-LM) or without a prefix. With n > 1 the re-injection itself departs from it: through identity blocks
z_n = n * x on the prefix (a pre-norm block's norm removes the scale, the residual stream keeps it).

How the suffix passes the thought blocks: exactly once, in the last iteration. Iterations 1 .. n-1 run over
the prefix columns only (the first max P columns of the batch; a row's columns past its own P are computed
under the causal rule and discarded, as no prefix query sees them). The last iteration runs over the whole
sequence under the mask above: prefix tokens with input z_{n-1} + x, the others with their embeddings x (their
z is 0), each suffix token attending to the prefix's keys of that last iteration and causally to the suffix.
Prefix queries never see a suffix key, so the prefix states are what a prefix-only pass gives.

Cache: prefill (a forward from slot 0 holding the whole prefix) runs iterations 1 .. n-1 without the cache and
the last iteration and the remaining blocks with it, so every layer caches the keys and values the suffix reads
in a full forward: the thought blocks those of the last iteration, the remaining blocks those of the refined
prefix. Decoding (a forward from a later slot) holds no prefix token: one causal pass over every block with the
cache, which is what the full forward computes for those tokens. A prefix split over two forwards is an error.

Without `prefix_len` in the batch, the prefix of a row ends after its first `<|endthought|>` token (option
`endthought_id`), else it is empty; only a forward from slot 0 finds one, so decoding never starts a prefix.

Training memory: the first n - `grad_iterations` iterations run under torch.no_grad(), so activations are kept
for the last `grad_iterations` only. With `random_iterations` each optimizer step runs a count drawn uniformly
from 1 .. n, a pure function of (run seed, step) set by a training hook into a buffer the checkpoint saves, so
every rank and a resumed run draw the same counts; evaluation and generation always run n.

Collate's trimming stays exact (`trailing_positions_independent`): it drops only columns after every row's
last target, and a prefix precedes its targets (the loss is on the suffix), so a dropped column is never in a
prefix a kept position reads. A `prefix_len` longer than the batch's sequence is an error, never a silent cut.

Counted as FLOPs: `block_applications` counts every thought-block application as a pass over the whole
sequence (an upper bound: iterations 1 .. n-1 only cover the prefix columns; with `random_iterations`, n of them).

Gradient refinement (`refine_steps`, the proposal's inference-time third operation; evaluation and generation
only): before the remaining blocks run, the refined prefix states z_n take a few gradient steps that lower the
model's own next-token loss on the prefix tokens,
    z_i <- z_i - refine_lr * |z_i| * g_i / |g_i|,   g = d/dz sum_{i < P-1} CE(head(rest(z))_i, token_{i+1})
scored by a separate pass of the remaining blocks over the prefix columns under the CAUSAL mask (prefix_len 0):
under the prefix mask each prefix position sees the token it is asked to predict, so that loss would say nothing.
The output head comes from the context (`AttentionContext.head`). The steps are normalised per token so
refine_lr is a fraction of each state's norm, whatever the model's scale. Each step costs a forward and a
backward of the remaining blocks over the prefix; `block_applications` does not count them (no training FLOPs).
The last prefix state predicts no prefix token, so it never moves. Cached decoding still equals the full forward:
the refinement reads the prefix columns alone, in the prefill.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from litattn.attention import masks
from litattn.attention.base import AttentionContext, AttentionMechanism, AttentionOptions, integer_metadata
from litattn.attention.kernels import attend
from litattn.attention.registry import register_attention
from litattn.hooks import HookContext, TrainingHook
from litattn.tokenizer import SPECIAL_TOKENS

if TYPE_CHECKING:
    from litattn.config import Config

ENDTHOUGHT_ID = SPECIAL_TOKENS.index("<|endthought|>")
"""The id tokenizers trained by litattn give `<|endthought|>`, the token that ends a prefix in text."""


@dataclass
class HybridOptions(AttentionOptions):
    thought_layers: int = 1
    """k: blocks that run the thought loop over the prefix: the model's first k (at most n_layer; a converted
    checkpoint needs no new weights), or k new ones with `add_thought_layers`."""
    add_thought_layers: bool = False
    """Insert k new blocks after the embeddings for the thought loop, their residual output projections zero, so
    they start as the identity (the other blocks then all run after the loop)."""
    iterations: int = 1
    """n: how many times the thought blocks run over the prefix, the input embeddings re-injected each time."""
    reweighting: bool | Literal["mean", "focus"] = False
    """After each iteration, scale each prefix state by 1 + tanh(w * c + b) (w, b learned, init 0: the identity),
    with c: "mean" (or true) its mean cosine similarity to the other prefix states; "focus" its cosine similarity
    to the current focus, the row's last prefix state (the text just written, once `rethink_every` extends the
    prefix over it); false: off."""
    interpolation: bool = False
    """From the second iteration on, z <- a * z_new + (1 - a) * z_old (a learned, init 1)."""
    grad_iterations: int | None = None
    """Backpropagate through the last this many iterations only (the earlier ones run under no_grad); null: all."""
    random_iterations: bool = False
    """In training, each optimizer step runs a number of iterations drawn uniformly from 1 .. n, a pure function
    of the run's seed and the step (the same on every rank and after --resume); evaluation always runs n."""
    refine_steps: int = 0
    """Inference-time gradient refinement: this many gradient steps on the refined prefix states that lower the
    model's own next-token loss on the prefix, scored by a causal pass of the remaining blocks and the output
    head (evaluation and generation only; 0: off)."""
    refine_lr: float = 0.05
    """Step size of the gradient refinement, relative: each step moves every prefix state by refine_lr times its
    norm, along its normalised negative gradient."""
    endthought_id: int | None = None
    """Token id that ends a row's prefix when the batch has no `prefix_len` (the prefix ends after its first
    occurrence). None: `<|endthought|>` of a litattn tokenizer (id 21)."""
    rethink_every: int | None = None
    """In generation, after every k new tokens the text written so far joins the thought region: the prompt and
    the output are read again as one prefix (the thought loop bidirectionally over all of it) and the KV cache
    is rebuilt from that pass; decoding then continues causally. None: the prefix is read once, at the prompt."""


PREFIX_LEN = "prefix_len"
"""The batch metadata key of each row's prefix length: written by the prefix data modules (instruction data with
`prefix: true`, SampledPrefix, PrefixTask) and `generate --instruction`, read by this mechanism."""


@register_attention("hybrid")
class HybridAttention(AttentionMechanism):
    """Hybrid attention: a bidirectional thought prefix refined over repeated layer iterations, then causal."""

    Options = HybridOptions
    metadata_keys = {PREFIX_LEN: "(B,) long: the first prefix_len tokens of each row are its bidirectional prefix"}
    trailing_positions_independent = True  # collate's trimming never cuts a prefix (see the module docstring)

    def __init__(self, config: Config, block_idx: int, options: HybridOptions):
        super().__init__(config, block_idx, options)
        self.endthought_id = self.token_id_option("endthought_id", ENDTHOUGHT_ID, "the prefix-ending token")
        self.rethink_every = options.rethink_every
        if block_idx != 0:  # the model runs the layer loop of block 0's mechanism: it owns the loop's parts
            return
        k = options.thought_layers
        if not options.add_thought_layers and k > config.n_layer:
            raise ValueError(
                f"hybrid: thought_layers={k} exceeds the model's {config.n_layer} layers; lower it or set "
                "add_thought_layers: true"
            )

    def build_modules(self, make_block) -> None:
        """Block 0 owns the layer loop's parts: added thought layers (new blocks after the model's, indexes
        n_layer..) and the refinements' parameters."""
        if self.block_idx != 0:
            return
        options, n_layer = self.options, self.config.n_layer
        if options.add_thought_layers:
            self.thought_blocks = nn.ModuleList(make_block(n_layer + i) for i in range(options.thought_layers))
        if self.reweighting:
            self.reweight_weight = nn.Parameter(torch.zeros(()))
            self.reweight_bias = nn.Parameter(torch.zeros(()))
        if options.interpolation:
            self.interpolation = nn.Parameter(torch.ones(()))
        if options.random_iterations:  # saved with the weights, so a resumed run continues the drawn count
            self.register_buffer("sampled_iterations", torch.tensor(options.iterations, dtype=torch.long))

    @classmethod
    def validate_options(cls, options: HybridOptions) -> None:
        super().validate_options(options)
        for name in ("thought_layers", "iterations"):
            if getattr(options, name) < 1:
                raise ValueError(f"hybrid: {name} must be >= 1, got {getattr(options, name)}")
        if options.grad_iterations is not None and options.grad_iterations < 1:
            raise ValueError(f"hybrid: grad_iterations must be >= 1 (or null: all), got {options.grad_iterations}")
        if options.grad_iterations is not None and options.grad_iterations > options.iterations:
            raise ValueError(
                f"hybrid: grad_iterations must be <= iterations ({options.iterations}): gradients flow through at "
                f"most every iteration, got {options.grad_iterations}"
            )
        if options.refine_steps < 0:
            raise ValueError(
                f"hybrid: refine_steps must be >= 0 (0: no gradient refinement), got {options.refine_steps}"
            )
        if options.rethink_every is not None and options.rethink_every < 1:
            raise ValueError(f"hybrid: rethink_every must be >= 1 (or null: never), got {options.rethink_every}")
        if not options.refine_lr > 0:
            raise ValueError(f"hybrid: refine_lr must be > 0, got {options.refine_lr}")
        cls.check_token_id_option(options, "endthought_id")

    def reset_parameters(self) -> None:
        if self.block_idx != 0:
            return
        with torch.no_grad():
            for block in getattr(self, "thought_blocks", ()):
                for proj in (block.attn.proj, block.mlp.proj):  # zero residual outputs: the block is the identity
                    proj.weight.zero_()
                    if proj.bias is not None:
                        proj.bias.zero_()
                block.attn.mechanism.reset_parameters()
            if self.reweighting:
                self.reweight_weight.zero_()
                self.reweight_bias.zero_()
            if self.options.interpolation:
                self.interpolation.fill_(1.0)
            if self.options.random_iterations:
                self.sampled_iterations.fill_(self.options.iterations)

    # ------------------------------------------------------------------ metadata
    def prepare_context(self, ctx: AttentionContext) -> None:
        """`prefix_len` (B,) from the batch, checked, or from the first `<|endthought|>` of each row."""
        B, T = ctx.idx.shape
        first = 0 if ctx.input_pos is None else int(ctx.input_pos[0])
        given = ctx.metadata.get(PREFIX_LEN)
        if given is None:
            if first == 0:
                marks = ctx.idx == self.endthought_id
                ends = marks.int().argmax(dim=1) + 1
                ctx.metadata[PREFIX_LEN] = torch.where(marks.any(dim=1), ends, 0).long()
            else:  # decoding: the prefix, if any, is in the cache already
                ctx.metadata[PREFIX_LEN] = torch.zeros(B, dtype=torch.long, device=ctx.idx.device)
            return
        prefix_len = integer_metadata("hybrid", PREFIX_LEN, given, (B,), "one per row", ctx.idx.device)
        low, high = (int(v) for v in torch.stack([prefix_len.min(), prefix_len.max()])) if B else (0, 0)
        if low < 0:
            raise ValueError(f"hybrid: prefix_len must be >= 0, got {low}")
        if first == 0 and high > T:
            raise ValueError(f"hybrid: prefix_len {high} exceeds the {T} tokens of the sequence")
        if first > 0 and high > first:
            raise ValueError(
                f"hybrid: prefix_len {high} reaches past slot {first}, where this forward starts: process a prefix "
                "whole, in one forward from slot 0 (prefill the prompt at once)"
            )
        ctx.metadata[PREFIX_LEN] = prefix_len

    def _extent(self, ctx: AttentionContext) -> int:
        """Columns 0 .. L-1 of this forward hold every row's prefix (L = max prefix_len); 0 when no query of this
        forward is in a prefix (no prefix, or decoding after it): then attention is exactly causal."""

        def build() -> int:
            prefix_len = ctx.metadata.get(PREFIX_LEN)
            if prefix_len is None or prefix_len.numel() == 0:
                return 0
            if ctx.input_pos is not None and int(ctx.input_pos[0]) > 0:
                return 0
            return min(int(prefix_len.max()), ctx.positions.shape[-1])

        return ctx.memoize("hybrid.extent", build)

    # ------------------------------------------------------------------ mask and kernel
    def mask_mod(self, ctx: AttentionContext) -> masks.MaskMod | None:
        base = super().mask_mod(ctx)  # a sliding window, if the model config has one
        if self._extent(ctx) == 0:
            return base

        def build() -> masks.MaskMod:
            prefix_len, slots = ctx.metadata[PREFIX_LEN], ctx.slots
            visible = base or masks.causal(slots)

            def mask_mod(b, h, q_idx, kv_idx):
                p = prefix_len[b]
                return visible(b, h, q_idx, kv_idx) | ((kv_idx < p) & (slots[q_idx] < p))

            return mask_mod

        return ctx.memoize("hybrid.mask", build)

    def attend(self, q, k, v, ctx: AttentionContext) -> torch.Tensor:
        """On CPU: the first L query rows (every prefix) under the mask against the first L keys (all they may
        see), the rows after them on the fused causal kernel (past every prefix the mask is causal): the mask is
        L x L, never T x T. Elsewhere (CUDA: FlexAttention's block-sparse mask), observed, a sliding window, or
        queries not at slots 0 .. T-1: the base path under `mask_mod`."""
        L = self._extent(ctx)
        plain = L == 0 or ctx.observer is not None or not ctx.causal_aligned or super().mask_mod(ctx) is not None
        if plain or q.is_cuda or self.options.kernel == "flex":
            return super().attend(q, k, v, ctx)
        head = attend(q[:, :, :L], k[:, :, :L], v[:, :, :L], mask_mod=self.mask_mod(ctx), kernel="sdpa")
        if L == q.shape[2]:
            return head
        tail = attend(q, k, v, is_causal=True)[:, :, L:]  # the rows before L are recomputed above (L^2 / 2 extra)
        return torch.cat([head, tail], dim=2)

    # ------------------------------------------------------------------ the thought loop
    def run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """Iterations 1 .. n-1 of the thought blocks over the prefix columns (no cache), the last one over the
        whole sequence (with the cache), refinements on the prefix states after each, then the other blocks."""
        thought, rest = self._thought_and_rest(blocks)
        n = self.current_iterations()
        T = x.shape[1]
        L = self._extent(ctx)
        # With an observer every iteration runs over all T columns, so every block application has a T x T map.
        span = T if ctx.observer is not None else L
        z = None  # (B, span, C) the prefix states z_{t-1}, 0 outside each row's prefix
        if n > 1 and span > 0:
            sub = self._sub_context(ctx, span)
            inside = self._inside(ctx, span)
            x_sub = x[:, :span]
            z = torch.zeros_like(x_sub)
            no_grad = n - min(n, self.options.grad_iterations or n)  # iterations without activations kept
            for t in range(n - 1):
                with torch.no_grad() if t < no_grad else contextlib.nullcontext():
                    y = _apply(thought, z + x_sub, sub)
                    z = self._refine(y, z, inside, first=t == 0).masked_fill(~inside, 0.0)
        h = x if z is None else x + F.pad(z, (0, 0, 0, T - z.shape[1]))
        h = _apply(thought, h, ctx)  # the last iteration: every token once; the cache is written here
        if L > 0 and (self.reweighting or self.options.interpolation):
            inside = self._inside(ctx, L)
            prefix = h[:, :L]
            z_old = torch.zeros_like(prefix) if z is None else z[:, :L]
            refined = self._refine(prefix, z_old, inside, first=z is None)
            h = torch.cat([torch.where(inside, refined, prefix), h[:, L:]], dim=1)
        if L > 0 and self.options.refine_steps and not self.training:
            h = torch.cat([self._gradient_refine(rest, h[:, :L], ctx), h[:, L:]], dim=1)
        return _apply(rest, h, ctx)

    def _gradient_refine(self, rest: list[nn.Module], z: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """z (B, L, C) the refined prefix columns -> z after `refine_steps` normalised gradient steps on the
        next-token loss of the prefix tokens, scored causally (prefix_len 0) by the remaining blocks and the head
        over the prefix columns alone: no cache, no observer, and a row's result depends on its prefix only."""
        inside = self._inside(ctx, z.shape[1])  # (B, L, 1)
        targets = ctx.idx[:, 1 : z.shape[1]].masked_fill(~inside[:, 1:, 0], -100)  # a prefix token's successor
        score_ctx = dataclasses.replace(
            self._sub_context(ctx, z.shape[1]),
            metadata={**ctx.metadata, PREFIX_LEN: torch.zeros_like(ctx.metadata[PREFIX_LEN])},
            observer=None,
            applied_blocks=[],
        )
        z = z.detach()
        for _ in range(self.options.refine_steps):
            with torch.enable_grad():
                z.requires_grad_(True)
                logits = ctx.head(_apply(rest, z, score_ctx))[:, :-1]
                loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
                (grad,) = torch.autograd.grad(loss, z)
            z = z.detach()
            step = grad * (z.norm(dim=-1, keepdim=True) / grad.norm(dim=-1, keepdim=True).clamp(min=1e-12))
            z = torch.where(inside, z - self.options.refine_lr * step, z)
        return z

    @property
    def reweighting(self) -> str | None:
        """The re-weighting in use: "mean", "focus" or None (off); the option true reads as "mean"."""
        value = self.options.reweighting
        return "mean" if value is True else (value or None)

    def _thought_and_rest(self, blocks: nn.ModuleList) -> tuple[list[nn.Module], list[nn.Module]]:
        if self.options.add_thought_layers:
            return list(self.thought_blocks), list(blocks)
        k = self.options.thought_layers
        return list(blocks[:k]), list(blocks[k:])

    def current_iterations(self) -> int:
        """n, or in training with `random_iterations` the count drawn for this step."""
        if self.options.random_iterations and self.training:
            return int(self.sampled_iterations)
        return self.options.iterations

    def _refine(self, y: torch.Tensor, z_old: torch.Tensor, inside: torch.Tensor, first: bool) -> torch.Tensor:
        """y (B, S, C) the iteration's output, z_old the previous prefix states, inside (B, S, 1) the prefix."""
        if self.reweighting:
            u = F.normalize(y.float(), dim=-1) * inside  # unit prefix states; 0 outside the prefix
            if self.reweighting == "focus":
                last = (inside.sum(dim=1, keepdim=True) - 1).clamp(min=0)  # (B, 1, 1) the focus: the last state
                focus = u.gather(1, last.expand(-1, -1, u.shape[-1]))  # (B, 1, C)
                cos = (u * focus).sum(dim=-1, keepdim=True)  # (B, S, 1) cosine to the focus
            else:
                others = (u.sum(dim=1, keepdim=True) - u) * u  # u_i . sum_{j != i} u_j, per channel
                count = (inside.sum(dim=1, keepdim=True) - 1).clamp(min=1)  # (B, 1, 1) other prefix states
                cos = others.sum(dim=-1, keepdim=True) / count  # (B, S, 1) mean cosine to the other prefix states
            scale = 1.0 + torch.tanh(self.reweight_weight.float() * cos + self.reweight_bias.float())
            y = y * scale.to(y.dtype)
        if self.options.interpolation and not first:
            a = self.interpolation.to(y.dtype)
            y = a * y + (1 - a) * z_old
        return y

    @staticmethod
    def _inside(ctx: AttentionContext, span: int) -> torch.Tensor:
        """(B, span, 1) bool: column i of the row lies in the row's prefix."""
        prefix_len = ctx.metadata[PREFIX_LEN]
        return (torch.arange(span, device=prefix_len.device) < prefix_len[:, None]).unsqueeze(-1)

    @staticmethod
    def _sub_context(ctx: AttentionContext, span: int) -> AttentionContext:
        """The first `span` columns of ctx, without the KV cache (iterations before the last write none)."""
        if span == ctx.positions.shape[-1] and ctx.input_pos is None:
            return ctx
        return dataclasses.replace(
            ctx,
            positions=ctx.positions[..., :span],
            cos=None if ctx.cos is None else ctx.cos[..., :span, :],
            sin=None if ctx.sin is None else ctx.sin[..., :span, :],
            input_pos=None,
            kv_len=span,
            idx=None if ctx.idx is None else ctx.idx[:, :span],
        )

    def block_applications(self, n_layer: int) -> int:
        k, n = self.options.thought_layers, self.options.iterations
        return k * n + (n_layer if self.options.add_thought_layers else n_layer - k)

    def training_hooks(self) -> list:
        if self.block_idx == 0 and self.options.random_iterations:
            return [DrawIterations(self)]
        return []

    # ------------------------------------------------------------------ KV cache (the added blocks' too)
    def set_kv_cache(self, batch_size: int, max_seq_length: int, device=None, dtype=None) -> None:
        super().set_kv_cache(batch_size, max_seq_length, device=device, dtype=dtype)
        for block in getattr(self, "thought_blocks", ()):
            block.attn.mechanism.set_kv_cache(batch_size, max_seq_length, device=device, dtype=dtype)

    def clear_kv_cache(self) -> None:
        super().clear_kv_cache()
        for block in getattr(self, "thought_blocks", ()):
            block.attn.mechanism.clear_kv_cache()


def _apply(blocks: list[nn.Module], x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    for block in blocks:
        x = block(x, ctx)
    return x


def draw_iterations(seed: int, step: int, iterations: int) -> int:
    """The iteration count of optimizer step `step` (0-based) under `random_iterations`: uniform on
    1 .. iterations, from a generator seeded by (seed, step) alone."""
    digest = hashlib.sha256(f"litattn-hybrid-iterations:{seed}:{step}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return int(torch.randint(1, iterations + 1, (), generator=generator))


class DrawIterations(TrainingHook):
    """Sets the iteration count of the coming step (ctx.step steps are done) into the mechanism's buffer."""

    def __init__(self, mechanism: HybridAttention) -> None:
        self.mechanism = mechanism

    def on_epoch_start(self, ctx: HookContext) -> None:
        self._draw(ctx)

    def on_step_end(self, ctx: HookContext) -> None:
        self._draw(ctx)

    def _draw(self, ctx: HookContext) -> None:
        n = draw_iterations(ctx.seed, ctx.step, self.mechanism.options.iterations)
        self.mechanism.sampled_iterations.fill_(n)
