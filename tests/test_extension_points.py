"""The extension points the remaining mechanisms build on, each exercised by a small mechanism written here
(not a shipped one): metadata derived from token ids and kept in the KV cache, keys cached before RoPE,
positions apart from cache slots, two disjoint attention passes merged by their log-sum-exp, a layer loop
that repeats blocks, attention observers, and the per-context memo."""

import dataclasses

import pytest
import torch

from litattn import GPT, Config
from litattn.attention import AttentionMechanism, masks, register_attention
from litattn.attention.kernels import attend, merge_attention
from litattn.attention.observers import ReceivedAttention
from litattn.generate import generate
from litattn.training import flops_per_token

RESET = 7  # the token id that starts a new segment in the segment mechanism


@register_attention("test_segments")
class SegmentAttention(AttentionMechanism):
    """Causal attention within segments; a RESET token starts a new one (a Disrupt-like test mechanism)."""

    metadata_keys = {"segment_ids": "(B, T) long: segment of each token"}
    cached_extras = {"segment_ids": torch.long}

    def prepare_context(self, ctx):
        if "segment_ids" in ctx.metadata:
            return
        segments = (ctx.idx == RESET).long().cumsum(dim=1)
        if ctx.input_pos is not None and int(ctx.input_pos[0]) > 0:  # decoding: continue the cached segments
            segments = (
                segments + self.kv_cache.extras["segment_ids"][: ctx.idx.shape[0], int(ctx.input_pos[0]) - 1, None]
            )
        ctx.metadata["segment_ids"] = segments

    def cache_values(self, ctx, batch_size):
        return {"segment_ids": ctx.metadata["segment_ids"]}

    def mask_mod(self, ctx):
        q_seg = ctx.metadata["segment_ids"]
        k_seg = q_seg if ctx.input_pos is None else self.kv_cache.extras["segment_ids"][: q_seg.shape[0], : ctx.kv_len]
        slots = ctx.slots

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= slots[q_idx]) & (k_seg[b, kv_idx] == q_seg[b, q_idx])

        return mask_mod


@register_attention("test_prerope")
class PreRoPECache(AttentionMechanism):
    """Causal attention that caches keys before RoPE and rotates the cached keys at their stored positions."""

    cache_before_rope = True


@register_attention("test_two_pass")
class TwoPassAttention(AttentionMechanism):
    """Causal attention computed as two passes over disjoint key sets (even and odd slots), merged exactly."""

    def attend(self, q, k, v, ctx):
        slots = ctx.slots
        parts = [
            attend(q, k, v, mask_mod=lambda b, h, qi, kv, r=r: (kv <= slots[qi]) & (kv % 2 == r), return_lse=True)
            for r in (0, 1)
        ]
        return merge_attention(parts)[0]


@register_attention("test_repeat")
class RepeatFirstBlocks(AttentionMechanism):
    """Causal attention with a layer loop that runs the first two blocks twice, then the rest once."""

    def run_blocks(self, blocks, x, ctx):
        for block in [*blocks[:2], *blocks[:2], *blocks[2:]]:
            x = block(x, ctx)
        return x

    def block_applications(self, n_layer):
        return n_layer + 2


def tiny(name="tiny-llama", attention="causal", **overrides):
    torch.manual_seed(0)
    return GPT(Config.from_name(name, attention={"name": attention}, **overrides))


def same_weights(model, reference):
    model.load_state_dict(reference.state_dict())
    return model


def greedy_without_cache(model, prompt, n):
    ids = prompt.clone()
    for _ in range(n):
        ids = torch.cat([ids, model(ids[None])[0, -1, : model.config.vocab_size].argmax()[None]])
    return ids


# ---------------------------------------------------------------------------------- metadata + cache extras
def test_metadata_derived_from_token_ids_and_kept_in_the_cache_decodes_like_a_full_forward():
    model = tiny(attention="test_segments").eval()
    prompt = torch.tensor([3, 9, RESET, 11, 4, RESET, 5, 2])
    with torch.no_grad():
        cached = generate(model, prompt, 12, temperature=0)
        full = greedy_without_cache(model, prompt, 12)
        assert torch.equal(cached, full)
        # the segments matter: causal attention continues differently, and logits differ across a reset
        causal = same_weights(tiny(), model).eval()
        idx = prompt[None]
        assert not torch.allclose(model(idx)[0, 3:], causal(idx)[0, 3:])
        torch.testing.assert_close(model(idx)[0, :2], causal(idx)[0, :2])  # before the first reset: the same


def test_metadata_a_mechanism_does_not_declare_is_an_error():
    model = tiny()
    with pytest.raises(ValueError, match=r"reads no metadata \['segment_ids'\]"):
        model(torch.tensor([[1, 2, 3]]), segment_ids=torch.zeros(1, 3, dtype=torch.long))


# ---------------------------------------------------------------------------------- keys before RoPE, positions
@pytest.mark.parametrize("attention", ["causal", "test_prerope"])
def test_positions_apart_from_cache_slots_decode_like_a_full_forward(attention):
    """Kept tokens of a truncated input keep their original positions in contiguous slots."""
    model = tiny(attention=attention).eval()
    idx = torch.randint(0, 200, (2, 9))
    positions = torch.tensor([0, 1, 2, 6, 7, 8, 9, 15, 16])
    with torch.no_grad():
        full = model(idx, positions=positions)
        model.set_kv_cache(batch_size=2)
        steps = [model(idx[:, :4], input_pos=torch.arange(4), positions=positions[:4])]
        for t in range(4, 9):
            steps.append(model(idx[:, t : t + 1], input_pos=torch.tensor([t]), positions=positions[t : t + 1]))
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
        assert not torch.allclose(full, model(idx), atol=1e-3)  # the positions given were used


