"""attend(..., return_lse=True), merge_attention and the chunked observers against float64 references."""

import math

import pytest
import torch
import torch.nn.functional as F

import litattn.attention.kernels as kernels
from litattn.attention import masks
from litattn.attention.kernels import attend, attend_observed, merge_attention
from litattn.attention.observers import AttentionObserver, DenseMaps, ReceivedAttention
from reference import causal_mask, naive_attention_probs


def _qkv(B=2, nh=4, ng=2, T=10, S=None, hs=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = T if S is None else S
    return (
        torch.randn(B, nh, T, hs, generator=g, dtype=dtype),
        torch.randn(B, ng, S, hs, generator=g, dtype=dtype),
        torch.randn(B, ng, S, hs, generator=g, dtype=dtype),
    )


def reference(q, k, v, mask=None, scale=None):
    """(y, lse) in float64 from explicit scores: y = 0 and lse = -inf for a query with no allowed key."""
    nh, ng = q.shape[1], k.shape[1]
    k = k.double().repeat_interleave(nh // ng, dim=1)
    v = v.double().repeat_interleave(nh // ng, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q.double() @ k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = scores.logsumexp(-1)
    empty = lse == float("-inf")
    probs = torch.where(
        empty.unsqueeze(-1), 0.0, (scores - lse.unsqueeze(-1).masked_fill(empty.unsqueeze(-1), 0)).exp()
    )
    return probs @ v, lse


def _window_mod(q_pos, window):
    return masks.sliding_window(q_pos, window)


def _gappy_mod(q_pos):
    """Causal, but queries 2 and 5 see no key at all, and odd positions only see even keys."""

    def mask_mod(b, h, q_idx, kv_idx):
        qp = q_pos[q_idx]
        return (kv_idx <= qp) & (q_idx != 2) & (q_idx != 5) & ((qp % 2 == 0) | (kv_idx % 2 == 0))

    return mask_mod


def _dense(mask_mod, T, S):
    return kernels.materialize(mask_mod, 1, torch.arange(T), S, torch.device("cpu"))[0, 0]


# (name, T, S, mask builder (-> mask_mod or None), is_causal)
CASES = {
    "full": (10, 10, None, False),
    "full_rect": (6, 11, None, False),
    "is_causal": (10, 10, None, True),
    "causal_mod": (10, 10, lambda: masks.causal(torch.arange(10)), False),
    "window_decode": (8, 17, lambda: _window_mod(torch.arange(9, 17), 5), False),
    "empty_rows": (10, 10, lambda: _gappy_mod(torch.arange(10)), False),
}


def _case_mask(name):
    T, S, build, is_causal = CASES[name]
    mask_mod = build() if build else None
    if is_causal:
        dense = causal_mask(torch.arange(T), S)
    elif mask_mod is not None:
        dense = _dense(mask_mod, T, S)
    else:
        dense = None
    return T, S, mask_mod, is_causal, dense


@pytest.mark.parametrize("ng", [4, 2, 1])
@pytest.mark.parametrize("budget", [None, 4 * 2 * 4 * 17 * 3])  # None: one chunk; else chunks of at most 3 queries
@pytest.mark.parametrize("name", list(CASES))
def test_lse_and_y_match_reference(name, budget, ng, monkeypatch):
    if budget is not None:
        monkeypatch.setattr(kernels, "MASK_BUDGET", budget)
    T, S, mask_mod, is_causal, dense = _case_mask(name)
    q, k, v = _qkv(ng=ng, T=T, S=S)
    y, lse = attend(q, k, v, mask_mod=mask_mod, is_causal=is_causal, kernel="sdpa", return_lse=True)
    ry, rlse = reference(q, k, v, dense)
    assert y.dtype == torch.float32 and lse.dtype == torch.float32
    assert lse.shape == (2, 4, T) and y.shape == (2, 4, T, 8)
    assert not y.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(lse, rlse.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, ry.float(), atol=1e-5, rtol=1e-5)
    if name == "empty_rows":
        assert (lse[:, :, [2, 5]] == float("-inf")).all() and (y[:, :, [2, 5]] == 0).all()
        assert torch.isfinite(lse[:, :, [0, 1, 3, 4, 6, 7, 8, 9]]).all()


def test_auto_on_cpu_takes_the_explicit_path_and_scale_is_applied():
    q, k, v = _qkv(T=7)
    mask_mod = masks.causal(torch.arange(7))
    y, lse = attend(q, k, v, mask_mod=mask_mod, scale=0.3, return_lse=True)
    ry, rlse = reference(q, k, v, causal_mask(torch.arange(7), 7), scale=0.3)
    torch.testing.assert_close(lse, rlse.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, ry.float(), atol=1e-5, rtol=1e-5)


def test_low_precision_inputs_keep_their_dtype_with_float32_lse():
    q, k, v = _qkv(T=9, dtype=torch.bfloat16)
    y, lse = attend(q, k, v, is_causal=True, return_lse=True)
    assert y.dtype == torch.bfloat16 and lse.dtype == torch.float32
    ry, rlse = reference(q, k, v, causal_mask(torch.arange(9), 9))
    torch.testing.assert_close(lse, rlse.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y.float(), ry.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("name", ["is_causal", "window_decode", "empty_rows", "full_rect"])
def test_gradients_match_reference(name, monkeypatch):
    monkeypatch.setattr(kernels, "MASK_BUDGET", 4 * 2 * 4 * 17 * 3)
    T, S, mask_mod, is_causal, dense = _case_mask(name)
    q, k, v = _qkv(T=T, S=S, dtype=torch.float64, seed=1)
    gy = torch.randn(2, 4, T, 8, dtype=torch.float64)
    gl = torch.randn(2, 4, T, dtype=torch.float64)

    def grads(fn):
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        y, lse = fn(qq, kk, vv)
        finite = torch.isfinite(lse)
        loss = (y * gy).sum() + (lse.masked_fill(~finite, 0) * gl).sum()
        return torch.autograd.grad(loss, (qq, kk, vv)), finite

    got, finite = grads(lambda a, b, c: attend(a, b, c, mask_mod=mask_mod, is_causal=is_causal, return_lse=True))
    # the reference's logsumexp has NaN gradients on empty rows: give it only the rows that have keys
    keep = torch.ones(T, dtype=torch.bool) if dense is None else dense.any(-1)

    def ref(a, b, c):
        y_kept, lse_kept = reference(a[:, :, keep], b, c, None if dense is None else dense[keep])
        y, lse = a.new_zeros(2, 4, T, 8), a.new_full((2, 4, T), float("-inf"))
        y[:, :, keep], lse[:, :, keep] = y_kept, lse_kept
        return y, lse

    expected, expected_finite = grads(ref)
    assert torch.equal(finite, expected_finite)
    for g, e in zip(got, expected, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-8)


def test_gradcheck_with_empty_rows_and_gqa(monkeypatch):
    monkeypatch.setattr(kernels, "MASK_BUDGET", 4 * 1 * 4 * 6 * 2)  # chunks of 2 queries
    q, k, v = _qkv(B=1, nh=4, ng=2, T=6, hs=3, dtype=torch.float64, seed=2)
    mask_mod = _gappy_mod(torch.arange(6))

    def fn(a, b, c):
        y, lse = attend(a, b, c, mask_mod=mask_mod, return_lse=True)
        return y, lse.masked_fill(torch.isinf(lse), 0.0)

    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_(True) for t in (q, k, v)))


# ------------------------------------------------------------------ return_lse=False: today's paths
def test_without_lse_the_fused_and_chunked_sdpa_paths_are_unchanged(monkeypatch):
    def explicit(*args, **kwargs):
        raise AssertionError("return_lse=False must not take the explicit path")

    monkeypatch.setattr(kernels, "_chunked_softmax", explicit)
    q, k, v = _qkv(T=12)
    assert torch.equal(
        attend(q, k, v, is_causal=True), F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    )
    assert torch.equal(attend(q, k, v), F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    mask_mod = masks.sliding_window(torch.arange(12), 4)
    dense = causal_mask(torch.arange(12), 12, 4)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True)
    torch.testing.assert_close(attend(q, k, v, mask_mod=mask_mod), expected, atol=1e-6, rtol=1e-6)
    monkeypatch.setattr(kernels, "MASK_BUDGET", 2 * 12 * 5)  # chunks of 5 queries
    torch.testing.assert_close(attend(q, k, v, mask_mod=mask_mod, kernel="sdpa"), expected, atol=1e-6, rtol=1e-6)


def test_unknown_kernel_and_mask_with_is_causal_are_errors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="Unknown attention kernel"):
        attend(q, k, v, kernel="fast", return_lse=True)
    with pytest.raises(ValueError, match="either is_causal or a mask_mod"):
        attend(q, k, v, is_causal=True, mask_mod=masks.causal(torch.arange(10)), return_lse=True)


@pytest.mark.parametrize("name", ["full", "is_causal", "window_decode", "empty_rows"])
def test_flex_lse_is_natural_log_like_the_explicit_path(name):
    """Uncompiled flex (inference) on CPU: its lse is in natural log in this PyTorch, -inf for empty rows."""
    T, S, mask_mod, is_causal, dense = _case_mask(name)
    q, k, v = _qkv(T=T, S=S, hs=16)
    with torch.no_grad():
        y, lse = attend(q, k, v, mask_mod=mask_mod, is_causal=is_causal, kernel="flex", return_lse=True)
    ry, rlse = reference(q, k, v, dense)
    torch.testing.assert_close(lse, rlse.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, ry.float(), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ merge_attention
def _parity_mod(q_pos, parity):
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_pos[q_idx]) & (kv_idx % 2 == parity)

    return mask_mod


def _half_mod(q_pos, split, second):
    def mask_mod(b, h, q_idx, kv_idx):
        side = kv_idx >= split if second else kv_idx < split
        return (kv_idx <= q_pos[q_idx]) & side

    return mask_mod


@pytest.mark.parametrize("split", ["parity", "halves"])
def test_merge_of_disjoint_key_sets_is_full_causal_attention(split, monkeypatch):
    monkeypatch.setattr(kernels, "MASK_BUDGET", 4 * 2 * 4 * 11 * 4)  # chunks of 4 queries
    T = 11
    pos = torch.arange(T)
    if split == "parity":
        mods = [_parity_mod(pos, 0), _parity_mod(pos, 1)]  # query 0 sees no odd key: lse -inf there
    else:
        mods = [_half_mod(pos, 6, False), _half_mod(pos, 6, True)]  # queries 0..5 see nothing of the second half
    q, k, v = _qkv(T=T, seed=3)
    gy = torch.randn(2, 4, T, 8)
    gl = torch.randn(2, 4, T)

    def run(fn):
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        y, lse = fn(qq, kk, vv)
        return y, lse, torch.autograd.grad((y * gy).sum() + (lse * gl).sum(), (qq, kk, vv))

    def merged(a, b, c):
        parts = [attend(a, b, c, mask_mod=m, return_lse=True) for m in mods]
        assert (parts[1][1] == float("-inf")).any()
        return merge_attention(parts)

    y, lse, grads = run(merged)
    ey, else_, egrads = run(lambda a, b, c: attend(a, b, c, is_causal=True, return_lse=True))
    torch.testing.assert_close(lse, else_, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, ey, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        y, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), atol=1e-5, rtol=1e-5
    )
    for g, e in zip(grads, egrads, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_merge_where_every_part_is_empty_gives_zero_and_minus_inf_without_nan():
    q, k, v = _qkv(T=8, seed=4)
    q.requires_grad_(True)
    # both parts see only keys >= 4, split by parity: queries 0..3 have no key in either part
    late_odd = lambda b, h, qi, kv: (kv <= qi) & (kv >= 4) & (kv % 2 == 1)
    late_even = lambda b, h, qi, kv: (kv <= qi) & (kv >= 4) & (kv % 2 == 0)
    parts = [attend(q, k, v, mask_mod=m, return_lse=True) for m in (late_even, late_odd)]
    y, lse = merge_attention(parts)
    assert (lse[:, :, :4] == float("-inf")).all() and (y[:, :, :4] == 0).all()
    ry, rlse = reference(q.detach(), k, v, _dense(lambda b, h, qi, kv: (kv <= qi) & (kv >= 4), 8, 8))
    torch.testing.assert_close(lse, rlse.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, ry.float(), atol=1e-5, rtol=1e-5)
    (g,) = torch.autograd.grad(y.sum() + lse[:, :, 4:].sum(), q)
    assert torch.isfinite(g).all() and (g[:, :, :4] == 0).all()


def test_merge_keeps_y_dtype_weighs_in_float32_and_checks_shapes():
    y1, y2 = torch.randn(1, 2, 3, 4, dtype=torch.bfloat16), torch.randn(1, 2, 3, 4, dtype=torch.bfloat16)
    l1, l2 = torch.randn(1, 2, 3), torch.tensor([[[0.0, float("-inf"), 1.0], [float("-inf")] * 3]])
    y, lse = merge_attention([(y1, l1), (y2, l2)])
    assert y.dtype == torch.bfloat16 and lse.dtype == torch.float32
    expected_lse = torch.stack([l1, l2]).logsumexp(0)
    torch.testing.assert_close(lse, expected_lse)
    w1, w2 = (l1 - expected_lse).exp(), (l2 - expected_lse).exp()
    expected_y = w1.unsqueeze(-1) * y1.float() + w2.unsqueeze(-1) * y2.float()
    torch.testing.assert_close(y.float(), expected_y, atol=1e-2, rtol=1e-2)
    single_y, single_lse = merge_attention([(y1, l1)])
    torch.testing.assert_close(single_y, y1)
    torch.testing.assert_close(single_lse, l1)
    with pytest.raises(ValueError, match="no parts"):
        merge_attention([])
    with pytest.raises(ValueError, match="disagree in shape"):
        merge_attention([(y1, l1), (y2[:, :, :2], l2[:, :, :2])])


# ------------------------------------------------------------------ observers
class Recorder(AttentionObserver):
    def __init__(self):
        self.calls = []

    def observe(self, layer, q_start, probs):
        self.calls.append((layer, q_start, tuple(probs.shape), probs.dtype, probs.requires_grad))


@pytest.mark.parametrize("window", [None, 3])
def test_received_attention_is_the_reference_column_sum(window, monkeypatch):
    monkeypatch.setattr(kernels, "MASK_BUDGET", 4 * 2 * 4 * 10 * 3)  # default chunk: 3 queries
    pos = torch.arange(10)
    mask_mod = masks.causal(pos) if window is None else masks.sliding_window(pos, window)
    q, k, v = _qkv(T=10, seed=5)
    received = ReceivedAttention()
    y = attend_observed(q, k, v, mask_mod=mask_mod, observer=received, layer=0)
    attend_observed(q * 0.5, k, v, mask_mod=mask_mod, observer=received, layer=1, chunk=4)
    for layer, scale in ((0, 1.0), (1, 0.5)):
        expected = naive_attention_probs(q * scale, k, causal_mask(pos, 10, window)).sum(dim=2)
        assert received[layer].shape == (2, 4, 10) and received[layer].dtype == torch.float32
        torch.testing.assert_close(received[layer], expected.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, attend(q, k, v, mask_mod=mask_mod), atol=1e-5, rtol=1e-5)
    # a new forward (q_start == 0) replaces a layer's sums rather than adding to them
    attend_observed(q, k, v, mask_mod=mask_mod, observer=received, layer=1)
    torch.testing.assert_close(received[1], received[0])


def test_chunks_follow_mask_budget_and_probs_are_detached_float32(monkeypatch):
    monkeypatch.setattr(kernels, "MASK_BUDGET", 4 * 2 * 4 * 10 * 3)
    q, k, v = _qkv(T=10, dtype=torch.bfloat16)
    q.requires_grad_(True)
    rec = Recorder()
    y = attend_observed(q, k, v, mask_mod=masks.causal(torch.arange(10)), observer=rec, layer=7)
    assert y.dtype == torch.bfloat16 and y.requires_grad
    assert [c[:3] for c in rec.calls] == [(7, s, (2, 4, min(3, 10 - s), 10)) for s in (0, 3, 6, 9)]
    assert all(c[3] == torch.float32 and not c[4] for c in rec.calls)
    rec.calls.clear()
    attend_observed(q, k, v, mask_mod=None, observer=rec, layer=0, chunk=4)
    assert [c[1] for c in rec.calls] == [0, 4, 8]


@pytest.mark.parametrize("ng", [4, 1])
def test_dense_maps_equal_the_naive_probabilities_and_y_equals_attend(ng):
    T, S = 7, 12
    q_pos = torch.arange(5, 12)
    q, k, v = _qkv(ng=ng, T=T, S=S, seed=6)
    maps = DenseMaps()
    ys = {}
    references = [causal_mask(q_pos, S, window=4), causal_mask(q_pos, S), None]  # loop-built masks
    for layer, mask_mod in enumerate([masks.sliding_window(q_pos, 4), masks.causal(q_pos), None]):
        ys[layer] = attend_observed(q, k, v, mask_mod=mask_mod, observer=maps, layer=layer, chunk=2)
        expected = naive_attention_probs(q, k, references[layer]).float()
        torch.testing.assert_close(maps[layer], expected, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ys[layer], attend(q, k, v, mask_mod=mask_mod), atol=1e-5, rtol=1e-5)
    assert list(maps.maps) == [0, 1, 2] and len(maps) == 3
    assert maps[0].shape == (2, 4, T, S) and maps[0].dtype == torch.float32
    maps.reset()
    assert len(maps) == 0


def test_observers_refuse_a_forward_that_does_not_start_at_query_zero():
    probs = torch.zeros(1, 1, 2, 3)
    for obs in (DenseMaps(), ReceivedAttention()):
        with pytest.raises(RuntimeError, match="not 0"):
            obs.observe(0, 2, probs)


def test_fused_cpu_parts_equal_one_softmax_over_their_union_with_exact_gradients():
    """Two parts with their own queries over overlapping key ranges, disjoint by mask: the merged result and
    its gradients equal one naive softmax over the merged scores; a row empty in one part weighs nothing there."""
    from litattn.attention.kernels import attend_parts_cpu

    torch.manual_seed(0)
    B, H, R, S, D = 2, 3, 20, 30, 8
    q1, q2 = (torch.randn(B, H, R, D, dtype=torch.float64, requires_grad=True) for _ in range(2))
    k, v = (torch.randn(B, H, S, D, dtype=torch.float64, requires_grad=True) for _ in range(2))
    first = torch.rand(R, S) > 0.5
    first[:, 0] = True
    first[3, 5:] = True  # row 3: nothing in the second part
    second = ~first[:, 5:]  # the second part reads keys 5.. only
    y = attend_parts_cpu([(q1, k, v, lambda: first), (q2, k[:, :, 5:], v[:, :, 5:], lambda: second)], 0.3)
    s1, s2 = (q @ k.transpose(-1, -2) * 0.3 for q in (q1, q2))
    in_second = torch.zeros(R, S, dtype=torch.bool)
    in_second[:, 5:] = second
    reference = torch.where(first, s1, torch.where(in_second, s2, float("-inf"))).softmax(-1) @ v
    torch.testing.assert_close(y, reference, atol=1e-10, rtol=0)
    w = torch.randn_like(y)
    got = torch.autograd.grad((y * w).sum(), (q1, q2, k, v))
    want = torch.autograd.grad((reference * w).sum(), (q1, q2, k, v))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
