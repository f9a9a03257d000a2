import os
import pickle
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from litattn.data import DataModule, StdlibCorpus, TextFiles, TokenWindows
from litattn.data import prepare as prepare_module
from litattn.data.base import token_dtype
from litattn.tokenizer import Tokenizer

WORDS = [f"w{i}" for i in range(20)]


def word_tokenizer(folder: Path) -> Tokenizer:
    """A word-level tokenizer whose ids are known by hand: <|endoftext|>=0, <unk>=1, w{i}=i+2."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|endoftext|>"])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return Tokenizer(folder)


def ids(text: str) -> list[int]:
    return [int(w[1:]) + 2 for w in text.split()]


def write(folder: Path, files: dict[str, str | bytes]) -> None:
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())


@pytest.fixture
def tok(tmp_path):
    return word_tokenizer(tmp_path / "tok")


def tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


# ---------------------------------------------------------------------------------- TokenWindows
def test_token_windows_against_a_hand_computed_stream(tmp_path):
    path = tmp_path / "tokens.bin"
    np.arange(100, 110, dtype=np.uint32).tofile(path)  # 10 tokens
    ds = TokenWindows(path, seq_len=3, dtype=np.uint32)
    assert ds.n_tokens == 10 and len(ds) == 3  # (10 - 1) // 3
    expected = [
        ([100, 101, 102], [101, 102, 103]),
        ([103, 104, 105], [104, 105, 106]),
        ([106, 107, 108], [107, 108, 109]),
    ]
    for i, (x, y) in enumerate(expected):
        item = ds[i]
        assert item["input_ids"].dtype == torch.long and item["input_ids"].tolist() == x
        assert item["labels"].tolist() == y
    assert ds[-1]["labels"].tolist() == [107, 108, 109]
    with pytest.raises(IndexError):
        ds[3]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 3)
    assert len(TokenWindows(path, seq_len=9, dtype="uint32")) == 1
    with pytest.raises(ValueError, match="holds 10 tokens, fewer than one window of seq_len \\+ 1 = 11"):
        TokenWindows(path, seq_len=10, dtype=np.uint32)


def test_token_windows_pickle_without_the_data(tmp_path):
    path = tmp_path / "tokens.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)
    ds = TokenWindows(path, seq_len=10, dtype=np.uint16)
    ds[0]  # open the memmap
    blob = pickle.dumps(ds)
    assert len(blob) < 1000  # DataLoader workers get the path, not a copy of the tokens
    assert pickle.loads(blob)[5]["input_ids"].tolist() == list(range(50, 60))


def test_token_dtype():
    assert token_dtype(4096) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32 and token_dtype(128256) == np.uint32


# ---------------------------------------------------------------------------------- TextFiles
def test_documents_are_separated_by_eos(tmp_path, tok):
    write(tmp_path / "train", {"a.txt": "w1 w2 w3", "sub/b.txt": "w4\nw5", "c.txt": ""})
    write(tmp_path / "val", {"v.txt": "w9 w8 w7 w6"})
    data = TextFiles(train_dirs=[tmp_path / "train"], val_dir=tmp_path / "val")
    assert isinstance(data, DataModule)
    assert data.setup(tok, vocab_size=0, seq_len=2, cache_dir=tmp_path / "cache") is tok
    # sorted order: a.txt, c.txt (empty: contributes nothing), sub/b.txt; each document followed by <|endoftext|>
    stream = [*ids("w1 w2 w3"), 0, *ids("w4 w5"), 0]
    train = data.train_dataset()
    assert train.n_tokens == 7 and train.dtype == np.uint16
    assert np.fromfile(train.path, dtype=np.uint16).tolist() == stream
    assert [train[i]["input_ids"].tolist() for i in range(len(train))] == [stream[0:2], stream[2:4], stream[4:6]]
    assert [train[i]["labels"].tolist() for i in range(len(train))] == [stream[1:3], stream[3:5], stream[5:7]]
    val = data.val_dataset()
    assert np.fromfile(val.path, dtype=np.uint16).tolist() == [*ids("w9 w8 w7 w6"), 0]
    assert "3 files, 7 tokens for training; validation: 1 files from" in data.describe()


def test_single_file_holds_out_its_tail(tmp_path, tok):
    write(tmp_path / "train", {"only.txt": " ".join(WORDS[:9])})  # 9 words + eos = 10 tokens
    data = TextFiles([tmp_path / "train"], val_fraction=0.3)
    data.setup(tok, 0, seq_len=2, cache_dir=tmp_path / "cache")
    stream = [*range(2, 11), 0]
    assert np.fromfile(data.train_dataset().path, dtype=np.uint16).tolist() == stream[:7]
    assert np.fromfile(data.val_dataset().path, dtype=np.uint16).tolist() == stream[7:]  # ceil(0.3 * 10) = 3
    assert "the last 3 tokens (30%) of" in data.describe() and "only.txt" in data.describe()


def test_long_documents_are_cut_at_line_breaks_without_changing_tokens(tmp_path, tok, monkeypatch):
    text = "\n".join(" ".join(WORDS[i % 20] for i in range(j, j + 7)) for j in range(50))
    write(tmp_path / "train", {"a.txt": text, "b.txt": "w3 w4"})
    monkeypatch.setattr(prepare_module, "_PIECE_CHARS", 64)
    monkeypatch.setattr(prepare_module, "_BATCH_CHARS", 100)
    pieces = list(prepare_module._pieces(text))
    assert "".join(p for p, _ in pieces) == text and [end for _, end in pieces] == [False] * (len(pieces) - 1) + [True]
    assert all(p.startswith("\n") for p, _ in pieces[1:]) and len(pieces) > 10  # cut before line breaks
    one_line = " ".join(WORDS * 5)
    assert all(p.startswith(" ") for p, _ in list(prepare_module._pieces(one_line))[1:])  # else before spaces
    assert "".join(p for p, _ in prepare_module._pieces("x" * 200)) == "x" * 200  # else anywhere
    data = TextFiles([tmp_path / "train"], val_dir=tmp_path / "train")
    data.setup(tok, 0, 4, tmp_path / "cache")
    expected = [*ids(text), 0, *ids("w3 w4"), 0]
    assert np.fromfile(data.train_dataset().path, dtype=np.uint16).tolist() == expected


def test_split_by_file_is_deterministic_and_stable(tmp_path):
    write(tmp_path / "d", {f"part{i:02d}/doc{i}.txt": "w1" for i in range(60)})
    data = TextFiles([tmp_path / "d"], val_fraction=0.2)
    train, val = data.find_files()
    assert (train, val) == TextFiles([tmp_path / "d"], val_fraction=0.2).find_files()
    assert set(train).isdisjoint(val) and len(train) + len(val) == 60
    assert 3 <= len(val) <= 25  # about 12 of 60
    assert train == sorted(train) and val == sorted(val)

    write(tmp_path / "d", {"part00/new.txt": "w2", "zz.txt": "w3"})
    train2, val2 = data.find_files()
    assert set(val2) - set(val) <= {tmp_path / "d/part00/new.txt", tmp_path / "d/zz.txt"}
    assert set(val) <= set(val2)  # no old file moved
    assert TextFiles([tmp_path / "d"], val_fraction=0.2, seed=7).find_files()[1] != val


def test_at_least_one_validation_file(tmp_path):
    write(tmp_path / "d", {"a.txt": "w1", "b.txt": "w2"})
    train, val = TextFiles([tmp_path / "d"], val_fraction=0.001).find_files()
    assert len(train) == len(val) == 1
    train, val = TextFiles([tmp_path / "d"], val_fraction=0.999).find_files()
    assert len(train) == len(val) == 1


def test_extensions_exclude_and_val_dir_inside_train_dir(tmp_path):
    write(
        tmp_path / "d",
        {
            "a.txt": "w1",
            "b.md": "w1",
            "C.PY": "w1",
            "notes.markdown": "w1",
            "tests/t.md": "w1",
            "drafts/x.md": "w1",
            "deep/drafts/y.md": "w1",
            "held/v.md": "w1",
        },
    )
    data = TextFiles(
        [tmp_path / "d"], val_dir=tmp_path / "d/held", extensions=["md", ".py"], exclude=["tests", "drafts/*"]
    )
    train, val = data.find_files()
    names = sorted(str(p.relative_to(tmp_path / "d")) for p in train)
    assert names == ["C.PY", "b.md", "deep/drafts/y.md"]  # `drafts/*` is anchored at the folder; `tests` is not
    assert val == [tmp_path / "d/held/v.md"]


def test_cache_reuse_and_rebuild(tmp_path, tok, capsys):
    write(tmp_path / "train", {f"{i}.txt": " ".join(WORDS[i : i + 5]) for i in range(10)})
    before = tree(tmp_path / "train")
    cache = tmp_path / "cache"
    data = TextFiles([tmp_path / "train"], val_fraction=0.2)
    data.setup(tok, 0, 2, cache)
    first = data.train_dataset().path
    mtime = first.stat().st_mtime_ns
    assert first.parent.parent == cache and "(built)" in data.describe()
    assert tree(tmp_path / "train") == before  # nothing written into the input folder

    again = TextFiles([tmp_path / "train"], val_fraction=0.2)
    again.setup(tok, 0, 2, cache)
    assert again.train_dataset().path == first and first.stat().st_mtime_ns == mtime
    assert "(reused)" in again.describe() and "Reusing token files" in capsys.readouterr().out

    val_file = again._prepared.val_files[0]
    Path(val_file).write_text("w19 w19 w19")
    os.utime(val_file, ns=(mtime + 10**9, mtime + 10**9))
    changed = TextFiles([tmp_path / "train"], val_fraction=0.2)
    changed.setup(tok, 0, 2, cache)
    assert changed.train_dataset().path != first and "(built)" in changed.describe()
    assert [21, 21, 21, 0] == np.fromfile(changed.val_dataset().path, dtype=np.uint16).tolist()[:4]

    other_tok = word_tokenizer(tmp_path / "tok2")
    (other_tok.checkpoint_dir / "tokenizer_config.json").write_text('{"eos_token": "<unk>"}')
    other = TextFiles([tmp_path / "train"], val_fraction=0.2)
    other.setup(Tokenizer(other_tok.checkpoint_dir), 0, 2, cache)  # another tokenizer: another cache
    assert other.train_dataset().path.parent not in (first.parent, changed.train_dataset().path.parent)
    assert 1 in np.fromfile(other.train_dataset().path, dtype=np.uint16).tolist()  # <unk> separates documents now
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]


def test_parallel_tokenization_gives_the_same_tokens(tmp_path, tok):
    write(tmp_path / "train", {f"{i}.txt": " ".join(WORDS[i:]) for i in range(20)})
    streams = []
    for workers in (1, 2):
        data = TextFiles([tmp_path / "train"], num_workers=workers)
        data.setup(tok, 0, 2, tmp_path / f"cache{workers}")
        streams.append(np.fromfile(data.train_dataset().path, dtype=np.uint16))
    assert np.array_equal(*streams)
    assert TextFiles([tmp_path / "train"]).num_workers <= (os.cpu_count() or 1)


def test_cache_inside_the_input_folder_is_not_read_back(tmp_path, tok):
    write(tmp_path / "d", {"a.txt": "w1 w2 w3", "b.txt": "w4 w5 w6"})
    data = TextFiles([tmp_path / "d"], extensions=[".txt", ".json", ".bin"])
    data.setup(tok, 0, 2, tmp_path / "d" / "cache")
    train, val = data.find_files(tmp_path / "d" / "cache")
    assert sorted(p.name for p in train + val) == ["a.txt", "b.txt"]


def test_clear_errors(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match=f"Folder '{tmp_path / 'missing'}' does not exist"):
        TextFiles([tmp_path / "missing"]).setup(tok, 0, 2, tmp_path / "cache")
    write(tmp_path / "md", {"a.md": "w1"})
    with pytest.raises(ValueError, match=f"No .txt files in '{tmp_path / 'md'}'; check the folder and `extensions`"):
        TextFiles([tmp_path / "md"]).setup(tok, 0, 2, tmp_path / "cache")
    write(tmp_path / "short", {"a.txt": "w1 w2", "b.txt": "w3 w4 w5 w6 w7 w8 w9"})
    with pytest.raises(ValueError, match="split of .*short has \\d+ tokens, fewer than one window of seq_len"):
        TextFiles([tmp_path / "short"]).setup(tok, 0, 8, tmp_path / "cache")
    with pytest.raises(ValueError, match="val_fraction must be between 0 and 1"):
        TextFiles([tmp_path / "short"], val_fraction=1.0)
    with pytest.raises(RuntimeError, match="setup"):
        TextFiles([tmp_path / "short"]).train_dataset()


def test_non_utf8_file_is_skipped_with_a_warning(tmp_path, tok):
    write(tmp_path / "d", {"a.txt": "w1 w2 w3", "bad.txt": b"w1 \xff\xfe w2", "c.txt": "w4 w5 w6"})
    write(tmp_path / "val", {"v.txt": "w7 w8 w9"})
    data = TextFiles([tmp_path / "d"], val_dir=tmp_path / "val")
    with pytest.warns(UserWarning, match="bad.txt: not valid UTF-8"):
        data.setup(tok, 0, 2, tmp_path / "cache")
    assert np.fromfile(data.train_dataset().path, dtype=np.uint16).tolist() == [
        *ids("w1 w2 w3"),
        0,
        *ids("w4 w5 w6"),
        0,
    ]
    assert "1 unreadable or non-UTF-8 file(s) skipped" in data.describe()
    with pytest.warns(UserWarning, match="bad.txt"):  # reported again when the cache is reused
        TextFiles([tmp_path / "d"], val_dir=tmp_path / "val").setup(tok, 0, 2, tmp_path / "cache")


def test_setup_trains_a_tokenizer_when_none_is_given(tmp_path):
    texts = ["the cat sat on the mat. " * 30, "def f(x):\n    return x * 2\n" * 30, "é ü 日本 🦊 " * 30]
    write(tmp_path / "d", {f"{i}.txt": t for i, t in enumerate(texts)})
    data = TextFiles([tmp_path / "d"])
    tok = data.setup(None, vocab_size=300, seq_len=8, cache_dir=tmp_path / "cache")
    assert tok.vocab_size == 300 and tok.checkpoint_dir.parent == tmp_path / "cache"
    stream = np.fromfile(data.train_dataset().path, dtype=np.uint16).tolist()
    train_files, _ = data.find_files()
    expected = [i for f in train_files for i in tok.encode(f.read_text(), eos=True)]
    assert stream == expected
    assert tok.decode(stream) == "".join(f.read_text() + "<|endoftext|>" for f in train_files)


# ---------------------------------------------------------------------------------- StdlibCorpus
def test_stdlib_corpus_file_list():
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    train, val = StdlibCorpus().find_files()
    files = train + val
    assert len(files) > 300
    rel = {f.relative_to(stdlib).as_posix() for f in files}
    assert {"os.py", "json/__init__.py", "collections/__init__.py"} <= rel
    banned = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    assert not [r for r in rel if banned & set(r.split("/"))]
    assert all(f.suffix == ".py" for f in files)
    assert 0.02 < len(val) / len(files) < 0.1 and set(train).isdisjoint(val)
    assert StdlibCorpus().find_files() == (train, val)


def test_stdlib_corpus_setup_on_a_subset(tmp_path):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    data = StdlibCorpus(train_dirs=[stdlib / "json"])
    tok = data.setup(None, vocab_size=320, seq_len=32, cache_dir=tmp_path / "cache")
    assert len(data.train_dataset()) > 10 and len(data.val_dataset()) >= 1
    assert data.describe().startswith("Python ") and "standard library" in data.describe()
    x = data.train_dataset()[0]["input_ids"]
    first_file = data.find_files()[0][0]
    assert first_file.parent.name == "json"
    assert first_file.read_text().startswith(tok.decode(x))  # the first file, tokenized faithfully


def test_stdlib_corpus_packages_select_folders_of_the_library():
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    train, val = StdlibCorpus(packages=["json"], exclude=["__pycache__"]).find_files()
    assert sorted(f.name for f in train + val) == sorted(p.name for p in (stdlib / "json").glob("*.py"))
    with pytest.raises(ValueError, match=r"\['nope'\] are not packages"):
        StdlibCorpus(packages=["nope"])
    with pytest.raises(ValueError, match="packages is empty"):
        StdlibCorpus(packages=[])
