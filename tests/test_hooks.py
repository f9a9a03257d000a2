"""Training hooks (litattn/hooks.py) in the shared loop (litattn/loop.py): a mechanism's hook re-draws its
parameter at each epoch start from the (seed, epoch) generator; a resumed run and a 2-process DDP run reproduce
the uninterrupted 1-process run; a data module's hooks are called too."""

import csv
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from redraw_mechanism import Redraw, drawn_values
from safetensors.torch import load_file

from conftest import debug_pretrain_args
from litattn.args import EvalArgs, LogArgs, OptimizerArgs, TrainArgs
from litattn.config import Config
from litattn.data import TextFiles
from litattn.hooks import HookContext, TrainingHook, hook_generator
from litattn.model import GPT
from litattn.pretrain.pretrain import setup

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
REDRAW = {"name": "test_redraw", "module": "redraw_mechanism"}
SEED = 42
EPOCHS = 3


class Recorder(TrainingHook):
    """Records what the loop calls; runs after the model's hooks, so it sees the values they drew."""

    def __init__(self) -> None:
        self.epoch_starts: list[tuple[int, int]] = []  # (epoch, step)
        self.values_at_epoch_start: list[list[torch.Tensor]] = []  # per epoch start: each layer's values
        self.step_ends: list[tuple[int, int]] = []

    def on_epoch_start(self, ctx: HookContext) -> None:
        self.epoch_starts.append((ctx.epoch, ctx.step))
        self.values_at_epoch_start.append([b.attn.mechanism.values.detach().clone() for b in ctx.model.transformer.h])
        assert ctx.seed == SEED and ctx.fabric.world_size == 1

    def on_step_end(self, ctx: HookContext) -> None:
        self.step_ends.append((ctx.epoch, ctx.step))


