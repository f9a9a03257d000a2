"""`PasskeyMix`: a pretraining corpus with passkey-retrieval samples mixed in.

A model pretrained on text alone has never seen the passkey task (litattn/passkey.py), so `litattn evaluate
passkey` scores it near zero at every length and says nothing about a mechanism. Replacing a share of the
training windows with passkey prompts and their answers teaches retrieval at the training context L; the
evaluation at 2L, 4L, 8L then measures how far a mechanism (e.g. Self-Extend) carries it beyond L.

Which windows are replaced, and with what key, depth and length, is a pure function of (seed, window index):
a resumed run, or one on more devices, sees exactly the same samples.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch.utils.data import Dataset

from litattn import passkey_prompts as pk
from litattn.args import check_range, check_seed
from litattn.data.base import DataModule, RunSeeded, TokenWindows, item_index
from litattn.data.text_files import unit_hash
from litattn.data.wrapping import wrapped_data
from litattn.tokenizer import Tokenizer

if TYPE_CHECKING:
    from litattn.hooks import TrainingHook

KEY_RANGE = (10000, 99999)
"""The keys: 5 digits, as `litattn evaluate passkey` draws them."""
_SETUP_KEYS = 64
"""Keys tokenized by `setup` to find the shortest seq_len that holds a prompt without filler and its answer."""


class PasskeySample(NamedTuple):
    """A passkey sample's tokens: the prompt, the answer ` <key>.` and EOS."""

    ids: list[int]
    key: int
    depth: float
    max_prompt_tokens: int
    """The length drawn for the prompt: `build_prompt(tokenizer, key, depth, max_prompt_tokens)` gives it."""
    prompt_tokens: int
    """The prompt's actual length: where the answer starts in `ids`."""


@dataclass
class PasskeyMix(RunSeeded, DataModule):
    """A corpus whose training windows are replaced, a `fraction` of them, by passkey samples: the prompt of
    `litattn evaluate passkey` (a random key at a random depth of filler, a random length up to the window),
    the answer ` <key>.` and the end-of-text token, then the corpus window's own tokens to fill the window."""

    corpus: DataModule | None = None
    """The text corpus: any data module (in YAML a nested `class_path`/`init_args`); None: the Python standard
    library's source (StdlibCorpus). (Not a default instance: jsonargparse would read its private attributes
    as arguments.)"""
    fraction: float = 0.25
    """Share of the training windows replaced by a passkey sample, in (0, 1]."""
    seed: int | None = None
    """Seed of which windows are replaced and of their keys, depths and lengths; null: the run's seed (so an
    ablation's seeds vary the data too), a number: the same draws for every run seed."""

    def __post_init__(self) -> None:
        self.corpus = wrapped_data(self.corpus, "corpus", "StdlibCorpus, TextFiles", PasskeyMix)
        check_range("fraction", self.fraction, gt=0, le=1)
        if self.seed is not None:
            check_seed("seed", self.seed)
        self._tokenizer: Tokenizer | None = None
        self._seq_len: int | None = None

    def seed_from_run(self, seed: int) -> None:
        super().seed_from_run(seed)
        self.corpus.seed_from_run(seed)

    def setup(self, tokenizer: Tokenizer | None, vocab_size: int, seq_len: int, cache_dir: Path) -> Tokenizer:
        tokenizer = self.corpus.setup(tokenizer, vocab_size, seq_len, cache_dir)
        if tokenizer.eos_id is None:
            raise ValueError(f"PasskeyMix ends each answer with EOS, and the tokenizer {tokenizer!r} has none")
        rng = random.Random(_salt(self.draw_seed, "setup"))
        keys = [KEY_RANGE[0], KEY_RANGE[1], *(rng.randint(*KEY_RANGE) for _ in range(_SETUP_KEYS))]
        question = tokenizer.encode(pk.QUESTION)
        build = pk.PromptBuilder(tokenizer)
        shortest = max(build.shortest(k) + len(_answer(tokenizer, k, question)) - 1 for k in keys)
        if seq_len < shortest:
            raise ValueError(
                f"seq_len={seq_len} is too short for a passkey sample: the prompt without filler and its answer "
                f"need seq_len >= {shortest} with this tokenizer"
            )
        self._tokenizer, self._seq_len = tokenizer, seq_len
        return tokenizer

    def train_dataset(self) -> PasskeyWindows:
        if self._tokenizer is None:
            raise RuntimeError("PasskeyMix.setup(...) must be called before asking for a dataset")
        return PasskeyWindows(
            self.corpus.train_dataset(), self._tokenizer, self._seq_len, self.fraction, self.draw_seed
        )

    def val_dataset(self) -> TokenWindows:
        """The corpus's validation windows unchanged: text only, so the validation loss stays comparable with a
        run on the corpus alone (passkey accuracy is what `litattn evaluate passkey` measures)."""
        return self.corpus.val_dataset()

    def describe(self) -> str:
        return (
            f"{self.corpus.describe()}\npasskey samples replace ~{100 * self.fraction:g}% of training windows "
            f"({self.seed_note()}); validation is the corpus's text only"
        )

    def training_hooks(self) -> list[TrainingHook]:
        return self.corpus.training_hooks()


