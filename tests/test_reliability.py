"""No lost or mixed runs: signals at every phase, a used out_dir, a failed checkpoint write, the tokenizer
of a run started from a checkpoint, and temp files left by killed processes.

The faults are real: tests/fault_driver.py runs the command line in a subprocess that sends itself the
signal (or hits a file-size limit) at the chosen phase, so the handlers run as they would for a user."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import debug_pretrain_args
from litattn import checkpoint as ckpt
from litattn.args import EvalArgs, LogArgs, TrainArgs
from litattn.data import TextFiles
from litattn.pretrain.pretrain import setup
from litattn.tokenizer import Tokenizer
from litattn.utils import make_temp_dir, remove_stale_temps

ROOT = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("fault_driver.py")


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("text")
    words = "the quick brown fox jumps over the lazy dog while seven wizards quietly hex a jovial crowd".split()
    for i in range(6):
        (folder / f"doc{i}.txt").write_text(" ".join(words[(i * j) % len(words)] for j in range(3000)))
    return folder


def run_cli(tmp_path, text_dir, *extra, phase=None, fault=None, out="out"):
    args = debug_pretrain_args(
        text_dir, tmp_path.parent / "cache", "--out_dir", str(tmp_path / out), "--eval.final_validation", "true", *extra
    )
    command = [str(DRIVER), phase, fault, *args] if phase else ["-m", "litattn", *args]
    return subprocess.run(
        [sys.executable, *command],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def assert_clean(proc, code=0):
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def checkpoint_names(out: Path) -> list[str]:
    return sorted(d.name for d in out.iterdir() if d.is_dir() and d.name != "logs")


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_state_dict(directory / ckpt.MODEL_FILE)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, text_dir) -> Path:
    """The uninterrupted debug run, saving every step: what each interrupted run must have saved."""
    tmp = tmp_path_factory.mktemp("reference")
    proc = run_cli(tmp, text_dir, "--train.save_interval", "1", "--log.sample_prompt", "null")
    assert_clean(proc)
    return tmp / "out"


# phase -> (the checkpoint the run leaves, the step it holds); debug.yaml: 6 steps, validation and save every 3
PHASES = {
    "train": ("step-00000002", 2),  # the step in progress completes, then is saved
    "validation": ("step-00000003", 3),  # validation is cut short; the step before it is saved
    "checkpoint": ("step-00000003", 3),  # the write in progress completes; the run stops there
    "final_validation": ("final", 6),  # saved as final/ without it
    "sample": ("final", 6),  # final/ was saved before the sample
}


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("phase", list(PHASES))
def test_a_signal_at_any_phase_leaves_a_loadable_checkpoint_of_the_trained_weights(
    tmp_path, text_dir, reference, phase, sig
):
    proc = run_cli(tmp_path, text_dir, phase=phase, fault=sig)
    assert_clean(proc)
    assert f"[fault] {sig} during {phase}" in proc.stderr
    out = tmp_path / "out"
    name, step = PHASES[phase]
    assert name in checkpoint_names(out)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    model, tokenizer, _ = ckpt.load(out / name)
    assert tokenizer is not None and ckpt.load_training_state(out / name)["step"] == step
    expected = weights(reference / ("final" if name == "final" else ckpt.step_dir_name(step)))
    got = weights(out / name)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)  # exactly the trained weights of that step
    if name != "final":  # nothing past the stop
        assert checkpoint_names(out) == [name]


def test_finetuning_keeps_its_weights_when_a_signal_cuts_the_final_validation(tmp_path, reference):
    examples = tmp_path / "sums.jsonl"
    examples.write_text("".join(f'{{"instruction": "Add {a} and 3.", "output": "{a + 3}"}}\n' for a in range(40)))
    args = [
        "finetune", "--checkpoint_dir", str(reference / "final"), "--method", "full", "--data", "AlpacaJSON",
        "--data.train_file", str(examples), "--data.truncation", "left", "--train.max_steps", "4",
        "--train.global_batch_size", "4", "--train.micro_batch_size", "2", "--train.max_seq_length", "64",
        "--eval.interval", "2", "--eval.max_iters", "2", "--log.progress_bar", "false", "--accelerator", "cpu",
        "--out_dir", str(tmp_path / "ft"), "--cache_dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(DRIVER), "final_validation", "SIGTERM", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert_clean(proc)
    assert "[fault] SIGTERM during final_validation" in proc.stderr
    final = tmp_path / "ft" / "final"
    assert ckpt.load_training_state(final)["step"] == 4
    tuned, base = weights(final), weights(reference / "final")
    assert any(not torch.equal(tuned[k], base[k]) for k in base)  # the finetuned weights, not the base's
    ckpt.load(final)


def test_a_signal_before_the_first_step_saves_nothing_and_says_so(tmp_path, text_dir):
    proc = run_cli(tmp_path, text_dir, "--eval.initial_validation", "true", phase="initial_validation", fault="SIGINT")
    assert_clean(proc, code=128 + signal.SIGINT)
    assert "before the first optimizer step" in proc.stdout + proc.stderr
    assert checkpoint_names(tmp_path / "out") == []


def test_a_resumed_run_after_a_signal_finishes_like_the_uninterrupted_one(tmp_path, text_dir, reference):
    assert_clean(run_cli(tmp_path, text_dir, phase="validation", fault="SIGTERM"))
    assert_clean(run_cli(tmp_path, text_dir, "--resume", "auto", "--log.sample_prompt", "null"))
    got, expected = weights(tmp_path / "out" / "final"), weights(reference / "final")
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_a_failed_checkpoint_write_keeps_the_last_good_one_and_says_why(tmp_path, text_dir, reference):
    proc = run_cli(tmp_path, text_dir, phase="checkpoint", fault="write_fails")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "Could not write checkpoint" in last and "step-00000006" in last, last
    assert "File too large" in last and "step-00000003" in last and "is kept" in last, last
    out = tmp_path / "out"
    assert checkpoint_names(out) == ["step-00000003"]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    expected = weights(reference / "step-00000003")
    assert all(torch.equal(weights(out / "step-00000003")[k], expected[k]) for k in expected)


def sessions(out: Path) -> list[list[dict[str, str]]]:
    """The rows of each session's metrics.csv (logs/csv/version_N), in session order."""
    import csv

    paths = sorted((out / "logs" / "csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))
    return [list(csv.DictReader(open(p, newline=""))) for p in paths]


def test_a_resumed_run_validates_before_training_only_in_its_first_session(tmp_path, text_dir):
    """Issue 20, item 3: the initial validation ran again at the resumed step (a row without tokens)."""
    extra = ("--eval.initial_validation", "true", "--log.sample_prompt", "null")
    assert_clean(run_cli(tmp_path, text_dir, *extra, phase="train", fault="SIGTERM"))  # saves step-00000002
    assert_clean(run_cli(tmp_path, text_dir, *extra, "--resume", "auto"))
    first, second = sessions(tmp_path / "out")
    assert [(r["step"], r["tokens"]) for r in first if r["val_loss"]] == [("0", "0")]
    assert [r["step"] for r in second if r["val_loss"]] == ["3", "6", "6"]  # periodic at 3 and 6, then final
    assert all(r["tokens"] for r in second)


def test_a_full_disk_outside_a_checkpoint_names_the_file_and_the_kept_checkpoint(tmp_path, text_dir):
    """Issue 20, item 12: a metrics row that cannot be written whole is not written at all, and the error says
    which file failed and which checkpoint is kept (a file-size limit stands in for the full disk)."""
    proc = run_cli(tmp_path, text_dir, "--log.sample_prompt", "null", phase="metrics", fault="write_fails")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (metrics,) = (tmp_path / "out" / "logs" / "csv").glob("version_*/metrics.csv")
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"litattn: error: Could not write {metrics}: File too large"), last
    assert str(tmp_path / "out" / "step-00000003") in last and "is kept" in last, last
    text = metrics.read_text()
    assert text.endswith("\n")
    (rows,) = sessions(tmp_path / "out")
    assert [r["step"] for r in rows] == ["1", "2", "3", "3"] and all(None not in r.values() for r in rows)


# ---------------------------------------------------------------------------------- one run per out_dir
def run(tmp_path, text_dir, out="out", **overrides):
    """The debug recipe in process: 3 steps, a checkpoint at step 3 and final/."""
    kwargs = dict(
        model_name="tiny-llama",
        model={"block_size": 64, "vocab_size": 512},
        out_dir=tmp_path / out,
        data=TextFiles(train_dirs=[text_dir], extensions=[".txt"]),
        train=TrainArgs(
            global_batch_size=4, micro_batch_size=2, max_seq_length=64, max_steps=3, save_interval=3, log_interval=1
        ),
        eval=EvalArgs(interval=0, final_validation=False),
        log=LogArgs(sample_prompt=None, progress_bar=False),
        accelerator="cpu",
        cache_dir=tmp_path.parent / "cache",
    )
    kwargs.update(overrides)
    setup(**kwargs)
    return kwargs["out_dir"]


def test_a_second_run_into_a_used_out_dir_is_refused_before_any_work(tmp_path, text_dir):
    out = run(tmp_path, text_dir, seed=1)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".litattn.lock"}
    with pytest.raises(ValueError, match=r"already holds a run .*--resume auto.*another --out_dir.*--overwrite"):
        run(tmp_path, text_dir, seed=2)
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".litattn.lock"}
    assert after == before  # nothing overwritten, nothing added


