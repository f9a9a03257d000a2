"""The Bigram-Backcopy text (litattn/data/bigram_backcopy.py): the chain obeys its two rules, its bigram steps
follow the matrix, and the files it writes are one token per symbol through the minimal tokenizer."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from litattn.data import BigramBackcopy, InjectTokens
from litattn.data.bigram_backcopy import bigram_backcopy_chain, transition_matrix


def test_matrix_rows_are_distributions_fixed_by_the_seed():
    m = transition_matrix(5, 0.5, seed=3)
    assert len(m) == 5 and all(len(row) == 5 and abs(sum(row) - 1) < 1e-12 and min(row) >= 0 for row in m)
    assert m == transition_matrix(5, 0.5, seed=3) and m != transition_matrix(5, 0.5, seed=4)


def test_after_a_trigger_the_symbol_before_it_comes_again():
    matrix = transition_matrix(6, 0.5, seed=0)
    chain = bigram_backcopy_chain(20_000, matrix, triggers=2, rng=random.Random(1))
    copies = [t for t in range(2, len(chain)) if chain[t - 1] < 2]
    assert len(copies) > 1000  # triggers do occur
    assert all(chain[t] == chain[t - 2] for t in copies)


def test_other_steps_follow_the_bigram_rows():
    matrix = [[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25], [0.0, 0.5, 0.0, 0.5], [0.1, 0.2, 0.3, 0.4]]
    chain = bigram_backcopy_chain(200_000, matrix, triggers=1, rng=random.Random(0))  # symbol 0 triggers
    for current in (1, 2, 3):
        nexts = Counter(chain[t + 1] for t in range(len(chain) - 1) if chain[t] == current)
        total = sum(nexts.values())
        for symbol, p in enumerate(matrix[current]):
            assert abs(nexts[symbol] / total - p) < 0.015, (current, symbol)
    assert all(chain[t + 1] != 0 for t in range(len(chain) - 1) if chain[t] == 2)  # probability 0 is never drawn


def test_setup_writes_one_token_per_symbol_and_reuses_its_files(tmp_path):
    data = BigramBackcopy(symbols="abcdefgh", triggers=2, train_symbols=5000, val_symbols=1000)
    tokenizer = data.setup(None, 278, 32, tmp_path)
    (folder,) = tmp_path.glob("bigram-backcopy-*")
    text = (folder / "val" / "val.txt").read_text()
    assert len(text) == 1000 and set(text) <= set("abcdefgh")
    assert all(text[t] == text[t - 2] for t in range(2, len(text)) if text[t - 1] in "ab")
    window = data.val_dataset()[0]
    assert tokenizer.decode(window["input_ids"].tolist()) == text[:32]
    assert tokenizer.decode(window["labels"].tolist()) == text[1:33]
    assert len(data.train_dataset()) == 5000 // 32  # 5,001 tokens (+ the EOS after the file): 33 per window
    mtime = (folder / "train" / "train.txt").stat().st_mtime_ns
    BigramBackcopy(symbols="abcdefgh", triggers=2, train_symbols=5000, val_symbols=1000).setup(None, 278, 32, tmp_path)
    assert (folder / "train" / "train.txt").stat().st_mtime_ns == mtime
    assert "8 symbols, 2 triggers ('ab')" in data.describe()


def test_a_sink_token_before_every_window(tmp_path):
    data = InjectTokens(
        BigramBackcopy(symbols="abcd", triggers=1, train_symbols=3000, val_symbols=500),
        disrupt={"every": None, "window_start": True},
        segment_ids=False,
    )
    tokenizer = data.setup(None, 278, 16, tmp_path)
    disrupt = tokenizer.special_id("<|disrupt|>")
    for i in range(3):
        assert data.train_dataset()[i]["input_ids"][0].item() == disrupt


def test_a_tokenizer_that_merges_symbols_is_refused_before_tokenizing(tmp_path):
    data = BigramBackcopy(symbols="ab", triggers=0, train_symbols=20_000, val_symbols=100)
    with pytest.raises(ValueError, match="does not give each symbol one token; .* vocab_size 278"):
        data.setup(None, 300, 16, tmp_path)
    assert not list(tmp_path.glob("data-*"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"symbols": "aab"}, "symbols must be a string of at least 2 distinct characters"),
        ({"symbols": "abc", "triggers": 3}, "triggers must be >= 0 and <= len(symbols) - 1 (2), got 3"),
        ({"alpha": 0}, "alpha must be > 0, got 0"),
        ({"train_symbols": 1}, "train_symbols must be >= 2, got 1"),
    ],
)
def test_bad_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError) as e:
        BigramBackcopy(**kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_setup_is_needed_before_a_dataset():
    with pytest.raises(RuntimeError, match="setup"):
        BigramBackcopy().train_dataset()
