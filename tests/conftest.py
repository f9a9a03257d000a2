import os
import tempfile

# `precision: auto` picks bf16 on a CPU with native bf16 and fp32 elsewhere. The suite runs in fp32 on every CPU
# kind alike (its references and tolerances are fp32's): it and the commands it starts run PyTorch's AVX2 kernels
# (set before torch is imported: torch.compile's generated code must agree with them), so auto finds no native
# bf16 anywhere; the fixture below makes sure of it in this process. Tests of auto itself patch the ISA back.
# torch.compile's kernel cache does not tell AVX2 builds from others: the suite keeps its own.
os.environ["ATEN_CPU_CAPABILITY"] = "avx2"
os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), f"inductor-litattn-tests-{os.getuid()}")

import shutil  # noqa: E402
import sysconfig  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from litattn import precision  # noqa: E402
from litattn.args import EvalArgs, LogArgs, TrainArgs  # noqa: E402
from litattn.cpu import CpuIsa  # noqa: E402
from litattn.data import TextFiles  # noqa: E402
from litattn.pretrain.pretrain import setup  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _auto_precision_is_fp32():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(precision, "detect_isa", lambda: CpuIsa("AVX2", native_bf16=False, capability="AVX2"))
        yield


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def tiny_pretrain(tmp_path, **overrides) -> None:
    """Two steps of a one-layer model on three standard-library modules (out_dir tmp_path/out), in process:
    for tests of what a run prints and writes, not of what it learns."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("textwrap.py", "shlex.py", "string.py"):
        shutil.copy(os.path.join(sysconfig.get_paths()["stdlib"], name), corpus / name)
    setup(
        model_name="tiny-llama",
        model={"block_size": 32, "vocab_size": 512, "n_layer": 1},
        out_dir=tmp_path / "out",
        data=TextFiles(train_dirs=[corpus], extensions=[".py"]),
        train=TrainArgs(global_batch_size=2, micro_batch_size=2, max_seq_length=32, max_steps=2),
        eval=EvalArgs(interval=0, final_validation=False),
        log=LogArgs(sample_prompt=None, progress_bar=False),
        cache_dir=tmp_path / "cache",
        **overrides,
    )


def debug_pretrain_args(data_dir, cache_dir, *extra: str, extensions: str = "[.txt]") -> list[str]:
    """`litattn pretrain` arguments for config_hub/pretrain/debug.yaml on a folder of text files."""
    return [
        "pretrain", "--config", "config_hub/pretrain/debug.yaml", "--data", "TextFiles",
        "--data.train_dirs", f"[{data_dir}]", "--data.extensions", extensions, "--accelerator", "cpu",
        "--cache_dir", str(cache_dir), *extra,
    ]  # fmt: skip
