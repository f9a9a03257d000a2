"""Scored truncation of instruction examples (litattn/data/prompt_truncation.py): `fit` on hand-computed cases,
the data modules' `attention` / `idf` / `attention_live` strategies against independent computations (the lowest
scores go, the template, instruction and response stay), the cache keyed by the dictionary, option errors."""

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from litattn import GPT, Config
from litattn import checkpoint as ckpt
from litattn.data import AlpacaJSON
from litattn.data.instructions import ALPACA_PROMPT
from litattn.data.prompt_truncation import PromptScorer, fit
from litattn.tokenizer import Tokenizer
from litattn.truncation import Importance, token_scores

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


# ---------------------------------------------------------------------------------- fit, by hand
def test_fit_drops_the_lowest_unprotected_prompt_tokens_then_the_response_end():
    prompt, response = np.arange(10), np.array([100, 101, 102])
    scores = torch.tensor([0.0, 0.0, 5, 1, 4, 2, 6, 3, 0.0, 0.0])  # head 2 and tail 2 protected
    p, r = fit(prompt, response, 9, scores, head=2, tail=2)  # room for 6 prompt tokens: 4 of 2..7 go (1, 2, 3, 4)
    assert p.tolist() == [0, 1, 2, 6, 8, 9] and r.tolist() == [100, 101, 102]
    *_, positions = fit(prompt, response, 9, scores, head=2, tail=2, return_positions=True)  # in the uncut example
    assert positions.tolist() == [0, 1, 2, 6, 8, 9, 10, 11, 12]
    p, r = fit(prompt, response, 8, scores, head=2, tail=2)  # room for 5: only the best unprotected one stays
    assert p.tolist() == [0, 1, 6, 8, 9] and r.tolist() == [100, 101, 102]
    p, r = fit(prompt, response, 6, scores, head=2, tail=2)  # the protected 4 stay, the response loses its end
    assert p.tolist() == [0, 1, 8, 9] and r.tolist() == [100, 101]
    p, r = fit(prompt, response, 3, scores, head=2, tail=2)  # the protected prompt alone is too long: no response
    assert p.tolist() == [0, 1, 8] and r.tolist() == []
    p, r = fit(prompt[:4], response, 9, None, head=2, tail=2)  # fits: unchanged, scores never asked for
    assert p.tolist() == [0, 1, 2, 3] and r.tolist() == [100, 101, 102]


# ---------------------------------------------------------------------------------- data modules
@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe")
    text = " ".join(WORDS) + "\n" + ALPACA_PROMPT["input"] + ALPACA_PROMPT["no_input"]
    (root / "text.txt").write_text(text * 20, encoding="utf-8")
    return Tokenizer.train([root / "text.txt"], vocab_size=300, out_dir=root / "tok")


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """Training and validation files: a long input of words drawn with unequal frequencies, a short answer."""
    import json

    g = np.random.default_rng(0)
    weights = np.arange(1, len(WORDS) + 1, dtype=float) ** 2
    root = tmp_path_factory.mktemp("examples")
    files = []
    for name, n in (("train", 12), ("val", 4)):
        records = [
            {
                "instruction": f"List the words of {WORDS[i % len(WORDS)]}.",
                "input": " ".join(g.choice(WORDS, size=int(g.integers(30, 60)), p=weights / weights.sum())),
                "output": "Done.",
            }
            for i in range(n)
        ]
        path = root / f"{name}.json"
        path.write_text(json.dumps(records))
        files.append(path)
    return files


def setup(tok, files, cache, seq_len=200, **options):
    data = AlpacaJSON(files[0], val_file=files[1], **options)
    data.setup(tok, 0, seq_len, cache)
    return data


def removed(original: np.ndarray, kept: list[int]) -> list[int]:
    """The tokens of `original` that `kept` (a subsequence of it) lacks, found by walking both in order."""
    out, j = [], 0
    for token in original.tolist():
        if j < len(kept) and kept[j] == token:
            j += 1
        else:
            out.append(token)
    assert j == len(kept), "kept is not a subsequence of the original"
    return out


