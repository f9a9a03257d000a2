"""`litattn finetune`: what each method trains, LoRA merging and resume, and the loss over padded examples."""

import csv
import json
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from litattn import checkpoint as ckpt
from litattn.args import EvalArgs, LogArgs, LoRAArgs, OptimizerArgs, TrainArgs
from litattn.cli import main
from litattn.config import resolve_model_config
from litattn.data import AlpacaJSON
from litattn.data.instructions import InstructionDataset
from litattn.finetune.finetune import setup
from litattn.finetune.methods import make_plan
from litattn.lora import add_lora, merged_state_dict
from litattn.model import GPT
from litattn.tokenizer import Tokenizer
from litattn.training import collate

SSA = {"attention": {"name": "ssa", "identity_init": True}}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A random tiny Llama-style checkpoint with a BPE tokenizer trained on a few standard-library modules."""
    root = tmp_path_factory.mktemp("base")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    tokenizer = Tokenizer.train([stdlib / n for n in ("textwrap.py", "shlex.py", "string.py")], 512, root / "tok")
    config = resolve_model_config("tiny-llama", {"block_size": 128, "vocab_size": 512})
    torch.manual_seed(1)
    return ckpt.save_checkpoint(root / "ckpt", GPT(config).state_dict(), config, tokenizer)


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "sums.jsonl"
    with open(path, "w") as f:
        for a in range(12):
            for b in range(4):
                f.write(json.dumps({"instruction": f"Add {a} and {b}.", "output": f"{a} + {b} = {a + b}"}) + "\n")
    return path


def finetune(tmp_path, base, examples, **overrides) -> Path:
    kwargs = dict(
        checkpoint_dir=base,
        method="mechanism",
        model=SSA,
        out_dir=tmp_path / "out",
        data=AlpacaJSON(train_file=examples, val_fraction=0.2),
        train=TrainArgs(
            global_batch_size=4,
            micro_batch_size=2,
            max_seq_length=128,
            max_steps=6,
            lr_warmup_steps=1,
            save_interval=3,
            log_interval=1,
        ),  # fmt: skip
        eval=EvalArgs(interval=3, max_iters=None, initial_validation=True),
        optimizer=OptimizerArgs(lr=2e-2, min_lr=2e-3, weight_decay=0.1),
        log=LogArgs(sample_prompt=None, sample_tokens=4, sample_at_validation=True, progress_bar=False),
        accelerator="cpu",
        cache_dir=tmp_path.parent / "cache",
    )
    kwargs.update(overrides)
    setup(**kwargs)
    return kwargs["out_dir"]


def metrics(out_dir: Path, key: str) -> dict[int, float]:
    (path,) = (out_dir / "logs" / "csv").glob("version_*/metrics.csv")
    with open(path) as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_state_dict(directory / ckpt.MODEL_FILE)


def test_method_ssa_trains_only_the_ssa_parameters(tmp_path, base, examples):
    out = finetune(tmp_path, base, examples)
    before, after = weights(base), weights(out / "final")
    new = sorted(set(after) - set(before))
    assert new and all(".attn.mechanism." in k for k in new)
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed"
    fresh = GPT(ckpt.load_config(base, **SSA)).state_dict()  # the identity init the run started from
    assert any(not torch.equal(after[k], fresh[k]) for k in new)
    val = metrics(out, "val_loss")
    assert sorted(val) == [0, 3, 6]


def test_method_ssa_is_an_alias_of_mechanism_and_says_so(base):
    """`mechanism` trains whichever mechanism's own parameters (hybrid's too); `ssa` names the same plan."""
    for attention, owned in (
        ({"name": "ssa"}, ".attn.mechanism."),
        ({"name": "hybrid", "reweighting": True}, ".attn.mechanism."),
    ):
        config = ckpt.load_config(base, attention=attention)
        with pytest.warns(UserWarning, match=rf"method=ssa is an alias of method=mechanism.*{attention['name']!r}"):
            alias = make_plan("ssa", config, base, LoRAArgs())
        trained = {}
        for plan in (make_plan("mechanism", config, base, LoRAArgs()), alias):
            model = GPT(config)
            plan.prepare(model)
            trained[type(plan)] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        (names,) = set(map(tuple, trained.values()))  # one plan class, the same trained parameters
        assert names and all(owned in n for n in names), names


def test_identity_init_ssa_starts_at_the_checkpoints_own_loss(tmp_path, base, examples):
    ssa = finetune(
        tmp_path / "ssa", base, examples, train=TrainArgs(global_batch_size=4, micro_batch_size=2, max_steps=1)
    )
    causal = finetune(
        tmp_path / "causal",
        base,
        examples,
        method="full",
        model=None,
        train=TrainArgs(global_batch_size=4, micro_batch_size=2, max_steps=1),
    )
    assert metrics(ssa, "val_loss")[0] == pytest.approx(metrics(causal, "val_loss")[0], abs=1e-6)


def test_method_full_lowers_the_validation_loss(tmp_path, base, examples):
    out = finetune(
        tmp_path,
        base,
        examples,
        method="full",
        model=None,
        train=TrainArgs(global_batch_size=4, micro_batch_size=4, max_steps=12, lr_warmup_steps=1, save_interval=None),
        eval=EvalArgs(interval=12, max_iters=None, initial_validation=True),
        optimizer=OptimizerArgs(lr=3e-3, min_lr=3e-4),
    )
    val = metrics(out, "val_loss")
    assert val[12] < val[0] - 0.5
    assert metrics(out, "loss_tokens")[12] < metrics(out, "tokens")[12]  # padding and prompts carry no loss


def test_method_lora_saves_merged_weights_equal_to_the_adapted_model(tmp_path, base, examples):
    lora = LoRAArgs(r=4, alpha=8, targets=["attn.qkv", "mlp.fc_1"])
    out = finetune(tmp_path, base, examples, method="lora", model=None, lora=lora)
    before, merged = weights(base), weights(out / "final")
    assert set(merged) == set(before)  # a plain checkpoint: `generate` and `evaluate` read it as is
    changed = {k for k in before if not torch.equal(before[k], merged[k])}
    assert changed and all(k.endswith(("attn.qkv.weight", "mlp.fc_1.weight")) for k in changed)

    adapted = GPT(ckpt.load_config(base))  # the base model with the trained adapters, unmerged
    ckpt.load_weights(adapted, base)
    add_lora(adapted, lora)
    adapted.load_state_dict(ckpt.load_training_state(out / "final")["lora"], strict=False)
    plain, _, _ = ckpt.load(out / "final")
    idx = torch.randint(0, 512, (2, 40))
    torch.testing.assert_close(plain(idx), adapted(idx), atol=1e-5, rtol=1e-5)


def test_lora_resume_reproduces_the_uninterrupted_run(tmp_path, base, examples):
    straight = finetune(tmp_path / "a", base, examples, method="lora", model=SSA)
    resumed = finetune(tmp_path / "b", base, examples, method="lora", model=SSA, resume=straight / "step-00000003")
    a, b = metrics(straight, "train_loss"), metrics(resumed, "train_loss")
    assert sorted(b) == [4, 5, 6]
    for step in (4, 5, 6):
        assert b[step] == pytest.approx(a[step], abs=1e-6)
    for key, value in weights(straight / "final").items():
        torch.testing.assert_close(weights(resumed / "final")[key], value, atol=1e-6, rtol=0)


def test_lora_merge_equals_the_hooked_forward():
    config = resolve_model_config("tiny-gpt2", {"n_layer": 2})
    model = GPT(config)
    plain = GPT(config)
    plain.load_state_dict(model.state_dict())  # the model before adapters
    add_lora(model, LoRAArgs(r=2, alpha=4, targets=["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"]))
    idx = torch.randint(0, config.vocab_size, (2, 16))
    torch.testing.assert_close(model(idx), plain(idx))  # B = 0: adding adapters changes nothing
    for name, p in model.named_parameters():
        if name.endswith("lora_b"):  # make the update real
            torch.nn.init.normal_(p, std=0.1)
    assert not torch.allclose(model(idx), plain(idx), atol=1e-3)
    layer, x = model.transformer.h[0].attn.qkv, torch.randn(3, config.n_embd)  # the formula, written out
    expected = F.linear(x, layer.weight, layer.bias) + (4 / 2) * x @ layer.lora_a.T @ layer.lora_b.T
    torch.testing.assert_close(layer(x), expected)
    merged = GPT(config)
    merged.load_state_dict(merged_state_dict(model))
    torch.testing.assert_close(merged(idx), model(idx), atol=1e-5, rtol=1e-5)


def test_lora_rejects_unknown_targets_and_tied_heads():
    model = GPT(resolve_model_config("tiny-gpt2", {"n_layer": 1}))
    with pytest.raises(ValueError, match="match no linear layer"):
        add_lora(model, LoRAArgs(targets=["attn.query"]))
    with pytest.raises(ValueError, match="tied"):
        add_lora(model, LoRAArgs(targets=["lm_head"]))


def test_validation_loss_is_the_mean_over_target_tokens():
    """Two examples with 2 and 6 targets: the loss is the mean of 8 token losses, not of 2 example means
    (nor of 16 positions, padding included)."""
    from lightning_fabric import Fabric

    from litattn.validation import validation_loss

    config = resolve_model_config("tiny-llama", {"block_size": 16, "vocab_size": 64})
    model = GPT(config)
    data = InstructionDataset([([5, 6, 7], [8, 2]), ([5], [9, 10, 11, 12, 13, 2])], seq_len=12, pad_id=0)
    batch = collate(data, torch.arange(2))
    logits = model(batch["input_ids"])
    expected = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    assert int((batch["labels"] != -100).sum()) == 2 + 6
    per_example = F.cross_entropy(logits.transpose(1, 2), batch["labels"], ignore_index=-100, reduction="none")
    assert abs(per_example.sum(1).div(torch.tensor([2, 6])).mean() - expected) > 1e-3  # the two differ here
    fabric = Fabric(accelerator="cpu", devices=1)
    assert validation_loss(fabric, model, data, micro_batch_size=1, max_iters=None) == pytest.approx(
        expected.item(), abs=1e-6
    )


def test_limited_validation_reads_windows_spread_over_the_whole_split():
    from lightning_fabric import Fabric

    from litattn.validation import validation_loss

    class Recorded(torch.utils.data.Dataset):
        def __init__(self):
            self.read = []

        def __len__(self):
            return 100

        def __getitem__(self, i):
            self.read.append(i)
            ids = torch.arange(8) + i % 50
            return {"input_ids": ids, "labels": ids + 1}

    data = Recorded()
    model = GPT(resolve_model_config("tiny-llama", {"block_size": 8, "vocab_size": 64}))
    validation_loss(Fabric(accelerator="cpu", devices=1), model, data, micro_batch_size=2, max_iters=5)
    assert data.read == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99]


def test_collate_trims_trailing_padding_without_changing_the_loss():
    config = resolve_model_config("tiny-llama", {"block_size": 64, "vocab_size": 64})
    model = GPT(config)
    data = InstructionDataset([([5, 6, 7], [8, 2]), ([5, 9], [10, 11, 2])], seq_len=64, pad_id=0)
    items = [data[0], data[1]]
    full = {k: torch.stack([i[k] for i in items]) for k in items[0]}
    trimmed = collate(data, torch.arange(2))
    assert trimmed["input_ids"].shape == (2, 8)
    torch.testing.assert_close(
        model.loss(trimmed["input_ids"], trimmed["labels"]), model.loss(full["input_ids"], full["labels"])
    )


def test_finetune_cli_errors_are_one_line(tmp_path, base, capsys):
    with pytest.raises(SystemExit) as e:
        main(["finetune", "--checkpoint_dir", str(tmp_path / "missing"), "--accelerator", "cpu"])
    assert e.value.code == 2 and "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["finetune", "--checkpoint_dir", str(base), "--method", "mechanism", "--accelerator", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--model.attention.name ssa" in err and len(err.strip().splitlines()) == 1
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(base, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(SystemExit) as e:
        main(["finetune", "--checkpoint_dir", str(no_tokenizer), "--accelerator", "cpu"])
    assert e.value.code == 2 and "no tokenizer" in capsys.readouterr().err


def test_a_converted_hugging_face_model_finetunes_with_ssa(tmp_path, base, examples):
    """The issue's use end to end: a Hugging Face GPT-NeoX checkpoint -> litattn -> SSA finetuning."""
    transformers = pytest.importorskip("transformers")
    from litattn.convert import from_hf

    hf = tmp_path / "hf"
    config = transformers.GPTNeoXConfig(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=128, rotary_pct=0.25,
    )  # fmt: skip
    transformers.GPTNeoXForCausalLM(config).save_pretrained(hf)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (base / name).is_file():
            shutil.copy(base / name, hf / name)
    converted = from_hf(hf, tmp_path / "lit")
    out = finetune(tmp_path, converted, examples)
    before, after = weights(converted), weights(out / "final")
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert sorted(metrics(out, "val_loss")) == [0, 3, 6]


