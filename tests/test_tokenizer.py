import json
import os
import random

import pytest
import torch

from litattn.tokenizer import N_SET, SPECIAL_TOKENS, Tokenizer, train_or_load_tokenizer
from reference import gpt2_byte_symbols

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 20,
    "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n" * 20,
    "Ünïcödé naïve café — 日本語のテキスト, emoji 🦊🐶 and Ελληνικά.\n" * 10,
    "Numbers 0123456789 and punctuation !@#$%^&*()[]{};:'\",.<>/?\\|`~\n" * 10,
]


def write_corpus(folder, texts=CORPUS):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, text in enumerate(texts):
        paths.append(folder / f"doc{i}.txt")
        paths[-1].write_text(text, encoding="utf-8")
    return paths


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe")
    return Tokenizer.train(write_corpus(root / "text"), vocab_size=400, out_dir=root / "tok")


def test_special_token_table():
    assert SPECIAL_TOKENS[:3] == ["<|endoftext|>", "<|pad|>", "<|disrupt|>"]
    assert SPECIAL_TOKENS[3 : 3 + N_SET] == [f"<|set_{i}|>" for i in range(16)]
    assert SPECIAL_TOKENS[-3:] == ["<|prefix|>", "<|thought|>", "<|endthought|>"]
    assert len(set(SPECIAL_TOKENS)) == len(SPECIAL_TOKENS) == 22


def test_trained_tokenizer_reserves_special_ids(tokenizer):
    assert tokenizer.special_tokens == {name: i for i, name in enumerate(SPECIAL_TOKENS)}
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tokenizer.special_id(name) == i
        assert tokenizer.encode(name) == [i]  # a single id, never split into pieces
        assert tokenizer.decode([i]) == name
    ids = tokenizer.encode("fox<|disrupt|>dog<|set_7|>")
    assert ids.count(2) == 1 and ids.count(3 + 7) == 1
    assert tokenizer.bos_id == tokenizer.eos_id == 0  # <|endoftext|>, named in tokenizer_config.json
    assert json.loads((tokenizer.checkpoint_dir / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"
    with pytest.raises(ValueError, match="not a litattn special token"):
        tokenizer.special_id("<|nope|>")


def test_vocab_size_and_byte_alphabet(tokenizer):
    assert tokenizer.vocab_size == 400
    # ids after the special table start with the 256 byte symbols: each decodes to one byte (or a part of one char)
    assert all(tokenizer.decode([i]) for i in range(len(SPECIAL_TOKENS), 400))
    symbols = gpt2_byte_symbols()
    n = len(SPECIAL_TOKENS)
    assert sorted(tokenizer.token_to_id(s) for s in symbols.values()) == list(range(n, n + 256))
    for b in range(128):  # an ASCII character is one byte: exactly its byte symbol's id
        assert tokenizer.encode(chr(b)) == [tokenizer.token_to_id(symbols[b])]
    assert max(tokenizer.encode("".join(CORPUS))) < 400
    # training merges frequent words: a frequent word costs far fewer ids than bytes
    assert len(tokenizer.encode("The quick brown fox")) < len("The quick brown fox") / 2


def test_byte_level_round_trip_of_arbitrary_unicode(tokenizer):
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(0x20, 0x3000)] + ["\n", "\t", "\r\n", "\x00", "🦊", "\U0010fffd", "  "]
    texts = ["", " ", "  leading and trailing  ", "\u0301combining first", "never seen: ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 200))) for _ in range(50)]
    for text in texts:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert tokenizer.decode(torch.tensor(ids, dtype=torch.long)) == text  # a 1-D tensor works too
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]
    assert tokenizer.encode_batch(texts, num_threads=2) == [tokenizer.encode(t) for t in texts]


def test_bos_and_eos_are_added_only_when_asked(tokenizer):
    ids = tokenizer.encode("hello")
    assert 0 not in ids
    assert tokenizer.encode("hello", bos=True, eos=True) == [0, *ids, 0]
    assert tokenizer.encode("hello", eos=True) == [*ids, 0]
    assert tokenizer.use_bos is False


def test_save_and_load_round_trip(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "tokenizer.json", "tokenizer_config.json", "tokenizer_fingerprint.json"
    ]  # fmt: skip
    loaded = Tokenizer(tmp_path / "ckpt")
    for text in CORPUS + ["unseen text: Ωmega ✓ <|pad|> end"]:
        assert loaded.encode(text, bos=True, eos=True) == tokenizer.encode(text, bos=True, eos=True)
    assert (loaded.vocab_size, loaded.bos_id, loaded.eos_id) == (tokenizer.vocab_size, 0, 0)
    assert loaded.fingerprint() == tokenizer.fingerprint()


def test_fingerprint_follows_content(tokenizer, tmp_path):
    other = Tokenizer.train(write_corpus(tmp_path / "text", CORPUS[:2]), vocab_size=300, out_dir=tmp_path / "tok")
    assert other.fingerprint() != tokenizer.fingerprint()
    assert Tokenizer(tokenizer.checkpoint_dir).fingerprint() == tokenizer.fingerprint()


def test_check_fits(tokenizer):
    tokenizer.check_fits(400)
    tokenizer.check_fits(512)
    with pytest.raises(ValueError, match="tokenizer has 400 tokens but the model's padded vocabulary is 384; "):
        tokenizer.check_fits(384)


def test_missing_directory_or_file_is_a_one_line_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; expected a folder holding tokenizer.json"):
        Tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No tokenizer.json or tokenizer.model in") as e:
        Tokenizer(tmp_path / "empty")
    assert "\n" not in str(e.value)


def test_train_rejects_a_vocabulary_below_the_byte_alphabet(tmp_path):
    with pytest.raises(ValueError, match="at least 278"):
        Tokenizer.train(write_corpus(tmp_path), vocab_size=200, out_dir=tmp_path / "tok")


def test_train_warns_about_and_skips_a_non_utf8_file(tmp_path):
    files = write_corpus(tmp_path / "text")
    bad = tmp_path / "text" / "latin1.txt"
    bad.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    with pytest.warns(UserWarning, match="latin1.txt: not valid UTF-8"):
        tok = Tokenizer.train([*files, bad], vocab_size=300, out_dir=tmp_path / "tok")
    assert tok.decode(tok.encode("café")) == "café"


# ---------------------------------------------------------------------------------- caching
def test_train_or_load_reuses_then_retrains_when_a_file_changes(tmp_path, capsys, monkeypatch):
    files = write_corpus(tmp_path / "text")
    cache = tmp_path / "cache"
    first = train_or_load_tokenizer(files, 300, cache)
    assert "Training a 300-token" in capsys.readouterr().out
    assert first.checkpoint_dir.parent == cache and first.checkpoint_dir.name.startswith("tokenizer-")
    mtime = (first.checkpoint_dir / "tokenizer.json").stat().st_mtime_ns

    calls = []
    real_train = Tokenizer.train.__func__
    monkeypatch.setattr(Tokenizer, "train", classmethod(lambda cls, *a: calls.append(a) or real_train(cls, *a)))
    again = train_or_load_tokenizer(list(reversed(files)), 300, cache)  # order does not matter
    assert calls == [] and "Reusing tokenizer" in capsys.readouterr().out
    assert again.checkpoint_dir == first.checkpoint_dir
    assert (again.checkpoint_dir / "tokenizer.json").stat().st_mtime_ns == mtime

    files[0].write_text(CORPUS[0] + " the fox was here", encoding="utf-8")
    os.utime(files[0], ns=(mtime + 10**9, mtime + 10**9))  # a different mtime even on coarse filesystems
    changed = train_or_load_tokenizer(files, 300, cache)
    assert len(calls) == 1 and changed.checkpoint_dir != first.checkpoint_dir
    assert train_or_load_tokenizer(files, 320, cache).checkpoint_dir not in (
        first.checkpoint_dir,
        changed.checkpoint_dir,
    )
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]  # no temp folders left behind


