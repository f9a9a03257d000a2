"""Scored truncation of instruction examples: drop an over-long prompt's least important tokens, not its end.

The strategies `attention`, `attention_live` and `idf` of the instruction data modules (`truncation:`) score
every prompt token, then `litattn.truncation.truncate` removes the lowest-scoring ones until the example fits
seq_len + 1 tokens. Never removed: the response (the loss is on it) and the prompt template around the
example's input (with `protect_instruction`, the instruction too); the tokens dropped are the input's, or, for
an example without input, the instruction's. The protected spans are
counted by encoding the template's pieces alone, so at a piece boundary they may be off by a merged token.
When the response and the protected prompt alone exceed the budget, the prompt keeps only its protected tokens
and the response loses its end (as `right` does); what then has no response token left is dropped.

    attention       importance: a dictionary from `litattn truncate build` (the mean attention each token id
                    receives over a corpus)
    idf             importance: a dictionary from `litattn truncate build --method idf`, or none: the idf of
                    the training split's prompts (log(N / prompts holding the id): frequent tokens go first)
    attention_live  scorer: a checkpoint that scores the tokens of each prompt itself (the attention they receive
                    under its mechanism), in consecutive windows of its context length
    input_right     the positional baselines under the same protection: the input's end goes (its first tokens
    input_left      stay), or its start (its last tokens stay)

The truncated token ids are cached beside the tokenized examples, keyed by the strategy, the dictionary's bytes
or the scorer's weights, seq_len and the protection, so changing any of them never reuses stale tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from litattn.data.prompt_template import ALPACA_PROMPT
from litattn.tokenizer import Tokenizer
from litattn.truncation import Importance, Protect, build_frequency, truncate
from litattn.truncation.scores import CheckpointScorer
from litattn.utils import content_key, file_digest

SCORED = ("attention", "attention_live", "idf", "input_right", "input_left")
"""The truncation strategies this module implements; `right` and `left` cut ends (litattn.data.instructions)."""

PROMPT_TRUNCATION_VERSION = 1
"""Bump when scored truncation changes, so cached truncated examples are rebuilt."""


def check_options(strategy: str, importance: Path | None, scorer: Path | None) -> None:
    """One-line errors for options that do not go together (checked when the data module is built)."""
    if strategy == "attention" and importance is None:
        raise ValueError(
            "truncation 'attention' needs importance: the JSON dictionary from `litattn truncate build "
            "--checkpoint_dir DIR --data ... --out importance.json`"
        )
    if strategy == "attention_live" and scorer is None:
        raise ValueError("truncation 'attention_live' needs scorer: a checkpoint directory whose attention scores")
    if importance is not None and strategy not in ("attention", "idf"):
        raise ValueError(f"importance is read by truncation 'attention' or 'idf' only, not {strategy!r}; remove it")
    if scorer is not None and strategy != "attention_live":
        raise ValueError(f"scorer is read by truncation 'attention_live' only, not {strategy!r}; remove it")


def protected_spans(examples: Sequence, tokenizer: Tokenizer, protect_instruction: bool) -> np.ndarray:
    """(N, 2) tokens protected at the start and at the end of each example's prompt: the template before the
    droppable text (with `protect_instruction`, the instruction and, when there is an input, its header) and
    the template after it."""
    heads, tails = [], []
    for e in examples:
        if e.input:  # the input goes (with protect_instruction False, the instruction and the input's header too)
            before, tail = ALPACA_PROMPT["input"].split("{input}")
            head = before.format(instruction=e.instruction) if protect_instruction else before.split("{instruction}")[0]
        else:  # no input: the instruction is what may go
            head, tail = ALPACA_PROMPT["no_input"].split("{instruction}")
        heads.append(head)
        tails.append(tail)
    n_head = [len(ids) for ids in tokenizer.encode_batch(heads, bos=tokenizer.use_bos)]
    n_tail = [len(ids) for ids in tokenizer.encode_batch(tails)]
    return np.array([n_head, n_tail], dtype=np.int64).T.reshape(-1, 2)


def fit(
    prompt: np.ndarray,
    response: np.ndarray,
    max_len: int,
    scores: torch.Tensor | None,
    head: int,
    tail: int,
    return_positions: bool = False,
):
    """Cut one example to at most max_len tokens: the prompt's lowest-scoring unprotected tokens first, then, if
    still too long, the end of the response. scores (len(prompt),): None when the example already fits.
    Returns (prompt, response), with `return_positions` also each kept token's position in the uncut example."""
    kept = np.arange(len(prompt))
    if len(prompt) + len(response) > max_len:
        protected = min(len(prompt), head + tail)
        room = max(max_len - len(response), protected)  # the prompt keeps at least its protected tokens
        if room < len(prompt):
            ids = torch.as_tensor(prompt, dtype=torch.long)
            _, kept_t = truncate(
                ids, room, scores=scores, protect=Protect(first=head, last=tail), return_positions=True
            )
            kept = kept_t.numpy()
        kept = kept[:max_len]  # the protected prompt alone may fill the budget: then no response token is left
    n_response = min(len(response), max_len - len(kept))
    cut = prompt[kept], response[:n_response]
    if not return_positions:
        return cut
    return (*cut, np.concatenate([kept, len(prompt) + np.arange(n_response)]))


