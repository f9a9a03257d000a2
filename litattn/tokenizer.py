"""Tokenizers: load `tokenizer.json` (Hugging Face `tokenizers`) or `tokenizer.model` (sentencepiece), or train one.

A checkpoint directory carries its tokenizer files, so `Tokenizer(checkpoint_dir)` is all a loader needs. Models
trained here use a byte-level BPE whose first ids are litattn's special-token table (`SPECIAL_TOKENS`): the same
names always get the same ids, and decode(encode(text)) == text for any UTF-8 text.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sentencepiece as spm
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from litattn.utils import atomic_write, content_key, make_temp_dir, remove_stale_temps

N_SET = 16
"""Number of SET tokens (`<|set_0|>` ... `<|set_15|>`) reserved in the table."""

SPECIAL_TOKENS: list[str] = [
    "<|endoftext|>",  # bos and eos: separates documents
    "<|pad|>",
    "<|disrupt|>",
    *(f"<|set_{i}|>" for i in range(N_SET)),
    "<|prefix|>",
    "<|thought|>",
    "<|endthought|>",
]
"""litattn's reserved special tokens in id order: a tokenizer trained here gives SPECIAL_TOKENS[i] the id i."""

TOKENIZER_FORMAT_VERSION = 1
"""Bump when `Tokenizer.train` changes what it produces, so cached tokenizers are retrained."""

MODEL_FILES = ("tokenizer.json", "tokenizer.model")
"""The files a tokenizer is loaded from, in order of preference: one list for every module that looks for one."""
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
"""Hugging Face files beside the model file that set special tokens (read and copied with it)."""
FINGERPRINT_FILE = "tokenizer_fingerprint.json"
"""Written by `Tokenizer.save` beside the tokenizer: its fingerprint, so that a tokenizer swapped in later (another
run's, another model's) is refused when the directory is loaded instead of silently giving other ids."""
FINGERPRINT_VERSION = 1
_HF_CONTENT = ("model", "added_tokens", "normalizer", "pre_tokenizer", "decoder")
"""The parts of a tokenizer.json that decide ids and text (post-processor, padding, truncation: litattn never uses)."""


