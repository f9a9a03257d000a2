"""litattn/cpu.py: the CPU's ISA, the bf16 warning on CPUs that emulate bf16, and the summary's machine figures."""

import json
import warnings
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_pretrain
from litattn import cpu
from litattn.cli import one_line_warning

AVX2 = {"fma", "avx", "avx2"}
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl"}


def as_cpu(monkeypatch, flags: set[str], capability: str = "AVX512", peaks=(178e9, 1.3e9)) -> None:
    """Pretend to run on a CPU with these /proc/cpuinfo flags and (fp32, bf16) matmul peaks."""
    monkeypatch.setattr(cpu, "cpu_flags", lambda: set(flags))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    rates = {torch.float32: peaks[0], torch.bfloat16: peaks[1]}
    monkeypatch.setattr(cpu, "matmul_peak", lambda device, dtype, seconds=0.3: rates[dtype])


def fabric(precision: str, device: str = "cpu", rank: int = 0):
    strategy = SimpleNamespace(precision=SimpleNamespace(precision=precision))
    return SimpleNamespace(global_rank=rank, device=torch.device(device), strategy=strategy)


@pytest.mark.parametrize(
    "flags, capability, name, native",
    [
        (AVX2, "AVX2", "AVX2", False),
        (AVX512, "AVX512", "AVX-512", False),
        (AVX512 | {"avx512_bf16"}, "AVX512", "AVX-512-BF16", True),
        (AVX512 | {"avx512_bf16", "amx_bf16", "amx_tile"}, "AVX512", "AMX", True),
        (AVX512 | {"avx512_bf16"}, "AVX2", "AVX2", False),  # ATEN_CPU_CAPABILITY=avx2: PyTorch runs AVX2 kernels
        (AVX2, "DEFAULT", "x86-64", False),
        ({"fp", "asimd", "sve", "bf16"}, "SVE256", "SVE-BF16", True),
        ({"fp", "asimd"}, "DEFAULT", "NEON", False),
    ],
)
def test_isa_names_the_best_vector_extension_pytorch_uses(monkeypatch, flags, capability, name, native):
    as_cpu(monkeypatch, flags, capability)
    isa = cpu.detect_isa()
    assert (isa.name, isa.native_bf16, isa.capability) == (name, native, capability)


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_bf16_on_a_cpu_without_native_bf16_warns_with_the_measured_ratio(monkeypatch, precision):
    as_cpu(monkeypatch, AVX2, "AVX2")
    with pytest.warns(UserWarning) as record:
        cpu.warn_if_slow_bf16(fabric(precision))
    (warning,) = record
    message = str(warning.message)
    assert message == (
        f"{precision} on a CPU without native bf16 (AVX2): bf16 matmuls run at 1.3 GFLOP/s vs 178 fp32 "
        "(137x slower); use --precision 32-true"
    )
    line = one_line_warning(message, UserWarning, "", 0)  # as the command line prints it
    assert line.startswith("litattn: warning: ") and line.count("\n") == 1


def test_no_warning_with_native_bf16_in_fp32_on_cuda_or_on_other_ranks(monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        as_cpu(monkeypatch, AVX512 | {"avx512_bf16"})
        cpu.warn_if_slow_bf16(fabric("bf16-true"))
        as_cpu(monkeypatch, AVX2, "AVX2")
        cpu.warn_if_slow_bf16(fabric("32-true"))
        cpu.warn_if_slow_bf16(fabric("bf16-mixed", device="cuda"))
        cpu.warn_if_slow_bf16(fabric("bf16-mixed", rank=1))


def test_emulated_bf16_faster_than_fp32_is_not_called_slower(monkeypatch):
    as_cpu(monkeypatch, AVX512, peaks=(100e9, 150e9))
    message = cpu.bf16_warning("bf16-mixed", "cpu")
    assert "(AVX-512)" in message and "slower" not in message and "other bf16 ops are emulated" in message


def test_matmul_peak_is_measured_once_per_process_and_leaves_the_random_state_alone(monkeypatch):
    monkeypatch.setattr(cpu, "_PEAKS", {})
    state = torch.get_rng_state()
    first = cpu.matmul_peak("cpu", torch.float32, seconds=0.02)
    assert first > 1e8  # any CPU does 0.1 GFLOP/s
    assert cpu.matmul_peak("cpu", torch.float32) == first  # cached: the summary reuses the warning's figures
    assert torch.equal(torch.get_rng_state(), state)  # measuring before training changes no initialisation


def test_pretrain_warns_before_training_and_its_summary_names_the_isa(monkeypatch, tmp_path, capsys):
    """A tiny bf16-true pretrain on a pretend AVX2 CPU: the warning, then summary.json with the ISA and both peaks."""
    as_cpu(monkeypatch, AVX2, "AVX2")
    with pytest.warns(UserWarning, match=r"bf16-true on a CPU without native bf16 \(AVX2\).*137x slower"):
        tiny_pretrain(tmp_path, precision="bf16-true", accelerator="cpu")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["cpu_isa"] == "AVX2" and summary["cpu_native_bf16"] is False
    assert (summary["matmul_peak_fp32"], summary["matmul_peak_bf16"]) == (178e9, 1.3e9)
    assert "CPU AVX2, cpu matmul peaks fp32 178 GFLOP/s, bf16 1.3 GFLOP/s" in capsys.readouterr().out