POSITIONAL = {"input_right": -1.0, "input_left": 1.0}
"""The positional strategies: the sign of each token's position as its score (later tokens go first / last)."""


def prompt_scores(strategy: str, prompts: Sequence, importance=None, live=None) -> list[torch.Tensor]:
    """One (len,) float tensor of token scores per prompt (ids): by position (`POSITIONAL`), by the `live` scorer
    (prompts -> scores, e.g. `CheckpointScorer.scores`) on each prompt itself (attention_live), else by the
    `importance` dictionary."""
    prompts = [torch.as_tensor(p, dtype=torch.long) for p in prompts]
    if strategy in POSITIONAL:
        return [POSITIONAL[strategy] * torch.arange(len(p), dtype=torch.float32) for p in prompts]
    if strategy == "attention_live":
        return live(prompts)
    return [importance.scores_of(p) for p in prompts]


class PromptScorer:
    """The scores of one data module's strategy (`scores(prompts)`) and what its cache key holds of them. The
    scorer checkpoint's weights load (in `CheckpointScorer`), and idf counts the training prompts, only when scores
    are asked for (a cached cut needs neither)."""

    def __init__(
        self,
        strategy: str,
        importance: Path | None,
        scorer: Path | None,
        tokenizer: Tokenizer,
        train_prompts: Sequence[np.ndarray],
    ) -> None:
        self.strategy, self.importance, self.live = strategy, None, None
        self._train_prompts = train_prompts
        if strategy in POSITIONAL:
            self.key = [strategy]
        elif strategy == "attention_live":
            self.live = CheckpointScorer(Path(scorer), tokenizer)
            self.key = ["live", self.live.digest]
        elif importance is not None:
            self.importance = Importance.load(importance)
            self.importance.check_tokenizer(tokenizer)
            self.key = [strategy, file_digest(Path(importance))]
        else:  # idf of the training prompts
            self.key = [strategy, "train-prompts"]

    def scores(self, prompts: Sequence[np.ndarray]) -> list[torch.Tensor]:
        if self.strategy == "idf" and self.importance is None:
            self.importance = build_frequency(list(self._train_prompts))
        return prompt_scores(self.strategy, prompts, self.importance, self.live and self.live.scores)


def cache_key(scorer: PromptScorer, tokens_path: Path, seq_len: int, protect_instruction: bool) -> str:
    return content_key([PROMPT_TRUNCATION_VERSION, tokens_path.name, scorer.key, seq_len, protect_instruction])
