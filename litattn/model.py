"""The GPT model: one definition for GPT-2, Pythia, Llama and Mistral style architectures.

State-dict names follow litgpt (`transformer.wte`, `transformer.h.{i}.norm_1`, `.attn.qkv`,
`.attn.proj`, `.mlp.*`, `transformer.ln_f`, `lm_head`) so litgpt checkpoints of the same
architecture load without renaming. The attention mechanism is looked up in the registry
from `config.attention`; this file never asks which one it is.

    idx (B, T) -> wte (+ wpe) -> n_layer x Block -> ln_f -> lm_head -> logits (B, T, padded_vocab)

    Block, sequential residual:          Block, parallel residual (GPT-NeoX):
      x = x + attn(norm_1(x))              x = x + attn(norm_1(x)) + mlp(norm_2(x))
      x = x + mlp(norm_2(x))               (shared_attention_norm: mlp(norm_1(x)))
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from litattn.attention import AttentionContext
from litattn.attention.observers import DenseMaps
from litattn.config import Config
from litattn.loss_head import fused_head_dtype, linear_cross_entropy


class GPT(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        spec = config.attention_spec  # parsed once, for every layer
        self.mechanism_cls, self.attention_options = spec.mechanism, spec.options
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=config.lm_head_bias)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                h=nn.ModuleList(
                    Block(config, i, self.mechanism_cls, self.attention_options) for i in range(config.n_layer)
                ),
                ln_f=make_norm(config),
            )
        )
        if config.positional_embedding == "learned":
            self.transformer["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.rope = RoPE(config) if config.rope_n_elem else None
        self.max_seq_length = self.mechanism_cls.max_seq_length(config, self.attention_options)
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    def reset_parameters(self) -> None:
        """GPT-NeoX / litgpt init: N(0, sqrt(2 / 5d)); residual projections N(0, 1 / sqrt(d) / n_layer)."""
        std = self.init_std
        proj_std = 1 / math.sqrt(self.config.n_embd) / self.config.n_layer
        for name, module in self.named_modules():
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.Linear):
                is_residual_out = name.endswith("attn.proj") or name.endswith("mlp.proj")
                nn.init.normal_(module.weight, mean=0.0, std=proj_std if is_residual_out else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                module.reset_parameters()
        for block in self.transformer.h:  # mechanisms initialise their own parameters last
            block.attn.mechanism.reset_parameters()
        if self.config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    @property
    def init_std(self) -> float:
        """Standard deviation of the embedding (and non-residual linear) init: sqrt(2 / 5d)."""
        return math.sqrt(2.0 / 5 / self.config.n_embd)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        idx: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
        **metadata: Any,
    ) -> torch.Tensor:
        """idx (B, T) -> logits (B, T, padded_vocab_size).

        input_pos (T,): the KV-cache slots of idx when decoding with the cache.
        positions (T,): RoPE / learned positions of idx when they differ from its slots (default: the slots,
            i.e. input_pos, or 0..T-1 without the cache).
        metadata: per-batch attention inputs the mechanism declares (`metadata_keys`); a mechanism may also
            derive them from idx itself (`prepare_context`).
        """
        return self.lm_head(self.hidden_states(idx, input_pos, positions=positions, **metadata))

    def hidden_states(
        self,
        idx: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
        **metadata: Any,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, n_embd): forward without the output head."""
        return self._hidden_states(self._context(idx, input_pos, positions, metadata))

    @torch.no_grad()
    def observe(self, idx: torch.Tensor, observer, **metadata: Any) -> torch.Tensor:
        """Forward with attention computed one query chunk at a time, each chunk's probabilities handed to
        `observer` (litattn.attention.observers); returns the hidden states. Memory O(chunk x T) per layer."""
        ctx = self._context(idx, None, None, metadata)
        ctx.observer = observer
        return self._hidden_states(ctx)

    @torch.no_grad()
    def attention_maps(self, idx: torch.Tensor, **metadata: Any) -> list[torch.Tensor]:
        """Attention probabilities of every block application, [(B, n_head, T, T)] * block_applications(),
        as the mechanism computes them (dense: for short inputs)."""
        maps = DenseMaps()
        self.observe(idx, maps, **metadata)
        return list(maps.maps.values())

    def _hidden_states(self, ctx: AttentionContext) -> torch.Tensor:
        x = self.transformer.wte(ctx.idx)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(ctx.positions)
        x = self.mechanism.run_blocks(self.transformer.h, x, ctx)
        return self.transformer.ln_f(x)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """The output of the last block (B, T, n_embd) -> logits (B, T, padded_vocab_size)."""
        return self.lm_head(self.transformer.ln_f(x))

    def loss(
        self, idx: torch.Tensor, targets: torch.Tensor, *, chunk_size: int | None = None, **metadata: Any
    ) -> torch.Tensor:
        """Mean next-token cross-entropy over targets != -100.

        With chunk_size, the head and the loss run over chunks of chunk_size tokens under
        activation checkpointing, so the (B, T, vocab) logits never exist at once.
        """
        h = self.hidden_states(idx, **metadata)
        fused, dtype = fused_head_dtype(h.device.type)
        if not chunk_size and type(self.lm_head) is nn.Linear and fused:
            # the head and the loss in one step: no (B, T, vocab) logits kept (litattn/loss_head.py)
            weight, bias = self.lm_head.weight, self.lm_head.bias
            return linear_cross_entropy(h.flatten(0, 1), weight, bias, targets.flatten(), compute_dtype=dtype)
        if not chunk_size:
            return F.cross_entropy(self.lm_head(h).flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        h, targets = h.flatten(0, 1), targets.flatten()
        total = sum(
            checkpoint(self._chunk_loss_sum, h_chunk, t_chunk, use_reentrant=False)
            for h_chunk, t_chunk in zip(h.split(chunk_size), targets.split(chunk_size), strict=True)
        )
        return total / (targets != -100).sum().clamp(min=1)

    def _chunk_loss_sum(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.lm_head(h).float(), targets, ignore_index=-100, reduction="sum")

    def _context(
        self, idx: torch.Tensor, input_pos: torch.Tensor | None, positions: torch.Tensor | None, metadata: dict
    ) -> AttentionContext:
        T = idx.shape[1]
        for name, given in (("input_pos", input_pos), ("positions", positions)):
            if given is not None and given.shape != (T,):
                raise ValueError(f"{name} must have shape ({T},) to match idx, got {tuple(given.shape)}")
        kv_len = T if input_pos is None else int(input_pos.max()) + 1
        reach = kv_len  # positions given apart from the slots cost one more device sync, the others none
        if positions is None:
            positions = input_pos if input_pos is not None else torch.arange(T, device=idx.device)
        elif T:
            reach = max(kv_len, int(positions.max()) + 1)
        if reach > self.max_seq_length:
            raise ValueError(
                f"Sequence reaches position {reach - 1} but the model handles at most {self.max_seq_length} tokens "
                f"(block_size {self.config.block_size}, attention {self.config.attention['name']!r})"
            )
        unknown = sorted(set(metadata) - set(self.mechanism.metadata_keys))
        if unknown:
            reads = ", ".join(self.mechanism.metadata_keys) or "none"
            raise ValueError(
                f"Attention {self.config.attention['name']!r} reads no metadata {unknown} (it reads: {reads})"
            )
        if self.training and torch.is_grad_enabled() and not self.mechanism.supports_training:
            raise RuntimeError(f"Attention {self.config.attention['name']!r} is inference-only; it cannot be trained")
        cos = sin = None
        if self.rope is not None:
            cos, sin = self.rope(positions)
        ctx = AttentionContext(
            positions=positions,
            cos=cos,
            sin=sin,
            rope=self.rope,
            input_pos=input_pos,
            kv_len=kv_len,
            metadata=dict(metadata),
            idx=idx,
            head=self._head,
        )
        self.mechanism.prepare_context(ctx)
        return ctx

    def allow_context(self, length: int) -> None:
        """Accept sequences of up to `length` tokens, beyond what the attention mechanism handles at block_size:
        RoPE positions then extrapolate past those seen in training (the baseline a context-extension method
        is measured against). Learned position embeddings end at block_size."""
        if length < 1:
            raise ValueError(f"context must be a positive number of tokens, got {length}")
        if self.config.positional_embedding == "learned" and length > self.config.block_size:
            raise ValueError(
                f"context {length} exceeds block_size {self.config.block_size}, the last learned position "
                f"embedding of {self.config.name!r}; only RoPE models extrapolate"
            )
        self.max_seq_length = length

    # ------------------------------------------------------------------ KV cache
    def set_kv_cache(self, batch_size: int, max_seq_length: int | None = None, device=None, dtype=None) -> None:
        """Allocate a KV cache in every layer for incremental decoding with forward(idx, input_pos)."""
        if not self.mechanism.supports_kv_cache:
            raise RuntimeError(f"Attention {self.config.attention['name']!r} does not support KV-cache decoding")
        max_seq_length = self.max_seq_length if max_seq_length is None else max_seq_length
        if max_seq_length > self.max_seq_length:
            raise ValueError(f"max_seq_length {max_seq_length} exceeds what the model handles ({self.max_seq_length})")
        ref = self.lm_head.weight
        device = ref.device if device is None else device
        dtype = ref.dtype if dtype is None else dtype
        for block in self.transformer.h:
            block.attn.mechanism.set_kv_cache(batch_size, max_seq_length, device=device, dtype=dtype)

    def clear_kv_cache(self) -> None:
        for block in self.transformer.h:
            block.attn.mechanism.clear_kv_cache()

    @property
    def mechanism(self):
        """The first layer's attention mechanism (all layers run the same one): what it supports."""
        return self.transformer.h[0].attn.mechanism

    # ------------------------------------------------------------------ summary
    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def mechanism_parameters(self) -> int:
        """Parameters the attention mechanism adds on top of the base architecture."""
        return sum(block.attn.mechanism.parameter_overhead() for block in self.transformer.h)

    def block_applications(self) -> int:
        """Block applications per forward (n_layer unless the mechanism's layer loop repeats blocks)."""
        return self.mechanism.block_applications(self.config.n_layer)

    @property
    def trailing_positions_independent(self) -> bool:
        """Whether dropping trailing padding columns of a batch leaves the loss unchanged (causal attention)."""
        return self.mechanism.trailing_positions_independent

    def training_hooks(self) -> list:
        """The mechanism's TrainingHooks (litattn.hooks), from every layer, for the training loops."""
        return [hook for block in self.transformer.h for hook in block.attn.mechanism.training_hooks()]


def is_mechanism_parameter(name: str) -> bool:
    """Whether a parameter (a `named_parameters()` or state-dict key) belongs to an attention mechanism
    (SSA's beta, ...) rather than to the base architecture: mechanisms live at `<block>.attn.mechanism`."""
    return ".attn.mechanism." in name


class Block(nn.Module):
    def __init__(self, config: Config, block_idx: int, mechanism_cls, options) -> None:
        super().__init__()
        self.block_idx = block_idx
        if not config.parallel_residual and config.shared_attention_norm:
            raise ValueError("shared_attention_norm=True requires parallel_residual=True")
        self.norm_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, block_idx, mechanism_cls, options)
        self.norm_2 = None if config.shared_attention_norm else make_norm(config)
        self.mlp = make_mlp(config)
        self.parallel_residual = config.parallel_residual

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        ctx.applied_blocks.append(self.block_idx)
        x_normed = self.norm_1(x)
        attn_out = self.attn(x_normed, ctx)
        if self.parallel_residual:
            mlp_in = x_normed if self.norm_2 is None else self.norm_2(x)
            return x + attn_out + self.mlp(mlp_in)
        x = x + attn_out
        return x + self.mlp(self.norm_2(x))


