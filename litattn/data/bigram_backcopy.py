"""`BigramBackcopy`: a synthetic text on which small models form attention sinks (the Bigram-Backcopy task of
Guo et al., 2024, "Active-Dormant Attention Heads").

The text is a chain of `symbols`, one character each. After a trigger symbol (the first `triggers` symbols), the
next symbol copies the one before the trigger (backcopy); after any other symbol, the next is drawn from that
symbol's row of a fixed random transition matrix (bigram). So attention is needed only at trigger positions (a
head that looks one token back); everywhere else the current token alone predicts the next, and a head that must
put its mass somewhere harmless is what the sink gives it. Prose gives heads work at almost every position; the
quickstart's models formed no sink on it (docs/experiments.md).

    symbols "abcdef", triggers 1 ("a"):   ...c e b a b d f a f c a c ...
                                                 ^ ^       ^ ^   ^ ^   (after "a", the symbol before "a" again)

The matrix's rows are Dirichlet(`alpha`) draws from `seed`: the task is the same for every run seed (it is not
drawn from the run's seed). The training and validation texts are two chains of that matrix, `train_symbols` and
`val_symbols` long, written once into the cache as text files and then read as `TextFiles` does (whole-file
token windows). Each symbol must be one token: the minimal tokenizer (vocab_size 278: litattn's special tokens
and the 256 bytes, no merges) does that; a tokenizer that merges symbols is refused.
"""

from __future__ import annotations

import bisect
import itertools
import random
import string
from dataclasses import asdict, dataclass
from pathlib import Path

from litattn.args import check_range
from litattn.data.base import DataModule, TokenWindows
from litattn.data.text_files import TextFiles
from litattn.tokenizer import Tokenizer, train_or_load_tokenizer
from litattn.utils import atomic_write_text, content_key

DEFAULT_SYMBOLS = string.ascii_lowercase + string.ascii_uppercase + string.digits + "+-"
"""64 symbols, each one byte."""


def transition_matrix(n: int, alpha: float, seed: int) -> list[list[float]]:
    """n rows of Dirichlet(alpha) probabilities over n symbols, a pure function of (n, alpha, seed)."""
    rng = random.Random(f"bigram-backcopy\0{seed}")
    rows = []
    for _ in range(n):
        draws = [rng.gammavariate(alpha, 1.0) for _ in range(n)]
        total = sum(draws) or 1.0
        rows.append([d / total for d in draws])
    return rows


def bigram_backcopy_chain(length: int, matrix: list[list[float]], triggers: int, rng: random.Random) -> list[int]:
    """`length` symbol indexes: backcopy after a trigger (index < triggers) that has a symbol before it, bigram
    otherwise. The first symbol is uniform."""
    n = len(matrix)
    cumulative = [list(itertools.accumulate(row)) for row in matrix]
    chain = [rng.randrange(n)]
    while len(chain) < length:
        current = chain[-1]
        if current < triggers and len(chain) >= 2:
            chain.append(chain[-2])
        else:
            row = cumulative[current]
            chain.append(min(bisect.bisect_right(row, rng.random() * row[-1]), n - 1))
    return chain


@dataclass
class BigramBackcopy(DataModule):
    """The Bigram-Backcopy text, training and validation chains of one fixed random bigram matrix."""

    symbols: str = DEFAULT_SYMBOLS
    """The alphabet, one character per symbol (distinct; each must be one token)."""
    triggers: int = 3
    """The first `triggers` symbols are triggers: the symbol after one copies the symbol before it."""
    alpha: float = 0.5
    """Dirichlet concentration of the bigram rows: lower is peakier (a more predictable bigram)."""
    train_symbols: int = 2_000_000
    """Length of the training chain (one token per symbol)."""
    val_symbols: int = 65_536
    """Length of the validation chain: 16 x 4,096, room to stream 16 times a 4,096-token context."""
    seed: int = 0
    """Seed of the bigram matrix and of both chains: the task, the same for every run seed."""

    def __post_init__(self) -> None:
        if not isinstance(self.symbols, str) or len(set(self.symbols)) != len(self.symbols) or len(self.symbols) < 2:
            raise ValueError(f"symbols must be a string of at least 2 distinct characters, got {self.symbols!r}")
        check_range("triggers", self.triggers, ge=0, le=len(self.symbols) - 1, bound_name="len(symbols) - 1")
        check_range("alpha", self.alpha, gt=0)
        check_range("train_symbols", self.train_symbols, ge=2)
        check_range("val_symbols", self.val_symbols, ge=2)
        self._text: TextFiles | None = None

    def write_corpus(self, cache_dir: Path) -> Path:
        """The two chains as text files under `cache_dir` (written once per settings, atomically); their folder."""
        folder = Path(cache_dir) / f"bigram-backcopy-{content_key(asdict(self))}"
        matrix = transition_matrix(len(self.symbols), self.alpha, self.seed)
        for split, length in (("train", self.train_symbols), ("val", self.val_symbols)):
            path = folder / split / f"{split}.txt"
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                rng = random.Random(f"bigram-backcopy\0{self.seed}\0{split}")
                chain = bigram_backcopy_chain(length, matrix, self.triggers, rng)
                atomic_write_text(path, "".join(self.symbols[i] for i in chain))
        return folder

    def setup(self, tokenizer: Tokenizer | None, vocab_size: int, seq_len: int, cache_dir: Path) -> Tokenizer:
        folder = self.write_corpus(cache_dir)
        if tokenizer is None:
            tokenizer = train_or_load_tokenizer([folder / "train" / "train.txt"], vocab_size, cache_dir)
        sample = self.symbols + (folder / "val" / "val.txt").read_text(encoding="utf-8")[:4096]
        if len(tokenizer.encode(sample)) != len(sample):  # checked before any tokenizing
            raise ValueError(
                "the tokenizer does not give each symbol one token; let the run train the minimal one: "
                "model vocab_size 278 (special tokens + 256 bytes) and no tokenizer_dir"
            )
        self._text = TextFiles(train_dirs=[folder / "train"], val_dir=folder / "val")
        return self._text.setup(tokenizer, vocab_size, seq_len, cache_dir)

    def train_dataset(self) -> TokenWindows:
        return self._require_setup().train_dataset()

    def val_dataset(self) -> TokenWindows:
        return self._require_setup().val_dataset()

    def describe(self) -> str:
        what = (
            f"Bigram-Backcopy: {len(self.symbols)} symbols, {self.triggers} triggers "
            f"({self.symbols[: self.triggers]!r}), alpha {self.alpha}, seed {self.seed}"
        )
        return what if self._text is None else f"{what}; {self._text.describe()}"

    def _require_setup(self) -> TextFiles:
        if self._text is None:
            raise RuntimeError("BigramBackcopy.setup(...) must be called before asking for a dataset")
        return self._text
