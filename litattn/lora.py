"""LoRA (Hu et al., 2021) on chosen linear layers of a GPT, and merging it back into plain weights.

    y = W x + b + (alpha / r) * B (A dropout(x))        A (r, in) ~ kaiming-uniform, B (out, r) = 0

The adapter lives on the linear layer itself (`<layer>.lora_a`, `<layer>.lora_b`, added by a forward
hook), so the layer's `weight` keeps its name and the base checkpoint loads unchanged. `merged_state_dict`
gives the weights with W + (alpha / r) B A folded in and the adapters gone: a plain GPT state dict that
`generate`, `evaluate` and `convert` read directly.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from litattn.args import LoRAArgs

LORA_A, LORA_B = "lora_a", "lora_b"


class _Adapter:
    """The forward hook that adds the low-rank update to a linear layer's output."""

    def __init__(self, dropout: float) -> None:
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def __call__(self, layer: nn.Linear, inputs: tuple[Tensor], output: Tensor) -> Tensor:
        (x,) = inputs
        a, b = getattr(layer, LORA_A), getattr(layer, LORA_B)
        self.dropout.train(layer.training)
        return output + (self.dropout(x) @ a.to(x.dtype).T @ b.to(x.dtype).T) * layer.lora_scale


def add_lora(model: nn.Module, args: LoRAArgs) -> list[str]:
    """Give every linear layer whose name ends with one of `args.targets` an adapter; returns their names.

    Only the adapters are trainable afterwards among those layers' parameters (their weight and bias freeze);
    what else trains is the caller's choice.
    """
    if args.r < 1:
        raise ValueError(f"lora.r must be >= 1, got {args.r}")
    if not 0 <= args.dropout < 1:
        raise ValueError(f"lora.dropout must be in [0, 1), got {args.dropout}")

    def matches(name: str, target: str) -> bool:
        return name == target or name.endswith("." + target)

    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen = [name for name in linears if any(matches(name, t) for t in args.targets)]
    unmatched = [t for t in args.targets if not any(matches(n, t) for n in chosen)]
    if unmatched or not chosen:
        suffixes = sorted({n.split(".", 3)[-1] if n.startswith("transformer.h.") else n for n in linears})
        raise ValueError(
            f"lora.targets {unmatched or args.targets} match no linear layer of this model; choose from {suffixes}"
        )
    embedding = getattr(getattr(model, "transformer", None), "wte", None)
    for name in chosen:
        layer = linears[name]
        if embedding is not None and layer.weight is embedding.weight:
            raise ValueError(f"lora.targets: {name} shares its weight with the token embedding (tied); leave it out")
        if hasattr(layer, LORA_A):
            raise ValueError(f"{name} already has a LoRA adapter")
        a = nn.Parameter(torch.empty(args.r, layer.in_features, device=layer.weight.device, dtype=layer.weight.dtype))
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        b = nn.Parameter(torch.zeros(layer.out_features, args.r, device=layer.weight.device, dtype=layer.weight.dtype))
        layer.register_parameter(LORA_A, a)
        layer.register_parameter(LORA_B, b)
        layer.lora_scale = args.alpha / args.r
        layer.register_forward_hook(_Adapter(args.dropout))
        for p in (layer.weight, layer.bias):
            if p is not None:
                p.requires_grad_(False)
    return chosen


def is_lora_parameter(name: str) -> bool:
    return name.endswith(f".{LORA_A}") or name.endswith(f".{LORA_B}")


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict with each adapter folded into its layer's weight and the adapter keys removed.
    The model itself is not changed (training can go on)."""
    state = model.state_dict()
    for name, layer in model.named_modules():
        if isinstance(layer, nn.Linear) and hasattr(layer, LORA_A):
            a, b = getattr(layer, LORA_A).detach(), getattr(layer, LORA_B).detach()
            weight = layer.weight.detach()
            state[f"{name}.weight"] = (weight.float() + layer.lora_scale * (b.float() @ a.float())).to(weight.dtype)
            del state[f"{name}.{LORA_A}"], state[f"{name}.{LORA_B}"]
    return state


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapters' tensors: what a resumed run needs on top of the frozen base weights."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if is_lora_parameter(k)}
