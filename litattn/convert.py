"""Hugging Face <-> litattn checkpoint conversion: GPT-2, GPT-NeoX (Pythia), Llama and Mistral.

    litattn convert from_hf --checkpoint_dir hf_dir --out_dir litattn_dir
    litattn convert to_hf   --checkpoint_dir litattn_dir --out_dir hf_dir

Weights are renamed tensor by tensor and reshaped where the layouts differ:

- litattn's fused `attn.qkv` rows are [all query heads | all key heads | all value heads].
  GPT-2's `c_attn` has that order but is a Conv1D, stored (in, out): it is transposed (as are
  GPT-2's other Conv1D weights). GPT-NeoX's `query_key_value` interleaves per head
  ([q_h, k_h, v_h] for every head h) and is de-interleaved. Llama and Mistral have separate
  q/k/v projections that are concatenated.
- RoPE needs no permutation: HF Llama/Mistral and GPT-NeoX rotate halves, as litattn does (HF's
  Llama checkpoints were permuted from Meta's interleaved layout when they were made).

Tensors are read one at a time (safetensors shard by shard; .bin files memory-mapped), so a
conversion holds one copy of the model, not two. Anything unexpected is an error, never a
silently different model: unknown tensor names, config options litattn does not implement,
architectures without an equivalent.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from litattn.args import start_work
from litattn.checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    atomic_directory,
    has_tokenizer,
    listed,
    load_state_dict,
    qkv_from_interleaved,
    save_checkpoint,
)
from litattn.config import Config
from litattn.model import GPT
from litattn.tokenizer import CONFIG_FILES, MODEL_FILES, Tokenizer

ARCHITECTURES = {
    "GPT2LMHeadModel": "gpt2",
    "GPTNeoXForCausalLM": "gpt_neox",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
}
"""Supported Hugging Face architectures and their `model_type`."""

HF_TOKENIZER_FILES = MODEL_FILES + CONFIG_FILES  # a Hugging Face tokenizer's files, copied beside converted weights

# ---------------------------------------------------------------------------------- names
# HF module -> litattn module ({} = layer index); `.weight` / `.bias` carry over unchanged.
# ":q", ":k", ":v" mark the part of litattn's fused qkv that a separate HF projection fills.
_GPT2_NAMES = {
    "transformer.wte": "transformer.wte",
    "transformer.wpe": "transformer.wpe",
    "transformer.h.{}.ln_1": "transformer.h.{}.norm_1",
    "transformer.h.{}.attn.c_attn": "transformer.h.{}.attn.qkv",
    "transformer.h.{}.attn.c_proj": "transformer.h.{}.attn.proj",
    "transformer.h.{}.ln_2": "transformer.h.{}.norm_2",
    "transformer.h.{}.mlp.c_fc": "transformer.h.{}.mlp.fc",
    "transformer.h.{}.mlp.c_proj": "transformer.h.{}.mlp.proj",
    "transformer.ln_f": "transformer.ln_f",
    "lm_head": "lm_head",
}
_NEOX_NAMES = {
    "gpt_neox.embed_in": "transformer.wte",
    "gpt_neox.layers.{}.input_layernorm": "transformer.h.{}.norm_1",
    "gpt_neox.layers.{}.attention.query_key_value": "transformer.h.{}.attn.qkv",
    "gpt_neox.layers.{}.attention.dense": "transformer.h.{}.attn.proj",
    "gpt_neox.layers.{}.post_attention_layernorm": "transformer.h.{}.norm_2",
    "gpt_neox.layers.{}.mlp.dense_h_to_4h": "transformer.h.{}.mlp.fc",
    "gpt_neox.layers.{}.mlp.dense_4h_to_h": "transformer.h.{}.mlp.proj",
    "gpt_neox.final_layer_norm": "transformer.ln_f",
    "embed_out": "lm_head",
}
_LLAMA_NAMES = {
    "model.embed_tokens": "transformer.wte",
    "model.layers.{}.input_layernorm": "transformer.h.{}.norm_1",
    "model.layers.{}.self_attn.q_proj": "transformer.h.{}.attn.qkv:q",
    "model.layers.{}.self_attn.k_proj": "transformer.h.{}.attn.qkv:k",
    "model.layers.{}.self_attn.v_proj": "transformer.h.{}.attn.qkv:v",
    "model.layers.{}.self_attn.o_proj": "transformer.h.{}.attn.proj",
    "model.layers.{}.post_attention_layernorm": "transformer.h.{}.norm_2",
    "model.layers.{}.mlp.gate_proj": "transformer.h.{}.mlp.fc_1",
    "model.layers.{}.mlp.up_proj": "transformer.h.{}.mlp.fc_2",
    "model.layers.{}.mlp.down_proj": "transformer.h.{}.mlp.proj",
    "model.norm": "transformer.ln_f",
    "lm_head": "lm_head",
}
_NAMES = {"gpt2": _GPT2_NAMES, "gpt_neox": _NEOX_NAMES, "llama": _LLAMA_NAMES, "mistral": _LLAMA_NAMES}

# Buffers some checkpoints carry (causal masks, RoPE frequencies): recomputed, never weights.
_BUFFERS = {
    "gpt2": r"transformer\.h\.\d+\.attn\.(bias|masked_bias)",
    "gpt_neox": r"gpt_neox\.(layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)|rotary_emb\.inv_freq)",
    "llama": r"model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq",
}
_BUFFERS["mistral"] = _BUFFERS["llama"]
# GPT-2's Conv1D weights, stored (in, out): transposed both ways.
_GPT2_CONV1D = ("attn.qkv.weight", "attn.proj.weight", "mlp.fc.weight", "mlp.proj.weight")


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{\}", r"(\d+)") + r"\.(weight|bias)")


_FROM_HF = {family: [(_pattern(hf), lit) for hf, lit in names.items()] for family, names in _NAMES.items()}


def _normalize(family: str, hf_key: str) -> str:
    """The HF key as save_pretrained writes it, for the other spellings found in the wild."""
    if family == "gpt2" and not hf_key.startswith(("transformer.", "lm_head.")):
        return "transformer." + hf_key  # OpenAI's original GPT-2 files lack the prefix
    if family == "gpt_neox" and hf_key.startswith("lm_head."):
        return "embed_out." + hf_key.removeprefix("lm_head.")  # transformers 5's in-memory name of the head
    return hf_key


def _lit_name(family: str, hf_key: str) -> tuple[str, str | None] | None:
    """The litattn key and qkv part (q, k, v or None) of a normalized HF key; None if the key is unknown."""
    for pattern, lit in _FROM_HF[family]:
        if m := pattern.fullmatch(hf_key):
            *layer, suffix = m.groups()
            module, _, part = lit.partition(":")
            return f"{module.format(*layer)}.{suffix}", part or None
    return None


# ---------------------------------------------------------------------------------- reading HF
class HFWeights:
    """The tensors of an HF checkpoint directory, read lazily one file (shard) at a time.

    Reads `model.safetensors`, sharded `model-*.safetensors` + `model.safetensors.index.json`,
    `pytorch_model.bin` or its sharded form; .bin files are loaded with weights_only=True (and
    memory-mapped), so no pickled code runs.
    """

    def __init__(self, checkpoint_dir: Path) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self.files = self._find_files()

    def _find_files(self) -> list[Path]:
        d = self.checkpoint_dir
        for single, index in (
            ("model.safetensors", "model.safetensors.index.json"),
            ("pytorch_model.bin", "pytorch_model.bin.index.json"),
        ):
            if (d / single).is_file():
                return [d / single]
            if (d / index).is_file():
                weight_map = json.loads((d / index).read_text(encoding="utf-8"))["weight_map"]
                files = [d / name for name in dict.fromkeys(weight_map.values())]
                absent = [f.name for f in files if not f.is_file()]
                if absent:
                    raise FileNotFoundError(f"{d / index} lists shards that are not in {d}: {', '.join(absent)}")
                return files
        raise FileNotFoundError(
            f"No weights in {str(d)!r}: expected model.safetensors, model.safetensors.index.json (sharded), "
            "pytorch_model.bin or pytorch_model.bin.index.json"
        )

    def keys(self) -> list[str]:
        out = []
        for path in self.files:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as f:
                    out.extend(f.keys())
            else:
                out.extend(self._load_bin(path))
        return out

    def items(self) -> Iterator[tuple[str, Tensor]]:
        for path in self.files:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                        yield key, f.get_tensor(key)
            else:
                yield from self._load_bin(path).items()

    @staticmethod
    def _load_bin(path: Path) -> dict[str, Tensor]:
        try:  # mmap: tensors are read from disk when used, not all at once
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # legacy (non-zip) format cannot be mapped; load_state_dict explains other failures
            state = load_state_dict(path)
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise ValueError(f"{path} is not a plain state dict of tensors")
        return state


# ---------------------------------------------------------------------------------- HF config -> Config
def read_hf_config(checkpoint_dir: Path) -> tuple[str, dict[str, Any]]:
    """The family (`gpt2`, `gpt_neox`, `llama`, `mistral`) and the raw values of `config.json`."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a Hugging Face checkpoint directory needs its config.json")
    hf = json.loads(path.read_text(encoding="utf-8"))
    supported = ", ".join(f"{a} ({t})" for a, t in ARCHITECTURES.items())
    architectures = hf.get("architectures") or []
    for arch in architectures:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch], hf
    if not architectures and hf.get("model_type") in ARCHITECTURES.values():
        return hf["model_type"], hf
    name = ", ".join(architectures) or hf.get("model_type") or "(none given)"
    raise ValueError(f"Unsupported architecture {name} in {path}; supported: {supported}")


