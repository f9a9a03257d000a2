"""Attention-based truncation of inputs: drop a long input's least important tokens instead of its end.

The method: score every token by the attention the model gives it, average the scores per token id over a
corpus into an importance dictionary, and when a sequence is too long remove its lowest-scoring tokens (the
others keep their order) until it fits.

    token_scores(model, idx)               (B, T) the score of each token, under the model's own mechanism
    build_importance(model, batches)       Importance: token id -> mean score over a corpus (JSON, resumable)
    build_frequency(documents)             Importance: idf, log(N / doc_freq): the frequency-only control
    truncate(ids, max_length, importance)  exactly max_length tokens, order kept (lists, tensors, padded batches)
    truncate_live(model, ids, max_length)  the same, scored by the model on this very input
    build(...), apply(...)                 the `litattn truncate build | apply` entry points (truncation/cli.py)

The package: scores.py (observers, token scores), importance.py (dictionaries and their builds), cut.py (`Protect`,
`truncate`, `truncate_live`), cli.py (the entry points: the only part that reads data modules and checkpoints,
so the data layer can import the rest).

Scores, for one layer (block application) and head of a row of T tokens, p_ij the probability query i gives key j:

    received (default)  s_j = sum_{i in Q_j} p_ij / |Q_j|         Q_j: the queries the mask lets see key j
    original            s_j = (sum_k p_jk + sum_i p_ij - p_jj) / T
                        the original method's: the attention token j pays (a softmax row: 1) plus the attention
                        it receives, its self-attention counted once, over the row's T tokens

then averaged over the chosen layers and heads. Under a causal mask "original" favours early tokens (T - j
queries add to a column, one normaliser); "received" compares tokens by the mean attention of their viewers.

|Q_j| (`visible`): "mask" counts, per key, the query rows that hold it in a second observed forward whose
queries are all zero. Every score is then equal, so each softmax row is uniform over exactly the keys its mask
allows (1/n >= 1/T, never 0): the count is the mask's for any mechanism (a window, Disrupt segments, hybrid's
bidirectional prefix), whatever the scoring pass's probabilities underflow to. It costs one more forward.
"causal" takes |Q_j| = T - j without it: exact for causal masks (causal, self_extend, ssa over causal) only.
Counting p_ij > 0 in the scoring pass was rejected: a visible key scored ~100 below its row's maximum
underflows to 0 in float32 and would drop out of its own count.

Memory: attention is computed one query chunk at a time (`GPT.observe`) and each chunk is reduced at once into
per-layer (B, T) totals, so no T x T tensor exists. The chunk size is the kernels': `kernels.MASK_BUDGET` bytes
of float32 scores (self_extend: `QUERY_BLOCK` queries); `GPT.observe` takes no chunk argument.

Truncation removes exactly len - max_length unprotected tokens, lowest score first (the original removed every
occurrence of the lowest-scoring id at once and could undershoot). Among equal scores the later position goes
first, so equal scores (an empty dictionary) give right truncation. Protected tokens (`Protect`) always stay.
"""

from litattn.truncation.cut import Protect, truncate, truncate_live
from litattn.truncation.importance import (
    Batches,
    Importance,
    batch_lengths,
    build_frequency,
    build_importance,
    partial_path,
)
from litattn.truncation.options import Method, Variant, Visible
from litattn.truncation.scores import ScoreObserver, VisibleQueries, token_scores, windowed_token_scores, zeroed_queries

__all__ = [
    "Batches",
    "Importance",
    "Method",
    "Protect",
    "ScoreObserver",
    "Variant",
    "Visible",
    "VisibleQueries",
    "batch_lengths",
    "build_frequency",
    "build_importance",
    "partial_path",
    "token_scores",
    "truncate",
    "truncate_live",
    "windowed_token_scores",
    "zeroed_queries",
]
