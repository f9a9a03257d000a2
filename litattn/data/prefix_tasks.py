"""`PrefixTask`: synthetic tasks where the prefix matters: reverse or sort a random string of symbols.

Each item is a prefix, a random sequence of symbols, and a suffix that must be that sequence reversed or sorted,
then the end-of-text token. The loss is on the suffix; items carry `prefix_len` (the attention metadata of
hybrid attention, litattn/attention/hybrid.py: the prefix is its bidirectional thought prefix). As text:

    reverse   prefix " 3 1 4 1 5 ="   suffix " 5 1 4 1 3<|endoftext|>"
    sort      prefix " 3 1 4 1 5 ="   suffix " 1 1 3 4 5<|endoftext|>"     (in the order of `symbols`)

With `noise` > 0, distractor symbols (`noise_symbols`) follow the prefix's symbols at random and the answer
ignores them: " 3 b 1 4 e 1 5 =" -> " 5 1 4 1 3" (reverse). Which tokens carry nothing is then a property of
the token itself: what SSA's value temperature can learn to suppress.

Each symbol is written with a leading space and tokenized alone (as is the `separator`, " =" by default), so
every symbol is the same tokens wherever it stands (one token each with the tokenizer trained here) and the item
is the concatenation (a BOS first where the tokenizer adds one). With `separator: "<|endthought|>"` the prefix
is also marked in the tokens, where hybrid attention finds it when no `prefix_len` is given (`litattn generate`).

Layout, as instruction data's (InstructionDataset):

    input_ids  the tokens but the last, padded with <|pad|> (or EOS) to seq_len
    labels     the tokens shifted by one; -100 where the target is still prefix, and over the padding
    prefix_len the prefix's tokens (BOS, symbols, separator), a 0-dim LongTensor (batches carry (B,))

The last prefix position (the separator's last token) predicts the first answer token, which no prefix position sees.

The string's length is uniform on min_length .. max_length, its symbols uniform and independent. Splits: a
string belongs to validation when a hash of (seed, string) is below `val_fraction` (seed 0 when the seed
follows the run's, so the split is the same for every run seed), so no validation string is ever trained
on; each split draws strings until one of its own comes up. Item i is a pure function of (seed, split, epoch,
i): training items are new strings every epoch (the loop calls `set_epoch`), validation items the
same at every evaluation.

Tokenizer: the run's (a checkpoint's, or `tokenizer_dir`), or, when there is none, a byte-level BPE trained
here on a text of task examples (cached in cache_dir: a few KB, trained in well under a second).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
from torch.utils.data import Dataset

from litattn.args import check_range, check_seed
from litattn.attention.hybrid import PREFIX_LEN
from litattn.data.base import DataModule, RunSeeded
from litattn.data.text_files import unit_hash
from litattn.tokenizer import Tokenizer, train_or_load_tokenizer
from litattn.utils import atomic_write_text, content_key

Task = Literal["reverse", "sort"]

IGNORE_INDEX = -100
"""The label of a position without a target."""

SEPARATOR = " ="
"""What ends the prefix by default: the model answers after it."""

PREFIX_TASK_VERSION = 1
"""Bump when the text format changes, so the tokenizer text is written (and a tokenizer trained) afresh."""

_TOKENIZER_LINES = 2000
"""Examples in the text a tokenizer is trained on when the run has none."""

_MAX_DRAWS = 1000
"""Strings drawn for one item before giving up (a split that holds (almost) no string of the given lengths)."""


@dataclass
class PrefixTask(RunSeeded, DataModule):
    """Reverse or sort a random string of symbols given as the prefix; the loss is on the answer (the suffix)."""

    task: Task = "reverse"
    """reverse: the suffix is the prefix's symbols in reverse order; sort: in the order they have in `symbols`."""
    symbols: str = "0123456789"
    """The alphabet: distinct characters, no whitespace (quote it in YAML: `"0123"`, not 0123)."""
    separator: str = SEPARATOR
    """The text that ends the prefix (its last tokens). `<|endthought|>`, a litattn tokenizer's prefix-ending
    token, also marks the prefix where no `prefix_len` is given: hybrid attention then ends the prefix after it,
    so `litattn generate --prompt " 3 1 4<|endthought|>"` reads the string as the prefix, as in training."""
    min_length: int = 4
    """Shortest string, in symbols (>= 1)."""
    max_length: int = 12
    """Longest string, in symbols (>= min_length). An item takes 2 x max_length + 2 tokens at most with the
    tokenizer trained here (a BOS more if the tokenizer adds one): seq_len must hold that minus one."""
    train_examples: int = 8192
    """Training items per epoch (new strings each epoch)."""
    val_examples: int = 256
    """Validation items (the same at every evaluation)."""
    noise: float = 0.0
    """Probability that a distractor symbol follows each symbol of the prefix (the answer ignores them), in [0, 1)."""
    noise_symbols: str = "abcdef"
    """The distractors (with `noise` > 0): distinct characters, no whitespace, none of `symbols` or the separator."""
    val_fraction: float = 0.1
    """Share of all strings held out for validation (by a hash of seed and string), in (0, 1)."""
    seed: int | None = None
    """Seed of the strings and of which are held out; null: the run's seed draws the strings (so an ablation's
    seeds vary the data too) and seed 0 the split, a number: the same strings and split for every run seed."""

    def __post_init__(self) -> None:
        if self.task not in get_args(Task):
            raise ValueError(f"task must be one of {', '.join(get_args(Task))}, got {self.task!r}")
        if not isinstance(self.symbols, str) or len(self.symbols) < 2:
            raise ValueError(f"symbols must be a string of at least 2 distinct characters, got {self.symbols!r}")
        if len(set(self.symbols)) < len(self.symbols):
            raise ValueError(f"symbols must be distinct characters, got {self.symbols!r}")
        if any(c.isspace() for c in self.symbols):
            raise ValueError(f"symbols must not hold whitespace (it separates them), got {self.symbols!r}")
        if not isinstance(self.separator, str) or not self.separator.strip():
            raise ValueError(f"separator must be text that ends the prefix, e.g. ' =', got {self.separator!r}")
        if self.separator.strip() in self.symbols:
            raise ValueError(
                f"separator {self.separator!r} is also a symbol; choose another separator or drop it from symbols"
            )
        check_range("noise", self.noise, ge=0, lt=1)
        if self.noise:
            bad = set(self.noise_symbols) & set(self.symbols + self.separator)
            if not self.noise_symbols or len(set(self.noise_symbols)) < len(self.noise_symbols) or bad:
                raise ValueError(
                    f"noise_symbols must be distinct characters that are not symbols or separator, got "
                    f"{self.noise_symbols!r}" + (f" (shared: {''.join(sorted(bad))!r})" if bad else "")
                )
            if any(c.isspace() for c in self.noise_symbols):
                raise ValueError(f"noise_symbols must not hold whitespace, got {self.noise_symbols!r}")
        for name in ("min_length", "train_examples", "val_examples"):
            _check_int(name, getattr(self, name), 1)
        _check_int("max_length", self.max_length, self.min_length, "min_length")
        check_range("val_fraction", self.val_fraction, gt=0, lt=1)
        if self.seed is not None:
            check_seed("seed", self.seed)
        self._encoding: Encoding | None = None
        self._seq_len: int | None = None
        self._tokenizer_note = ""

    # ------------------------------------------------------------------ DataModule
    def setup(self, tokenizer: Tokenizer | None, vocab_size: int, seq_len: int, cache_dir: Path) -> Tokenizer:
        cache_dir = Path(cache_dir)
        if tokenizer is None:
            tokenizer = train_or_load_tokenizer([self._tokenizer_text(cache_dir)], vocab_size, cache_dir)
            self._tokenizer_note = f"tokenizer trained on task text ({tokenizer.checkpoint_dir})"
        else:
            self._tokenizer_note = f"tokenizer {tokenizer.checkpoint_dir}"
        if tokenizer.eos_id is None:
            raise ValueError(f"PrefixTask ends each answer with EOS, and the tokenizer {tokenizer!r} has none")
        encoding = Encoding.of(tokenizer, self.symbols + self._noise_alphabet, self.separator)
        longest = encoding.max_tokens(self.max_length, noisy=bool(self.noise))
        if longest > seq_len + 1:
            raise ValueError(
                f"PrefixTask: an example of max_length={self.max_length} symbols takes up to {longest} tokens with "
                f"this tokenizer, more than seq_len + 1 = {seq_len + 1}; raise train.max_seq_length to "
                f"{longest - 1} or lower max_length"
            )
        self._encoding, self._seq_len = encoding, seq_len
        for split in ("train", "val"):  # a split without strings of these lengths fails here, not mid-run
            self._dataset(split).string(0)
        return tokenizer

    def train_dataset(self) -> PrefixTaskDataset:
        return self._dataset("train")

    def val_dataset(self) -> PrefixTaskDataset:
        return self._dataset("val")

    def describe(self) -> str:
        line = (
            f"PrefixTask {self.task}: strings of {self.min_length}..{self.max_length} symbols from "
            f"{self.symbols!r}; {self.train_examples:,} training items per epoch (new strings each epoch), "
            f"{self.val_examples:,} validation items from the {self.val_fraction:g} of strings held out ("
            f"{self.seed_note()}); loss on the answer; items carry prefix_len"
            + (
                f"; distractors {self.noise_symbols!r} after a symbol with probability {self.noise:g}"
                if self.noise
                else ""
            )
        )
        return f"{line}\n{self._tokenizer_note}" if self._tokenizer_note else line

    # ------------------------------------------------------------------ helpers
    def _dataset(self, split: str) -> PrefixTaskDataset:
        if self._encoding is None:
            raise RuntimeError("PrefixTask.setup(...) must be called before asking for a dataset")
        n = self.train_examples if split == "train" else self.val_examples
        return PrefixTaskDataset(self, self._encoding, self._seq_len, split, n, fixed_epoch=split == "val")

    @property
    def _noise_alphabet(self) -> str:
        return self.noise_symbols if self.noise else ""

    def clean(self, string: str) -> str:
        """The prefix string without its distractors."""
        return "".join(c for c in string if c not in self._noise_alphabet) if self.noise else string

    def with_noise(self, string: str, rng: random.Random) -> str:
        """The string with a distractor after each symbol with probability `noise` (unchanged without noise)."""
        if not self.noise:
            return string
        return "".join(c + (rng.choice(self.noise_symbols) if rng.random() < self.noise else "") for c in string)

    def answer(self, string: str) -> str:
        """The suffix's symbols for a prefix string (its distractors ignored)."""
        string = self.clean(string)
        if self.task == "reverse":
            return string[::-1]
        order = {c: i for i, c in enumerate(self.symbols)}
        return "".join(sorted(string, key=order.__getitem__))

    def text(self, string: str) -> tuple[str, str]:
        """(prefix text, suffix text without EOS): (" 3 1 4 =", " 4 1 3") for reverse."""
        return "".join(f" {c}" for c in string) + self.separator, "".join(f" {c}" for c in self.answer(string))

    def is_val(self, string: str) -> bool:
        """Whether a string belongs to the validation split: by the pinned seed, or 0 when the seed follows the
        run, so every run seed and every evaluation holds out the same strings."""
        split_seed = self.seed if self.seed is not None else 0
        return unit_hash(f"litattn.prefix_task\0{split_seed}\0{self.clean(string)}") < self.val_fraction

    def _tokenizer_text(self, cache_dir: Path) -> Path:
        """A text of task examples for training a tokenizer, written once (its path, size and mtime key the
        tokenizer cache)."""
        parts = [PREFIX_TASK_VERSION, self.task, self.symbols, self.separator, self.min_length, self.max_length]
        key = content_key(parts + ([self.noise, self.noise_symbols] if self.noise else []))
        path = cache_dir / f"prefix-task-{key}.txt"
        if not path.is_file():
            rng = random.Random(f"litattn.prefix_task.tokenizer\0{key}")
            lines = []
            for _ in range(_TOKENIZER_LINES):
                string = "".join(rng.choices(self.symbols, k=rng.randint(self.min_length, self.max_length)))
                lines.append("".join(self.text(self.with_noise(string, rng))))
            atomic_write_text(path, "\n".join(lines) + "\n")
        return path


