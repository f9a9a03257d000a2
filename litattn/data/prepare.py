"""Tokenize lists of documents once into flat token files, cached by what went into them.

`cache_dir/data-<key>/` holds `train.bin`, `val.bin` (raw uint16/uint32 ids, read with np.memmap) and
`meta.json` (token counts, file lists, skipped files). The key hashes every input file's path, size and mtime,
the tokenizer's fingerprint and the split, so editing a file or changing the tokenizer rebuilds, and nothing
else does. The folder is built under a temp name and renamed into place: readers never see a partial cache.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from litattn.data.base import token_dtype
from litattn.tokenizer import Tokenizer, read_text
from litattn.utils import atomic_write_text, content_key, make_temp_dir, remove_stale_temps

DATA_FORMAT_VERSION = 1
"""Bump when the token files' layout changes, so old caches are rebuilt."""

_PIECE_CHARS = 1 << 20  # long documents are cut at line breaks into pieces of about this many characters
_BATCH_CHARS = 4 << 20  # characters handed to the tokenizer per batch (bounds memory, feeds its threads)


@dataclass
class PreparedTokens:
    """Where the token files are and what they hold (the contents of meta.json)."""

    dir: Path
    dtype: np.dtype
    train_tokens: int
    val_tokens: int
    train_files: list[str]
    val_files: list[str]
    skipped: list[str]
    """Files that could not be read or were not UTF-8: left out, and reported."""
    reused: bool

    @property
    def train_path(self) -> Path:
        return self.dir / "train.bin"

    @property
    def val_path(self) -> Path:
        return self.dir / "val.bin"


def prepare_tokens(
    train_files: Sequence[Path],
    val_files: Sequence[Path],
    tokenizer: Tokenizer,
    cache_dir: Path | str,
    val_tail_fraction: float | None = None,
    num_workers: int = 1,
) -> PreparedTokens:
    """Encode the documents (each followed by EOS) into train.bin and val.bin, or reuse an identical earlier run.

    With `val_tail_fraction` (and no `val_files`), the last fraction of the training tokens becomes val.bin:
    the way to hold something out of a corpus that is a single file.
    """
    if tokenizer.eos_id is None:
        raise ValueError(f"The tokenizer in {tokenizer.checkpoint_dir} has no EOS token to separate documents")
    train_files = [Path(f).resolve() for f in train_files]
    val_files = [Path(f).resolve() for f in val_files]
    cache_dir = Path(cache_dir)
    dtype = token_dtype(tokenizer.vocab_size)
    fingerprint = tokenizer.fingerprint()  # hashes the tokenizer's files: once, for the key and meta.json
    key = content_key(
        {
            "version": DATA_FORMAT_VERSION,
            "train": _stats(train_files),
            "val": _stats(val_files),
            "val_tail_fraction": val_tail_fraction,
            "tokenizer": fingerprint,
        }
    )
    final = cache_dir / f"data-{key}"
    remove_stale_temps(cache_dir)  # left by runs killed mid-write
    if (prepared := _load(final)) is not None:
        print(f"Reusing token files in {final}")
        if prepared.skipped:
            warnings.warn(
                f"{len(prepared.skipped)} file(s) were skipped when {final} was built (unreadable or not UTF-8): "
                + ", ".join(prepared.skipped),
                stacklevel=2,
            )
        return prepared

    print(f"Tokenizing {len(train_files) + len(val_files)} files -> {final}")
    tmp = make_temp_dir(cache_dir, f"data-{key}")
    try:
        args = dict(tokenizer=tokenizer, dtype=dtype, num_workers=num_workers)
        n_train, skipped = _write_tokens(train_files, tmp / "train.bin", desc="train", **args)
        n_val, skipped_val = _write_tokens(val_files, tmp / "val.bin", desc="val", **args)
        skipped += skipped_val
        if val_tail_fraction is not None and not val_files:
            n_val = math.ceil(n_train * val_tail_fraction)
            n_train -= n_val
            _move_tail(tmp / "train.bin", tmp / "val.bin", n_train, dtype)
        meta = dict(
            version=DATA_FORMAT_VERSION,
            dtype=dtype.name,
            train_tokens=n_train,
            val_tokens=n_val,
            train_files=[str(f) for f in train_files],
            val_files=[str(f) for f in val_files],
            val_tail_fraction=val_tail_fraction,
            skipped=skipped,
            tokenizer=fingerprint,
        )
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=1))
        if final.exists():  # a stale or damaged cache (`_load` rejected it): replace it
            shutil.rmtree(final)
        try:
            os.replace(tmp, final)
        except OSError:
            if _load(final) is None:  # a concurrent run that finished first is fine; anything else is not
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    prepared = _load(final)
    prepared.reused = False
    return prepared