def test_a_pre_rope_cache_holds_unrotated_keys_and_their_positions():
    model = tiny(attention="test_prerope").eval()
    causal = same_weights(tiny(), model).eval()
    idx = torch.randint(0, 200, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), causal(idx), atol=1e-5, rtol=0)  # same function without a cache
        model.set_kv_cache(batch_size=1)
        causal.set_kv_cache(batch_size=1)
        model(idx[:, :6], input_pos=torch.arange(6))
        causal(idx[:, :6], input_pos=torch.arange(6))
        mine, theirs = model.transformer.h[0].attn.mechanism.kv_cache, causal.transformer.h[0].attn.mechanism.kv_cache
        assert torch.equal(mine.extras["positions"][0, :6], torch.arange(6))
        assert torch.allclose(mine.k[:, :, 0], theirs.k[:, :, 0])  # position 0: RoPE is the identity
        assert not torch.allclose(mine.k[:, :, 1:6], theirs.k[:, :, 1:6])  # elsewhere: unrotated vs rotated


# ---------------------------------------------------------------------------------- two passes merged by lse
def test_two_disjoint_passes_merged_equal_causal_attention_with_gradients():
    causal = tiny()
    two = same_weights(tiny(attention="test_two_pass"), causal)
    idx = torch.randint(0, 200, (2, 16))
    targets = torch.randint(0, 200, (2, 16))
    for model in (causal, two):
        model.zero_grad()
        model.loss(idx, targets).backward()
    torch.testing.assert_close(two(idx), causal(idx), atol=1e-5, rtol=0)
    for (name, a), (_, b) in zip(causal.named_parameters(), two.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)


# ---------------------------------------------------------------------------------- layer loop
def test_a_layer_loop_that_repeats_blocks_is_counted_by_flops_and_visualize():
    config = dict(n_layer=3)
    causal, repeat = tiny(**config), tiny(attention="test_repeat", **config)
    idx = torch.randint(0, 200, (1, 12))
    maps = repeat.attention_maps(idx)
    assert len(maps) == repeat.block_applications() == 5
    # the maps are those of blocks 0, 1, 0, 1, 2: the repeated blocks see other inputs the second time
    assert not torch.allclose(maps[0], maps[2])
    block = sum(p.numel() for n, p in causal.named_parameters() if n.startswith("transformer.h.0.") and p.ndim == 2)
    extra = flops_per_token(repeat, 64) - flops_per_token(causal, 64)
    assert extra == pytest.approx(2 * (6 * block + 12 * causal.config.n_head * causal.config.head_size * 64))
    ctx_blocks = []
    repeat.observe(idx, type("Spy", (), {"observe": lambda self, layer, q_start, probs: ctx_blocks.append(layer)})())
    assert ctx_blocks == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------------------------- observer
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_observer_column_sums_equal_the_dense_maps(name, monkeypatch):
    import litattn.attention.kernels as kernels

    model = tiny(name, sliding_window_size=5).eval()
    idx = torch.randint(0, 200, (2, 20))
    dense = model.attention_maps(idx)
    monkeypatch.setattr(kernels, "MASK_BUDGET", 2 * 20 * 3)  # several query chunks of 3
    received = ReceivedAttention()
    hidden = model.observe(idx, received)
    torch.testing.assert_close(hidden, model.hidden_states(idx), atol=1e-5, rtol=0)
    assert len(received.sums) == len(dense) == model.config.n_layer
    for layer, probs in enumerate(dense):
        torch.testing.assert_close(received.sums[layer], probs.sum(dim=2), atol=1e-5, rtol=0)
        q, k = torch.meshgrid(torch.arange(20), torch.arange(20), indexing="ij")
        assert (probs[..., (q - k >= 5) | (k > q)] == 0).all()  # the window and causality hold


# ---------------------------------------------------------------------------------- memo
def test_a_sub_pass_never_sees_another_pass_mask():
    model = tiny(sliding_window_size=4)
    ctx = model._context(torch.randint(0, 200, (1, 10)), None, None, {})
    full = ctx.memoize("sliding_window", lambda: masks.sliding_window(ctx.slots, 4))
    sub = dataclasses.replace(ctx, positions=ctx.positions[:6], cos=ctx.cos[:6], sin=ctx.sin[:6])
    assert sub.memo == {} and ctx.memo
    built = model.mechanism.mask_mod(sub)
    assert built is not full
    dense = masks.materialize(built, 1, torch.arange(6), 6, "cpu")[0, 0]
    assert dense.shape == (6, 6) and dense.tril().equal(dense)


# ---------------------------------------------------------------------------------- output head
def test_the_context_hands_a_layer_loop_the_output_head():
    """A layer loop that scores its own states (hybrid's gradient refinement) reads the model's final norm and
    head from the context: applied to the last block's output it gives the model's logits."""
    model = tiny().eval()
    idx = torch.randint(0, 200, (2, 9))
    with torch.no_grad():
        ctx = model._context(idx, None, None, {})
        h = model.mechanism.run_blocks(model.transformer.h, model.transformer.wte(idx), ctx)
        torch.testing.assert_close(ctx.head(h), model(idx))
