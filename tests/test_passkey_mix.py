import pickle
import re
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch
import yaml

from litattn import passkey as pk
from litattn.cli import main
from litattn.data import DataModule, PasskeyMix, TextFiles
from litattn.data.passkey_mix import PasskeyWindows

SEQ_LEN = 128


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """~60 KB of real text: a few standard-library modules."""
    folder = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ["textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py"]:
        shutil.copy(stdlib / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, corpus):
    """A 512-token BPE trained on the corpus and on passkey prose (so a prompt without filler is short)."""
    from litattn.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("tok")
    (root / "prose.txt").write_text("\n".join(pk.prompt_text(10000 + 7919 * i, 10, i % 10)[1] for i in range(30)))
    return Tokenizer.train([*sorted(corpus.glob("*.py")), root / "prose.txt"], 512, root / "tok")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def mix(corpus, tokenizer, cache, seq_len=SEQ_LEN, **kwargs) -> PasskeyMix:
    data = PasskeyMix(TextFiles([corpus], extensions=[".py"]), **kwargs)
    assert data.setup(tokenizer, 512, seq_len, cache) is tokenizer
    return data


def test_items_are_a_pure_function_of_seed_and_index(corpus, tokenizer, cache):
    a = mix(corpus, tokenizer, cache).train_dataset()
    b = mix(corpus, tokenizer, cache).train_dataset()
    c = mix(corpus, tokenizer, cache, seed=1).train_dataset()
    assert len(a) == len(b) == len(c) > 100
    for i in range(60):
        assert torch.equal(a[i]["input_ids"], b[i]["input_ids"]) and torch.equal(a[i]["labels"], b[i]["labels"])
    assert [a.is_passkey(i) for i in range(len(a))] != [c.is_passkey(i) for i in range(len(c))]
    both = [i for i in range(len(a)) if a.is_passkey(i) and c.is_passkey(i)]
    assert both and not torch.equal(a[both[0]]["input_ids"], c[both[0]]["input_ids"])  # other keys, depths, lengths
    assert pickle.loads(pickle.dumps(a))[both[0]]["input_ids"].tolist() == a[both[0]]["input_ids"].tolist()


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.6, 1.0])
def test_the_share_of_replaced_windows_is_the_fraction(corpus, tokenizer, cache, fraction):
    ds = mix(corpus, tokenizer, cache, fraction=fraction).train_dataset()
    share = sum(ds.is_passkey(i) for i in range(5000)) / 5000  # any index: the choice needs no data
    assert share == pytest.approx(fraction, abs=0.03)  # 4 standard deviations at 0.5


def test_a_passkey_item_is_the_prompt_the_answer_and_the_corpus(corpus, tokenizer, cache):
    data = mix(corpus, tokenizer, cache)
    ds, text_windows = data.train_dataset(), data.corpus.train_dataset()
    replaced = [i for i in range(len(ds)) if ds.is_passkey(i)][:12]
    assert len(replaced) == 12
    prompt_lengths = []
    for i in replaced:
        item, sample = ds[i], ds.sample(i)
        x, y = item["input_ids"], item["labels"]
        assert x.shape == y.shape == (SEQ_LEN,) and x.dtype == y.dtype == torch.long
        assert torch.equal(x[1:], y[:-1])  # labels are the inputs shifted; every one a real token
        window = [*x.tolist(), y[-1].item()]
        text = tokenizer.decode(window)
        assert 10000 <= sample.key <= 99999 and 0 <= sample.depth <= 1
        assert text.startswith(pk.INTRO)
        assert f"{pk.QUESTION} {sample.key}.<|endoftext|>" in text  # the key right after the question, then EOS
        assert text.count(pk.KEY_SENTENCE.format(key=sample.key).strip()) == 1
        # exactly the prompt `litattn evaluate passkey` builds, then the answer its scoring accepts
        prompt = pk.build_prompt(tokenizer, sample.key, sample.depth, sample.max_prompt_tokens)
        assert window[: sample.prompt_tokens] == prompt.ids == sample.ids[: sample.prompt_tokens]
        answer = window[sample.prompt_tokens : len(sample.ids)]
        assert answer[-1] == tokenizer.eos_id and pk.is_correct(tokenizer.decode(answer[:-1]), sample.key)
        # the rest of the window: the start of the corpus's window i
        corpus_window = [*text_windows[i]["input_ids"].tolist(), text_windows[i]["labels"][-1].item()]
        assert window[len(sample.ids) :] == corpus_window[: SEQ_LEN + 1 - len(sample.ids)]
        prompt_lengths.append(sample.prompt_tokens)
    assert max(prompt_lengths) - min(prompt_lengths) > 10  # lengths vary over the window


