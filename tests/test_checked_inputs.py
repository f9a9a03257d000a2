"""Inputs checked where they enter (issue 20: items 9, 10, 13, 14, 16 and the smaller points): each bad value is
one line that names what was expected and what was given; on the command line, exit 2 with nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from litattn import GPT, Config
from litattn import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]


def litattn(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "litattn", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=300)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The user error a command ended with: exit 2, one line on stderr (returned without its prefix)."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("litattn: error: "), result.stderr
    return lines[0].removeprefix("litattn: error: ")


# ---------------------------------------------------------------------------------- item 9: batch metadata
def _model(attention: dict) -> GPT:
    torch.manual_seed(0)
    return GPT(Config.from_name("tiny-llama", block_size=64, vocab_size=256, attention=attention)).eval()


@pytest.mark.parametrize(
    "segment_ids, said",
    [
        (torch.zeros(2, 40, dtype=torch.long), "got int64 of shape (2, 40)"),  # longer: was silently cut
        (torch.zeros(2, 8, dtype=torch.long), "got int64 of shape (2, 8)"),  # a constant row: was plain causal
        (torch.zeros(16, dtype=torch.long), "got int64 of shape (16,)"),
        (torch.zeros(2, 16, 1, dtype=torch.long), "got int64 of shape (2, 16, 1)"),
        (torch.zeros(2, 16), "got float32 of shape (2, 16)"),
        (torch.zeros(2, 16, dtype=torch.bool), "got bool of shape (2, 16)"),
        ([[0, 1], [0]], "got list [[0, 1], [0]]"),
    ],
)
def test_disrupt_segment_ids_of_the_wrong_shape_or_type_are_one_line_errors(segment_ids, said):
    model, idx = _model({"name": "disrupt_set"}), torch.randint(3, 256, (2, 16))
    with pytest.raises(ValueError) as e:
        model(idx, segment_ids=segment_ids)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("disrupt_set: segment_ids must be integers of shape (2, 16), one per token")
    assert message.endswith(said)


def test_disrupt_segment_ids_as_a_list_or_array_work_like_the_tensor():
    model, idx = _model({"name": "disrupt_set"}), torch.randint(3, 256, (2, 16))
    segments = torch.tensor([[0] * 8 + [1] * 8, [0] * 4 + [1] * 12])
    with torch.no_grad():
        want = model(idx, segment_ids=segments)
        torch.testing.assert_close(model(idx, segment_ids=segments.tolist()), want)
        torch.testing.assert_close(model(idx, segment_ids=segments.numpy().astype(np.int32)), want)
        assert not torch.allclose(model(idx), want)  # the segments matter: they are not ignored


def test_hybrid_prefix_len_uses_the_same_check():
    model, idx = _model({"name": "hybrid", "iterations": 1}), torch.randint(3, 256, (2, 16))
    for bad, said in (([3], "got int64 of shape (1,)"), ("ab", "got str 'ab'"), (torch.ones(2), "got float32")):
        with pytest.raises(ValueError, match=r"^hybrid: prefix_len must be integers of shape \(2,\), one per row") as e:
            model(idx, prefix_len=bad)
        assert said in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------- item 10: standalone Self-Extend
def _heads(H=4, Hkv=2, T=12, D=8, B=1):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, h, T, D, generator=g) for h in (H, Hkv, Hkv)]


@pytest.mark.parametrize(
    "group_size, window, said",
    [
        (-2, 4, "group_size must be >= 1, got -2"),
        (0, 4, "group_size must be >= 1, got 0"),  # was a ZeroDivisionError
        (2.5, 4, "'group_size' expects int, got 2.5"),
        (2, 0, "window must be >= 1, got 0"),
        (2, -5, "window must be >= 1, got -5"),
        (2, True, "'window' expects int, got True"),
    ],
)
def test_self_extend_api_refuses_bad_group_size_and_window(group_size, window, said):
    from litattn.attention.self_extend import SelfExtendAttention, self_extend_attention

    for call, owner in (
        (lambda: self_extend_attention(*_heads(), group_size, window), "self_extend_attention"),
        (lambda: SelfExtendAttention(32, 4, group_size, window), "SelfExtendAttention"),
    ):
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value).startswith(f"{owner}: ") and said in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "tensors, said",
    [
        (_heads(H=4, Hkv=3), "the 3 key/value heads must divide the 4 query heads"),
        (_heads(D=7), "the head size must be even"),
        (_heads()[:2] + [torch.randn(1, 2, 10, 8)], "k, v (B, H_kv, T, D) alike"),
        ([torch.randn(1, 4, 12, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)], "must agree in batch, length"),
        ([torch.randn(4, 12, 8)] + _heads()[1:], "q must be (B, H, T, D)"),
    ],
)
def test_self_extend_function_refuses_tensors_that_do_not_fit(tensors, said):
    from litattn.attention.self_extend import self_extend_attention

    with pytest.raises(ValueError, match="^self_extend_attention: ") as e:
        self_extend_attention(*tensors, 2, 4)
    assert said in str(e.value) and "\n" not in str(e.value)


def test_self_extend_module_refuses_odd_heads_wrong_pos_and_shapes():
    from litattn.attention.self_extend import SelfExtendAttention

    with pytest.raises(ValueError, match=r"dim=28 must be n_head=4 x an even head size"):
        SelfExtendAttention(28, 4, 2, 4)  # head size 7
    with pytest.raises(ValueError, match=r"dim=30 must be n_head=4 x"):
        SelfExtendAttention(30, 4, 2, 4)
    module = SelfExtendAttention(32, 4, 2, 4)
    x = torch.randn(2, 12, 32)
    cases = [
        ((x, x, x, torch.arange(10)), r"pos must be integers of shape \(12,\), one position per token, got int64"),
        ((x, x, x, torch.arange(12.0)), r"pos must be integers of shape \(12,\).*got float32"),
        ((x, x, x, torch.arange(12).flip(0)), r"pos must be non-decreasing"),
        ((x, x, torch.randn(2, 11, 32), torch.arange(12)), r"q, k and v must be \(B, T, 32\) alike"),
        ((torch.randn(2, 12, 16),) * 3 + (torch.arange(12),), r"must be \(B, T, 32\) alike"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match) as e:
            module(*args)
        assert "\n" not in str(e.value)
    torch.testing.assert_close(module(x, x, x, list(range(12))), module(x, x, x, torch.arange(12)))


# ---------------------------------------------------------------------------------- item 14: Union dumps
def test_a_data_module_option_error_is_its_reason_in_one_line(tmp_path):
    config = REPO / "config_hub/pretrain/disrupt-set-debug.yaml"
    out = tmp_path / "out"
    args = ("pretrain", "--config", str(config), "--out_dir", str(out), "--cache_dir", str(tmp_path / "cache"))
    result = litattn(*args, "--data.set.pool", "20", "--accelerator", "cpu", cwd=tmp_path)
    assert one_line_error(result) == "set.pool must be in [1, 8], got 20"
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_reason_unwraps_nested_union_dumps_and_keeps_other_messages():
    from litattn.cli import reason

    def union(cause: Exception, subtypes: str) -> ValueError:
        try:
            raise ValueError(
                f"Does not validate against any of the Union subtypes\nSubtypes: {subtypes}\nErrors:\n"
                f"  - {cause}\n  - Expected a <class 'NoneType'>\nGiven value: Namespace(...)"
            ) from cause
        except ValueError as e:
            return e

    inner = union(ValueError("set.pool must be in [1, 8], got 20"), "[SETPlacement, NoneType]")
    assert reason(union(inner, "[DataModule, NoneType]")) == "set.pool must be in [1, 8], got 20"
    multi = ValueError("Problem with given class_path 'x':\n  the following arguments are required: train_dirs")
    assert reason(union(multi, "[DataModule]")) == (
        "Problem with given class_path 'x': the following arguments are required: train_dirs"
    )
    assert reason(ValueError("plain\nmessage")) == "plain\nmessage"


# ---------------------------------------------------------------------------------- item 16: --print_config checks
@pytest.mark.parametrize(
    "args, said",
    [
        (("pretrain", "--config", "config_hub/pretrain/debug.yaml", "--train.max_steps", "0"), "train.max_steps must"),
        (("pretrain", "--config", "config_hub/pretrain/debug.yaml", "--train.max_seq_length", "100000"), "exceeds"),
        (("generate", "--checkpoint_dir", "nowhere", "--max_new_tokens", "0"), "max_new_tokens must be >= 1, got 0"),
        (("evaluate", "perplexity", "--checkpoint_dir", "nowhere", "--lengths", "[0]"), "must be >= 1, got 0"),
        (("model", "list", "--attention", "{name: self_extend, group_size: 0}"), "group_size must be >= 1, got 0"),
    ],
)
def test_print_config_refuses_what_the_command_would_refuse(args, said):
    from litattn.cli import main

    with pytest.raises(SystemExit) as e:
        main([*args, "--print_config"])
    assert e.value.code == 2


def test_print_config_is_checked_on_the_command_line_and_still_prints_good_configs_and_templates(tmp_path):
    config = str(REPO / "config_hub/pretrain/debug.yaml")
    bad = litattn("pretrain", "--config", config, "--optimizer.min_lr", "1", "--print_config", cwd=tmp_path)
    assert one_line_error(bad) == "optimizer.min_lr must be >= 0 and <= optimizer.lr (0.003), got 1"
    assert bad.stdout == ""
    good = litattn("pretrain", "--config", config, "--train.max_steps", "3", "--print_config", cwd=tmp_path)
    assert good.returncode == 0 and "max_steps: 3" in good.stdout and good.stderr == ""
    template = litattn("generate", "--print_config", cwd=tmp_path)  # checkpoint_dir not given yet: a template
    assert template.returncode == 0 and "checkpoint_dir: null" in template.stdout
    assert list(tmp_path.iterdir()) == []  # nothing written, no out_dir


def test_every_command_prints_its_config_without_running(capsys):
    """Each subcommand calls litattn.args.start_work after its checks: with --print_config it prints and exits 0
    (a command that ran instead would fail on the missing checkpoint; one that never calls start_work is an
    error of the CLI)."""
    import inspect

    from litattn.cli import commands, main

    def leaves(tree, path=()):
        for name, node in tree.items():
            yield from leaves(node, (*path, name)) if isinstance(node, dict) else [((*path, name), node)]

    given = {"checkpoint_dir": "nowhere", "out_dir": "nowhere", "out": "nowhere", "variants": "{a: {}}",
             "base": str(REPO / "config_hub/pretrain/debug.yaml"), "input": "nowhere", "output": "nowhere",
             "max_length": "8", "importance": "nowhere", "tokenizer_dir": "nowhere", "prompt": "hi"}  # fmt: skip
    for path, function in leaves(commands()):
        params = inspect.signature(function).parameters
        extra = [x for k, v in given.items() if k in params for x in (f"--{k}", v)]
        with pytest.raises(SystemExit) as e:
            main([*path, *extra, "--print_config"])
        out = capsys.readouterr()
        assert e.value.code in (0, None) and out.err == "", (path, out.err)


# ---------------------------------------------------------------------------------- item 13: evaluate, no length ran
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """An untrained tiny-llama with block_size 64 and a small BPE trained here."""
    import sysconfig

    from litattn.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("checked")
    tokenizer = Tokenizer.train([Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"], 320, root / "tok")
    config = Config.from_name("tiny-llama", vocab_size=320, block_size=64)
    torch.manual_seed(0)
    return ckpt.save_checkpoint(root / "ckpt", GPT(config).state_dict(), config, tokenizer)


@pytest.mark.parametrize("command", [("evaluate", "perplexity"), ("evaluate", "passkey")])
def test_evaluate_with_no_length_that_can_run_exits_2_and_writes_nothing(command, tiny_checkpoint, tmp_path):
    result = litattn(*command, "--checkpoint_dir", str(tiny_checkpoint), "--lengths", "[1000,2000]", cwd=tmp_path)
    message = one_line_error(result)
    assert message.startswith("no requested length could run, nothing written: length 1000: 1000 tokens exceed")
    assert "--context 1000" in message and "(and 1 more length(s))" in message
    assert not (tiny_checkpoint / "eval").exists() and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------- smaller points
def test_hybrid_grad_iterations_beyond_iterations_is_refused():
    with pytest.raises(ValueError, match=r"^hybrid: grad_iterations must be <= iterations \(2\).*got 3$"):
        Config.from_name("tiny-llama", attention={"name": "hybrid", "iterations": 2, "grad_iterations": 3})
    Config.from_name("tiny-llama", attention={"name": "hybrid", "iterations": 2, "grad_iterations": 2})


def test_a_prompt_too_long_names_the_ways_past_it(tiny_checkpoint, tmp_path):
    result = litattn("generate", "--checkpoint_dir", str(tiny_checkpoint), "--prompt", "word " * 200, cwd=tmp_path)
    message = one_line_error(result)
    assert "leave no room" in message and all(o in message for o in ("--truncate", "--context", "--stream_window"))


def test_hybrid_instruction_with_stream_window_refuses_before_printing_the_prompt(tiny_checkpoint, tmp_path):
    args = ("generate", "--checkpoint_dir", str(tiny_checkpoint), "--attention", "{name: hybrid, iterations: 1}")
    result = litattn(*args, "--instruction", "Say hi", "--stream_window", "16", cwd=tmp_path)
    assert "cannot be streamed" in one_line_error(result)
    assert result.stdout == ""  # the prompt was printed before the refusal


def test_the_docs_token_snippet_runs_as_written(tmp_path, monkeypatch):
    readme = (REPO / "docs" / "mechanisms.md").read_text()
    blocks = [b.split("```", 1)[0] for b in readme.split("```python")[1:]]
    (snippet,) = [b for b in blocks if "encode_sample(tokenizer" in b]
    code = "\n".join(line.removeprefix("  ") for line in snippet.splitlines())
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "docs/mechanisms.md", "exec"), scope)  # defines every name it uses
    assert scope["decode_sample"](scope["tokenizer"], scope["ids"]) == "<|disrupt|>This is a sentence.<|set_0|>"


def test_stream_window_is_documented_against_streamingllms_recent_size():
    from litattn.generate import main

    for text in ((REPO / "docs" / "mechanisms.md").read_text(), main.__doc__):
        assert "recent_size" in " ".join(text.split()) and "R + 1" in text


def test_the_passkey_heatmap_title_fits_in_the_figure(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from litattn.passkey import heatmap

    drawn = []
    real_savefig = Figure.savefig

    def savefig(fig, *args, **kwargs):
        real_savefig(fig, *args, **kwargs)
        drawn.append(fig)

    monkeypatch.setattr(Figure, "savefig", savefig)
    cell = {"correct": 1, "trials": 2, "accuracy": 0.5}
    spec = {"name": "ssa", "base": {"name": "self_extend", "group_size": 8, "window": 128}, "beta_init": 1.5}
    result = {"checkpoint_dir": str(tmp_path / "a-rather-long-checkpoint-directory-name"), "attention": spec,
              "depths": [0.0, 0.5], "results": [{"length": 256, "cells": [cell, cell]}]}  # fmt: skip
    heatmap(result, tmp_path / "passkey.png")
    (fig,) = drawn
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    title = fig.axes[0].title.get_window_extent(renderer)
    box = fig.bbox
    assert box.x0 <= title.x0 and title.x1 <= box.x1 and title.y1 <= box.y1, (title, box)
