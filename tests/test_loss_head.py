"""The fused output head + cross-entropy (litattn/loss_head.py) against autograd's plain head in float64: loss and
the gradients of h, weight and bias, with ignored targets, uneven chunks, bf16 weights, no-grad evaluation, and
GPT.loss end to end (tied embeddings)."""

import pytest
import torch
import torch.nn.functional as F

from litattn import GPT, Config
from litattn.loss_head import linear_cross_entropy


def reference(h, w, b, t):
    h, w = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b = None if b is None else b.detach().double().requires_grad_()
    loss = F.cross_entropy(F.linear(h, w, b), t, ignore_index=-100)
    loss.backward()
    return loss, h.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_rows", [7, 64])
def test_loss_and_gradients_equal_the_plain_head(bias, chunk_rows):
    g = torch.Generator().manual_seed(chunk_rows)
    N, C, V = 50, 16, 37
    h = torch.randn(N, C, generator=g, requires_grad=True)
    w = (torch.randn(V, C, generator=g) * 0.5).requires_grad_()
    b = torch.randn(V, generator=g, requires_grad=True) if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    t[[0, 5, 49]] = -100  # ignored rows: no loss, no gradient
    loss = linear_cross_entropy(h, w, b, t, chunk_rows=chunk_rows)
    (loss * 3.0).backward()  # the incoming gradient scales the saved ones
    ref_loss, ref_h, ref_w, ref_b = reference(h, w, b, t)
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(h.grad.double(), 3 * ref_h, atol=1e-6, rtol=0)
    torch.testing.assert_close(w.grad.double(), 3 * ref_w, atol=1e-6, rtol=0)
    if bias:
        torch.testing.assert_close(b.grad.double(), 3 * ref_b, atol=1e-6, rtol=0)
    assert (h.grad[[0, 5, 49]] == 0).all()


def test_without_gradients_it_is_the_loss_alone_and_all_ignored_is_zero():
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(20, 8, generator=g), torch.randn(11, 8, generator=g)
    t = torch.randint(0, 11, (20,), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, None, t), F.cross_entropy(h @ w.T, t))
        assert linear_cross_entropy(h, w, None, torch.full((20,), -100)).item() == 0.0


def test_bf16_weights_keep_their_dtype_and_come_close_to_float64():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(40, 16, generator=g).bfloat16().requires_grad_()
    w = torch.randn(30, 16, generator=g).bfloat16().requires_grad_()
    t = torch.randint(0, 30, (40,), generator=g)
    linear_cross_entropy(h, w, None, t).backward()
    _, ref_h, ref_w, _ = reference(h, w, None, t)
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16
    torch.testing.assert_close(h.grad.double(), ref_h, atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(w.grad.double(), ref_w, atol=2e-3, rtol=2e-2)


def test_gpt_loss_uses_it_and_matches_the_plain_head_with_tied_embeddings():
    torch.manual_seed(0)
    model = GPT(Config.from_name("tiny-gpt2"))
    assert model.lm_head.weight is model.transformer.wte.weight
    idx = torch.randint(0, 200, (2, 17))
    x, y = idx[:, :-1], idx[:, 1:].clone()
    y[1, :4] = -100
    model.loss(x, y).backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(fused[n], p.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_the_compiled_training_forward_equals_eager_and_stays_a_method():
    """`--compile`: the whole loss (blocks and fused head) as one graph; Fabric routes it as a forward method."""
    import inspect

    from litattn.loop import compile_loss

    torch.manual_seed(0)
    eager, compiled = GPT(Config.from_name("tiny-llama")), GPT(Config.from_name("tiny-llama"))
    compiled.load_state_dict(eager.state_dict())
    compile_loss(compiled)
    assert inspect.ismethod(compiled.loss)
    idx = torch.randint(0, 200, (2, 17))
    for model in (eager, compiled):
        model.loss(idx[:, :-1], idx[:, 1:]).backward()
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_a_frozen_head_gets_no_gradient_and_h_still_the_right_one():
    """LoRA / SSA finetuning freeze the head: only dh is computed, and it is the plain head's."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(30, 8, generator=g, requires_grad=True)
    w = torch.randn(13, 8, generator=g)  # frozen
    t = torch.randint(0, 13, (30,), generator=g)
    linear_cross_entropy(h, w, None, t, chunk_rows=7).backward()
    _, ref_h, _, _ = reference(h, w, None, t)
    torch.testing.assert_close(h.grad.double(), ref_h, atol=1e-6, rtol=0)
    assert w.grad is None


@pytest.mark.parametrize("bias", [False, True])
def test_under_bf16_autocast_it_computes_as_autocast_does_with_float32_gradients(bias):
    """bf16-mixed: bf16 matmuls, float32 softmax and sums; the gradients land in the fp32 masters' dtype."""
    g = torch.Generator().manual_seed(4)
    N, C, V = 300, 32, 97
    h = torch.randn(N, C, generator=g, requires_grad=True)
    w = (torch.randn(V, C, generator=g) * 0.3).requires_grad_()
    b = torch.randn(V, generator=g, requires_grad=True) if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    t[:7] = -100
    params = [p for p in (h, w, b) if p is not None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = linear_cross_entropy(h, w, b, t, chunk_rows=64, compute_dtype=torch.bfloat16)
    fused.backward()
    fused_grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = F.cross_entropy(F.linear(h, w, b).float(), t, ignore_index=-100)
    plain.backward()
    assert fused.dtype == torch.float32 and all(grad.dtype == torch.float32 for grad in fused_grads)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=0)  # the same bf16 logits, summed in float32
    ref = reference(h, w, b, t)
    for fused_grad, p, ref_grad in zip(fused_grads, params, ref[1:], strict=False):
        torch.testing.assert_close(fused_grad, p.grad, atol=2e-4, rtol=2e-2)  # autocast's own bf16 rounding
        error, plain_error = (fused_grad.double() - ref_grad).norm(), (p.grad.double() - ref_grad).norm()
        assert error <= 1.5 * plain_error  # no further from float64 than autocast's


def test_gpt_loss_takes_the_fused_head_under_bf16_autocast_not_under_fp16(monkeypatch):
    import litattn.model

    calls = []
    real = litattn.model.linear_cross_entropy
    monkeypatch.setattr(litattn.model, "linear_cross_entropy", lambda *a, **k: calls.append(k) or real(*a, **k))
    torch.manual_seed(0)
    model = GPT(Config.from_name("tiny-llama"))
    idx = torch.randint(0, 200, (2, 17))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = model.loss(idx[:, :-1], idx[:, 1:])
        plain = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1).float(), idx[:, 1:].flatten())
    assert calls == [{"compute_dtype": torch.bfloat16}]
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=0)
    with torch.autocast("cpu", dtype=torch.float16):
        model.loss(idx[:, :-1], idx[:, 1:])
    assert len(calls) == 1  # fp16: autograd's head (its gradients come after the loss scaling)
    model.loss(idx[:, :-1], idx[:, 1:])
    assert calls[-1] == {"compute_dtype": None}
