from dataclasses import dataclass

import pytest
import torch

import litattn.attention.kernels as kernels
from litattn import GPT, Config
from litattn.attention import (
    AttentionContext,
    AttentionMechanism,
    AttentionOptions,
    available_attention,
    get_attention,
    masks,
    register_attention,
)
from reference import causal_mask, naive_attention


def _qkv(B=2, nh=4, ng=2, T=10, S=None, hs=8):
    S = T if S is None else S
    return torch.randn(B, nh, T, hs), torch.randn(B, ng, S, hs), torch.randn(B, ng, S, hs)


def _ctx(T):
    return AttentionContext(positions=torch.arange(T), cos=None, sin=None, rope=None, kv_len=T)


@pytest.mark.parametrize("window", [None, 3])
def test_causal_mechanism_equals_naive_reference(window):
    config = Config.from_name("tiny-gpt2", sliding_window_size=window)
    mech = get_attention("causal")(config, 0, AttentionOptions())
    q, k, v = _qkv()
    expected = naive_attention(q, k, v, causal_mask(torch.arange(10), 10, window))
    torch.testing.assert_close(mech(q, k, v, _ctx(10)), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["sdpa", "flex"])
def test_masked_kernels_agree_with_reference(kernel, monkeypatch):
    monkeypatch.setattr(kernels, "MASK_BUDGET", 2 * 3 * 17)  # force several query chunks on the sdpa path
    q_pos = torch.arange(9, 17)  # 8 queries decoding at positions 9..16 against 17 cached keys
    q, k, v = _qkv(T=8, S=17)
    mask_mod = masks.sliding_window(q_pos, 5)
    with torch.no_grad():
        out = kernels.attend(q, k, v, mask_mod=mask_mod, kernel=kernel)
    torch.testing.assert_close(out, naive_attention(q, k, v, causal_mask(q_pos, 17, 5)), atol=1e-5, rtol=1e-5)


def test_flex_refuses_to_train_on_cpu():
    q, k, v = _qkv()
    q.requires_grad_(True)
    with pytest.raises(RuntimeError, match="cannot train on CPU"):
        kernels.attend(q, k, v, mask_mod=masks.causal(torch.arange(10)), kernel="flex")


def test_model_with_sliding_window_decodes_like_full_forward():
    model = GPT(Config.from_name("tiny-llama", sliding_window_size=4)).eval()
    idx = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        full = model(idx)
        model.set_kv_cache(1)
        steps = [model(idx[:, t : t + 1], input_pos=torch.tensor([t])) for t in range(12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    # and the window really restricts attention: a model without it gives different logits
    model_nw = GPT(Config.from_name("tiny-llama")).eval()
    model_nw.load_state_dict(model.state_dict())
    assert not torch.allclose(model_nw(idx)[:, -1], full[:, -1], atol=1e-4)


# -------------------------------------------------------------- a user-registered mechanism
@dataclass
class TemperatureOptions(AttentionOptions):
    temperature: float = 1.0


@register_attention("test_temperature")
class TemperatureAttention(AttentionMechanism):
    """Causal attention with logits divided by a fixed temperature (a test mechanism)."""

    Options = TemperatureOptions

    def attend(self, q, k, v, ctx):
        return super().attend(q / self.options.temperature, k, v, ctx)


def test_user_registered_mechanism_selected_from_yaml(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text(
        "n_layer: 1\nn_head: 2\nn_embd: 16\nvocab_size: 64\nblock_size: 32\npositional_embedding: learned\n"
        f"attention:\n  name: test_temperature\n  module: {__name__}\n  temperature: 2.0\n"
    )
    config = Config.from_file(path)
    assert config.attention == {"name": "test_temperature", "module": __name__, "kernel": "auto", "temperature": 2.0}
    model = GPT(config)
    assert isinstance(model.transformer.h[0].attn.mechanism, TemperatureAttention)
    mech = model.transformer.h[0].attn.mechanism
    q, k, v = _qkv(nh=2, ng=2, T=6)
    expected = naive_attention(q, k, v, causal_mask(torch.arange(6), 6), scale=0.5 / 8**0.5)
    torch.testing.assert_close(mech(q, k, v, _ctx(6)), expected, atol=1e-5, rtol=1e-5)
    assert "test_temperature" in available_attention()


def test_module_that_cannot_be_imported_is_a_clear_error():
    with pytest.raises(ValueError, match="Cannot import attention module 'no_such_module'"):
        Config.from_name("tiny-gpt2", attention={"name": "x", "module": "no_such_module"})


# -------------------------------------------------------------- declared capabilities
@register_attention("test_inference_only")
class InferenceOnly(AttentionMechanism):
    """Declares no training, no KV cache and only the sdpa kernel (a test mechanism)."""

    supports_training = False
    supports_kv_cache = False
    kernels = ("auto", "sdpa")


def test_unsupported_combinations_are_clear_errors():
    model = GPT(Config.from_name("tiny-gpt2", attention={"name": "test_inference_only"}))
    idx = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(RuntimeError, match="inference-only"):
        model.train()(idx)
    with torch.no_grad():
        model(idx)  # inference works
    with pytest.raises(RuntimeError, match="does not support KV-cache"):
        model.set_kv_cache(1)
    with pytest.raises(ValueError, match="supports kernels"):
        Config.from_name("tiny-gpt2", attention={"name": "test_inference_only", "kernel": "flex"})


def test_registering_a_different_class_under_a_taken_name_is_an_error():
    with pytest.raises(ValueError, match="already registered"):

        @register_attention("causal")
        class Other(AttentionMechanism):
            """x"""
