import pytest
import torch

import litattn.generate as generate_module
from litattn import GPT, Config, precision
from litattn import checkpoint as ckpt
from litattn.cpu import CpuIsa
from litattn.generate import IncrementalDecoder, generate, main, sample


def _model(name: str, **overrides) -> GPT:
    # float64: cached and uncached forwards then agree to ~1e-15, so argmax comparisons are exact
    return GPT(Config.from_name(name, **overrides)).double().eval()


def _prompt(n: int = 5, vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (n,))


@torch.no_grad()
def naive_greedy(model: GPT, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Re-run the full forward without a cache each step and take the argmax (over real token ids)."""
    seq = prompt.clone()
    for _ in range(max_new_tokens):
        logits = model(seq.view(1, -1))[0, -1, : model.config.vocab_size]
        seq = torch.cat((seq, logits.argmax().view(1)))
    return seq


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-pythia", "tiny-gpt2"])
def test_greedy_with_kv_cache_equals_naive_loop(name):
    model = _model(name)
    prompt = _prompt()
    out = generate(model, prompt, 20, temperature=0.0)
    assert out.shape == (25,) and torch.equal(out[:5], prompt)
    assert torch.equal(out, naive_greedy(model, prompt, 20))
    assert all(block.attn.mechanism.kv_cache is None for block in model.transformer.h)  # cache cleared


def test_top_k_1_equals_greedy():
    model = _model("tiny-llama")
    prompt = _prompt()
    greedy = generate(model, prompt, 15, temperature=0.0)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(generate(model, prompt, 15, temperature=1.5, top_k=1, generator=generator), greedy)


def test_seeded_sampling_is_reproducible():
    model = _model("tiny-pythia")
    prompt = _prompt()

    def run(seed):
        return generate(model, prompt, 20, temperature=1.0, top_k=None, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_eos_stops_and_stream_gets_exactly_the_new_ids():
    model = _model("tiny-llama")
    prompt = _prompt()
    full = generate(model, prompt, 20, temperature=0.0).tolist()[5:]
    stop = next(i for i, t in enumerate(full) if i >= 2 and t not in full[:i])  # first new id from the 3rd on
    streamed = []
    out = generate(model, prompt, 20, temperature=0.0, eos_id=full[stop], stream=streamed.append)
    assert out.tolist()[5:] == full[: stop + 1]  # stops right after emitting eos
    assert streamed == out.tolist()[5:]


def test_stream_error_still_clears_the_cache():
    model = _model("tiny-gpt2")

    def boom(token):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate(model, _prompt(), 5, stream=boom)
    assert all(block.attn.mechanism.kv_cache is None for block in model.transformer.h)


def test_too_long_prompt_is_a_clear_error():
    model = _model("tiny-llama")  # block_size 128
    with pytest.raises(ValueError) as e:
        generate(model, _prompt(100), 30)
    assert str(e.value).startswith(
        "prompt has 100 tokens + 30 new exceeds the model's context of 128 (the model reads all but the last); "
        "lower max_new_tokens or shorten the prompt"
    )
    assert all(option in str(e.value) for option in ("--truncate", "--context", "--stream_window"))
    out = generate(model, _prompt(100), 29, temperature=0.0)  # the model reads exactly its context
    assert len(out) == 129 and torch.equal(out, naive_greedy(model, out[:100], 29))


def test_padded_vocabulary_rows_are_never_sampled():
    model = _model("tiny-llama", vocab_size=250)  # padded to 256
    with torch.no_grad():
        model.lm_head.weight[250:] = 10 * model.transformer.wte.weight[:6]  # make the padding rows likely
    out = generate(model, _prompt(vocab=250), 30, temperature=1.0, top_k=None)
    assert out.max() < 250


# ---------------------------------------------------------------------------------- sampling
def _frequencies(logits, n=4000, **kwargs):
    generator = torch.Generator().manual_seed(0)
    draws = torch.cat([sample(logits, generator=generator, **kwargs) for _ in range(n)])
    return torch.bincount(draws, minlength=len(logits)).double() / n


def test_sampling_follows_temperature_top_k_and_top_p():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])  # not sorted: top_p must map its kept set back to the ids
    logits = probs.log()
    freq = _frequencies(logits, temperature=1.0, top_k=None)
    torch.testing.assert_close(freq, probs.double(), atol=0.03, rtol=0)
    # temperature 2: softmax(log p / 2) = sqrt(p), renormalised
    freq = _frequencies(logits, temperature=2.0, top_k=None)
    torch.testing.assert_close(freq, (probs.sqrt() / probs.sqrt().sum()).double(), atol=0.03, rtol=0)
    # top_k=2 keeps the two most likely ids, renormalised
    freq = _frequencies(logits, temperature=1.0, top_k=2)
    torch.testing.assert_close(freq, torch.tensor([0, 0.625, 0, 0.375], dtype=torch.double), atol=0.03, rtol=0)
    # top_p: the smallest set of likely ids whose mass reaches top_p (0.5 + 0.3), renormalised
    freq = _frequencies(logits, temperature=1.0, top_k=None, top_p=0.8)
    assert freq[0] == freq[2] == 0
    torch.testing.assert_close(freq, torch.tensor([0, 0.625, 0, 0.375], dtype=torch.double), atol=0.03, rtol=0)
    assert _frequencies(logits, n=500, temperature=1.0, top_k=None, top_p=0.81)[0] > 0
    assert _frequencies(logits, n=50, temperature=1.0, top_k=None, top_p=0.1).tolist() == [0, 1, 0, 0]
    # top_p after temperature: sqrt(p) normalised is [.208, .379, .120, .294]; 0.379 + 0.294 < 0.7 keeps a third id
    tempered = probs.sqrt() / probs.sqrt().sum()
    expected = tempered * torch.tensor([1.0, 1.0, 0.0, 1.0])
    freq = _frequencies(logits, temperature=2.0, top_k=None, top_p=0.7)
    assert freq[2] == 0
    torch.testing.assert_close(freq, (expected / expected.sum()).double(), atol=0.03, rtol=0)
    assert sample(torch.tensor([0.1, 3.0, -1.0]), temperature=0.0).item() == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [({"temperature": -1.0}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_p": 0.0}, "top_p")],
)
def test_bad_sampling_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(_model("tiny-gpt2"), _prompt(), 3, **kwargs)


# ---------------------------------------------------------------------------------- text
@pytest.fixture
def tokenizer(tmp_path):
    from litattn.tokenizer import Tokenizer

    text = tmp_path / "corpus.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 20 + "the quick brown fox jumps over the lazy dog\n" * 20)
    return Tokenizer.train([text], 300, tmp_path / "tok")


def test_incremental_decoding_keeps_multibyte_characters_whole(tokenizer):
    text = "def naïve(): return '世界 🙂' + fox"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split())  # bytes of the CJK / emoji characters are separate tokens
    context = tokenizer.encode("the ")
    decoder = IncrementalDecoder(tokenizer, context)
    pieces = []
    for n, i in enumerate(ids, 1):
        pieces.append(decoder.push(i))
        # streamed as soon as possible: all of the first n tokens' text except an incomplete last character
        assert "".join(pieces) == tokenizer.decode(ids[:n]).rstrip("\ufffd")
    pieces.append(decoder.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_main_streams_the_generated_text(tmp_path, tokenizer, capsys):
    model = GPT(Config.from_name("tiny-llama", vocab_size=300)).eval()
    ckpt.save_checkpoint(tmp_path / "ckpt", model.state_dict(), model.config, tokenizer)

    text = main(tmp_path / "ckpt", prompt="def ", max_new_tokens=12, temperature=1.0, seed=7)
    out, err = capsys.readouterr()
    assert out == "def " + text + "\n"
    assert "tokens/s" in err

    device = "cuda" if torch.cuda.is_available() else "cpu"  # main samples on this device
    prompt = torch.tensor(tokenizer.encode("def "))
    generator = torch.Generator(device).manual_seed(7)
    expected = generate(model.to(device), prompt, 12, temperature=1.0, eos_id=tokenizer.eos_id, generator=generator)
    new = [t for t in expected.tolist()[len(prompt) :] if t != tokenizer.eos_id]
    assert text == tokenizer.decode(new)


def test_main_without_tokenizer_is_a_clear_error(tmp_path):
    model = GPT(Config.from_name("tiny-gpt2"))
    ckpt.save_checkpoint(tmp_path / "ckpt", model.state_dict(), model.config)
    with pytest.raises(FileNotFoundError, match="has no tokenizer"):
        main(tmp_path / "ckpt")


def test_main_generates_in_bf16_where_auto_picks_it_refuses_mixed(tmp_path, tokenizer, capsys, monkeypatch):
    model = GPT(Config.from_name("tiny-llama", vocab_size=300)).eval()
    ckpt.save_checkpoint(tmp_path / "ckpt", model.state_dict(), model.config, tokenizer)
    loaded = []
    real_load = generate_module.load_with_tokenizer
    monkeypatch.setattr(  # the dtype the model is loaded in
        generate_module, "load_with_tokenizer", lambda *a, **k: loaded.append(k["dtype"]) or real_load(*a, **k)
    )
    monkeypatch.setattr(precision, "detect_isa", lambda: CpuIsa("AMX", native_bf16=True, capability="AVX512"))
    main(tmp_path / "ckpt", prompt="def ", max_new_tokens=4, temperature=0.0)
    assert "; precision bf16-true (auto: AMX CPU, native bf16)\n" in capsys.readouterr().err
    main(tmp_path / "ckpt", prompt="def ", max_new_tokens=4, temperature=0.0, precision="32-true")
    assert loaded == [torch.bfloat16, torch.float32]
    with pytest.raises(ValueError, match="^precision 'bf16-mixed': generate computes in the weights' own dtype"):
        main(tmp_path / "ckpt", precision="bf16-mixed")
    assert len(loaded) == 2  # refused before the model loads
