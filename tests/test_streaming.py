"""Streaming generation and evaluation with a sink + recent-window KV cache (litattn/streaming.py, StreamingLLM).

The reference throughout is built by hand: the tokens the cache should hold (the first S and the latest W, or
fewer inside a chunk) and a plain forward over them at positions 0..n-1. With one layer the streaming logits
must equal it exactly (layer 0's keys and values depend on the token alone); deeper layers keep the context
each key was computed in, so there only layer 0's cache is compared.
"""

import json
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from litattn import GPT, Config
from litattn import checkpoint as ckpt
from litattn.attention import AttentionMechanism
from litattn.cli import main as cli
from litattn.data import TextFiles
from litattn.evaluate import streaming_perplexity
from litattn.generate import generate
from litattn.streaming import SinkWindowCache
from litattn.tokenizer import Tokenizer

SE = {"name": "self_extend", "group_size": 2, "window": 8}
ATTENTION = {
    "causal": {"name": "causal"},
    "ssa": {"name": "ssa"},
    "self_extend": SE,
    "ssa+self_extend": {"name": "ssa", "base": SE},
}


def model_for(attention="causal", name="tiny-llama", **overrides) -> GPT:
    """A float64 model (cached and plain forwards then agree to ~1e-15) whose mechanism parameters, if any, are
    random, so that every part of the mechanism matters."""
    torch.manual_seed(0)
    model = GPT(Config.from_name(name, attention=ATTENTION[attention], **{"block_size": 32, **overrides}))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".attn.mechanism." in n:
                p.normal_(0, 0.5)
    return model.double().eval()


def visible(t: int, n_tokens: int, sink: int, window: int, chunk: int) -> list[int]:
    """The stream indexes the cache holds when token t is the latest fed, by the documented rule: the first
    sink + window tokens go in at once; then chunks of `chunk`, each evicting as many of the oldest non-sinks."""
    capacity = sink + window
    if t < capacity:
        return list(range(t + 1))
    start = capacity + (t - capacity) // chunk * chunk  # the chunk holding t
    size = min(chunk, n_tokens - start)
    return list(range(sink)) + list(range(start - (window - size), t + 1))


