"""Passkey prompts: a 5-digit key hidden at a depth of filler text, the question after it, and the scoring of an
answer. Shared by the passkey test (litattn/passkey.py) and the training data that mixes passkey samples into a
corpus (litattn/data/passkey_mix.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there. "
)
FILLER = (
    "The grass is green. ",
    "The sky is blue. ",
    "The sun is yellow. ",
    "Here we go. ",
    "There and back again. ",
)
KEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"
DEFAULT_DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


@dataclass
class Prompt:
    """A passkey prompt: its token ids and where the key went."""

    ids: list[int]
    key: int
    depth: float
    filler_sentences: int  # in the whole prompt
    key_after: int  # filler sentences before the key sentence
    key_position: int  # token index where the key sentence starts (tokenizing the text before it)


def prompt_text(key: int, filler_sentences: int, key_after: int) -> tuple[str, str]:
    """(the text before the key sentence, the whole prompt text)."""
    filler = [FILLER[i % len(FILLER)] for i in range(filler_sentences)]
    before = INTRO + "".join(filler[:key_after])
    return before, before + KEY_SENTENCE.format(key=key) + "".join(filler[key_after:]) + QUESTION


class PromptBuilder:
    """Builds prompts for one tokenizer: the most filler sentences whose prompt tokens (with the tokenizer's BOS
    where it uses one) fit in max_tokens. The filler's tokens per sentence are estimated once, in context, so a
    prompt costs about two tokenizations at any length."""

    RATE_SENTENCES = 200  # filler sentences tokenized once for the estimate

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.bos = bool(getattr(tokenizer, "use_bos", False))
        base = len(self.ids(10000, 0, 0.0))
        full = len(self.ids(10000, self.RATE_SENTENCES, 0.0))
        self.tokens_per_sentence = max((full - base) / self.RATE_SENTENCES, 1.0)

    def ids(self, key: int, filler_sentences: int, depth: float) -> list[int]:
        text = prompt_text(key, filler_sentences, round(depth * filler_sentences))[1]
        return self.tokenizer.encode(text, bos=self.bos)

    def shortest(self, key: int) -> int:
        """Tokens of the prompt without filler."""
        return len(self.ids(key, 0, 0.0))

    def __call__(self, key: int, depth: float, max_tokens: int) -> Prompt:
        """The prompt; ValueError when even the prompt without filler does not fit."""
        base = self.shortest(key)
        if base > max_tokens:
            raise ValueError(f"a passkey prompt without filler has {base} tokens, more than the {max_tokens} available")
        n = max(int((max_tokens - base) / self.tokens_per_sentence), 0)  # an estimate, then corrected
        ids = self.ids(key, n, depth)
        while n > 0 and len(ids) > max_tokens:
            n -= 1
            ids = self.ids(key, n, depth)
        while len(longer := self.ids(key, n + 1, depth)) <= max_tokens:
            n += 1
            ids = longer
        key_after = round(depth * n)
        before, _ = prompt_text(key, n, key_after)
        return Prompt(ids, key, depth, n, key_after, len(self.tokenizer.encode(before, bos=self.bos)))


def build_prompt(tokenizer: Any, key: int, depth: float, max_tokens: int) -> Prompt:
    """The prompt with the most filler sentences whose tokens (with the tokenizer's BOS where it uses one) fit
    in max_tokens; ValueError when even the prompt without filler does not fit. (Many prompts: `PromptBuilder`.)"""
    return PromptBuilder(tokenizer)(key, depth, max_tokens)


def digits_correct(answer: str, key: int) -> float:
    """Share of the key's digits that the first number in the answer (whitespace removed) has at the same place:
    partial retrieval, for models too small to copy a whole key (1.0 iff `is_correct`)."""
    match = re.search(r"\d+", re.sub(r"\s+", "", answer))
    got, want = (match.group() if match else ""), str(key)
    same = sum(a == b for a, b in zip(got, want, strict=False))
    return same / max(len(want), len(got))


def is_correct(answer: str, key: int) -> bool:
    """Whether the first number in the answer (whitespace removed) is the key."""
    match = re.search(r"\d+", re.sub(r"\s+", "", answer))
    return match is not None and match.group() == str(key)
