"""Artefacts that cannot be mixed up (issue 20, items 5-8, 11, 15): a checkpoint refuses a tokenizer it was not
saved with, an importance dictionary one it was not built with; unreadable tokenizers and dictionaries are one-line
errors; a resumed `truncate build` never returns a result of other settings.

The command-line cases run in one subprocess (`run_cli`): each command through `litattn.__main__.main`, as
`litattn ...` runs it, with its exit code and stderr."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from litattn import GPT, Config
from litattn import checkpoint as ckpt
from litattn.tokenizer import FINGERPRINT_FILE, Tokenizer

ROOT = Path(__file__).resolve().parents[1]

_DRIVER = """
import contextlib, io, json, sys, traceback
from litattn.cli import main

results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit as e:
            code = e.code or 0
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


def run_cli(*commands: list[str]) -> list[tuple[int, str]]:
    """(exit code, stderr) of each `litattn` command, all run one after another in one fresh process."""
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, json.dumps([[str(a) for a in c] for c in commands])],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return [tuple(r) for r in json.loads(proc.stdout.splitlines()[-1])]


def assert_one_line_error(result, *fragments):
    code, err = result
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if not line.startswith("litattn: warning:")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


TEXT = "def add(a, b):\n    return a + b\n" * 40 + "the quick brown fox jumps over the lazy dog.\n" * 40


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A tiny checkpoint with its tokenizer (`ckpt`), a smaller tokenizer of another run (`other`), text data
    and instruction examples."""
    root = tmp_path_factory.mktemp("fingerprints")
    (root / "text").mkdir()
    (root / "text" / "a.txt").write_text(TEXT)
    (root / "text" / "b.txt").write_text(TEXT.upper())
    tokenizer = Tokenizer.train([root / "text" / "a.txt", root / "text" / "b.txt"], 400, root / "tok")
    Tokenizer.train([root / "text" / "a.txt"], 300, root / "other")
    model = GPT(Config.from_name("tiny-llama", vocab_size=400, block_size=64))
    ckpt.save_checkpoint(root / "ckpt", model.state_dict(), model.config, tokenizer)
    examples = "".join(f'{{"instruction": "Add {a} and 3.", "output": "{a + 3}"}}\n' for a in range(8))
    (root / "examples.jsonl").write_text(examples)
    return root


def _copy(root: Path, name: str) -> Path:
    target = root / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(root / "ckpt", target)
    return target


def generate(checkpoint: Path) -> list:
    return ["generate", "--checkpoint_dir", checkpoint, "--prompt", "def add", "--max_new_tokens", "2"]


def evaluate(root: Path, checkpoint: Path) -> list:
    return [
        "evaluate", "perplexity", "--checkpoint_dir", checkpoint, "--data", "TextFiles",
        "--data.train_dirs", f"[{root / 'text'}]", "--data.val_fraction", "0.5",
        "--lengths", "[32]", "--max_batches", "1", "--cache_dir", root / "cache", "--out_file", root / "ppl.json",
    ]  # fmt: skip


def finetune(root: Path, checkpoint: Path, out: str) -> list:
    return [
        "finetune", "--checkpoint_dir", checkpoint, "--method", "full", "--data", "AlpacaJSON",
        "--data.train_file", root / "examples.jsonl", "--train.max_steps", "1", "--train.global_batch_size", "2",
        "--train.micro_batch_size", "2", "--train.max_seq_length", "32", "--eval.interval", "1",
        "--eval.max_iters", "1", "--log.progress_bar", "false", "--accelerator", "cpu", "--out_dir", root / out,
        "--cache_dir", root / "cache",
    ]  # fmt: skip


# ---------------------------------------------------------------------------------- item 5: swapped tokenizer
def test_fingerprint_is_of_the_content_not_the_file(root, tmp_path):
    tok = Tokenizer(root / "ckpt")
    assert json.loads((root / "ckpt" / FINGERPRINT_FILE).read_text())["fingerprint"] == tok.fingerprint()
    assert Tokenizer(root / "other").fingerprint() != tok.fingerprint()
    reformatted = tmp_path / "reformatted"
    shutil.copytree(root / "ckpt", reformatted)
    spec = json.loads((reformatted / "tokenizer.json").read_text())
    merges = spec["model"]["merges"]
    spec["model"]["merges"] = [m.split(" ") if isinstance(m, str) else " ".join(m) for m in merges]  # other notation
    (reformatted / "tokenizer.json").write_text(json.dumps(spec, indent=4, sort_keys=True))
    assert Tokenizer(reformatted).fingerprint() == tok.fingerprint()  # and the recorded one is accepted


def test_a_swapped_tokenizer_is_refused_by_generate_finetune_and_evaluate(root):
    swapped = _copy(root, "swapped")
    shutil.copy(root / "other" / "tokenizer.json", swapped / "tokenizer.json")  # a smaller one of another run
    mine, theirs = Tokenizer(root / "ckpt").fingerprint(), Tokenizer(root / "other").fingerprint()
    results = run_cli(
        generate(swapped), finetune(root, swapped, "ft"), evaluate(root, swapped), generate(root / "ckpt")
    )
    for result in results[:3]:
        assert_one_line_error(result, str(swapped / "tokenizer.json"), mine, theirs, FINGERPRINT_FILE)
    assert not (root / "ft").exists() and not (root / "ppl.json").exists()  # nothing written
    assert results[3][0] == 0, results[3][1]  # the checkpoint's own tokenizer is fine

    # a checkpoint saved before fingerprints were recorded loads as it did
    (swapped / FINGERPRINT_FILE).unlink()
    shutil.copy(root / "ckpt" / "tokenizer.json", swapped / "tokenizer.json")
    assert ckpt.load(swapped)[1].fingerprint() == mine


# ---------------------------------------------------------------------------------- item 8: unreadable tokenizer
def test_a_truncated_tokenizer_is_a_one_line_error_in_every_entry_point(root):
    broken = _copy(root, "broken")
    text = (broken / "tokenizer.json").read_text()
    (broken / "tokenizer.json").write_text(text[: len(text) // 2])
    results = run_cli(
        generate(broken),
        finetune(root, broken, "ft-broken"),
        evaluate(root, broken),
        ["pretrain", "--config", "config_hub/pretrain/debug.yaml", "--tokenizer_dir", broken, "--data", "TextFiles",
         "--data.train_dirs", f"[{root / 'text'}]", "--accelerator", "cpu", "--out_dir", root / "pt",
         "--cache_dir", root / "cache"],
    )  # fmt: skip
    for result in results:
        assert_one_line_error(result, f"{broken / 'tokenizer.json'} is not a readable tokenizer", "truncated")
    assert not (root / "ft-broken").exists() and not (root / "pt").exists()


def test_unreadable_tokenizer_files_name_the_file(root, tmp_path):
    (tmp_path / "sp").mkdir()
    (tmp_path / "sp" / "tokenizer.model").write_bytes(b"\x0a\x05trunc")  # a cut sentencepiece model
    with pytest.raises(ValueError, match="tokenizer.model is not a readable tokenizer") as e:
        Tokenizer(tmp_path / "sp")
    assert "\n" not in str(e.value)
    shutil.copytree(root / "ckpt", tmp_path / "config")
    (tmp_path / "config" / "tokenizer_config.json").write_text('{"bos_token": "<|endoftext|>", ')
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON") as e:
        Tokenizer(tmp_path / "config")
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------- item 6: dictionaries
@pytest.fixture(scope="module")
def importance(root) -> Path:
    """An attention dictionary of the `ckpt` checkpoint, built as `litattn truncate build` builds it."""
    from litattn.data import TextFiles
    from litattn.truncation.cli import build

    data = TextFiles(train_dirs=[root / "text"], val_fraction=0.5)
    out = root / "importance.json"
    build(root / "ckpt", out, data, seq_len=32, micro_batch_size=2, max_batches=2, cache_dir=root / "cache")
    return out


def test_a_dictionary_of_another_tokenizer_is_refused_by_apply_and_generate(root, importance):
    from litattn.truncation import Importance

    mine, theirs = Tokenizer(root / "ckpt").fingerprint(), Tokenizer(root / "other").fingerprint()
    assert Importance.load(importance).info["tokenizer"] == mine
    model = GPT(Config.from_name("tiny-llama", vocab_size=300, block_size=64))
    ckpt.save_checkpoint(root / "ckpt-other", model.state_dict(), model.config, Tokenizer(root / "other"))
    old = Importance.from_scores({i: 1.0 / (i + 1) for i in range(0, 4096, 7)} | {4095: 0.5})  # no fingerprint
    old.save(root / "old.json")

    def apply(dictionary: Path, tokenizer_dir: Path, output: str) -> list:
        return [
            "truncate", "apply", "--input", root / "examples.jsonl", "--output", root / output, "--max_length", "16",
            "--importance", dictionary, "--tokenizer_dir", tokenizer_dir,
        ]  # fmt: skip

    results = run_cli(
        apply(importance, root / "other", "cut-other.jsonl"),
        ["generate", "--checkpoint_dir", root / "ckpt-other", "--prompt", "def add(a, b): return a + b " * 8,
         "--max_new_tokens", "2", "--truncate", "attention", "--importance", importance, "--prompt_budget", "8"],
        apply(root / "old.json", root / "ckpt", "cut-old.jsonl"),
        apply(importance, root / "ckpt", "cut.jsonl"),
    )  # fmt: skip
    for result in results[:2]:
        assert_one_line_error(result, f"{importance} was built with another tokenizer", mine, theirs)
    assert_one_line_error(
        results[2], f"{root / 'old.json'} holds token ids up to 4095", f"{Tokenizer(root / 'ckpt').vocab_size}-token"
    )
    assert not (root / "cut-other.jsonl").exists() and not (root / "cut-old.jsonl").exists()
    assert results[3][0] == 0, results[3][1]  # its own tokenizer
    assert (root / "cut.jsonl").is_file()


# ---------------------------------------------------------------------------------- items 7, 15: resumed builds
def test_a_resumed_build_never_returns_more_batches_and_names_the_setting_that_differs(root, importance):
    from litattn.truncation import Importance, partial_path

    out = root / "resumed.json"
    shutil.copy(importance, partial_path(out))  # a build of 2 batches, as if stopped there

    def build(*extra) -> list:
        return [
            "truncate", "build", "--checkpoint_dir", root / "ckpt", "--data", "TextFiles",
            "--data.train_dirs", f"[{root / 'text'}]", "--data.val_fraction", "0.5", "--seq_len", "32",
            "--micro_batch_size", "2", "--cache_dir", root / "cache", "--out", out, *extra,
        ]  # fmt: skip

    other, fewer, more = run_cli(
        build("--max_batches", "2", "--variant", "original"), build("--max_batches", "1"), build("--max_batches", "3")
    )
    assert_one_line_error(other, "variant: 'received' in the partial file, 'original' now")
    assert "checkpoint_dir" not in other[1] and len(other[1]) < 400  # the key that differs, not every setting
    assert_one_line_error(fewer, "already covers 2 batches, more than max_batches 1")
    assert more[0] == 0, more[1]
    assert Importance.load(out).info["batches"] == 3 and not partial_path(out).exists()


# ---------------------------------------------------------------------------------- item 11: numbers out of range
@pytest.mark.parametrize(
    "field, value, message",
    [
        ("sums", "[1" + "0" * 400 + "]", "sums must be finite numbers, got 1000"),  # an int no float holds
        ("default", "1" + "0" * 400, "default must be a number"),
        ("ids", "[16777216]", "ids must be integers in [0, 16,777,216), got 16777216"),  # 2**24: not a table size
        ("ids", "[1000000000000]", "ids must be integers in [0, 16,777,216)"),
        ("ids", "[-3]", "ids must be integers in [0, 16,777,216), got -3"),
        ("counts", "[" + str(2**70) + "]", "counts must be integers in [1, 2**62)"),
        ("documents", str(2**70), "documents must be an integer in [0, 2**62)"),
        ("sums", "[" + "1" * 5000 + "]", "not valid JSON"),  # beyond Python's 4300-digit limit
    ],
    ids=["sum-over-float", "default-over-float", "id-2**24", "id-10**12", "id-negative", "count-2**70",
         "documents-2**70", "int-of-5000-digits"],
)  # fmt: skip
def test_an_importance_file_with_numbers_out_of_range_is_a_one_line_error(tmp_path, capsys, field, value, message):
    from litattn.cli import main

    good = {"format": "litattn.importance", "version": 1, "method": "attention", "default": None, "documents": 0}
    good |= {"info": {}, "ids": [5], "counts": [1], "sums": [0.5]}
    text = json.dumps(good).replace(f'"{field}": {json.dumps(good[field])}', f'"{field}": {value}')
    path = tmp_path / "bad.json"
    path.write_text(text)
    (tmp_path / "in.jsonl").write_text('{"instruction": "x", "output": "y"}\n')
    argv = ["truncate", "apply", "--input", tmp_path / "in.jsonl", "--output", tmp_path / "out.jsonl"]
    argv += ["--max_length", "8", "--importance", path, "--tokenizer_dir", tmp_path]
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"litattn: error: {path} is not an importance file (") and message in err, err
    assert not (tmp_path / "out.jsonl").exists()
