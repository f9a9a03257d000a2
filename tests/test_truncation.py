"""Attention-based truncation (litattn.truncation): scores against hand-computed numbers and dense attention maps,
the query counts against each mechanism's mask, the importance dictionary and its file, truncation's guarantees
(property tests), live mode, and the `build` / `apply` entry points."""

import json
import math
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import litattn.attention.kernels as kernels
import litattn.attention.self_extend as self_extend
from litattn import GPT, Config
from litattn import checkpoint as ckpt
from litattn.data import TextFiles
from litattn.tokenizer import Tokenizer
from litattn.truncation import (
    Importance,
    Protect,
    ScoreObserver,
    VisibleQueries,
    build_frequency,
    build_importance,
    partial_path,
    token_scores,
    truncate,
    truncate_live,
    zeroed_queries,
)
from litattn.truncation.cli import apply, build

T = 11  # not a multiple of the query chunks the tests force (3 and 4)


def tiny(attention="causal", **overrides) -> GPT:
    torch.manual_seed(0)
    spec = {"name": attention} if isinstance(attention, str) else attention
    return GPT(Config.from_name("tiny-llama", attention=spec, **overrides)).eval()


def causal_counts(B: int = 2) -> torch.Tensor:
    return (T - torch.arange(T)).float().expand(B, T)


def disrupt_idx() -> torch.Tensor:
    idx = torch.randint(3, 200, (2, T))
    idx[0, [4, 8]] = 2  # <|disrupt|>: segments [0, 4), [4, 8), [8, 11) in row 0; one segment in row 1
    return idx


# (spec, config overrides, idx, metadata, the number of queries the mask lets see each key (B, T))
CASES = {
    "causal": ("causal", {}, None, {}, causal_counts()),
    "window": ("causal", {"sliding_window_size": 4}, None, {}, causal_counts().clamp(max=4)),
    "ssa": ("ssa", {}, None, {}, causal_counts()),
    "self_extend": ({"name": "self_extend", "group_size": 2, "window": 3}, {}, None, {}, causal_counts()),
    "disrupt_set": (
        "disrupt_set",
        {},
        disrupt_idx,
        {},
        torch.tensor([[11, 3, 2, 1, 4, 3, 2, 1, 3, 2, 1], list(range(11, 0, -1))]).float(),
    ),
    "hybrid": (  # row 0: a bidirectional prefix of 5 tokens that every query sees
        "hybrid",
        {},
        None,
        {"prefix_len": torch.tensor([5, 0])},
        torch.tensor([[11] * 5 + [6, 5, 4, 3, 2, 1], list(range(11, 0, -1))]).float(),
    ),
}


def case(name):
    spec, overrides, make_idx, metadata, counts = CASES[name]
    model = tiny(spec, **overrides)
    torch.manual_seed(1)
    idx = make_idx() if make_idx else torch.randint(22, 200, (2, T))  # no special token unless the case puts one
    return model, idx, metadata, counts


@pytest.fixture
def small_chunks(monkeypatch):
    """Query chunks of 3 (the kernels) and 4 (Self-Extend), neither dividing T."""
    monkeypatch.setattr(kernels, "MASK_BUDGET", 4 * 2 * 4 * T * 3)  # B x n_head x S float32 scores x 3 queries
    monkeypatch.setattr(self_extend, "QUERY_BLOCK", 4)


def naive_scores(maps, counts, variant, layers=None, heads=None):
    """The scores from dense maps [(B, H, T, T)] per layer, computed whole."""
    layers = range(len(maps)) if layers is None else layers
    per_layer = []
    for layer in layers:
        p = maps[layer].double()
        p = p if heads is None else p[:, heads]
        received = p.sum(dim=2)  # (B, H, T) column sums
        if variant == "received":
            s = received / counts.double()[:, None]
        else:
            s = (p.sum(dim=3) + received - torch.diagonal(p, dim1=-2, dim2=-1)) / p.shape[-1]
        per_layer.append(s.mean(dim=1))
    return torch.stack(per_layer).mean(dim=0).float()


