"""Thought-prefix data for hybrid attention: SampledPrefix (pretraining windows with a sampled prefix length)
and PrefixTask (reverse or sort the prefix); end to end through `litattn pretrain` with hybrid attention."""

import json
import pickle
import shutil
import sysconfig
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import Dataset

from litattn.cli import main
from litattn.data import DataModule, PrefixTask, SampledPrefix, StdlibCorpus
from litattn.data.prefix import prefix_range
from litattn.tokenizer import Tokenizer
from litattn.training import collate

SEQ_LEN = 64


# ---------------------------------------------------------------------------------- SampledPrefix
class Windows(Dataset):
    """n windows over the token stream 0, 1, 2, ... (labels the inputs shifted), like TokenWindows."""

    def __init__(self, n: int, seq_len: int, extra: dict | None = None) -> None:
        self.n, self.seq_len, self.extra = n, seq_len, extra or {}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        t = torch.arange(i * self.seq_len, (i + 1) * self.seq_len + 1)
        return {"input_ids": t[:-1], "labels": t[1:], **self.extra}


@dataclass
class FakeCorpus(DataModule):
    n: int = 2000
    extra: dict | None = None

    def setup(self, tokenizer, vocab_size, seq_len, cache_dir):
        self.seq_len = seq_len
        return tokenizer

    def train_dataset(self):
        return Windows(self.n, self.seq_len, self.extra)

    def val_dataset(self):
        return Windows(self.n // 4, self.seq_len, self.extra)

    def describe(self):
        return "fake corpus"


def sampled(seq_len=SEQ_LEN, extra=None, **options) -> SampledPrefix:
    data = SampledPrefix(FakeCorpus(extra=extra), **options)
    data.setup(None, 512, seq_len, Path("unused"))
    return data


def prefix_lengths(ds, n=None) -> list[int]:
    return [int(ds[i]["prefix_len"]) for i in range(n or len(ds))]


@pytest.mark.parametrize(
    "low, high, seq_len, lo, hi",
    [(0.1, 0.5, 64, 7, 32), (0.25, 0.25, 64, 16, 16), (0.0, 1.0, 10, 0, 10), (0.3, 0.7, 10, 3, 7)],  # 0.3 x 10: 3
)
def test_prefix_lengths_are_uniform_within_the_bounds(low, high, seq_len, lo, hi):
    assert prefix_range(low, high, seq_len) == (lo, hi)
    counts = Counter(prefix_lengths(sampled(seq_len, min_fraction=low, max_fraction=high).train_dataset()))
    assert set(counts) == set(range(lo, hi + 1))  # every length in range comes up, none outside it
    expected = 2000 / (hi - lo + 1)
    assert all(abs(c - expected) < 5 * expected**0.5 for c in counts.values())  # uniform: 5 standard deviations


def test_probability_leaves_the_other_windows_without_a_prefix():
    lengths = prefix_lengths(sampled(probability=0.3).train_dataset())
    assert sum(p == 0 for p in lengths) / len(lengths) == pytest.approx(0.7, abs=0.05)
    assert all(p == 0 or 7 <= p <= 32 for p in lengths)
    assert set(prefix_lengths(sampled(probability=0.0).train_dataset(), 200)) == {0}


def test_labels_inside_the_prefix_are_masked_and_the_rest_kept():
    ds = sampled(extra={"segment_ids": torch.zeros(SEQ_LEN, dtype=torch.long)}).train_dataset()
    inner = Windows(2000, SEQ_LEN)
    for i in range(50):
        item, raw = ds[i], inner[i]
        p = int(item["prefix_len"])
        assert item["prefix_len"].dtype == torch.long and item["prefix_len"].shape == ()
        assert torch.equal(item["input_ids"], raw["input_ids"])
        assert (item["labels"][: p - 1] == -100).all()  # targets that are prefix tokens
        assert torch.equal(item["labels"][p - 1 :], raw["labels"][p - 1 :])  # the last prefix position predicts
        assert "segment_ids" in item  # the wrapped module's other keys stay
    batch = collate(ds, torch.arange(4))
    assert batch["prefix_len"].shape == (4,) and batch["input_ids"].shape == (4, SEQ_LEN)  # nothing trimmed


def test_a_prefix_never_reaches_past_the_last_target_so_trimming_never_cuts_it():
    class Padded(Windows):  # targets in the first 10 positions only, like a short instruction example
        def __getitem__(self, i):
            item = super().__getitem__(i)
            item["labels"][10:] = -100
            return item

    data = sampled(min_fraction=0.5, max_fraction=1.0)
    ds = type(data.train_dataset())(Padded(50, SEQ_LEN), data._draw(), 0, "train")
    assert {int(ds[i]["prefix_len"]) for i in range(50)} == {10}  # capped: position 9 still predicts
    assert all((ds[i]["labels"] != -100).sum() == 1 for i in range(50))
    batch = collate(ds, torch.arange(8))
    assert batch["input_ids"].shape == (8, 16) and batch["prefix_len"].max() <= 16


def test_training_draws_depend_on_seed_epoch_and_index_validation_is_fixed():
    a, b, c = sampled().train_dataset(), sampled().train_dataset(), sampled(seed=1).train_dataset()
    assert prefix_lengths(a, 200) == prefix_lengths(b, 200) != prefix_lengths(c, 200)
    epoch0 = prefix_lengths(a, 200)
    a.set_epoch(1)
    assert prefix_lengths(a, 200) != epoch0  # drawn afresh each epoch
    a.set_epoch(0)
    assert prefix_lengths(a, 200) == epoch0
    assert prefix_lengths(pickle.loads(pickle.dumps(a)), 200) == epoch0
    val = sampled().val_dataset()
    before = prefix_lengths(val)
    val.set_epoch(3)
    assert prefix_lengths(val) == before and len(set(before)) > 10  # drawn per window, the same every epoch
    fixed = sampled(val_prefix_fraction=0.25).val_dataset()
    assert set(prefix_lengths(fixed)) == {16}


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(min_fraction=-0.1), r"min_fraction must be in \[0, 1\], got -0.1"),
        (dict(max_fraction=1.5), r"max_fraction must be in \[0, 1\], got 1.5"),
        (dict(min_fraction=0.6, max_fraction=0.5), r"max_fraction must be >= min_fraction \(0.6\), got 0.5"),
        (dict(probability=2), r"probability must be in \[0, 1\], got 2"),
        (dict(val_prefix_fraction=-1), r"val_prefix_fraction must be in \[0, 1\] \(or null for the training"),
        (dict(seed=-1), r"seed must be"),
    ],
)
def test_bad_options_are_one_line_errors(options, match):
    with pytest.raises(ValueError, match=match) as e:
        SampledPrefix(FakeCorpus(), **options)
    assert "\n" not in str(e.value)


