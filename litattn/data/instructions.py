"""Instruction data for finetuning: (instruction, input, output) examples become fixed-length padded sequences.

An example is `prompt + response + eos`, where the prompt is the instruction (and input) in `ALPACA_PROMPT`.
The loss covers the response and the eos only, so the model learns to answer, not to write instructions:

    tokens     p0 p1 p2 r0 r1 eos                      (prompt 3 tokens, response 2 + eos; seq_len = 8)
    input_ids  p0 p1 p2 r0 r1 pad pad pad
    labels     -100 -100 r0 r1 eos -100 -100 -100      (the next token; prompt and padding masked)

Examples longer than `seq_len + 1` tokens are cut by `truncate`. The token ids of every example are cached in
`cache_dir` keyed by the examples and the tokenizer, so a second setup skips tokenization.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
from torch.utils.data import Dataset

from litattn.attention.hybrid import PREFIX_LEN
from litattn.data import prompt_truncation
from litattn.data.base import DataModule
from litattn.data.prompt_template import ALPACA_PROMPT, format_prompt
from litattn.data.prompt_truncation import SCORED
from litattn.data.text_files import held_out
from litattn.tokenizer import Tokenizer
from litattn.utils import atomic_write, content_key, remove_stale_temps

Truncation = Literal["right", "left", "attention", "attention_live", "idf", "input_right", "input_left"]
"""How an example longer than seq_len + 1 tokens is cut: "right" drops the end of the response, "left" the start
of the prompt; "attention", "attention_live" and "idf" drop the prompt input's least important tokens, by a
dictionary, by the scorer model on the prompt itself, or by idf, and "input_right" / "input_left" its end / start,
the template, instruction and response kept (litattn/data/prompt_truncation.py)."""

INSTRUCTION_FORMAT_VERSION = 1
"""Bump when tokenization of examples changes, so cached token ids are rebuilt."""

_SPLIT_NAMES = {"train": "training", "val": "validation"}

IGNORE_INDEX = -100
"""Label of a position without loss (prompt and padding): the `ignore_index` of the model's cross-entropy."""


@dataclass(frozen=True)
class Example:
    """One instruction-following example; `input` is optional context for the instruction."""

    instruction: str
    output: str
    input: str = ""

    def prompt(self) -> str:
        return format_prompt(self.instruction, self.input)


def check_truncation(strategy: str) -> None:
    """A one-line error for an unknown strategy (also where a new strategy must be added to `Truncation`)."""
    if strategy not in get_args(Truncation):
        raise ValueError(f"truncation must be one of {', '.join(get_args(Truncation))}, got {strategy!r}")


def truncate(
    prompt_ids: Sequence[int], response_ids: Sequence[int], max_len: int, strategy: Truncation = "right"
) -> tuple[Sequence[int], Sequence[int]]:
    """Cut an example to at most `max_len` tokens; returns (prompt_ids, response_ids), unchanged if it fits.

    "right" keeps the first `max_len` tokens: the end of the response goes first (its eos included), then, for a
    prompt that alone is too long, the end of the prompt. "left" keeps the last `max_len` tokens: the start of the
    prompt goes first, so the response survives whole unless it alone is longer than `max_len`.
    The inputs are sliced, so lists stay lists and arrays stay arrays.
    """
    check_truncation(strategy)
    if strategy in SCORED:
        raise ValueError(f"truncation {strategy!r} needs token scores: InstructionData.setup applies it")
    if max_len < 1:
        raise ValueError(f"max_len must be positive, got {max_len}")
    n_prompt, n_response = len(prompt_ids), len(response_ids)
    if n_prompt + n_response <= max_len:
        return prompt_ids, response_ids
    if strategy == "right":
        if n_prompt >= max_len:
            return prompt_ids[:max_len], response_ids[:0]
        return prompt_ids, response_ids[: max_len - n_prompt]
    # "left"
    if n_response >= max_len:
        return prompt_ids[:0], response_ids[n_response - max_len :]
    return prompt_ids[n_prompt - (max_len - n_response) :], response_ids


def _n_targets(n_prompt: int, n_response: int) -> int:
    """Positions with loss in an example: each response token that a previous token predicts."""
    return n_prompt + n_response - max(n_prompt, 1)


