import json
import math
from pathlib import Path

import matplotlib.image
import pytest
import torch
from test_truncation import CASES, case, small_chunks, tiny, tiny_checkpoint  # noqa: F401 (fixtures)

from litattn import checkpoint as ckpt
from litattn.attention.statistics import AttentionStatistics, bucket_label, bucket_of
from litattn.config import Config
from litattn.data import TextFiles
from litattn.evaluate_attention import attention_statistics
from litattn.model import GPT
from litattn.tokenizer import Tokenizer


def test_statistics_of_a_hand_written_map_handed_over_in_chunks():
    rows = [[1.0, 0, 0], [0.25, 0.75, 0], [0.1, 0.3, 0.6]]
    probs = torch.tensor([[rows]])  # (1, 1, 3, 3)
    stats = AttentionStatistics(sinks=2, segments=torch.tensor([[0, 0, 1]]))
    stats.observe(0, 0, probs[:, :, :2])
    stats.observe(0, 2, probs[:, :, 2:])
    s = stats.summary()[0]
    h1 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    h2 = -(0.1 * math.log(0.1) + 0.3 * math.log(0.3) + 0.6 * math.log(0.6))
    # bucket 0: position 1 (a row that sees one key); bucket 1: positions 2-3
    assert [bucket_label(b) for b in range(2)] == ["1", "2-3"] and bucket_of(torch.tensor([0, 1, 2, 3])).tolist() == [
        0,
        1,
        1,
        2,
    ]
    torch.testing.assert_close(s["entropy"], torch.tensor([0.0, (h1 + h2) / 2], dtype=torch.float64))
    assert math.isnan(s["normalized_entropy"][0])  # ln 1 = 0: no normalised entropy for a one-key row
    want = (h1 / math.log(2) + h2 / math.log(3)) / 2
    assert float(s["normalized_entropy"][1]) == pytest.approx(want)
    torch.testing.assert_close(s["max_prob"], torch.tensor([1.0, (0.75 + 0.6) / 2], dtype=torch.float64))
    torch.testing.assert_close(s["sink_1"], torch.tensor([1.0, (0.25 + 0.1) / 2], dtype=torch.float64))
    torch.testing.assert_close(s["sink_2"], torch.tensor([1.0, (1.0 + 0.4) / 2], dtype=torch.float64))
    # own segment: row 0 and 1 in segment 0 (keys 0, 1), row 2 alone in segment 1 (key 2)
    torch.testing.assert_close(s["segment_mass"], torch.tensor([1.0, (1.0 + 0.6) / 2], dtype=torch.float64))
    assert s["rows"].tolist() == [1, 2]
    assert stats.overall()[0]["max_prob"] == pytest.approx((1 + 0.75 + 0.6) / 3)

    stats.observe(0, 0, probs)  # a second forward accumulates
    assert stats.summary()[0]["rows"].tolist() == [2, 4]
    with pytest.raises(RuntimeError, match="starts at query 2"):
        AttentionStatistics().observe(0, 2, probs[:, :, 2:])


def test_a_uniform_causal_row_has_normalised_entropy_one():
    T = 16
    causal = torch.tril(torch.ones(T, T))
    probs = (causal / causal.sum(-1, keepdim=True))[None, None].expand(2, 3, T, T)
    stats = AttentionStatistics()
    stats.observe(0, 0, probs)
    s = stats.summary()[0]
    torch.testing.assert_close(s["normalized_entropy"][1:], torch.ones(4, dtype=torch.float64))
    entropy = sum(math.log(i) for i in (2, 3)) / 2  # bucket 1: rows seeing 2 and 3 keys
    assert float(s["entropy"][1]) == pytest.approx(entropy)
    assert float(s["sink_1"][4]) == pytest.approx(1 / 16)  # position 16 sees 16 keys


