"""`litattn evaluate answers`: the scores against hand-computed cases, the answer loss against full forwards (with
and without re-thinking), and the generation scores against greedy decoding written here."""

import json

import pytest
import torch
import torch.nn.functional as F

from litattn import GPT, Config
from litattn import checkpoint as ckpt
from litattn.answers import answer_losses, answers, first_line, score_answer, split_item, token_f1
from litattn.cli import main as cli
from litattn.data import PrefixTask
from litattn.generate import generate

END = 21  # <|endthought|>: ids above it are ordinary tokens


@pytest.mark.parametrize(
    "prediction, reference, f1",
    [
        ("the cat sat", "a cat sat down", 4 / 7),  # 2 shared words: P 2/3, R 2/4
        ("Cat cat", "cat", 2 / 3),  # bags: one shared "cat" of 2 written: P 1/2, R 1
        ("x = 1", "x = 1", 1.0),
        ("", "", 1.0),
        ("", "an answer", 0.0),
        ("nothing shared", "at all", 0.0),
    ],
)
def test_token_f1_by_hand(prediction, reference, f1):
    assert token_f1(prediction, reference) == pytest.approx(f1)


def test_first_line_and_the_split_of_an_item():
    assert first_line("\n   \n  foo bar \nbaz") == "foo bar" and first_line(" \n") == ""
    item = {
        "input_ids": torch.tensor([5, 6, 7, 8, 9, 0, 0]),
        "labels": torch.tensor([-100, -100, 8, 9, 3, -100, -100]),
        "prefix_len": torch.tensor(3),
    }
    prompt, answer, metadata = split_item(item)
    assert prompt.tolist() == [5, 6, 7] and answer.tolist() == [8, 9, 3] and set(metadata) == {"prefix_len"}
    with pytest.raises(ValueError, match="-100 on a prompt"):
        split_item({"input_ids": torch.tensor([1, 2]), "labels": torch.tensor([2, 3])})


def test_score_answer_by_hand(reverse_checkpoint):
    tokenizer = ckpt.load(reverse_checkpoint[0])[1]
    eos = tokenizer.eos_id
    enc = lambda text: tokenizer.encode(text)  # noqa: E731
    same = score_answer([*enc(" 3 1 4"), eos], [*enc(" 3 1 4"), eos], tokenizer)
    assert (same["exact_match"], same["first_line_match"], same["token_f1"]) == (1.0, 1.0, 1.0)
    # one word of three wrong: no exact or first-line match, F1 2/3
    wrong = score_answer([*enc(" 3 1 5"), eos], [*enc(" 3 1 4"), eos], tokenizer)
    assert (wrong["exact_match"], wrong["first_line_match"]) == (0.0, 0.0)
    assert wrong["token_f1"] == pytest.approx(2 / 3) and wrong["written"] == " 3 1 5"
    # stopped before the end-of-text token: the text matches, the tokens do not
    short = score_answer(enc(" 3 1 4"), [*enc(" 3 1 4"), eos], tokenizer)
    assert (short["exact_match"], short["first_line_match"], short["token_f1"]) == (0.0, 1.0, 1.0)
    # a second line differs: the first line still matches
    lines = score_answer(enc(" 3 1\n 4"), enc(" 3 1\n 5"), tokenizer)
    assert (lines["exact_match"], lines["first_line_match"]) == (0.0, 1.0) and lines["token_f1"] == pytest.approx(2 / 3)


def hybrid_model(**overrides):
    torch.manual_seed(0)
    spec = {"name": "hybrid", "iterations": 2, "reweighting": "focus"}
    model = GPT(Config.from_name("tiny-llama", attention=spec, **overrides)).eval()
    with torch.no_grad():
        model.mechanism.reweight_weight.fill_(0.8)
    return model


