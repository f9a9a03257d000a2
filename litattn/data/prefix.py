"""`SampledPrefix`: pretraining windows with a thought prefix of a length drawn per window, loss on the rest.

Hybrid attention (litattn/attention/hybrid.py) reads a per-row prefix length, batch metadata `prefix_len`: the
first P tokens of a row attend to each other bidirectionally (and run the thought loop), the rest is causal. To
pretrain it, each window of another data module gets a P of its own and loses the targets inside its prefix
(every prefix position sees the tokens it would predict). As the prefix-LM objectives of T5 and UL2 split a
sequence at a random point, the split here is drawn per window:

    P = 0                                        with probability 1 - `probability` (a plain causal window)
    P ~ uniform on the integers lo .. hi         otherwise, lo = ceil(min_fraction x T), hi = floor(max_fraction x T)

T the window's length (seq_len). With the defaults (probability 1, fractions 0.1 and 0.5) P is uniform on
0.1 T .. 0.5 T, so on average 30% of a window is prefix and 70% of its targets count.

Labels: like an instruction's prompt, the prefix predicts nothing of itself; its last position predicts the
first token after it (which no prefix position sees):

    tokens     t0 t1 t2 t3 t4 t5 t6                (seq_len 6, P = 3)
    input_ids  t0 t1 t2 t3 t4 t5
    labels     -100 -100 t3 t4 t5 t6
    prefix_len 3

A prefix never reaches past the position of an item's last target (P <= that position + 1): windows whose last
labels are -100 (padding, an injected token at the end) keep a target after the prefix, and collate's trimming,
which drops the columns after every row's last target, never cuts a prefix. Pretraining windows, whose last label
is always a target, are never capped. Items keep the wrapped module's other keys (e.g. the `segment_ids` of
InjectTokens).

P is a pure function of (seed, epoch, window index) for training, drawn afresh each epoch (the loop calls
`set_epoch`), and of (seed, window index) alone for validation, or the fixed `val_prefix_fraction` x T: every
evaluation sees the same prefixes, so validation losses compare across evaluations and across attention
mechanisms (causal attention drops `prefix_len` with a warning; its loss is then on the same targets).

    data:
      class_path: litattn.data.SampledPrefix
      init_args:
        data: {class_path: litattn.data.StdlibCorpus}
        min_fraction: 0.1
        max_fraction: 0.5

(config_hub/pretrain/hybrid-debug.yaml runs it in seconds.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import Dataset

from litattn.args import check_range, check_seed
from litattn.attention.hybrid import PREFIX_LEN
from litattn.data.base import DataModule, EpochDataset, RunSeeded
from litattn.data.wrapping import wrapped_data
from litattn.tokenizer import Tokenizer

if TYPE_CHECKING:
    from litattn.hooks import TrainingHook

IGNORE_INDEX = -100
"""The label of a position without a target."""


@dataclass
class SampledPrefix(RunSeeded, DataModule):
    """Another data module's windows, each with a thought prefix of a sampled length (`prefix_len`) whose targets
    are masked: the loss is on the tokens after the prefix (see the module docstring for the distribution)."""

    data: DataModule | None = None
    """The pretraining data whose windows get a prefix (in YAML a nested `class_path`/`init_args`): StdlibCorpus,
    TextFiles, PasskeyMix, InjectTokens; None: StdlibCorpus. (Not a default instance: jsonargparse would read its
    private attributes as arguments.)"""
    min_fraction: float = 0.1
    """Shortest prefix, as a share of the window: P >= ceil(min_fraction x seq_len). In [0, 1]."""
    max_fraction: float = 0.5
    """Longest prefix, as a share of the window: P <= floor(max_fraction x seq_len). In [min_fraction, 1]."""
    probability: float = 1.0
    """Share of the windows that get a prefix; the others have P = 0 (causal, every target counts). In [0, 1]."""
    val_prefix_fraction: float | None = None
    """Every validation window's prefix is round(val_prefix_fraction x seq_len) tokens; null: drawn from the
    training distribution by (seed, index), the same at every evaluation."""
    seed: int | None = None
    """Seed of the prefix lengths (items depend on (seed, epoch, index) alone); null: the run's seed (so an
    ablation's seeds vary the data too), a number: the same draws for every run seed."""

    def __post_init__(self) -> None:
        self.data = wrapped_data(self.data, "data", "StdlibCorpus, TextFiles", SampledPrefix)
        check_range("min_fraction", self.min_fraction, ge=0, le=1)
        check_range("max_fraction", self.max_fraction, ge=0, le=1)
        if self.max_fraction < self.min_fraction:
            raise ValueError(f"max_fraction must be >= min_fraction ({self.min_fraction}), got {self.max_fraction}")
        check_range("probability", self.probability, ge=0, le=1)
        check_range("val_prefix_fraction", self.val_prefix_fraction, ge=0, le=1, null="the training distribution")
        if self.seed is not None:
            check_seed("seed", self.seed)
        self._seq_len: int | None = None

    def seed_from_run(self, seed: int) -> None:
        super().seed_from_run(seed)
        self.data.seed_from_run(seed)

    def setup(self, tokenizer: Tokenizer | None, vocab_size: int, seq_len: int, cache_dir: Path) -> Tokenizer:
        tokenizer = self.data.setup(tokenizer, vocab_size, seq_len, cache_dir)
        if self.probability > 0:
            prefix_range(self.min_fraction, self.max_fraction, seq_len)  # an empty range fails here, not mid-run
        self._seq_len = seq_len
        return tokenizer

    def train_dataset(self) -> PrefixWindows:
        draw = self._draw()
        return PrefixWindows(self.data.train_dataset(), draw, self.draw_seed, "train")

    def val_dataset(self) -> PrefixWindows:
        draw = self._draw()
        if self.val_prefix_fraction is not None:
            draw = PrefixDraw(self.val_prefix_fraction, self.val_prefix_fraction, 1.0, fixed=True)
        return PrefixWindows(self.data.val_dataset(), draw, self.draw_seed, "val", fixed_epoch=True)

    def describe(self) -> str:
        if self.probability == 0:
            dist = "no prefix (probability 0)"
        else:
            lo, hi = prefix_range(self.min_fraction, self.max_fraction, self._seq_len) if self._seq_len else (0, 0)
            dist = f"a prefix of {lo}..{hi} tokens (uniform; {self.min_fraction:g}..{self.max_fraction:g} x seq_len)"
            if self.probability < 1:
                dist = f"with probability {self.probability:g} {dist}, else none"
        val = (
            "drawn likewise by (seed, index)"
            if self.val_prefix_fraction is None
            else f"{self.val_prefix_fraction:g} x seq_len for every window"
        )
        return (
            f"{self.data.describe()}\nthought prefix: each training window gets {dist}, drawn from "
            f"({self.seed_note()}, epoch, index); validation prefixes {val}; no loss on targets inside a prefix"
        )

    def training_hooks(self) -> list[TrainingHook]:
        return self.data.training_hooks()

    def _draw(self) -> PrefixDraw:
        if self._seq_len is None:
            raise RuntimeError("SampledPrefix.setup(...) must be called before asking for a dataset")
        return PrefixDraw(self.min_fraction, self.max_fraction, self.probability)