def config_from_hf(family: str, hf: dict[str, Any], name: str = "", vocab_size: int | None = None) -> Config:
    """litattn Config of an HF config.json (HF's defaults where a key is absent).

    padded_vocab_size is HF's vocab_size (the embedding rows); vocab_size is the tokenizer's size when
    given (Pythia pads 50277 tokens to 50304 rows), so generation never samples a padding row.
    """
    unsupported: list[str] = []
    if family == "gpt2":
        values = _gpt2_config(hf, unsupported)
    elif family == "gpt_neox":
        values = _neox_config(hf, unsupported)
    else:
        values = _llama_config(family, hf, unsupported)
    if unsupported:
        raise ValueError(f"This {family} model uses options litattn does not implement: {', '.join(unsupported)}")
    rows = values["padded_vocab_size"]
    values["vocab_size"] = min(vocab_size, rows) if vocab_size else rows
    return Config(name=name, **values)


def _gpt2_config(hf: dict[str, Any], unsupported: list[str]) -> dict[str, Any]:
    act = hf.get("activation_function", "gelu_new")
    if act not in _GELU:
        unsupported.append(f"activation_function={act!r}")
    for key, default in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
        if hf.get(key, default) != default:
            unsupported.append(f"{key}={hf[key]!r}")
    if hf.get("add_cross_attention"):
        unsupported.append("add_cross_attention=True")
    n_embd = hf.get("n_embd", 768)
    return dict(
        block_size=hf.get("n_positions", 1024),
        padded_vocab_size=hf.get("vocab_size", 50257),
        n_layer=hf.get("n_layer", 12),
        n_head=hf.get("n_head", 12),
        n_embd=n_embd,
        intermediate_size=hf.get("n_inner") or 4 * n_embd,
        positional_embedding="learned",
        bias=True,
        norm_class_name="LayerNorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        mlp_class_name="GptNeoxMLP",
        gelu_approximate=_GELU.get(act, "none"),
        tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def _neox_config(hf: dict[str, Any], unsupported: list[str]) -> dict[str, Any]:
    act = hf.get("hidden_act", "gelu")
    if act not in _GELU:
        unsupported.append(f"hidden_act={act!r}")
    if not hf.get("attention_bias", True):
        unsupported.append("attention_bias=False (litattn's `bias` covers attention, MLP and norms together)")
    base, adjustments, partial = _rope(hf, unsupported, default_partial=0.25)
    return dict(
        block_size=hf.get("max_position_embeddings", 2048),
        padded_vocab_size=hf.get("vocab_size", 50432),
        n_layer=hf.get("num_hidden_layers", 44),
        n_head=hf.get("num_attention_heads", 64),
        n_embd=hf.get("hidden_size", 6144),
        intermediate_size=hf.get("intermediate_size", 24576),
        positional_embedding="rope",
        rotary_percentage=partial,
        rope_base=base,
        rope_adjustments=adjustments,
        parallel_residual=hf.get("use_parallel_residual", True),
        bias=True,
        norm_class_name="LayerNorm",
        norm_eps=hf.get("layer_norm_eps", 1e-5),
        mlp_class_name="GptNeoxMLP",
        gelu_approximate=_GELU.get(act, "none"),
        tie_embeddings=hf.get("tie_word_embeddings", False),
    )


def _llama_config(family: str, hf: dict[str, Any], unsupported: list[str]) -> dict[str, Any]:
    mistral = family == "mistral"
    if hf.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={hf['hidden_act']!r}")
    attention_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
    if attention_bias != mlp_bias:
        unsupported.append(
            f"attention_bias={attention_bias} with mlp_bias={mlp_bias} (litattn's `bias` covers both together)"
        )
    base, adjustments, partial = _rope(hf, unsupported, default_partial=1.0)
    if partial != 1.0:
        unsupported.append(f"partial_rotary_factor={partial}")
    n_head, n_embd = hf.get("num_attention_heads", 32), hf.get("hidden_size", 4096)
    return dict(
        block_size=hf.get("max_position_embeddings", 4096 * 32 if mistral else 2048),
        padded_vocab_size=hf.get("vocab_size", 32000),
        n_layer=hf.get("num_hidden_layers", 32),
        n_head=n_head,
        n_query_groups=hf.get("num_key_value_heads") or (8 if mistral else n_head),
        n_embd=n_embd,
        head_size=hf.get("head_dim") or n_embd // n_head,
        intermediate_size=hf.get("intermediate_size", 14336 if mistral else 11008),
        positional_embedding="rope",
        rope_base=base,
        rope_adjustments=adjustments,
        bias=bool(attention_bias),
        norm_class_name="RMSNorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        mlp_class_name="LLaMAMLP",
        tie_embeddings=hf.get("tie_word_embeddings", False),
        sliding_window_size=hf.get("sliding_window", 4096) if mistral else None,
    )


# HF activation names -> litattn gelu_approximate (gelu_new is GPT-2's tanh formula).
_GELU = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}
_LLAMA3_KEYS = {
    "factor": "factor",
    "low_freq_factor": "low_freq_factor",
    "high_freq_factor": "high_freq_factor",
    "original_max_position_embeddings": "original_max_seq_len",
}


