"""Disrupt and SET tokens: the objects a sample is written with, their ids, and the segments Disrupt tokens make.

Disrupt/SET attention (litattn/attention/disrupt_set.py) extends StreamingLLM's attention sinks (Xiao et al.,
2023): a `<|disrupt|>` token starts a new segment that attends afresh (older tokens, sinks aside, are dropped),
and `<|set_i|>` tokens, whose embeddings are re-drawn at every pass over the data, mark entities or topics.
The tokenizer reserves `<|disrupt|>` and `<|set_0|>` ... `<|set_15|>` (litattn/tokenizer.py); the first half
of the SET pool is for entities, the second for topics.

A sample is a list mixing text and token objects, so what the method's README shows works on a list (its
example calls `insert` on a str, which has no `insert`):

    sample = ["This is a sentence."]
    sample.insert(0, DisruptToken())
    sample.append(SETToken(entity=True))
    ids = encode_sample(tokenizer, sample)  # [<|disrupt|>, This, is, a, sentence, ., <|set_0|>]
    decode_sample(tokenizer, ids)           # '<|disrupt|>This is a sentence.<|set_0|>'
    split_sample(decode_sample(tokenizer, ids))
    # [DisruptToken(), "This is a sentence.", SETToken(entity=True, index=0)]

Automatic injection into training data: `litattn.data.InjectTokens`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from litattn.tokenizer import N_SET

if TYPE_CHECKING:
    import random

    from litattn.tokenizer import Tokenizer

DISRUPT = "<|disrupt|>"
"""The Disrupt token's name in the tokenizer's special-token table."""

ENTITY_SET_IDS: tuple[int, ...] = tuple(range(N_SET // 2))
"""The SET tokens of entities: the i of `<|set_i|>`, the first half of the reserved pool (set_0 .. set_7)."""
TOPIC_SET_IDS: tuple[int, ...] = tuple(range(N_SET // 2, N_SET))
"""The SET tokens of topics: the i of `<|set_i|>`, the second half of the reserved pool (set_8 .. set_15)."""
POOL_SIZE = N_SET // 2
"""SET tokens per kind."""

SetKind = Literal["entity", "topic"]


def set_name(i: int) -> str:
    """`<|set_i|>`: the name of SET token i of the whole pool (0 .. N_SET - 1)."""
    if not 0 <= i < N_SET:
        raise ValueError(f"SET token index must be in [0, {N_SET - 1}], got {i}")
    return f"<|set_{i}|>"


@dataclass(frozen=True)
class DisruptToken:
    """A `<|disrupt|>` token in a sample: the tokens from here on form a new segment (see `segment_ids`)."""

    def __str__(self) -> str:
        return DISRUPT


@dataclass(frozen=True)
class SETToken:
    """A SET token in a sample, of exactly one kind: `SETToken(entity=True)` (an entity follows) or
    `SETToken(entity=False)`, the same as `SETToken(topic=True)` (a topic follows).

    `index` picks the token within its kind's pool of `POOL_SIZE` (entity i is `<|set_i|>`, topic i is
    `<|set_{POOL_SIZE + i}|>`); None leaves the choice to `encode_sample`'s `set_index`.
    """

    entity: bool | None = None
    topic: bool | None = None
    index: int | None = None

    def __post_init__(self) -> None:
        entity, topic = self.entity, self.topic
        if entity is None and topic is not None:
            entity = not topic if isinstance(topic, bool) else topic
        if topic is None and isinstance(entity, bool):
            topic = not entity
        if not isinstance(entity, bool) or not isinstance(topic, bool) or entity == topic:
            raise ValueError(
                f"SETToken needs exactly one kind: SETToken(entity=True), SETToken(entity=False) or "
                f"SETToken(topic=True), got entity={self.entity!r}, topic={self.topic!r}"
            )
        object.__setattr__(self, "entity", entity)  # frozen: both fields hold the kind from here on
        object.__setattr__(self, "topic", topic)
        if self.index is not None and (
            isinstance(self.index, bool) or not isinstance(self.index, int) or not 0 <= self.index < POOL_SIZE
        ):
            raise ValueError(f"SETToken index must be an integer in [0, {POOL_SIZE - 1}] or None, got {self.index!r}")

    @property
    def kind(self) -> SetKind:
        return "entity" if self.entity else "topic"

    def name(self, index: int | None = None) -> str:
        """`<|set_i|>` for this token's index (or `index` where it has none)."""
        i = self.index if self.index is not None else index
        if i is None:
            raise ValueError("this SETToken has no index: pass one")
        return set_name(pool(self.kind)[i])

    def __str__(self) -> str:
        return self.name() if self.index is not None else f"<|set_{self.kind}|>"


Piece = str | DisruptToken | SETToken
"""One element of a sample: text, or a Disrupt or SET token."""


def pool(kind: SetKind) -> tuple[int, ...]:
    """The SET indices (the i of `<|set_i|>`) of one kind."""
    if kind == "entity":
        return ENTITY_SET_IDS
    if kind == "topic":
        return TOPIC_SET_IDS
    raise ValueError(f"SET kind must be 'entity' or 'topic', got {kind!r}")


# ---------------------------------------------------------------------------------- ids
def disrupt_id(tokenizer: Tokenizer) -> int:
    """The id of `<|disrupt|>`."""
    return tokenizer.special_id(DISRUPT)