@pytest.mark.parametrize("every", [None, 1, 2, 3])
def test_answer_losses_equal_a_forward_per_token(every):
    """Answer token j from a full forward over the prompt and answer[:j], its prefix the prompt's P until
    j >= k, then the prompt and the first k * floor(j / k) answer tokens."""
    model = hybrid_model()
    g = torch.Generator().manual_seed(2)
    prompt, answer = torch.randint(END + 1, 200, (6,), generator=g), torch.randint(END + 1, 200, (7,), generator=g)
    P = 4
    expected = []
    with torch.no_grad():
        for j in range(len(answer)):
            extent = P if every is None or j < every else len(prompt) + (j // every) * every
            ids = torch.cat([prompt, answer[:j]])
            logits = model(ids[None], prefix_len=torch.tensor([extent]))[0, -1]
            expected.append(F.cross_entropy(logits, answer[j]))
    got = answer_losses(model, prompt, answer, P, every)
    torch.testing.assert_close(got, torch.stack(expected), atol=1e-5, rtol=0)
    if every is not None and every < len(answer):  # re-thinking changes the later losses
        assert not torch.allclose(got, answer_losses(model, prompt, answer, P, None), atol=1e-4)


@pytest.fixture(scope="module")
def reverse_checkpoint(tmp_path_factory):
    """An untrained hybrid model with a tokenizer that has the reverse task's symbols, and the task's data."""
    root = tmp_path_factory.mktemp("answers")
    data = PrefixTask(task="reverse", symbols="0123456789", min_length=3, max_length=5, seed=0)
    tokenizer = data.setup(None, 320, 32, root / "cache")
    model = hybrid_model(vocab_size=320)
    return ckpt.save_checkpoint(root / "ckpt", model.state_dict(), model.config, tokenizer), data, root


def test_answers_scores_greedy_generation_and_the_answer_loss(reverse_checkpoint, capsys):
    path, data, root = reverse_checkpoint
    result = answers(path, data, items=5, out_file=root / "a.json", cache_dir=root / "cache")
    model, tokenizer, _ = ckpt.load(path)
    model.eval()
    val = data.val_dataset()
    chosen = torch.linspace(0, len(val) - 1, 5).round().long().tolist()
    losses, exact = [], []
    with torch.no_grad():
        for i, row in zip(chosen, result["per_item"], strict=True):
            prompt, answer, metadata = split_item(val[i])
            P = int(metadata["prefix_len"])
            ids = torch.cat([prompt, answer[:-1]])
            logits = model(ids[None], prefix_len=torch.tensor([P]))[0, len(prompt) - 1 :]
            losses.append(F.cross_entropy(logits, answer, reduction="none"))
            written = prompt.clone()  # greedy without the cache, stopping at the end-of-text token
            for _ in range(len(answer)):
                nxt = model(written[None], prefix_len=torch.tensor([P]))[0, -1, : model.config.vocab_size].argmax()
                written = torch.cat([written, nxt[None]])
                if int(nxt) == tokenizer.eos_id:
                    break
            exact.append(float(written[len(prompt) :].tolist() == answer.tolist()))
            assert row["index"] == i and row["exact_match"] == exact[-1]
            new = [t for t in written[len(prompt) :].tolist() if t != tokenizer.eos_id]
            assert row["written"] == tokenizer.decode(new)
    (row,) = result["results"]
    assert row["answer_loss"] == pytest.approx(torch.cat(losses).mean().item(), abs=1e-5)
    assert row["items"] == 5 and row["exact_match"] == sum(exact) / 5
    assert json.loads((root / "a.json").read_text())["results"] == [row]
    assert "5 items: answer loss" in capsys.readouterr().out


def test_answers_rethinks_as_generate_does(reverse_checkpoint):
    path, data, root = reverse_checkpoint
    result = answers(path, data, items=3, rethink_every=2, out_file=root / "r.json", cache_dir=root / "cache")
    model, tokenizer, _ = ckpt.load(path)
    model.eval()
    val = data.val_dataset()
    for i, row in zip(torch.linspace(0, len(val) - 1, 3).round().long().tolist(), result["per_item"], strict=True):
        prompt, answer, metadata = split_item(val[i])
        P = int(metadata["prefix_len"])
        with torch.no_grad():
            out = generate(model, prompt, len(answer), temperature=0, eos_id=tokenizer.eos_id, prefix_len=P,
                           rethink_every=2)  # fmt: skip
        assert row["exact_match"] == float(out[len(prompt) :].tolist() == answer.tolist())
        losses = answer_losses(model, prompt, answer, P, 2)
        assert row["answer_loss"] == pytest.approx(losses.mean().item(), abs=1e-6)
    assert result["rethink_every"] == 2
    option = {"rethink_every": 2}
    same = answers(path, data, items=3, attention=option, out_file=root / "o.json", cache_dir=root / "cache")
    assert same["results"] == result["results"]  # the attention option does what the argument does


def test_answers_cut_items_to_the_seq_len_given(reverse_checkpoint):
    """Items are made at seq_len (a truncation budget, as in training), not at the model's context."""
    path, data, root = reverse_checkpoint
    full = answers(path, data, items=4, out_file=root / "full.json", cache_dir=root / "cache")
    cut = answers(path, data, items=4, seq_len=16, out_file=root / "cut.json", cache_dir=root / "cache")
    assert full["results"][0]["length"] == 128 and cut["results"][0]["length"] == 16
    same = ("answer_loss", "exact_match", "first_line_match", "token_f1")  # these items fit in 16 tokens whole
    assert [{k: r[k] for k in same} for r in cut["per_item"]] == [{k: r[k] for k in same} for r in full["per_item"]]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--items", "0"], "items must be >= 1 (or null for all), got 0"),
        (["--rethink_every", "0"], "rethink_every must be >= 1"),
        (["--seq_len", "1"], "seq_len must be >= 2 (or null for the model's context), got 1"),
        (["--seq_len", "256"], "seq_len 256 exceeds the model's context of 128; lower it"),
    ],
)
def test_bad_input_is_one_line(reverse_checkpoint, tmp_path, capsys, extra, message):
    path, _, root = reverse_checkpoint
    argv = ["evaluate", "answers", "--checkpoint_dir", str(path), "--data", "PrefixTask", "--cache_dir", str(root)]
    with pytest.raises(SystemExit) as e:
        cli([*argv, "--out_file", str(tmp_path / "x.json"), *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