def _rope(hf: dict[str, Any], unsupported: list[str], default_partial: float) -> tuple[Any, Any, float]:
    """RoPE base, Llama-3 adjustments and rotary fraction from either config.json format.

    transformers < 5 writes rope_theta / rope_scaling (GPT-NeoX: rotary_emb_base / rotary_pct);
    transformers 5 writes one `rope_parameters` dict.
    """
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    base = params.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000)))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct")))
    partial = default_partial if partial is None else float(partial)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    adjustments = None
    if kind == "llama3":
        adjustments = {lit: scaling[key] for key, lit in _LLAMA3_KEYS.items()}
    elif kind not in (None, "default"):
        unsupported.append(f"rope scaling {kind!r} (litattn implements llama3 only)")
    base = int(base) if float(base).is_integer() else float(base)
    return base, adjustments, partial


# ---------------------------------------------------------------------------------- from_hf
def from_hf(checkpoint_dir: Path, out_dir: Path, dtype: str | None = None) -> Path:
    """Convert a Hugging Face checkpoint directory into a litattn checkpoint directory; returns out_dir.

    dtype (e.g. "bfloat16") casts the floating-point weights; None keeps the dtype they were saved in.
    """
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    _check_distinct(checkpoint_dir, out_dir)
    torch_dtype = _parse_dtype(dtype)
    family, hf = read_hf_config(checkpoint_dir)
    tokenizer = None
    if has_tokenizer(checkpoint_dir):
        tokenizer = Tokenizer(checkpoint_dir)
    else:
        warnings.warn(
            f"{checkpoint_dir} has no tokenizer.json or tokenizer.model: the converted checkpoint has no tokenizer",
            stacklevel=2,
        )
    name = checkpoint_dir.resolve().name
    config = config_from_hf(family, hf, name=name, vocab_size=tokenizer.vocab_size if tokenizer else None)
    if tokenizer is not None:
        tokenizer.check_fits(config.padded_vocab_size)

    weights = HFWeights(checkpoint_dir)
    keys = [_normalize(family, k) for k in weights.keys()]
    buffers = re.compile(_BUFFERS[family])
    unknown = [k for k in keys if not buffers.fullmatch(k) and _lit_name(family, k) is None]
    if unknown:
        raise ValueError(f"Unknown tensor names for {family} in {checkpoint_dir}: {listed(unknown)}")

    state: dict[str, Tensor] = {}
    pending: dict[str, dict[str, Tensor]] = {}  # qkv parts waiting for their siblings (maybe in another shard)
    for key, t in tqdm(weights.items(), total=len(keys), desc=f"Converting {family}", unit="tensor"):
        key = _normalize(family, key)
        if buffers.fullmatch(key):
            continue
        lit, part = _lit_name(family, key)
        if torch_dtype is not None and t.is_floating_point():
            t = t.to(torch_dtype)
        if part is not None:
            parts = pending.setdefault(lit, {})
            parts[part] = t
            if len(parts) == 3:
                state[lit] = torch.cat([parts[p] for p in "qkv"])
                del pending[lit]
        else:
            state[lit] = _tensor_from_hf(family, lit, t, config)
    if pending:
        raise ValueError(f"{checkpoint_dir} lacks some q/k/v projections of {listed(sorted(pending))}")
    if config.tie_embeddings:  # HF ties the head to the embedding, whatever a stored head holds
        state["lm_head.weight"] = state["transformer.wte.weight"]
    _check_state(state, config, checkpoint_dir)
    hparams = {"converted_from": str(checkpoint_dir), "architecture": family, "dtype": dtype}
    return save_checkpoint(out_dir, state, config, tokenizer=tokenizer, hyperparameters=hparams)


