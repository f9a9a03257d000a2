"""Disrupt/SET attention against a naive masked softmax written here, on random segment layouts in a batch
(GQA, several num_sink); causal with no Disrupt token; isolation across a Disrupt token; cached decoding."""

import pytest
import torch

import litattn.attention.disrupt_set as ds
from litattn import GPT, Config
from litattn.attention.base import AttentionContext
from litattn.attention.registry import split_spec
from reference import assert_same_gradients

DISRUPT = ds.DISRUPT_ID


def naive(q, k, v, segments, num_sink):
    """q (B, H, T, D), k, v (B, Hkv, T, D), segments (B, T): explicit T x T mask and softmax in float64."""
    B, H, T, D = q.shape
    k, v = (x.repeat_interleave(H // k.shape[1], dim=1).double() for x in (k, v))
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    same = segments[:, None, :, None] == segments[:, None, None, :]  # (B, 1, T, T)
    allowed = (j <= i) & (same | (j < num_sink))
    scores = (q.double() @ k.transpose(-1, -2) / D**0.5).masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


def random_segments(B, T, generator):
    """Each row its own layout: Disrupt tokens at random places (some rows none)."""
    starts = torch.rand(B, T, generator=generator) < torch.tensor([0.0, 0.05, 0.2, 0.5])[:B, None]
    starts[:, 0] = False
    return starts.long().cumsum(1)


def mechanism(config, **options):
    cls, opts = split_spec({"name": "disrupt_set", **options})
    return cls(config, 0, opts)


@pytest.mark.parametrize("num_sink", [0, 1, 4])
@pytest.mark.parametrize("H, Hkv", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("block", [8, 128])
def test_equals_the_naive_masked_softmax(num_sink, H, Hkv, block, monkeypatch):
    monkeypatch.setattr(ds, "QUERY_BLOCK", block)
    g = torch.Generator().manual_seed(num_sink * 10 + H + Hkv)
    B, T, D = 4, 50, 8
    config = Config.from_name("tiny-llama", n_head=H, n_query_groups=Hkv, n_embd=H * D)
    q, k, v = (torch.randn(B, h, T, D, generator=g) for h in (H, Hkv, Hkv))
    segments = random_segments(B, T, g)
    ctx = AttentionContext(torch.arange(T), None, None, None, metadata={"segment_ids": segments})
    got = mechanism(config, num_sink=num_sink).attend(q, k, v, ctx)
    torch.testing.assert_close(got.double(), naive(q, k, v, segments, num_sink), atol=1e-5, rtol=0)


def test_gradients_match_the_naive_implementation(monkeypatch):
    monkeypatch.setattr(ds, "QUERY_BLOCK", 8)
    g = torch.Generator().manual_seed(0)
    config = Config.from_name("tiny-llama", n_head=4, n_query_groups=2, n_embd=32)
    leaves = [torch.randn(3, h, 30, 8, dtype=torch.float64, generator=g, requires_grad=True) for h in (4, 2, 2)]
    segments = random_segments(3, 30, g)
    ctx = AttentionContext(torch.arange(30), None, None, None, metadata={"segment_ids": segments})
    assert_same_gradients(
        lambda q, k, v: mechanism(config, num_sink=2).attend(q, k, v, ctx),
        lambda q, k, v: naive(q, k, v, segments, 2),
        leaves,
        g,
    )


def models(**options):
    torch.manual_seed(0)
    causal = GPT(Config.from_name("tiny-llama", block_size=96)).eval()
    disrupt = GPT(Config.from_name("tiny-llama", block_size=96, attention={"name": "disrupt_set", **options})).eval()
    disrupt.load_state_dict(causal.state_dict())
    return causal, disrupt


def test_without_a_disrupt_token_it_is_causal_attention():
    causal, disrupt = models(num_sink=4)
    idx = torch.randint(DISRUPT + 1, 200, (2, 96))
    with torch.no_grad():
        torch.testing.assert_close(disrupt(idx), causal(idx), atol=1e-6, rtol=0)


def test_tokens_before_a_disrupt_token_change_nothing_after_it_but_the_sinks_do():
    _, disrupt = models(num_sink=2)
    idx = torch.randint(DISRUPT + 1, 200, (1, 80))
    idx[0, 40] = DISRUPT
    changed = idx.clone()
    changed[0, 2:40] = torch.randint(DISRUPT + 1, 200, (38,))
    sink_changed = idx.clone()
    sink_changed[0, 1] = (idx[0, 1] + 1) % 200 + DISRUPT + 1
    with torch.no_grad():
        base, after, sinks = disrupt(idx), disrupt(changed), disrupt(sink_changed)
    torch.testing.assert_close(after[:, 40:], base[:, 40:], atol=1e-6, rtol=0)
    assert (after[:, 2:40] - base[:, 2:40]).abs().max() > 1e-3
    assert (sinks[:, 40:] - base[:, 40:]).abs().max() > 1e-4  # sink tokens stay visible across the reset


def test_segment_ids_from_the_batch_take_precedence_over_the_token_ids():
    _, disrupt = models(num_sink=1)
    idx = torch.randint(DISRUPT + 1, 200, (2, 64))
    segments = (torch.arange(64) >= 32).long().expand(2, -1)  # a reset at 32 without a Disrupt token
    marked = idx.clone()
    marked[:, 32] = DISRUPT
    with torch.no_grad():
        given = disrupt(marked, segment_ids=segments)
        derived = disrupt(marked)
        plain = disrupt(idx, segment_ids=segments)
    torch.testing.assert_close(given, derived, atol=1e-6, rtol=0)
    assert (plain[:, 33:] - disrupt(idx)[:, 33:]).abs().max() > 1e-4  # the given segments do reset


@pytest.mark.parametrize("chunks", [[64], [20, 1, 30, 13], [1] * 64])
def test_cached_decoding_equals_the_full_forward(chunks):
    """A prompt holding Disrupt tokens, prefilled in chunks of any size, then tokens decoded one at a time,
    one of them a Disrupt token forced mid-generation: every step's logits equal the full forward's."""
    _, disrupt = models(num_sink=2)
    idx = torch.randint(DISRUPT + 1, 200, (2, 90))
    idx[0, 10] = idx[1, 30] = idx[0, 50] = idx[:, 75] = DISRUPT  # 75: after the prompt, "generated"
    with torch.no_grad():
        full = disrupt(idx)
        disrupt.set_kv_cache(2)
        pieces, start = [], 0
        for n in chunks + [1] * (90 - sum(chunks)):
            pos = torch.arange(start, start + n)
            pieces.append(disrupt(idx[:, start : start + n], pos))
            start += n
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


def test_the_model_trains_and_maps_read_the_mask():
    _, disrupt = models(num_sink=1)
    disrupt.train()
    idx = torch.randint(DISRUPT + 1, 200, (2, 64))
    idx[:, 20] = DISRUPT
    loss = disrupt.loss(idx[:, :-1], idx[:, 1:])
    loss.backward()
    assert torch.isfinite(loss) and disrupt.transformer.wte.weight.grad.abs().sum() > 0
    maps = disrupt.eval().attention_maps(idx[:1])
    assert maps[0][0, :, 30, 1:20].abs().max() == 0 and (maps[0][0, :, 30, 0] > 0).all()  # reset; the sink


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="num_sink must be >= 0"):
        GPT(Config.from_name("tiny-llama", attention={"name": "disrupt_set", "num_sink": -1}))
    with pytest.raises(ValueError, match="disrupt_id 100000 is outside the vocabulary"):
        GPT(Config.from_name("tiny-llama", attention={"name": "disrupt_set", "disrupt_id": 100000}))
    _, disrupt = models()
    with pytest.raises(ValueError, match="must not decrease"):
        disrupt(torch.randint(0, 200, (1, 8)), segment_ids=torch.tensor([[0, 1, 1, 0, 0, 1, 1, 1]]))
