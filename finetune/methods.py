"""What each finetuning method trains: plans (litattn/plan.py) that start from a checkpoint's weights.

full       every parameter
mechanism  only the attention mechanism's own parameters (SSA's beta and temperatures, hybrid's
           thought-layer refinements, ...): the base weights stay bit-identical, as in the SSA
           authors' finetuning runs; `ssa` is an alias of it
lora   LoRA adapters on chosen linear layers plus the mechanism's own parameters; checkpoints hold
       the merged weights, so `generate` uses them directly
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

from torch import Tensor

from litattn import checkpoint as ckpt
from litattn.args import LoRAArgs
from litattn.config import Config
from litattn.lora import LORA_A, adapter_state, add_lora, is_lora_parameter, merged_state_dict
from litattn.model import GPT, is_mechanism_parameter
from litattn.plan import TrainingPlan

Method = Literal["full", "mechanism", "ssa", "lora"]


def _train_only(model: GPT, keep) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(keep(name))


class MechanismFinetune(TrainingPlan):
    """Only the attention mechanism's own parameters train; everything else is frozen."""

    def prepare(self, model: GPT) -> None:
        if not any(is_mechanism_parameter(name) for name, _ in model.named_parameters()):
            raise ValueError(
                f"method=mechanism trains only the attention mechanism's own parameters, and "
                f"{self.config.attention['name']!r} has none; switch the attention (--model.attention.name ssa) "
                "or use method=full or method=lora"
            )
        _train_only(model, is_mechanism_parameter)


class LoRAFinetune(TrainingPlan):
    """LoRA adapters on `lora.targets` and the mechanism's own parameters train; checkpoints hold merged weights
    (model.safetensors) and the adapters (training_state.pt, for --resume)."""

    def __init__(self, config: Config, initial_checkpoint_dir: Path, lora: LoRAArgs) -> None:
        super().__init__(config, initial_checkpoint_dir)
        self.lora = lora

    def prepare(self, model: GPT) -> None:
        add_lora(model, self.lora)
        _train_only(model, lambda name: is_mechanism_parameter(name) or is_lora_parameter(name))

    def weights(self, model: GPT) -> dict[str, Tensor]:
        return merged_state_dict(model)

    def resume_state(self, model: GPT) -> dict[str, Any]:
        return {"lora": adapter_state(model)}

    def restore(self, model: GPT, directory: Path, saved: dict[str, Any]) -> None:
        """The frozen base weights are the initial checkpoint's (already loaded); the merged weights of the
        saved checkpoint must not be loaded over them. The rest comes from the checkpoint, the adapters from
        its training state."""
        if "lora" not in saved:
            raise ValueError(f"{directory} has no LoRA adapters in its training state: it was not saved by method=lora")
        merged = {f"{name}.weight" for name, m in model.named_modules() if hasattr(m, LORA_A)}
        state = {k: v for k, v in ckpt.load_state_dict(Path(directory) / ckpt.MODEL_FILE).items() if k not in merged}
        state.update(saved["lora"])
        missing, unexpected = model.load_state_dict(state, strict=False)
        if sorted(missing) != sorted(merged) or unexpected:
            raise ValueError(
                f"{directory} does not match this model and LoRA setup: missing {sorted(set(missing) - merged)[:5]}, "
                f"unexpected {unexpected[:5]}"
            )


def make_plan(method: Method, config: Config, checkpoint_dir: Path, lora: LoRAArgs) -> TrainingPlan:
    if method == "full":  # every parameter trains: pretraining's plan, started from the checkpoint
        return TrainingPlan(config, checkpoint_dir)
    if method in ("mechanism", "ssa"):
        if method == "ssa":
            warnings.warn(
                f"method=ssa is an alias of method=mechanism: it trains the attention mechanism's own parameters, "
                f"whichever mechanism runs (here {config.attention['name']!r})",
                stacklevel=2,
            )
        return MechanismFinetune(config, checkpoint_dir)
    if method == "lora":
        return LoRAFinetune(config, checkpoint_dir, lora)
    raise ValueError(f"method must be one of full, mechanism (alias: ssa), lora; got {method!r}")
