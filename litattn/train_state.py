"""What a run counts, saved in every checkpoint (`TrainState`): where it is, what it read, its time and memory
over all sessions, and its last validation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from litattn.training import peak_memory_bytes


@dataclass
class TrainState:
    """The position (step, epoch, step within the epoch), tokens (input tokens processed, padding trimmed by
    `collate` excluded) and loss_tokens (those with a target); the training seconds and peak memory over all
    sessions; the last validation (loss, step, batches: None = all)."""

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    train_seconds: float | None = 0.0
    peak_memory_bytes: int | None = 0
    val_loss: float | None = None
    val_step: int | None = None
    val_batches: int | None = None

    UNKNOWN_IF_MISSING = ("train_seconds", "peak_memory_bytes")
    """Figures of earlier sessions that a checkpoint written before litattn recorded them cannot tell: None."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> TrainState:
        """The state a checkpoint's training state holds (its other keys are the optimizer's, the RNG's, ...)."""
        state = cls()
        for f in fields(cls):
            setattr(state, f.name, saved.get(f.name, None if f.name in cls.UNKNOWN_IF_MISSING else f.default))
        return state

    def end_step(self, steps_per_epoch: int) -> None:
        """After a step: the next one starts a new epoch when this one ended the epoch."""
        if self.epoch_step >= steps_per_epoch:
            self.epoch += 1
            self.epoch_step = 0

    def account(self, seconds_before: float | None, session_seconds: float, device) -> None:
        """Bring the cumulative figures up to now: training seconds (earlier sessions + this one) and peak memory."""
        if seconds_before is not None:
            self.train_seconds = seconds_before + session_seconds
        if self.peak_memory_bytes is not None:
            self.peak_memory_bytes = max(self.peak_memory_bytes, peak_memory_bytes(device))

    def validated_in_full(self) -> bool:
        """Whether the last validation covered the whole split at the current step."""
        return self.val_loss is not None and self.val_batches is None and self.val_step == self.step
