"""Selective Self-Attention (litattn/attention/ssa.py) against naive float64 references."""

import math
from dataclasses import dataclass

import pytest
import torch

from litattn import GPT, Config
from litattn.attention import AttentionContext, AttentionMechanism, AttentionOptions, register_attention
from litattn.attention.registry import split_spec
from reference import causal_mask, naive_rope

ALPHA = 0.5


# -------------------------------------------------------------- naive references
def naive_tau(u, weight, bias, alpha=ALPHA):
    """1 + alpha * tanh(w_h . u / sqrt(d) + b_h), head by head and token by token: u (B, H, T, d) -> (B, H, T)."""
    B, H, T, d = u.shape
    u, weight, bias = u.detach().double(), weight.detach().double(), bias.detach().double()
    out = torch.empty(B, H, T, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                z = float(u[b, h, t] @ weight[h]) / math.sqrt(d) + float(bias[h])
                out[b, h, t] = 1.0 + alpha * math.tanh(z)
    return out


def naive_ssa(q, k, v, q_pos, mask, coef, tau_q=None, tau_v=None):
    """Explicit SSA scores in float64 (keys at positions 0..S-1, already rotated if RoPE is used).

    s_ij = (q_i . k_j / sqrt(d)) * (1 + coef * ln(pos_i + 1)) * tau_q(i); y_i = sum_j softmax_j(s_ij) tau_v(j) v_j
    """
    B, nh, T, d = q.shape
    ng = k.shape[1]
    k = k.double().repeat_interleave(nh // ng, dim=1)
    v = v.double()
    if tau_v is not None:
        v = v * tau_v[..., None]
    v = v.repeat_interleave(nh // ng, dim=1)
    out = torch.zeros(B, nh, T, d, dtype=torch.float64)
    for i, p in enumerate(q_pos.tolist()):
        pos_factor = 1.0 + coef * math.log(p + 1)
        scores = (q[:, :, i].double().unsqueeze(2) @ k.transpose(-1, -2)).squeeze(2) / math.sqrt(d)  # (B, nh, S)
        scores = scores * pos_factor
        if tau_q is not None:
            scores = scores * tau_q[:, :, i, None]
        scores = scores.masked_fill(~mask[i], float("-inf"))
        out[:, :, i] = (scores.softmax(-1).unsqueeze(2) @ v).squeeze(2)
    return out.to(q.dtype)


# -------------------------------------------------------------- helpers
def _ssa(config, **opts):
    cls, options = split_spec(Config.from_dict({**config.to_dict(), "attention": {"name": "ssa", **opts}}).attention)
    return cls(config, 0, options)


def _randomize(mech, beta=0.0, std=0.5):
    """Non-identity SSA parameters: beta=0 (coefficient exp(-1) ~ 0.37) and random w, b."""
    with torch.no_grad():
        for name, p in mech.named_parameters(recurse=False):
            if name == "beta":
                p.fill_(beta)
            elif name == "position_gate":
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)


def _ctx(q_pos, kv_len=None, rope=None, cached=False):
    """The context the model builds: with `cached`, the queries write to and read from the KV cache."""
    cos = sin = None
    if rope is not None:
        cos, sin = rope(q_pos)
    kv_len = len(q_pos) if kv_len is None else kv_len
    return AttentionContext(
        positions=q_pos, cos=cos, sin=sin, rope=rope, input_pos=q_pos if cached else None, kv_len=kv_len
    )


def _coef(mech):
    return (mech.position_gate * torch.exp(-torch.exp(mech.beta))).item()


# -------------------------------------------------------------- identity init
@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-pythia", "tiny-llama"])
def test_identity_init_computes_the_base_model(preset):
    base = GPT(Config.from_name(preset)).eval()
    ssa = GPT(Config.from_name(preset, attention={"name": "ssa", "identity_init": True})).eval()
    missing, unexpected = ssa.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected
    assert missing and all(".attn.mechanism." in name for name in missing)
    idx = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ssa(idx), base(idx), atol=1e-6, rtol=0)
        # and decoding with the cache too
        ssa.set_kv_cache(2)
        steps = [ssa(idx[:, t : t + 1], input_pos=torch.tensor([t])) for t in range(24)]
    torch.testing.assert_close(torch.cat(steps, 1), base(idx), atol=1e-5, rtol=0)


def test_default_init_is_the_authors_position_scaling():
    mech = _ssa(Config.from_name("tiny-gpt2"))
    assert mech.beta.item() == 2.0 and mech.position_gate.item() == 1.0
    assert abs(_coef(mech) - math.exp(-math.exp(2.0))) < 1e-9  # ~6.2e-4
    assert torch.all(mech.query_weight == 0) and torch.all(mech.value_bias == 0)
    assert _ssa(Config.from_name("tiny-gpt2"), beta_init=1.5).beta.item() == 1.5


# -------------------------------------------------------------- against the naive reference
def test_position_term_equals_naive_reference():
    config = Config.from_name("tiny-gpt2")  # learned positions: the mechanism sees no RoPE
    mech = _ssa(config, token_temperature=False, value_temperature=False)
    assert {n for n, _ in mech.named_parameters()} == {"beta", "position_gate"}
    _randomize(mech)
    q, k, v = torch.randn(2, 4, 12, 8), torch.randn(2, 4, 12, 8), torch.randn(2, 4, 12, 8)
    pos = torch.arange(12)
    expected = naive_ssa(q, k, v, pos, causal_mask(pos, 12), _coef(mech))
    torch.testing.assert_close(mech(q, k, v, _ctx(pos)), expected, atol=1e-5, rtol=1e-5)


def test_scaling_before_rope_equals_scaling_the_rotated_query():
    config = Config.from_name("tiny-pythia", rotary_percentage=0.5)
    model = GPT(config)
    mech = _ssa(config, token_temperature=False, value_temperature=False)
    _randomize(mech)
    q, k, v = torch.randn(1, 4, 10, 8), torch.randn(1, 4, 10, 8), torch.randn(1, 4, 10, 8)
    pos = torch.arange(10)
    q_rot = naive_rope(q, pos, config.rope_n_elem, config.rope_base)
    k_rot = naive_rope(k, pos, config.rope_n_elem, config.rope_base)
    expected = naive_ssa(q_rot, k_rot, v, pos, causal_mask(pos, 10), _coef(mech))
    torch.testing.assert_close(mech(q, k, v, _ctx(pos, rope=model.rope)), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rope", [False, True])
def test_all_temperatures_equal_naive_reference_with_gqa(rope):
    config = Config.from_name("tiny-llama")  # 4 query heads, 2 KV heads, head_size 8
    mech = _ssa(config)
    _randomize(mech)
    q, k, v = torch.randn(2, 4, 11, 8), torch.randn(2, 2, 11, 8), torch.randn(2, 2, 11, 8)
    pos = torch.arange(11)
    tau_q = naive_tau(q, mech.query_weight, mech.query_bias)  # from the pre-RoPE query
    tau_v = naive_tau(v, mech.value_weight, mech.value_bias)  # per KV head
    assert tau_q.min() < 0.9 and tau_q.max() > 1.1 and (tau_q - 1).abs().max() < ALPHA  # really non-trivial
    rope_fn = GPT(config).rope if rope else None
    qr, kr = q, k
    if rope:
        qr = naive_rope(q, pos, config.rope_n_elem, config.rope_base)
        kr = naive_rope(k, pos, config.rope_n_elem, config.rope_base)
    expected = naive_ssa(qr, kr, v, pos, causal_mask(pos, 11), _coef(mech), tau_q, tau_v)
    torch.testing.assert_close(mech(q, k, v, _ctx(pos, rope=rope_fn)), expected, atol=1e-5, rtol=1e-5)


def test_queries_at_later_positions_use_their_absolute_position():
    """A chunk of queries at positions 6..9 reading a cache of 10 keys: n_i = position + 1, not the chunk length."""
    config = Config.from_name("tiny-llama")
    mech = _ssa(config)
    _randomize(mech)
    q, k, v = torch.randn(1, 4, 10, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    mech.set_kv_cache(1, 16)
    assert mech.base.kv_cache is not None
    with torch.no_grad():
        mech(q[:, :, :6], k[:, :, :6], v[:, :, :6], _ctx(torch.arange(6), 6, cached=True))
        pos = torch.arange(6, 10)
        out = mech(q[:, :, 6:], k[:, :, 6:], v[:, :, 6:], _ctx(pos, 10, cached=True))
    tau_q = naive_tau(q[:, :, 6:], mech.query_weight, mech.query_bias)
    tau_v = naive_tau(v, mech.value_weight, mech.value_bias)
    expected = naive_ssa(q[:, :, 6:], k, v, pos, causal_mask(pos, 10), _coef(mech), tau_q, tau_v)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------- KV-cache decoding
@pytest.mark.parametrize(("preset", "window"), [("tiny-gpt2", None), ("tiny-pythia", None), ("tiny-llama", 5)])
def test_kv_cache_decoding_equals_full_forward(preset, window):
    model = GPT(Config.from_name(preset, sliding_window_size=window, attention={"name": "ssa"})).eval()
    for block in model.transformer.h:
        _randomize(block.attn.mechanism)
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        full = model(idx)
        model.set_kv_cache(2)
        steps = [model(idx[:, t : t + 1], input_pos=torch.tensor([t])) for t in range(16)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
        # prefill 9 tokens, then decode from position 9 on: the chunk-length bug would give ln(1) = 0 here
        model.set_kv_cache(2)
        prefill = model(idx[:, :9], input_pos=torch.arange(9))
        steps = [model(idx[:, t : t + 1], input_pos=torch.tensor([t])) for t in range(9, 16)]
    torch.testing.assert_close(torch.cat([prefill, *steps], 1), full, atol=1e-5, rtol=0)


# -------------------------------------------------------------- training
def test_gradients_reach_every_ssa_parameter():
    model = GPT(Config.from_name("tiny-llama", attention={"name": "ssa"}))
    idx = torch.randint(0, 256, (2, 16))
    model.loss(idx[:, :-1], idx[:, 1:]).backward()
    for block in model.transformer.h:
        params = dict(block.attn.mechanism.named_parameters(recurse=False))
        assert set(params) == {"beta", "position_gate", "query_weight", "query_bias", "value_weight", "value_bias"}
        for name, p in params.items():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_identity_init_still_learns():
    """At identity, beta's gradient is 0 (gate = 0) but the gate and every temperature parameter get one."""
    model = GPT(Config.from_name("tiny-pythia", attention={"name": "ssa", "identity_init": True}))
    idx = torch.randint(0, 256, (2, 16))
    model.loss(idx[:, :-1], idx[:, 1:]).backward()
    mech = model.transformer.h[0].attn.mechanism
    assert mech.beta.grad is None or torch.all(mech.beta.grad == 0)
    for name in ("position_gate", "query_weight", "query_bias", "value_weight", "value_bias"):
        assert getattr(mech, name).grad.abs().sum() > 0, name


def differentiable_ssa(q, k, v, q_pos, mask, gate, beta, wq, bq, wv, bv, alpha=ALPHA):
    """The SSA formulas written out in float64 with autograd: gradients for every input and parameter."""
    d, rep = q.shape[-1], q.shape[1] // k.shape[1]
    tau_pos = 1 + gate * torch.exp(-torch.exp(beta)) * torch.log(q_pos.double() + 1)  # (T,)
    tau_q = 1 + alpha * torch.tanh(torch.einsum("bhtd,hd->bht", q, wq) / math.sqrt(d) + bq[:, None])
    tau_v = 1 + alpha * torch.tanh(torch.einsum("bgsd,gd->bgs", v, wv) / math.sqrt(d) + bv[:, None])
    k, v = k.repeat_interleave(rep, dim=1), (v * tau_v[..., None]).repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d) * tau_pos[:, None] * tau_q[..., None]
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


def test_gradients_equal_naive_reference_with_gqa():
    """Backward through SSA (query, key, value and all six parameters) against autograd of the written-out formulas."""
    mech = _ssa(Config.from_name("tiny-llama"))
    _randomize(mech, beta=0.3)
    q, k, v = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    pos = torch.arange(9)
    weights = torch.randn(2, 4, 9, 8)
    inputs = [x.clone().requires_grad_(True) for x in (q, k, v)]
    (mech(*inputs, _ctx(pos)) * weights).sum().backward()

    names = ["position_gate", "beta", "query_weight", "query_bias", "value_weight", "value_bias"]
    ref_inputs = [x.double().requires_grad_(True) for x in (q, k, v)]
    ref_params = [getattr(mech, n).detach().double().requires_grad_(True) for n in names]
    out = differentiable_ssa(*ref_inputs, pos, causal_mask(pos, 9), *ref_params)
    (out * weights.double()).sum().backward()
    for name, got, ref in zip(["q", "k", "v"], inputs, ref_inputs, strict=True):
        torch.testing.assert_close(got.grad.double(), ref.grad, atol=1e-5, rtol=1e-4, msg=name)
    for name, ref in zip(names, ref_params, strict=True):
        assert ref.grad.abs().max() > 1e-3, name  # every gradient is really exercised
        torch.testing.assert_close(getattr(mech, name).grad.double(), ref.grad, atol=1e-5, rtol=1e-4, msg=name)


# -------------------------------------------------------------- parameter overhead
@pytest.mark.parametrize("preset", ["gpt2", "pythia-160m", "tinyllama-1.1b"])  # the last with GQA
def test_parameter_overhead_below_half_a_percent(preset):
    with torch.device("meta"):
        model = GPT(Config.from_name(preset, attention={"name": "ssa"}))
    c = model.config
    added = model.mechanism_parameters()
    assert added == c.n_layer * (2 + (c.n_head + c.n_query_groups) * (c.head_size + 1))
    base_params = model.num_parameters() - added
    fraction = added / base_params
    print(f"{preset}: SSA adds {added:,} parameters to {base_params:,} ({100 * fraction:.4f}%)")
    assert fraction < 0.005


# -------------------------------------------------------------- composition with a base
def test_ssa_over_a_sliding_window_equals_naive_reference():
    config = Config.from_name("tiny-llama", sliding_window_size=4)
    mech = _ssa(config, base={"name": "causal"})
    _randomize(mech)
    q, k, v = torch.randn(2, 4, 12, 8), torch.randn(2, 2, 12, 8), torch.randn(2, 2, 12, 8)
    pos = torch.arange(12)
    tau_q = naive_tau(q, mech.query_weight, mech.query_bias)
    tau_v = naive_tau(v, mech.value_weight, mech.value_bias)
    expected = naive_ssa(q, k, v, pos, causal_mask(pos, 12, window=4), _coef(mech), tau_q, tau_v)
    torch.testing.assert_close(mech(q, k, v, _ctx(pos)), expected, atol=1e-5, rtol=1e-5)


@dataclass
class StrideOptions(AttentionOptions):
    stride: int = 3


@register_attention("test_ssa_stride")
class StrideAttention(AttentionMechanism):
    """Causal attention that sees only every `stride`-th key plus itself (a test mechanism)."""

    Options = StrideOptions
    kernels = ("auto", "sdpa")

    def mask_mod(self, ctx):
        q_pos, stride = ctx.positions, self.options.stride

        def mask_mod(b, h, q_idx, kv_idx):
            qp = q_pos[q_idx]
            return (kv_idx <= qp) & (((qp - kv_idx) % stride == 0) | (kv_idx == 0))

        return mask_mod


def _stride_mask(q_pos, kv_len, stride):
    mask = torch.zeros(len(q_pos), kv_len, dtype=torch.bool)
    for i, p in enumerate(q_pos.tolist()):
        for j in range(kv_len):
            mask[i, j] = j <= p and ((p - j) % stride == 0 or j == 0)
    return mask


def test_ssa_over_a_user_defined_mechanism(tmp_path):
    spec = {"name": "ssa", "kernel": "sdpa", "base": {"name": "test_ssa_stride", "module": __name__, "stride": 2}}
    config = Config.from_name("tiny-gpt2", attention=spec)
    # the full nested spec is stored; SSA's kernel is handed to the base
    assert config.attention["base"] == {"name": "test_ssa_stride", "module": __name__, "kernel": "sdpa", "stride": 2}
    config.save(tmp_path / "model_config.yaml")
    assert Config.from_file(tmp_path / "model_config.yaml").attention == config.attention
    model = GPT(config)
    mech = model.transformer.h[0].attn.mechanism
    assert isinstance(mech.base, StrideAttention) and mech.base.options.stride == 2
    _randomize(mech)
    q, k, v = torch.randn(1, 4, 9, 8), torch.randn(1, 4, 9, 8), torch.randn(1, 4, 9, 8)
    pos = torch.arange(9)
    tau_q = naive_tau(q, mech.query_weight, mech.query_bias)
    tau_v = naive_tau(v, mech.value_weight, mech.value_bias)
    expected = naive_ssa(q, k, v, pos, _stride_mask(pos, 9, 2), _coef(mech), tau_q, tau_v)
    torch.testing.assert_close(mech(q, k, v, _ctx(pos)), expected, atol=1e-5, rtol=1e-5)


@register_attention("test_ssa_inference_only")
class InferenceOnlyBase(AttentionMechanism):
    """No training, no KV cache, a shorter context (a test mechanism)."""

    supports_training = False
    supports_kv_cache = False

    @classmethod
    def max_seq_length(cls, config, options):
        return config.block_size // 2


def test_capabilities_follow_the_base():
    model = GPT(Config.from_name("tiny-gpt2", attention={"name": "ssa", "base": "test_ssa_inference_only"}))
    assert model.max_seq_length == 64
    idx = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(RuntimeError, match="inference-only"):
        model.train()(idx)
    with torch.no_grad():
        model(idx)
    with pytest.raises(RuntimeError, match="does not support KV-cache"):
        model.set_kv_cache(1)


# -------------------------------------------------------------- validation
def test_misspelt_option_is_an_error():
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['beta_int'\] for attention 'ssa'"):
        Config.from_name("tiny-gpt2", attention={"name": "ssa", "beta_int": 1.0})
    with pytest.raises(ValueError, match=r"ssa base: Unknown option\(s\) \['kernal'\] for attention 'causal'"):
        Config.from_name("tiny-gpt2", attention={"name": "ssa", "base": {"name": "causal", "kernal": "sdpa"}})


def test_unknown_base_lists_registered_mechanisms():
    with pytest.raises(ValueError, match=r"Unknown attention mechanism 'casual'\. Registered: .*causal.*ssa"):
        Config.from_name("tiny-gpt2", attention={"name": "ssa", "base": {"name": "casual"}})


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        ({"temperature_bound": 1.0}, "temperature_bound"),
        ({"beta_init": float("inf")}, "beta_init"),
        ({"base": {"name": "ssa"}}, "cannot wrap SSA"),
        ({"kernel": "sdpa", "base": {"name": "causal", "kernel": "flex"}}, "conflicts"),
    ],
)
def test_invalid_values_are_errors(opts, match):
    with pytest.raises(ValueError, match=match):
        Config.from_name("tiny-gpt2", attention={"name": "ssa", **opts})


def test_state_dict_has_no_cache_and_only_enabled_parameters():
    model = GPT(Config.from_name("tiny-gpt2", attention={"name": "ssa", "value_temperature": False}))
    model.set_kv_cache(1)
    keys = [k for k in model.state_dict() if ".mechanism." in k]
    assert sorted(k.split(".mechanism.")[1] for k in keys if ".h.0." in k) == [
        "beta",
        "position_gate",
        "query_bias",
        "query_weight",
    ]
    assert model.transformer.h[0].attn.mechanism.base.kv_cache is not None
    model.clear_kv_cache()
    for block in model.transformer.h:
        assert block.attn.mechanism.base.kv_cache is None


@pytest.mark.parametrize("base", ["causal", "disrupt_set", "hybrid"])
def test_the_wrapper_declares_what_its_base_declares(base):
    """What the model and the tools ask of a mechanism (metadata it reads, its segments, its rethink interval)
    is its base's: SSA only scales q and v."""
    config = Config.from_name("tiny-llama", attention={"name": "ssa", "base": {"name": base}})
    model = GPT(config)
    ssa = model.transformer.h[0].attn.mechanism
    for attribute in ("metadata_keys", "segment_key", "rethink_every", "supports_kv_cache"):
        assert getattr(ssa, attribute) == getattr(ssa.base, attribute), attribute
    assert (ssa.segment_key is not None) == (base == "disrupt_set")