def dense_statistics(maps: list[torch.Tensor], sinks: int) -> dict[int, dict[str, list[float]]]:
    """The statistics from dense maps [(B, H, T, T)], one row at a time in plain Python (the oracle)."""
    out = {}
    for layer, p in enumerate(maps):
        B, H, T, _ = p.shape
        by_bucket: dict[int, dict[str, list[float]]] = {}
        for b in range(B):
            for h in range(H):
                for i in range(T):
                    row = [float(x) for x in p[b, h, i]]
                    seen = [x for x in row if x > 0]
                    cells = by_bucket.setdefault(int(math.log2(i + 1)), {})
                    entropy = -sum(x * math.log(x) for x in seen)
                    cells.setdefault("entropy", []).append(entropy)
                    if len(seen) > 1:
                        cells.setdefault("normalized_entropy", []).append(entropy / math.log(len(seen)))
                    cells.setdefault("max_prob", []).append(max(row))
                    for k in range(1, sinks + 1):
                        cells.setdefault(f"sink_{k}", []).append(sum(row[:k]))
        out[layer] = {
            name: [
                sum(by_bucket[b].get(name, [math.nan])) / len(by_bucket[b].get(name, [1])) for b in sorted(by_bucket)
            ]
            for name in ("entropy", "normalized_entropy", "max_prob", *(f"sink_{k}" for k in range(1, sinks + 1)))
        }
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_chunked_statistics_equal_those_of_the_dense_maps(name, small_chunks):  # noqa: F811
    model, idx, metadata, _ = case(name)
    maps = model.attention_maps(idx, **metadata)
    stats = AttentionStatistics(sinks=3)
    model.observe(idx, stats, **metadata)  # chunks of 3 (4 for Self-Extend) queries: none divides T = 11
    want = dense_statistics(maps, 3)
    got = stats.summary()
    assert sorted(got) == sorted(want) == list(range(len(maps)))
    for layer in want:
        for column, values in want[layer].items():
            torch.testing.assert_close(got[layer][column], torch.tensor(values, dtype=torch.float64), equal_nan=True)


@pytest.fixture(scope="module")
def two_checkpoints(tiny_checkpoint, tmp_path_factory) -> tuple[Path, Path, Path]:  # noqa: F811
    """(text folder, a causal checkpoint, an SSA checkpoint with the same tokenizer)."""
    config = Config.from_name("tiny-llama", vocab_size=320, block_size=32, attention={"name": "ssa"})
    torch.manual_seed(1)
    state = GPT(config).state_dict()
    ssa = ckpt.save_checkpoint(tmp_path_factory.mktemp("ssa") / "ckpt", state, config, Tokenizer(tiny_checkpoint))
    return tiny_checkpoint.parent / "text", tiny_checkpoint, ssa


def test_the_command_compares_checkpoints_on_the_same_windows(two_checkpoints, tmp_path, capsys):
    text, a, b = two_checkpoints
    data = TextFiles(train_dirs=[text])
    out = attention_statistics([a, b], data=data, windows=3, micro_batch_size=2, out_dir=tmp_path, cache_dir=tmp_path)
    saved = json.loads((tmp_path / "attention_stats.json").read_text())
    assert saved == json.loads(json.dumps(out))
    assert [c["attention"]["name"] for c in saved["checkpoints"]] == ["causal", "ssa"]
    first = saved["checkpoints"][0]
    assert first["buckets"] == ["1", "2-3", "4-7", "8-15", "16-31", "32"] and len(first["layers"]) == 2
    layer = first["layers"][0]
    assert layer["by_bucket"]["normalized_entropy"][0] is None and 0 < layer["by_bucket"]["normalized_entropy"][3] <= 1
    assert layer["by_bucket"]["rows"][5] == 3 * 4  # one position in bucket 32, per window and head
    assert layer["overall"]["sink_4"] >= layer["overall"]["sink_1"] > 0
    assert matplotlib.image.imread(tmp_path / "attention_stats.png").std() > 0.05
    printed = capsys.readouterr().out
    assert "H/ln n 2-3" in printed and "max p" in printed and "sink_4" in printed
    assert "layer 1 value temperature: mean" in printed and saved["checkpoints"][0]["temperatures"] == []
    assert {t["kind"] for t in saved["checkpoints"][1]["temperatures"]} == {"query", "value"}

    # the same windows again with another spec: the causal checkpoint read as SSA at identity changes nothing
    same = attention_statistics(
        [a], data=data, windows=3, micro_batch_size=3, out_dir=tmp_path / "again", cache_dir=tmp_path,
        attention={"name": "ssa", "identity_init": True},
    )  # fmt: skip
    assert same["checkpoints"][0]["layers"][1]["overall"] == pytest.approx(first["layers"][1]["overall"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"checkpoint_dirs": []}, "checkpoint_dirs is empty"),
        ({"windows": 0}, "windows"),
        ({"sinks": 0}, "sinks"),
        ({"length": 64}, "length 64 is beyond"),
    ],
)
def test_bad_arguments_fail_before_work(two_checkpoints, tmp_path, kwargs, message):
    text, a, _ = two_checkpoints
    args = {"checkpoint_dirs": [a], "data": TextFiles(train_dirs=[text]), "out_dir": tmp_path, "cache_dir": tmp_path}
    with pytest.raises(ValueError, match=message):
        attention_statistics(**{**args, **kwargs})


