"""Hybrid attention against references written here: the prefix-LM mask as a naive masked softmax on random prefix
lengths in a batch (GQA too), the plain prefix-LM model (iterations 1, refinements off) and the causal model (no
prefix); who depends on whom; cached decoding; gradients; added thought layers; bounded training memory."""

import pytest
import torch

import litattn.attention.hybrid as hy
from litattn import GPT, Config
from litattn.args import LogArgs
from litattn.attention import AttentionMechanism, register_attention
from litattn.attention.base import AttentionContext
from litattn.attention.registry import normalize_attention_spec, split_spec
from litattn.data.instructions import InstructionDataset
from litattn.generate import generate
from litattn.hooks import HookContext
from litattn.sampling import sample_prompt
from litattn.training import collate, flops_per_token
from reference import assert_same_gradients

END = hy.ENDTHOUGHT_ID


def naive(q, k, v, prefix_len):
    """q (B, H, T, D), k, v (B, Hkv, T, D), prefix_len (B,): explicit T x T prefix-LM mask, softmax in float64."""
    B, H, T, D = q.shape
    k, v = (x.repeat_interleave(H // k.shape[1], dim=1).double() for x in (k, v))
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    p = prefix_len[:, None, None, None]
    allowed = (j <= i) | ((j < p) & (i < p))  # (B, 1, T, T)
    scores = (q.double() @ k.transpose(-1, -2) / D**0.5).masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


@register_attention("test_dense_prefix_lm")
class DensePrefixLM(AttentionMechanism):
    """The plain prefix-LM, written naively: every layer once, a dense T x T mask (full forwards only)."""

    metadata_keys = {"prefix_len": "(B,) long"}

    def attend(self, q, k, v, ctx):
        q, k = q.double(), k.double()
        return naive(q, k, v, ctx.metadata["prefix_len"]).to(v.dtype)


def mechanism(config, **options):
    cls, opts = split_spec(normalize_attention_spec({"name": "hybrid", **options}))
    return cls(config, 0, opts)


def tiny(attention, **overrides):
    torch.manual_seed(0)
    spec = {"name": attention} if isinstance(attention, str) else attention
    return GPT(Config.from_name("tiny-llama", attention=spec, **overrides))


def hybrid(**options):
    return tiny({"name": "hybrid", **options})


def same_weights(model, reference):
    missing, unexpected = model.load_state_dict(reference.state_dict(), strict=False)
    assert not unexpected and all(".attn.mechanism." in key for key in missing)  # new: the mechanism's own
    return model


def activate(model, seed=1, blocks=True):
    """Move the refinements (and with `blocks` the added blocks) off their identity init, so every part acts."""
    g = torch.Generator().manual_seed(seed)
    mech = model.mechanism
    with torch.no_grad():
        if hasattr(mech, "reweight_weight"):
            mech.reweight_weight.fill_(0.7)
            mech.reweight_bias.fill_(-0.2)
        if hasattr(mech, "interpolation"):
            mech.interpolation.fill_(0.6)
        for block in getattr(mech, "thought_blocks", ()) if blocks else ():
            for proj in (block.attn.proj, block.mlp.proj):
                proj.weight.copy_(torch.randn(proj.weight.shape, generator=g) * 0.05)
    return model


def random_prefixes(B, T, g):
    """One row without a prefix, one all prefix, the others random."""
    return torch.cat([torch.tensor([0, T]), torch.randint(1, T, (B - 2,), generator=g)])[:B]


# ---------------------------------------------------------------------------------- the mask
@pytest.mark.parametrize("H, Hkv", [(4, 4), (4, 2), (4, 1)])
def test_attention_equals_the_naive_masked_softmax(H, Hkv):
    g = torch.Generator().manual_seed(H + Hkv)
    B, T, D = 5, 40, 8
    config = Config.from_name("tiny-llama", n_head=H, n_query_groups=Hkv, n_embd=H * D)
    q, k, v = (torch.randn(B, h, T, D, generator=g) for h in (H, Hkv, Hkv))
    prefix_len = random_prefixes(B, T, g)
    ctx = AttentionContext(torch.arange(T), None, None, None, metadata={"prefix_len": prefix_len})
    got = mechanism(config).attend(q, k, v, ctx)
    torch.testing.assert_close(got.double(), naive(q, k, v, prefix_len), atol=1e-5, rtol=0)
    # the flex kernel reads the same mask_mod (eager on CPU: inference only)
    flex = AttentionContext(torch.arange(T), None, None, None, metadata={"prefix_len": prefix_len})
    with torch.no_grad():
        got = mechanism(config, kernel="flex").attend(q, k, v, flex)
    torch.testing.assert_close(got.double(), naive(q, k, v, prefix_len), atol=1e-5, rtol=0)


def test_gradients_match_the_naive_implementation():
    g = torch.Generator().manual_seed(0)
    config = Config.from_name("tiny-llama", n_head=4, n_query_groups=2, n_embd=32)
    leaves = [torch.randn(4, h, 30, 8, dtype=torch.float64, generator=g, requires_grad=True) for h in (4, 2, 2)]
    prefix_len = random_prefixes(4, 30, g)
    ctx = AttentionContext(torch.arange(30), None, None, None, metadata={"prefix_len": prefix_len})
    assert_same_gradients(
        lambda q, k, v: mechanism(config).attend(q, k, v, ctx), lambda q, k, v: naive(q, k, v, prefix_len), leaves, g
    )


# ---------------------------------------------------------------------------------- the model against references
@pytest.mark.parametrize("add_thought_layers", [False, True])
def test_without_a_prefix_it_is_the_causal_model(add_thought_layers):
    causal = tiny("causal").eval()
    model = hybrid(iterations=3, reweighting=True, interpolation=True, add_thought_layers=add_thought_layers)
    model = activate(same_weights(model, causal), blocks=False).eval()  # added blocks: the identity at init
    idx = torch.randint(END + 1, 200, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), causal(idx), atol=1e-6, rtol=0)  # no marker: prefix_len 0
        torch.testing.assert_close(model(idx, prefix_len=torch.zeros(2, dtype=torch.long)), causal(idx))


def test_one_iteration_without_refinements_is_the_plain_prefix_lm():
    reference = tiny("test_dense_prefix_lm").eval()
    model = same_weights(hybrid(thought_layers=1), reference).eval()
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(END + 1, 200, (4, 20), generator=g)
    prefix_len = random_prefixes(4, 20, g)
    with torch.no_grad():
        torch.testing.assert_close(model(idx, prefix_len=prefix_len), reference(idx, prefix_len=prefix_len))


def test_added_thought_layers_start_as_the_identity():
    reference = tiny("test_dense_prefix_lm").eval()
    model = same_weights(hybrid(thought_layers=2, add_thought_layers=True), reference).eval()
    assert len(model.mechanism.thought_blocks) == 2 and model.block_applications() == 4
    g = torch.Generator().manual_seed(4)
    idx = torch.randint(END + 1, 200, (3, 20), generator=g)
    prefix_len = random_prefixes(3, 20, g)
    with torch.no_grad():
        ctx = model._context(idx, None, None, {"prefix_len": prefix_len})
        h = torch.randn(3, 20, model.config.n_embd, generator=g)
        for block in model.mechanism.thought_blocks:
            assert torch.equal(block(h, ctx), h)
        # the model then starts as the checkpoint's function (here: its prefix-LM)
        torch.testing.assert_close(model(idx, prefix_len=prefix_len), reference(idx, prefix_len=prefix_len))


@pytest.mark.parametrize("add_thought_layers", [False, True])
def test_the_prefix_sees_later_prefix_tokens_and_nothing_sees_later_tokens_after_it(add_thought_layers):
    model = hybrid(iterations=3, reweighting=True, interpolation=True, add_thought_layers=add_thought_layers)
    model = activate(model).eval()
    P, T = 6, 14
    idx = torch.randint(END + 1, 200, (1, T))
    prefix_len = torch.tensor([P])
    with torch.no_grad():
        logits = model(idx, prefix_len=prefix_len)
        for j in range(T):
            changed = idx.clone()
            changed[0, j] = (changed[0, j] + 1 - END) % (200 - END) + END + 1
            other = model(changed, prefix_len=prefix_len)
            if j < P:  # every earlier prefix position reads it
                assert all(not torch.allclose(other[0, i], logits[0, i], atol=1e-5) for i in range(j))
            else:  # no earlier position reads it
                torch.testing.assert_close(other[0, :j], logits[0, :j], atol=1e-6, rtol=0)
            assert not torch.allclose(other[0, j], logits[0, j], atol=1e-5)


def test_the_prefix_ends_after_the_first_endthought_token():
    model = activate(hybrid(iterations=2, reweighting=True)).eval()
    idx = torch.randint(END + 1, 200, (3, 12))
    idx[0, 4] = END
    idx[1, [2, 7]] = END
    with torch.no_grad():
        torch.testing.assert_close(model(idx), model(idx, prefix_len=torch.tensor([5, 3, 0])), atol=0, rtol=0)


# ---------------------------------------------------------------------------------- cached decoding
@pytest.mark.parametrize(
    "options",
    [
        dict(iterations=3, reweighting=True, interpolation=True),
        dict(iterations=4, thought_layers=2, add_thought_layers=True, interpolation=True, grad_iterations=1),
        dict(iterations=2, thought_layers=2, reweighting=True),  # every block thinks
        dict(iterations=2, reweighting=True, refine_steps=2, refine_lr=0.1),  # gradient refinement in the prefill
        dict(iterations=3, reweighting="focus", interpolation=True),
    ],
)
def test_cached_decoding_equals_the_full_forward(options):
    model = activate(hybrid(**options)).eval()
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(END + 1, 200, (2, 18), generator=g)
    prefix_len = torch.tensor([7, 3])
    prompt = 9
    with torch.no_grad():
        full = model(idx, prefix_len=prefix_len)
        model.set_kv_cache(batch_size=2)
        steps = [model(idx[:, :prompt], input_pos=torch.arange(prompt), prefix_len=prefix_len)]
        for t in range(prompt, 18):
            steps.append(model(idx[:, t : t + 1], input_pos=torch.tensor([t])))
        model.clear_kv_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def greedy_without_cache(model, prompt, n, **metadata):
    ids = prompt.clone()
    for _ in range(n):
        ids = torch.cat([ids, model(ids[None], **metadata)[0, -1, : model.config.vocab_size].argmax()[None]])
    return ids


def test_generate_reads_the_prompt_as_the_prefix():
    model = activate(hybrid(iterations=3, reweighting=True, interpolation=True, add_thought_layers=True)).eval()
    prompt = torch.randint(END + 1, 200, (8,))
    with torch.no_grad():
        cached = generate(model, prompt, 10, temperature=0, prefix_len=8)
        full = greedy_without_cache(model, prompt, 10, prefix_len=torch.tensor([8]))
        assert torch.equal(cached, full)
        marked = torch.cat([prompt[:5], torch.tensor([END]), prompt[5:]])  # a prefix from the marker
        assert torch.equal(generate(model, marked, 10, temperature=0), greedy_without_cache(model, marked, 10))
        causal = tiny("causal").eval()  # a mechanism that reads no prefix_len ignores it
        assert torch.equal(
            generate(causal, prompt, 5, temperature=0, prefix_len=8), greedy_without_cache(causal, prompt, 5)
        )


def test_focus_reweighting_against_a_hand_computed_case():
    """Each prefix state scaled by 1 + tanh(w * cos(y_i, y_focus) + b), the focus the row's last prefix state."""
    config = Config.from_name("tiny-llama")
    mech = mechanism(config, iterations=2, reweighting="focus")
    mech.build_modules(lambda i: None)
    with torch.no_grad():
        mech.reweight_weight.fill_(1.0)
        mech.reweight_bias.fill_(0.5)
    y = torch.tensor([[[3.0, 0.0], [0.0, 2.0], [1.0, 1.0], [5.0, 5.0]]])  # (1, 4, 2); prefix_len 3: focus (1, 1)
    inside = (torch.arange(4) < 3)[None, :, None]
    out = mech._refine(y, torch.zeros_like(y), inside, first=True)
    # cosines to (1, 1): 1/sqrt(2), 1/sqrt(2), 1 -> scales 1 + tanh(0.7071 + 0.5), 1 + tanh(0.7071 + 0.5), 1 + tanh(1.5)
    scales = torch.tensor([1.835810, 1.835810, 1.905148])
    torch.testing.assert_close(out[0, :3], y[0, :3] * scales[:, None], atol=1e-4, rtol=0)
    assert mech.reweighting == "focus" and mechanism(config, reweighting=True).reweighting == "mean"


def test_focus_reweighting_is_the_identity_at_init():
    plain = hybrid(iterations=3, interpolation=True).eval()
    focus = same_weights(hybrid(iterations=3, interpolation=True, reweighting="focus"), plain).eval()
    idx = torch.randint(END + 1, 200, (3, 16))
    prefix_len = torch.tensor([0, 16, 7])
    with torch.no_grad():
        torch.testing.assert_close(focus(idx, prefix_len=prefix_len), plain(idx, prefix_len=prefix_len))


def rethink_reference(model, prompt, n, k, prefix_len=0):
    """Greedy, uncached: before new token j the prefix is the prompt's (prefix_len) until j >= k, then the whole
    text as it stood at the last multiple of k; each token from a fresh full forward. -> (ids, logits per step)."""
    ids, logits = prompt.clone(), []
    for j in range(n):
        P = len(prompt) + (j // k) * k if k is not None and j >= k else prefix_len
        last = model(ids[None], prefix_len=torch.tensor([P]))[0, -1, : model.config.vocab_size]
        logits.append(last)
        ids = torch.cat([ids, last.argmax()[None]])
    return ids, torch.stack(logits)


def recorded_generate(model, prompt, n, monkeypatch, **kwargs):
    """generate (greedy, cached) -> (ids, the logits each token was chosen from)."""
    import litattn.generate as gen

    seen, real = [], gen.sample
    monkeypatch.setattr(gen, "sample", lambda logits, *a: (seen.append(logits), real(logits, 0))[1])
    out = generate(model, prompt, n, temperature=0, **kwargs)
    monkeypatch.setattr(gen, "sample", real)
    return out, torch.stack(seen)


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("prefix_len", [None, 4])
def test_rethink_logits_equal_a_fresh_full_forward_with_the_extended_prefix(k, prefix_len, monkeypatch):
    model = activate(hybrid(iterations=3, reweighting="focus", interpolation=True, add_thought_layers=True)).eval()
    prompt = torch.randint(END + 1, 200, (6,), generator=torch.Generator().manual_seed(k))
    with torch.no_grad():
        cached, seen = recorded_generate(model, prompt, 12, monkeypatch, prefix_len=prefix_len, rethink_every=k)
        reference, expected = rethink_reference(model, prompt, 12, k, prefix_len or 0)
        plain, plain_seen = recorded_generate(model, prompt, 12, monkeypatch, prefix_len=prefix_len)
    torch.testing.assert_close(seen, expected, atol=1e-5, rtol=0)
    assert torch.equal(cached, reference)
    assert not torch.allclose(seen[k:], plain_seen[k:], atol=1e-3)  # re-reading changes what follows
    torch.testing.assert_close(seen[:k], plain_seen[:k], atol=1e-5, rtol=0)  # and nothing before


def test_rethink_after_more_tokens_than_generated_changes_nothing_and_is_the_mechanism_option(monkeypatch):
    model = activate(hybrid(iterations=2, reweighting=True)).eval()
    prompt = torch.randint(END + 1, 200, (5,))
    with torch.no_grad():
        plain = generate(model, prompt, 8, temperature=0, prefix_len=5)
        assert torch.equal(generate(model, prompt, 8, temperature=0, prefix_len=5, rethink_every=8), plain)
        assert torch.equal(generate(model, prompt, 8, temperature=0, prefix_len=5, rethink_every=50), plain)
        by_option = activate(same_weights(hybrid(iterations=2, reweighting=True, rethink_every=2), model)).eval()
        assert by_option.mechanism.rethink_every == 2
        assert torch.equal(
            generate(by_option, prompt, 8, temperature=0, prefix_len=5),
            generate(model, prompt, 8, temperature=0, prefix_len=5, rethink_every=2),
        )


def test_the_cache_after_a_rethink_equals_a_prefill_of_the_same_text():
    model = activate(hybrid(iterations=3, reweighting="focus", interpolation=True, add_thought_layers=True)).eval()
    ids = torch.randint(END + 1, 200, (1, 14))
    caches = lambda: [m.kv_cache for m in model.modules() if getattr(m, "kv_cache", None) is not None]  # noqa: E731
    with torch.no_grad():
        model.set_kv_cache(1, max_seq_length=20)
        model(ids[:, :6], input_pos=torch.arange(6), prefix_len=torch.tensor([4]))  # the prompt's prefill
        for t in range(6, 10):
            model(ids[:, t : t + 1], input_pos=torch.tensor([t]))  # decoding
        model(ids[:, :10], input_pos=torch.arange(10), prefix_len=torch.tensor([10]))  # the rethink
        after = [(c.k[:, :, :10].clone(), c.v[:, :, :10].clone()) for c in caches()]
        model.clear_kv_cache()
        model.set_kv_cache(1, max_seq_length=20)
        model(ids[:, :10], input_pos=torch.arange(10), prefix_len=torch.tensor([10]))  # a prefill of the same text
        fresh = [(c.k[:, :, :10], c.v[:, :, :10]) for c in caches()]
        model.clear_kv_cache()
    assert len(after) == len(fresh) == model.config.n_layer + 1  # every block, the added thought block too
    for (k1, v1), (k2, v2) in zip(after, fresh, strict=True):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)


def test_rethink_needs_a_mechanism_that_reads_a_prefix_and_no_streaming():
    causal = tiny("causal").eval()
    with pytest.raises(ValueError, match="rethink_every re-reads the text as a prefix, and attention 'causal'"):
        generate(causal, torch.tensor([30, 31]), 3, rethink_every=2)
    model = hybrid().eval()
    with pytest.raises(ValueError, match="cannot be streamed"):
        generate(model, torch.tensor([30, 31]), 3, rethink_every=2, stream_window=8, sink_size=1)
    with pytest.raises(ValueError, match="rethink_every must be >= 1"):
        generate(model, torch.tensor([30, 31]), 3, rethink_every=0)
    with pytest.raises(ValueError, match="hybrid: rethink_every must be >= 1"):
        hybrid(rethink_every=0)


def test_a_prefix_split_over_two_forwards_is_an_error():
    model = hybrid(iterations=2).eval()
    model.set_kv_cache(batch_size=1)
    idx = torch.randint(END + 1, 200, (1, 10))
    with torch.no_grad():
        model(idx[:, :4], input_pos=torch.arange(4), prefix_len=torch.tensor([4]))
        with pytest.raises(ValueError, match="reaches past slot 4, where this forward starts"):
            model(idx[:, 4:6], input_pos=torch.arange(4, 6), prefix_len=torch.tensor([6]))


# ---------------------------------------------------------------------------------- gradient refinement
def replace_input(block, columns):
    """A forward pre-hook on `block` that replaces the first columns of its input by `columns` (B, L, C)."""

    def hook(module, args):
        x, *rest = args
        return (torch.cat([columns, x[:, columns.shape[1] :]], dim=1), *rest)

    return block.register_forward_pre_hook(hook)


def test_gradient_refinement_equals_steps_on_the_causal_prefix_loss():
    """Reference: the prefix states the plain model hands its remaining block (captured by a hook), stepped by hand
    along the gradient of the causal model's next-token loss on each row's prefix, then fed to that block."""
    steps, lr = 2, 0.1
    options = dict(thought_layers=1, iterations=2, reweighting=True)
    causal = tiny("causal").eval()
    plain = activate(same_weights(hybrid(**options), causal)).eval()
    refined = activate(same_weights(hybrid(**options, refine_steps=steps, refine_lr=lr), causal)).eval()
    g = torch.Generator().manual_seed(8)
    idx = torch.randint(END + 1, 200, (2, 14), generator=g)
    prefix_len = torch.tensor([9, 5])
    rest = plain.transformer.h[1]
    captured = []
    handle = rest.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    with torch.no_grad():
        plain(idx, prefix_len=prefix_len)
    handle.remove()
    expected, before, after = [], [], []
    for row, P in enumerate(prefix_len.tolist()):
        z = captured[0][row : row + 1, :P]
        for step in range(steps + 1):
            z = z.detach().requires_grad_(True)
            handle = replace_input(causal.transformer.h[1], z)
            logits = causal(idx[row : row + 1, :P])  # block 1 reads z causally, the head scores it
            handle.remove()
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], idx[row, 1:P], reduction="sum")
            if step == 0:
                before.append(loss.item())
            if step == steps:
                after.append(loss.item())
                break
            (grad,) = torch.autograd.grad(loss, z)
            z = z - lr * z.norm(dim=-1, keepdim=True) * grad / grad.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        expected.append(z.detach())
    with torch.no_grad():
        got = refined(idx, prefix_len=prefix_len)
        for row in range(len(prefix_len)):
            handle = replace_input(plain.transformer.h[1], expected[row])
            reference = plain(idx[row : row + 1], prefix_len=prefix_len[row : row + 1])
            handle.remove()
            torch.testing.assert_close(got[row : row + 1], reference, atol=1e-4, rtol=0)
    assert all(a < b for a, b in zip(after, before, strict=True))  # the steps lower the prefix loss
    assert not torch.allclose(got, plain(idx, prefix_len=prefix_len))  # and change the output