@dataclass(frozen=True)
class Encoding:
    """The token ids of each symbol piece (" 3"), of the separator, and of BOS (if the tokenizer adds one) / EOS."""

    symbols: dict[str, tuple[int, ...]]
    separator: tuple[int, ...]
    bos: tuple[int, ...]
    eos: int
    pad: int

    @classmethod
    def of(cls, tokenizer: Tokenizer, symbols: str, separator: str = SEPARATOR) -> Encoding:
        pieces = {c: tuple(tokenizer.encode(f" {c}")) for c in symbols}
        sep = tuple(tokenizer.encode(separator))
        if not sep or not all(pieces.values()):
            raise ValueError(f"The tokenizer {tokenizer!r} encodes a symbol or {separator!r} as no token")
        if len(set(pieces.values())) < len(pieces):
            raise ValueError(f"The tokenizer {tokenizer!r} gives two symbols of {symbols!r} the same tokens")
        bos = (tokenizer.bos_id,) if tokenizer.use_bos and tokenizer.bos_id is not None else ()
        pad = tokenizer.special_tokens.get("<|pad|>", tokenizer.eos_id)
        return cls(pieces, sep, bos, tokenizer.eos_id, pad)

    def max_tokens(self, max_length: int, noisy: bool = False) -> int:
        """The most tokens an example of up to `max_length` symbols takes (with a distractor after each, noisy)."""
        widest = max(len(p) for p in self.symbols.values())
        return len(self.bos) + (3 if noisy else 2) * max_length * widest + len(self.separator) + 1

    def __call__(self, string: str, answer: str) -> tuple[list[int], list[int]]:
        """(prefix ids, suffix ids with EOS)."""
        prefix = [*self.bos, *(i for c in string for i in self.symbols[c]), *self.separator]
        return prefix, [*(i for c in answer for i in self.symbols[c]), self.eos]