class InstructionDataset(Dataset):
    """Padded examples of `seq_len` tokens: items are {"input_ids", "labels"}, LongTensors of shape (seq_len,),
    and with `prefix` also "prefix_len", the prompt's length (a 0-dim LongTensor: batches carry (B,)).

    The token ids are stored unpadded (one flat int32 tensor plus offsets) and padded per item, so memory grows
    with the tokens of the data, not with N x seq_len.
    """

    def __init__(
        self,
        examples: Sequence[tuple[Sequence[int], Sequence[int]]],
        seq_len: int,
        pad_id: int,
        prefix: bool = False,
    ) -> None:
        """`examples`: (prompt_ids, response_ids) pairs (eos included in the response), each at most seq_len + 1.
        `prefix`: items carry `prefix_len`, the prompt's length (attention metadata: hybrid's thought prefix)."""
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.seq_len, self.pad_id, self.prefix = seq_len, pad_id, prefix
        lengths, prompt_lens, pieces = [], [], []
        for prompt, response in examples:
            n = len(prompt) + len(response)
            if n > seq_len + 1:
                raise ValueError(f"An example of {n} tokens exceeds seq_len + 1 = {seq_len + 1}; truncate it first")
            if _n_targets(len(prompt), len(response)) < 1:
                raise ValueError("An example has no response token to learn; drop it (see InstructionData.setup)")
            lengths.append(n)
            prompt_lens.append(len(prompt))
            pieces += [np.asarray(prompt, dtype=np.int64), np.asarray(response, dtype=np.int64)]
        ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
        self.ids = torch.from_numpy(ids.astype(np.int32))  # (total tokens,)
        self.offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]))  # (N + 1,)
        self.prompt_lens = torch.tensor(prompt_lens, dtype=torch.int64)  # (N,)

    def __len__(self) -> int:
        return len(self.prompt_lens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"example {i} out of range for {n} examples")
        tokens = self.ids[self.offsets[i] : self.offsets[i + 1]].long()
        k = len(tokens) - 1  # positions that predict a token
        input_ids = torch.full((self.seq_len,), self.pad_id, dtype=torch.long)
        labels = torch.full((self.seq_len,), IGNORE_INDEX, dtype=torch.long)
        input_ids[:k] = tokens[:-1]
        labels[:k] = tokens[1:]
        labels[: max(int(self.prompt_lens[i]) - 1, 0)] = IGNORE_INDEX  # positions whose target is still prompt
        if self.prefix:  # the prompt precedes every target, so collate's trimming never cuts it
            return {"input_ids": input_ids, "labels": labels, PREFIX_LEN: self.prompt_lens[i].clone()}
        return {"input_ids": input_ids, "labels": labels}

    def prompt_ids(self, i: int) -> list[int]:
        """Example i's prompt: what a model is given to answer it (the training loop's sample)."""
        start = int(self.offsets[i])
        return self.ids[start : start + int(self.prompt_lens[i])].tolist()

    @property
    def n_tokens(self) -> int:
        return len(self.ids)

    @property
    def n_loss_tokens(self) -> int:
        """Targets that count in the loss: each example's response (and eos) tokens that something predicts."""
        lengths = self.offsets[1:] - self.offsets[:-1]
        return int((lengths - self.prompt_lens.clamp(min=1)).sum())

    def __repr__(self) -> str:
        return f"InstructionDataset(len={len(self)}, seq_len={self.seq_len}, n_tokens={self.n_tokens})"


@dataclass
class SplitStats:
    """What happened to one split in `setup`, for `describe` and tests."""

    examples: int
    """Examples in the dataset (dropped ones excluded)."""
    truncated: int
    """Examples cut to seq_len + 1 tokens (dropped ones included)."""
    dropped: int
    """Examples left out because truncation left no response token to learn."""