@torch.no_grad()
def plain_logits(model: GPT, ids: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """The last token's logits of a plain forward (no cache) over ids[keep] at positions 0..len(keep)-1."""
    return model(ids[:, keep], positions=torch.arange(len(keep)))[0, -1]


# ---------------------------------------------------------------------------------- the cache
@pytest.mark.parametrize(
    "attention, sink, window, chunk",
    [
        ("causal", 4, 12, 1),
        ("causal", 3, 10, 4),
        ("causal", 0, 9, 1),  # window only
        ("ssa", 4, 12, 1),
        ("self_extend", 3, 10, 4),
        ("ssa+self_extend", 4, 12, 1),
    ],
)
def test_streaming_decode_equals_a_full_forward_over_the_visible_tokens(attention, sink, window, chunk):
    model = model_for(attention, n_layer=1)
    N = 3 * (sink + window) + 3
    ids = torch.randint(0, 256, (1, N))
    with SinkWindowCache(model, sink, window) as cache:
        logits = torch.cat(list(cache.feed(ids, chunk)), dim=1)  # (1, N, vocab)
        assert cache.length == sink + window and cache.seen == N
        assert cache.slot_tokens.tolist() == visible(N - 1, N, sink, window, chunk)
    for t in range(N):
        torch.testing.assert_close(logits[0, t], plain_logits(model, ids, visible(t, N, sink, window, chunk)))
    # the re-assigned positions and the sinks matter: with a gap between the sinks and the window (as at the
    # tokens' stream positions), or without the sinks, the logits differ
    keep = visible(N - 1, N, sink, window, chunk)
    if sink:
        gap = torch.arange(len(keep)) + 5 * (torch.arange(len(keep)) >= sink)
        with torch.no_grad():
            assert not torch.allclose(logits[0, -1], model(ids[:, keep], positions=gap)[0, -1])
        assert not torch.allclose(logits[0, -1], plain_logits(model, ids, keep[sink:]))


def test_deeper_layers_cache_the_visible_keys_at_layer_0_and_slot_positions_everywhere():
    model = model_for("causal", n_layer=3)
    sink, window, N = 2, 7, 40
    ids = torch.randint(0, 256, (1, N))
    with SinkWindowCache(model, sink, window) as cache:
        for _ in cache.feed(ids, 1):
            pass
        keep = visible(N - 1, N, sink, window, 1)
        block = model.transformer.h[0]
        with torch.no_grad():  # layer 0's keys before RoPE, from the tokens alone
            qkv = block.attn.qkv(block.norm_1(model.transformer.wte(ids[:, keep])))
        cfg = model.config
        k = qkv[..., cfg.n_head * cfg.head_size : (cfg.n_head + cfg.n_query_groups) * cfg.head_size]
        k = k.view(1, len(keep), cfg.n_query_groups, cfg.head_size).transpose(1, 2)
        torch.testing.assert_close(block.attn.mechanism.kv_cache.k, k)
        for b in model.transformer.h:
            assert b.attn.mechanism.kv_cache.extras["positions"][0].tolist() == list(range(sink + window))


def test_mechanisms_get_their_own_cache_mode_back_and_the_cache_is_freed():
    model = model_for("ssa+self_extend")
    mechanisms = [m for m in model.modules() if isinstance(m, AttentionMechanism)]
    before = [m.cache_before_rope for m in mechanisms]
    assert False in before and True in before  # SSA's own flag is off, its Self-Extend base's on

    def boom(token):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate(model, torch.randint(0, 256, (20,)), 5, stream=boom, stream_window=8, sink_size=2)
    assert [m.cache_before_rope for m in mechanisms] == before
    assert all(m.kv_cache is None for m in mechanisms)
    assert "cache_before_rope" not in mechanisms[0].__dict__


# ---------------------------------------------------------------------------------- generation
@pytest.mark.parametrize(
    "name, attention",  # pythia: RoPE on a quarter of each head
    [("tiny-llama", "causal"), ("tiny-pythia", "causal"), ("tiny-llama", "ssa"), ("tiny-llama", "self_extend")],
)
def test_streaming_with_room_for_everything_equals_ordinary_generation(name, attention):
    model = model_for(attention, name=name)
    prompt = torch.randint(0, 256, (6,))
    ordinary = generate(model, prompt, 20, temperature=0)
    assert torch.equal(generate(model, prompt, 20, temperature=0, stream_window=22, sink_size=4), ordinary)
    assert torch.equal(generate(model, prompt, 20, temperature=0, stream_window=26, sink_size=0), ordinary)
    sampled = [
        generate(model, prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(3), **kwargs)
        for kwargs in ({}, {"stream_window": 30, "sink_size": 2})
    ]
    assert torch.equal(*sampled)


def test_a_prompt_longer_than_the_cache_is_prefilled_in_chunks():
    model = model_for("causal", n_layer=1)
    sink, window = 4, 12
    prompt = torch.randint(0, 256, (45,))
    for chunk in (1, 5, 12):
        out = generate(model, prompt, 1, temperature=0, stream_window=window, sink_size=sink, stream_chunk=chunk)
        keep = visible(44, 45, sink, window, chunk)
        expected = plain_logits(model, prompt[None], keep)[: model.config.vocab_size].argmax()
        assert out[-1] == expected
    # the default chunk is W // 4
    default = generate(model, prompt, 1, temperature=0, stream_window=window, sink_size=sink)
    keep = visible(44, 45, sink, window, window // 4)
    assert default[-1] == plain_logits(model, prompt[None], keep)[: model.config.vocab_size].argmax()


def test_memory_stays_bounded_over_10x_the_context():
    model = model_for("causal", block_size=16)
    context = model.config.block_size
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(model, torch.randint(0, 256, (4,)), 10 * context)
    sizes = []

    def record(token):
        caches = [m.kv_cache for m in model.modules() if isinstance(m, AttentionMechanism) and m.kv_cache is not None]
        sizes.append(sum(c.k.nbytes + c.v.nbytes + sum(e.nbytes for e in c.extras.values()) for c in caches))

    out = generate(model, torch.randint(0, 256, (4,)), 10 * context, stream=record, stream_window=12, sink_size=4)
    assert len(out) == 4 + 10 * context
    # the same bytes at 2x the context as at 10x: S + W = 16 slots of keys, values and positions in 2 layers
    assert len(sizes) == 10 * context and sizes[2 * context] == sizes[-1] and set(sizes) == {sizes[0]}
    cfg = model.config
    assert sizes[0] == cfg.n_layer * (2 * 16 * cfg.n_query_groups * cfg.head_size * 8 + 16 * 8)


def test_bad_streaming_input_is_a_clear_error():
    prompt = torch.randint(0, 256, (5,))
    with pytest.raises(ValueError, match="learned absolute positions"):
        generate(model_for("causal", name="tiny-gpt2"), prompt, 5, stream_window=8)
    model = model_for("causal")
    cases = [
        ({"stream_window": 30, "sink_size": 4}, "sink_size \\+ stream_window = 34 exceeds the model's context of 32"),
        ({"stream_window": 0}, "stream_window must be >= 1"),
        ({"stream_window": 8, "sink_size": -1}, "sink_size must be >= 0"),
        ({"sink_size": 4}, "sink_size needs stream_window"),
        (
            {"stream_window": 8, "stream_chunk": 9},
            r"stream_chunk must be >= 1 and <= stream_window \(8\) \(or null for the default\), got 9",
        ),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            generate(model, prompt, 5, **kwargs)
    with SinkWindowCache(model, 2, 6) as cache:
        cache.forward(torch.randint(0, 256, (1, 8)))
        with pytest.raises(ValueError, match="does not fit the window of 6"):
            cache.forward(torch.randint(0, 256, (1, 7)))


# ---------------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A tokenizer, a one-layer RoPE checkpoint (block_size 16), a GPT-2 style one, and text folders."""
    root = tmp_path_factory.mktemp("streaming")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for folder, names in [("corpus", ["textwrap.py", "shlex.py"]), ("val", ["bisect.py"])]:
        (root / folder).mkdir()
        for name in names:
            shutil.copy(stdlib / name, root / folder / name)
    tokenizer = Tokenizer.train([root / "corpus" / "textwrap.py"], 320, root / "tok")
    torch.manual_seed(0)
    for name, preset in (("ckpt", "tiny-llama"), ("gpt2", "tiny-gpt2")):
        config = Config.from_name(preset, vocab_size=320, block_size=16, n_layer=1)
        ckpt.save_checkpoint(root / name, GPT(config).state_dict(), config, tokenizer)
    # Tokenize once here, so that no command-line test's stderr depends on which test ran first on its worker.
    _data(root).setup(tokenizer, 320, 16, root / "cache")
    return root


def _data(root: Path) -> TextFiles:
    return TextFiles(train_dirs=[root / "corpus"], val_dir=root / "val", extensions=[".py"])


def test_generate_cli_streams_beyond_the_context(files, capsys):
    argv = ["generate", "--checkpoint_dir", str(files / "ckpt"), "--prompt", "def ", "--max_new_tokens", "60"]
    cli([*argv, "--temperature", "0", "--stream_window", "10", "--sink_size", "4"])
    out, err = capsys.readouterr()
    assert "lowered" not in err and "tokens/s" in err  # 60 new tokens past a context of 16
    model, tokenizer, _ = ckpt.load(files / "ckpt")
    prompt = torch.tensor(tokenizer.encode("def "))
    expected = generate(model.eval(), prompt, 60, temperature=0, eos_id=tokenizer.eos_id, stream_window=10, sink_size=4)
    new = [t for t in expected.tolist()[len(prompt) :] if t != tokenizer.eos_id]
    assert out == "def " + tokenizer.decode(new) + "\n"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--stream_window", "0"], "stream_window must be >= 1 (or null for no streaming), got 0"),
        (["--stream_window", "14", "--sink_size", "4"], "sink_size + stream_window = 18 exceeds the model's context"),
        (["--sink_size", "2"], "sink_size needs stream_window"),
        (["--stream_window", "8", "--stream_chunk", "0"], "stream_chunk must be >= 1 and <= stream_window (8)"),
    ],
)
def test_generate_cli_bad_streaming_input_is_one_line(files, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        cli(["generate", "--checkpoint_dir", str(files / "ckpt"), *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_generate_cli_learned_positions_is_one_line(files, capsys):
    with pytest.raises(SystemExit) as e:
        cli(["generate", "--checkpoint_dir", str(files / "gpt2"), "--stream_window", "8"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "learned absolute positions" in err[0]


# ---------------------------------------------------------------------------------- evaluate streaming
@torch.no_grad()
def naive_streaming_loss(model, text: torch.Tensor, sink: int, window: int) -> float:
    """Token by token: a plain forward over the visible tokens (the first `sink` + the latest `window`, at
    positions 0..n-1), the loss of the next token. Exact for a one-layer model."""
    N = text.shape[1] - 1
    losses = [
        F.cross_entropy(plain_logits(model, text, visible(t, N, sink, window, 1)).float(), text[0, t + 1]).item()
        for t in range(N)
    ]
    return sum(losses) / N


@torch.no_grad()
def naive_recompute_loss(model, text: torch.Tensor, window: int, stride: int) -> float:
    """A forward per token: prediction t is scored in the window of up to `window` tokens that ends at the next
    multiple of `stride` (or the text's end), at positions 0.. (stride 1: the latest `window` tokens up to t)."""
    N = text.shape[1] - 1
    losses = []
    for t in range(N):
        end = min(-(-(t + 1) // stride) * stride, N)
        start = max(0, end - window)
        logits = model(text[:, start:end])[0, t - start]
        losses.append(F.cross_entropy(logits.float(), text[0, t + 1]).item())
    return sum(losses) / N


def _val_text(files: Path, n: int) -> torch.Tensor:
    import numpy as np

    (meta,) = (files / "cache").glob("data-*/meta.json")
    tokens = np.fromfile(meta.parent / "val.bin", dtype=json.loads(meta.read_text())["dtype"])
    return torch.from_numpy(tokens[: n + 1].astype(np.int64))[None]


def test_evaluate_streaming_table_matches_naive_loops(files, tmp_path, capsys):
    out_file = tmp_path / "s.json"
    result = streaming_perplexity(
        files / "ckpt", data=_data(files), stream_window=12, sink_size=4, cache_dir=files / "cache", out_file=out_file
    )
    length = result["length"]
    assert length == 16 * 16  # 16 x block_size, the default
    rows = {r["method"]: r for r in result["results"]}
    assert list(rows) == ["window", "sink_window", "recompute"]
    model, _, _ = ckpt.load(files / "ckpt")
    model.double().eval()
    text = _val_text(files, length)
    assert rows["window"]["loss"] == pytest.approx(naive_streaming_loss(model, text, 0, 12), abs=1e-5)
    assert rows["sink_window"]["loss"] == pytest.approx(naive_streaming_loss(model, text, 4, 12), abs=1e-5)
    assert rows["recompute"]["loss"] == pytest.approx(naive_recompute_loss(model, text, 12, 1), abs=1e-5)
    assert rows["window"]["loss"] != pytest.approx(rows["sink_window"]["loss"], abs=1e-4)
    for r in rows.values():
        assert r["tokens"] == length and r["perplexity"] == pytest.approx(torch.tensor(r["loss"]).exp().item())
        assert r["peak_memory_bytes"] is None or r["peak_memory_bytes"] >= 0
    cfg = model.config
    per_slot = 2 * cfg.n_query_groups * cfg.head_size * 4 + 8  # float32 k and v, int64 position
    assert rows["window"]["cache_bytes"] == 12 * per_slot and rows["sink_window"]["cache_bytes"] == 16 * per_slot
    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if line.split()[:1] in (["window"], ["sink_window"], ["recompute"])]
    assert len(table) == 3 and "peak MiB" in printed
    assert json.loads(out_file.read_text()) == json.loads(json.dumps(result))


def test_evaluate_streaming_options(files, tmp_path):
    text = _val_text(files, 40)
    model, _, _ = ckpt.load(files / "ckpt")
    model.eval()
    result = streaming_perplexity(
        files / "ckpt",
        data=_data(files),
        length=40,
        stream_window=8,
        sink_size=2,
        stride=3,
        stream_chunk=8,
        methods=["recompute", "sink_window"],
        cache_dir=files / "cache",
        out_file=tmp_path / "s.json",
    )
    rows = {r["method"]: r for r in result["results"]}
    assert list(rows) == ["recompute", "sink_window"]
    assert rows["recompute"]["loss"] == pytest.approx(naive_recompute_loss(model, text, 8, 3), abs=1e-5)
    # one chunk of 8 once the 10 slots are full: the same as a plain forward over the same visible tokens
    losses = [
        F.cross_entropy(plain_logits(model, text, visible(t, 40, 2, 8, 8)), text[0, t + 1]).item() for t in range(40)
    ]
    assert rows["sink_window"]["loss"] == pytest.approx(sum(losses) / 40, abs=1e-5)
    # default window: block_size - sink_size
    default = streaming_perplexity(
        files / "ckpt",
        data=_data(files),
        length=40,
        methods=["sink_window"],
        cache_dir=files / "cache",
        out_file=tmp_path / "d.json",
    )
    assert default["stream_window"] == 12 and default["results"][0]["window"] == 12
    # a sink token before the text: the same loops over [<|disrupt|>, text[:40]], which the sinks then hold
    D = ckpt.load(files / "ckpt")[1].special_id("<|disrupt|>")
    with_sink = streaming_perplexity(
        files / "ckpt",
        data=_data(files),
        length=40,
        stream_window=8,
        sink_size=1,
        methods=["sink_window", "window"],
        cache_dir=files / "cache",
        out_file=tmp_path / "f.json",
        first_token="<|disrupt|>",
    )
    prefixed = torch.cat([torch.tensor([[D]]), text[:, :40]], dim=1)
    rows = {r["method"]: r for r in with_sink["results"]}
    assert rows["sink_window"]["loss"] == pytest.approx(naive_streaming_loss(model, prefixed, 1, 8), abs=1e-5)
    assert rows["window"]["loss"] == pytest.approx(naive_streaming_loss(model, prefixed, 0, 8), abs=1e-5)
    assert with_sink["first_token"] == "<|disrupt|>" and rows["window"]["tokens"] == 40


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--length", "0"], "length must be >= 1 (or null for 16 x block_size), got 0"),
        (["--stream_window", "12", "--stride", "13"], "stride must be >= 1 and <= stream_window (12), got 13"),
        (["--sink_size", "-1"], "sink_size must be >= 0, got -1"),
        (["--methods", "[window, foo]"], "methods must be distinct names of ['window', 'sink_window', 'recompute']"),
        (["--stream_window", "40"], "sink_size + stream_window = 44 exceeds the model's context of 16"),
        (["--length", "100000"], "length 100000 needs 100001 tokens but the validation split holds"),
        (["--first_token", "<|sink|>"], "'<|sink|>' is not a litattn special token; known: <|endoftext|>"),
    ],
)
def test_evaluate_streaming_bad_input_is_one_line(files, tmp_path, capsys, extra, message):
    argv = ["evaluate", "streaming", "--checkpoint_dir", str(files / "ckpt"), "--out_file", str(tmp_path / "x.json")]
    data = ["--data", "TextFiles", "--data.train_dirs", f"[{files / 'corpus'}]", "--data.val_dir", str(files / "val")]
    data += ["--data.extensions", "[.py]", "--cache_dir", str(files / "cache")]
    with pytest.raises(SystemExit) as e:
        cli([*argv, *data, *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