def _tensor_from_hf(family: str, lit: str, t: Tensor, config: Config) -> Tensor:
    if family == "gpt2" and lit.endswith(_GPT2_CONV1D):
        return t.t().contiguous()
    if family == "gpt_neox" and ".attn.qkv." in lit:  # [q_h, k_h, v_h] per head -> [all q | all k | all v]
        return qkv_from_interleaved(t, config)  # NeoX: one query per group (n_query_groups == n_head)
    return t


def _check_state(state: dict[str, Tensor], config: Config, source: Path) -> None:
    """Every parameter the litattn model has, with its shape: a config/weights mismatch fails here, not later."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in GPT(config).state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match its config.json: missing {listed(missing)}, unexpected {listed(unexpected)}"
        )
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(s)}" for k, s in expected.items() if state[k].shape != s]
    if wrong:
        raise ValueError(f"{source} does not match its config.json: shapes (weights vs config) {listed(wrong)}")


# ---------------------------------------------------------------------------------- Config -> HF
def hf_family(config: Config) -> str:
    """The HF architecture that computes exactly what `config` does, or a ValueError saying why none does."""
    name = config.attention.get("name")
    if name != "causal":
        raise ValueError(
            f"Attention {name!r} has no Hugging Face equivalent: only models with `causal` attention convert "
            "to transformers (convert the base model, or set attention back to causal)"
        )
    c = config
    if c.lm_head_bias:
        raise ValueError("lm_head_bias=True has no Hugging Face equivalent among GPT-2, GPT-NeoX, Llama, Mistral")
    if c.norm_class_name == "LayerNorm" and c.mlp_class_name == "GptNeoxMLP":
        why = []
        if not c.bias:
            why.append("bias=False (their linear layers and LayerNorms always have biases)")
        if c.n_query_groups != c.n_head:
            why.append(f"n_query_groups={c.n_query_groups} != n_head (no grouped-query attention)")
        if c.head_size * c.n_head != c.n_embd:
            why.append(f"head_size={c.head_size} != n_embd / n_head")
        if c.sliding_window_size is not None:
            why.append("a sliding window")
        if c.positional_embedding == "learned":
            if c.parallel_residual:
                why.append("parallel_residual with learned positions")
            family = "gpt2"
        else:
            family = "gpt_neox"
        if why:
            raise ValueError(f"This model has no Hugging Face equivalent ({family}): {'; '.join(why)}")
        return family
    if c.norm_class_name == "RMSNorm" and c.mlp_class_name == "LLaMAMLP":
        why = []
        if c.positional_embedding != "rope" or c.rotary_percentage != 1.0:
            why.append("Llama/Mistral rotate every dimension with RoPE (rotary_percentage=1.0, no learned positions)")
        if c.parallel_residual:
            why.append("parallel_residual")
        if c.sliding_window_size is not None and c.bias:
            why.append("bias=True with a sliding window (Mistral has no biases)")
        if why:
            raise ValueError(f"This model has no Hugging Face equivalent (llama/mistral): {'; '.join(why)}")
        return "mistral" if c.sliding_window_size is not None else "llama"
    raise ValueError(
        f"norm_class_name={c.norm_class_name!r} with mlp_class_name={c.mlp_class_name!r} has no Hugging Face "
        "equivalent (GPT-2 / GPT-NeoX: LayerNorm + GptNeoxMLP; Llama / Mistral: RMSNorm + LLaMAMLP)"
    )


def hf_config(config: Config, family: str) -> dict[str, Any]:
    """config.json values for `family`, written in the keys both transformers 4.x and 5.x read."""
    c = config
    arch = next(a for a, t in ARCHITECTURES.items() if t == family)
    out: dict[str, Any] = {"architectures": [arch], "model_type": family, "vocab_size": c.padded_vocab_size}
    rope: dict[str, Any] = {}
    if c.rope_adjustments:
        adj = c.rope_adjustments
        rope["rope_scaling"] = {"rope_type": "llama3", **{k: adj[lit] for k, lit in _LLAMA3_KEYS.items()}}
    if family == "gpt2":
        out.update(
            n_positions=c.block_size,
            n_embd=c.n_embd,
            n_layer=c.n_layer,
            n_head=c.n_head,
            n_inner=c.intermediate_size,
            activation_function="gelu_new" if c.gelu_approximate == "tanh" else "gelu",
            layer_norm_epsilon=c.norm_eps,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    elif family == "gpt_neox":
        out.update(
            hidden_size=c.n_embd,
            num_hidden_layers=c.n_layer,
            num_attention_heads=c.n_head,
            intermediate_size=c.intermediate_size,
            hidden_act="gelu_pytorch_tanh" if c.gelu_approximate == "tanh" else "gelu",
            rotary_pct=c.rotary_percentage,
            rotary_emb_base=c.rope_base,
            max_position_embeddings=c.block_size,
            layer_norm_eps=c.norm_eps,
            use_parallel_residual=c.parallel_residual,
            attention_bias=True,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            **rope,
        )
    else:
        out.update(
            hidden_size=c.n_embd,
            intermediate_size=c.intermediate_size,
            num_hidden_layers=c.n_layer,
            num_attention_heads=c.n_head,
            num_key_value_heads=c.n_query_groups,
            head_dim=c.head_size,
            hidden_act="silu",
            max_position_embeddings=c.block_size,
            rms_norm_eps=c.norm_eps,
            rope_theta=c.rope_base,
            attention_dropout=0.0,
            **rope,
        )
        if family == "llama":
            out.update(attention_bias=c.bias, mlp_bias=c.bias)
        else:
            out.update(sliding_window=c.sliding_window_size)
    out["tie_word_embeddings"] = c.tie_embeddings
    return out


def _hf_names(family: str, lit_key: str, config: Config) -> list[tuple[str, str | None]]:
    """HF keys (with the qkv part each takes, or None) that a litattn key becomes."""
    module, _, suffix = lit_key.rpartition(".")
    layer = re.search(r"\.h\.(\d+)\.", module)
    template = module.replace(f".h.{layer.group(1)}.", ".h.{}.") if layer else module
    out = []
    for hf, lit in _NAMES[family].items():
        lit_module, _, part = lit.partition(":")
        if lit_module == template:
            out.append((f"{hf.format(*([layer.group(1)] if layer else []))}.{suffix}", part or None))
    if family == "gpt_neox" and config.shared_attention_norm and template == "transformer.h.{}.norm_1":
        out.append((out[0][0].replace("input_layernorm", "post_attention_layernorm"), None))  # MLP reads norm_1
    return out


def _tensors_to_hf(family: str, lit_key: str, t: Tensor, config: Config) -> list[tuple[str, Tensor]]:
    names = _hf_names(family, lit_key, config)
    if not names:
        raise ValueError(f"Tensor {lit_key!r} has no {family} equivalent")
    if names[0][1] is not None:  # Llama / Mistral: split the fused qkv
        hs, nh, ng = config.head_size, config.n_head, config.n_query_groups
        parts = dict(zip("qkv", t.split((nh * hs, ng * hs, ng * hs)), strict=True))
        return [(hf, parts[part].clone()) for hf, part in names]
    if family == "gpt2" and lit_key.endswith(_GPT2_CONV1D):
        t = t.t().contiguous()
    elif family == "gpt_neox" and ".attn.qkv." in lit_key:  # [all q | all k | all v] -> [q_h, k_h, v_h] per head
        t = t.reshape(3, config.n_head, config.head_size, *t.shape[1:])
        t = t.transpose(0, 1).reshape(3 * config.n_head * config.head_size, *t.shape[3:])
    return [(hf, t if i == 0 else t.clone()) for i, (hf, _) in enumerate(names)]


# ---------------------------------------------------------------------------------- to_hf
def to_hf(checkpoint_dir: Path, out_dir: Path, max_shard_size: int | str = "5GB") -> Path:
    """Convert a litattn checkpoint directory into one `transformers.AutoModelForCausalLM` loads; returns out_dir.

    Writes config.json, model.safetensors (or shards of at most max_shard_size plus an index, as
    save_pretrained does) and the tokenizer files, into a temp dir that is renamed into place.
    """
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    _check_distinct(checkpoint_dir, out_dir)
    config_path = checkpoint_dir / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: pass a litattn checkpoint directory")
    config = Config.from_file(config_path)
    family = hf_family(config)
    values = hf_config(config, family)
    values.update(_token_ids(checkpoint_dir))

    with atomic_directory(out_dir) as tmp:
        writer = _ShardWriter(tmp, _parse_size(max_shard_size))
        dtypes: dict[torch.dtype, int] = {}
        tensors, n = _lit_tensors(checkpoint_dir)
        for key, t in tqdm(tensors, total=n, desc=f"Converting to {family}", unit="tensor"):
            if key == "lm_head.weight" and config.tie_embeddings:
                continue  # tied: transformers re-ties the head to the embedding
            for hf_key, hf_t in _tensors_to_hf(family, key, t, config):
                writer.add(hf_key, hf_t)
            dtypes[t.dtype] = dtypes.get(t.dtype, 0) + t.numel()
        writer.close()
        values["torch_dtype"] = str(max(dtypes, key=dtypes.get)).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(values, indent=2) + "\n", encoding="utf-8")
        for name in HF_TOKENIZER_FILES:
            if (checkpoint_dir / name).is_file():
                shutil.copyfile(checkpoint_dir / name, tmp / name)
    return out_dir


def _lit_tensors(checkpoint_dir: Path) -> tuple[Iterator[tuple[str, Tensor]], int]:
    """(key, tensor) pairs of model.safetensors read one at a time, and their number (aliases are not stored)."""
    path = checkpoint_dir / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass a litattn checkpoint directory (model.safetensors)")
    with safe_open(str(path), framework="pt") as f:
        n = len(f.keys())

    def items() -> Iterator[tuple[str, Tensor]]:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield key, f.get_tensor(key)

    return items(), n


def _token_ids(checkpoint_dir: Path) -> dict[str, int]:
    """bos/eos ids for config.json from the checkpoint's tokenizer (none if it has no tokenizer)."""
    if not has_tokenizer(checkpoint_dir):
        return {}

    tokenizer = Tokenizer(checkpoint_dir)
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    return {k: v for k, v in ids.items() if v is not None}