# ---------------------------------------------------------------------------------- scores
def test_scores_of_a_hand_written_map():
    """Two heads of one 3-token causal map, handed over in chunks of 2 and 1 query rows."""
    head0 = [[1.0, 0, 0], [0.25, 0.75, 0], [0.1, 0.3, 0.6]]
    head1 = [[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.2, 0.6]]
    probs = torch.tensor([[head0, head1]])  # (1, 2, 3, 3)
    counts = {0: torch.tensor([[[3.0, 2, 1]]])}  # queries that see keys 0, 1, 2

    def run(variant, heads=(0, 1)):
        observer = ScoreObserver([0], list(heads), variant, counts=counts)
        observer.observe(0, 0, probs[:, :, :2])
        observer.observe(0, 2, probs[:, :, 2:])
        observer.observe(1, 0, probs * 0.5)  # a layer not chosen: ignored
        return observer.scores()[0]

    # received: column sums / viewers. head 0: [1.35/3, 1.05/2, 0.6/1]; head 1: [1.7/3, 0.7/2, 0.6/1]
    torch.testing.assert_close(run("received", [0]), torch.tensor([0.45, 0.525, 0.6]))
    torch.testing.assert_close(run("received"), torch.tensor([(0.45 + 1.7 / 3) / 2, (0.525 + 0.35) / 2, 0.6]))
    # original: (row sum 1 + column sum - self) / 3. head 0: [1.35, 1.3, 1.0] / 3; head 1: [1.7, 1.2, 1.0] / 3
    torch.testing.assert_close(run("original", [0]), torch.tensor([0.45, 1.3 / 3, 1 / 3]))
    torch.testing.assert_close(run("original"), torch.tensor([(1.35 + 1.7) / 6, 2.5 / 6, 1 / 3]))


@pytest.mark.parametrize("name", list(CASES))
def test_visible_counts_follow_each_mechanism_mask(name):
    model, idx, metadata, expected = case(name)
    counter = VisibleQueries()
    with zeroed_queries(model):
        model.observe(idx, counter, **metadata)
    counts = counter.result()
    assert sorted(counts) == list(range(model.block_applications()))
    for count in counts.values():
        assert count.shape == (2, 1, T)  # the heads share the mask: one kept
        torch.testing.assert_close(count[:, 0], expected, rtol=0, atol=0)
    assert len({id(c) for c in counts.values()}) == 1  # and the layers share one tensor