def _write_tokens(
    files: Sequence[Path], out: Path, tokenizer: Tokenizer, dtype: np.dtype, num_workers: int, desc: str
) -> tuple[int, list[str]]:
    """Stream `files` through the tokenizer into `out`; returns (token count, skipped files)."""
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    n_tokens, skipped = 0, []
    batch: list[tuple[str, bool]] = []  # (text piece, whether it ends its document)
    batch_bytes = batch_chars = 0

    def flush() -> None:
        nonlocal n_tokens, batch, batch_bytes, batch_chars
        encoded = tokenizer.encode_batch([piece for piece, _ in batch], num_threads=num_workers)
        for ids, ends_document in zip(encoded, (end for _, end in batch), strict=True):
            f.write(np.asarray(ids, dtype=dtype).tobytes())
            n_tokens += len(ids)
            if ends_document:
                f.write(eos.tobytes())
                n_tokens += 1
        progress.update(batch_bytes)
        batch, batch_bytes, batch_chars = [], 0, 0

    sizes = [p.stat().st_size for p in files]
    with open(out, "wb") as f, tqdm(total=sum(sizes), unit="B", unit_scale=True, desc=f"Tokenizing {desc}") as progress:
        for path, size in zip(files, sizes, strict=True):
            batch_bytes += size
            text = read_text(path)
            if text is None:
                skipped.append(str(path))
                continue
            batch.extend(_pieces(text))  # an empty document adds nothing, not even an EOS
            batch_chars += len(text)
            if batch_chars >= _BATCH_CHARS:
                flush()
        flush()
    return n_tokens, skipped


def _pieces(text: str) -> Iterator[tuple[str, bool]]:
    """Cut a long document so that one huge file neither stalls the threads nor fills the memory.

    Cuts fall just before a line break (else a space), where byte-level pre-tokenizers split anyway, so the
    pieces almost always tokenize exactly like the whole text.
    """
    start = 0
    while start < len(text):
        end = min(start + _PIECE_CHARS, len(text))
        if end < len(text):
            cut = max(text.rfind("\n", start + 1, end), 0) or max(text.rfind(" ", start + 1, end), 0)
            end = cut or end
        yield text[start:end], end == len(text)
        start = end


def _move_tail(train: Path, val: Path, n_keep: int, dtype: np.dtype) -> None:
    """Move every token after the first `n_keep` of `train` into `val`."""
    tokens = np.memmap(train, dtype=dtype, mode="r")
    np.asarray(tokens[n_keep:]).tofile(val)
    del tokens
    os.truncate(train, n_keep * dtype.itemsize)


def _load(folder: Path) -> PreparedTokens | None:
    """The prepared tokens in `folder`, or None if missing or inconsistent with its meta.json."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        dtype = np.dtype(meta["dtype"])
        sizes_ok = all(
            (folder / f"{split}.bin").stat().st_size == meta[f"{split}_tokens"] * dtype.itemsize
            for split in ("train", "val")
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not sizes_ok or meta.get("version") != DATA_FORMAT_VERSION:
        return None
    return PreparedTokens(
        dir=folder,
        dtype=dtype,
        train_tokens=meta["train_tokens"],
        val_tokens=meta["val_tokens"],
        train_files=meta["train_files"],
        val_files=meta["val_files"],
        skipped=meta["skipped"],
        reused=True,
    )


def _stats(files: Sequence[Path]) -> list[tuple[str, int, int]]:
    return [(str(f), (s := f.stat()).st_size, s.st_mtime_ns) for f in files]
