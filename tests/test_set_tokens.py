"""SET re-randomisation (litattn/set_tokens.py): the rows change at each epoch start, drawn from (seed, epoch)
with the model's init scale, their AdamW moments zeroed, no other weight touched; freeze keeps them out of
training; in the training loop a resumed run reproduces the draws."""

import shutil
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from litattn.args import EvalArgs, LogArgs, OptimizerArgs, TrainArgs
from litattn.config import Config
from litattn.data import TextFiles
from litattn.hooks import HookContext, TrainingHook
from litattn.model import GPT
from litattn.pretrain.pretrain import setup
from litattn.set_tokens import SETRedraw

IDS = [2, 3, 5, 17]
SEED = 7


def context(model, optimizer, epoch=0, step=0, printed=None):
    fabric = SimpleNamespace(print=(printed.append if printed is not None else lambda *a: None))
    return HookContext(model=model, optimizer=optimizer, epoch=epoch, step=step, seed=SEED, fabric=fabric)


def trained(tie: bool):
    """A tiny model and an AdamW that has taken one step on every row (so the moments are non-zero)."""
    torch.manual_seed(0)
    model = GPT(Config.from_name("tiny-llama", vocab_size=64, n_embd=256, tie_embeddings=tie))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.arange(64).view(2, 32)
    model.loss(idx, idx.roll(1, dims=1)).backward()
    optimizer.step()
    return model, optimizer


@pytest.mark.parametrize("tie", [False, True])
def test_an_epoch_start_redraws_exactly_the_set_rows_and_zeroes_their_moments(tie):
    model, optimizer = trained(tie)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    printed = []
    hook = SETRedraw(IDS)
    hook.on_epoch_start(context(model, optimizer, epoch=3, printed=printed))
    after = model.state_dict()
    others = [i for i in range(64) if i not in IDS]
    rows = ["transformer.wte.weight"] + ([] if tie else ["lm_head.weight"])  # drawn separately
    for key in after:
        if key in ("transformer.wte.weight", "lm_head.weight"):  # tied: one tensor under both names
            assert torch.equal(after[key][others], before[key][others]), key
            assert not torch.equal(after[key][IDS], before[key][IDS]), key
        else:
            assert torch.equal(after[key], before[key]), key  # no other weight is touched
    drawn = hook.drawn(model, SEED, 3)
    for key, values in zip(rows, drawn, strict=True):
        assert torch.equal(after[key][IDS], values)
    assert abs(drawn[0].std().item() / model.init_std - 1) < 0.05  # the init distribution (1024 values)
    for p in hook.rows(model):
        state = optimizer.state[p]
        for moment in ("exp_avg", "exp_avg_sq"):
            assert (state[moment][IDS] == 0).all() and (state[moment][others] != 0).any()
    assert printed == [f"epoch 3: re-drew the {len(IDS)} SET token rows (seed {SEED})"]
    again, _ = trained(tie)
    hook.on_epoch_start(context(again, torch.optim.AdamW(again.parameters()), epoch=3))
    assert torch.equal(again.transformer.wte.weight, model.transformer.wte.weight)  # a function of (seed, epoch)
    hook.on_epoch_start(context(again, torch.optim.AdamW(again.parameters()), epoch=4))
    assert not torch.equal(again.transformer.wte.weight[IDS], model.transformer.wte.weight[IDS])


def test_freeze_undoes_every_update_of_the_rows_and_every_n_steps_redraws_on_schedule():
    model, optimizer = trained(False)
    hook = SETRedraw(IDS, freeze=True)
    hook.on_epoch_start(context(model, optimizer, epoch=0))
    drawn = model.transformer.wte.weight[IDS].clone()
    idx = torch.tensor([IDS * 8])
    model.loss(idx, idx.roll(1, dims=1)).backward()
    optimizer.step()
    assert not torch.equal(model.transformer.wte.weight[IDS], drawn)  # the optimizer moved them
    hook.on_step_end(context(model, optimizer, epoch=0, step=1))
    assert torch.equal(model.transformer.wte.weight[IDS], drawn)

    periodic = SETRedraw(IDS, every_steps=3)
    values = []
    for step in range(1, 8):
        periodic.on_step_end(context(model, optimizer, step=step))
        values.append(model.transformer.wte.weight[IDS].clone())
    changes = [step for step in range(2, 8) if not torch.equal(values[step - 1], values[step - 2])]
    assert changes == [3, 6]
    once = SETRedraw(IDS, freeze=True, redraw=False)  # drawn at the start, then held
    once.on_epoch_start(context(model, optimizer, epoch=0))
    held = model.transformer.wte.weight[IDS].clone()
    once.on_epoch_start(context(model, optimizer, epoch=1, step=5))
    once.on_step_end(context(model, optimizer, epoch=1, step=6))
    assert torch.equal(model.transformer.wte.weight[IDS], held)
    with pytest.raises(ValueError, match="every_steps must be >= 1"):
        SETRedraw(IDS, every_steps=0)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        SETRedraw([999]).on_epoch_start(context(model, optimizer))


# ------------------------------------------------------------------ in the training loop
@dataclass
class SETTextFiles(TextFiles):
    def training_hooks(self) -> list[TrainingHook]:
        return [SETRedraw(IDS)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ["bisect.py", "keyword.py", "colorsys.py"]:
        shutil.copy(stdlib / name, folder / name)
    return folder


def run(out_dir: Path, corpus: Path, **overrides):
    setup(
        **{
            "model_name": "tiny-llama",
            "model": {"block_size": 64, "vocab_size": 512},
            "out_dir": out_dir,
            "data": SETTextFiles(train_dirs=[corpus], extensions=[".py"]),
            "train": TrainArgs(
                global_batch_size=8,
                micro_batch_size=4,
                max_seq_length=64,
                epochs=3,
                lr_warmup_steps=1,
                save_interval=1,
                log_interval=1,
            ),  # fmt: skip
            "eval": EvalArgs(interval=0, final_validation=False),
            "optimizer": OptimizerArgs(lr=3e-3, min_lr=3e-4),
            "log": LogArgs(sample_prompt=None, progress_bar=False),
            "accelerator": "cpu",
            "seed": SEED,
            "cache_dir": out_dir.parent / "cache",
            **overrides,
        }
    )


def test_in_training_each_epoch_starts_from_its_draw_and_a_resume_reproduces_the_run(tmp_path, corpus, capsys):
    run(tmp_path / "straight", corpus)
    log = capsys.readouterr().out
    assert [f"epoch {e}: re-drew the 4 SET token rows" in log for e in range(3)] == [True] * 3
    steps = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "straight").glob("step-*"))
    per_epoch = steps[-1] // 3
    model = GPT(Config.from_name("tiny-llama", block_size=64, vocab_size=512))
    hook = SETRedraw(IDS)
    # one step after an epoch start the rows have moved from that epoch's draw by one small AdamW step only
    for epoch in (1, 2):
        weights = load_file(tmp_path / "straight" / f"step-{epoch * per_epoch + 1:08d}" / "model.safetensors")
        drawn = hook.drawn(model, SEED, epoch)[0]
        assert (weights["transformer.wte.weight"][IDS] - drawn).abs().max() < 0.01
    run(tmp_path / "resumed", corpus, resume=tmp_path / "straight" / f"step-{per_epoch + 1:08d}")
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
