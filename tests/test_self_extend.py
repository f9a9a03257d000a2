"""Self-Extend against a naive implementation written here: explicit T x T scores of both branches merged
into one softmax, for several G, W (G not dividing W too), lengths, batch sizes and GQA; cached decoding
against the full forward; gradients; composition with SSA; the standalone API."""

import math

import pytest
import torch

import litattn.attention.self_extend as se
from litattn import GPT, Config
from litattn.attention.self_extend import SelfExtendAttention, self_extend_attention
from reference import naive_rope


def naive_self_extend(q, k, v, G, W, rope_base=10000.0, n_elem=None, probs=False, scale_base=None):
    """q (B, H, T, D), k, v (B, Hkv, T, D) before RoPE; explicit merged scores. probs: the softmax instead.
    scale_base: the authors' formula, the query at position i times max(1, ln(i + 1) / ln(scale_base)) before
    both rotations (their `scaled_query` feeds the neighbour and the grouped branch)."""
    B, H, T, D = q.shape
    k, v = (x.repeat_interleave(H // k.shape[1], dim=1).double() for x in (k, v))
    q = q.double()
    if scale_base is not None:
        factor = [max(1.0, math.log(i + 1) / math.log(scale_base)) for i in range(T)]
        q = q * torch.tensor(factor, dtype=torch.float64)[:, None]
    n_elem = D if n_elem is None else n_elem
    pos = torch.arange(T)
    i, j = pos[:, None], pos[None, :]
    s_n = naive_rope(q, pos, n_elem, rope_base) @ naive_rope(k, pos, n_elem, rope_base).transpose(-1, -2)
    g_q = naive_rope(q, pos // G + W - W // G, n_elem, rope_base)
    g_k = naive_rope(k, pos // G, n_elem, rope_base)
    s_g = g_q @ g_k.transpose(-1, -2)
    scores = torch.where(i - j < W, s_n, s_g) / D**0.5
    scores = scores.masked_fill(j > i, float("-inf"))
    return scores.softmax(-1) @ v if not probs else scores.softmax(-1)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-cpu", "tiles"])
@pytest.mark.parametrize("G, W", [(2, 4), (3, 8), (4, 6), (8, 16)])
@pytest.mark.parametrize("T, B, H, Hkv", [(40, 1, 4, 4), (70, 2, 4, 2), (33, 3, 2, 1)])
def test_equals_the_naive_merged_softmax(G, W, T, B, H, Hkv, fused, monkeypatch):
    monkeypatch.setattr(se, "FUSED_CPU", fused)  # the CPU kernel path and the portable tiles of other devices
    monkeypatch.setattr(se, "QUERY_BLOCK", 16)  # several query blocks
    monkeypatch.setattr(se, "KEY_TILE", 8 if T > 40 else 1024)  # and several key tiles, or one
    torch.manual_seed(G * 100 + T)
    q, k, v = torch.randn(B, H, T, 16), torch.randn(B, Hkv, T, 16), torch.randn(B, Hkv, T, 16)
    torch.testing.assert_close(self_extend_attention(q, k, v, G, W).double(), naive_self_extend(q, k, v, G, W),
                               atol=1e-5, rtol=0)  # fmt: skip


def rope_tables(D, rope_base=10000.0):
    """positions -> (cos, sin) over the full head dimension (the `rope` argument of the kernel)."""
    inv_freq = 1.0 / (rope_base ** (torch.arange(0, D, 2, dtype=torch.float32) / D))

    def rope(positions):
        freqs = positions.float()[:, None] * inv_freq
        return torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()

    return rope


@pytest.mark.parametrize("fused", [True, False], ids=["fused-cpu", "tiles"])
@pytest.mark.parametrize("T, G, W", [(40, 3, 8), (70, 4, 6), (12, 2, 16)], ids=["both", "both-tiled", "T<=W"])
def test_scale_base_is_the_authors_query_scaling_on_both_branches(T, G, W, fused, monkeypatch):
    """scale_base 4: every query past position 2 is scaled (up to 3.1x at 70), neighbour keys included; the
    T <= W case has only the neighbour branch, where scaling the grouped branch alone changes nothing."""
    monkeypatch.setattr(se, "FUSED_CPU", fused)
    monkeypatch.setattr(se, "QUERY_BLOCK", 16)
    monkeypatch.setattr(se, "KEY_TILE", 8)
    torch.manual_seed(T)
    q, k, v = torch.randn(2, 4, T, 16), torch.randn(2, 2, T, 16), torch.randn(2, 2, T, 16)
    pos = torch.arange(T)
    got = se.grouped_neighbour_attention(q, k, v, pos, pos, rope_tables(16), G, W, scale_base=4.0)
    expected = naive_self_extend(q, k, v, G, W, scale_base=4.0)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)
    assert (expected - naive_self_extend(q, k, v, G, W)).abs().max() > 0.1  # the scaling matters here


def test_a_sequence_within_the_window_is_causal_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 20, 16), torch.randn(2, 4, 20, 16), torch.randn(2, 4, 20, 16)
    pos = torch.arange(20)
    qr, kr = naive_rope(q, pos, 16, 10000.0), naive_rope(k, pos, 16, 10000.0)
    causal = torch.nn.functional.scaled_dot_product_attention(qr.float(), kr.float(), v, is_causal=True)
    torch.testing.assert_close(self_extend_attention(q, k, v, 4, 20), causal, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-cpu", "tiles"])
def test_gradients_match_the_naive_implementation(fused, monkeypatch):
    monkeypatch.setattr(se, "FUSED_CPU", fused)
    monkeypatch.setattr(se, "QUERY_BLOCK", 8)
    monkeypatch.setattr(se, "KEY_TILE", 5)
    torch.manual_seed(1)
    leaves = [torch.randn(2, 4, 30, 8, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    grads = []
    for fn in (lambda q, k, v: self_extend_attention(q, k, v, 3, 7), lambda q, k, v: naive_self_extend(q, k, v, 3, 7)):
        out = fn(*leaves)
        grads.append(torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), leaves))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)  # RoPE tables are float32


SE = {"name": "self_extend", "group_size": 3, "window": 10}


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-pythia"])
@pytest.mark.parametrize("attention", [SE, {"name": "ssa", "base": SE}, {**SE, "scale_base": 4.0}])
def test_chunked_prefill_and_decoding_equal_the_full_forward_beyond_the_trained_context(preset, attention):
    """With scale_base too: a decoded query is scaled at its absolute position, not at the chunk's length."""
    torch.manual_seed(0)
    model = GPT(Config.from_name(preset, block_size=32, attention=attention)).eval()
    assert model.max_seq_length == (32 - 10) * 3 + 10
    idx = torch.randint(0, 200, (2, 60))  # almost twice the trained context
    with torch.no_grad():
        full = model(idx)
        model.set_kv_cache(batch_size=2)
        steps = [model(idx[:, :7], input_pos=torch.arange(7)), model(idx[:, 7:25], input_pos=torch.arange(7, 25))]
        steps += [model(idx[:, t : t + 1], input_pos=torch.tensor([t])) for t in range(25, 60)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)


def test_within_the_window_the_model_is_the_causal_model():
    torch.manual_seed(0)
    causal = GPT(Config.from_name("tiny-llama")).eval()
    extended = GPT(Config.from_name("tiny-llama", attention={"name": "self_extend", "group_size": 4, "window": 64}))
    extended.load_state_dict(causal.state_dict())
    idx = torch.randint(0, 200, (1, 64))
    with torch.no_grad():
        torch.testing.assert_close(extended.eval()(idx), causal(idx), atol=1e-5, rtol=0)


def test_the_model_trains_with_self_extend_and_ssa():
    torch.manual_seed(0)
    model = GPT(Config.from_name("tiny-llama", block_size=32, attention={"name": "ssa", "base": SE}))
    idx = torch.randint(0, 200, (2, 50))
    model.loss(idx, idx).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_bad_configurations_are_clear_errors():
    with pytest.raises(ValueError, match="learned absolute positions"):
        GPT(Config.from_name("tiny-gpt2", attention=SE))
    with pytest.raises(ValueError, match="window=200 must be smaller than the trained context"):
        GPT(Config.from_name("tiny-llama", attention={"name": "self_extend", "window": 200}))
    with pytest.raises(ValueError, match="handles at most"):
        GPT(Config.from_name("tiny-llama", block_size=32, attention=SE))(torch.zeros(1, 80, dtype=torch.long))
    with pytest.warns(UserWarning, match="sliding window"):
        GPT(Config.from_name("tiny-llama", sliding_window_size=16, attention=SE))


def test_the_module_api_equals_the_function():
    torch.manual_seed(0)
    module = SelfExtendAttention(dim=32, n_head=4, group_size=2, window=5)
    q, k, v = torch.randn(2, 24, 32), torch.randn(2, 24, 32), torch.randn(2, 24, 32)
    heads = [x.view(2, 24, 4, 8).transpose(1, 2) for x in (q, k, v)]
    expected = self_extend_attention(*heads, 2, 5).transpose(1, 2).reshape(2, 24, 32)
    torch.testing.assert_close(module(q, k, v, torch.arange(24)), expected)


def test_a_checkpoint_runs_with_self_extend_from_the_command_line_beyond_its_context(tmp_path, capsys):
    from litattn import checkpoint as ckpt
    from litattn.cli import main
    from litattn.generate import generate
    from litattn.tokenizer import Tokenizer

    text = tmp_path / "corpus.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 20 + "the quick brown fox jumps over the lazy dog\n" * 20)
    tokenizer = Tokenizer.train([text], 300, tmp_path / "tok")
    config = Config.from_name("tiny-llama", block_size=32, vocab_size=300)
    torch.manual_seed(0)
    ckpt.save_checkpoint(tmp_path / "ckpt", GPT(config).state_dict(), config, tokenizer)
    spec = "{name: self_extend, group_size: 3, window: 10}"
    main(["generate", "--checkpoint_dir", str(tmp_path / "ckpt"), "--prompt", "def add(a, b):",
          "--max_new_tokens", "50", "--temperature", "0", "--attention", spec])  # fmt: skip
    out = capsys.readouterr()
    assert "Generated 50 tokens" in out.err  # 50 new tokens after the prompt: beyond the 32 it was trained at
    extended = GPT(Config.from_name("tiny-llama", block_size=32, vocab_size=300, attention=SE)).eval()
    extended.load_state_dict(ckpt.load_state_dict(tmp_path / "ckpt" / ckpt.MODEL_FILE))
    ids = generate(extended, torch.tensor(tokenizer.encode("def add(a, b):")), 50, temperature=0)
    assert out.out.rstrip("\n") == tokenizer.decode(ids.tolist())
    assert ckpt.load_config(tmp_path / "ckpt").attention["name"] == "causal"  # the checkpoint is untouched


@pytest.mark.parametrize("scale_base", [None, 4.0])
def test_attention_maps_are_the_merged_softmax_and_the_observed_forward_is_the_forward(scale_base, monkeypatch):
    """visualize and truncation read Self-Extend's probabilities through the observer, block by block."""
    monkeypatch.setattr(se, "QUERY_BLOCK", 16)
    torch.manual_seed(0)
    spec = {"name": "self_extend", "group_size": 3, "window": 10, "scale_base": scale_base}
    config = Config.from_name("tiny-llama", block_size=32, attention=spec)
    model = GPT(config).eval()
    idx = torch.randint(0, config.vocab_size, (2, 50))
    inputs = []
    original = se.SelfExtend.attend

    def recording(self, q, k, v, ctx):
        inputs.append((q, k, v))  # before RoPE: Self-Extend rotates inside attend
        return original(self, q, k, v, ctx)

    monkeypatch.setattr(se.SelfExtend, "attend", recording)
    maps = model.attention_maps(idx)
    assert len(maps) == config.n_layer and maps[0].shape == (2, config.n_head, 50, 50)
    for m, (q, k, v) in zip(maps, inputs, strict=True):
        expected = naive_self_extend(q, k, v, 3, 10, config.rope_base, config.rope_n_elem, True, scale_base)
        torch.testing.assert_close(m.double(), expected, atol=1e-5, rtol=0)

    calls = []
    observer = type("Counting", (), {"observe": lambda self, layer, start, probs: calls.append((layer, start))})()
    with torch.no_grad():
        observed = model.lm_head(model.observe(idx, observer))
        torch.testing.assert_close(observed, model(idx), atol=1e-5, rtol=0)
    assert calls == [(layer, start) for layer in range(config.n_layer) for start in (0, 16, 32, 48)]


# ------------------------------------------------------------- SelfExtendAttn: the `selfextend` package's API
def rms_normed(x, eps=1e-6):
    """x / sqrt(mean(x^2) + eps) over the last dimension, written out (RMSNorm with its gain at 1)."""
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def test_the_packages_snippet_runs_and_qk_norm_is_rms_norm_per_head():
    """The package's README lines (dim 512, g_size 2, w_size 4, q = k = v, pos (1, 10)), then the norm."""
    from litattn.attention import SelfExtendAttn as from_package

    assert from_package is se.SelfExtendAttn
    dim, g_size, w_size = 512, 2, 4
    torch.manual_seed(0)
    self_extend = se.SelfExtendAttn(dim, g_size, w_size, qk_norm=True)
    q = k = v = torch.randn(1, 10, dim)
    pos = torch.arange(0, 10).unsqueeze(0)
    output = self_extend(q, k, v, pos)
    assert output.shape == (1, 10, 512)
    heads = q.view(1, 1, 10, dim)  # heads=1: the whole of dim is one head
    expected = self_extend_attention(rms_normed(heads), rms_normed(heads), heads, g_size, w_size)
    torch.testing.assert_close(output, expected.view(1, 10, dim), atol=1e-5, rtol=0)

    # the norm itself, where it matters: 4 heads of distinct sizes, small q and k (near-uniform without it)
    attn = se.SelfExtendAttn(32, g_size, w_size, qk_norm=True, heads=4)
    q, k, v = (torch.randn(2, 10, 4, 8) * torch.tensor([0.01, 0.1, 1.0, 3.0])[:, None] for _ in range(3))
    heads = [x.transpose(1, 2) for x in (q, k, v)]
    expected = self_extend_attention(rms_normed(heads[0]), rms_normed(heads[1]), heads[2], g_size, w_size)
    output = attn(*(x.reshape(2, 10, 32) for x in (q, k, v)), torch.arange(10))
    torch.testing.assert_close(output, expected.transpose(1, 2).reshape(2, 10, 32), atol=1e-5, rtol=0)
    assert (expected - self_extend_attention(*heads, g_size, w_size)).abs().max() > 0.1


PACKAGE_README = """
import torch
from se_attn import SelfExtendAttn
dim = 512
g_size = 2
w_size = 4
self_extend = SelfExtendAttn(dim, g_size, w_size, qk_norm=True)
q = torch.randn(1, 10, dim)
k = torch.randn(1, 10, dim)
v = torch.randn(1, 10, dim)
pos = torch.arange(0, 10).unsqueeze(0)
output = self_extend(q, k, v, pos)
print(output)
"""
"""The usage lines of the `selfextend` package's README (comments left out)."""


def test_the_snippet_in_the_docs_runs_with_only_the_import_changed(capsys):
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "mechanisms.md").read_text()
    blocks = [b.split("```", 1)[0] for b in doc.split("```python")[1:]]
    (snippet,) = [b for b in blocks if "SelfExtendAttn(dim, g_size, w_size, qk_norm=True)" in b]
    code = "\n".join(line.removeprefix("  ") for line in snippet.splitlines())
    statements = [line.split("#")[0].rstrip() for line in code.splitlines() if line.split("#")[0].strip()]
    package = PACKAGE_README.replace("from se_attn import", "from litattn.attention import").splitlines()
    assert statements == [line.split("#")[0].rstrip() for line in package if line.split("#")[0].strip()]
    scope: dict = {}
    exec(compile(code, "docs/mechanisms.md", "exec"), scope)
    assert scope["output"].shape == (1, 10, 512) and "tensor(" in capsys.readouterr().out


@pytest.mark.parametrize("qk_norm", [False, True])
def test_per_row_positions_equal_separate_calls(qk_norm):
    torch.manual_seed(0)
    attn = se.SelfExtendAttn(32, 3, 5, qk_norm=qk_norm, heads=2, scale_base=4.0)
    if qk_norm:  # gains away from 1, so a norm applied to the wrong rows or heads shows
        with torch.no_grad():
            attn.q_norm.weight.uniform_(0.5, 1.5), attn.k_norm.weight.uniform_(0.5, 1.5)
    q, k, v = torch.randn(3, 24, 32), torch.randn(3, 24, 32), torch.randn(3, 24, 32)
    pos = torch.stack([torch.arange(24), 2 * torch.arange(24) + 7, torch.arange(24).repeat_interleave(2)[:24]])
    together = attn(q, k, v, pos)
    for b in range(3):
        alone = attn(q[b : b + 1], k[b : b + 1], v[b : b + 1], pos[b])  # (T,) pos
        torch.testing.assert_close(together[b : b + 1], alone, atol=1e-6, rtol=0)
    shared = attn(q, k, v, pos[1:2])  # (1, T): every row at row 1's positions
    assert (shared[2] - together[2]).abs().max() > 0.1  # so per-row positions were used
    torch.testing.assert_close(shared, attn(q, k, v, pos[1]))  # (1, T) and (T,) alike


def test_the_package_api_equals_the_function_on_heads():
    torch.manual_seed(0)
    B, T, H, hs = 2, 30, 4, 8
    q, k, v = torch.randn(B, T, H * hs), torch.randn(B, T, H * hs), torch.randn(B, T, H * hs)
    heads = [x.view(B, T, H, hs).transpose(1, 2) for x in (q, k, v)]
    expected = self_extend_attention(*heads, 3, 7).transpose(1, 2).reshape(B, T, H * hs)
    attn = se.SelfExtendAttn(H * hs, 3, 7, qk_norm=False, heads=H)
    torch.testing.assert_close(attn(q, k, v, torch.arange(T).unsqueeze(0)), expected)
    assert list(attn.parameters()) == []


@pytest.mark.parametrize(
    "build, call, message",
    [
        (dict(dim=12, g_size=2, w_size=4, heads=4), None, "dim=12 must be heads=4 x an even head size"),
        (dict(dim=8, g_size=0, w_size=4), None, "g_size must be an integer >= 1, got 0"),
        (dict(dim=8, g_size=2, w_size=4, scale_base=1), None, "scale_base must be a number > 1, got 1"),
        (dict(dim=8, g_size=2, w_size=4), torch.arange(10).view(2, 5), r"pos must be integers of shape \(3, 10\)"),
        (dict(dim=8, g_size=2, w_size=4), torch.arange(10.0), "got float32 of shape"),
        (dict(dim=8, g_size=2, w_size=4), torch.arange(10).flip(0), "non-decreasing along each row"),
        (dict(dim=8, g_size=2, w_size=4), torch.arange(10) - 1, "pos must be >= 0"),
    ],
)
def test_the_package_api_refuses_what_it_cannot_run_in_one_line(build, call, message):
    with pytest.raises(ValueError, match=message) as error:
        attn = se.SelfExtendAttn(**build)
        attn(*(torch.randn(3, 10, 8),) * 3, call)
    assert "\n" not in str(error.value)