def prefix_range(min_fraction: float, max_fraction: float, seq_len: int) -> tuple[int, int]:
    """(lo, hi): the prefix lengths a window of `seq_len` tokens may get; a one-line error when none."""
    # round first: 0.3 x 10 is 3.0000000000000004 in floating point, whose ceiling would be 4
    lo = math.ceil(round(min_fraction * seq_len, 9))
    hi = math.floor(round(max_fraction * seq_len, 9))
    if lo > hi:
        raise ValueError(
            f"no whole prefix length lies in [{min_fraction:g}, {max_fraction:g}] x seq_len = "
            f"[{min_fraction * seq_len:g}, {max_fraction * seq_len:g}]; widen min_fraction..max_fraction"
        )
    return lo, hi


@dataclass(frozen=True)
class PrefixDraw:
    """The distribution of P for a window of T tokens (see the module docstring)."""

    min_fraction: float
    max_fraction: float
    probability: float
    fixed: bool = False
    """P = round(min_fraction x T), no draw (a fixed validation prefix)."""

    def __call__(self, seq_len: int, generator: torch.Generator) -> int:
        if self.fixed:
            return min(round(self.min_fraction * seq_len), seq_len)
        u = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        if u[0] >= self.probability:
            return 0
        lo, hi = prefix_range(self.min_fraction, self.max_fraction, seq_len)
        return lo + min(int(u[1] * (hi - lo + 1)), hi - lo)


class PrefixWindows(EpochDataset):
    """A dataset's windows with `prefix_len` added and the targets inside the prefix masked; item i of epoch e
    depends on (seed, split, e, i) alone (validation: always as at epoch 0)."""

    salt = "litattn.prefix"

    def __init__(
        self, dataset: Dataset, draw: PrefixDraw, seed: int, split: str, epoch: int = 0, fixed_epoch: bool = False
    ) -> None:
        super().__init__(dataset, seed, split, epoch, fixed_epoch)
        self.prefix_draw = draw

    def prefix_len(self, i: int, seq_len: int) -> int:
        """Item i's prefix length for windows of `seq_len` tokens (this epoch's draw)."""
        return self.prefix_draw(seq_len, self.generator(i))

    def draw(self, item: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
        item = dict(item)
        if PREFIX_LEN in item:
            raise ValueError("SampledPrefix got items that carry a prefix_len already; wrap pretraining windows")
        labels = item["labels"]
        if labels.ndim != 1:
            raise ValueError(f"SampledPrefix takes items of shape (seq_len,), got labels of {tuple(labels.shape)}")
        targets = (labels != IGNORE_INDEX).nonzero()
        last = int(targets[-1]) + 1 if len(targets) else 0  # the prefix ends by the last target's position
        p = min(self.prefix_len(i, len(labels)), last)
        if p > 1:
            labels = labels.clone()
            labels[: p - 1] = IGNORE_INDEX  # their targets are prefix tokens, which the prefix sees
        item["labels"] = labels
        item[PREFIX_LEN] = torch.tensor(p, dtype=torch.long)  # 0-dim: batches carry (B,)
        return item

    def __repr__(self) -> str:
        where = f"seed={self.seed}, split={self.split}, epoch={self.epoch}"
        return f"PrefixWindows({self.dataset!r}, {self.prefix_draw}, {where})"


__all__ = ["PrefixDraw", "PrefixWindows", "SampledPrefix", "prefix_range"]