class CausalSelfAttention(nn.Module):
    """Projections around the registered mechanism: qkv -> mechanism(q, k, v before RoPE) -> proj.

    qkv weight rows are laid out [all query heads | all key heads | all value heads]:
        (n_head + 2 * n_query_groups) * head_size
    """

    def __init__(self, config: Config, block_idx: int, mechanism_cls, options) -> None:
        super().__init__()
        hs, nh, ng = config.head_size, config.n_head, config.n_query_groups
        self.qkv = nn.Linear(config.n_embd, (nh + 2 * ng) * hs, bias=config.bias)
        self.proj = nn.Linear(nh * hs, config.n_embd, bias=config.bias)
        self.mechanism = mechanism_cls(config, block_idx, options)
        self.mechanism.build_modules(lambda idx: Block(config, idx, mechanism_cls, options))
        self.n_head, self.n_query_groups, self.head_size = nh, ng, hs

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        B, T, _ = x.shape
        hs, nh, ng = self.head_size, self.n_head, self.n_query_groups
        q, k, v = self.qkv(x).split((nh * hs, ng * hs, ng * hs), dim=-1)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, ng, hs).transpose(1, 2)  # (B, ng, T, hs)
        v = v.view(B, T, ng, hs).transpose(1, 2)  # (B, ng, T, hs)
        y = self.mechanism(q, k, v, ctx)  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, nh * hs))


