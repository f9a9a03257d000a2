import os

import pytest
import torch

from litattn import precision
from litattn.cpu import CpuIsa

# `precision: auto` picks bf16 on a CPU with native bf16 and fp32 elsewhere. The suite runs in fp32 on every CPU
# kind alike (its references and tolerances are fp32's): the commands it starts see PyTorch's AVX2 kernels (so
# auto finds no native bf16; set after torch is imported, so this process keeps its own kernels), and this
# process's auto sees an AVX2 CPU. Tests of auto itself patch the ISA back.
os.environ["ATEN_CPU_CAPABILITY"] = "avx2"


@pytest.fixture(autouse=True, scope="session")
def _auto_precision_is_fp32():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(precision, "detect_isa", lambda: CpuIsa("AVX2", native_bf16=False, capability="AVX2"))
        yield


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def debug_pretrain_args(data_dir, cache_dir, *extra: str, extensions: str = "[.txt]") -> list[str]:
    """`litattn pretrain` arguments for config_hub/pretrain/debug.yaml on a folder of text files."""
    return [
        "pretrain", "--config", "config_hub/pretrain/debug.yaml", "--data", "TextFiles",
        "--data.train_dirs", f"[{data_dir}]", "--data.extensions", extensions, "--accelerator", "cpu",
        "--cache_dir", str(cache_dir), *extra,
    ]  # fmt: skip
