"""HF <-> litattn conversion, checked against transformers' own logits (the independent reference).

Every HF model is tiny and built from a config here (nothing is downloaded); all its parameters,
norms and biases included, are re-drawn at a large scale so that any mis-mapped tensor shows in the logits.
"""

import json
import warnings
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file, save_file

from litattn import Config
from litattn import checkpoint as ckpt
from litattn.attention import AttentionMechanism, AttentionOptions, register_attention
from litattn.convert import from_hf, from_hf_main, to_hf

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:.*has no tokenizer.json:UserWarning")

VOCAB = 150


def _gpt2():
    return transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4)


def _neox():
    return transformers.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        rotary_pct=0.25,
        use_parallel_residual=True,
        max_position_embeddings=64,
    )


def _llama(**kw):
    values = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaConfig(**{**values, **kw})


def _llama_gqa_tied():
    return _llama(tie_word_embeddings=True, rope_theta=500.0)


def _llama3():
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
    return _llama(rope_theta=500000.0, rope_scaling={**scaling, "original_max_position_embeddings": 16})


def _mistral():
    return transformers.MistralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        sliding_window=6,
    )


FAMILIES = {"gpt2": _gpt2, "neox": _neox, "llama_gqa_tied": _llama_gqa_tied, "llama3": _llama3, "mistral": _mistral}
SEQ = 20  # longer than Mistral's window of 6


def _hf_model(config):
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # tied weights are one parameter: drawn once
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _ids(batch=2, seq=SEQ):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _hf_logits(model, ids):
    return model(ids).logits


@torch.no_grad()
def _lit_logits(checkpoint_dir, ids, **overrides):
    model, _, _ = ckpt.load(checkpoint_dir, **overrides)
    return model.eval()(ids)


def _assert_close(actual, expected):
    assert expected.std() > 0.25  # logits large enough that atol=1e-4 would catch a mis-mapped tensor
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


def _reload_hf(hf_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()


# ---------------------------------------------------------------------------------- logits
@pytest.mark.parametrize("family", list(FAMILIES))
def test_from_hf_and_back_give_transformers_logits(tmp_path, family):
    hf_model = _hf_model(FAMILIES[family]())
    hf_model.save_pretrained(tmp_path / "hf")
    ids = _ids()
    expected = _hf_logits(hf_model, ids)

    out = from_hf(tmp_path / "hf", tmp_path / "lit")
    _assert_close(_lit_logits(out, ids), expected)

    back = to_hf(out, tmp_path / "hf2")
    reloaded = _reload_hf(back)
    _assert_close(_hf_logits(reloaded, ids), expected)
    reloaded_state = reloaded.state_dict()
    for key, t in hf_model.state_dict().items():  # the round trip is exact, tensor by tensor
        assert torch.equal(reloaded_state[key], t), key


LITATTN_MODELS = {
    "gpt2": dict(name="tiny-gpt2", gelu_approximate="none", tie_embeddings=False),
    "neox_shared_norm_llama3": dict(
        name="tiny-pythia",
        shared_attention_norm=True,
        gelu_approximate="tanh",
        rope_adjustments=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=16),
    ),
    "quickstart_like": dict(name="quickstart", n_layer=2, n_embd=32, intermediate_size=64, vocab_size=VOCAB),
    "llama_head_size": dict(name="tiny-llama", head_size=16, bias=True, rope_base=300),
    "mistral": dict(name="tiny-llama", sliding_window_size=5, tie_embeddings=True),
}


