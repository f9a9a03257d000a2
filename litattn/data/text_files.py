"""`TextFiles`: pretrain on the text files in one or more folders.

Each file is one document. Without a validation folder, whole files are held out, chosen by a hash of each
file's relative path: the choice is the same on every run and machine, and adding a file never moves another.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from litattn.data.base import DataModule, TokenWindows
from litattn.data.prepare import PreparedTokens, prepare_tokens
from litattn.tokenizer import Tokenizer, train_or_load_tokenizer


@dataclass
class TextFiles(DataModule):
    """Text files from folders, each file a document; documents are separated by `<|endoftext|>`."""

    train_dirs: list[Path]
    """Folders of training text, searched recursively (one or more)."""
    val_dir: Path | None = None
    """Folder of validation text. Without it, `val_fraction` of the training files are held out."""
    extensions: list[str] = field(default_factory=lambda: [".txt"])
    """File name endings to read, e.g. [".txt", ".md", ".py"] (case-insensitive)."""
    val_fraction: float = 0.05
    """Share of the files held out for validation when there is no `val_dir` (of the tokens, for a single file)."""
    exclude: list[str] = field(default_factory=list)
    """Glob patterns of paths to skip, relative to their folder: a pattern without `/` matches a file or folder
    name at any depth (`tests`, `*.min.txt`), one with `/` the relative path (`drafts/*`)."""
    seed: int = 42
    """Salt of the hash that picks validation files: change it to hold out a different set."""
    num_workers: int = min(2, os.cpu_count() or 1)
    """Tokenization threads (never more than the machine's cores)."""

    def __post_init__(self) -> None:
        if isinstance(self.train_dirs, (str, Path)):
            self.train_dirs = [self.train_dirs]
        self.train_dirs = [Path(d) for d in self.train_dirs]
        if not self.train_dirs:
            raise ValueError("train_dirs is empty: name at least one folder of training text")
        self.val_dir = Path(self.val_dir) if self.val_dir is not None else None
        if isinstance(self.extensions, str):
            self.extensions = [self.extensions]
        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]
        self.extensions = [e.lower() if e.startswith(".") else f".{e.lower()}" for e in self.extensions]
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")
        self._prepared: PreparedTokens | None = None
        self._seq_len: int | None = None

    # ------------------------------------------------------------------ files
    def find_files(self, cache_dir: Path | None = None) -> tuple[list[Path], list[Path]]:
        """(train files, validation files), in a fixed order; validation is empty for a single-file corpus."""
        skip = [Path(cache_dir)] if cache_dir is not None else []
        if self.val_dir is not None:
            val = self._scan(self.val_dir, skip)
            # a val_dir inside a train dir is validation only
            train = [f for d in self.train_dirs for f in self._scan(d, skip + [self.val_dir])]
            return _unique(train), val
        files = _unique([(f, rel) for d in self.train_dirs for f, rel in self._scan_rel(d, skip)], key=lambda x: x[0])
        if len(files) == 1:
            return [files[0][0]], []
        is_val = held_out([rel for _, rel in files], self.seed, self.val_fraction)
        train = [f for (f, _), v in zip(files, is_val, strict=True) if not v]
        val = [f for (f, _), v in zip(files, is_val, strict=True) if v]
        return train, val

    def _scan(self, root: Path, skip: list[Path]) -> list[Path]:
        return [f for f, _ in self._scan_rel(root, skip)]

    def _scan_rel(self, root: Path, skip: list[Path]) -> list[tuple[Path, str]]:
        """Matching files under `root` with their POSIX paths relative to it, sorted; `skip` folders are pruned."""
        if not root.exists():
            raise FileNotFoundError(f"Folder {str(root)!r} does not exist; check train_dirs / val_dir")
        if not root.is_dir():
            raise FileNotFoundError(f"{str(root)!r} is not a folder; train_dirs and val_dir name folders")
        root = root.resolve()
        skip = {p.resolve() for p in skip} - {root}
        extensions = tuple(self.extensions)
        found = []
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            rel_dir = here.relative_to(root).as_posix()
            prefix = "" if rel_dir == "." else rel_dir + "/"
            dirnames[:] = sorted(
                d for d in dirnames if here / d not in skip and not _excluded(prefix + d, self.exclude)
            )
            for name in sorted(filenames):
                rel = prefix + name
                if name.lower().endswith(extensions) and not _excluded(rel, self.exclude):
                    found.append((here / name, rel))
        if not found:
            raise ValueError(
                f"No {'/'.join(self.extensions)} files in {str(root)!r}"
                + (f" outside the exclude patterns {self.exclude}" if self.exclude else "")
                + "; check the folder and `extensions`"
            )
        return found

    # ------------------------------------------------------------------ DataModule
    def setup(self, tokenizer: Tokenizer | None, vocab_size: int, seq_len: int, cache_dir: Path) -> Tokenizer:
        cache_dir = Path(cache_dir)
        train, val = self.find_files(cache_dir)
        if tokenizer is None:
            tokenizer = train_or_load_tokenizer(train, vocab_size, cache_dir)
        self._prepared = prepare_tokens(
            train,
            val,
            tokenizer,
            cache_dir,
            val_tail_fraction=None if val else self.val_fraction,
            num_workers=max(1, min(self.num_workers, os.cpu_count() or 1)),
        )
        self._seq_len = seq_len
        p = self._prepared
        for split, n in (("training", p.train_tokens), ("validation", p.val_tokens)):
            if n < seq_len + 1:
                raise ValueError(
                    f"The {split} split of {self._source()} has {n} tokens, fewer than one window of "
                    f"seq_len + 1 = {seq_len + 1}; add text, lower seq_len"
                    + (" or raise val_fraction" if split == "validation" and self.val_dir is None else "")
                )
        return tokenizer

    def train_dataset(self) -> TokenWindows:
        p = self._require_setup()
        return TokenWindows(p.train_path, self._seq_len, p.dtype)

    def val_dataset(self) -> TokenWindows:
        p = self._require_setup()
        return TokenWindows(p.val_path, self._seq_len, p.dtype)

    def describe(self) -> str:
        if self._prepared is None:
            return f"{self._source()} (not set up yet)"
        p = self._prepared
        line = f"{self._source()}: {len(p.train_files)} files, {p.train_tokens:,} tokens for training; validation: "
        if self.val_dir is not None:
            line += f"{len(p.val_files)} files from {self.val_dir}, {p.val_tokens:,} tokens"
        elif p.val_files:
            names = [self._relative(Path(f)) for f in p.val_files]
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            line += (
                f"{len(p.val_files)} of {len(p.train_files) + len(p.val_files)} files held out by path hash "
                f"(val_fraction={self.val_fraction}, seed={self.seed}): {shown}; {p.val_tokens:,} tokens"
            )
        else:
            line += f"the last {p.val_tokens:,} tokens ({self.val_fraction:.0%}) of {p.train_files[0]}"
        if p.skipped:
            line += f"; {len(p.skipped)} unreadable or non-UTF-8 file(s) skipped"
        return f"{line}\ntoken cache: {p.dir} ({'reused' if p.reused else 'built'})"

    def _relative(self, path: Path) -> str:
        """`path` relative to the train folder that holds it, for the log."""
        for root in self.train_dirs:
            if path.is_relative_to(root := root.resolve()):
                return path.relative_to(root).as_posix()
        return str(path)

    def _source(self) -> str:
        return ", ".join(str(d) for d in self.train_dirs)

    def _require_setup(self) -> PreparedTokens:
        if self._prepared is None:
            raise RuntimeError(f"{type(self).__name__}.setup(...) must be called before asking for a dataset")
        return self._prepared