def test_generate_instruction_uses_the_finetuning_prompt_template(base):
    from litattn.data.instructions import format_prompt
    from litattn.generate import main as generate

    question = "Add 3 and 4."
    asked = generate(base, instruction=question, max_new_tokens=8, seed=3)
    assert asked == generate(base, prompt=format_prompt(question), max_new_tokens=8, seed=3)
    assert asked != generate(base, prompt=question, max_new_tokens=8, seed=3)


def test_flops_per_token_count_no_weight_gradients_for_frozen_weights():
    from litattn.training import flops_per_token

    config = resolve_model_config("tiny-gpt2", {"n_layer": 2})
    model = GPT(config)
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    attention = 12 * config.n_layer * config.n_embd * 64
    assert flops_per_token(model, 64) == 6 * n + attention
    model.requires_grad_(False)
    assert flops_per_token(model, 64) == 4 * n + attention


def test_lora_on_two_ddp_processes_matches_one_process(tmp_path, base, examples):
    """Frozen weights, adapters and SSA parameters under DDP (gloo): the same losses and merged weights."""
    import os
    import subprocess
    import sys

    def run(out: Path, devices: int):
        args = [
            "finetune", "--checkpoint_dir", str(base), "--method", "lora", "--model.attention.name", "ssa",
            "--model.attention.identity_init", "true", "--data", "AlpacaJSON", "--data.train_file", str(examples),
            "--data.val_fraction", "0.2", "--train.global_batch_size", "4", "--train.micro_batch_size", "2",
            "--train.max_steps", "4", "--train.log_interval", "1", "--train.save_interval", "null",
            "--eval.interval", "0", "--optimizer.lr", "0.02", "--log.progress_bar", "false", "--accelerator", "cpu",
            "--devices", str(devices), "--strategy", "ddp" if devices > 1 else "auto", "--out_dir", str(out),
            "--cache_dir", str(tmp_path / "cache"),
        ]  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "litattn", *args], capture_output=True, text=True, timeout=300,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        return out

    one, two = run(tmp_path / "one", 1), run(tmp_path / "two", 2)
    a, b = metrics(one, "train_loss"), metrics(two, "train_loss")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-4)
    assert metrics(two, "loss_tokens")[4] == metrics(one, "loss_tokens")[4]
    for key, value in weights(one / "final").items():
        torch.testing.assert_close(weights(two / "final")[key], value, atol=1e-5, rtol=0)