# ---------------------------------------------------------------------------------- other formats
def test_sentencepiece_model(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    text = tmp_path / "sp.txt"
    rng = random.Random(0)
    words = ["alpha", "beta", "hello", "world"] + ["".join(rng.choices("abcdefghijklmnop", k=5)) for _ in range(200)]
    text.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)))
    (tmp_path / "ckpt").mkdir()
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(tmp_path / "ckpt" / "tokenizer"), vocab_size=60, minloglevel=2
    )
    tok = Tokenizer(tmp_path / "ckpt")
    assert tok.backend == "sentencepiece" and tok.vocab_size == 60
    assert (tok.bos_id, tok.eos_id) == (1, 2)  # sentencepiece's defaults: <unk>=0, <s>=1, </s>=2
    ids = tok.encode("hello world", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and len(ids) > 2
    assert tok.decode(ids[1:-1]) == "hello world"
    assert tok.encode_batch(["hello world", "alpha beta"], num_threads=2) == [
        tok.encode("hello world"),
        tok.encode("alpha beta"),
    ]
    assert tok.special_tokens == {}
    with pytest.raises(ValueError, match="has no <|disrupt|> token"):
        tok.special_id("<|disrupt|>")

    # a Hugging Face config names the tokens (here: swapped, to see that the config wins over sentencepiece)
    (tmp_path / "ckpt" / "tokenizer_config.json").write_text(json.dumps({"bos_token": "</s>", "eos_token": "<s>"}))
    swapped = Tokenizer(tmp_path / "ckpt")
    assert (swapped.bos_id, swapped.eos_id) == (2, 1)
    swapped.save(tmp_path / "copy")
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == [
        "tokenizer.model", "tokenizer_config.json", "tokenizer_fingerprint.json"
    ]  # fmt: skip
    assert Tokenizer(tmp_path / "copy").encode("alpha beta") == tok.encode("alpha beta")


@pytest.fixture
def hf_dir(tmp_path):
    """A converted-HF-style tokenizer.json: word-level, `<s>`/`</s>` specials, a post-processor that adds BOS."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(tmp_path / "tokenizer.json"))
    return tmp_path


def test_hf_tokenizer_bos_eos_from_config_files(hf_dir):
    plain = Tokenizer(hf_dir)
    assert (plain.bos_id, plain.eos_id, plain.special_tokens) == (None, None, {})
    assert plain.encode("hello world") == [3, 4]  # the post-processor's BOS is not added behind our back
    with pytest.raises(ValueError, match="no BOS token"):
        plain.encode("hello", bos=True)
    with pytest.raises(ValueError, match="has no <\\|set_0\\|> token"):
        plain.special_id("<|set_0|>")

    (hf_dir / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 0]}))
    assert (Tokenizer(hf_dir).bos_id, Tokenizer(hf_dir).eos_id) == (1, 2)

    config = {"bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>", "add_bos_token": True}
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(config))
    (hf_dir / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 0}))
    tok = Tokenizer(hf_dir)
    assert (tok.bos_id, tok.eos_id, tok.use_bos) == (1, 2, True)  # tokenizer_config.json wins
    assert tok.encode("hello world", bos=True, eos=True) == [1, 3, 4, 2]
    assert tok.decode([1, 3, 4, 2]) == "<s> hello world </s>"

    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    with pytest.raises(ValueError, match="names eos_token '<\\|im_end\\|>', which is not in the tokenizer's vocab"):
        Tokenizer(hf_dir)