def _excluded(rel: str, patterns: list[str]) -> bool:
    """Whether the relative POSIX path `rel` (a file or a folder) matches one of the exclude patterns."""
    parts = rel.split("/")
    for pattern in patterns:
        pattern = pattern.strip("/")
        if "/" in pattern:  # a path pattern: match the path or any of its parent folders
            if any(fnmatch.fnmatchcase("/".join(parts[:i]), pattern) for i in range(1, len(parts) + 1)):
                return True
        elif any(fnmatch.fnmatchcase(part, pattern) for part in parts):  # a name pattern: at any depth
            return True
    return False


def unit_hash(text: str) -> float:
    """A number in [0, 1) fixed by `text` alone (unlike hash(), stable across processes and machines)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def held_out(keys: Sequence[str], seed: int, fraction: float) -> list[bool]:
    """Which of `keys` go to validation: those whose salted hash is below `fraction`, at least one, never all.

    The choice depends on each key alone, so adding an item never moves another (except through the two bounds).
    """
    scores = [unit_hash(f"{seed}\0{key}") for key in keys]
    is_val = [s < fraction for s in scores]
    if not any(is_val):  # hold out at least one: the one with the lowest score
        is_val[scores.index(min(scores))] = True
    if all(is_val):  # ... and train on at least one (duplicate keys share a score, so this goes by index)
        is_val[scores.index(max(scores))] = False
    return is_val


def _unique(items: list, key=lambda x: x) -> list:
    """Drop repeats (overlapping folders), keeping the first occurrence and the order."""
    seen, out = set(), []
    for item in items:
        if (k := key(item)) not in seen:
            seen.add(k)
            out.append(item)
    return out