def test_overwrite_deletes_the_old_run_first(tmp_path, text_dir):
    out = run(tmp_path, text_dir, seed=1, train=TrainArgs(global_batch_size=4, micro_batch_size=2, max_steps=6,
                                                          max_seq_length=64, save_interval=3))  # fmt: skip
    assert checkpoint_names(out) == ["final", "step-00000003", "step-00000006"]
    run(tmp_path, text_dir, seed=2, overwrite=True)
    assert checkpoint_names(out) == ["final", "step-00000003"]  # no step-6 of the other run beside it
    assert len(list((out / "logs" / "csv").iterdir())) == 1
    assert ckpt.load_training_state(out / "final")["seed"] == 2


def test_resuming_an_older_checkpoint_or_one_from_elsewhere_would_mix_runs_and_is_refused(tmp_path, text_dir):
    long = TrainArgs(global_batch_size=4, micro_batch_size=2, max_steps=6, max_seq_length=64, save_interval=3)
    out = run(tmp_path, text_dir, train=long)
    with pytest.raises(ValueError, match="newer than step-00000003.*step-00000006"):
        run(tmp_path, text_dir, train=long, resume=out / "step-00000003")
    other = run(tmp_path, text_dir, out="other", seed=3)
    with pytest.raises(ValueError, match="holds another run's checkpoints"):
        run(tmp_path, text_dir, out="other", train=long, resume=out / "step-00000003")
    assert checkpoint_names(other) == ["final", "step-00000003"]
    run(tmp_path, text_dir, train=long, resume="auto")  # continuing the newest is fine


