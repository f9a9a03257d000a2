"""`precision: auto`, every command's default: the precision this machine computes fastest without losing quality.

bf16 pays only where the hardware does it natively; elsewhere it is emulated and many times slower than fp32
(litattn/cpu.py). So auto picks, for the device the command runs on:

    CUDA with bf16 (Ampere and later)        bf16-mixed to train, bf16-true to infer
    a CPU with AVX-512-BF16, AMX or ARM BF16  bf16-mixed to train, bf16-true to infer
    anything else                             32-true

Training keeps fp32 master weights, optimizer state and loss (bf16-mixed autocasts the matmuls); inference has no
optimizer to protect, so its weights are bf16 themselves. An explicit precision always wins. The choice and its
reason are printed first and written into summary.json, so a table never mixes runs without saying so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from litattn.cpu import detect_isa

AUTO = "auto"
# Fabric's precision names (lightning_fabric.connector._PRECISION_INPUT_STR) less the aliases it deprecates
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true", "transformer-engine")


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str
    """A Fabric precision: 32-true, bf16-mixed, bf16-true, ..."""
    reason: str
    """Why: "given", or what auto found ("auto: AVX-512-BF16 CPU, native bf16")."""

    def describe(self) -> str:
        """The run's first line about it, e.g. `Precision bf16-mixed (auto: AVX-512-BF16 CPU, native bf16)`."""
        return f"Precision {self.precision} ({self.reason})"


def check_precision(precision: str) -> None:
    """A one-line error for a precision Fabric does not know (before any work)."""
    if str(precision) not in (AUTO, *PRECISIONS):
        raise ValueError(f"precision must be one of {[AUTO, *PRECISIONS]}, got {precision!r}")


def choose_precision(precision: str, accelerator: str = "auto", training: bool = True) -> PrecisionChoice:
    """The precision a command runs at: `precision` itself unless it is "auto"; then bf16 where the device
    (`accelerator` as Fabric resolves it: "auto" is CUDA when available, else the CPU) has native bf16."""
    check_precision(precision)
    if precision != AUTO:
        return PrecisionChoice(str(precision), "given")
    bf16 = "bf16-mixed" if training else "bf16-true"
    device = _device_type(accelerator)
    if device == "cuda":
        if torch.cuda.is_bf16_supported():
            return PrecisionChoice(bf16, f"auto: {torch.cuda.get_device_name()} has bf16")
        return PrecisionChoice("32-true", f"auto: {torch.cuda.get_device_name()} has no bf16")
    if device != "cpu":
        return PrecisionChoice("32-true", f"auto: fp32 on {device}")
    isa = detect_isa()
    if isa.native_bf16:
        return PrecisionChoice(bf16, f"auto: {isa.name} CPU, native bf16")
    return PrecisionChoice("32-true", f"auto: {isa.name} CPU, no native bf16 (bf16 would be emulated, far slower)")


def _device_type(accelerator: str) -> str:
    """The device type Fabric runs on for `accelerator` ("auto": CUDA, then MPS, then the CPU)."""
    accelerator = str(accelerator)
    if accelerator in ("auto", "gpu") and torch.cuda.is_available():
        return "cuda"
    if accelerator in ("auto", "gpu") and torch.backends.mps.is_available():
        return "mps"
    return "cpu" if accelerator == "auto" else accelerator


def fabric_precision(fabric, requested: str, accelerator: str = "auto") -> PrecisionChoice:
    """The precision a launched Fabric computes in, and why: auto's reason where auto chose it, else "given"."""
    actual = str(fabric.strategy.precision.precision)
    choice = choose_precision(requested, accelerator)
    return choice if choice.precision == actual else PrecisionChoice(actual, "given")