class PrefixTaskDataset(Dataset):
    """`n` items of a PrefixTask split; item i of epoch e depends on (seed, split, e, i) alone."""

    def __init__(
        self,
        task: PrefixTask,
        encoding: Encoding,
        seq_len: int,
        split: str,
        n: int,
        epoch: int = 0,
        fixed_epoch: bool = False,
    ) -> None:
        self.task, self.encoding, self.seq_len, self.split, self.n = task, encoding, seq_len, split, n
        self.epoch, self.fixed_epoch = epoch, fixed_epoch

    def set_epoch(self, epoch: int) -> None:
        if not self.fixed_epoch:
            self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def string(self, i: int) -> str:
        """Item i's prefix string (this epoch's)."""
        t = self.task
        key = f"litattn.prefix_task\0{t.draw_seed}\0{self.split}\0{self.epoch}\0{i}"
        rng = random.Random(hashlib.sha256(key.encode()).digest())
        want_val = self.split == "val"
        for _ in range(_MAX_DRAWS):
            string = "".join(rng.choices(t.symbols, k=rng.randint(t.min_length, t.max_length)))
            if t.is_val(string) == want_val:
                return t.with_noise(string, rng)
        raise ValueError(
            f"PrefixTask: no {'validation' if want_val else 'training'} string in {_MAX_DRAWS} draws: strings of "
            f"{t.min_length}..{t.max_length} symbols from {t.symbols!r} are too few; raise max_length or add symbols"
        )

    def tokens(self, i: int) -> tuple[list[int], list[int]]:
        """Item i's (prefix ids, suffix ids with EOS)."""
        string = self.string(i)
        return self.encoding(string, self.task.answer(string))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(f"item {i} out of range for {self.n} items")
        prefix, suffix = self.tokens(i)
        tokens = torch.tensor(prefix + suffix, dtype=torch.long)
        k = len(tokens) - 1  # positions that predict a token (setup made sure k <= seq_len)
        input_ids = torch.full((self.seq_len,), self.encoding.pad, dtype=torch.long)
        labels = torch.full((self.seq_len,), IGNORE_INDEX, dtype=torch.long)
        input_ids[:k] = tokens[:-1]
        labels[:k] = tokens[1:]
        labels[: len(prefix) - 1] = IGNORE_INDEX  # their targets are prefix tokens, which the prefix sees
        return {"input_ids": input_ids, "labels": labels, PREFIX_LEN: torch.tensor(len(prefix), dtype=torch.long)}

    def prompt_ids(self, i: int) -> list[int]:
        """Item i's prefix: what a model is given to answer it (the training loop's sample)."""
        return self.tokens(i)[0]

    def __repr__(self) -> str:
        return f"PrefixTaskDataset({self.task.task}, split={self.split}, n={self.n}, epoch={self.epoch})"


def _check_int(name: str, value, low: int, low_name: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        bound = f"{low_name} ({low})" if low_name else str(low)
        raise ValueError(f"{name} must be an integer >= {bound}, got {value!r}")


__all__ = ["Encoding", "PrefixTask", "PrefixTaskDataset"]