def check_cuts(data, tok, files, score_of, seq_len=200):
    """Every validation example: at most seq_len + 1 tokens, the template and instruction before the input and the
    response header after it intact, the response whole, and no removed input token scoring above a kept one."""
    from litattn.data.instructions import read_examples

    ds = data.val_dataset()
    for i, example in enumerate(read_examples(files[1])):
        before = ALPACA_PROMPT["input"].split("{input}")[0].format(instruction=example.instruction)
        head = tok.encode(before, bos=tok.use_bos)
        tail = tok.encode(ALPACA_PROMPT["input"].split("{input}")[1])
        full = np.array(tok.encode(example.prompt(), bos=tok.use_bos))
        item = ds[i]
        n = int((item["labels"] != -100).nonzero().max()) + 2  # tokens of the example: inputs + the last target
        assert n <= seq_len + 1
        kept = ds.prompt_ids(i)
        assert kept[: len(head)] == head and kept[-len(tail) :] == tail
        assert item["labels"][item["labels"] != -100].tolist() == tok.encode("Done.", eos=True)
        gone = removed(full, kept)
        assert gone, "a long example lost nothing"
        middle = kept[len(head) : len(kept) - len(tail)]
        assert max(score_of(t) for t in gone) <= min(score_of(t) for t in middle) + 1e-6


def test_attention_truncation_drops_the_lowest_scoring_input_tokens(tok, examples, tmp_path):
    ids = sorted({int(t) for w in WORDS for t in tok.encode(" " + w)})
    scores = {t: float(k) for k, t in enumerate(ids)}  # an arbitrary order of the input's tokens
    path = Importance.from_scores(scores, default=100.0).save(tmp_path / "importance.json")
    data = setup(tok, examples, tmp_path / "cache", truncation="attention", importance=path)
    check_cuts(data, tok, examples, lambda t: scores.get(t, 100.0))
    assert data.stats["val"].truncated == 4 and data.stats["train"].truncated == 12
    # another dictionary: another cache file and other cuts, never the stale tokens
    reversed_scores = {t: -s for t, s in scores.items()}
    other = Importance.from_scores(reversed_scores, default=100.0).save(tmp_path / "other.json")
    again = setup(tok, examples, tmp_path / "cache", truncation="attention", importance=other)
    check_cuts(again, tok, examples, lambda t: reversed_scores.get(t, 100.0))
    assert len(list((tmp_path / "cache").glob("instructions-truncated-*.npz"))) == 2
    assert again.val_dataset().prompt_ids(0) != data.val_dataset().prompt_ids(0)


def test_idf_truncation_drops_the_most_frequent_tokens_of_the_training_prompts(tok, examples, tmp_path):
    from litattn.data.instructions import read_examples

    prompts = [set(tok.encode(e.prompt(), bos=tok.use_bos)) for e in read_examples(examples[0])]
    holding = Counter(t for p in prompts for t in p)
    idf = {t: math.log(len(prompts) / c) for t, c in holding.items()}
    data = setup(tok, examples, tmp_path / "cache", truncation="idf")
    check_cuts(data, tok, examples, lambda t: idf.get(t, float("inf")))


@pytest.mark.parametrize("strategy", ["input_right", "input_left"])
def test_positional_truncation_of_the_input_keeps_its_start_or_its_end(tok, examples, tmp_path, strategy):
    data = setup(tok, examples, tmp_path / "cache", truncation=strategy)
    from litattn.data.instructions import read_examples

    ds = data.val_dataset()
    for i, example in enumerate(read_examples(examples[1])):
        before, after = ALPACA_PROMPT["input"].split("{input}")
        head = len(tok.encode(before.format(instruction=example.instruction), bos=tok.use_bos))
        full = tok.encode(example.prompt(), bos=tok.use_bos)
        kept = ds.prompt_ids(i)
        n_tail = len(tok.encode(after))
        n_input = len(kept) - head - n_tail
        expected = full[head : head + n_input] if strategy == "input_right" else full[-n_tail - n_input : -n_tail]
        assert kept == full[:head] + expected + full[-n_tail:] and len(kept) < len(full)