@dataclass
class RecordingTextFiles(TextFiles):
    """TextFiles whose `training_hooks` is a Recorder."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.recorder = Recorder()

    def training_hooks(self) -> list[TrainingHook]:
        return [self.recorder]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """~8 KB of text: two files train (a few optimizer steps per epoch of 8 windows), one is held out."""
    folder = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ["bisect.py", "keyword.py", "colorsys.py"]:
        shutil.copy(stdlib / name, folder / name)
    return folder


def run(out_dir: Path, corpus: Path, **overrides) -> RecordingTextFiles:
    """3 epochs of tiny-llama with the test_redraw mechanism, a checkpoint after every step; returns the data
    module (its recorder says what the loop called)."""
    data = RecordingTextFiles(train_dirs=[corpus], extensions=[".py"])
    kwargs = dict(
        model_name="tiny-llama",
        model={"block_size": 64, "vocab_size": 512, "attention": REDRAW},
        out_dir=out_dir,
        data=data,
        train=TrainArgs(
            global_batch_size=8,
            micro_batch_size=2,
            max_seq_length=64,
            epochs=EPOCHS,
            lr_warmup_steps=2,
            save_interval=1,
            log_interval=1,
        ),
        eval=EvalArgs(interval=0, final_validation=True),
        optimizer=OptimizerArgs(lr=3e-3, min_lr=3e-4),
        log=LogArgs(sample_prompt=None, progress_bar=False),
        accelerator="cpu",
        seed=SEED,
        cache_dir=out_dir.parent / "cache",
    )
    kwargs.update(overrides)
    setup(**kwargs)
    return data


def metrics(out_dir: Path, key: str = "train_loss") -> dict[int, float]:
    (path,) = (out_dir / "logs" / "csv").glob("version_*/metrics.csv")
    with open(path) as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def mechanism_values(checkpoint: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(checkpoint / "model.safetensors").items() if k.endswith("mechanism.values")}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, corpus):
    """The uninterrupted run: (out_dir, its recorder, steps per epoch)."""
    out = tmp_path_factory.mktemp("hooks") / "straight"
    recorder = run(out, corpus).recorder
    steps_per_epoch = recorder.epoch_starts[1][1]
    assert steps_per_epoch >= 2, "the corpus must make epochs of 2 steps or more (a resume mid-epoch)"
    return out, recorder, steps_per_epoch


def test_hook_generator_is_a_pure_function_of_seed_epoch_and_salt():
    state = torch.get_rng_state()
    a = drawn_values(hook_generator(1, 2, 3))
    assert torch.equal(a, drawn_values(hook_generator(1, 2, 3)))
    for other in [(2, 2, 3), (1, 3, 3), (1, 2, 4)]:
        assert not torch.equal(a, drawn_values(hook_generator(*other)))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    ctx = HookContext(model=None, optimizer=None, epoch=2, step=0, seed=1, fabric=None)
    assert torch.equal(drawn_values(ctx.generator(3)), a)


def test_the_model_gathers_one_hook_per_layer():
    model = GPT(Config.from_name("tiny-llama", block_size=64, vocab_size=512, attention=REDRAW))
    hooks = model.training_hooks()
    assert len(hooks) == model.config.n_layer and all(isinstance(h, Redraw) for h in hooks)
    assert [h.mechanism for h in hooks] == [b.attn.mechanism for b in model.transformer.h]


def test_each_epoch_starts_with_values_drawn_from_its_seed_and_epoch(straight):
    out, recorder, steps_per_epoch = straight
    assert recorder.epoch_starts == [(e, e * steps_per_epoch) for e in range(EPOCHS)]  # epoch 0 included
    for epoch, layers in enumerate(recorder.values_at_epoch_start):
        for layer, values in enumerate(layers):
            assert torch.equal(values, drawn_values(hook_generator(SEED, epoch, salt=layer)))
    firsts = [layers[0] for layers in recorder.values_at_epoch_start]
    assert not torch.equal(firsts[0], firsts[1]) and not torch.equal(firsts[1], firsts[2])
    assert not torch.equal(*recorder.values_at_epoch_start[0][:2])  # each layer draws its own (salt)
    # the redraws are in the weights: the checkpoint at an epoch boundary holds the trained values of the
    # epoch that ends, the one after the boundary's first step values trained from the new draw
    before, after = (mechanism_values(out / f"step-{s:08d}") for s in (steps_per_epoch, steps_per_epoch + 1))
    for layer, key in enumerate(sorted(after)):
        drawn = drawn_values(hook_generator(SEED, 1, salt=layer))
        assert (after[key] - drawn).abs().max() < (before[key] - drawn).abs().max()


def test_data_module_hooks_are_called_after_every_step(straight):
    _, recorder, steps_per_epoch = straight
    total = EPOCHS * steps_per_epoch
    assert recorder.step_ends == [((step - 1) // steps_per_epoch, step) for step in range(1, total + 1)]


@pytest.mark.parametrize("where", ["mid_epoch", "epoch_boundary"])
def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path, corpus, straight, where):
    out, recorder, steps_per_epoch = straight
    at = steps_per_epoch + 1 if where == "mid_epoch" else steps_per_epoch
    resumed = run(tmp_path / "resumed", corpus, resume=out / f"step-{at:08d}").recorder
    # on_epoch_start only for the epochs the resumed run begins (the boundary's epoch 1 included)
    expected = [(e, e * steps_per_epoch) for e in range(EPOCHS) if e * steps_per_epoch >= at]
    assert resumed.epoch_starts == expected and len(expected) >= 1
    assert resumed.step_ends == [s for s in recorder.step_ends if s[1] > at]
    a, b = metrics(out), metrics(tmp_path / "resumed")
    assert sorted(b) == list(range(at + 1, EPOCHS * steps_per_epoch + 1))
    assert all(b[step] == a[step] for step in b), (a, b)
    assert metrics(tmp_path / "resumed", "val_loss") == metrics(out, "val_loss")
    straight_weights, resumed_weights = (
        load_file(out / "final/model.safetensors"),
        load_file(tmp_path / "resumed/final/model.safetensors"),
    )
    assert straight_weights.keys() == resumed_weights.keys()
    for key in straight_weights:
        assert torch.equal(straight_weights[key], resumed_weights[key]), key


def _cli(*args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run(
        [sys.executable, "-m", "litattn", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
    )


def test_ddp_on_two_cpu_processes_draws_what_one_process_draws(tmp_path, corpus):
    common = debug_pretrain_args(
        corpus, tmp_path / "cache", "--log.sample_prompt", "null", "--model.attention",
        "{name: test_redraw, module: redraw_mechanism}", "--train.global_batch_size", "8", "--train.max_steps",
        "null", "--train.epochs", str(EPOCHS), "--eval.interval", "0", "--eval.final_validation", "true",
        extensions="[.py]",
    )  # fmt: skip
    one = _cli(*common, "--out_dir", str(tmp_path / "one"), "--devices", "1")
    assert one.returncode == 0, one.stderr[-2000:]
    two = _cli(*common, "--out_dir", str(tmp_path / "two"), "--devices", "2", "--strategy", "ddp")
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert sorted(a) == sorted(b) and len(a) >= 2 * EPOCHS
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-4)
    assert metrics(tmp_path / "two", "val_loss") == pytest.approx(metrics(tmp_path / "one", "val_loss"), abs=1e-4)
    values_one, values_two = mechanism_values(tmp_path / "one/final"), mechanism_values(tmp_path / "two/final")
    assert len(values_one) == 2  # tiny-llama's layers
    for key, value in values_one.items():
        assert not torch.equal(value, torch.zeros_like(value))
        torch.testing.assert_close(values_two[key], value, atol=1e-5, rtol=0)