def test_mask_counts_survive_probabilities_that_underflow():
    """Huge logits zero some visible keys' probabilities in float32; the mask pass still counts those keys."""
    model = tiny()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.qkv.weight[: 4 * 8] *= 1000.0  # the query rows: logits in the hundreds
    idx = torch.randint(22, 200, (2, T))
    maps = model.attention_maps(idx)
    visible = torch.ones(T, T).tril().bool()
    assert any(((m == 0) & visible).any() for m in maps)  # counting p > 0 would miss these viewers
    received = token_scores(model, idx)
    torch.testing.assert_close(received, naive_scores(maps, causal_counts(), "received"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_chunked_scores_equal_the_dense_maps(name, small_chunks):
    model, idx, metadata, counts = case(name)
    starts = []
    spy = type("Spy", (), {"observe": lambda self, layer, q_start, probs: starts.append(q_start)})()
    model.observe(idx, spy, **metadata)
    assert len(set(starts)) > 2  # the queries did come in several chunks
    maps = model.attention_maps(idx, **metadata)
    for variant in ("received", "original"):
        got = token_scores(model, idx, variant=variant, **metadata)
        torch.testing.assert_close(got, naive_scores(maps, counts, variant), atol=1e-5, rtol=1e-5)
    got = token_scores(model, idx, layers=[-1], heads=[0, 3], **metadata)
    expected = naive_scores(maps, counts, "received", [len(maps) - 1], [0, 3])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if name in ("causal", "ssa", "self_extend"):  # T - j is their mask's count: the cheap path agrees
        torch.testing.assert_close(token_scores(model, idx, visible="causal"), token_scores(model, idx))


@pytest.mark.parametrize("variant", ["received", "original"])
def test_a_padded_row_scores_as_it_does_alone(variant):
    model = tiny()
    idx = torch.randint(22, 200, (2, T))
    got = token_scores(model, idx, lengths=torch.tensor([T, 7]), variant=variant)
    torch.testing.assert_close(got[1, :7], token_scores(model, idx[1:, :7], variant=variant)[0])
    torch.testing.assert_close(got[0], token_scores(model, idx[:1], variant=variant)[0])
    assert (got[1, 7:] == 0).all()


def test_token_scores_checks_its_arguments_and_restores_training_mode():
    model = tiny().train()
    idx = torch.randint(22, 200, (1, 6))
    token_scores(model, idx)
    assert model.training
    with pytest.raises(ValueError, match="layer index"):
        token_scores(model, idx, layers=[2])
    with pytest.raises(ValueError, match="variant must be one of received, original"):
        token_scores(model, idx, variant="sum")
    with pytest.raises(ValueError, match=r"idx must be a \(B, T\) tensor"):
        token_scores(model, idx[0])
    with pytest.raises(ValueError, match=r"lengths must be in \[0, 6\]"):
        token_scores(model, idx, lengths=[7])


# ---------------------------------------------------------------------------------- importance dictionary
def test_importance_averages_per_id_and_scores_unseen_ids_by_default():
    imp = Importance()
    imp.add(torch.tensor([[1, 2], [1, 7]]), torch.tensor([[0.2, 0.5], [0.4, 0.9]]))
    assert imp.score(1) == pytest.approx(0.3) and imp.score(2) == pytest.approx(0.5) and len(imp) == 3
    assert imp.score(3) == imp.score(10**9) == imp.score(-4) == pytest.approx((0.3 + 0.5 + 0.9) / 3)  # the mean
    unseen = imp.default_score
    assert imp.scores_of(torch.tensor([7, -1, 99])).tolist() == pytest.approx([0.9, unseen, unseen])
    assert imp.as_dict() == pytest.approx({1: 0.3, 2: 0.5, 7: 0.9}) and 2 in imp and 3 not in imp
    fixed = Importance(default=-1.0)
    fixed.add([4], [0.5])
    assert fixed.score(5) == -1.0
    assert Importance().score(0) == 0.0  # nothing seen: 0


def test_idf_by_hand():
    imp = build_frequency([[1, 2, 2], torch.tensor([2, 3])])
    assert imp.documents == 2
    assert [imp.score(i) for i in (1, 2, 3)] == pytest.approx([math.log(2), 0.0, math.log(2)])


@pytest.mark.parametrize("default", [None, 0.25, math.inf])
def test_save_load_round_trip(tmp_path, default):
    info = {"variant": "received", "layers": [0, 1]}
    for imp in (Importance(default=default, info=info), Importance("idf", default=default)):
        if imp.method == "attention":
            imp.add(torch.tensor([0, 5, 5, 300]), torch.tensor([0.1, 0.2, 0.4, 1 / 3]))
        else:
            imp.add_document([0, 5, 300])
            imp.add_document([5])
        back = Importance.load(imp.save(tmp_path / f"{imp.method}.json"))
        for name in ("method", "default", "info", "documents"):
            assert getattr(back, name) == getattr(imp, name)
        assert torch.equal(back.table(), imp.table()) and back.default_score == imp.default_score
        assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temp file


def test_a_missing_or_corrupt_file_is_a_one_line_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; build one with `litattn truncate build`"):
        Importance.load(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    for content, problem in [
        (b'{"format": "litattn.importance", "vers', "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2]", "format marker"),
        (json.dumps({"format": "litattn.importance", "version": 1}).encode(), "no 'method' field"),
    ]:
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=problem) as error:
            Importance.load(bad)
        assert "\n" not in str(error.value) and "not an importance file" in str(error.value)
    imp = Importance()
    imp.add([1, 2], [0.5, 0.5])
    data = json.loads(imp.save(bad).read_text())
    data["counts"] = [1, 0]
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"counts must be integers in \[1, 2\*\*62\), got 0"):
        Importance.load(bad)


def batches_of(B=2, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(22, 60, (B, 9), generator=g) for _ in range(n)]


def test_build_importance_is_the_mean_score_of_each_id():
    model = tiny()
    batches = batches_of()
    imp = build_importance(model, batches, visible="causal", layers=[0])
    sums, counts = {}, {}
    for idx in batches:
        for i, s in zip(idx.flatten().tolist(), token_scores(model, idx, layers=[0]).flatten().tolist(), strict=True):
            sums[i] = sums.get(i, 0.0) + s
            counts[i] = counts.get(i, 0) + 1
    assert imp.as_dict() == pytest.approx({i: sums[i] / counts[i] for i in sums}, rel=1e-6)
    assert imp.info == {"variant": "received", "layers": [0], "heads": None, "visible": "causal", "batches": 3}

    # dicts with labels: what follows the last target is padding and counts for nothing
    padded = {"input_ids": batches[0].clone(), "labels": batches[0].clone()}
    padded["labels"][1, 5:] = -100
    padded["input_ids"][1, 5:] = 199  # an id seen nowhere else
    imp = build_importance(model, [padded])
    assert 199 not in imp and int(imp.counts.sum()) == 9 + 5


def test_a_build_resumes_from_its_partial_sums(tmp_path, monkeypatch):
    model = tiny()
    out = tmp_path / "imp.json"
    batches = batches_of(n=4)
    whole = build_importance(model, batches, out=tmp_path / "whole.json")

    def interrupted():
        yield from batches[:3]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_importance(model, interrupted(), out=out, checkpoint_every=2)
    assert not out.exists() and Importance.load(partial_path(out)).info["batches"] == 2
    with pytest.raises(ValueError, match="holds a build with other settings"):
        build_importance(model, batches, out=out, variant="original")
    scored = []
    real = model.observe
    monkeypatch.setattr(model, "observe", lambda idx, obs, **kw: scored.append(idx) or real(idx, obs, **kw))
    resumed = build_importance(model, batches, out=out, checkpoint_every=2)
    assert len(scored) == 2 * 2  # batches 3 and 4 only, two forwards each (mask pass + scores)
    assert not partial_path(out).exists() and Importance.load(out).info["batches"] == 4
    torch.testing.assert_close(resumed.table(), whole.table(), rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------- truncation
@st.composite
def truncation_inputs(draw):
    ids = draw(st.lists(st.integers(0, 15), min_size=1, max_size=30))
    n = len(ids)
    scores = draw(st.dictionaries(st.integers(0, 15), st.floats(-2, 2, allow_nan=False), max_size=12))  # not all ids
    protect = Protect(
        ids=draw(st.sets(st.integers(0, 15), max_size=2)),
        spans=draw(st.lists(st.tuples(st.integers(-n - 2, n + 2), st.integers(-n - 2, n + 2)), max_size=2)),
        last=draw(st.integers(0, 4)),
    )
    return ids, draw(st.integers(1, 34)), scores, protect


@settings(max_examples=300, deadline=None)
@given(truncation_inputs())
def test_truncation_properties(args):
    ids, max_length, scores, protect = args
    n = len(ids)
    guarded = protect.mask(torch.tensor(ids)).nonzero().squeeze(1).tolist()
    if n > max_length and len(guarded) > max_length:
        with pytest.raises(ValueError, match="protected tokens"):
            truncate(ids, max_length, scores, protect=protect)
        return
    out, positions = truncate(ids, max_length, scores, protect=protect, return_positions=True)
    assert isinstance(out, list) and len(out) == min(n, max_length)
    assert positions == sorted(set(positions)) and [ids[p] for p in positions] == out  # a subsequence, in order
    assert set(guarded) <= set(positions)  # protected tokens survive
    imp = Importance.from_scores(scores)
    dropped = [imp.score(ids[p]) for p in set(range(n)) - set(positions)]
    kept = [imp.score(ids[p]) for p in set(positions) - set(guarded)]
    assert not dropped or not kept or max(dropped) <= min(kept)  # the lowest scores went
    # a 1-D tensor and a row of a padded batch give the same tokens
    t_out, t_pos = truncate(torch.tensor(ids), max_length, scores, protect=protect, return_positions=True)
    assert t_out.tolist() == out and t_pos.tolist() == positions
    other = ids[::-1][:5]
    batch = torch.full((2, n + 3), -7)
    batch[0, :n], batch[1, : len(other)] = torch.tensor(ids), torch.tensor(other)
    try:
        other_out = truncate(other, max_length, imp, protect=protect)
    except ValueError:
        with pytest.raises(ValueError, match="protected tokens of row 1"):
            truncate(batch, max_length, imp, protect=protect, lengths=[n, len(other)], pad_id=-7)
        return
    b_out = truncate(batch, max_length, imp, protect=protect, lengths=[n, len(other)], pad_id=-7)
    assert b_out.shape == (2, min(n + 3, max_length))
    for row, expected in zip(b_out.tolist(), (out, other_out), strict=True):
        assert row[: len(expected)] == expected and set(row[len(expected) :]) <= {-7}


def test_equal_scores_fall_back_to_right_truncation():
    ids = list(range(10, 20))
    assert truncate(ids, 6, {}) == ids[:6]
    assert truncate(ids, 6, Importance(), protect=Protect(last=2)) == ids[:4] + ids[-2:]
    assert truncate(ids, 6, {}, protect=Protect(first=1, spans=[(-5, -3)])) == ids[:4] + ids[5:7]


def test_exactly_the_excess_goes_lowest_first_and_later_first_on_ties():
    """The original method drops every occurrence of the lowest id at once (here all three 5s: 3 tokens left)."""
    ids = [5, 1, 5, 2, 5, 3]
    scores = {5: 0.1, 1: 0.5, 2: 0.6, 3: 0.7}
    assert truncate(ids, 4, scores, return_positions=True) == ([5, 1, 2, 3], [0, 1, 3, 5])
    assert truncate(ids, 4, scores, protect=Protect(ids={5})) == [5, 5, 5, 3]
    assert truncate(ids, 6, scores) == ids and truncate(ids, 100, scores) == ids


def test_batches_by_pad_id_or_lengths_and_positions_for_the_model():
    batch = torch.tensor([[9, 8, 7, 6, 5, 4], [1, 2, 3, 0, 0, 0]])
    scores = {9: 0.9, 8: 0.1, 7: 0.7, 6: 0.2, 5: 0.5, 4: 0.4, 1: 0.0, 2: 0.0, 3: 0.0}
    out, positions = truncate(batch, 4, scores, pad_id=0, return_positions=True)
    assert out.tolist() == [[9, 7, 5, 4], [1, 2, 3, 0]]
    assert positions.tolist() == [[0, 2, 4, 5], [0, 1, 2, -1]]
    out = truncate(batch, 2, scores, lengths=torch.tensor([6, 1]))
    assert out.tolist() == [[9, 7], [1, 0]]
    assert truncate(batch, 8, scores).tolist() == batch.tolist()  # no padding named: every token is real
    ids = torch.randint(22, 200, (20,))
    kept, positions = truncate(ids, 8, scores=torch.rand(20), return_positions=True)
    logits = tiny()(kept[None], positions=positions)  # survivors keep their original positions
    assert logits.shape[:2] == (1, 8)


def test_truncation_errors():
    ids = [1, 2, 3, 4]
    for bad_length, error in [(0, ValueError), (-3, ValueError), (True, TypeError), (2.0, TypeError)]:
        with pytest.raises(error, match="max_length must be"):
            truncate(ids, bad_length, {})
    with pytest.raises(ValueError, match="ids is empty"):
        truncate([], 3, {})
    with pytest.raises(ValueError, match="ids is empty"):
        truncate(torch.zeros(2, 0, dtype=torch.long), 3, {})
    with pytest.raises(TypeError, match="ids must be integer token ids"):
        truncate(torch.rand(4), 2, {})
    with pytest.raises(TypeError, match="element of type str"):
        truncate(["a", "b"], 1, {})
    with pytest.raises(TypeError, match="ids must be a list of ints"):
        truncate("abcd", 2, {})
    with pytest.raises(ValueError, match="max_length 2 is below the 3 protected tokens"):
        truncate(ids, 2, {}, protect=Protect(last=3))
    with pytest.raises(ValueError, match="of row 1; raise max_length"):
        truncate(torch.tensor([ids, ids]), 2, {}, protect=torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0]]).bool())
    with pytest.raises(ValueError, match="either importance .* or scores"):
        truncate(ids, 2, {}, scores=[0.0] * 4)
    with pytest.raises(ValueError, match="either importance .* or scores"):
        truncate(ids, 2)
    with pytest.raises(ValueError, match=r"one number per position, shape \(1, 4\)"):
        truncate(ids, 2, scores=[0.0] * 3)
    with pytest.raises(ValueError, match="NaN"):
        truncate(ids, 2, scores=[0.0, math.nan, 0.0, 0.0])
    with pytest.raises(TypeError, match="importance must be an Importance or a mapping"):
        truncate(ids, 2, [0.5])
    with pytest.raises(TypeError, match="protect must be a Protect or booleans"):
        truncate(ids, 2, {}, protect=[True])
    with pytest.raises(ValueError, match="lengths and pad_id are for a"):
        truncate(ids, 2, {}, lengths=[4])
    with pytest.raises(ValueError, match="Protect.last must be an integer >= 0"):
        Protect(last=-1)


