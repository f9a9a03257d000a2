"""What the pretraining loop sees of a corpus: a `DataModule` that prepares token files, `TokenWindows` over them."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import Dataset

from litattn.tokenizer import Tokenizer

if TYPE_CHECKING:
    from litattn.hooks import TrainingHook


@runtime_checkable
class EpochAware(Protocol):
    """A dataset whose items depend on the epoch (token injection, sampled prefixes): the training loop calls
    `set_epoch(epoch)` before each step's batches."""

    def set_epoch(self, epoch: int) -> None: ...


@runtime_checkable
class HasPrompts(Protocol):
    """A dataset of prompted examples (instruction data): the loop samples the first validation prompt."""

    def prompt_ids(self, i: int) -> list[int]: ...


def has_prompts(dataset: object) -> bool:
    """Whether a dataset is `HasPrompts`. A wrapper (InjectTokens' dataset) has the ability only when what it wraps
    has it, and says so by raising AttributeError, which a Protocol's isinstance check does not see on every Python."""
    try:
        return callable(dataset.prompt_ids)
    except AttributeError:
        return False


class DataModule(ABC):
    """A corpus for pretraining: `setup` tokenizes it once (cached), then the datasets read the token files."""

    def seed_from_run(self, seed: int) -> None:  # noqa: B027 (a hook with a default: most modules draw nothing)
        """The run's seed, given by the loop before `setup`: a module that draws at random uses it unless its own
        `seed` is pinned (`RunSeeded`); a wrapper passes it to what it wraps. Default: nothing is drawn."""

    @abstractmethod
    def setup(self, tokenizer: Tokenizer | None, vocab_size: int, seq_len: int, cache_dir: Path) -> Tokenizer:
        """Prepare the token files; with `tokenizer=None` first train (or reuse) one of `vocab_size` tokens."""

    @abstractmethod
    def train_dataset(self) -> TokenWindows: ...

    @abstractmethod
    def val_dataset(self) -> TokenWindows: ...

    @abstractmethod
    def describe(self) -> str:
        """One or two lines for the run log: what was read, what was held out, where the cache is."""

    def training_hooks(self) -> list[TrainingHook]:
        """TrainingHooks (litattn/hooks.py) the training loop calls at each epoch start and after each step, e.g.
        to re-draw something of the data each epoch; none by default."""
        return []

    def innermost(self) -> DataModule:
        """The data module at the core of any wrappers (InjectTokens, PasskeyMix): what kind of data this is."""
        inner = getattr(self, "data", None) or getattr(self, "corpus", None)
        return inner.innermost() if isinstance(inner, DataModule) else self


def item_index(i: int, n: int, what: str) -> int:
    """Index i of n items as a non-negative index (negative ones count from the end); IndexError out of range."""
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"{what} {i} out of range for {n} {what}s")
    return i


class EpochDataset(Dataset):
    """A wrapped dataset whose item i is drawn afresh each epoch from (salt, seed, split, epoch, i) alone: the same
    in every process, on resume and on every rank. Subclasses define `draw(item, i)`.

    `set_epoch(epoch)` (the training loop calls it before each step) selects the epoch's draws and passes the
    epoch on to a wrapped dataset that has it; one made with `fixed_epoch=True` (validation) stays at epoch 0.
    """

    salt = "litattn"  # one per subclass, so two wrappers never draw the same numbers

    def __init__(self, dataset: Dataset, seed: int, split: str, epoch: int = 0, fixed_epoch: bool = False) -> None:
        self.dataset = dataset
        self.seed = seed
        self.split = split
        self.epoch = epoch
        self.fixed_epoch = fixed_epoch

    def set_epoch(self, epoch: int) -> None:
        if not self.fixed_epoch:
            self.epoch = int(epoch)
        if isinstance(self.dataset, EpochAware):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def generator(self, i: int) -> torch.Generator:
        """The CPU generator item i's draws come from: seeded by a hash of (salt, seed, split, epoch, i)."""
        key = f"{self.salt}\0{self.seed}\0{self.split}\0{self.epoch}\0{i}"
        digest = hashlib.sha256(key.encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i = item_index(i, len(self), "item")
        return self.draw(self.dataset[i], i)

    def draw(self, item: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id: halves the token files for vocabularies below 65536."""
    return np.dtype(np.uint16) if vocab_size < 2**16 else np.dtype(np.uint32)


class RunSeeded:
    """A data module whose random draws follow the run's seed unless its `seed` field is pinned: with `seed: null`
    (the default) an ablation's seeds vary the data as well as the initialisation and order; a number keeps the
    same draws for every run seed. Outside a run (no `seed_from_run` call, e.g. `litattn evaluate`) it draws
    with seed 0."""

    seed: int | None
    _run_seed: int | None = None

    def seed_from_run(self, seed: int) -> None:
        self._run_seed = seed

    @property
    def draw_seed(self) -> int:
        """The seed the module draws with: its own when pinned, else the run's (0 outside a run)."""
        if self.seed is not None:
            return self.seed
        return 0 if self._run_seed is None else self._run_seed

    def seed_note(self) -> str:
        """`seed 3 (the run's)`, `seed 0 (pinned)` or `seed 0 (outside a run)`, for `describe`."""
        whose = "pinned" if self.seed is not None else "outside a run" if self._run_seed is None else "the run's"
        return f"seed {self.draw_seed} ({whose})"


class TokenWindows(Dataset):
    """Windows of `seq_len + 1` tokens over a flat token file, advancing by `seq_len`.

    Window i covers tokens [i*seq_len, (i+1)*seq_len] inclusive, so every token is predicted exactly once:

        tokens   t0 t1 t2 t3 t4 t5 t6       (seq_len = 3, n_tokens = 7 -> 2 windows)
        item 0   input t0 t1 t2  labels t1 t2 t3
        item 1   input t3 t4 t5  labels t4 t5 t6

    The file is memory-mapped lazily (and reopened after pickling), so DataLoader workers share the page cache
    instead of receiving a copy of the corpus.
    """

    def __init__(self, path: Path | str, seq_len: int, dtype: np.dtype | str) -> None:
        self.path = Path(path)
        self.seq_len = seq_len
        self.dtype = np.dtype(dtype)
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.n_tokens = self.path.stat().st_size // self.dtype.itemsize
        if self.n_tokens < seq_len + 1:
            raise ValueError(
                f"{self.path} holds {self.n_tokens} tokens, fewer than one window of seq_len + 1 = {seq_len + 1}; "
                f"use more data or a shorter seq_len"
            )
        self._data: np.memmap | None = None

    @property
    def data(self) -> np.memmap:
        if self._data is None:
            self._data = np.memmap(self.path, dtype=self.dtype, mode="r")
        return self._data

    def __len__(self) -> int:
        return (self.n_tokens - 1) // self.seq_len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i = item_index(i, len(self), "window")
        start = i * self.seq_len
        window = torch.from_numpy(self.data[start : start + self.seq_len + 1].astype(np.int64))  # (seq_len + 1,)
        return {"input_ids": window[:-1], "labels": window[1:]}  # (seq_len,), (seq_len,)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_data": None}

    def __repr__(self) -> str:
        return f"TokenWindows({str(self.path)!r}, seq_len={self.seq_len}, n_tokens={self.n_tokens}, len={len(self)})"
