"""scripts/gpu_check.py, the first command for a GPU, runs here in its dry-run mode (toy sizes on the CPU), so it
cannot rot before a GPU is at hand: every table is printed, flex agrees with SDPA in float32 where a mechanism
has a flex path, and every mechanism's loss falls."""

import importlib.util
import re
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows(text: str, section: str) -> list[list[str]]:
    part = text.split(section)[1].split("## ")[0]
    return [[c.strip() for c in line.strip("|").split("|")] for line in part.splitlines() if line.startswith("| ")][1:]


def test_the_dry_run_prints_every_table_and_the_paths_agree(capsys):
    load().main(["--dry_run"])
    out = capsys.readouterr().out
    kernels = rows(out, "## 1.")
    names = {"causal", "sliding window", "ssa", "self_extend", "disrupt_set", "hybrid"}
    assert {r[0] for r in kernels} == names
    for name, dtype, logits, *_ in kernels:
        if dtype == "float32":
            assert float(logits) < 1e-4, name
        elif dtype == "-":
            assert logits == "no flex path (sdpa only)" and name == "self_extend"
    training = rows(out, "## 2.")
    assert {r[0] for r in training} == names and all(r[-1] == "True" for r in training)
    (throughput,) = rows(out, "## 3.")
    assert throughput[0] == "litattn" and re.fullmatch(r"[\d,]+", throughput[4]) and throughput[5].endswith("%")


def test_too_few_steps_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit):
        load().main(["--dry_run", "--steps", "1"])
    assert "--steps must be >= 2" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")
def test_without_a_gpu_it_says_to_use_the_dry_run():
    with pytest.raises(SystemExit, match="no CUDA device here; run with --dry_run"):
        load().main([])