# ---------------------------------------------------------------------------------- live mode
def test_live_mode_scores_this_input_and_keeps_the_protected_span():
    model = tiny()
    ids = torch.randint(22, 200, (30,))
    protect = Protect(spans=[(20, 26)])
    kept, positions = truncate_live(model, ids, 12, protect=protect, return_positions=True)
    assert len(kept) == 12 and set(range(20, 26)) <= set(positions.tolist())
    expected = truncate(ids, 12, scores=token_scores(model, ids[None])[0], protect=protect)
    assert torch.equal(kept, expected)
    assert truncate_live(model, ids.tolist(), 12, protect=protect) == expected.tolist()

    batch = torch.stack([ids, ids.roll(5)])
    out = truncate_live(model, batch, 12, lengths=[30, 10], variant="original")
    alone = truncate_live(model, ids, 12, variant="original")
    assert torch.equal(out[0], alone) and torch.equal(out[1, :10], batch[1, :10])

    def fail(*args, **kwargs):
        raise AssertionError("the model ran for an input that fits")

    model.observe = fail
    assert truncate_live(model, [1, 2, 3], 12) == [1, 2, 3]


# ---------------------------------------------------------------------------------- entry points
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("truncation")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = root / "text"
    text.mkdir()
    for name in ("textwrap.py", "shlex.py", "glob.py"):
        shutil.copy(stdlib / name, text / f"{name}.txt")
    tokenizer = Tokenizer.train([stdlib / "textwrap.py"], 320, root / "tok")
    config = Config.from_name("tiny-llama", vocab_size=320, block_size=32)
    torch.manual_seed(0)
    return ckpt.save_checkpoint(root / "ckpt", GPT(config).state_dict(), config, tokenizer)


