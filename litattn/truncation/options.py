"""The names and limits the truncation modules share."""

from __future__ import annotations

from typing import Literal

Variant = Literal["received", "original"]
"""received: mean attention over the queries that can see the token; original: (row + column - self) / T."""
Visible = Literal["mask", "causal"]
"""How the queries that can see a key are counted: "mask" (a second forward, any mechanism) or "causal" (T - j)."""
Method = Literal["attention", "idf"]
"""attention: mean token_scores per id; idf: log(documents / documents holding the id)."""

FORMAT = "litattn.importance"
FORMAT_VERSION = 1
MAX_TOKEN_ID = 2**24
"""Token ids of a dictionary are below this (the largest vocabularies have ~2**18): a larger one is a corrupt file,
not a table of that many entries to allocate."""
MAX_COUNT = 2**62
"""Occurrence and document counts are below this (int64, with room to add)."""
FIELDS = ("instruction", "input", "output")
"""The text fields of an instruction example (litattn.data.instructions)."""