class InstructionData(DataModule):
    """Instruction examples for finetuning: `setup` tokenizes them with the checkpoint's tokenizer, pads and masks.

    Subclasses say where the examples come from (`load_examples`) and declare, as dataclass fields, at least
    `truncation: Truncation`, `importance`, `scorer`, `protect_instruction` and `prefix: bool` (AlpacaJSON's
    docstrings describe them).
    """

    truncation: Truncation = "right"
    importance: Path | None = None
    scorer: Path | None = None
    protect_instruction: bool = True
    prefix: bool = False

    @abstractmethod
    def load_examples(self, cache_dir: Path) -> tuple[list[Example], list[Example]]:
        """(training examples, validation examples), in a fixed order."""

    @abstractmethod
    def _summary(self) -> str:
        """The first line of `describe`: where the examples came from and how validation was held out."""

    def setup(self, tokenizer: Tokenizer | None, vocab_size: int, seq_len: int, cache_dir: Path) -> Tokenizer:
        """Load, tokenize (cached), truncate and pad the examples; `vocab_size` is unused: the tokenizer is given."""
        if tokenizer is None:
            raise ValueError(
                f"{type(self).__name__} needs the tokenizer of the checkpoint being finetuned, got None; "
                f"pass the checkpoint directory (its tokenizer files), or a tokenizer directory"
            )
        if tokenizer.eos_id is None:
            raise ValueError(f"The tokenizer in {str(tokenizer.checkpoint_dir)!r} has no EOS token to end responses")
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        check_truncation(self.truncation)
        prompt_truncation.check_options(self.truncation, self.importance, self.scorer)
        cache_dir = Path(cache_dir)
        train, val = self.load_examples(cache_dir)
        tokens, self._tokens_path, self._tokens_reused = tokenize_examples(train + val, tokenizer, cache_dir)
        pad_id = tokenizer.special_tokens.get("<|pad|>", tokenizer.eos_id)
        datasets, stats = {}, {}
        if self.truncation in SCORED:
            cuts = self._scored_cuts(train + val, tokens, len(train), tokenizer, seq_len, cache_dir)
        else:
            cuts = [truncate(p, r, seq_len + 1, self.truncation) for p, r in tokens]
        for split, part, cut_part in (
            ("train", tokens[: len(train)], cuts[: len(train)]),
            ("val", tokens[len(train) :], cuts[len(train) :]),
        ):
            kept, truncated = [], 0
            for (prompt, response), cut in zip(part, cut_part, strict=True):
                truncated += len(cut[0]) + len(cut[1]) < len(prompt) + len(response)
                if _n_targets(len(cut[0]), len(cut[1])) > 0:
                    kept.append(cut)
            if not kept:
                raise ValueError(
                    f"The {_SPLIT_NAMES[split]} split of {type(self).__name__} has no example with a response token "
                    f"left after truncation to seq_len + 1 = {seq_len + 1} tokens ({len(part)} examples); raise "
                    f"seq_len, add examples or use truncation='left'"
                )
            stats[split] = SplitStats(examples=len(kept), truncated=truncated, dropped=len(part) - len(kept))
            datasets[split] = InstructionDataset(kept, seq_len, pad_id, prefix=self.prefix)
        self._datasets, self._stats, self._seq_len = datasets, stats, seq_len
        return tokenizer

    def _scored_cuts(self, examples, tokens, n_train: int, tokenizer: Tokenizer, seq_len: int, cache_dir: Path):
        """Every example cut by a scored strategy (cached, keyed by strategy, dictionary or scorer and seq_len);
        idf without a dictionary counts the first n_train examples' prompts (the training split)."""
        scorer = prompt_truncation.PromptScorer(
            self.truncation, self.importance, self.scorer, tokenizer, [p for p, _ in tokens[:n_train]]
        )
        key = prompt_truncation.cache_key(scorer, self._tokens_path, seq_len, self.protect_instruction)
        path = Path(cache_dir) / f"instructions-truncated-{key}.npz"
        cached = _load_tokens(path, len(tokens))
        if cached is not None:
            return _pairs(*cached)
        spans = prompt_truncation.protected_spans(examples, tokenizer, self.protect_instruction)
        over = [i for i, (p, r) in enumerate(tokens) if len(p) + len(r) > seq_len + 1]
        scores = dict(zip(over, scorer.scores([tokens[i][0] for i in over]), strict=True))
        cuts = [
            prompt_truncation.fit(p, r, seq_len + 1, scores.get(i), *map(int, spans[i]))
            for i, (p, r) in enumerate(tokens)
        ]
        _save_pairs(path, cuts)
        return cuts

    def train_dataset(self) -> InstructionDataset:
        return self._require_setup()["train"]

    def val_dataset(self) -> InstructionDataset:
        return self._require_setup()["val"]

    @property
    def stats(self) -> dict[str, SplitStats]:
        """Per split ("train", "val"): examples kept, truncated and dropped by the last `setup`."""
        self._require_setup()
        return self._stats

    def describe(self) -> str:
        if getattr(self, "_datasets", None) is None:
            return f"{self._summary()} (not set up yet)"
        line = ""
        for split, name in _SPLIT_NAMES.items():
            ds = self._datasets[split]
            line += f"{len(ds):,} {name} examples ({ds.n_tokens:,} tokens, {ds.n_loss_tokens:,} with loss); "
        st, sv = self._stats["train"], self._stats["val"]
        line += (
            f"{st.truncated} training and {sv.truncated} validation examples truncated to seq_len + 1 = "
            f"{self._seq_len + 1} tokens (truncation={self.truncation})"
        )
        if st.dropped or sv.dropped:
            line += f", of which {st.dropped} + {sv.dropped} dropped with no response token left"
        cache = f"token cache: {self._tokens_path} ({'reused' if self._tokens_reused else 'built'})"
        return f"{self._summary()}\n{line}\n{cache}"

    def _require_setup(self) -> dict[str, InstructionDataset]:
        if getattr(self, "_datasets", None) is None:
            raise RuntimeError(f"{type(self).__name__}.setup(...) must be called before asking for a dataset")
        return self._datasets


