"""`InjectTokens`: Disrupt and SET tokens inserted into another data module's items as they are read.

Disrupt/SET attention (litattn/tokens.py, litattn/attention/disrupt_set.py) needs data that holds its tokens:
a `<|disrupt|>` where a new segment should start (document starts, paragraphs, every N tokens, at random) and
`<|set_i|>` tokens after sentences or paragraphs. `InjectTokens` wraps any data module whose items are
{"input_ids", "labels"} of shape (seq_len,) with labels the inputs shifted by one (-100 where there is no
target): pretraining windows (TextFiles, StdlibCorpus, PasskeyMix) and instruction data (AlpacaJSON, PyDocQA).

    data:
      class_path: litattn.data.InjectTokens
      init_args:
        data: {class_path: litattn.data.StdlibCorpus}
        disrupt: {every: document, every_n_tokens: 128}
        set: {after: sentence, kind: entity, pool: 4, probability: 0.5}

Where tokens go (a "gap" j is the place before the item's j-th token; several rules may name one gap, which
then gets one SET token and one Disrupt token, in that order: the SET token closes what precedes, the Disrupt
token opens what follows):

    Disrupt  every: document      right after each `<|endoftext|>` (EOS: the start of the next document)
             every: paragraph     document starts, and before the first token with visible text after a
                                  blank line (two or more newlines with only whitespace between: "\\n\\n" may
                                  be one token or several, e.g. "\\n", "    ", "\\n")
             every: sentence      the item's start, document starts, and the gap after each sentence end
                                  (SET's `after: sentence` rule below): each sentence its own segment
             window_start: true   at the start of every item
             every_n_tokens: N    before every N-th token of the item (N, 2N, ...)
             probability: p       before each token (but the first) independently with probability p
    SET      after: sentence      after a token whose text ends in . ! or ? (closing quotes and brackets
                                  allowed after it) when whitespace follows: in the token itself or at the
                                  start of the next one ("end." " The" yes; "os.path", "1.5" no)
             after: paragraph     after the last visible token before a blank line or an EOS
             probability: p       each such place gets one with probability p; the id is drawn uniformly
                                  from the first `pool` ids of its kind (entity: set_0.., topic: set_8..)
             kind: auto           per place, an entity SET where the text after it begins an entity, a
                                  topic SET otherwise (the rule: litattn/data/entities.py)

Lengths stay: an item keeps its shape (seq_len,). The tokens are inserted into the item's token sequence
(inputs plus the last label), then:

- a pretraining window (every label a target) drops its last tokens to make room: they are not seen in this
  epoch (with r inserted tokens per real token, a share r / (1 + r) of each window, at its end);
- an item with masked labels (instruction data: the prompt and the padding are -100) never loses a real token:
  the inserted tokens take its padding, and those that do not fit are left out, the last ones first (a full
  example, cut to seq_len + 1 tokens, gets none). Prompt and response stay whole and aligned with their labels.

Labels: a position whose target is an inserted token has label -100 unless `predict_injected` (then inserted
tokens inside a prompt stay -100 like the prompt); an inserted token as input predicts the token after it
(the real one that follows; -100 for the SET token of a SET + Disrupt pair).

Items gain `segment_ids` (seq_len,) int64 = `litattn.tokens.segment_ids(input_ids, disrupt_id)`, the attention
metadata Disrupt/SET attention reads (`collate` trims it with the labels).

Which tokens go where is a pure function of (seed, epoch, item index): every rank and a resumed run see the
same items. The training loop calls the training dataset's `set_epoch(epoch)` before each step, so random
placements and SET ids are drawn afresh each epoch; validation items are injected as at epoch 0 in every
epoch, so the validation loss compares across epochs.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from litattn import tokens as tk
from litattn.args import check_choice, check_range, check_seed
from litattn.attention.disrupt_set import SEGMENT_IDS
from litattn.data.base import DataModule, EpochDataset, RunSeeded, has_prompts
from litattn.data.entities import SENTENCE_END, proper_names, starts_entity
from litattn.data.wrapping import wrapped_data
from litattn.set_tokens import SETRedraw
from litattn.tokenizer import Tokenizer
from litattn.tokens import SetKind

if TYPE_CHECKING:
    from litattn.hooks import TrainingHook

IGNORE_INDEX = -100
"""The label of a position without a target."""

DisruptEvery = Literal["document", "paragraph", "sentence"]
SetAfter = Literal["sentence", "paragraph"]
SetKindChoice = Literal["entity", "topic", "auto"]


@dataclass
class DisruptPlacement:
    """Where Disrupt tokens go; the rules add up (a gap gets one Disrupt token however many rules name it)."""

    every: DisruptEvery | None = "document"
    """"document": right after each end-of-text token; "paragraph": document starts and the first visible token
    after each blank line; "sentence": the item's start, document starts and the token after each sentence end
    (SET's `after: sentence` rule), so each sentence is a segment, as the seed's samples are; null: none of
    these."""
    window_start: bool = False
    """Also one at the start of every item (a pretraining window usually starts inside a document)."""
    every_n_tokens: int | None = None
    """Also one before every N-th token of the item (N >= 1; null: none)."""
    probability: float = 0.0
    """Also one before each token (but the first) with this probability, in [0, 1]."""

    def __post_init__(self) -> None:
        check_choice("disrupt.every", self.every, DisruptEvery, null=True)
        _check_bool("disrupt.window_start", self.window_start)
        if isinstance(self.every_n_tokens, bool) or not isinstance(self.every_n_tokens, (int, type(None))):
            raise ValueError(
                f"disrupt.every_n_tokens must be an integer >= 1 (or null for none), got {self.every_n_tokens!r}"
            )
        check_range("disrupt.every_n_tokens", self.every_n_tokens, ge=1, null="none")
        check_range("disrupt.probability", self.probability, ge=0, le=1)
        if self.every is None and not self.window_start and self.every_n_tokens is None and self.probability == 0:
            raise ValueError(
                "disrupt places no token: set every (document, paragraph or sentence), window_start, every_n_tokens or "
                "probability, or leave disrupt out"
            )

    def describe(self) -> str:
        rules = []
        if self.every == "document":
            rules.append("at document starts")
        elif self.every == "paragraph":
            rules.append("at document and paragraph starts")
        elif self.every == "sentence":
            rules.append("at item, document and sentence starts")
        if self.window_start:
            rules.append("at item starts")
        if self.every_n_tokens is not None:
            rules.append(f"every {self.every_n_tokens} tokens")
        if self.probability:
            rules.append(f"before each token with probability {self.probability:g}")
        return ", ".join(rules)


@dataclass
class SETPlacement:
    """Where SET tokens go and which ones."""

    after: SetAfter = "sentence"
    """"sentence": after each sentence end (. ! or ? followed by whitespace); "paragraph": after the last visible
    token of each paragraph (before a blank line or an end-of-text token)."""
    kind: SetKindChoice = "entity"
    """"entity" draws from set_0..set_7, "topic" from set_8..set_15; "auto" chooses per insertion by what
    follows: an entity token where the next text begins an entity (litattn/data/entities.py), a topic token
    otherwise."""
    pool: int = tk.POOL_SIZE
    """How many of the kind's reserved tokens are drawn from (the first `pool` of them), 1 to 8."""
    probability: float = 1.0
    """Share of the sentence or paragraph ends that get a SET token, in (0, 1]."""
    redraw: Literal["epoch"] | int | None = "epoch"
    """Re-draw the pool's embedding rows (litattn/set_tokens.py): "epoch" at every epoch start, N every N
    optimizer steps, null never (a control: SET tokens that are ordinary learned tokens)."""
    freeze: bool = False
    """Keep the pool's rows out of training: they hold their drawn values between re-draws."""

    def __post_init__(self) -> None:
        check_choice("set.after", self.after, SetAfter)
        check_choice("set.kind", self.kind, SetKindChoice)
        if self.redraw != "epoch" and self.redraw is not None:
            if isinstance(self.redraw, bool) or not isinstance(self.redraw, int):
                raise ValueError(f"set.redraw must be 'epoch', a number of steps or null, got {self.redraw!r}")
            check_range("set.redraw", self.redraw, ge=1)
        _check_bool("set.freeze", self.freeze)
        if isinstance(self.pool, bool) or not isinstance(self.pool, int):
            raise ValueError(f"set.pool must be an integer in [1, {tk.POOL_SIZE}], got {self.pool!r}")
        check_range("set.pool", self.pool, ge=1, le=tk.POOL_SIZE)
        check_range("set.probability", self.probability, gt=0, le=1)

    def kinds(self) -> list[SetKind]:
        """The SET kinds inserted: both with "auto"."""
        return ["entity", "topic"] if self.kind == "auto" else [self.kind]

    def describe(self) -> str:
        share = "" if self.probability == 1 else f"{self.probability:.0%} of "
        ranges = [(tk.pool(k)[0], tk.pool(k)[self.pool - 1]) for k in self.kinds()]
        ids = " or ".join(f"<|set_{a}|>" if a == b else f"<|set_{a}|>..<|set_{b}|>" for a, b in ranges)
        kind = "entity or topic (by what follows)" if self.kind == "auto" else self.kind
        redraw = {"epoch": "re-drawn every epoch", None: "never re-drawn"}.get(
            self.redraw, f"re-drawn every {self.redraw} steps"
        )
        return f"{kind} SET tokens ({ids}) after {share}{self.after}s, {redraw}{', frozen' if self.freeze else ''}"


@dataclass
class InjectTokens(RunSeeded, DataModule):
    """Another data module's items with Disrupt and SET tokens inserted (see the module docstring for where),
    drawn afresh each epoch; lengths and label alignment kept; items gain `segment_ids`."""

    data: DataModule | None = None
    """The data module whose items get the tokens (in YAML a nested `class_path`/`init_args`): pretraining
    windows (StdlibCorpus, TextFiles, PasskeyMix) or instruction data (AlpacaJSON, PyDocQA); None: StdlibCorpus.
    (Not a default instance: jsonargparse would read its private attributes as arguments.)"""
    disrupt: DisruptPlacement | None = None
    """Where Disrupt tokens go (every, window_start, every_n_tokens, probability); null: none inserted."""
    set: SETPlacement | None = None
    """Where SET tokens go and which (after, kind, pool, probability); null: none inserted."""
    predict_injected: bool = False
    """Whether inserted tokens are prediction targets; by default the positions that would predict them have
    label -100 (an inserted token as input still predicts the real token after it)."""
    segment_ids: bool = True
    """Add `segment_ids` (seq_len,) int64 to every item: the attention metadata Disrupt/SET attention reads.
    False leaves them out (a mechanism that reads no metadata refuses batches that carry it)."""
    seed: int | None = None
    """Seed of the random placements and of the SET ids drawn (items depend on (seed, epoch, index) alone);
    null: the run's seed (so an ablation's seeds vary the data too), a number: the same draws for every run
    seed."""

    def __post_init__(self) -> None:
        self.data = wrapped_data(self.data, "data", "StdlibCorpus, TextFiles, AlpacaJSON", InjectTokens)
        self.disrupt = _placement(DisruptPlacement, self.disrupt, "disrupt")
        self.set = _placement(SETPlacement, self.set, "set")
        if self.disrupt is None and self.set is None:
            raise ValueError("InjectTokens inserts nothing: give disrupt (e.g. {every: document}) and/or set")
        _check_bool("predict_injected", self.predict_injected)
        _check_bool("segment_ids", self.segment_ids)
        if self.seed is not None:
            check_seed("seed", self.seed)
        self._injector: Injector | None = None

    def seed_from_run(self, seed: int) -> None:
        super().seed_from_run(seed)
        self.data.seed_from_run(seed)

    def setup(self, tokenizer: Tokenizer | None, vocab_size: int, seq_len: int, cache_dir: Path) -> Tokenizer:
        tokenizer = self.data.setup(tokenizer, vocab_size, seq_len, cache_dir)
        self._injector = Injector(tokenizer, self.disrupt, self.set, self.predict_injected, self.segment_ids)
        return tokenizer

    def train_dataset(self) -> InjectedDataset:
        return InjectedDataset(self.data.train_dataset(), self._require_setup(), self.draw_seed, "train")

    def val_dataset(self) -> InjectedDataset:
        """Injected like the training items but always as at epoch 0, so the validation loss of different
        epochs is measured on the same items."""
        return InjectedDataset(self.data.val_dataset(), self._require_setup(), self.draw_seed, "val", fixed_epoch=True)

    def describe(self) -> str:
        parts = []
        if self.disrupt is not None:
            parts.append(f"Disrupt tokens {self.disrupt.describe()}")
        if self.set is not None:
            parts.append(self.set.describe())
        line = (
            f"token injection: {'; '.join(parts)}; drawn from ({self.seed_note()}, epoch, item), validation as at "
            f"epoch 0; inserted tokens {'are' if self.predict_injected else 'are not'} targets; "
            + ("items carry segment_ids" if self.segment_ids else "no segment_ids")
        )
        if self.set is not None and self.set.kind == "auto" and self._injector is not None:
            line += "\n" + self.kind_shares()
        return f"{self.data.describe()}\n{line}"

    def kind_shares(self, items: int = 64) -> str:
        """Each SET kind's share of the tokens inserted into the first `items` training items (epoch 0): what
        `kind: auto` chose, for the run's log."""
        dataset = self.train_dataset()
        kinds = self._require_setup().kind_ids
        counts = dict.fromkeys(kinds, 0)
        n = min(items, len(dataset))
        for i in range(n):
            ids = dataset[i]["input_ids"].numpy()
            for kind, pool in kinds.items():
                counts[kind] += int(np.isin(ids, pool).sum())
        total = sum(counts.values())
        if not total:
            return f"SET kinds in the first {n} training items: none inserted"
        shares = ", ".join(f"{kind} {count / total:.0%} ({count})" for kind, count in counts.items())
        return f"SET kinds in the first {n} training items: {shares}"

    def training_hooks(self) -> list[TrainingHook]:
        """The wrapped module's hooks, and the re-draw of the SET pool's rows (`set.redraw`)."""
        hooks = self.data.training_hooks()
        if self.set is not None and (self.set.redraw is not None or self.set.freeze):
            ids = self._require_setup().set_ids.tolist()
            every = None if self.set.redraw in ("epoch", None) else self.set.redraw
            hooks.append(SETRedraw(ids, every_steps=every, freeze=self.set.freeze, redraw=self.set.redraw is not None))
        return hooks

    def _require_setup(self) -> Injector:
        if self._injector is None:
            raise RuntimeError("InjectTokens.setup(...) must be called before asking for a dataset")
        return self._injector


class InjectedDataset(EpochDataset):
    """A dataset's items with tokens inserted by an `Injector`; item i depends on (seed, split, epoch, i) alone
    (validation: `fixed_epoch=True`, always as at epoch 0)."""

    salt = "litattn.inject"

    def __init__(
        self, dataset: Dataset, injector: Injector, seed: int, split: str, epoch: int = 0, fixed_epoch: bool = False
    ) -> None:
        super().__init__(dataset, seed, split, epoch, fixed_epoch)
        self.injector = injector

    def draw(self, item: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
        return self.injector(item, self.generator(i))

    @property
    def prompt_ids(self):
        """`prompt_ids(i)`: item i's prompt as trained on (inserted tokens included), for datasets whose items
        have a prompt (instruction data; the training loop's sample). Absent (AttributeError) otherwise."""
        if not has_prompts(self.dataset):
            raise AttributeError(f"{type(self.dataset).__name__} items have no prompt")
        return self._prompt_ids

    def _prompt_ids(self, i: int) -> list[int]:
        item = self[i]
        targets = (item["labels"] != IGNORE_INDEX).nonzero()
        end = int(targets[0]) + 1 if len(targets) else len(item["input_ids"])
        return item["input_ids"][:end].tolist()

    def __repr__(self) -> str:
        return f"InjectedDataset({self.dataset!r}, seed={self.seed}, split={self.split}, epoch={self.epoch})"


class Injector:
    """Inserts Disrupt and SET tokens into one item; knows the tokenizer's ids and the text of every token.

    The text classes of the vocabulary (which tokens hold newlines, visible text, a sentence end) are computed
    once here by decoding each id (a second or so for a 128k vocabulary).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        disrupt: DisruptPlacement | None,
        set: SETPlacement | None,
        predict_injected: bool = False,
        segment_ids: bool = True,
    ) -> None:
        self.disrupt, self.set = disrupt, set
        self.predict_injected, self.with_segment_ids = predict_injected, segment_ids
        self.disrupt_id = tk.disrupt_id(tokenizer) if disrupt is not None or segment_ids else None
        self.kind_ids: dict[SetKind, np.ndarray] = {}
        if set is not None:
            self.kind_ids = {k: np.array(tk.set_ids(tokenizer, k)[: set.pool]) for k in set.kinds()}
        self.set_ids = np.concatenate(list(self.kind_ids.values())) if set is not None else None
        """Every SET id this injector may insert (those SET re-draws re-draw)."""
        self.eos_id = tokenizer.eos_id
        if disrupt is not None and disrupt.every is not None and self.eos_id is None:
            raise ValueError(
                f"disrupt.every={disrupt.every!r} finds documents by their EOS token; {tokenizer!r} has none"
            )
        self.classes = TokenClasses.of(tokenizer)

    # ------------------------------------------------------------------ where
    def gaps(self, s: np.ndarray, generator: torch.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(Disrupt gaps, SET gaps, SET ids) for the token sequence `s` (L + 1 tokens): gap j is the place before
        s[j], j in 0..L; the arrays are sorted, one entry per gap."""
        L = len(s) - 1
        c = self.classes
        ids = np.where((s >= 0) & (s < c.n), s, c.n)  # an id the tokenizer lacks: the last entry, of no class
        visible, lead, trail = c.visible[ids], c.lead_nl[ids], c.trail_nl[ids]
        is_eos = s == self.eos_id if self.eos_id is not None else np.zeros(len(s), dtype=bool)
        # Visible tokens and what lies between consecutive ones: newlines (whitespace-only tokens) and EOS
        v = np.flatnonzero(visible)
        ws_nl = np.concatenate([[0], np.cumsum(np.where(visible, 0, lead))])  # newlines in tokens [0, i)
        eos_n = np.concatenate([[0], np.cumsum(is_eos)])
        if len(v):
            prev = np.concatenate([[-1], v[:-1]])
            after_prev = prev + 1
            newlines = np.where(prev >= 0, trail[np.maximum(prev, 0)], 0) + ws_nl[v] - ws_nl[after_prev] + lead[v]
            eos_between = eos_n[v] - eos_n[after_prev] > 0
        else:
            prev = newlines = eos_between = np.zeros(0, dtype=np.int64)
        blank = newlines >= 2

        disrupt = np.zeros(L + 1, dtype=bool)
        if (d := self.disrupt) is not None:
            if d.every is not None:
                disrupt[1:] |= is_eos[:-1]
            if d.every == "paragraph":
                starts = v[blank & ~eos_between.astype(bool) & (v >= 1)]
                disrupt[starts] = True
            if d.every == "sentence":
                disrupt[0] = True
                disrupt[self._sentence_ends(ids, is_eos)] = True
            if d.window_start:
                disrupt[0] = True
            if d.every_n_tokens is not None:
                disrupt[d.every_n_tokens :: d.every_n_tokens] = True
            if d.probability > 0:
                disrupt[1:] |= (torch.rand(L, generator=generator) < d.probability).numpy()

        set_gaps = np.zeros(0, dtype=np.int64)
        set_tokens = np.zeros(0, dtype=np.int64)
        if (st := self.set) is not None:
            if st.after == "sentence":
                set_gaps = self._sentence_ends(ids, is_eos)
            else:
                ends = (blank | eos_between.astype(bool)) & (prev >= 0)
                set_gaps = prev[ends] + 1
                # the last paragraph of a document also ends at its EOS when no visible token follows in the item
                if len(v) and eos_n[-1] - eos_n[v[-1] + 1] > 0:
                    set_gaps = np.append(set_gaps, v[-1] + 1)
            set_gaps = np.unique(set_gaps[set_gaps <= L])
            if st.probability < 1:
                set_gaps = set_gaps[(torch.rand(len(set_gaps), generator=generator) < st.probability).numpy()]
            drawn = torch.randint(st.pool, (len(set_gaps),), generator=generator).numpy()
            if st.kind == "auto":
                entity = self.entity_gaps(s, set_gaps)
                set_tokens = np.where(entity, self.kind_ids["entity"][drawn], self.kind_ids["topic"][drawn])
            else:
                set_tokens = self.kind_ids[st.kind][drawn]
        return np.flatnonzero(disrupt), set_gaps, set_tokens

    def _sentence_ends(self, ids: np.ndarray, is_eos: np.ndarray) -> np.ndarray:
        """The gaps right after a sentence end: a token whose text ends in . ! or ? (then closing quotes or
        brackets, also in tokens of their own) with whitespace or an end-of-text token after it."""
        c = self.classes
        punct = c.ends_sentence[ids]
        for _ in range(2):  # closing quotes or brackets in tokens of their own: `.` `)` or `.` `)` `"`
            punct[1:] |= c.closing[ids[1:]] & punct[:-1]
        end = punct[:-1] & (c.trail_ws[ids[:-1]] | c.lead_ws[ids[1:]] | is_eos[1:])
        return np.flatnonzero(end) + 1

    def entity_gaps(self, s: np.ndarray, gaps: np.ndarray) -> np.ndarray:
        """For each gap, whether the text after it begins an entity (litattn/data/entities.py), read from the
        item's text; an end-of-text token reads as a blank line."""
        texts = self.classes.texts
        n = self.classes.n
        pieces = [texts[i] if 0 <= i < n else "" for i in s.tolist()]
        if self.eos_id is not None:
            pieces = ["\n\n" if i == self.eos_id else p for i, p in zip(s.tolist(), pieces, strict=True)]
        starts = np.concatenate([[0], np.cumsum([len(p) for p in pieces])])
        text = "".join(pieces)
        names = proper_names(text)
        return np.array([starts_entity(text, int(starts[g]), names) for g in gaps], dtype=bool)

    # ------------------------------------------------------------------ insert
    def __call__(self, item: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        other = sorted(set(item) - {"input_ids", "labels"})
        if other:
            raise ValueError(
                f"InjectTokens cannot keep item keys {other} aligned with inserted tokens; it takes items of "
                f"input_ids and labels only"
            )
        x = item["input_ids"]
        y = item["labels"]
        if x.ndim != 1 or x.shape != y.shape:
            raise ValueError(f"items must hold input_ids and labels of one shape (seq_len,), got {tuple(x.shape)}")
        T = len(x)
        xn, yn = x.numpy(), y.numpy()
        targets = yn != IGNORE_INDEX
        last = np.flatnonzero(targets)
        if not len(last):
            return self._finish(x.clone(), y.clone())
        L = int(last[-1]) + 1  # real tokens: s[0..L] (inputs up to L - 1, then the last target)
        s = np.empty(L + 1, dtype=np.int64)
        s[:L] = xn[:L]
        s[L] = yn[L - 1]
        inner = targets[: L - 1]
        if not np.array_equal(yn[: L - 1][inner], xn[1:L][inner]):
            raise ValueError(
                "InjectTokens needs items whose labels are the inputs shifted by one (or -100); this item's are not"
            )
        is_target = np.zeros(L + 1, dtype=bool)  # is_target[j]: s[j] is a prediction target
        is_target[1:] = targets[:L]
        is_target[0] = is_target[1]  # the first token: predicted once a token inserted before it, as its neighbour
        keep_real = not targets.all()  # masked labels (instruction data): never drop a real token

        d_gaps, s_gaps, s_tokens = self.gaps(s, generator)
        n_set = np.zeros(L + 1, dtype=np.int64)
        n_set[s_gaps] = 1
        n_dis = np.zeros(L + 1, dtype=np.int64)
        n_dis[d_gaps] = 1
        n_ins = n_set + n_dis
        if keep_real and n_ins.sum() > T - L:  # the padding holds T - L more tokens: keep the first inserted ones
            room = T - L
            order = np.repeat(np.arange(L + 1), n_ins)  # the gap of each inserted token, in sequence order
            cut = order[room] if room < len(order) else L + 1
            # gaps before `cut` keep theirs, gap `cut` keeps what fits, later gaps none
            n_keep_at_cut = room - int(n_ins[:cut].sum())
            n_set[cut + 1 :] = 0
            n_dis[cut + 1 :] = 0
            if cut <= L:
                n_set[cut] = min(n_set[cut], n_keep_at_cut)
                n_dis[cut] = min(n_dis[cut], n_keep_at_cut - n_set[cut])
            n_ins = n_set + n_dis
            s_tokens = s_tokens[n_set[s_gaps] > 0]
            s_gaps = s_gaps[n_set[s_gaps] > 0]
            d_gaps = np.flatnonzero(n_dis)
        pos = np.arange(L + 1) + np.cumsum(n_ins)  # where s[j] lands
        out = np.empty(L + 1 + int(n_ins.sum()), dtype=np.int64)
        out_target = np.zeros(len(out), dtype=bool)
        out[pos] = s
        out_target[pos] = is_target
        injected_target = self.predict_injected
        out[pos[s_gaps] - n_ins[s_gaps]] = s_tokens  # SET first, then Disrupt, before s[j]
        out_target[pos[s_gaps] - n_ins[s_gaps]] = injected_target & is_target[s_gaps]
        out[pos[d_gaps] - 1] = self.disrupt_id
        out_target[pos[d_gaps] - 1] = injected_target & is_target[d_gaps]
        out, out_target = out[: T + 1], out_target[: T + 1]  # a full window drops its tail

        n = len(out) - 1  # positions with an input and a label
        input_ids = torch.full((T,), int(xn[-1]) if L < T else 0, dtype=x.dtype)  # padding as the item's
        labels = torch.full((T,), IGNORE_INDEX, dtype=y.dtype)
        input_ids[:n] = torch.from_numpy(out[:-1])
        labels[:n] = torch.from_numpy(np.where(out_target[1:], out[1:], IGNORE_INDEX))
        return self._finish(input_ids, labels)

    def _finish(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        item = {"input_ids": input_ids, "labels": labels}
        if self.with_segment_ids:
            item[SEGMENT_IDS] = tk.segment_ids(input_ids, self.disrupt_id)  # (seq_len,)
        return item


@dataclass(frozen=True)
class TokenClasses:
    """Per token id, what its text holds (the arrays are indexed by id, with one more entry of no class for ids
    beyond the tokenizer's); litattn's reserved special tokens are none of these (neither text nor whitespace)."""

    visible: np.ndarray
    """Holds a character other than whitespace."""
    lead_nl: np.ndarray
    """Newlines before the first visible character (all of them for a whitespace-only token)."""
    trail_nl: np.ndarray
    """Newlines after the last visible character (0 for a whitespace-only token)."""
    lead_ws: np.ndarray
    """Starts with whitespace."""
    trail_ws: np.ndarray
    """Ends with whitespace."""
    ends_sentence: np.ndarray
    """Its text without trailing whitespace ends in . ! or ? (then possibly closing quotes or brackets)."""
    closing: np.ndarray
    """Its text without surrounding whitespace is closing quotes or brackets only (`)`, `"`, `']`)."""
    texts: tuple[str, ...] = ()
    """The text each id adds to a decoded sequence ("" for litattn's reserved tokens)."""

    @property
    def n(self) -> int:
        """The tokenizer's vocabulary size (the arrays hold one more entry)."""
        return len(self.visible) - 1

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> TokenClasses:
        texts = [*_token_texts(tokenizer), ""]
        special = set(tokenizer.special_tokens.values())
        n = len(texts)
        visible = np.zeros(n, dtype=bool)
        lead_nl = np.zeros(n, dtype=np.int64)
        trail_nl = np.zeros(n, dtype=np.int64)
        lead_ws = np.zeros(n, dtype=bool)
        trail_ws = np.zeros(n, dtype=bool)
        ends_sentence = np.zeros(n, dtype=bool)
        closing = np.zeros(n, dtype=bool)
        for i, text in enumerate(texts):
            if i in special or not text:
                continue
            body = text.strip()
            visible[i] = bool(body)
            lead_ws[i] = text[0].isspace()
            trail_ws[i] = text[-1].isspace()
            if body:
                lead_nl[i] = text[: len(text) - len(text.lstrip())].count("\n")
                trail_nl[i] = text[len(text.rstrip()) :].count("\n")
                ends_sentence[i] = SENTENCE_END.search(body) is not None
                closing[i] = _CLOSING.fullmatch(body) is not None
            else:
                lead_nl[i] = text.count("\n")
        plain = tuple("" if i in special else text for i, text in enumerate(texts[:-1]))
        return cls(visible, lead_nl, trail_nl, lead_ws, trail_ws, ends_sentence, closing, plain)


_CLOSING = re.compile(r"[\"')\]]+")


def _token_texts(tokenizer: Tokenizer) -> list[str]:
    """The text each id adds to a decoded sequence: decode([anchor, id]) minus the anchor's text, so a
    sentencepiece "▁The" keeps its leading space (decoded alone, the space is dropped)."""
    anchor = tokenizer.encode("a")
    prefix = tokenizer.decode(anchor) if anchor else ""
    texts = []
    for i in range(tokenizer.vocab_size):
        both = tokenizer.decode([*anchor, i])
        texts.append(both[len(prefix) :] if both.startswith(prefix) else tokenizer.decode([i]))
    return texts


# ---------------------------------------------------------------------------------- config checks
def _placement(cls, value: Any, name: str):
    """A placement from a dataclass instance, a dict (from Python) or None; an unknown key is a one-line error."""
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a mapping of options or null, got {value!r}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in value if k not in known]
    if unknown:
        raise ValueError(f"{name} has no option {unknown[0]!r}; its options are {', '.join(known)}")
    return cls(**value)


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


__all__ = ["DisruptPlacement", "InjectTokens", "InjectedDataset", "Injector", "SETPlacement", "TokenClasses"]