def test_a_live_run_holds_its_out_dir(tmp_path, text_dir):
    args = debug_pretrain_args(
        text_dir, tmp_path.parent / "cache", "--out_dir", str(tmp_path / "out"), "--train.max_steps", "100000",
        "--train.save_interval", "null", "--eval.interval", "0",
    )  # fmt: skip
    first = subprocess.Popen(
        [sys.executable, "-m", "litattn", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        for line in first.stdout:
            if line.startswith("First optimizer step"):
                break
        second = run_cli(tmp_path, text_dir, "--resume", "auto")
        assert second.returncode == 2
        assert "in use by another litattn run" in second.stderr.strip().splitlines()[-1]
        assert str(first.pid) in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 0 and len(list((tmp_path / "out").glob("step-*"))) == 1


@pytest.mark.parametrize("problem", ["is a file", "is under a file", "not writable"])
def test_an_unusable_out_dir_is_a_one_line_error_before_any_work(tmp_path, text_dir, problem):
    (tmp_path / "afile").write_text("x")
    out = {"is a file": "afile", "is under a file": "afile/out", "not writable": "locked/out"}[problem]
    if problem == "not writable":
        if os.geteuid() == 0:
            out = "/proc/litattn-out"  # root writes anywhere else
        else:
            (tmp_path / "locked").mkdir(mode=0o500)
    proc = run_cli(tmp_path, text_dir, out=out)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "out_dir" in last and ("is a file" in last or "Cannot write" in last), last


# ---------------------------------------------------------------------------------- the tokenizer
def test_a_run_from_a_checkpoint_keeps_its_tokenizer(tmp_path, text_dir, tmp_path_factory):
    first = run(tmp_path, text_dir)
    other_text = tmp_path_factory.mktemp("other_text")
    (other_text / "a.txt").write_text("completely different words: lorem ipsum dolor sit amet " * 400)
    (other_text / "b.txt").write_text("consectetur adipiscing elit sed do eiusmod tempor " * 400)
    new_data = dict(data=TextFiles(train_dirs=[other_text], extensions=[".txt"]))
    second = run(tmp_path, text_dir, out="second", initial_checkpoint_dir=first / "final", **new_data)
    assert (second / "final" / "tokenizer.json").read_bytes() == (first / "final" / "tokenizer.json").read_bytes()
    # and a different tokenizer given explicitly is an error, before any work
    different = Tokenizer.train(sorted(other_text.glob("*.txt")), 300, tmp_path / "different")
    with pytest.raises(ValueError, match="differs from the tokenizer of"):
        run(
            tmp_path,
            text_dir,
            out="third",
            initial_checkpoint_dir=first / "final",
            tokenizer_dir=different.checkpoint_dir,
            **new_data,
        )
    # resuming with new data keeps the resumed checkpoint's tokenizer too
    long = TrainArgs(global_batch_size=4, micro_batch_size=2, max_steps=4, max_seq_length=64, save_interval=3)
    run(tmp_path, text_dir, resume="auto", train=long, **new_data)
    assert (first / "final" / "tokenizer.json").read_bytes() == (second / "final" / "tokenizer.json").read_bytes()


# ---------------------------------------------------------------------------------- temp files
def test_stale_temp_files_of_killed_processes_are_removed_at_the_next_start(tmp_path, text_dir):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cache = tmp_path.parent / "cache"
    stale_data = cache / f".data-0123456789abcdef.{dead.pid}.abcd1234.tmp"
    stale_data.mkdir(parents=True)
    (stale_data / "train.bin").write_bytes(b"\0" * 1000)
    live = make_temp_dir(cache, "data-live")  # this process's: still being written
    out = tmp_path / "out"
    stale_step = out / f".step-00000003.{dead.pid}.deadbeef.tmp"
    stale_step.mkdir(parents=True)
    old_style = out / ".final.a1b2c3d4.tmp"  # from a litattn that put no pid in the name
    old_style.mkdir()
    run(tmp_path, text_dir)
    assert not stale_data.exists() and not stale_step.exists() and not old_style.exists()
    assert live.exists()
    remove_stale_temps(cache)
    assert live.exists()  # its process (this one) is alive
    live.rmdir()


def test_remove_stale_temps_keeps_recent_unowned_temps(tmp_path):
    unowned = tmp_path / ".tokenizer-abc.x1y2z3w4.tmp"
    unowned.mkdir()
    assert remove_stale_temps(tmp_path) == []
    old = time.time() - 7200
    os.utime(unowned, (old, old))
    assert remove_stale_temps(tmp_path) == [unowned] and not unowned.exists()