class PasskeyWindows(Dataset):
    """A corpus's training windows, with window i replaced by a passkey sample when a hash of (seed, i) is
    below `fraction`. Item i depends on (seed, i) alone, in any process.

    A sample is `seq_len + 1` tokens, shifted into inputs and labels like `TokenWindows` (every label a real
    token): the passkey prompt, the answer ` <key>.`, EOS, then the first tokens of corpus window i:

        [intro  filler ... key sentence ... filler  question][ 12345.][EOS][corpus text ...]

    The key is 5 digits, the depth uniform in [0, 1], the prompt length uniform between the prompt without
    filler and what leaves room for the answer; the prompt has the most filler sentences that fit that length,
    built by `litattn.passkey.PromptBuilder` as `litattn evaluate passkey` builds its prompts.
    """

    def __init__(self, corpus: Dataset, tokenizer: Tokenizer, seq_len: int, fraction: float, seed: int) -> None:
        self.corpus = corpus
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.fraction = fraction
        self.seed = seed
        self._build = pk.PromptBuilder(tokenizer)
        self._question = tokenizer.encode(pk.QUESTION)

    def __len__(self) -> int:
        return len(self.corpus)

    def is_passkey(self, i: int) -> bool:
        """Whether window i is replaced by a passkey sample."""
        return unit_hash(_salt(self.seed, f"window\0{i}")) < self.fraction

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i = item_index(i, len(self), "window")
        item = self.corpus[i]
        if not self.is_passkey(i):
            return item
        window = torch.cat([item["input_ids"], item["labels"][-1:]])  # the corpus window's seq_len + 1 tokens
        head = torch.tensor(self.sample(i).ids, dtype=window.dtype)
        window = torch.cat([head, window[: self.seq_len + 1 - len(head)]])  # (seq_len + 1,)
        return {"input_ids": window[:-1], "labels": window[1:]}  # (seq_len,), (seq_len,)

    def sample(self, i: int) -> PasskeySample:
        """Window i's passkey sample (drawn whether or not window i is replaced)."""
        rng = random.Random(_salt(self.seed, f"sample\0{i}"))
        for _ in range(1000):  # a key whose prompt does not fit is drawn again (setup made sure most fit)
            key = rng.randint(*KEY_RANGE)
            answer = _answer(self.tokenizer, key, self._question)
            shortest = self._build.shortest(key)
            longest = self.seq_len + 1 - len(answer)
            if shortest <= longest:
                break
        else:
            raise RuntimeError(f"no passkey prompt fits seq_len={self.seq_len}")
        depth = rng.random()
        max_tokens = rng.randint(shortest, longest)
        prompt = self._build(key, depth, max_tokens).ids
        return PasskeySample(prompt + answer, key, depth, max_tokens, len(prompt))

    def __repr__(self) -> str:
        return f"PasskeyWindows({self.corpus!r}, seq_len={self.seq_len}, fraction={self.fraction}, seed={self.seed})"


def _salt(seed: int, what: str) -> str:
    return f"litattn.passkey_mix\0{seed}\0{what}"


def _answer(tokenizer: Tokenizer, key: int, question: list[int]) -> list[int]:
    """The tokens that follow the prompt in a sample: ` <key>.` as tokenized after the question (`question`: its
    tokens alone), what greedy decoding must produce for `passkey.is_correct`; then EOS, where `litattn evaluate
    passkey` stops generating."""
    both = tokenizer.encode(f"{pk.QUESTION} {key}.")
    answer = both[len(question) :] if both[: len(question)] == question else tokenizer.encode(f" {key}.")
    return [*answer, tokenizer.eos_id]