def test_bad_data_and_empty_ranges_are_one_line_errors():
    with pytest.raises(TypeError, match="data must be a data module"):
        SampledPrefix("corpus")
    with pytest.raises(ValueError, match="data is already a SampledPrefix"):
        SampledPrefix(SampledPrefix(FakeCorpus()))
    with pytest.raises(ValueError, match=r"no whole prefix length lies in \[0.51, 0.52\] x seq_len = \[5.1, 5.2\]"):
        sampled(10, min_fraction=0.51, max_fraction=0.52)
    with pytest.raises(ValueError, match="carry a prefix_len already"):
        sampled(extra={"prefix_len": torch.tensor(3)}).train_dataset()[0]
    with pytest.raises(RuntimeError, match="setup"):
        SampledPrefix(FakeCorpus()).train_dataset()
    inner = StdlibCorpus()
    assert SampledPrefix(inner).innermost() is inner and type(SampledPrefix().data) is StdlibCorpus


# ---------------------------------------------------------------------------------- PrefixTask
@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def code_tokenizer(tmp_path_factory) -> Tokenizer:
    """A BPE trained on Python source: not on the task's text (symbols may take several tokens)."""
    root = tmp_path_factory.mktemp("tok")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ["textwrap.py", "fnmatch.py"]:
        shutil.copy(stdlib / name, root / name)
    return Tokenizer.train(sorted(root.glob("*.py")), 400, root / "tok")