def test_other_items_and_validation_are_the_corpus(corpus, tokenizer, cache):
    data = mix(corpus, tokenizer, cache)
    ds, text_windows = data.train_dataset(), data.corpus.train_dataset()
    kept = [i for i in range(len(ds)) if not ds.is_passkey(i)]
    assert len(kept) > 0.6 * len(ds)
    for i in kept[:50] + [kept[-1]]:
        assert torch.equal(ds[i]["input_ids"], text_windows[i]["input_ids"])
        assert torch.equal(ds[i]["labels"], text_windows[i]["labels"])
    assert data.val_dataset().path == data.corpus.val_dataset().path
    assert data.training_hooks() == data.corpus.training_hooks() == []
    assert data.describe().startswith(data.corpus.describe())
    assert "passkey samples replace ~25% of training windows (seed 0 (outside a run))" in data.describe()
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_default_corpus_and_bad_arguments(corpus, tokenizer, cache):
    assert isinstance(PasskeyMix().corpus, DataModule) and type(PasskeyMix().corpus).__name__ == "StdlibCorpus"
    for bad in (0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"^fraction must be in \(0, 1\], got "):
            PasskeyMix(fraction=bad)
    with pytest.raises(ValueError, match=r"^seed must be in \[0, 4294967295\], got -1$"):
        PasskeyMix(seed=-1)
    with pytest.raises(RuntimeError, match="setup"):
        PasskeyMix(TextFiles([corpus])).train_dataset()
    with pytest.raises(ValueError, match=r"seq_len=40 is too short .* need seq_len >= (\d+)") as e:
        mix(corpus, tokenizer, cache, seq_len=40)
    shortest = int(re.search(r">= (\d+)", str(e.value)).group(1))
    with pytest.raises(ValueError, match="too short"):
        mix(corpus, tokenizer, cache, seq_len=shortest - 1)
    ds = mix(corpus, tokenizer, cache, seq_len=shortest, fraction=1.0).train_dataset()  # the minimum works
    for i in range(20):
        sample = ds.sample(i)
        assert ds[i]["input_ids"].shape == (shortest,) and len(sample.ids) <= shortest + 1
        assert sample.max_prompt_tokens <= shortest + 1 - (len(sample.ids) - sample.prompt_tokens)


def test_pretrain_with_passkey_mix_from_the_command_line(tmp_path, corpus, tokenizer, cache, capsys):
    out = tmp_path / "out"
    args = [
        "pretrain", "--config", "config_hub/pretrain/debug.yaml", "--data", "PasskeyMix",
        "--data.fraction", "0.5", "--data.corpus", "TextFiles", "--data.corpus.train_dirs", f"[{corpus}]",
        "--data.corpus.extensions", "[.py]", "--accelerator", "cpu", "--cache_dir", str(cache),
        "--tokenizer_dir", str(tokenizer.checkpoint_dir), "--model", "{block_size: 128, vocab_size: 512}",
        "--train.max_seq_length", "128", "--train.max_steps", "2", "--train.save_interval", "null",
        "--eval.interval", "0", "--log.sample_prompt", "null", "--out_dir", str(out),
    ]  # fmt: skip
    main(args)
    # the run's seed (42, the default) draws the samples: the module's own seed is not pinned
    assert "passkey samples replace ~50% of training windows (seed 42 (the run's))" in capsys.readouterr().out
    assert (out / "final" / "model.safetensors").is_file() and (out / "summary.json").is_file()
    data = yaml.safe_load((out / "final" / "hyperparameters.yaml").read_text())["data"]
    assert data["class_path"] == "litattn.data.passkey_mix.PasskeyMix" and data["init_args"]["fraction"] == 0.5


def test_windows_are_a_dataset_of_the_corpus_length(corpus, tokenizer, cache):
    data = mix(corpus, tokenizer, cache, fraction=1.0)
    ds = data.train_dataset()
    assert isinstance(ds, PasskeyWindows) and len(ds) == len(data.corpus.train_dataset())
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["input_ids"].shape == batch["labels"].shape == (4, SEQ_LEN)


def test_the_run_seed_draws_the_samples_unless_the_seed_is_pinned(corpus, tokenizer, cache):
    def samples(seed=None, run_seed=None):
        data = PasskeyMix(TextFiles([corpus], extensions=[".py"]), fraction=0.5, seed=seed)
        if run_seed is not None:
            data.seed_from_run(run_seed)
        data.setup(tokenizer, 512, SEQ_LEN, cache)
        windows = data.train_dataset()
        return [(windows.is_passkey(i), windows.sample(i).key) for i in range(8)]

    assert samples(run_seed=1) != samples(run_seed=2) and samples(run_seed=0) == samples()
    assert samples(seed=3, run_seed=1) == samples(seed=3, run_seed=2) == samples(seed=3)
