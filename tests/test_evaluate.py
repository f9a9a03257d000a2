import csv
import json
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reference  # noqa: F401 (registers test_window)
from litattn import checkpoint as ckpt
from litattn import precision
from litattn.args import EvalArgs, LogArgs, OptimizerArgs, TrainArgs
from litattn.cpu import CpuIsa
from litattn.data import TextFiles
from litattn.evaluate import perplexity
from litattn.pretrain.pretrain import setup

SEQ_LEN = 64


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny pretraining run on a few standard-library modules, with a final validation over the whole split."""
    root = tmp_path_factory.mktemp("evaluate")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for folder, names in [
        ("corpus", ["textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "heapq.py"]),
        ("val", ["bisect.py"]),
    ]:
        (root / folder).mkdir()
        for name in names:
            shutil.copy(stdlib / name, root / folder / name)
    setup(
        model_name="tiny-llama",
        model={"block_size": SEQ_LEN, "vocab_size": 512},
        out_dir=root / "out",
        data=_data(root),
        train=TrainArgs(
            global_batch_size=4,
            micro_batch_size=2,
            max_seq_length=SEQ_LEN,
            max_steps=8,
            lr_warmup_steps=2,
            save_interval=None,
            log_interval=1,
        ),
        eval=EvalArgs(interval=0, final_validation=True),
        optimizer=OptimizerArgs(lr=3e-3, min_lr=3e-4),
        log=LogArgs(sample_prompt=None, progress_bar=False),
        accelerator="cpu",
        cache_dir=root / "cache",
    )
    return root


def _data(root: Path) -> TextFiles:
    return TextFiles(train_dirs=[root / "corpus"], val_dir=root / "val", extensions=[".py"])  # ~1,500 val tokens


def _logged_final_val_loss(out: Path) -> float:
    (metrics,) = (out / "logs" / "csv").glob("version_*/metrics.csv")
    with open(metrics) as f:
        rows = [r for r in csv.DictReader(f) if r.get("val_loss")]
    return float(rows[-1]["val_loss"])


def _val_tokens(root: Path) -> np.ndarray:
    """The validation token file the run wrote, read directly (not through TokenWindows)."""
    (meta,) = (root / "cache").glob("data-*/meta.json")
    dtype = json.loads(meta.read_text())["dtype"]
    return np.fromfile(meta.parent / "val.bin", dtype=dtype).astype(np.int64)


@torch.no_grad()
def naive_loss(model, tokens: np.ndarray, length: int, n_windows: int) -> float:
    """Mean of each window's mean next-token loss, one window at a time, over n_windows of the non-overlapping
    windows, evenly spaced from the first to the last (all of them if there are no more)."""
    model.eval()
    losses = []
    total = (len(tokens) - 1) // length
    chosen = np.linspace(0, total - 1, n_windows).round().astype(int) if n_windows < total else range(total)
    for i in chosen:
        chunk = torch.from_numpy(tokens[i * length : (i + 1) * length + 1])
        logits = model(chunk[:-1].view(1, -1))[0]
        losses.append(F.cross_entropy(logits.double(), chunk[1:]).item())
    return sum(losses) / len(losses)


def test_final_checkpoint_reproduces_the_val_loss_the_run_logged(run, capsys):
    final = run / "out" / "final"
    result = perplexity(final, data=_data(run), micro_batch_size=8, cache_dir=run / "cache")  # the run used 2
    (row,) = result["results"]
    assert row["length"] == SEQ_LEN
    assert row["loss"] == pytest.approx(_logged_final_val_loss(run / "out"), abs=1e-4)
    assert row["perplexity"] == pytest.approx(np.exp(row["loss"]))
    tokens = _val_tokens(run)
    assert row["windows"] == (len(tokens) - 1) // SEQ_LEN and row["tokens"] == row["windows"] * SEQ_LEN
    model, _, _ = ckpt.load(final)  # and the number itself, one window at a time over the whole split
    assert row["loss"] == pytest.approx(naive_loss(model, tokens, SEQ_LEN, row["windows"]), abs=1e-5)
    printed = capsys.readouterr().out
    assert "Reusing token files" in printed  # the checkpoint's tokenizer = the run's: same cache
    (path,) = (final / "eval").glob("perplexity-causal-*.json")  # a new file per run, named where it is
    assert f"Saved {path}" in printed
    again = perplexity(final, data=_data(run), max_batches=1, cache_dir=run / "cache")
    assert len(list((final / "eval").glob("perplexity-causal-*.json"))) == 2  # the first is kept
    assert json.loads(path.read_text())["max_batches"] is None and again["max_batches"] == 1
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["attention"]["name"] == "causal"


def test_several_lengths_match_a_naive_loop_and_too_long_is_an_error_row(run, tmp_path, capsys):
    final = run / "out" / "final"
    out_file = tmp_path / "ppl.json"
    result = perplexity(
        final,
        data=_data(run),
        lengths=[16, 48, SEQ_LEN + 1, 10**6],
        micro_batch_size=4,
        max_batches=3,
        out_file=out_file,
        cache_dir=run / "cache",
    )
    rows = {r["length"]: r for r in result["results"]}
    model, _, _ = ckpt.load(final)
    tokens = _val_tokens(run)
    for length in (16, 48):
        assert rows[length]["windows"] == 12  # 3 batches of 4
        assert rows[length]["loss"] == pytest.approx(naive_loss(model, tokens, length, 12), abs=1e-5)

    for length in (SEQ_LEN + 1, 10**6):
        assert "exceed" in rows[length]["error"] and "loss" not in rows[length]
    printed = capsys.readouterr()
    assert "error:" in printed.out and "perplexity" in printed.out
    assert f"note: length(s) {SEQ_LEN + 1}, {10**6} could not run (see their rows); the others are saved" in printed.err
    assert json.loads(out_file.read_text())["results"] == json.loads(json.dumps(result["results"]))


# ------------------------------------------------------------- attention override
def test_attention_override_is_used_and_its_max_length_applies(run):
    final = run / "out" / "final"
    spec = {"name": "test_window", "window": 8}
    lengths = [SEQ_LEN, 2 * SEQ_LEN]  # 2 x block_size: beyond causal, within the override's reach
    result = perplexity(
        final,
        data=_data(run),
        lengths=lengths,
        micro_batch_size=2,
        max_batches=2,
        attention=spec,
        cache_dir=run / "cache",
    )
    assert result["attention"] == {"name": "test_window", "kernel": "auto", "window": 8}
    model, _, _ = ckpt.load(final, attention=spec)
    tokens = _val_tokens(run)
    for row, length in zip(result["results"], lengths, strict=True):
        assert "error" not in row
        assert row["loss"] == pytest.approx(naive_loss(model, tokens, length, 4), abs=1e-5)
    causal = perplexity(final, data=_data(run), micro_batch_size=2, max_batches=2, cache_dir=run / "cache")
    assert abs(causal["results"][0]["loss"] - result["results"][0]["loss"]) > 1e-3  # the window changed the model


def test_context_runs_causal_beyond_block_size_as_rope_extrapolation(run):
    final = run / "out" / "final"
    lengths = [SEQ_LEN, 2 * SEQ_LEN]
    result = perplexity(
        final,
        data=_data(run),
        lengths=lengths,
        micro_batch_size=2,
        max_batches=2,
        context=2 * SEQ_LEN,
        cache_dir=run / "cache",
    )
    model, _, _ = ckpt.load(final)
    model.allow_context(2 * SEQ_LEN)
    tokens = _val_tokens(run)
    for row, length in zip(result["results"], lengths, strict=True):
        assert "error" not in row
        assert row["loss"] == pytest.approx(naive_loss(model, tokens, length, 4), abs=1e-5)
    # the first block_size positions see the same context as without the override
    x = torch.tensor(tokens[: 2 * SEQ_LEN].astype(np.int64))[None]
    with torch.no_grad():
        assert torch.allclose(model(x)[:, :SEQ_LEN], model(x[:, :SEQ_LEN]), atol=1e-5)
    with pytest.raises(ValueError, match="no requested length could run, nothing written: .*--context"):
        perplexity(final, data=_data(run), lengths=[2 * SEQ_LEN], max_batches=1, cache_dir=run / "cache")


def test_learned_positions_cannot_extrapolate():
    from litattn import GPT, Config

    model = GPT(
        Config(
            name="gpt2-tiny",
            n_layer=1,
            n_head=2,
            n_embd=8,
            block_size=16,
            vocab_size=32,
            positional_embedding="learned",
        )
    )
    model.allow_context(16)
    with pytest.raises(ValueError, match="learned position"):
        model.allow_context(17)


def test_bad_input_is_a_clear_error(run, tmp_path):
    final = run / "out" / "final"
    with pytest.raises(ValueError, match="lengths"):
        perplexity(final, data=_data(run), lengths=[0], cache_dir=run / "cache")
    no_tokenizer = tmp_path / "ckpt"
    shutil.copytree(final, no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        perplexity(no_tokenizer, data=_data(run), cache_dir=run / "cache")


def test_cli_help_is_built_from_the_docstring(capsys):
    from jsonargparse import CLI

    with pytest.raises(SystemExit) as e:
        CLI({"evaluate": {"perplexity": perplexity}}, args=["evaluate", "perplexity", "--help"], as_positional=False)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--lengths" in out and "Context lengths" in out and "--attention" in out


def test_auto_precision_is_bf16_true_on_a_native_bf16_cpu_and_the_result_says_so(run, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(precision, "detect_isa", lambda: CpuIsa("AVX-512-BF16", native_bf16=True, capability="AVX512"))
    final, args = run / "out" / "final", {"data": _data(run), "max_batches": 2, "cache_dir": run / "cache"}
    auto = perplexity(final, out_file=tmp_path / "auto.json", **args)
    fp32 = perplexity(final, out_file=tmp_path / "fp32.json", precision="32-true", **args)
    reason = "auto: AVX-512-BF16 CPU, native bf16"
    assert (auto["precision"], auto["precision_reason"]) == ("bf16-true", reason)
    assert (fp32["precision"], fp32["precision_reason"]) == ("32-true", "given")
    assert f"Precision bf16-true ({reason})" in capsys.readouterr().out.splitlines()
    (bf16_row,), (fp32_row,) = auto["results"], fp32["results"]
    assert bf16_row["loss"] != fp32_row["loss"]  # computed in bf16 ...
    assert bf16_row["loss"] == pytest.approx(fp32_row["loss"], abs=0.05)  # ... to bf16's accuracy