def task(cache, tokenizer=None, seq_len=32, **options) -> tuple[PrefixTask, Tokenizer]:
    data = PrefixTask(**options)
    return data, data.setup(tokenizer, 320, seq_len, cache)


def decode_symbols(data: PrefixTask, ids: list[int]) -> str:
    """The symbols of a run of symbol pieces (each piece's tokens in turn)."""
    by_ids = {v: k for k, v in data._encoding.symbols.items()}
    out, i = "", 0
    while i < len(ids):
        piece = next(p for p in by_ids if tuple(ids[i : i + len(p)]) == p)
        out += by_ids[piece]
        i += len(piece)
    return out


@pytest.mark.parametrize("name", ["reverse", "sort"])
@pytest.mark.parametrize("given_tokenizer", [False, True])
def test_the_suffix_is_the_reversed_or_sorted_prefix(cache, code_tokenizer, name, given_tokenizer):
    symbols = "0123456789" if name == "reverse" else "dcbaxyz"  # sort: in the order of `symbols`
    tokenizer = code_tokenizer if given_tokenizer else None
    seq_len = 64 if given_tokenizer else 32
    data, tok = task(cache, tokenizer, seq_len, task=name, symbols=symbols, max_length=10)
    enc = data._encoding
    ds = data.train_dataset()
    for i in range(40):
        item = ds[i]
        string = ds.string(i)
        p = int(item["prefix_len"])
        prefix, suffix = ds.tokens(i)
        assert p == len(prefix) and ds.prompt_ids(i) == prefix
        assert list(enc.separator) == prefix[-len(enc.separator) :] and suffix[-1] == tok.eos_id
        assert decode_symbols(data, prefix[: -len(enc.separator)]) == string
        answer = decode_symbols(data, suffix[:-1])
        assert answer == (string[::-1] if name == "reverse" else "".join(sorted(string, key=symbols.index)))
        assert tok.decode(prefix + suffix) == "".join(data.text(string)) + "<|endoftext|>"
        n = len(prefix) + len(suffix) - 1
        assert item["input_ids"][:n].tolist() == (prefix + suffix)[:-1]
        assert (item["input_ids"][n:] == tok.special_tokens["<|pad|>"]).all()
        assert (item["labels"][: p - 1] == -100).all() and (item["labels"][n:] == -100).all()
        assert item["labels"][p - 1 : n].tolist() == suffix  # the loss is on the answer and its EOS
    if not given_tokenizer:  # trained on the task's text: one token per symbol, " =" one more
        assert all(len(piece) == 1 for piece in enc.symbols.values()) and len(enc.separator) == 1
        assert tok.vocab_size <= 320


def test_an_endthought_separator_marks_the_prefix_in_the_tokens(cache):
    from litattn.attention.hybrid import ENDTHOUGHT_ID

    data, tok = task(cache, separator="<|endthought|>")
    assert data._encoding.separator == (ENDTHOUGHT_ID,) == (tok.special_id("<|endthought|>"),)
    batch = collate(data.train_dataset(), torch.arange(16))
    marks = batch["input_ids"] == ENDTHOUGHT_ID
    assert (marks.sum(dim=1) == 1).all()
    assert torch.equal(marks.int().argmax(dim=1) + 1, batch["prefix_len"])  # where hybrid ends a prefix without it


def test_lengths_splits_and_determinism(cache):
    data, _ = task(cache, min_length=3, max_length=7)
    train, val = data.train_dataset(), data.val_dataset()
    strings = [train.string(i) for i in range(500)]
    assert Counter(len(s) for s in strings).keys() == set(range(3, 8))
    assert not any(data.is_val(s) for s in strings)  # no validation string is ever trained on
    val_strings = [val.string(i) for i in range(len(val))]
    assert len(val) == 256 and all(data.is_val(s) for s in val_strings)
    again, _ = task(cache, min_length=3, max_length=7)
    assert [again.train_dataset().string(i) for i in range(500)] == strings
    assert torch.equal(again.train_dataset()[7]["input_ids"], train[7]["input_ids"])
    train.set_epoch(1)
    assert [train.string(i) for i in range(50)] != strings[:50]  # new strings each epoch
    val.set_epoch(1)
    assert [val.string(i) for i in range(len(val))] == val_strings  # validation: the same every evaluation
    other, _ = task(cache, min_length=3, max_length=7, seed=1)
    assert [other.train_dataset().string(i) for i in range(50)] != strings[:50]
    assert pickle.loads(pickle.dumps(train)).string(3) == train.string(3)


