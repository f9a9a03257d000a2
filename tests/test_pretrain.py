import csv
import math
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from conftest import debug_pretrain_args
from litattn.args import EvalArgs, LogArgs, OptimizerArgs, TrainArgs
from litattn.data import TextFiles
from litattn.pretrain.pretrain import setup

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """~150 KB of real text: a few standard-library modules."""
    folder = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in [
        "json/decoder.py",
        "json/encoder.py",
        "json/__init__.py",
        "textwrap.py",
        "shlex.py",
        "fnmatch.py",
        "glob.py",
        "string.py",
        "bisect.py",
        "heapq.py",
        "calendar.py",
        "colorsys.py",
    ]:
        shutil.copy(stdlib / name, folder / name.replace("/", "_"))
    return folder


def run(tmp_path, corpus, **overrides):
    """The debug recipe, in process, on the small corpus."""
    kwargs = dict(
        model_name="tiny-llama",
        model={"block_size": 64, "vocab_size": 512},
        out_dir=tmp_path / "out",
        data=TextFiles(train_dirs=[corpus], extensions=[".py"]),
        train=TrainArgs(
            global_batch_size=4,
            micro_batch_size=2,
            max_seq_length=64,
            max_steps=6,
            lr_warmup_steps=2,
            save_interval=3,
            log_interval=1,
        ),
        eval=EvalArgs(interval=3, max_iters=2),
        optimizer=OptimizerArgs(lr=3e-3, min_lr=3e-4),
        log=LogArgs(sample_prompt=None, progress_bar=False),
        accelerator="cpu",
        cache_dir=tmp_path.parent / "cache",
    )
    kwargs.update(overrides)
    setup(**kwargs)
    return kwargs["out_dir"]


def losses(out_dir: Path, key: str = "train_loss") -> dict[int, float]:
    (metrics,) = (out_dir / "logs" / "csv").glob("version_*/metrics.csv")
    with open(metrics) as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def test_pretrain_trains_saves_and_lowers_the_loss(tmp_path, corpus):
    out = run(
        tmp_path,
        corpus,
        train=TrainArgs(
            global_batch_size=4,
            micro_batch_size=2,
            max_seq_length=64,
            max_steps=30,
            lr_warmup_steps=3,
            save_interval=10,
            log_interval=1,
        ),
    )
    for name in [
        "model.safetensors",
        "model_config.yaml",
        "hyperparameters.yaml",
        "tokenizer.json",
        "training_state.pt",
    ]:
        assert (out / "final" / name).is_file(), name
    assert (out / "step-00000010").is_dir() and (out / "step-00000030").is_dir()
    train = losses(out)
    assert len(train) == 30
    assert train[30] < train[1] - 0.5  # it learns
    assert math.isfinite(losses(out, "val_loss")[30])


def test_resume_reproduces_the_uninterrupted_run(tmp_path, corpus):
    straight = run(tmp_path / "a", corpus)
    resumed = run(tmp_path / "b", corpus, resume=straight / "step-00000003")
    a, b = losses(straight), losses(resumed)
    assert sorted(b) == [4, 5, 6]
    for step in (4, 5, 6):
        assert b[step] == pytest.approx(a[step], abs=1e-6)
    assert losses(resumed, "val_loss")[6] == pytest.approx(losses(straight, "val_loss")[6], abs=1e-6)


def test_resume_auto_continues_from_the_newest_checkpoint(tmp_path, corpus):
    out = run(
        tmp_path,
        corpus,
        train=TrainArgs(
            global_batch_size=4, micro_batch_size=2, max_seq_length=64, max_steps=3, save_interval=3, log_interval=1
        ),
    )
    shutil.rmtree(out / "final")
    run(tmp_path, corpus, resume="auto")  # max_steps 6 now: continues at step 3 from step-00000003
    assert (out / "final").is_dir() and (out / "step-00000006").is_dir()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, corpus, monkeypatch):
    from litattn.model import GPT

    real_loss, calls = GPT.loss, []

    def poisoned(self, *args, **kwargs):
        calls.append(1)
        loss = real_loss(self, *args, **kwargs)
        return loss * float("nan") if len(calls) > 8 else loss  # 2 micro-steps per step: step 5 diverges

    monkeypatch.setattr(GPT, "loss", poisoned)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, corpus)
    assert e.value.code == 1
    assert (tmp_path / "out" / "step-00000003" / "model.safetensors").is_file()
    assert not (tmp_path / "out" / "final").exists()


def test_empty_dataset_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises((ValueError, FileNotFoundError), match="empty|no .*files|No .*files"):
        run(tmp_path, empty)


def test_global_batch_must_divide(tmp_path, corpus):
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        run(tmp_path, corpus, train=TrainArgs(global_batch_size=5, micro_batch_size=2, max_seq_length=64))


def _cli(*args, **kwargs):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "litattn", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
        **kwargs,
    )


def test_ddp_on_two_cpu_processes_matches_one_process(tmp_path, corpus):
    common = debug_pretrain_args(
        corpus, tmp_path / "cache", "--log.sample_prompt", "null", "--eval.final_validation", "true", extensions="[.py]"
    )  # the final validation reads every window, on one process or two
    one = _cli(*common, "--out_dir", str(tmp_path / "one"), "--devices", "1")
    assert one.returncode == 0, one.stderr[-2000:]
    two = _cli(*common, "--out_dir", str(tmp_path / "two"), "--devices", "2", "--strategy", "ddp")
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-4)
    assert losses(tmp_path / "two", "val_loss")[6] == pytest.approx(losses(tmp_path / "one", "val_loss")[6], abs=1e-4)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, corpus):
    args = debug_pretrain_args(
        corpus, tmp_path / "cache", "--out_dir", str(tmp_path / "out"), "--train.max_steps", "100000",
        "--train.save_interval", "null", "--eval.interval", "0", extensions="[.py]",
    )  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "litattn", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    for line in proc.stdout:
        if line.startswith("First optimizer step"):
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output[-2000:]
    assert "resume auto" in output
    saved = list((tmp_path / "out").glob("step-*"))
    assert len(saved) == 1 and (saved[0] / "training_state.pt").is_file()