def test_gradient_refinement_runs_only_outside_training():
    options = dict(iterations=2, refine_steps=3, refine_lr=0.2)
    plain, refined = hybrid(iterations=2), hybrid(**options)
    refined.load_state_dict(plain.state_dict())
    idx = torch.randint(END + 1, 200, (2, 12))
    prefix_len = torch.tensor([6, 4])
    torch.testing.assert_close(refined.train()(idx, prefix_len=prefix_len), plain.train()(idx, prefix_len=prefix_len))
    with torch.no_grad():  # the steps take gradients even where the caller has them off
        assert not torch.allclose(refined.eval()(idx, prefix_len=prefix_len), plain.eval()(idx, prefix_len=prefix_len))
    assert all(p.grad is None for p in refined.parameters())  # and leave the weights' gradients alone


# ---------------------------------------------------------------------------------- training
def test_gradients_reach_the_refinement_parameters_and_the_thought_blocks():
    options = dict(iterations=3, reweighting=True, interpolation=True, add_thought_layers=True, grad_iterations=1)
    model = activate(hybrid(**options))  # grad_iterations 1: the refinements train through the last iteration
    idx = torch.randint(END + 1, 200, (2, 16))
    targets = torch.randint(0, 200, (2, 16))
    model.loss(idx, targets, prefix_len=torch.tensor([6, 10])).backward()
    mech = model.mechanism
    for p in (mech.reweight_weight, mech.reweight_bias, mech.interpolation):
        assert p.grad is not None and p.grad.abs() > 0
    for name, p in mech.thought_blocks.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def saved_tensor_bytes(model, idx, targets, **metadata) -> int:
    """Bytes of the distinct storages autograd saves for backward in one training loss (weights included)."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.loss(idx, targets, **metadata)
    return sum(storages.values())


def test_training_memory_is_bounded_by_grad_iterations():
    idx = torch.randint(END + 1, 200, (2, 64))
    targets = torch.randint(0, 200, (2, 64))
    meta = {"prefix_len": torch.tensor([48, 64])}
    options = dict(reweighting=True, interpolation=True)
    two = saved_tensor_bytes(hybrid(iterations=2, **options), idx, targets, **meta)
    eight_bounded = saved_tensor_bytes(hybrid(iterations=8, grad_iterations=2, **options), idx, targets, **meta)
    eight = saved_tensor_bytes(hybrid(iterations=8, **options), idx, targets, **meta)
    assert eight_bounded == pytest.approx(two, rel=0.05)
    assert eight > 1.5 * two  # the measurement sees the iterations it keeps


def test_random_iterations_are_a_function_of_seed_and_step_and_only_in_training():
    model = hybrid(iterations=5, random_iterations=True)
    (hook,) = model.training_hooks()
    draws = [hy.draw_iterations(7, step, 5) for step in range(40)]
    assert draws == [hy.draw_iterations(7, step, 5) for step in range(40)] and set(draws) == {1, 2, 3, 4, 5}
    calls = []
    model.transformer.h[0].register_forward_hook(lambda *args: calls.append(1))  # the one thought block
    idx = torch.randint(END + 1, 200, (1, 10))
    for step in (0, 3):
        hook.on_step_end(HookContext(model=model, optimizer=None, epoch=0, step=step, seed=7, fabric=None))
        assert int(model.state_dict()["transformer.h.0.attn.mechanism.sampled_iterations"]) == draws[step]
        calls.clear()
        model.train()
        model(idx, prefix_len=torch.tensor([6]))
        assert len(calls) == draws[step]
        calls.clear()
        model.eval()
        with torch.no_grad():
            model(idx, prefix_len=torch.tensor([6]))
        assert len(calls) == 5


def test_block_applications_count_the_loop_in_maps_and_flops():
    model = hybrid(iterations=3, thought_layers=1)
    assert model.block_applications() == 3 + 1
    maps = model.attention_maps(torch.randint(END + 1, 200, (1, 10)), prefix_len=torch.tensor([4]))
    assert len(maps) == 4 and all(m.shape == (1, 4, 10, 10) for m in maps)
    i, j = torch.arange(10)[:, None], torch.arange(10)[None, :]
    for probs in maps:  # inside the prefix: later prefix keys are read; elsewhere: no later key
        assert (probs[0][:, :4, :4] > 0).all() and (probs[0][:, (j > i) & ((j >= 4) | (i >= 4))] == 0).all()
    causal = tiny("causal")
    block = sum(p.numel() for n, p in causal.named_parameters() if n.startswith("transformer.h.0.") and p.ndim == 2)
    extra = flops_per_token(model, 64) - flops_per_token(causal, 64)
    assert extra == pytest.approx(2 * (6 * block + 12 * causal.config.n_head * causal.config.head_size * 64))
    added = hybrid(iterations=2, thought_layers=1, add_thought_layers=True)
    assert added.block_applications() == 2 + 2
    assert flops_per_token(added, 64) - flops_per_token(causal, 64) == pytest.approx(extra)


def test_instruction_items_carry_the_prompt_as_prefix_and_trimming_keeps_the_loss():
    data = InstructionDataset([([5, 6, 7, 8], [9, 10, 0]), ([11, 12], [13, 0])], seq_len=16, pad_id=1, prefix=True)
    batch = collate(data, torch.arange(2), multiple=1)
    full = collate(data, torch.arange(2), multiple=1, trim=False)
    assert batch["prefix_len"].tolist() == [4, 2] and batch["input_ids"].shape == (2, 6)
    assert "prefix_len" not in InstructionDataset([([5], [6, 0])], seq_len=4, pad_id=1)[0]
    model = activate(hybrid(iterations=3, reweighting=True, interpolation=True)).eval()
    with torch.no_grad():
        trimmed = model.loss(batch["input_ids"], batch["labels"], prefix_len=batch["prefix_len"])
        untrimmed = model.loss(full["input_ids"], full["labels"], prefix_len=full["prefix_len"])
    torch.testing.assert_close(trimmed, untrimmed, atol=1e-6, rtol=0)
    # the training loop's sample reads the prompt as its prefix too, as in training
    assert sample_prompt(LogArgs(sample_prompt=None), None, data) == ([5, 6, 7, 8], 4)


# ---------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "options, match",
    [
        (dict(thought_layers=0), r"hybrid: thought_layers must be >= 1, got 0"),
        (dict(iterations=0), r"hybrid: iterations must be >= 1, got 0"),
        (dict(grad_iterations=0), r"hybrid: grad_iterations must be >= 1 \(or null: all\), got 0"),
        (dict(thought_layers=3), r"thought_layers=3 exceeds the model's 2 layers; lower it or set add_thought_layers"),
        (dict(endthought_id=999), r"endthought_id 999 is outside the vocabulary \(256\)"),
        (dict(endthought_id=-1), r"hybrid: endthought_id must be a token id >= 0 \(or null\), got -1"),
        (dict(refine_steps=-1), r"hybrid: refine_steps must be >= 0 \(0: no gradient refinement\), got -1"),
        (dict(refine_lr=0.0), r"hybrid: refine_lr must be > 0, got 0.0"),
        (dict(iteration=2), r"Unknown option\(s\) \['iteration'\] for attention 'hybrid'"),
    ],
)
def test_bad_options_are_one_line_errors(options, match):
    with pytest.raises(ValueError, match=match) as e:
        hybrid(**options)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "prefix_len, match",
    [
        (torch.tensor([11]), r"hybrid: prefix_len 11 exceeds the 10 tokens of the sequence"),
        (torch.tensor([-1]), r"hybrid: prefix_len must be >= 0, got -1"),
        (torch.tensor([2, 3]), r"prefix_len must be integers of shape \(1,\), one per row"),
        (torch.tensor([2.0]), r"prefix_len must be integers of shape \(1,\), one per row"),
    ],
)
def test_bad_prefix_lengths_are_one_line_errors(prefix_len, match):
    with pytest.raises(ValueError, match=match):
        hybrid()(torch.randint(0, 200, (1, 10)), prefix_len=prefix_len)
