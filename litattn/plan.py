"""What a training run trains and what its checkpoints hold: the part of the loop that differs between
pretraining and the finetuning methods.

    build(fabric, resuming)      the model: fresh, or started from a checkpoint's weights
    parameter_groups(model, ..)  what the optimizer updates (and with which learning rates)
    weights(model)               model.safetensors of every checkpoint: what `generate` loads
    resume_state(model)          tensors a resumed run needs beyond `weights` (e.g. LoRA factors)
    restore(model, dir, saved)   the inverse of the two above, for --resume

`TrainingPlan` is pretraining's: every parameter trains. finetune/methods.py derives the others.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from litattn import checkpoint as ckpt
from litattn.args import OptimizerArgs
from litattn.config import Config
from litattn.model import GPT
from litattn.training import parameter_groups

if TYPE_CHECKING:
    from litattn.model import GPT


class TrainingPlan:
    """Train every parameter of a fresh model, or of one started from `initial_checkpoint_dir`'s weights
    (whose config may differ in the attention mechanism: the new mechanism's parameters keep their init)."""

    def __init__(self, config: Config, initial_checkpoint_dir: Path | None = None) -> None:
        self.config = config
        self.initial_checkpoint_dir = Path(initial_checkpoint_dir) if initial_checkpoint_dir is not None else None

    def build(self, fabric, resuming: bool) -> GPT:
        # Skipping init is safe only when every parameter is then overwritten by the resumed checkpoint.
        with fabric.init_module(empty_init=resuming and self.initial_checkpoint_dir is None):
            model = GPT(self.config)
        if self.initial_checkpoint_dir is not None:
            ckpt.load_weights(model, self.initial_checkpoint_dir)
        self.prepare(model)
        return model

    def prepare(self, model: GPT) -> None:
        """Change the built model before training (freeze, add adapters); nothing for pretraining."""

    def parameter_groups(self, model: GPT, args: OptimizerArgs) -> list[dict]:
        groups = parameter_groups(model, args)
        if not groups:
            raise ValueError("Nothing to train: no parameter of the model is trainable")
        return groups

    def weights(self, model: GPT) -> dict[str, Tensor]:
        return model.state_dict()

    def resume_state(self, model: GPT) -> dict[str, Any]:
        return {}

    def restore(self, model: GPT, directory: Path, saved: dict[str, Any]) -> None:
        model.load_state_dict(ckpt.load_state_dict(Path(directory) / ckpt.MODEL_FILE))

    def describe(self, model: GPT) -> str:
        trainable = model.num_parameters(trainable_only=True)
        return f"{trainable:,} of {model.num_parameters():,} parameters trainable"