class GptNeoxMLP(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)
        self.approximate = config.gelu_approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate=self.approximate))


class LLaMAMLP(nn.Module):
    """SwiGLU: proj(silu(fc_1(x)) * fc_2(x))."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.fc_1 = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.fc_2 = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.silu(self.fc_1(x)) * self.fc_2(x))


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 (as Llama's reference does) and cast back."""

    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class RoPE(nn.Module):
    """Rotary tables computed for any positions (no fixed maximum): positions (..., T) -> cos, sin (..., T, n_elem)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        n_elem = config.rope_n_elem
        inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, n_elem, 2, dtype=torch.float32) / n_elem))
        if config.rope_adjustments:
            inv_freq = llama3_adjusted_frequencies(inv_freq, **config.rope_adjustments)
        # A plain attribute, not a buffer: model.to(bfloat16) must not round the frequencies.
        self.inv_freq = inv_freq

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq  # (..., T, n_elem/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def llama3_adjusted_frequencies(
    inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float, original_max_seq_len: int
) -> torch.Tensor:
    """Llama-3.1/3.2 RoPE scaling: slow down low frequencies by `factor`, keep high ones, blend between."""
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = original_max_seq_len / low_freq_factor
    high_freq_wavelen = original_max_seq_len / high_freq_factor
    smooth = (original_max_seq_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, blended)
    return torch.where(wavelen < high_freq_wavelen, inv_freq, out)


def make_norm(config: Config) -> nn.Module:
    if config.norm_class_name == "RMSNorm":
        return RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def make_mlp(config: Config) -> nn.Module:
    return {"GptNeoxMLP": GptNeoxMLP, "LLaMAMLP": LLaMAMLP}[config.mlp_class_name](config)