@pytest.mark.parametrize("model", list(LITATTN_MODELS))
def test_to_hf_of_litattn_models_gives_litattn_logits(tmp_path, model):
    """The other direction first: litattn-native architectures (shared norm, head_size, window) in transformers."""
    from litattn.model import GPT

    overrides = dict(LITATTN_MODELS[model])
    config = Config.from_name(overrides.pop("name"), **overrides)
    lit = GPT(config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lit.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        ids = torch.randint(0, config.vocab_size, (2, SEQ), generator=g)
        expected = lit(ids)
    ckpt.save_checkpoint(tmp_path / "lit", lit.state_dict(), config)
    _assert_close(_hf_logits(_reload_hf(to_hf(tmp_path / "lit", tmp_path / "hf")), ids), expected)


def test_config_mapping_of_each_family(tmp_path):
    seen = {}
    for family, make in FAMILIES.items():
        _hf_model(make()).save_pretrained(tmp_path / family)
        seen[family] = Config.from_file(from_hf(tmp_path / family, tmp_path / f"{family}-lit") / ckpt.CONFIG_FILE)
    gpt2, neox, llama, llama3, mistral = seen.values()
    assert gpt2.positional_embedding == "learned" and gpt2.gelu_approximate == "tanh" and gpt2.tie_embeddings
    assert gpt2.block_size == 64 and gpt2.vocab_size == gpt2.padded_vocab_size == VOCAB
    assert neox.rotary_percentage == 0.25 and neox.parallel_residual and not neox.tie_embeddings
    assert (llama.n_head, llama.n_query_groups, llama.head_size) == (4, 2, 16)
    assert llama.tie_embeddings and llama.rope_base == 500 and llama.rope_adjustments is None
    assert llama3.rope_base == 500000
    assert llama3.rope_adjustments == dict(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=16
    )
    assert mistral.sliding_window_size == 6 and mistral.norm_class_name == "RMSNorm"


def test_mistral_window_is_exercised(tmp_path):
    """Without the window, litattn's logits differ: the test sequence really is longer than the window."""
    hf_model = _hf_model(_mistral())
    hf_model.save_pretrained(tmp_path / "hf")
    out = from_hf(tmp_path / "hf", tmp_path / "lit")
    ids = _ids()
    expected = _hf_logits(hf_model, ids)
    _assert_close(_lit_logits(out, ids), expected)
    no_window = _lit_logits(out, ids, sliding_window_size=None)
    assert torch.allclose(no_window[:, :6], expected[:, :6], atol=1e-4)
    assert not torch.allclose(no_window[:, 6:], expected[:, 6:], atol=1e-2)


# ---------------------------------------------------------------------------------- weight files
def test_sharded_safetensors_convert_and_to_hf_shards(tmp_path):
    hf_model = _hf_model(_llama())
    hf_model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    ids = _ids()
    expected = _hf_logits(hf_model, ids)
    out = from_hf(tmp_path / "hf", tmp_path / "lit")
    _assert_close(_lit_logits(out, ids), expected)

    back = to_hf(out, tmp_path / "hf2", max_shard_size="20KB")
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (back / "model.safetensors").exists()
    _assert_close(_hf_logits(_reload_hf(back), ids), expected)


def test_pytorch_bin_checkpoint_converts_with_dtype(tmp_path):
    """transformers 5 saves only safetensors: write the .bin files (single and sharded) as older versions did."""
    hf_model = _hf_model(_neox())
    ids = _ids()
    expected = _hf_logits(hf_model, ids)
    state = hf_model.state_dict()
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    for d in (single, sharded):
        hf_model.config.save_pretrained(d)
    torch.save(state, single / "pytorch_model.bin")
    keys = list(state)
    halves = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, part in halves.items():
        torch.save({k: state[k] for k in part}, sharded / name)
    weight_map = {k: name for name, part in halves.items() for k in part}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    _assert_close(_lit_logits(from_hf(single, tmp_path / "lit1"), ids), expected)
    _assert_close(_lit_logits(from_hf(sharded, tmp_path / "lit2"), ids), expected)
    out = from_hf(single, tmp_path / "lit-bf16", dtype="bfloat16")
    assert {t.dtype for t in load_file(out / ckpt.MODEL_FILE).values()} == {torch.bfloat16}


def test_gpt2_original_names_and_buffers(tmp_path):
    """OpenAI's GPT-2 files: no `transformer.` prefix and attention-mask buffers, which are skipped."""
    hf_model = _hf_model(_gpt2())
    d = tmp_path / "hf"
    hf_model.config.save_pretrained(d)
    state = {k.removeprefix("transformer."): v.clone() for k, v in hf_model.state_dict().items()}
    del state["lm_head.weight"]  # tied: OpenAI's files store the embedding only
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, str(d / "model.safetensors"))
    ids = _ids()
    _assert_close(_lit_logits(from_hf(d, tmp_path / "lit"), ids), _hf_logits(hf_model, ids))


