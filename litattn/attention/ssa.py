"""Selective Self-Attention (SSA): per-query and per-value temperatures around any base mechanism.

Zhang et al., "Selective Attention: Enhancing Transformer through Principled Context Control",
NeurIPS 2024 (released code: umich-sota/selective_attention).

Plain attention scores every query with the same inverse temperature 1/sqrt(d). SSA gives each
query i (and each value j) its own temperature. With d = head_size, h the head, and u the head's
vector before RoPE:

    position term (the authors' released "PTS"; one learnable scalar beta per layer, shared by heads):
        tau_pos(i) = 1 + g * exp(-exp(beta)) * ln(n_i),   n_i = position(i) + 1
    token term (per head: learned vector w_h (d,) and scalar b_h; alpha = temperature_bound):
        tau_q(q_i) = 1 + alpha * tanh(w_h . q_i / sqrt(d) + b_h)
    value term (per KV head: learned vector w'_g (d,) and scalar b'_g):
        tau_v(v_j) = 1 + alpha * tanh(w'_g . v_j / sqrt(d) + b'_g)

    q_i <- q_i * tau_pos(i) * tau_q(q_i)          v_j <- v_j * tau_v(v_j)
    s_ij = tau_pos(i) * tau_q(q_i) * (q_i . k_j) / sqrt(d)     (RoPE on q and k as the base does)
    y_i  = sum_j softmax_j(s_ij) * tau_v(v_j) * v_j

Notes
- n_i is the absolute position + 1 (the number of keys query i sees under causal attention),
  taken from `ctx.positions`, so it is also right when decoding with the KV cache. (The released
  code uses the chunk length, so decoding one token gives ln(1) = 0 and the scaling vanishes.)
- tau_pos(i) * tau_q(q_i) is one scalar per (batch, head, query). RoPE is a rotation (linear in q),
  so scaling q before RoPE equals scaling it after: SSA scales q, hands q, k, v to the base
  mechanism and keeps its kernel (the fused SDPA `is_causal` path for `causal`).
- The value temperature is applied before the base mechanism, i.e. before the KV cache, so the
  cache holds scaled values and decoding equals the full forward.
- alpha in (0, 1) bounds the token temperatures to (1 - alpha, 1 + alpha): always positive.
- g (`position_gate`) is a learnable scalar per layer. It starts at 1 (the authors' formula) or
  at 0 with `identity_init` (then tau_pos = 1 exactly). Token and value terms start at w = 0,
  b = 0 (tau = 1 exactly) in both cases; their gradient there is alpha * u / sqrt(d), not zero.
  So with `identity_init` an SSA model computes exactly the base model's function, and a
  checkpoint without SSA loads into it unchanged (load_state_dict(strict=False)).
- beta starts at `beta_init`: 2.0 for finetuning (exp(-exp(2)) ~ 6.2e-4), 1.5 for pretraining
  (~ 0.0113; multiplier ~1.078 at n = 1024). The authors train beta with a much larger learning
  rate than the rest: `own_parameters()` lists SSA's parameters for such a param group.
- Parameters per layer: 2 + n_head * (d + 1) + n_query_groups * (d + 1) (~0.015% of GPT-2 small).

`base` names the mechanism SSA wraps (positions, mask, kernel, KV cache), so SSA composes with
any registered mask or position scheme (`litattn attention list`), e.g.

    attention: {name: ssa, base: {name: causal, kernel: sdpa}}
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from litattn.attention.base import AttentionContext, AttentionMechanism, AttentionOptions
from litattn.attention.registry import AttentionSpec, register_attention

if TYPE_CHECKING:
    from litattn.config import Config


@dataclass
class SSAOptions(AttentionOptions):
    position_temperature: bool = True
    """Query temperature from the position: 1 + g * exp(-exp(beta)) * ln(position + 1)."""
    token_temperature: bool = True
    """Query temperature from the query itself: 1 + alpha * tanh(w_h . q / sqrt(d) + b_h)."""
    value_temperature: bool = True
    """Value temperature from the value itself: 1 + alpha * tanh(w'_g . v / sqrt(d) + b'_g)."""
    beta_init: float = 2.0
    """Initial beta (2.0 for finetuning, 1.5 for pretraining recipes)."""
    temperature_bound: float = 0.5
    """alpha: token and value temperatures stay in (1 - alpha, 1 + alpha); 0 < alpha < 1."""
    identity_init: bool = False
    """Start as exactly the base model's function (position gate 0, token/value temperatures 1)."""
    base: dict[str, Any] | str = field(default_factory=lambda: {"name": "causal"})
    """The wrapped mechanism's spec (name + options; or just its name); stored fully normalized."""
    # `kernel` (inherited): when not `auto`, it is handed to the base, whose kernel it becomes.