class _ShardWriter:
    """Collects tensors into safetensors files of at most `limit` bytes: only one shard is in memory at a time."""

    def __init__(self, directory: Path, limit: int) -> None:
        self.directory, self.limit = directory, limit
        self.current: dict[str, Tensor] = {}
        self.size = self.total = 0
        self.shards: list[tuple[Path, list[str]]] = []

    def add(self, key: str, t: Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.current and self.size + nbytes > self.limit:
            self._flush()
        self.current[key] = t.contiguous()
        self.size += nbytes

    def _flush(self) -> None:
        path = self.directory / f"shard-{len(self.shards)}.tmp"
        save_file(self.current, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.current)))
        self.total += self.size
        self.current, self.size = {}, 0

    def close(self) -> None:
        if self.current or not self.shards:
            self._flush()
        if len(self.shards) == 1:
            self.shards[0][0].rename(self.directory / "model.safetensors")
            return
        weight_map = {}
        for i, (path, keys) in enumerate(self.shards):
            name = f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors"
            path.rename(self.directory / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ---------------------------------------------------------------------------------- helpers
def _check_distinct(checkpoint_dir: Path, out_dir: Path) -> None:
    if out_dir.resolve() == checkpoint_dir.resolve():
        raise ValueError(f"out_dir must differ from checkpoint_dir ({checkpoint_dir}): conversion never overwrites")


def _parse_dtype(dtype: str | None) -> torch.dtype | None:
    if dtype is None:
        return None
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype (float32, bfloat16, float16), got {dtype!r}")
    return value


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _parse_size(size: int | str) -> int:
    """Bytes of `5GB`, `500MiB` or an int (as save_pretrained's max_shard_size)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"max_shard_size must be bytes or a size like '5GB' or '500MiB', got {size!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


# ---------------------------------------------------------------------------------- CLI
def from_hf_main(checkpoint_dir: Path, out_dir: Path, dtype: str | None = None) -> None:
    """Convert a Hugging Face checkpoint (GPT-2, GPT-NeoX/Pythia, Llama, Mistral) into a litattn checkpoint.

    Args:
        checkpoint_dir: A Hugging Face model directory: config.json, the weights (model.safetensors, sharded
            safetensors with their index, or pytorch_model.bin) and the tokenizer files.
        out_dir: The litattn checkpoint directory to write (model.safetensors, model_config.yaml, tokenizer).
        dtype: Cast the weights to this dtype (float32, bfloat16, float16, float64); default: keep the saved dtype.
    """
    allowed = ("float32", "bfloat16", "float16", "float64")
    if dtype is not None and str(dtype).removeprefix("torch.") not in allowed:
        raise ValueError(f"dtype must be one of {', '.join(allowed)} (or null to keep the saved dtype), got {dtype!r}")
    start_work()
    out = from_hf(checkpoint_dir, out_dir, dtype=dtype)
    print(f"Wrote litattn checkpoint {out}")


def to_hf_main(checkpoint_dir: Path, out_dir: Path, max_shard_size: str = "5GB") -> None:
    """Convert a litattn checkpoint into a Hugging Face directory that transformers' from_pretrained loads.

    Args:
        checkpoint_dir: A litattn checkpoint directory (model.safetensors, model_config.yaml, tokenizer files).
            Its attention must be `causal` and its architecture GPT-2, GPT-NeoX, Llama or Mistral style.
        out_dir: The Hugging Face directory to write (config.json, model.safetensors, tokenizer files).
        max_shard_size: Largest weights file, e.g. "5GB" or "500MiB" (or bytes); bigger models are sharded with an
            index.
    """
    if _parse_size(max_shard_size) < 1:  # _parse_size: ValueError for what is not a size at all
        raise ValueError(f"max_shard_size must be at least 1 byte, e.g. '5GB' or '500MiB', got {max_shard_size!r}")
    start_work()
    out = to_hf(checkpoint_dir, out_dir, max_shard_size=max_shard_size)
    print(f"Wrote Hugging Face checkpoint {out}")


__all__ = [
    "ARCHITECTURES",
    "HFWeights",
    "config_from_hf",
    "from_hf",
    "from_hf_main",
    "hf_config",
    "hf_family",
    "read_hf_config",
    "to_hf",
    "to_hf_main",
]
