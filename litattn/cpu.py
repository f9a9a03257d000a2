"""What this machine computes fast: the CPU's vector ISA, whether it has native bf16, and measured matmul peaks.

bf16 pays on a CPU only with native bf16 instructions (AVX-512-BF16, AMX). Elsewhere PyTorch emulates it, and
a bf16 run can be tens of times slower than fp32, so the training loop warns before the first step
(`warn_if_slow_bf16`) and the run's summary names the ISA and both matmul peaks. The peaks are measured, not
looked up: a short timed square matmul per dtype, once per process (`matmul_peak`).

    litattn: warning: bf16-true on a CPU without native bf16 (AVX2): bf16 matmuls run at 2.4 GFLOP/s vs 98 fp32
    (41x slower); use --precision 32-true
"""

from __future__ import annotations

import platform
import time
import warnings
from dataclasses import dataclass

import torch

# /proc/cpuinfo flag -> ISA name, best first; the first present one names the CPU
_X86_ISAS = [("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512-BF16"), ("avx512f", "AVX-512"), ("avx2", "AVX2")]
_NATIVE_BF16 = {"AMX", "AVX-512-BF16", "SVE-BF16", "NEON-BF16"}


@dataclass(frozen=True)
class CpuIsa:
    name: str
    """One word or phrase: AMX, AVX-512-BF16, AVX-512, AVX2, SVE, NEON (+ -BF16), or the machine's name."""
    native_bf16: bool
    """bf16 dot products in hardware (AVX-512-BF16, AMX, ARM BF16): where bf16 can beat fp32."""
    capability: str
    """torch.backends.cpu.get_cpu_capability(): the kernels PyTorch dispatches to."""


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 `flags`, ARM `Features`); empty where unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def detect_isa() -> CpuIsa:
    """The CPU's best vector ISA as PyTorch can use it, and whether it has native bf16."""
    capability = torch.backends.cpu.get_cpu_capability()
    flags = cpu_flags()
    name = next((isa for flag, isa in _X86_ISAS if flag in flags), "")
    if not name and flags & {"asimd", "sve"}:  # ARM
        name = ("SVE" if "sve" in flags else "NEON") + ("-BF16" if "bf16" in flags else "")
    # PyTorch may run lesser kernels than the flags allow (ATEN_CPU_CAPABILITY lowers them): name what it runs
    if capability == "AVX2" and name in ("AMX", "AVX-512-BF16", "AVX-512"):
        name = "AVX2"
    elif capability == "DEFAULT" and name in ("AMX", "AVX-512-BF16", "AVX-512", "AVX2"):
        name = "x86-64"
    if not name:
        name = capability if capability != "DEFAULT" else platform.machine() or "unknown"
    return CpuIsa(name=name, native_bf16=name in _NATIVE_BF16, capability=capability)


_PEAKS: dict[tuple, float] = {}


def matmul_peak(device: torch.device | str, dtype: torch.dtype, seconds: float = 0.3) -> float:
    """Achievable matmul FLOP/s on this device and dtype (the denominator of MFU), measured once per process.

    A square matmul timed for `seconds`; its size doubles from 256 up to 2048 while one matmul stays well inside
    the budget, so an emulated dtype (bf16 without native bf16, ~100x slower) still measures in about a second."""
    device = torch.device(device)
    key = (str(device), dtype, torch.get_num_threads())
    if key not in _PEAKS:
        _PEAKS[key] = _measure_matmul(device, dtype, seconds)
    return _PEAKS[key]


def _measure_matmul(device: torch.device, dtype: torch.dtype, seconds: float) -> float:
    def timed(a, b, n: int) -> float:
        _sync(device)
        start = time.perf_counter()
        for _ in range(n):
            a @ b
        _sync(device)
        return time.perf_counter() - start

    generator = torch.Generator(device=device).manual_seed(0)  # its own: a run's random draws stay as they were
    size = 256
    while True:
        a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
        b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
        timed(a, b, 1)  # warm up (kernel choice, caches)
        one = timed(a, b, 1)
        if size >= 2048 or 8 * one > seconds:  # the next size takes 8x as long
            break
        size *= 2
    n = max(2, int(seconds / max(one, 1e-6)))
    return 2 * size**3 * n / timed(a, b, n)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def format_flops(flops: float) -> str:
    """98 GFLOP/s (1.3 GFLOP/s for emulated bf16) on a CPU, 700 TFLOP/s on a GPU."""
    if flops >= 1e13:
        return f"{flops / 1e12:,.0f} TFLOP/s"
    return f"{flops / 1e9:,.{1 if flops < 1e10 else 0}f} GFLOP/s"


def bf16_warning(precision: str, device: torch.device | str) -> str | None:
    """The one-line warning for a bf16 precision on a CPU without native bf16 (None: nothing to say).
    Measures both matmul peaks, so the line says how much slower bf16 is here, not in general."""
    if "bf16" not in precision or torch.device(device).type != "cpu":
        return None
    isa = detect_isa()
    if isa.native_bf16:
        return None
    fp32, bf16 = matmul_peak("cpu", torch.float32), matmul_peak("cpu", torch.bfloat16)
    said = f"{precision} on a CPU without native bf16 ({isa.name}): bf16 matmuls run at {bf16 / 1e9:,.1f} GFLOP/s"
    said += f" vs {fp32 / 1e9:,.0f} fp32"
    if bf16 < fp32:
        return f"{said} ({fp32 / bf16:,.0f}x slower); use --precision 32-true"
    return f"{said}, but other bf16 ops are emulated; compare with --precision 32-true"


def warn_if_slow_bf16(fabric) -> None:
    """Before training: warn once (rank 0) when the run's precision is bf16 on a CPU without native bf16."""
    if fabric.global_rank != 0:
        return
    message = bf16_warning(str(fabric.strategy.precision.precision), fabric.device)
    if message:
        warnings.warn(message, stacklevel=2)


def describe_machine(device: torch.device | str) -> dict:
    """The summary's machine figures: the CPU's ISA, native bf16, and the fp32 and bf16 matmul peaks (FLOP/s) of
    the training device."""
    isa = detect_isa()
    return {
        "cpu_isa": isa.name,
        "cpu_native_bf16": isa.native_bf16,
        "matmul_peak_fp32": matmul_peak(device, torch.float32),
        "matmul_peak_bf16": matmul_peak(device, torch.bfloat16),
    }
