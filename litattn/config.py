"""Model configuration: one dataclass for every architecture, presets by name, YAML in and out.

The dataclass is the single source of defaults. A preset is a plain dict of overrides, so a
YAML file, a preset and a command line all speak the same language. Derived fields
(`head_size`, `padded_vocab_size`, `n_query_groups`, `intermediate_size`, `rope_n_elem`) are
filled in `__post_init__` unless given explicitly.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from litattn.attention.registry import AttentionSpec, merge_attention_specs
from litattn.typecheck import check_value, field_hints
from litattn.utils import atomic_write_text


@dataclass
class Config:
    name: str = ""
    """Preset name this config came from (informational)."""
    block_size: int = 1024
    """Context length the model is trained for (learned positions and RoPE table size)."""
    vocab_size: int = 50257
    """Number of token ids the tokenizer produces."""
    padded_vocab_size: int | None = None
    """Embedding rows; defaults to vocab_size rounded up to `padding_multiple`."""
    padding_multiple: int = 512
    n_layer: int = 12
    n_head: int = 12
    n_query_groups: int | None = None
    """Key/value heads: n_head for MHA, 1 for MQA, in between for GQA. Defaults to n_head."""
    n_embd: int = 768
    head_size: int | None = None
    """Defaults to n_embd // n_head."""
    positional_embedding: Literal["rope", "learned"] = "rope"
    """`learned` absolute positions (GPT-2) or rotary embeddings (Pythia, Llama, Mistral)."""
    rotary_percentage: float = 1.0
    """Fraction of each head's dimensions that RoPE rotates (Pythia: 0.25)."""
    rope_base: int | float = 10000
    """RoPE's theta (an int for every published preset; a converted model may have a fractional one)."""
    rope_adjustments: dict[str, int | float] | None = None
    """Llama-3 frequency scaling: factor, low_freq_factor, high_freq_factor, original_max_seq_len (an int)."""
    parallel_residual: bool = False
    """x + attn(norm_1(x)) + mlp(norm_2(x)) (GPT-NeoX) instead of the sequential residual."""
    shared_attention_norm: bool = False
    """With parallel_residual: feed norm_1's output to the MLP too (no norm_2)."""
    bias: bool = True
    """Bias in the linear layers (attention and MLP)."""
    lm_head_bias: bool = False
    norm_class_name: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    norm_eps: float = 1e-5
    mlp_class_name: Literal["GptNeoxMLP", "LLaMAMLP"] = "GptNeoxMLP"
    """GptNeoxMLP: fc -> GELU -> proj. LLaMAMLP: SwiGLU (fc_1, fc_2, proj)."""
    gelu_approximate: Literal["none", "tanh"] = "none"
    intermediate_size: int | None = None
    """MLP hidden width; defaults to 4 * n_embd."""
    sliding_window_size: int | None = None
    """If set, each query sees at most this many most recent keys (Mistral v0.1)."""
    tie_embeddings: bool = False
    """Share the token embedding matrix with the output head (GPT-2, Llama-3.2)."""
    attention: dict[str, Any] = field(default_factory=lambda: {"name": "causal"})
    """Attention mechanism: `{"name": <registered name>, <its options>...}`; see `litattn attention list`."""

    def __post_init__(self) -> None:
        self._check_values()
        if self.head_size is None:
            if self.n_embd % self.n_head:
                raise ValueError(
                    f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; set head_size explicitly"
                )
            self.head_size = self.n_embd // self.n_head
        if self.n_query_groups is None:
            self.n_query_groups = self.n_head
        if self.n_head % self.n_query_groups:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_query_groups={self.n_query_groups}")
        if self.padded_vocab_size is None:
            self.padded_vocab_size = _round_up(self.vocab_size, self.padding_multiple)
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(f"padded_vocab_size={self.padded_vocab_size} is smaller than vocab_size={self.vocab_size}")
        if self.intermediate_size is None:
            if self.mlp_class_name == "LLaMAMLP":
                raise ValueError("LLaMAMLP needs an explicit intermediate_size")
            self.intermediate_size = 4 * self.n_embd
        self._attention_spec = AttentionSpec.parse(self.attention)
        self.attention = self._attention_spec.to_dict()

    @property
    def attention_spec(self) -> AttentionSpec:
        """The attention spec, parsed once (parsed again only if `attention` was assigned since)."""
        if self.attention != self._attention_spec.to_dict():
            self._attention_spec = AttentionSpec.parse(self.attention)
        return self._attention_spec

    def _check_values(self) -> None:
        """Each field against its type hint (a command-line "2" becomes 2), then the ranges: one-line ValueErrors."""
        for key, hint in field_hints(type(self)).items():
            if key != "attention":  # a spec: the attention registry checks it, option by option
                setattr(self, key, check_value(getattr(self, key), hint, f"model config {key!r}"))
        for key in _POSITIVE:
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"model config {key!r} must be >= 1, got {value}")
        for key in ("norm_eps", "rope_base"):
            if not getattr(self, key) > 0:
                raise ValueError(f"model config {key!r} must be > 0, got {getattr(self, key)}")
        if not 0 < self.rotary_percentage <= 1:
            raise ValueError(f"model config 'rotary_percentage' must be in (0, 1], got {self.rotary_percentage}")

    @property
    def rope_n_elem(self) -> int:
        """Dimensions per head that RoPE rotates (0 with learned positions)."""
        if self.positional_embedding != "rope":
            return 0
        return int(self.rotary_percentage * self.head_size)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> Config:
        """A preset by name; `overrides` replace its fields and derived fields are recomputed."""
        if name not in PRESETS:
            raise ValueError(
                f"Unknown model preset {name!r}. Available: {', '.join(PRESETS)} (see `litattn model list`)"
            )
        values = {**PRESETS[name], **overrides}
        values.setdefault("name", name)
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown model config key(s) {unknown}. Valid keys: {', '.join(sorted(known))}")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> Config:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Model config {str(path)!r} not found")
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f)
        if not isinstance(values, dict):
            raise ValueError(f"{path} does not hold a YAML mapping of config keys")
        return cls.from_dict({**values, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write `model_config.yaml` (atomically: a reader never sees half a file)."""
        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))


# Fields that must be >= 1 when set (None: derived in __post_init__, or off for sliding_window_size).
_POSITIVE = (
    "block_size",
    "vocab_size",
    "padded_vocab_size",
    "padding_multiple",
    "n_layer",
    "n_head",
    "n_query_groups",
    "n_embd",
    "head_size",
    "intermediate_size",
    "sliding_window_size",
)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ---------------------------------------------------------------------------------- presets
# Each preset is the smallest dict of overrides that describes the published architecture.
_GPT2 = dict(
    block_size=1024,
    vocab_size=50257,
    padding_multiple=64,
    positional_embedding="learned",
    bias=True,
    norm_class_name="LayerNorm",
    mlp_class_name="GptNeoxMLP",
    gelu_approximate="tanh",
    tie_embeddings=True,
)
_PYTHIA = dict(
    block_size=2048,
    vocab_size=50254,
    padding_multiple=128,
    positional_embedding="rope",
    rotary_percentage=0.25,
    parallel_residual=True,
    bias=True,
    norm_class_name="LayerNorm",
    mlp_class_name="GptNeoxMLP",
)
_LLAMA = dict(
    positional_embedding="rope",
    bias=False,
    norm_class_name="RMSNorm",
    mlp_class_name="LLaMAMLP",
    parallel_residual=False,
)

PRESETS: dict[str, dict[str, Any]] = {
    # GPT-2 (OpenAI): learned absolute positions, tied embeddings.
    "gpt2": dict(_GPT2, n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(_GPT2, n_layer=24, n_head=16, n_embd=1024),
    # Pythia (EleutherAI, GPT-NeoX): parallel residual, 25% rotary.
    "pythia-14m": dict(_PYTHIA, block_size=512, n_layer=6, n_head=4, n_embd=128),
    "pythia-70m": dict(_PYTHIA, n_layer=6, n_head=8, n_embd=512),
    "pythia-160m": dict(_PYTHIA, n_layer=12, n_head=12, n_embd=768),
    # Llama family: RMSNorm, SwiGLU, no biases, GQA.
    "tinyllama-1.1b": dict(
        _LLAMA,
        block_size=2048,
        vocab_size=32000,
        padding_multiple=64,
        n_layer=22,
        n_head=32,
        n_query_groups=4,
        n_embd=2048,
        intermediate_size=5632,
        norm_eps=1e-5,
    ),
    "llama-3.2-1b": dict(
        _LLAMA,
        block_size=131072,
        vocab_size=128256,
        padded_vocab_size=128256,
        n_layer=16,
        n_head=32,
        n_query_groups=8,
        n_embd=2048,
        intermediate_size=8192,
        rope_base=500000,
        norm_eps=1e-5,
        tie_embeddings=True,
        rope_adjustments=dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192),
    ),
    # Mistral-7B-v0.1: Llama layout plus a 4096-token sliding window.
    "mistral-7b": dict(
        _LLAMA,
        block_size=4096,
        vocab_size=32000,
        padded_vocab_size=32000,
        n_layer=32,
        n_head=32,
        n_query_groups=8,
        n_embd=4096,
        intermediate_size=14336,
        norm_eps=1e-5,
        sliding_window_size=4096,
    ),
    # Tiny configs for tests and CPU runs: one per family, so every code path is exercised.
    "tiny-gpt2": dict(_GPT2, block_size=128, vocab_size=256, padding_multiple=64, n_layer=2, n_head=4, n_embd=32),
    "tiny-pythia": dict(_PYTHIA, block_size=128, vocab_size=256, padding_multiple=64, n_layer=2, n_head=4, n_embd=32),
    "tiny-llama": dict(
        _LLAMA,
        block_size=128,
        vocab_size=256,
        padding_multiple=64,
        n_layer=2,
        n_head=4,
        n_query_groups=2,
        n_embd=32,
        intermediate_size=88,
    ),
    # The CPU quickstart model (also the fixed config of scripts/bench_pretrain.py).
    "quickstart": dict(
        block_size=256,
        vocab_size=4096,
        padding_multiple=64,
        n_layer=4,
        n_head=4,
        n_embd=256,
        intermediate_size=1024,
        positional_embedding="rope",
        norm_class_name="LayerNorm",
        mlp_class_name="GptNeoxMLP",
        tie_embeddings=True,
        bias=True,
    ),
}


def resolve_model_config(
    model_name: str, overrides: dict[str, Any] | None = None, base: Config | None = None
) -> Config:
    """The config an entry point runs: `base` (e.g. a checkpoint's) or the preset, plus overrides.

    Overrides may use dotted keys (`attention.name`, as a command line gives them) and merge
    deeply (see `merge_overrides`): `{attention: {kernel: sdpa}}` updates the saved spec, while
    `{attention: {name: ssa}}` switches mechanism, keeping the options SSA also has (a warning names
    the ones it drops).
    """
    if base is None and model_name not in PRESETS:
        Config.from_name(model_name)  # raises the unknown-preset error
    if base is None:  # the default spec, so that `attention.kernel: sdpa` alone tunes it
        values = {"attention": {"name": "causal"}, **PRESETS[model_name], "name": model_name}
    else:
        values = base.to_dict()
    return Config.from_dict(merge_overrides(values, expand_overrides(overrides or {})))


def merge_overrides(*layers: dict[str, Any]) -> dict[str, Any]:
    """Deep merge, later layers win. An `attention` value at any depth is an attention spec and merges by
    the registry's rule (`merge_attention_specs`): naming another mechanism keeps the options it shares
    with the old one and drops, with a warning, the rest. Any other mapping merges key by key."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            current = out.get(key)
            if key == "attention" and key in out:
                out[key] = merge_attention_specs(current, value)
            elif isinstance(value, dict) and isinstance(current, dict):
                out[key] = merge_overrides(current, value)
            else:
                out[key] = copy.deepcopy(value)
    return out


OVERRIDE_KEY_SEPARATORS = (".", "/")
"""What nests a key of an override mapping: `attention.name` (YAML, Python) or `attention/name` (what
`litattn`'s command line turns `--model.attention.name` into: a key jsonargparse does not split)."""


def expand_overrides(values: dict[str, Any] | Iterable[tuple[str, Any]], spec: bool = False) -> dict[str, Any]:
    """Nest keys with a separator and merge them in order, deeply: `{"attention": {"name": "ssa", "beta_init":
    1.5}, "attention/beta_init": 2.0}` (a YAML mapping plus `--model.attention.beta_init 2.0`) becomes
    `{"attention": {"name": "ssa", "beta_init": 2.0}}`. Attention specs (`values` itself with `spec`) merge
    as in `merge_overrides`. `values` may be (key, value) pairs, where keys repeat; the empty key merges a
    mapping at the top."""
    out: dict[str, Any] = {}
    for key, value in values.items() if isinstance(values, dict) else values:
        path = [key]
        for sep in OVERRIDE_KEY_SEPARATORS if isinstance(key, str) else ():
            path = [part for p in path for part in p.split(sep) if part]
        if isinstance(value, dict):
            value = expand_overrides(value, spec or (bool(path) and path[-1] == "attention"))
        elif not path:
            raise ValueError(f"An override without a key must be a mapping, got {value!r}")
        for part in reversed(path):
            value = {part: value}
        out = merge_attention_specs(out, value) if spec else merge_overrides(out, value)
    return out