def test_live_truncation_scores_each_prompt_with_the_scorer_in_windows(tok, examples, tmp_path):
    config = Config.from_name("tiny-llama", vocab_size=tok.vocab_size, block_size=16)
    torch.manual_seed(0)
    checkpoint = ckpt.save_checkpoint(tmp_path / "scorer", GPT(config).state_dict(), config, tok)
    scorer = PromptScorer("attention_live", None, checkpoint, tok, [])
    prompt = np.array(tok.encode(" ".join(WORDS * 3)))  # 3 windows of 16, the last one shorter
    got = scorer.scores([prompt[:5], prompt])
    model = scorer.live.model
    for ids, scores in zip([prompt[:5], prompt], got, strict=True):
        expected = [token_scores(model, torch.as_tensor(w, dtype=torch.long)[None])[0] for w in np.split(
            ids, range(16, len(ids), 16))]  # fmt: skip
        torch.testing.assert_close(scores, torch.cat(expected), atol=1e-6, rtol=0)
    data = setup(tok, examples, tmp_path / "cache", truncation="attention_live", scorer=checkpoint)
    ds = data.val_dataset()
    assert all(int((ds[i]["labels"] != -100).nonzero().max()) + 2 <= 201 for i in range(len(ds)))


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(truncation="attention"), "truncation 'attention' needs importance"),
        (dict(truncation="attention_live"), "truncation 'attention_live' needs scorer"),
        (dict(truncation="right", importance=Path("x.json")), "importance is read by truncation 'attention' or"),
        (dict(truncation="idf", scorer=Path("ckpt")), "scorer is read by truncation 'attention_live' only"),
        (dict(truncation="middle"), "truncation must be one of right, left, attention, attention_live, idf, input"),
    ],
)
def test_bad_truncation_options_are_one_line_errors(examples, options, message):
    with pytest.raises(ValueError, match=message):
        AlpacaJSON(examples[0], **options)


def test_a_missing_dictionary_is_a_one_line_error(tok, examples, tmp_path):
    with pytest.raises((FileNotFoundError, ValueError), match="missing.json"):
        setup(tok, examples, tmp_path / "cache", truncation="attention", importance=tmp_path / "missing.json")


# ---------------------------------------------------------------------------------- generate
@pytest.fixture(scope="module")
def scorer_checkpoint(tok, tmp_path_factory):
    config = Config.from_name("tiny-llama", vocab_size=tok.vocab_size, block_size=16)
    torch.manual_seed(0)
    return ckpt.save_checkpoint(tmp_path_factory.mktemp("gen") / "ckpt", GPT(config).state_dict(), config, tok)


@pytest.mark.parametrize("strategy", ["left", "attention_live", "attention"])
def test_generate_truncates_a_long_prompt_to_the_budget(tok, scorer_checkpoint, tmp_path, capsys, strategy):
    from litattn.generate import main
    from litattn.truncation import Protect, truncate, windowed_token_scores

    prompt = " ".join(WORDS * 2)
    ids = tok.encode(prompt)
    assert len(ids) > 12
    model = PromptScorer("attention_live", None, scorer_checkpoint, tok, []).live.model
    scores = {
        "left": torch.arange(len(ids), dtype=torch.float32),
        "attention_live": windowed_token_scores(model, [torch.tensor(ids)])[0],
        "attention": torch.tensor([float(t % 7) for t in ids]),
    }[strategy]
    importance = None
    if strategy == "attention":
        importance = Importance.from_scores({t: float(t % 7) for t in ids}).save(tmp_path / "importance.json")
    main(scorer_checkpoint, prompt=prompt, max_new_tokens=4, temperature=0, truncate=strategy, importance=importance)
    out, err = capsys.readouterr()
    expected = truncate(ids, 12, scores=scores, protect=Protect(last=8))  # context 16 - 4 new tokens
    assert f"the prompt was truncated from {len(ids)} to 12 tokens ({strategy})" in err
    assert out.startswith(tok.decode(expected)) and expected[-8:] == ids[-8:]


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(truncate="attention"), "truncate attention needs importance"),
        (dict(truncate="left", importance=Path("x.json")), "truncate left reads no importance"),
        (dict(prompt_budget=8), "importance and prompt_budget are read with --truncate only"),
        (dict(truncate="left", prompt_budget=0), "prompt_budget"),
    ],
)
def test_generate_truncation_options_are_checked_before_the_model_loads(tmp_path, options, message):
    from litattn.generate import main

    with pytest.raises(ValueError, match=message):
        main(tmp_path / "no-checkpoint", **options)