@pytest.mark.parametrize("wrapped", [False, True], ids=["disrupt_set", "ssa-around-disrupt_set"])
def test_the_probe_hands_segments_over_and_records_temperatures(small_chunks, wrapped):  # noqa: F811
    """Also through SSA around disrupt_set: the wrapper reports its base's segments."""
    from litattn.evaluate_attention import MechanismProbe

    model, idx, metadata, _ = case("disrupt_set")  # row 0: segments [0, 4), [4, 8), [8, 11); row 1: one segment
    if wrapped:
        model = tiny({"name": "ssa", "base": {"name": "disrupt_set"}, "identity_init": True})
    maps = model.attention_maps(idx)
    stats = AttentionStatistics(sinks=1)
    with MechanismProbe(model, stats) as probe:
        model.observe(idx, stats)
    segments = torch.tensor([[0] * 4 + [1] * 4 + [2] * 3, [0] * 11])
    for layer, p in enumerate(maps):
        same = (segments[:, None, :] == segments[:, :, None]).double()  # (B, T, T): key in the query's segment
        mass = (p.double() * same[:, None]).sum(-1)  # (B, H, T)
        want = [mass[..., [i for i in range(11) if int(math.log2(i + 1)) == b]].mean() for b in range(4)]
        torch.testing.assert_close(stats.summary()[layer]["segment_mass"], torch.stack(want))
    assert float(stats.summary()[0]["segment_mass"][3]) < 1  # the sinks outside the segment take some mass
    assert (probe.temperature_summary() != []) == wrapped and not model.transformer.h[
        0
    ].attn.mechanism._forward_pre_hooks

    model, idx, _, _ = case("ssa")
    with MechanismProbe(model, AttentionStatistics()) as probe:
        model.observe(idx, probe.stats)
    kinds = [(s["layer"], s["kind"]) for s in probe.temperature_summary()]
    assert kinds == [(0, "query"), (0, "value"), (1, "query"), (1, "value")]

    # the position term alone, by hand: 1 + g exp(-exp(beta)) ln(position + 1) at positions 0 .. 10

    model = tiny({"name": "ssa", "token_temperature": False, "value_temperature": False})
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.mechanism.position_gate.fill_(1.0)
    with MechanismProbe(model, AttentionStatistics()) as probe:
        model.observe(idx, probe.stats)
    beta = float(model.transformer.h[0].attn.mechanism.beta.detach())
    factors = torch.tensor([1 + math.exp(-math.exp(beta)) * math.log(i + 1) for i in range(11)])
    first = probe.temperature_summary()[0]
    assert (first["layer"], first["kind"]) == (0, "query") and len(probe.temperature_summary()) == 2
    assert first["mean"] == pytest.approx(float(factors.mean()), rel=1e-5)
    assert (first["min"], first["max"]) == pytest.approx((1.0, float(factors[-1])), rel=1e-5)


def test_checkpoints_with_different_tokenizers_are_refused(two_checkpoints, tmp_path):
    text, a, _ = two_checkpoints
    other = Tokenizer.train(sorted(text.glob("*.txt"))[:1], 300, tmp_path / "tok")  # another vocabulary
    config = Config.from_name("tiny-llama", vocab_size=320, block_size=32)
    torch.manual_seed(2)
    b = ckpt.save_checkpoint(tmp_path / "other", GPT(config).state_dict(), config, other)
    args = {"data": TextFiles(train_dirs=[text]), "out_dir": tmp_path, "cache_dir": tmp_path, "windows": 2}
    with pytest.raises(ValueError, match="tokenizer is not the first checkpoint's"):
        attention_statistics([a, b], **args)