def test_the_trained_tokenizer_is_reused(cache):
    first = task(cache)[1]
    assert task(cache)[1].checkpoint_dir == first.checkpoint_dir
    assert task(cache, task="sort")[1].checkpoint_dir != first.checkpoint_dir  # trained on its own task's text


def test_trimming_keeps_the_prefix_and_the_loss(cache):
    data, _ = task(cache, max_length=6)
    ds = data.train_dataset()
    batch = collate(ds, torch.arange(8))
    assert batch["input_ids"].shape == (8, 16) and batch["prefix_len"].shape == (8,)  # 14 tokens at most: 16
    assert int(batch["prefix_len"].max()) <= 7 and (batch["labels"] != -100).sum() == sum(
        len(ds.tokens(i)[1]) for i in range(8)
    )


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(task="copy"), r"task must be one of reverse, sort, got 'copy'"),
        (dict(symbols="a"), r"symbols must be a string of at least 2 distinct characters"),
        (dict(symbols="abca"), r"symbols must be distinct characters, got 'abca'"),
        (dict(symbols="a b"), r"symbols must not hold whitespace \(it separates them\), got 'a b'"),
        (dict(symbols="ab="), r"separator ' =' is also a symbol; choose another separator or drop it from symbols"),
        (dict(separator=" "), r"separator must be text that ends the prefix, e.g. ' =', got ' '"),
        (dict(min_length=0), r"min_length must be an integer >= 1, got 0"),
        (dict(min_length=5, max_length=4), r"max_length must be an integer >= min_length \(5\), got 4"),
        (dict(train_examples=0), r"train_examples must be an integer >= 1, got 0"),
        (dict(val_fraction=1.0), r"val_fraction must be in \(0, 1\), got 1"),
        (dict(seed=-3), r"seed must be in \[0, 4294967295\], got -3"),
    ],
)
def test_bad_task_options_are_one_line_errors(options, match):
    with pytest.raises(ValueError, match=match) as e:
        PrefixTask(**options)
    assert "\n" not in str(e.value)


def test_setup_errors_name_the_fix(cache):
    with pytest.raises(ValueError, match=r"max_length=12 symbols takes up to 26 tokens with this tokenizer, more "):
        task(cache, seq_len=20)
    with pytest.raises(ValueError, match=r"no validation string in 1000 draws: strings of 1..1 symbols from 'ab'"):
        task(cache, symbols="ab", min_length=1, max_length=1, val_fraction=0.01)
    with pytest.raises(RuntimeError, match="setup"):
        PrefixTask().train_dataset()