def test_build_and_apply_entry_points(tiny_checkpoint, tmp_path, capsys):
    data = TextFiles(train_dirs=[tiny_checkpoint.parent / "text"])
    args = dict(data=data, micro_batch_size=2, max_batches=2, cache_dir=tmp_path / "cache")
    imp = build(tiny_checkpoint, tmp_path / "imp.json", **args)
    assert imp.info["batches"] == 2 and int(imp.counts.sum()) == 2 * 2 * 32
    assert torch.equal(Importance.load(tmp_path / "imp.json").table(), imp.table())
    assert not partial_path(tmp_path / "imp.json").exists()
    idf = build(tiny_checkpoint, tmp_path / "idf.json", method="idf", **args)
    assert idf.method == "idf" and idf.documents == 4 and Importance.load(tmp_path / "idf.json").documents == 4

    tokenizer = Tokenizer(tiny_checkpoint)
    source = (tiny_checkpoint.parent / "text" / "textwrap.py.txt").read_text()
    records = [
        {"instruction": "Summarize the code.", "input": source[:1500], "output": "It wraps text.", "id": 1},
        {"instruction": "Say hi.", "output": "hi", "id": 2},
        {"instruction": source[:2000], "input": "x", "output": "long", "id": 3},  # the instruction alone is too long
    ]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    report = apply(jsonl, tmp_path / "short.jsonl", 200, tmp_path / "imp.json", tiny_checkpoint)
    out = [json.loads(line) for line in (tmp_path / "short.jsonl").read_text().splitlines()]
    from litattn.truncation.cli import _example_length

    assert [r["id"] for r in out] == [1, 2, 3] and out[1:] == records[1:]
    assert out[0]["instruction"] == records[0]["instruction"] and out[0]["output"] == records[0]["output"]
    assert _example_length(tokenizer, out[0]) <= 200 < _example_length(tokenizer, records[0])
    assert (report["examples"], report["truncated"], report["unfit"]) == (3, 1, 1)
    assert report["tokens_removed"] == _example_length(tokenizer, records[0]) - _example_length(tokenizer, out[0])
    assert 0 < report["mean_fraction_removed"] < 1 and "Truncated 1 of 3 examples" in capsys.readouterr().out

    listed = tmp_path / "data.json"
    listed.write_text(json.dumps(records[:2]))
    apply(listed, listed, 200, tmp_path / "idf.json", tiny_checkpoint, fields=["input", "instruction"])
    assert isinstance(json.loads(listed.read_text()), list)
    with pytest.raises(ValueError, match="fields must be distinct names"):
        apply(listed, listed, 200, tmp_path / "idf.json", tiny_checkpoint, fields=["question"])