@register_attention("ssa")
class SelectiveSelfAttention(AttentionMechanism):
    """Selective Self-Attention: position- and token-aware query temperatures, value temperatures (NeurIPS 2024)."""

    Options = SSAOptions

    def __init__(self, config: Config, block_idx: int, options: SSAOptions):
        super().__init__(config, block_idx, options)
        base = options.base_spec
        self.base = base.mechanism(config, block_idx, base.options)
        # Capabilities follow the base (the model asks the instance).
        self.supports_training = self.base.supports_training
        self.supports_kv_cache = self.base.supports_kv_cache
        self.metadata_keys = self.base.metadata_keys
        self.segment_key = self.base.segment_key
        self.trailing_positions_independent = self.base.trailing_positions_independent
        self.rethink_every = self.base.rethink_every
        hs, nh, ng = config.head_size, config.n_head, config.n_query_groups
        if options.position_temperature:
            self.beta = nn.Parameter(torch.empty(()))  # one scalar per layer, shared by heads
            self.position_gate = nn.Parameter(torch.empty(()))
        if options.token_temperature:
            self.query_weight = nn.Parameter(torch.empty(nh, hs))  # w_h
            self.query_bias = nn.Parameter(torch.empty(nh))  # b_h
        if options.value_temperature:
            self.value_weight = nn.Parameter(torch.empty(ng, hs))  # w'_g, one per KV head
            self.value_bias = nn.Parameter(torch.empty(ng))  # b'_g
        self.reset_parameters()

    # ------------------------------------------------------------------ declarations
    @classmethod
    def validate_options(cls, options: SSAOptions) -> None:
        super().validate_options(options)
        if not 0.0 < options.temperature_bound < 1.0:
            raise ValueError(f"ssa: temperature_bound must be in (0, 1), got {options.temperature_bound}")
        if not math.isfinite(options.beta_init):
            raise ValueError(f"ssa: beta_init must be finite, got {options.beta_init}")
        if isinstance(options.base, str):
            options.base = {"name": options.base}
        if not isinstance(options.base, dict):
            raise ValueError(f"ssa: base must be a mapping like {{'name': 'causal'}}, got {options.base!r}")
        base = {"name": "causal", **options.base}  # `base: {kernel: sdpa}` tunes the default base
        if options.kernel != "auto":  # hand SSA's kernel down to the mechanism that runs one
            base_kernel = base.get("kernel", "auto")
            if base_kernel not in ("auto", options.kernel):
                raise ValueError(
                    f"ssa: kernel {options.kernel!r} conflicts with the base's kernel {base_kernel!r}; set one of them"
                )
            base["kernel"] = options.kernel
        try:
            options.base_spec = AttentionSpec.parse(base)  # parsed once here, for every layer (not a field)
        except (ValueError, TypeError) as e:
            raise type(e)(f"ssa base: {e}") from None
        options.base = options.base_spec.to_dict()  # the full nested spec goes to model_config.yaml
        if issubclass(options.base_spec.mechanism, SelectiveSelfAttention):
            raise ValueError("ssa: the base must be another mechanism (SSA cannot wrap SSA)")

    @classmethod
    def max_seq_length(cls, config: Config, options: SSAOptions) -> int:
        return options.base_spec.mechanism.max_seq_length(config, options.base_spec.options)

    def reset_parameters(self) -> None:
        opts = self.options
        with torch.no_grad():
            if opts.position_temperature:
                self.beta.fill_(opts.beta_init)
                self.position_gate.fill_(0.0 if opts.identity_init else 1.0)
            if opts.token_temperature:
                self.query_weight.zero_()
                self.query_bias.zero_()
            if opts.value_temperature:
                self.value_weight.zero_()
                self.value_bias.zero_()
        self.base.reset_parameters()

    def own_parameters(self) -> Iterator[nn.Parameter]:
        """SSA's parameters, without the base mechanism's (e.g. for their own optimizer group)."""
        return self.parameters(recurse=False)

    def parameter_overhead(self) -> int:
        """SSA's own parameters plus whatever the base mechanism adds (0 for causal)."""
        return sum(p.numel() for p in self.own_parameters()) + self.base.parameter_overhead()

    # ------------------------------------------------------------------ the temperatures
    def position_factor(self, ctx: AttentionContext, dtype: torch.dtype) -> torch.Tensor:
        """tau_pos: (T, 1), or (B, 1, T, 1) for per-row positions; 1 + g * exp(-exp(beta)) * ln(pos + 1)."""
        pos = ctx.positions
        log_n = ctx.memoize("ssa_log_n", lambda: torch.log1p(pos.to(torch.float32)))  # ln(n_i), n_i = pos + 1
        coef = self.position_gate.float() * torch.exp(-torch.exp(self.beta.float()))
        factor = (1.0 + coef * log_n).to(dtype)
        return factor.unsqueeze(-1) if pos.dim() == 1 else factor[:, None, :, None]

    def token_factor(self, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """1 + alpha * tanh(w_h . u / sqrt(d) + b_h): u (B, H, T, d) -> (B, H, T, 1)."""
        logit = torch.einsum("bhtd,hd->bht", u, weight.to(u.dtype)) / math.sqrt(u.shape[-1])
        logit = logit + bias.to(u.dtype)[:, None]
        return (1.0 + self.options.temperature_bound * torch.tanh(logit)).unsqueeze(-1)

    def query_scale(self, q: torch.Tensor, ctx: AttentionContext) -> torch.Tensor | None:
        """The per-query multiplier (position factor x token factor): (T, 1) or (B, nh, T, 1); None when off."""
        opts = self.options
        scale = None
        if opts.position_temperature:
            scale = self.position_factor(ctx, q.dtype)
        if opts.token_temperature:
            tau_q = self.token_factor(q, self.query_weight, self.query_bias)  # from the unscaled query
            scale = tau_q if scale is None else scale * tau_q
        return scale

    def temperatures(self, q: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> dict[str, torch.Tensor]:
        """What `forward` multiplies queries and values by, for `litattn evaluate attention`: `query` (B, nh, T)
        and `value` (B, ng, T), each only when its temperature is on."""
        out = {}
        scale = self.query_scale(q, ctx)
        if scale is not None:
            out["query"] = scale.expand(*q.shape[:-1], 1)[..., 0]
        if self.options.value_temperature:
            out["value"] = self.token_factor(v, self.value_weight, self.value_bias)[..., 0]
        return out

    # ------------------------------------------------------------------ forward
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        # q (B, nh, T, hs), k and v (B, ng, T, hs), all before RoPE
        scale = self.query_scale(q, ctx)  # (T, 1) or (B, nh, T, 1)
        if scale is not None:
            q = q * scale
        if self.options.value_temperature:
            v = v * self.token_factor(v, self.value_weight, self.value_bias)  # before the KV cache
        return self.base(q, k, v, ctx)  # (B, nh, T, hs)

    # ------------------------------------------------------------------ model-level hooks (the base's)
    def prepare_context(self, ctx: AttentionContext) -> None:
        self.base.prepare_context(ctx)

    def run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        return self.base.run_blocks(blocks, x, ctx)

    def block_applications(self, n_layer: int) -> int:
        return self.base.block_applications(n_layer)

    def training_hooks(self) -> list:
        return self.base.training_hooks()

    # ------------------------------------------------------------------ KV cache (the base's)
    def set_kv_cache(self, batch_size: int, max_seq_length: int, device=None, dtype=None) -> None:
        self.base.set_kv_cache(batch_size, max_seq_length, device=device, dtype=dtype)

    def clear_kv_cache(self) -> None:
        self.base.clear_kv_cache()
