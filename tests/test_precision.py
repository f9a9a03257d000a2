"""litattn/precision.py: `precision: auto` picks bf16 where the device has native bf16, fp32 elsewhere, and says so."""

import json

import pytest
import torch
import yaml

from conftest import tiny_pretrain
from litattn import precision
from litattn.args import RuntimeArgs
from litattn.cli import check_command
from litattn.cpu import CpuIsa

NATIVE = CpuIsa("AVX-512-BF16", native_bf16=True, capability="AVX512")
EMULATED = CpuIsa("AVX2", native_bf16=False, capability="AVX2")


def as_cpu(monkeypatch, isa: CpuIsa) -> None:
    monkeypatch.setattr(precision, "detect_isa", lambda: isa)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def as_gpu(monkeypatch, bf16: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "GPU-X")


@pytest.mark.parametrize(
    "isa, training, chosen, reason",
    [
        (NATIVE, True, "bf16-mixed", "auto: AVX-512-BF16 CPU, native bf16"),
        (NATIVE, False, "bf16-true", "auto: AVX-512-BF16 CPU, native bf16"),
        (EMULATED, True, "32-true", "auto: AVX2 CPU, no native bf16 (bf16 would be emulated, far slower)"),
        (EMULATED, False, "32-true", "auto: AVX2 CPU, no native bf16 (bf16 would be emulated, far slower)"),
    ],
)
def test_auto_on_a_cpu_is_bf16_only_with_native_bf16(monkeypatch, isa, training, chosen, reason):
    as_cpu(monkeypatch, isa)
    assert precision.choose_precision("auto", "auto", training) == precision.PrecisionChoice(chosen, reason)
    assert precision.choose_precision("auto", "cpu", training).precision == chosen


def test_auto_on_cuda_is_bf16_where_the_gpu_has_it_and_the_cpu_accelerator_is_not_cuda(monkeypatch):
    monkeypatch.setattr(precision, "detect_isa", lambda: EMULATED)
    as_gpu(monkeypatch, bf16=True)
    assert precision.choose_precision("auto") == precision.PrecisionChoice("bf16-mixed", "auto: GPU-X has bf16")
    assert precision.choose_precision("auto", "cuda", training=False).precision == "bf16-true"
    assert precision.choose_precision("auto", "cpu").precision == "32-true"  # --accelerator cpu: the CPU decides
    as_gpu(monkeypatch, bf16=False)
    assert precision.choose_precision("auto", "gpu") == precision.PrecisionChoice("32-true", "auto: GPU-X has no bf16")


def test_an_explicit_precision_wins_and_an_unknown_one_is_a_one_line_error(monkeypatch):
    as_cpu(monkeypatch, NATIVE)
    assert precision.choose_precision("32-true") == precision.PrecisionChoice("32-true", "given")
    as_cpu(monkeypatch, EMULATED)
    assert precision.choose_precision("bf16-mixed").precision == "bf16-mixed"
    with pytest.raises(ValueError, match=r"^precision must be one of \['auto', '32-true', .*got 'bf16'$"):
        RuntimeArgs(precision="bf16")


def test_quickstart_leaves_the_precision_to_auto():
    printed = yaml.safe_load(check_command(["pretrain", "--config", "config_hub/pretrain/quickstart.yaml"]))
    assert printed["precision"] == "auto"


@pytest.mark.parametrize("isa, chosen", [(NATIVE, "bf16-mixed"), (EMULATED, "32-true")])
def test_pretrain_by_default_trains_at_autos_choice_and_says_so(monkeypatch, tmp_path, capsys, isa, chosen):
    """The acceptance: a default pretrain runs bf16-mixed on a native-bf16 CPU, fp32 elsewhere; the first lines and
    summary.json say which and why."""
    as_cpu(monkeypatch, isa)
    precisions = []
    monkeypatch.setattr(  # the precision the Fabric really computes in, as the loop starts
        "litattn.loop.warn_if_slow_bf16", lambda fabric: precisions.append(fabric.strategy.precision.precision)
    )
    tiny_pretrain(tmp_path)  # no precision given: auto
    reason = precision.choose_precision("auto").reason
    assert precisions == [chosen]
    out = capsys.readouterr().out
    assert f"Precision {chosen} ({reason})" in out.splitlines()
    assert f"precision {chosen} ({reason});" in out  # the "Done:" line
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["precision"], summary["precision_reason"]) == (chosen, reason)
    hyperparameters = (tmp_path / "out" / "final" / "hyperparameters.yaml").read_text()
    assert "precision: auto" in hyperparameters  # what was asked for; the summary says what it became
