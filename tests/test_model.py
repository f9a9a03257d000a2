import pytest
import torch

from litattn import GPT, Config
from litattn.attention.base import rotate_half_rope
from reference import causal_mask, naive_attention_probs, naive_rope

TINY = ["tiny-gpt2", "tiny-pythia", "tiny-llama"]


@pytest.mark.parametrize("name", TINY)
def test_kv_cache_decoding_equals_full_forward(name):
    model = GPT(Config.from_name(name)).eval()
    idx = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        full = model(idx)
        model.set_kv_cache(batch_size=2)
        # a prefill of 5 tokens, then a chunk of 3 (not starting at 0), then one token at a time
        steps = [model(idx[:, :5], input_pos=torch.arange(5)), model(idx[:, 5:8], input_pos=torch.arange(5, 8))]
        for t in range(8, idx.shape[1]):
            steps.append(model(idx[:, t : t + 1], input_pos=torch.tensor([t])))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_gqa_config_is_gqa():
    config = Config.from_name("tiny-llama")
    assert config.n_query_groups < config.n_head
    assert GPT(config).transformer.h[0].attn.qkv.out_features == (4 + 2 * 2) * 8


@pytest.mark.parametrize(
    "name, published, hf_vocab_rows",
    [
        ("gpt2", 124_439_808, 50257),
        ("pythia-160m", 162_322_944, 50304),
        ("tinyllama-1.1b", 1_100_048_384, 32000),
        ("mistral-7b", 7_241_732_096, 32000),
        ("llama-3.2-1b", 1_235_814_400, 128256),
        ("pythia-70m", 70_426_624, 50304),
    ],
)
def test_preset_parameter_counts(name, published, hf_vocab_rows):
    """Exactly the published (Hugging Face) count, plus the embedding rows litattn's vocabulary padding adds."""
    config = Config.from_name(name)
    with torch.device("meta"):
        model = GPT(config)
    padding = (config.padded_vocab_size - hf_vocab_rows) * config.n_embd * (1 if config.tie_embeddings else 2)
    assert model.num_parameters() == published + padding


def test_state_dict_names_follow_litgpt():
    keys = set(GPT(Config.from_name("tiny-llama")).state_dict())
    for k in [
        "transformer.wte.weight",
        "transformer.h.0.norm_1.weight",
        "transformer.h.0.attn.qkv.weight",
        "transformer.h.0.attn.proj.weight",
        "transformer.h.0.norm_2.weight",
        "transformer.h.0.mlp.fc_1.weight",
        "transformer.h.0.mlp.fc_2.weight",
        "transformer.h.0.mlp.proj.weight",
        "transformer.ln_f.weight",
        "lm_head.weight",
    ]:
        assert k in keys
    assert not any("kv_cache" in k or "inv_freq" in k for k in keys)
    gpt2 = GPT(Config.from_name("tiny-gpt2"))
    assert "transformer.wpe.weight" in gpt2.state_dict()
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight


def test_rope_matches_explicit_rotation():
    config = Config.from_name("tiny-pythia")  # partial rotary: 25% of the head
    model = GPT(config)
    pos = torch.tensor([0, 3, 7, 100])
    cos, sin = model.rope(pos)
    x = torch.randn(1, 2, 4, config.head_size)
    expected = naive_rope(x, pos, config.rope_n_elem, config.rope_base)
    torch.testing.assert_close(rotate_half_rope(x, cos, sin), expected, atol=1e-5, rtol=1e-5)
    assert config.rope_n_elem == config.head_size // 4


def test_chunked_loss_equals_plain_loss_and_gradients():
    model = GPT(Config.from_name("tiny-llama"))
    idx = torch.randint(0, 256, (2, 32))
    targets = torch.randint(0, 256, (2, 32))
    targets[0, :5] = -100
    plain = model.loss(idx, targets)
    plain.backward()
    g_plain = model.transformer.wte.weight.grad.clone()
    model.zero_grad()
    chunked = model.loss(idx, targets, chunk_size=7)
    chunked.backward()
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.transformer.wte.weight.grad, g_plain, atol=1e-5, rtol=1e-4)


def test_sequence_longer_than_context_is_an_error():
    model = GPT(Config.from_name("tiny-gpt2"))
    with pytest.raises(ValueError, match="at most 128 tokens"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_input_pos_without_cache_is_an_error():
    model = GPT(Config.from_name("tiny-llama"))
    with pytest.raises(RuntimeError, match="set_kv_cache"):
        model(torch.zeros(1, 2, dtype=torch.long), input_pos=torch.arange(2))


def test_init_follows_gpt_neox():
    config = Config.from_name("quickstart")
    model = GPT(config)
    std = (2 / 5 / config.n_embd) ** 0.5
    assert abs(model.transformer.h[0].attn.qkv.weight.std().item() - std) < 0.1 * std
    proj_std = 1 / config.n_embd**0.5 / config.n_layer
    assert abs(model.transformer.h[0].mlp.proj.weight.std().item() - proj_std) < 0.1 * proj_std
    assert torch.all(model.transformer.h[0].attn.qkv.bias == 0)


def test_attention_maps_are_causal_distributions_and_do_not_change_the_output():
    model = GPT(Config.from_name("tiny-llama", sliding_window_size=5)).eval()
    idx = torch.randint(0, 256, (2, 12))
    # an independent reference: each layer's q, k (before RoPE) from a plain forward, rotated and softmaxed naively
    inputs, hidden = [], []
    hooks = [
        block.attn.mechanism.register_forward_pre_hook(lambda m, args: inputs.append((args[0], args[1])))
        for block in model.transformer.h
    ]
    with torch.no_grad():
        plain = model.hidden_states(idx)
    for hook in hooks:
        hook.remove()
    hook = model.transformer.ln_f.register_forward_hook(lambda m, args, out: hidden.append(out))
    maps = model.attention_maps(idx)
    hook.remove()
    assert len(maps) == 2 and maps[0].shape == (2, 4, 12, 12)
    torch.testing.assert_close(hidden[0], plain, atol=1e-5, rtol=1e-5)  # the maps path computes the same function
    c, pos = model.config, torch.arange(12)
    for layer_maps, (q, k) in zip(maps, inputs, strict=True):
        q, k = (naive_rope(x, pos, c.rope_n_elem, c.rope_base) for x in (q, k))
        expected = naive_attention_probs(q, k, causal_mask(pos, 12, window=5))
        torch.testing.assert_close(layer_maps.double(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 4, 12))
    i, j = torch.meshgrid(torch.arange(12), torch.arange(12), indexing="ij")
    assert torch.all(maps[1][..., (j > i) | (i - j >= 5)] == 0)  # causal and windowed
    assert torch.all(maps[1][..., (j <= i) & (i - j < 5)] > 0)