# ---------------------------------------------------------------------------------- end to end
def test_pretrain_hybrid_on_the_reverse_task(tmp_path, capsys):
    out = tmp_path / "out"
    main(["pretrain", "--config", "config_hub/pretrain/prefix-reverse.yaml", "--accelerator", "cpu",
          "--cache_dir", str(tmp_path / "cache"), "--out_dir", str(out), "--train.max_steps", "3",
          "--eval.interval", "0", "--log.sample_tokens", "5"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "PrefixTask reverse: strings of 4..12 symbols" in printed and "'name': 'hybrid'" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 3 and summary["val_loss"] is not None
    assert "--- sample" in printed and " =" in printed.split("--- sample")[1]  # the sample's prompt: a prefix
    data = yaml.safe_load((out / "final" / "hyperparameters.yaml").read_text())["data"]
    assert data["class_path"] == "litattn.data.prefix_tasks.PrefixTask"
    assert data["init_args"]["symbols"] == "0123456789"  # a string, not a number


def test_pretrain_hybrid_with_a_sampled_prefix(tmp_path, capsys):
    out = tmp_path / "out"
    main(["pretrain", "--config", "config_hub/pretrain/hybrid-debug.yaml", "--accelerator", "cpu",
          "--cache_dir", str(tmp_path / "cache"), "--out_dir", str(out), "--train.max_steps", "2",
          "--eval.interval", "0", "--log.sample_prompt", "null"])  # fmt: skip
    assert "thought prefix: each training window gets a prefix of 7..32 tokens" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["step"] == 2
    data = yaml.safe_load((out / "final" / "hyperparameters.yaml").read_text())["data"]
    assert data["class_path"] == "litattn.data.prefix.SampledPrefix"
    assert data["init_args"]["data"]["class_path"] == "litattn.data.stdlib.StdlibCorpus"


def test_the_run_seed_draws_prefixes_and_strings_unless_the_seed_is_pinned(cache):
    def prefixes(seed=None, run_seed=None):
        data = SampledPrefix(FakeCorpus(), seed=seed)
        if run_seed is not None:
            data.seed_from_run(run_seed)
        data.setup(None, 512, SEQ_LEN, Path("unused"))
        return prefix_lengths(data.train_dataset(), 100)

    assert prefixes(run_seed=1) != prefixes(run_seed=2) and prefixes(run_seed=0) == prefixes()
    assert prefixes(seed=4, run_seed=1) == prefixes(seed=4, run_seed=2)

    def strings(seed=None, run_seed=None):
        data = PrefixTask(seed=seed)
        if run_seed is not None:
            data.seed_from_run(run_seed)
        data.setup(None, 320, 32, cache)
        return data, [data.train_dataset().string(i) for i in range(50)]

    (a, one), (b, two) = strings(run_seed=1), strings(run_seed=2)
    assert one != two and not any(a.is_val(s) or b.is_val(s) for s in one + two)
    held_out = [s for s in map(str, range(10000, 10400)) if a.is_val(s)]
    assert held_out and all(b.is_val(s) for s in held_out)  # every run seed holds out the same strings
    assert strings(seed=7, run_seed=1)[1] == strings(seed=7, run_seed=2)[1]


def test_distractors_follow_symbols_and_the_answer_ignores_them(cache):
    data, tokenizer = task(cache, min_length=5, max_length=8, noise=0.5, noise_symbols="xyz")
    train = data.train_dataset()
    strings = [train.string(i) for i in range(300)]
    noisy = [s for s in strings if set(s) & set("xyz")]
    assert 0.9 * len(strings) < len(noisy)  # P(no distractor in 5+ symbols) <= 1/32
    for s in strings[:50]:
        clean = "".join(c for c in s if c in "0123456789")
        assert data.answer(s) == clean[::-1] and not (set(data.answer(s)) & set("xyz"))
        assert all(not (a in "xyz" and b in "xyz") for a, b in zip(s, s[1:], strict=False))  # no two in a row
        assert 5 <= len(clean) <= 8 and s[0] not in "xyz"
    share = sum(c in "xyz" for s in strings for c in s) / sum(c not in "xyz" for s in strings for c in s)
    assert 0.4 < share < 0.6  # a distractor after about half the symbols
    prefix, suffix = train.tokens(3)
    assert tokenizer.decode(suffix[:-1]).split() == list(data.answer(train.string(3)))
    assert not any(data.is_val(s) for s in strings)  # the split is by the clean string
    assert "distractors 'xyz'" in data.describe()
    quiet, _ = task(cache, min_length=5, max_length=8)
    assert [quiet.train_dataset().string(i) for i in range(20)] == [data.clean(s) for s in strings[:20]]


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(noise=1.0), r"noise must be in \[0, 1\)"),
        (dict(noise=0.5, noise_symbols="a1"), r"noise_symbols must be distinct characters that are not symbols"),
        (dict(noise=0.5, noise_symbols="aa"), r"noise_symbols must be distinct"),
        (dict(noise=0.5, noise_symbols="a\tb"), r"noise_symbols must not hold whitespace"),
    ],
)
def test_bad_noise_options_are_one_line_errors(options, match):
    with pytest.raises(ValueError, match=match):
        PrefixTask(**options)
