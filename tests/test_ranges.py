"""Every numeric argument of every subcommand is range-checked before any work: a bad value exits 2 with one
line naming the argument, the value and the allowed range; the boundary value is accepted.

In process (`litattn.__main__.main`), with the first piece of real work of each entry point replaced by a stub
that raises `Reached`: a good value must get there, a bad one must stop before it.
"""

import sysconfig
from pathlib import Path

import pytest
import torch

from litattn import GPT, Config
from litattn import checkpoint as ckpt
from litattn import convert as convert_module
from litattn.args import (
    EvalArgs,
    LogArgs,
    LoRAArgs,
    OptimizerArgs,
    TrainArgs,
    check_range,
    check_run_args,
)
from litattn.cli import main
from litattn.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


class Reached(Exception):
    """Raised where an entry point's real work would start (loading, launching, converting, running)."""


def _reached(*args, **kwargs):
    raise Reached


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """An untrained tiny-llama (2 layers, 4 heads) with block_size 64 and a small BPE trained here."""
    root = tmp_path_factory.mktemp("ranges")
    tokenizer = Tokenizer.train([Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"], 320, root / "tok")
    config = Config.from_name("tiny-llama", vocab_size=320, block_size=64)
    torch.manual_seed(0)
    return ckpt.save_checkpoint(root / "ckpt", GPT(config).state_dict(), config, tokenizer)


@pytest.fixture
def stubs(monkeypatch, tiny_checkpoint):
    import litattn.ablate
    import litattn.ablate_prepare
    import litattn.evaluate
    import litattn.generate
    import litattn.loop
    import litattn.passkey
    import litattn.visualize

    real_load = ckpt.load_with_tokenizer

    def load(checkpoint_dir, *args, **kwargs):  # visualize loads the real tiny checkpoint: its config has the limits
        if Path(checkpoint_dir) != tiny_checkpoint:
            raise Reached
        return real_load(checkpoint_dir, *args, **kwargs)

    monkeypatch.setattr(litattn.loop, "launch_fabric", _reached)  # pretrain
    monkeypatch.setattr(ckpt, "load_config", _reached)  # finetune's first read
    for module in (ckpt, litattn.generate, litattn.evaluate, litattn.passkey, litattn.visualize):  # who loads
        monkeypatch.setattr(module, "load_with_tokenizer", load)
    monkeypatch.setattr(GPT, "attention_maps", _reached)  # visualize, once its checkpoint is loaded
    monkeypatch.setattr(convert_module, "from_hf", _reached)
    monkeypatch.setattr(convert_module, "to_hf", _reached)
    monkeypatch.setattr(litattn.ablate, "_execute", _reached)
    monkeypatch.setattr(litattn.ablate_prepare, "execute", _reached)  # an ablation's prepare stage runs first


PRETRAIN = ["pretrain", "--config", str(ROOT / "config_hub/pretrain/debug.yaml"), "--accelerator", "cpu"]
FINETUNE = ["finetune", "--checkpoint_dir", "{tmp}/no_checkpoint"]  # batch 16 x micro 4 by default
GENERATE = ["generate", "--checkpoint_dir", "{tmp}/no_checkpoint"]
EVALUATE = ["evaluate", "perplexity", "--checkpoint_dir", "{tmp}/no_checkpoint", "--out_file", "{tmp}/out/p.json"]
VISUALIZE = [
    "visualize",
    "attention",
    "--checkpoint_dir",
    "{ckpt}",
    "--prompt",
    "def f",
    "--out_file",
    "{tmp}/out/a.png",
]
ABLATE = ["ablate", "--base", str(ROOT / "config_hub/pretrain/debug.yaml"), "--variants", "{a: {}}", "--seeds", "[1]"]
FROM_HF = ["convert", "from_hf", "--checkpoint_dir", "{tmp}/hf", "--out_dir", "{tmp}/out"]
TO_HF = ["convert", "to_hf", "--checkpoint_dir", "{tmp}/no_checkpoint", "--out_dir", "{tmp}/out"]
OUT = ["--out_dir", "{tmp}/out", "--cache_dir", "{tmp}/cache"]

# (command, option, bad value, good (boundary) value, what the error line says)
CASES = [
    (PRETRAIN + OUT, "--train.global_batch_size", "0", None, "train.global_batch_size must be >= 1, got 0"),
    (PRETRAIN + OUT, "--train.global_batch_size", "5", "2", "multiple of micro_batch_size (train.micro_batch_size=2)"),
    (PRETRAIN + OUT, "--train.micro_batch_size", "0", "1", "train.micro_batch_size must be >= 1, got 0"),
    (PRETRAIN + OUT, "--train.micro_batch_size", "3", "4", "multiple of micro_batch_size"),
    (PRETRAIN + OUT, "--train.max_seq_length", "0", "1", "train.max_seq_length must be >= 1 (or null"),
    (PRETRAIN + OUT, "--train.max_steps", "0", "1", "train.max_steps must be >= 1 (or null for no limit), got 0"),
    (PRETRAIN + OUT, "--train.max_steps", "-1", "null", "train.max_steps must be >= 1 (or null for no limit), got -1"),
    (PRETRAIN + OUT, "--train.max_tokens", "0", "1", "train.max_tokens must be >= 1 (or null for no limit), got 0"),
    (PRETRAIN + OUT, "--train.epochs", "0", "1", "train.epochs must be >= 1 (or null for no limit), got 0"),
    (PRETRAIN + OUT, "--train.max_time", "0", "0.001", "train.max_time must be > 0 (or null for no limit), got 0"),
    (PRETRAIN + OUT, "--train.max_time", ".nan", "1e9", "train.max_time must be > 0 (or null for no limit), got nan"),
    (PRETRAIN + OUT, "--train.lr_warmup_steps", "-1", "0", "train.lr_warmup_steps must be >= 0, got -1"),
    (PRETRAIN + OUT, "--train.max_norm", "0", "0.001", "train.max_norm must be > 0 (or null for no clipping), got 0"),
    (PRETRAIN + OUT, "--train.save_interval", "0", "1", "train.save_interval must be >= 1 (or null"),
    (PRETRAIN + OUT, "--train.log_interval", "0", "1", "train.log_interval must be >= 1, got 0"),
    (PRETRAIN + OUT, "--train.loss_chunk_size", "0", "1", "train.loss_chunk_size must be >= 1 (or null"),
    (PRETRAIN + OUT, "--eval.interval", "-1", "0", "eval.interval must be >= 0, got -1"),
    (PRETRAIN + OUT, "--eval.max_iters", "0", "1", "eval.max_iters must be >= 1 (or null"),
    (PRETRAIN + OUT, "--optimizer.lr", "0", "0.0003", "optimizer.lr must be > 0, got 0"),
    (PRETRAIN + OUT, "--optimizer.lr", ".inf", "1", "optimizer.lr must be > 0, got inf"),
    (
        PRETRAIN + OUT,
        "--optimizer.min_lr",
        "-1",
        "0",
        "optimizer.min_lr must be >= 0 and <= optimizer.lr (0.003), got -1",
    ),
    (PRETRAIN + OUT, "--optimizer.min_lr", "0.01", "0.003", "optimizer.min_lr must be >= 0 and <= optimizer.lr"),
    (PRETRAIN + OUT, "--optimizer.weight_decay", "-0.1", "0", "optimizer.weight_decay must be >= 0, got -0.1"),
    (PRETRAIN + OUT, "--optimizer.mechanism_lr", "0", "1e-9", "optimizer.mechanism_lr must be > 0 (or null"),
    (PRETRAIN + OUT, "--optimizer.beta1", "1", "0", "optimizer.beta1 must be in [0, 1), got 1"),
    (PRETRAIN + OUT, "--optimizer.beta2", "-0.5", "0.999", "optimizer.beta2 must be in [0, 1), got -0.5"),
    (PRETRAIN + OUT, "--optimizer.eps", "0", "1e-30", "optimizer.eps must be > 0, got 0"),
    (PRETRAIN + OUT, "--log.sample_tokens", "0", "1", "log.sample_tokens must be >= 1, got 0"),
    (PRETRAIN + OUT, "--seed", "-1", "0", "seed must be in [0, 4294967295], got -1"),
    (PRETRAIN + OUT, "--seed", "4294967296", "4294967295", "seed must be in [0, 4294967295], got 4294967296"),
    (PRETRAIN + OUT, "--devices", "0", "1", "devices must be >= 1, -1 (all), 'auto'"),
    (PRETRAIN + OUT, "--devices", "gpu", "auto", "devices must be >= 1, -1 (all), 'auto' or a list of device"),
    (PRETRAIN + OUT, "--devices", "3", "2", "multiple of micro_batch_size x devices x num_nodes = 2 x 3, got 4"),
    (PRETRAIN + OUT, "--num_nodes", "0", "1", "num_nodes must be >= 1, got 0"),
    (FINETUNE + OUT, "--train.max_steps", "0", "1", "train.max_steps must be >= 1 (or null for no limit), got 0"),
    (FINETUNE + OUT, "--train.micro_batch_size", "3", "16", "train.global_batch_size must be a multiple of"),
    (FINETUNE + OUT, "--optimizer.min_lr", "-1", "0", "optimizer.min_lr must be >= 0 and <= optimizer.lr (0.0001)"),
    (FINETUNE + OUT, "--eval.max_iters", "0", "1", "eval.max_iters must be >= 1 (or null"),
    (FINETUNE + OUT, "--log.sample_tokens", "0", "1", "log.sample_tokens must be >= 1, got 0"),
    (FINETUNE + OUT, "--lora.r", "0", "1", "lora.r must be >= 1, got 0"),
    (FINETUNE + OUT, "--lora.alpha", "0", "0.001", "lora.alpha must be > 0, got 0"),
    (FINETUNE + OUT, "--lora.dropout", "1", "0", "lora.dropout must be in [0, 1), got 1"),
    (FINETUNE + OUT, "--lora.targets", "[]", "[mlp.fc]", "lora.targets must be a non-empty list"),
    (FINETUNE + OUT, "--seed", "-3", "0", "seed must be in [0, 4294967295], got -3"),
    (FINETUNE + OUT, "--devices", "-2", "-1", "devices must be >= 1, -1 (all)"),
    (FINETUNE + OUT, "--num_nodes", "-1", "1", "num_nodes must be >= 1, got -1"),
    (GENERATE, "--max_new_tokens", "-5", "1", "max_new_tokens must be >= 1, got -5"),
    (GENERATE, "--max_new_tokens", "0", "1", "max_new_tokens must be >= 1, got 0"),
    (GENERATE, "--temperature", "-1", "0", "temperature must be >= 0, got -1"),
    (GENERATE, "--top_k", "0", "1", "top_k must be >= 1 (or null for all tokens), got 0"),
    (GENERATE, "--top_p", "0", "1", "top_p must be in (0, 1] (or null for all tokens), got 0"),
    (GENERATE, "--top_p", "1.5", "0.001", "top_p must be in (0, 1] (or null for all tokens), got 1.5"),
    (GENERATE, "--seed", "-1", "4294967295", "seed must be in [0, 4294967295], got -1"),
    (GENERATE, "--rethink_every", "0", "null", "rethink_every must be >= 1 (or null for the attention's option)"),
    (EVALUATE + ["--cache_dir", "{tmp}/cache"], "--micro_batch_size", "0", "1", "micro_batch_size must be >= 1, got 0"),
    (EVALUATE + ["--cache_dir", "{tmp}/cache"], "--max_batches", "0", "1", "max_batches must be >= 1 (or null"),
    (
        EVALUATE + ["--cache_dir", "{tmp}/cache"],
        "--lengths",
        "[64, 0]",
        "[1]",
        "lengths (each of [64, 0]) must be >= 1",
    ),
    (EVALUATE + ["--cache_dir", "{tmp}/cache"], "--lengths", "[]", "[64]", "lengths must be a non-empty list"),
    (VISUALIZE, "--layers", "[0, 2]", "[1]", "layers: layer index(es) [2] out of range: the model has 2 layers (0..1"),
    (VISUALIZE, "--layers", "[-3]", "[-2]", "layers: layer index(es) [-3] out of range"),
    (VISUALIZE, "--layers", "[]", "[0]", "layers: none chosen"),
    (VISUALIZE, "--heads", "[4]", "[3]", "heads: head index(es) [4] out of range: the model has 4 heads (0..3"),
    (ABLATE + OUT[:2], "--parallel", "0", "1", "parallel must be >= 1, got 0"),
    (ABLATE + OUT[:2], "--seeds", "[]", "[0]", "The ablation has no seeds"),
    (ABLATE + OUT[:2], "--seeds", "[1, -1]", "[4294967295]", "seeds (each of [1, -1]) must be in [0, 4294967295]"),
    (ABLATE + OUT[:2], "--seeds", "[2, 2]", "[2, 3]", "seeds must differ from each other"),
    (ABLATE + OUT[:2], "--budget", "{max_steps: 0}", "{max_steps: 1}", "train.max_steps must be >= 1"),
    (ABLATE + OUT[:2], "--overrides", "{optimizer: {min_lr: -1}}", "{seed: 0}", "optimizer.min_lr must be >= 0"),
    (FROM_HF, "--dtype", "int8", "bfloat16", "dtype must be one of float32, bfloat16, float16, float64"),
    (FROM_HF, "--dtype", "float8_e4m3fn", "torch.float16", "got 'float8_e4m3fn'"),
    (TO_HF, "--max_shard_size", "0", "1", "max_shard_size must be at least 1 byte"),
    (TO_HF, "--max_shard_size", "0.5B", "1B", "max_shard_size must be at least 1 byte"),
    (TO_HF, "--max_shard_size", "-1GB", "500MiB", "max_shard_size must be bytes or a size like '5GB'"),
]


def _argv(template: list[str], tmp_path: Path, checkpoint: Path) -> list[str]:
    return [a.replace("{tmp}", str(tmp_path)).replace("{ckpt}", str(checkpoint)) for a in template]


def _case_id(case, value: str) -> str:
    command = " ".join(a for a in case[0][:2] if not a.startswith("-"))
    return f"{command} {case[1]}={value}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c, c[2]) for c in CASES])
def test_bad_value_stops_before_any_work(case, tmp_path, tiny_checkpoint, stubs, capsys):
    command, option, bad, _, message = case
    with pytest.raises(SystemExit) as e:
        main(_argv(command, tmp_path, tiny_checkpoint) + [f"{option}={bad}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err  # one line
    assert err.startswith("litattn: error: ") and message in err, err  # the message names the argument
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


GOOD = [c for c in CASES if c[3] is not None]


@pytest.mark.parametrize("case", GOOD, ids=[_case_id(c, c[3]) for c in GOOD])
def test_boundary_value_is_accepted(case, tmp_path, tiny_checkpoint, stubs):
    command, option, _, good, _ = case
    with pytest.raises(Reached):  # got to the first real work: every check passed
        main(_argv(command, tmp_path, tiny_checkpoint) + [f"{option}={good}"])


def test_smallest_batch_is_accepted(tmp_path, tiny_checkpoint, stubs):
    with pytest.raises(Reached):
        main(
            _argv(PRETRAIN + OUT, tmp_path, tiny_checkpoint)
            + ["--train.global_batch_size", "1", "--train.micro_batch_size", "1"]
        )


def test_defaults_pass_their_own_checks():
    for cls in (TrainArgs, EvalArgs, OptimizerArgs, LogArgs, LoRAArgs):
        cls()
    check_run_args(seed=42, devices="0,1", num_nodes=2, train=TrainArgs())
    check_run_args(seed=0, devices="auto", num_nodes=1, train=TrainArgs(global_batch_size=3, micro_batch_size=3))


RECIPES = sorted((ROOT / "config_hub").glob("*/*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[f"{p.parent.name}/{p.name}" for p in RECIPES])
def test_config_hub_recipes_pass_the_checks(path, tmp_path, stubs):
    entry = {"pretrain": "pretrain", "finetune": "finetune", "ablations": "ablate"}[path.parent.name]
    with pytest.raises(Reached):
        main([entry, "--config", str(path), "--out_dir", str(tmp_path / "out")])


def test_check_range_message_form():
    with pytest.raises(ValueError) as e:
        check_range("x.y", 0, ge=1, null="no limit")
    assert str(e.value) == "x.y must be >= 1 (or null for no limit), got 0"
    with pytest.raises(ValueError) as e:
        check_range("p", float("nan"), gt=0, le=1)
    assert str(e.value) == "p must be in (0, 1], got nan"
    with pytest.raises(ValueError, match="got null"):
        check_range("n", None, ge=1)
    with pytest.raises(ValueError, match="got True"):
        check_range("n", True, ge=0)
    check_range("n", None, ge=1, null="all")


# ---------------------------------------------------------------------------------- generate's context
def test_generate_lowers_max_new_tokens_to_the_room_left_in_the_context(tiny_checkpoint, capsys):
    main(["generate", "--checkpoint_dir", str(tiny_checkpoint), "--prompt", "def ", "--temperature", "0"])  # 200
    out, err = capsys.readouterr()
    n_prompt = len(Tokenizer(tiny_checkpoint).encode("def "))
    assert f"max_new_tokens lowered from 200 to {64 - n_prompt + 1}" in err and "context of 64" in err
    assert out.startswith("def ") and "Generated " in err


def test_generate_with_a_prompt_that_fills_the_context_is_one_line(tiny_checkpoint, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--checkpoint_dir", str(tiny_checkpoint), "--prompt", "word " * 80])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "leave no room in the model's context of 64" in err, err
