"""The one-device Fabric of the inference commands (evaluate perplexity and streaming, truncate build), at the
precision `precision: auto` picks for inference. Its own module: the argument classes import litattn/precision.py,
and Fabric's import would slow every command's start (--help, --print_config) by a second and a half."""

from __future__ import annotations

from lightning_fabric import Fabric

from litattn.precision import PrecisionChoice, choose_precision


def inference_fabric(precision: str) -> tuple[Fabric, PrecisionChoice]:
    """A launched one-device Fabric at `precision` (auto: bf16-true where the device has native bf16), and the
    choice (the command prints it with its results, so an error before them stays one line)."""
    choice = choose_precision(precision, training=False)
    fabric = Fabric(accelerator="auto", devices=1, precision=choice.precision)
    fabric.launch()
    return fabric, choice