class Tokenizer:
    """One interface over a Hugging Face `tokenizers` BPE/Unigram/WordPiece file or a sentencepiece model."""

    def __init__(self, checkpoint_dir: Path | str) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        if not self.checkpoint_dir.is_dir():
            raise FileNotFoundError(
                f"Tokenizer directory {str(self.checkpoint_dir)!r} does not exist; "
                f"expected a folder holding tokenizer.json or tokenizer.model"
            )
        model_file = next((self.checkpoint_dir / n for n in MODEL_FILES if (self.checkpoint_dir / n).is_file()), None)
        if model_file is None:
            raise FileNotFoundError(
                f"No tokenizer.json or tokenizer.model in {str(self.checkpoint_dir)!r}; "
                f"pass a checkpoint directory that holds one (or train one with Tokenizer.train)"
            )
        # Keep the raw bytes: `save` copies them verbatim.
        names = [model_file.name] + [n for n in CONFIG_FILES if (self.checkpoint_dir / n).is_file()]
        self._files: dict[str, bytes] = {n: (self.checkpoint_dir / n).read_bytes() for n in names}
        self.model_file = model_file
        self._fingerprint: str | None = None

        self._hf = self._sp = None
        self.backend = "huggingface" if model_file.name == "tokenizer.json" else "sentencepiece"
        try:
            if self.backend == "huggingface":
                self._hf = HFTokenizer.from_str(self._files["tokenizer.json"].decode("utf-8"))
            else:
                self._sp = spm.SentencePieceProcessor(model_proto=self._files["tokenizer.model"])
        except Exception as e:  # `tokenizers` raises a plain Exception for a truncated or malformed file
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ValueError(
                f"{model_file} is not a readable tokenizer ({reason}): it is truncated or corrupt; copy it again "
                "from the run or model it came from"
            ) from None

        self.special_tokens: dict[str, int] = {
            name: i for name in SPECIAL_TOKENS if (i := self.token_to_id(name)) is not None
        }
        self.bos_id, self.eos_id, self.use_bos = self._resolve_bos_eos()
        self._check_recorded_fingerprint()

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, special and added tokens included."""
        if self._hf is not None:
            return self._hf.get_vocab_size(with_added_tokens=True)
        return self._sp.get_piece_size()

    def token_to_id(self, token: str) -> int | None:
        if self._hf is not None:
            return self._hf.token_to_id(token)
        i = self._sp.piece_to_id(token)
        # sentencepiece maps unknown pieces to unk_id instead of failing.
        return i if self._sp.id_to_piece(i) == token else None

    def special_id(self, name: str) -> int:
        """The id of one of litattn's special tokens (`<|disrupt|>`, `<|set_3|>`, ...)."""
        if name not in SPECIAL_TOKENS:
            raise ValueError(f"{name!r} is not a litattn special token; known: {', '.join(SPECIAL_TOKENS)}")
        if name not in self.special_tokens:
            raise ValueError(
                f"The tokenizer in {str(self.checkpoint_dir)!r} has no {name} token (only tokenizers trained by "
                f"litattn reserve the special-token table, e.g. <|disrupt|> and <|set_0|>..<|set_{N_SET - 1}|> for "
                "Disrupt/SET); use a tokenizer trained by litattn, or add the token to the tokenizer and the model's "
                "vocabulary"
            )
        return self.special_tokens[name]

    def check_fits(self, padded_vocab_size: int) -> None:
        """Fail early, with the fix, instead of an index error deep inside the embedding."""
        if self.vocab_size > padded_vocab_size:
            raise ValueError(
                f"tokenizer has {self.vocab_size} tokens but the model's padded vocabulary is {padded_vocab_size}; "
                f"set the model's vocab_size to at least {self.vocab_size} (or use a smaller tokenizer)"
            )

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`; bos/eos are added only when asked (use `use_bos` for the checkpoint's own habit)."""
        if self._hf is not None:
            # add_special_tokens=False: a post-processor (e.g. Llama-3's) must not add a second BOS.
            ids = self._hf.encode(text, add_special_tokens=False).ids
        else:
            ids = self._sp.encode(text)
        return self._wrap(ids, bos, eos)

    def encode_batch(
        self, texts: Sequence[str], bos: bool = False, eos: bool = False, num_threads: int = 1
    ) -> list[list[int]]:
        """`encode` for many texts at once; with num_threads > 1 the backend tokenizes in parallel (native threads).

        Hugging Face `tokenizers` uses its own thread pool (at most the core count) when parallelism is allowed;
        sentencepiece uses exactly `num_threads`.
        """
        if self._hf is not None:
            with _hf_parallelism(num_threads > 1):
                encodings = self._hf.encode_batch_fast(list(texts), add_special_tokens=False)
            out = [e.ids for e in encodings]
        else:
            out = self._sp.encode(list(texts), num_threads=max(1, num_threads))
        return [self._wrap(ids, bos, eos) for ids in out]

    def decode(self, ids) -> str:
        """Text of `ids` (a list of ints or a 1-D tensor/array); special tokens are kept in the text."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=False)
        return self._sp.decode(ids)

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos:
            if self.bos_id is None:
                raise ValueError(f"The tokenizer in {str(self.checkpoint_dir)!r} has no BOS token")
            ids = [self.bos_id] + ids
        if eos:
            if self.eos_id is None:
                raise ValueError(f"The tokenizer in {str(self.checkpoint_dir)!r} has no EOS token")
            ids = ids + [self.eos_id]
        return ids

    # ------------------------------------------------------------------ files
    def save(self, out_dir: Path | str) -> None:
        """Write the tokenizer file, its config files and its fingerprint (`FINGERPRINT_FILE`, checked when the
        directory is loaded again) into `out_dir` (a checkpoint directory)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, data in self._files.items():
            atomic_write(out_dir / name, lambda tmp, data=data: tmp.write_bytes(data))
        record = {
            "fingerprint": self.fingerprint(),
            "version": FINGERPRINT_VERSION,
            "file": self.model_file.name,
            "vocab_size": self.vocab_size,
        }
        atomic_write(out_dir / FINGERPRINT_FILE, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))

    def fingerprint(self) -> str:
        """A hash of what decides the token ids and the decoded text, not of how the file is written.

        Hugging Face `tokenizers`: the model (vocabulary, merges), added tokens, normalizer, pre-tokenizer and
        decoder of tokenizer.json, as parsed (formatting, key order and the merges' notation do not count);
        sentencepiece: the model's bytes; both: the BOS/EOS ids and whether BOS is added. It keys the data caches
        and is recorded beside a saved tokenizer (`save`), so a swapped tokenizer is refused on load.
        """
        if self._fingerprint is None:
            if self._hf is not None:
                spec = json.loads(self._files["tokenizer.json"])
                content: dict[str, Any] = {k: spec.get(k) for k in _HF_CONTENT}
                model = content["model"]
                if isinstance(model, dict) and isinstance(model.get("merges"), list):  # "a b" and ["a", "b"]
                    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]
                    content["model"] = {**model, "merges": merges}
            else:
                content = {"sentencepiece": hashlib.sha256(self._files["tokenizer.model"]).hexdigest()}
            content.update(bos=self.bos_id, eos=self.eos_id, use_bos=self.use_bos)
            text = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
            self._fingerprint = hashlib.sha256(text.encode()).hexdigest()[:16]
        return self._fingerprint

    def _check_recorded_fingerprint(self) -> None:
        """Refuse a tokenizer that is not the one `save` recorded in this directory (a swapped file)."""
        path = self.checkpoint_dir / FINGERPRINT_FILE
        if not path.is_file():
            return  # saved before fingerprints were recorded, or a tokenizer directory of its own
        try:
            record = json.loads(path.read_bytes())
            recorded = record["fingerprint"]
            if not isinstance(recorded, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise ValueError(
                f"{path} is not a tokenizer fingerprint record (a JSON object with a 'fingerprint'); delete it if "
                f"{self.model_file.name} is the tokenizer the weights beside it were trained with"
            ) from None
        if recorded != self.fingerprint():
            size = f", {record['vocab_size']} tokens" if isinstance(record.get("vocab_size"), int) else ""
            raise ValueError(
                f"{self.model_file} (fingerprint {self.fingerprint()}, {self.vocab_size} tokens) is not the tokenizer "
                f"this directory was saved with (fingerprint {recorded}{size}, recorded in {FINGERPRINT_FILE}): "
                "the weights beside it were trained on that one's ids; put that tokenizer back (or delete "
                f"{FINGERPRINT_FILE} if this one really has the same ids)"
            )

    def __repr__(self) -> str:
        return (
            f"Tokenizer({str(self.checkpoint_dir)!r}, backend={self.backend}, vocab_size={self.vocab_size}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id})"
        )

    def _resolve_bos_eos(self) -> tuple[int | None, int | None, bool]:
        """BOS/EOS from the Hugging Face config files, else the special-token table, else sentencepiece's ids."""
        configs = {n: self._config_file(n) for n in CONFIG_FILES if n in self._files}
        ids: dict[str, int | None] = {"bos": None, "eos": None}
        for which in ids:
            for name in ("tokenizer_config.json", "special_tokens_map.json"):
                token = configs.get(name, {}).get(f"{which}_token")
                if isinstance(token, dict):  # serialised AddedToken: {"content": "<s>", ...}
                    token = token.get("content")
                if isinstance(token, str):
                    ids[which] = self.token_to_id(token)
                    if ids[which] is None:
                        raise ValueError(
                            f"{name} in {str(self.checkpoint_dir)!r} names {which}_token {token!r}, "
                            f"which is not in the tokenizer's vocabulary"
                        )
                    break
            if ids[which] is None:
                token_id = configs.get("generation_config.json", {}).get(f"{which}_token_id")
                if isinstance(token_id, list):  # several stop ids: the first is the canonical one
                    token_id = token_id[0] if token_id else None
                ids[which] = token_id
            if ids[which] is None and "<|endoftext|>" in self.special_tokens:
                ids[which] = self.special_tokens["<|endoftext|>"]
            if ids[which] is None and self._sp is not None:
                sp_id = self._sp.bos_id() if which == "bos" else self._sp.eos_id()
                ids[which] = sp_id if sp_id >= 0 else None
        add_bos = configs.get("tokenizer_config.json", {}).get("add_bos_token")
        use_bos = bool(add_bos) if add_bos is not None else (self._sp is not None and ids["bos"] is not None)
        return ids["bos"], ids["eos"], use_bos

    def _config_file(self, name: str) -> dict[str, Any]:
        try:
            value = json.loads(self._files[name])
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise ValueError(
                f"{self.checkpoint_dir / name} is not valid JSON ({e}): it is truncated or corrupt"
            ) from None
        if not isinstance(value, dict):
            raise ValueError(f"{self.checkpoint_dir / name} does not hold a JSON object")
        return value

    # ------------------------------------------------------------------ training
    @classmethod
    def train(cls, files: Sequence[Path], vocab_size: int, out_dir: Path | str) -> Tokenizer:
        """Train a byte-level BPE on the text of `files` and write it to `out_dir/tokenizer.json`.

        Byte-level: every UTF-8 string is representable, so nothing maps to an unknown token and decoding is
        exact. The special-token table comes first (ids 0..len(SPECIAL_TOKENS)-1), then the 256 byte symbols.
        """
        min_size = len(SPECIAL_TOKENS) + 256
        if vocab_size < min_size:
            raise ValueError(
                f"vocab_size={vocab_size} is too small for a byte-level BPE: it needs at least {min_size} "
                f"({len(SPECIAL_TOKENS)} special tokens + 256 bytes)"
            )
        files = [Path(f) for f in files]
        if not files:
            raise ValueError("Tokenizer.train needs at least one text file")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        # Stream one file at a time: the corpus is never held in memory as a whole.
        texts = (text for f in files if (text := read_text(f)) is not None)
        tok.train_from_iterator(texts, trainer, length=len(files))

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(out_dir / "tokenizer.json", lambda tmp: tok.save(str(tmp)))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",  # so transformers' AutoTokenizer can load it too
            "bos_token": "<|endoftext|>",
            "eos_token": "<|endoftext|>",
            "pad_token": "<|pad|>",
            "add_bos_token": False,
            "litattn_tokenizer_format": TOKENIZER_FORMAT_VERSION,
        }
        atomic_write(out_dir / "tokenizer_config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2)))
        return cls(out_dir)


def train_or_load_tokenizer(files: Sequence[Path], vocab_size: int, cache_dir: Path | str) -> Tokenizer:
    """Train a tokenizer on `files`, or reuse the one trained on exactly these files before.

    The cache key covers each file's path, size and mtime, the vocabulary size and the format version, so an
    edited file or a new litattn tokenizer format trains afresh. Training happens in a temp folder that is
    renamed into place, so a crash or a concurrent run never leaves a half-written tokenizer behind.
    """
    files = sorted(Path(f).resolve() for f in files)
    if not files:
        raise ValueError("No files to train a tokenizer on")
    cache_dir = Path(cache_dir)
    stats = [(str(f), (s := f.stat()).st_size, s.st_mtime_ns) for f in files]
    key = content_key([stats, vocab_size, TOKENIZER_FORMAT_VERSION])
    final = cache_dir / f"tokenizer-{key}"
    remove_stale_temps(cache_dir)  # left by runs killed mid-write
    if (final / "tokenizer.json").is_file():
        print(f"Reusing tokenizer {final}")
        return Tokenizer(final)

    size_mb = sum(s[1] for s in stats) / 1e6
    print(f"Training a {vocab_size}-token byte-level BPE tokenizer on {len(files)} files ({size_mb:.1f} MB) -> {final}")
    tmp = make_temp_dir(cache_dir, f"tokenizer-{key}")
    try:
        Tokenizer.train(files, vocab_size, tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "tokenizer.json").is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Tokenizer(final)


def read_text(path: Path) -> str | None:
    """The UTF-8 text of `path`, or None with a warning naming the file if it cannot be read or decoded.

    Shared by tokenizer training and data preparation so a bad file is skipped the same way (and warned about
    from one place) in both, never silently.
    """
    try:
        return Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        reason = f"not valid UTF-8 ({e.reason} at byte {e.start})"
    except OSError as e:
        reason = f"unreadable ({e.strerror or e})"
    warnings.warn(f"Skipping {path}: {reason}", stacklevel=1)  # one location: the warning registry dedups
    return None


@contextmanager
def _hf_parallelism(enabled: bool) -> Iterator[None]:
    """Allow or forbid the `tokenizers` thread pool for one call; the library reads this variable per call."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if enabled else "false"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


__all__ = ["FINGERPRINT_FILE", "N_SET", "SPECIAL_TOKENS", "Tokenizer", "read_text", "train_or_load_tokenizer"]