def tokenize_examples(
    examples: Sequence[Example], tokenizer: Tokenizer, cache_dir: Path
) -> tuple[list[tuple[np.ndarray, np.ndarray]], Path, bool]:
    """(prompt_ids, response_ids + [eos]) per example, the cache file, and whether it was reused.

    Prompt and response are encoded apart, so the boundary between them is exact in tokens. The cache file is
    keyed by the examples' text, the prompt template and the tokenizer's fingerprint.
    """
    key = content_key(
        [
            INSTRUCTION_FORMAT_VERSION,
            ALPACA_PROMPT,
            tokenizer.fingerprint(),
            tokenizer.use_bos,
            [[e.instruction, e.input, e.output] for e in examples],
        ]
    )
    path = Path(cache_dir) / f"instructions-{key}.npz"
    remove_stale_temps(path.parent)  # left by runs killed mid-write
    cached = _load_tokens(path, len(examples))
    reused = cached is not None
    if cached is None:
        prompts = tokenizer.encode_batch([e.prompt() for e in examples], bos=tokenizer.use_bos)
        responses = tokenizer.encode_batch([e.output for e in examples], eos=True)
        return _save_pairs(path, list(zip(prompts, responses, strict=True))), path, reused
    return _pairs(*cached), path, reused


def _save_pairs(path: Path, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list:
    """Write (prompt_ids, response_ids) pairs to `path` atomically; returns them as numpy arrays."""
    lengths = np.array([[len(p), len(r)] for p, r in pairs], dtype=np.int64).reshape(-1, 2)  # (N, 2), also N = 0
    ids = np.array([i for p, r in pairs for i in (*p, *r)], dtype=np.int32)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a path
            np.savez(f, ids=ids, lengths=lengths)

    atomic_write(path, write)
    return _pairs(ids, lengths)


def _pairs(ids: np.ndarray, lengths: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    out, start = [], 0
    for n_prompt, n_response in lengths.tolist():
        mid, end = start + n_prompt, start + n_prompt + n_response
        out.append((ids[start:mid], ids[mid:end]))
        start = end
    return out


def _load_tokens(path: Path, n_examples: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached (ids, lengths) in `path`, or None if missing or inconsistent."""
    try:
        with np.load(path) as f:
            ids, lengths = f["ids"], f["lengths"]
    except (OSError, ValueError, KeyError):
        return None
    if lengths.shape != (n_examples, 2) or lengths.sum() != len(ids):
        return None
    return ids, lengths


# ---------------------------------------------------------------------------------- AlpacaJSON
@dataclass
class AlpacaJSON(InstructionData):
    """Examples from a JSON list or JSONL file of {"instruction", "input" (optional), "output"} objects."""

    train_file: Path
    """JSON file (a list of objects) or JSONL file (one object per line) of training examples."""
    val_file: Path | None = None
    """Validation examples in the same format. Without it, `val_fraction` of the training examples are held out."""
    val_fraction: float = 0.05
    """Share of the examples held out for validation when there is no `val_file`, chosen by a hash of their text."""
    seed: int = 42
    """Salt of the hash that picks validation examples: change it to hold out a different set."""
    truncation: Truncation = "right"
    """How examples longer than seq_len + 1 tokens are cut: "right" drops the end of the response, "left" the
    start of the prompt (keeping the response)."""
    importance: Path | None = None
    """truncation attention: the dictionary (`litattn truncate build`); idf: one from `--method idf` (default:
    the idf of the training prompts)."""
    scorer: Path | None = None
    """truncation attention_live: the checkpoint that scores each prompt's tokens (the same tokenizer)."""
    protect_instruction: bool = True
    """Scored truncation never drops the instruction (only the input) of an example that has an input."""
    prefix: bool = False
    """Batches carry `prefix_len`, each prompt's length, for attention that reads it (hybrid: the prompt is the
    bidirectional prefix); the loss stays on the response. Other mechanisms drop it with a warning."""

    def __post_init__(self) -> None:
        self.train_file = Path(self.train_file)
        self.val_file = Path(self.val_file) if self.val_file is not None else None
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")
        check_truncation(self.truncation)
        prompt_truncation.check_options(self.truncation, self.importance, self.scorer)
        self._n_read: tuple[int, int] | None = None

    def load_examples(self, cache_dir: Path) -> tuple[list[Example], list[Example]]:
        examples = read_examples(self.train_file)
        if self.val_file is not None:
            train, val = examples, read_examples(self.val_file)
        else:
            if len(examples) < 2:
                raise ValueError(
                    f"{self.train_file} holds 1 example: too few to hold one out for validation; "
                    f"add examples or pass val_file"
                )
            texts = [f"{e.instruction}\0{e.input}\0{e.output}" for e in examples]
            is_val = held_out(texts, self.seed, self.val_fraction)
            train = [e for e, v in zip(examples, is_val, strict=True) if not v]
            val = [e for e, v in zip(examples, is_val, strict=True) if v]
        self._n_read = (len(train), len(val))
        return train, val

    def _summary(self) -> str:
        line = f"AlpacaJSON {self.train_file}"
        if self._n_read is None:
            return line
        n_train, n_val = self._n_read
        if self.val_file is not None:
            return f"{line}: {n_train:,} examples for training; validation: {n_val:,} examples from {self.val_file}"
        return (
            f"{line}: {n_train + n_val:,} examples, {n_val:,} held out for validation by a hash of their text "
            f"(val_fraction={self.val_fraction}, seed={self.seed})"
        )


def read_examples(path: Path | str) -> list[Example]:
    """The examples in a JSON list or JSONL file, with one-line errors that name the file and the fix."""
    records, _ = read_records(path)
    return [parse_example(Path(path), where, record) for where, record in records]


def read_records(path: Path | str) -> tuple[list[tuple[str, object]], bool]:
    """The raw records of a JSON list or JSONL file as (where, record) pairs, and whether it is a JSON list;
    one-line errors for a missing, non-UTF-8, invalid or empty file. `read_examples` checks each record."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Instruction file {str(path)!r} does not exist; pass a JSON list or JSONL file of "
            f'{{"instruction", "input", "output"}} objects'
        )
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a byte-order mark, if any, is not part of the JSON
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not valid UTF-8 ({e.reason} at byte {e.start}); save it as UTF-8") from None
    records: list[tuple[str, object]] = []  # (where, record)
    if text.lstrip().startswith("["):  # a JSON list
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
        records = [(f"example {i + 1}", r) for i, r in enumerate(data)]
    else:  # JSONL: one object per line, blank lines skipped
        # split at "\n" only: str.splitlines would also cut at U+2028 and friends, which JSON strings may hold
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                records.append((f"line {lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}, line {lineno}: not valid JSON ({e.msg} at column {e.colno}); a JSONL file holds one "
                    f"JSON object per line (a JSON file holds one list of objects)"
                ) from None
    if not records:
        raise ValueError(f'{path} holds no examples; add {{"instruction", "input", "output"}} objects to it')
    return records, text.lstrip().startswith("[")


def parse_example(path: Path, where: str, record: object) -> Example:
    """One record of an instruction file, checked (one-line errors naming the file and `where`), as an Example."""
    if not isinstance(record, dict):
        raise ValueError(
            f"{path}, {where}: expected an object with 'instruction' and 'output', got {type(record).__name__}"
        )
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str):
            problem = "has no" if key not in record else "has a non-string"
            raise ValueError(
                f"{path}, {where}: {problem} {key!r}; every example needs 'instruction' and 'output' strings "
                f"(and optionally 'input')"
            )
    input = record.get("input") or ""
    if not isinstance(input, str):
        raise ValueError(f"{path}, {where}: 'input' must be a string, got {type(input).__name__}")
    return Example(instruction=record["instruction"], output=record["output"], input=input)