def set_ids(tokenizer: Tokenizer, kind: SetKind | None = None) -> list[int]:
    """The token ids of the SET tokens of one kind, in pool order; kind None: the whole pool (set_0 .. set_15)."""
    indices = range(N_SET) if kind is None else pool(kind)
    return [tokenizer.special_id(set_name(i)) for i in indices]


# ---------------------------------------------------------------------------------- samples
def encode_sample(
    tokenizer: Tokenizer,
    sample: Piece | Sequence[Piece],
    set_index: int | random.Random | None = None,
) -> list[int]:
    """Token ids of a sample: text through `tokenizer.encode` (no BOS/EOS added), `DisruptToken` -> the
    `<|disrupt|>` id, `SETToken` -> a `<|set_i|>` id from its kind's half of the pool.

    A SET token with its own `index` gets that one. For the others `set_index` decides, deterministically:
    None cycles through the pool (the k-th such SET token of a kind in the sample gets index k mod POOL_SIZE,
    so a sample's entities are told apart); an int gives every one that index; a `random.Random` draws each
    with `randrange(POOL_SIZE)` (seed it for a reproducible draw).

    Each text piece is encoded on its own: tokens never merge across a Disrupt or SET token.
    """
    if isinstance(sample, (str, DisruptToken, SETToken)):
        sample = [sample]
    if isinstance(set_index, bool) or (isinstance(set_index, int) and not 0 <= set_index < POOL_SIZE):
        raise ValueError(f"set_index must be in [0, {POOL_SIZE - 1}], None (cycle) or a random.Random, got {set_index}")
    if not (set_index is None or isinstance(set_index, int) or hasattr(set_index, "randrange")):
        raise ValueError(f"set_index must be an int, None (cycle) or a random.Random, got {set_index!r}")
    seen = {"entity": 0, "topic": 0}
    ids: list[int] = []
    for piece in sample:
        if isinstance(piece, str):
            ids += tokenizer.encode(piece)
        elif isinstance(piece, DisruptToken):
            ids.append(disrupt_id(tokenizer))
        elif isinstance(piece, SETToken):
            if piece.index is not None:
                i = piece.index
            elif set_index is None:
                i = seen[piece.kind] % POOL_SIZE
            elif isinstance(set_index, int):
                i = set_index
            else:
                i = set_index.randrange(POOL_SIZE)
            seen[piece.kind] += 1
            ids.append(tokenizer.special_id(piece.name(i)))
        else:
            raise TypeError(
                f"A sample holds str, DisruptToken and SETToken pieces, got {type(piece).__name__}: {piece!r}"
            )
    return ids


def decode_sample(tokenizer: Tokenizer, ids) -> str:
    """Readable text of `ids` (a list of ints or a 1-D tensor): litattn's reserved tokens appear by name
    (`<|disrupt|>`, `<|set_3|>`, `<|endoftext|>`) whatever the tokenizer's backend; the text between them is
    `tokenizer.decode`'s."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        ids = [ids]
    names = {i: name for name, i in tokenizer.special_tokens.items()}
    out, run = [], []
    for i in ids:
        if i in names:
            if run:
                out.append(tokenizer.decode(run))
                run = []
            out.append(names[i])
        else:
            run.append(i)
    if run:
        out.append(tokenizer.decode(run))
    return "".join(out)


_MARKER = re.compile(r"<\|disrupt\|>|<\|set_(\d+)\|>")


def split_sample(text: str) -> list[Piece]:
    """A decoded sample back into pieces: `<|disrupt|>` -> DisruptToken(), `<|set_i|>` -> the SETToken of its
    kind with its index in the pool; other text (other special tokens included) stays text."""
    pieces: list[Piece] = []
    at = 0
    for m in _MARKER.finditer(text):
        if m.group(1) is not None and int(m.group(1)) >= N_SET:
            continue
        if m.start() > at:
            pieces.append(text[at : m.start()])
        if m.group(1) is None:
            pieces.append(DisruptToken())
        else:
            i = int(m.group(1))
            entity = i in ENTITY_SET_IDS
            index = (ENTITY_SET_IDS if entity else TOPIC_SET_IDS).index(i)
            pieces.append(SETToken(entity=entity, topic=not entity, index=index))
        at = m.end()
    if at < len(text):
        pieces.append(text[at:])
    return pieces


# ---------------------------------------------------------------------------------- segments
def segment_ids(input_ids, disrupt_id: int) -> torch.Tensor:
    """The segment of each token: the number of Disrupt tokens up to and including it (a cumulative count),
    so a Disrupt token starts a new segment and belongs to it. (B, T) -> (B, T) int64; (T,) -> (T,).

        input_ids    a  b  D  c  d  D  D  e      (D = disrupt_id)
        segment_ids  0  0  1  1  1  2  3  3

    Disrupt/SET attention lets query i see key j <= i only within its segment (and the sink tokens).
    """
    ids = torch.as_tensor(input_ids)
    if ids.ndim not in (1, 2):
        raise ValueError(f"input_ids must have shape (T,) or (B, T), got {tuple(ids.shape)}")
    return (ids == disrupt_id).to(torch.int64).cumsum(dim=-1)


__all__ = [
    "DISRUPT",
    "ENTITY_SET_IDS",
    "POOL_SIZE",
    "TOPIC_SET_IDS",
    "DisruptToken",
    "Piece",
    "SETToken",
    "decode_sample",
    "disrupt_id",
    "encode_sample",
    "pool",
    "segment_ids",
    "set_ids",
    "set_name",
    "split_sample",
]