# ---------------------------------------------------------------------------------- errors
def test_unsupported_architecture_is_one_line_error(tmp_path):
    d = tmp_path / "bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    with pytest.raises(ValueError, match=r"Unsupported architecture BertForMaskedLM .*LlamaForCausalLM") as e:
        from_hf(d, tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_unknown_tensor_and_unsupported_option_are_errors(tmp_path):
    hf_model = _hf_model(_llama())
    hf_model.save_pretrained(tmp_path / "hf")
    state = load_file(tmp_path / "hf" / "model.safetensors")
    state["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    save_file(state, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"Unknown tensor names .*q_norm"):
        from_hf(tmp_path / "hf", tmp_path / "out")

    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    config.pop("rope_parameters", None)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rope scaling 'yarn'"):
        from_hf(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@dataclass
class _Opts(AttentionOptions):
    pass


@register_attention("test_convert_noncausal")
class _NonCausal(AttentionMechanism):
    """Stands for any mechanism other than `causal` (its math does not matter here)."""

    Options = _Opts


def test_to_hf_refuses_models_without_hf_equivalent(tmp_path):
    model_dir = tmp_path / "ssa"
    config = Config.from_name("tiny-llama", attention={"name": "test_convert_noncausal"})
    from litattn.model import GPT

    ckpt.save_checkpoint(model_dir, GPT(config).state_dict(), config)
    with pytest.raises(ValueError, match="'test_convert_noncausal' has no Hugging Face equivalent"):
        to_hf(model_dir, tmp_path / "out")

    odd = Config.from_name("tiny-llama", norm_class_name="LayerNorm")
    ckpt.save_checkpoint(tmp_path / "odd", GPT(odd).state_dict(), odd)
    with pytest.raises(ValueError, match="no Hugging Face equivalent"):
        to_hf(tmp_path / "odd", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------- tokenizer
def test_tokenizer_files_are_copied_both_ways(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    hf_dir = tmp_path / "hf"
    hf_model = _hf_model(_llama())
    hf_model.save_pretrained(hf_dir)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(100)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(hf_dir / "tokenizer.json"))
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(tok_config))

    from_hf_main(hf_dir, tmp_path / "lit")
    assert "Wrote litattn checkpoint" in capsys.readouterr().out
    out = tmp_path / "lit"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (hf_dir / name).read_bytes()
    _, tokenizer, config = ckpt.load(out)
    assert tokenizer.encode("w0 w5", bos=True) == [1, 3, 8]
    assert (config.vocab_size, config.padded_vocab_size) == (103, VOCAB)  # sampling stops at the tokenizer's size

    back = to_hf(out, tmp_path / "hf2")
    assert (back / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    hf_config = json.loads((back / "config.json").read_text())
    assert (hf_config["bos_token_id"], hf_config["eos_token_id"]) == (1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_tok = transformers.AutoTokenizer.from_pretrained(back)
    assert hf_tok("w0 w5", add_special_tokens=False)["input_ids"] == [3, 8]


@pytest.mark.filterwarnings("ignore:self_extend. the model's sliding window")  # Mistral's: asserted in test_self_extend
@pytest.mark.parametrize("family", ["llama3", "mistral"])
def test_converted_checkpoints_run_with_self_extend_beyond_their_context(tmp_path, family):
    hf_model = _hf_model(FAMILIES[family]())
    hf_model.save_pretrained(tmp_path / "hf")
    out = from_hf(tmp_path / "hf", tmp_path / "lit")
    extend = {"name": "self_extend", "group_size": 4, "window": 8}
    ids = _ids(seq=6)  # within the window (and Mistral's sliding window): exactly the converted model
    _assert_close(_lit_logits(out, ids, attention=extend), _hf_logits(hf_model, ids))
    model, _, _ = ckpt.load(out, attention=extend)
    assert model.max_seq_length == (64 - 8) * 4 + 8
    long = _ids(batch=1, seq=150)  # beyond the 64 positions it was trained for
    with torch.no_grad():
        full = model.eval()(long)
        model.set_kv_cache(batch_size=1)
        steps = [model(long[:, :100], input_pos=torch.arange(100))]
        steps += [model(long[:, t : t + 1], input_pos=torch.tensor([t])) for t in range(100, 150)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)
