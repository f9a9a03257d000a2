import json
import re
import shutil
import sysconfig
from pathlib import Path

import pytest

from litattn import GPT, Config
from litattn import checkpoint as ckpt
from litattn import passkey as pk
from litattn.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny untrained tiny-llama (block_size 128) with a BPE tokenizer trained on stdlib files and prose."""
    from litattn.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("passkey")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for name in ["textwrap.py", "shlex.py", "fnmatch.py"]:
        shutil.copy(stdlib / name, root / name)
        files.append(root / name)
    # English like the prompts' (a code-only vocabulary of 512 spends more than 128 tokens on the instructions)
    (root / "prose.txt").write_text("\n".join(pk.prompt_text(10000 + 7919 * i, 10, i % 10)[1] for i in range(30)))
    files.append(root / "prose.txt")
    tokenizer = Tokenizer.train(files, 512, root / "tok")
    model = GPT(Config.from_name("tiny-llama", vocab_size=512)).eval()
    return ckpt.save_checkpoint(root / "ckpt", model.state_dict(), model.config, tokenizer)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    from litattn.tokenizer import Tokenizer

    return Tokenizer(checkpoint)


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("target", [100, 300, 1000])
def test_prompt_fills_the_target_and_puts_the_key_at_the_depth(tokenizer, depth, target):
    p = pk.build_prompt(tokenizer, 12345, depth, target)
    text = tokenizer.decode(p.ids)
    assert text.startswith(pk.INTRO) and text.endswith(pk.QUESTION)
    assert text.count("The pass key is 12345. Remember it. 12345 is the pass key.") == 1
    # length: at most the target, and one more filler sentence would not fit
    per_sentence = max(len(tokenizer.encode(s)) for s in pk.FILLER) + 2
    assert len(p.ids) <= target
    assert target - len(p.ids) <= per_sentence
    assert len(tokenizer.encode(pk.prompt_text(12345, p.filler_sentences + 1, 0)[1])) > target - 2
    # depth: the key sentence comes after round(depth * n) filler sentences, within one sentence of the depth
    n = p.filler_sentences
    filler = text[len(pk.INTRO) : text.index("What is the pass key?")]
    before = filler[: filler.index("The pass key is")]
    sentences_before = len(re.findall(r"\. ", before))
    assert sentences_before == p.key_after == round(depth * n)
    assert abs(sentences_before / max(n, 1) - depth) <= 1 / max(n, 1)
    # the token position of the key, as a fraction of the filler tokens, is within one sentence of the depth
    intro = len(tokenizer.encode(pk.INTRO))
    key_tokens = len(tokenizer.encode(pk.KEY_SENTENCE.format(key=12345)))
    filler_tokens = len(p.ids) - intro - key_tokens - len(tokenizer.encode(pk.QUESTION))
    assert abs((p.key_position - intro) / max(filler_tokens, 1) - depth) <= per_sentence / max(filler_tokens, 1)


def test_prompt_without_room_for_the_instructions_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="without filler"):
        pk.build_prompt(tokenizer, 12345, 0.5, 10)


def test_digits_correct_counts_digits_at_their_place():
    assert pk.digits_correct(" 12345.", 12345) == 1.0
    assert pk.digits_correct(" 12945.", 12345) == 0.8
    assert pk.digits_correct(" 1234", 12345) == 0.8  # one digit short
    assert pk.digits_correct(" 123456", 12345) == 5 / 6  # one too many
    assert pk.digits_correct(" no number", 12345) == 0.0


def test_is_correct():
    assert pk.is_correct(" 12345. Remember", 12345)
    assert pk.is_correct(" 1 2 3 4 5", 12345)
    assert not pk.is_correct(" 123456", 12345)
    assert not pk.is_correct(" 54321 12345", 12345)
    assert not pk.is_correct(" the sky", 12345)


def test_scoring_counts_each_cell(checkpoint, tmp_path, monkeypatch, capsys):
    # the "model" answers the key when the key sits in the first half (depth <= 0.5), and for the first
    # trial only otherwise; garbage for the rest
    depths = [0.0, 0.5, 1.0]
    calls = []

    def stub(model, tokenizer, ids, max_new_tokens):
        i = len(calls)  # calls come in order: length, depth, trial
        depth, trial = depths[i // 3 % 3], i % 3
        calls.append(len(ids))
        key = re.search(r"The pass key is (\d{5})\.", tokenizer.decode(ids)).group(1)
        return f" {key}. Remember" if depth <= 0.5 or trial == 0 else " the grass is"

    monkeypatch.setattr(pk, "_answer", stub)
    result = pk.passkey(checkpoint, lengths=[80, 120], depths=depths, trials=3, seed=1, out_dir=tmp_path)
    assert len(calls) == 2 * 3 * 3
    assert all(n <= 80 - 8 for n in calls[:9]) and all(n <= 120 - 8 for n in calls[9:])
    for row in result["results"]:
        assert [c["correct"] for c in row["cells"]] == [3, 3, 1]
        assert [c["accuracy"] for c in row["cells"]] == [1.0, 1.0, pytest.approx(1 / 3)]
        for c in row["cells"]:
            assert [a["key"] for a in c["answers"]] == result["keys"]
            assert c["prompt_tokens_max"] <= row["length"] - 8
    out = capsys.readouterr().out
    assert re.search(r"^\s+80\s+\S+\s+3/3\s+3/3\s+1/3$", out, re.M)
    assert re.search(r"^\s+120\s+\S+\s+3/3\s+3/3\s+1/3$", out, re.M)
    saved = json.loads((tmp_path / "passkey.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert (tmp_path / "passkey.png").read_bytes().startswith(b"\x89PNG")
    # reproducible keys: the same seed draws the same keys, another seed others
    again = pk.passkey(checkpoint, lengths=[80], depths=[0.0], trials=3, seed=1, out_dir=tmp_path / "b")
    other = pk.passkey(checkpoint, lengths=[80], depths=[0.0], trials=3, seed=2, out_dir=tmp_path / "c")
    assert again["keys"] == result["keys"] != other["keys"]


def test_cli_end_to_end_writes_json_and_png(checkpoint, capsys):
    main(
        [
            "evaluate",
            "passkey",
            "--checkpoint_dir",
            str(checkpoint),
            "--lengths",
            "[100]",
            "--depths",
            "[0.5]",
            "--trials",
            "2",
        ]
    )
    saved = json.loads((checkpoint / "eval" / "passkey.json").read_text())
    (row,) = saved["results"]
    (cell,) = row["cells"]
    assert row["length"] == 100 and cell["depth"] == 0.5 and cell["trials"] == 2
    assert 0 <= cell["correct"] <= 2 and len(cell["answers"]) == 2
    assert all(a["prompt_tokens"] <= 92 for a in cell["answers"])
    assert (checkpoint / "eval" / "passkey.png").read_bytes().startswith(b"\x89PNG")
    assert f"{cell['correct']}/2" in capsys.readouterr().out


def test_length_beyond_the_context_is_an_error_row(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(pk, "_answer", lambda model, tokenizer, ids, n: " 00000")
    result = pk.passkey(checkpoint, lengths=[100, 4096], depths=[0.0, 1.0], trials=1, out_dir=tmp_path)
    ok, beyond = result["results"]
    assert [c["correct"] for c in ok["cells"]] == [0, 0]
    assert beyond["length"] == 4096 and "exceed what the model handles (128" in beyond["error"]
    assert (tmp_path / "passkey.png").is_file()


def test_context_lets_causal_answer_beyond_block_size(checkpoint, tmp_path, monkeypatch):
    """With --context the 256-token prompts reach the real model (RoPE extrapolation), not an error row."""
    lengths = []
    real = pk._answer

    def answer(model, tokenizer, ids, n):
        lengths.append(len(ids) + n)
        return real(model, tokenizer, ids, n)

    monkeypatch.setattr(pk, "_answer", answer)
    result = pk.passkey(checkpoint, lengths=[256], depths=[0.5], trials=1, out_dir=tmp_path, context=256)
    assert "error" not in result["results"][0] and result["max_seq_length"] == 256
    assert 128 < max(lengths) <= 256


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lengths", "[]"], "lengths must be a non-empty list"),
        (["--lengths", "[0]"], "lengths (each of [0]) must be >= 1"),
        (["--lengths", "[20]"], "lengths (each of [20]; the prompt without filler plus max_new_tokens) must be >="),
        (["--depths", "[]"], "depths must be a non-empty list"),
        (["--depths", "[1.5]"], "depths (each of [1.5]) must be in [0, 1], got 1.5"),
        (["--trials", "0"], "trials must be >= 1, got 0"),
        (["--max_new_tokens", "0"], "max_new_tokens must be >= 1, got 0"),
    ],
)
def test_bad_arguments_are_one_line_errors(checkpoint, capsys, monkeypatch, args, message):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("litattn.checkpoint.load_with_tokenizer", no_load)
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "passkey", "--checkpoint_dir", str(checkpoint), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("litattn: error: ") and message in err and err.count("\n") == 1
