import ast
import hashlib
import inspect
import json
import textwrap
import time

import numpy as np
import pytest
import torch

from litattn.data import ALPACA_PROMPT, AlpacaJSON, InstructionDataset, PyDocQA, format_prompt, truncate
from litattn.data import pydoc_qa as pydoc_qa_module
from litattn.data.pydoc_qa import _example, first_paragraph, module_examples, signature
from litattn.tokenizer import Tokenizer
from litattn.training import collate

LINES = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nAdd two numbers.\n\n### Input:\n2 and 3\n\n### Response:\nThe sum is 5.",
    "What does `textwrap.dedent(text)` do? Remove any common leading whitespace from every line.",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe")
    (root / "lines.txt").write_text("\n".join(LINES * 5), encoding="utf-8")
    return Tokenizer.train([root / "lines.txt"], vocab_size=320, out_dir=root / "tok")


def word_tokenizer(folder) -> Tokenizer:
    """A word-level tokenizer without <|pad|>: <|endoftext|>=0, <unk>=1, w{i}=i+2."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(10)}}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf.add_special_tokens(["<|endoftext|>"])
    folder.mkdir(parents=True, exist_ok=True)
    hf.save(str(folder / "tokenizer.json"))
    return Tokenizer(folder)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def unit_hash(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


# ---------------------------------------------------------------------------------- template, dataset
def test_prompt_template():
    assert format_prompt("Add two numbers.", "2 and 3") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd two numbers.\n\n### Input:\n2 and 3\n\n### Response:\n"
    )
    assert format_prompt("Say hi.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nSay hi.\n\n### Response:\n"
    )
    assert format_prompt("Say hi.", "") == ALPACA_PROMPT["no_input"].format(instruction="Say hi.")


def test_dataset_pads_and_masks_a_hand_computed_example():
    # prompt 5 6 7, response 8 9 + eos 0, seq_len 8, pad 1 (the module docstring's picture)
    ds = InstructionDataset([([5, 6, 7], [8, 9, 0]), ([2, 3], [4, 0])], seq_len=8, pad_id=1)
    assert len(ds) == 2 and ds.n_tokens == 10 and ds.n_loss_tokens == 3 + 2
    assert ds[0]["input_ids"].tolist() == [5, 6, 7, 8, 9, 1, 1, 1]
    assert ds[0]["labels"].tolist() == [-100, -100, 8, 9, 0, -100, -100, -100]
    assert ds[-1]["input_ids"].tolist() == [2, 3, 4, 1, 1, 1, 1, 1]
    assert ds[-1]["labels"].tolist() == [-100, 4, 0, -100, -100, -100, -100, -100]
    assert ds[0]["input_ids"].dtype == ds[0]["labels"].dtype == torch.long
    # an example of exactly seq_len + 1 tokens fills the window without padding
    full = InstructionDataset([([5, 6], [7, 8, 9, 0])], seq_len=5, pad_id=1)[0]
    assert full["input_ids"].tolist() == [5, 6, 7, 8, 9] and full["labels"].tolist() == [-100, 7, 8, 9, 0]
    batch = collate(ds, torch.tensor([1, 0]))
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 8)
    assert batch["labels"][1].tolist() == ds[0]["labels"].tolist()
    with pytest.raises(IndexError):
        ds[2]
    with pytest.raises(ValueError, match="exceeds seq_len"):
        InstructionDataset([([1, 2, 3], [4, 0])], seq_len=3, pad_id=1)


def test_label_masking_with_a_trained_tokenizer(tmp_path, tok):
    record = {"instruction": "Add two numbers.", "input": "2 and 3", "output": "The sum is 5."}
    train = write_jsonl(tmp_path / "train.jsonl", [record])
    val = write_jsonl(tmp_path / "val.jsonl", [{"instruction": "Say hi.", "output": "Hi."}])
    prompt = tok.encode(format_prompt(record["instruction"], record["input"]))
    response = tok.encode(record["output"]) + [tok.eos_id]
    seq = prompt + response
    n, p, seq_len = len(seq), len(prompt), len(seq) + 6

    data = AlpacaJSON(train, val_file=val)
    assert data.setup(tok, 0, seq_len, tmp_path / "cache") is tok
    item = data.train_dataset()[0]
    input_ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    pad = tok.special_id("<|pad|>")
    assert pad != tok.eos_id
    assert input_ids == seq[:-1] + [pad] * (seq_len - n + 1)
    assert labels == [-100] * (p - 1) + seq[p:] + [-100] * (seq_len - n + 1)
    supervised = [j for j, y in enumerate(labels) if y != -100]
    assert supervised == list(range(p - 1, n - 1))  # exactly the response and the eos
    assert all(labels[j] == input_ids[j + 1] for j in supervised[:-1])  # the shift, wherever a label is set
    assert tok.decode([labels[j] for j in supervised]) == "The sum is 5.<|endoftext|>"
    assert tok.decode(input_ids[:p]) == format_prompt("Add two numbers.", "2 and 3")
    assert len(data.val_dataset()) == 1


def test_padding_falls_back_to_eos_without_a_pad_token(tmp_path):
    tok = word_tokenizer(tmp_path / "tok")
    assert "<|pad|>" not in tok.special_tokens
    train = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "w1", "output": "w2 w3"}])
    val = write_jsonl(tmp_path / "val.jsonl", [{"instruction": "w4", "output": "w5"}])
    data = AlpacaJSON(train, val_file=val)
    data.setup(tok, 0, 64, tmp_path / "cache")
    item = data.train_dataset()[0]
    n = len(tok.encode(format_prompt("w1"))) + 3  # prompt + w2 w3 eos
    assert item["input_ids"][n - 1 :].tolist() == [tok.eos_id] * (64 - n + 1)
    assert item["labels"][n - 4 : n].tolist() == [4, 5, 0, -100]  # w2 w3 eos are the targets, then padding


# ---------------------------------------------------------------------------------- truncation
def test_truncate_hand_computed():
    prompt, response = [1, 2, 3, 4], [5, 6, 0]
    assert truncate(prompt, response, 7) == (prompt, response)  # fits: unchanged
    assert truncate(prompt, response, 5, "right") == ([1, 2, 3, 4], [5])
    assert truncate(prompt, response, 5, "left") == ([3, 4], [5, 6, 0])
    assert truncate(prompt, response, 3, "right") == ([1, 2, 3], [])  # the prompt alone is too long
    assert truncate(prompt, response, 3, "left") == ([], [5, 6, 0])
    assert truncate(prompt, response, 2, "left") == ([], [6, 0])  # the response alone is too long: its end stays
    p, r = truncate(np.arange(4), np.arange(4, 7), 5, "left")
    assert isinstance(p, np.ndarray) and p.tolist() == [2, 3] and r.tolist() == [4, 5, 6]
    with pytest.raises(ValueError, match="truncation must be one of right, left"):
        truncate(prompt, response, 7, "middle")  # even for an example that fits


def test_truncation_in_setup_and_reported_counts(tmp_path, tok):
    records = [
        {"instruction": "Say hi.", "output": "Hi."},  # fits
        {"instruction": "Say hi.", "output": "Hi. " * 30},  # long response
        {"instruction": "Say hi. " * 40, "output": "Hi."},  # long prompt
    ]
    train = write_jsonl(tmp_path / "train.jsonl", records)
    val = write_jsonl(tmp_path / "val.jsonl", records[:1])
    tokens = [(tok.encode(format_prompt(r["instruction"])), tok.encode(r["output"]) + [0]) for r in records]
    short_prompt = len(tokens[0][0])
    seq_len = short_prompt + 10
    assert len(tokens[0][0]) + len(tokens[0][1]) <= seq_len + 1
    assert len(tokens[1][0]) + len(tokens[1][1]) > seq_len + 1
    assert len(tokens[2][0]) > seq_len + 1

    right = AlpacaJSON(train, val_file=val, truncation="right")
    right.setup(tok, 0, seq_len, tmp_path / "cache")
    # the long prompt leaves no response token: dropped (counted among the truncated)
    assert right.stats["train"].truncated == 2 and right.stats["train"].dropped == 1
    assert right.stats["train"].examples == 2 and right.stats["val"].truncated == 0
    assert "2 training and 0 validation examples truncated" in right.describe()
    assert "1 + 0 dropped" in right.describe()
    item = right.train_dataset()[1]  # the long response, cut at the right: input fills the window
    seq = tokens[1][0] + tokens[1][1]
    assert item["input_ids"].tolist() == seq[:seq_len]
    assert item["labels"].tolist() == [-100] * (short_prompt - 1) + seq[short_prompt : seq_len + 1]

    left = AlpacaJSON(train, val_file=val, truncation="left")
    left.setup(tok, 0, seq_len, tmp_path / "cache")
    assert left.stats["train"].truncated == 2 and left.stats["train"].dropped == 0
    assert len(left.train_dataset()) == 3
    seq = tokens[2][0] + tokens[2][1]  # long prompt, cut at the left: the last seq_len + 1 tokens stay
    item = left.train_dataset()[2]
    n_response = len(tokens[2][1])
    assert item["input_ids"].tolist() == seq[-(seq_len + 1) : -1]
    assert item["labels"].tolist() == [-100] * (seq_len - n_response) + tokens[2][1]
    assert "truncation=left" in left.describe()


# ---------------------------------------------------------------------------------- AlpacaJSON
RECORDS = [{"instruction": f"Say {i}.", "input": "loud" if i % 3 == 0 else "", "output": f"{i}!"} for i in range(20)]


def test_json_and_jsonl_load_the_same_examples(tmp_path, tok):
    (tmp_path / "data.json").write_text(json.dumps(RECORDS, indent=2), encoding="utf-8")
    write_jsonl(tmp_path / "data.jsonl", RECORDS)
    a, b = AlpacaJSON(tmp_path / "data.json"), AlpacaJSON(str(tmp_path / "data.jsonl"))
    a.setup(tok, 0, 160, tmp_path / "cache")
    b.setup(tok, 0, 160, tmp_path / "cache")
    for split in ("train_dataset", "val_dataset"):
        da, db = getattr(a, split)(), getattr(b, split)()
        assert len(da) == len(db) > 0
        assert torch.equal(collate(da, torch.arange(len(da)))["labels"], collate(db, torch.arange(len(db)))["labels"])
    assert len(a.train_dataset()) + len(a.val_dataset()) == 20
    assert "token cache" in a.describe() and "(reused)" in b.describe()  # same examples, same tokenizer


def test_jsonl_with_unicode_line_separators_and_a_bom(tmp_path):
    records = [{"instruction": "Join\u2028these.", "output": "a\u2029b"}, {"instruction": "x", "output": "y"}]
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in records).encode())
    train, val = AlpacaJSON(path, val_fraction=0.5).load_examples(tmp_path)
    assert sorted(e.output for e in train + val) == ["a\u2029b", "y"]


def test_split_is_deterministic_by_example_hash(tmp_path, tok):
    path = write_jsonl(tmp_path / "data.jsonl", RECORDS)
    data = AlpacaJSON(path, val_fraction=0.3, seed=7)
    train, val = data.load_examples(tmp_path)
    expected = [r["output"] for r in RECORDS if unit_hash(f"7\0{r['instruction']}\0{r['input']}\0{r['output']}") < 0.3]
    assert [e.output for e in val] == expected and 0 < len(expected) < 20
    assert [e.output for e in train] == [r["output"] for r in RECORDS if r["output"] not in expected]
    again, _ = AlpacaJSON(path, val_fraction=0.3, seed=7).load_examples(tmp_path)
    assert again == train
    other, _ = AlpacaJSON(path, val_fraction=0.3, seed=8).load_examples(tmp_path)
    assert other != train
    # a tiny val_fraction still holds out one example
    train, val = AlpacaJSON(path, val_fraction=1e-9).load_examples(tmp_path)
    assert len(val) == 1 and len(train) == 19
    data = AlpacaJSON(path, val_fraction=1e-9)
    data.setup(tok, 0, 160, tmp_path)
    assert "20 examples, 1 held out for validation" in data.describe()


def test_alpaca_bad_inputs(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="nope.json.*does not exist"):
        AlpacaJSON(tmp_path / "nope.json").load_examples(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "a", "output": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 3: not valid JSON"):
        AlpacaJSON(bad).load_examples(tmp_path)
    bad_list = tmp_path / "bad.json"
    bad_list.write_text('[{"instruction": "a", "output": "b"},\n {"instruction": }]', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.json is not valid JSON: .* line 2"):
        AlpacaJSON(bad_list).load_examples(tmp_path)
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"input": "x", "output": "y"}]))
    with pytest.raises(ValueError, match=r"missing\.json, example 2: has no 'instruction'"):
        AlpacaJSON(missing).load_examples(tmp_path)
    no_output = write_jsonl(tmp_path / "no_output.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "a"}])
    with pytest.raises(ValueError, match=r"no_output\.jsonl, line 2: has no 'output'"):
        AlpacaJSON(no_output).load_examples(tmp_path)
    for name, text in (("empty.jsonl", "\n\n"), ("empty.json", "[]")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=f"{name} holds no examples"):
            AlpacaJSON(tmp_path / name).load_examples(tmp_path)
    single = write_jsonl(tmp_path / "single.jsonl", RECORDS[:1])
    with pytest.raises(ValueError, match="too few to hold one out.*val_file"):
        AlpacaJSON(single).load_examples(tmp_path)
    good = write_jsonl(tmp_path / "good.jsonl", RECORDS)
    with pytest.raises(ValueError, match="needs the tokenizer of the checkpoint"):
        AlpacaJSON(good).setup(None, 4096, 64, tmp_path)
    with pytest.raises(ValueError, match="truncation must be one of right, left"):
        AlpacaJSON(good, truncation="middle")
    with pytest.raises(ValueError, match="val_fraction"):
        AlpacaJSON(good, val_fraction=1.0)
    with pytest.raises(RuntimeError, match="setup"):
        AlpacaJSON(good).train_dataset()


# ---------------------------------------------------------------------------------- PyDocQA
def test_signature_and_first_paragraph():
    tree = ast.parse(
        "def f(a, b=1, /, c=2, *args, d, e='x', **kw): 'Do the thing to a, b and c, then stop.\\n\\nMore.'\n"
        "def g(*, key=None): 'Short.'\n"
        "def _private(x): 'A private helper that is long enough to be kept.'\n"
        "class C:\n    'A class with an init.  Second\\n    line of the paragraph.'\n"
        "    def __init__(self, x, *, y=None): pass\n"
        "class D(C):\n    'A class without an init of its own.'\n"
        "def f(a): 'A later f replaces the first one, as at run time.'\n"
    )
    assert signature(tree.body[0].args) == "a, b=1, /, c=2, *args, d, e='x', **kw"
    assert signature(tree.body[1].args) == "*, key=None"
    assert signature(tree.body[3].body[1].args, drop_first=True) == "x, *, y=None"
    assert first_paragraph(inspect.cleandoc("  One\n  two   three.\n\n  Four.")) == "One two three."
    records = module_examples("pkg.mod", tree)
    assert [(r["instruction"], r["output"]) for r in records] == [
        ("What does `pkg.mod.f(a)` do?", "A later f replaces the first one, as at run time."),
        ("What does `pkg.mod.C(x, *, y=None)` do?", "A class with an init. Second line of the paragraph."),
        ("What does `pkg.mod.D` do?", "A class without an init of its own."),
    ]  # g's docstring is too short, _private is private
    # with_source: the definition's code is the input, without its own docstring (the answer), the tree unchanged
    assert records[1]["source"] == "class C:\n\n    def __init__(self, x, *, y=None):\n        pass"
    assert records[0]["source"] == "def f(a):\n    pass" and ast.get_docstring(tree.body[-1])
    assert _example(records[1], with_source=True).input == records[1]["source"] and not _example(records[1]).input


@pytest.fixture(scope="module")
def stdlib_qa(tok, tmp_path_factory):
    """PyDocQA over the whole standard library, set up cold (timed) then warm from the caches."""
    cache = tmp_path_factory.mktemp("pydoc_cache")
    t0 = time.perf_counter()
    cold = PyDocQA()
    cold.setup(tok, 0, 128, cache)
    t1 = time.perf_counter()
    warm = PyDocQA()
    warm.setup(tok, 0, 128, cache)
    t2 = time.perf_counter()
    print(f"\nPyDocQA: cold setup {t1 - t0:.2f} s, warm {t2 - t1:.2f} s")
    records = json.loads(next(cache.glob("pydoc-qa-*.json")).read_text())["examples"]
    return cold, warm, records, (t1 - t0, t2 - t1), cache


def test_pydoc_qa_builds_from_the_stdlib(stdlib_qa):
    cold, warm, records, (t_cold, t_warm), _ = stdlib_qa
    assert len(records) > 1000
    by_call = {f"{r['module']}.{r['name']}": r for r in records}
    dedent = by_call["textwrap.dedent"]
    assert dedent["instruction"] == "What does `textwrap.dedent(text)` do?"
    first_sentence = inspect.cleandoc(textwrap.dedent.__doc__).split("\n")[0]
    assert first_sentence.startswith("Remove any common leading whitespace")
    assert dedent["output"].startswith(first_sentence)
    assert by_call["textwrap.fill"]["instruction"] == "What does `textwrap.fill(text, width=70, **kwargs)` do?"
    decoder = by_call["json.decoder.JSONDecoder"]["instruction"]  # a class: its __init__ signature, without self
    assert decoder.startswith("What does `json.decoder.JSONDecoder(*, object_hook=None, parse_float=None")
    assert all(not part.startswith("_") for r in records for part in (*r["module"].split("."), r["name"]))
    assert all(len(r["output"]) >= 20 and "\n" not in r["output"] for r in records)
    assert "(built)" in cold.describe() and "example cache" in cold.describe()
    assert "(reused)" in warm.describe() and "(built)" not in warm.describe()
    assert t_warm < t_cold
    n_train, n_val = len(warm.train_dataset()), len(warm.val_dataset())
    assert n_train + n_val + warm.stats["train"].dropped + warm.stats["val"].dropped == len(records)
    assert 0 < n_val < n_train


def test_pydoc_qa_split_by_module_is_deterministic(stdlib_qa, tmp_path):
    _, warm, records, _, cache = stdlib_qa
    modules = sorted({r["module"] for r in records})
    val_modules = {m for m in modules if unit_hash(f"42\0{m}") < 0.05}
    train, val = PyDocQA().load_examples(cache)  # reuses the examples cache
    assert [e.instruction for e in val] == [r["instruction"] for r in records if r["module"] in val_modules]
    assert [e.instruction for e in train] == [r["instruction"] for r in records if r["module"] not in val_modules]
    n_val_modules = len(val_modules)
    assert f"from {len(modules) - n_val_modules} modules for training" in warm.describe()
    assert f"{len(val):,} examples from {n_val_modules} modules held out" in warm.describe()
    other_train, _ = PyDocQA(seed=1).load_examples(cache)
    assert other_train != train


def test_pydoc_qa_subset_and_cache_reuse(tmp_path, tok, monkeypatch):
    data = PyDocQA(modules=["textwrap", "json.decoder", "shlex"], val_fraction=0.3)
    data.setup(tok, 0, 256, tmp_path)
    records = json.loads(next(tmp_path.glob("pydoc-qa-*.json")).read_text())["examples"]
    assert {r["module"] for r in records} == {"textwrap", "json.decoder", "shlex"}
    assert len(data.train_dataset()) > 0 and len(data.val_dataset()) > 0
    assert len(list(tmp_path.glob("pydoc-qa-*.json"))) == 1 and len(list(tmp_path.glob("instructions-*.npz"))) == 1

    def no_parsing(*args, **kwargs):
        raise AssertionError("the stdlib was parsed again instead of reusing the cache")

    monkeypatch.setattr(pydoc_qa_module, "module_examples", no_parsing)
    again = PyDocQA(modules=["shlex", "textwrap", "json.decoder"], val_fraction=0.3)
    again.setup(tok, 0, 256, tmp_path)
    assert "example cache" in again.describe() and "(built)" not in again.describe()
    assert torch.equal(collate(again.val_dataset(), torch.arange(len(again.val_dataset())))["labels"],
                       collate(data.val_dataset(), torch.arange(len(data.val_dataset())))["labels"])  # fmt: skip


def test_pydoc_qa_bad_inputs(tmp_path, tok):
    with pytest.raises(ValueError, match="not found in the standard library: nosuchmodule"):
        PyDocQA(modules=["textwrap", "nosuchmodule"]).load_examples(tmp_path)
    with pytest.raises(ValueError, match="too few to hold a module out"):
        PyDocQA(modules=["textwrap"]).load_examples(tmp_path)
    with pytest.raises(ValueError, match="needs the tokenizer"):
        PyDocQA().setup(None, 4096, 64, tmp_path)
