"""Does the text after a place begin an entity? The rule `InjectTokens`' `set: {kind: auto}` uses to choose an
entity or a topic SET token for each insertion (the seed: a SET token "tells the model whether to focus on the
entity or topic of the next token").

There is no tagger here, only surface rules, the same for prose and code (an item of either may hold both). What
follows the place is read with its leading whitespace skipped, and a leading comment marker (`#`) with it; it
begins an entity when it starts with

    prose  a number                  "1984 was ...", "3.5 ...", "-2 ...", "$5 ..."
           a quoted name             '"Hamlet" is ...', "'json' ...", "`dumps`", "``dumps``" (then a letter)
           a capitalised word        not at a sentence start: "... and Python"; at a sentence start only when
                                     the same word stands capitalised inside a sentence elsewhere in the text
                                     (a name, not the capital every sentence opens with); "I" never counts
    code   a name defined            "def name", "class name", "async def name"
           a name imported           "import name", "from name import ..."
           a name called             "name(" or "a.b.name(" (no keyword: "if (" is not a call)
           a name assigned           "name = ", "a.b = ", "x, y = ", "name += ", "name: int = " (not "==")

and a topic otherwise (a lower-case word, a keyword statement such as `return` or `if`, punctuation, nothing).
A place is at a sentence start when only whitespace separates it from the start of the text or from a sentence
end (. ! or ?, closing quotes or brackets allowed after it), or when a newline does.
"""

from __future__ import annotations

import keyword
import re

_NUMBER = re.compile(r"[-+$£€]?\d")
_QUOTED = re.compile(r"(?:``?|[\"'“‘])\w")
_WORD = re.compile(r"[A-Za-z_]\w*")
_DEFINED = re.compile(r"(?:async\s+)?(?:def|class)\s+[A-Za-z_]")
_IMPORTED = re.compile(r"(?:import|from)\s+[A-Za-z_.]")
_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_CALLED = re.compile(rf"({_DOTTED})\(")
_ASSIGNED = re.compile(rf"({_DOTTED})(?:\s*,\s*{_DOTTED})*\s*(?::[^=\n]+)?(?:=(?!=)|[-+*/%@&|^]=|//=|\*\*=|>>=|<<=)")
SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")
"""Text that ends a sentence: . ! or ?, then closing quotes or brackets (the rule of SET's `after: sentence`)."""
_INSIDE_SENTENCE = re.compile(r"[^\s.!?] +([A-Z]\w*)")
"""A capitalised word after spaces (no newline) that follow something other than a sentence end."""


def proper_names(text: str) -> frozenset[str]:
    """The capitalised words that stand inside a sentence somewhere in `text` (names, by the rule above)."""
    return frozenset(m.group(1) for m in _INSIDE_SENTENCE.finditer(text) if m.group(1) != "I")


def at_sentence_start(text: str, at: int) -> bool:
    """Whether place `at` of `text` begins a sentence: only whitespace back to the start of the text or to a
    sentence end, or a newline among that whitespace."""
    before = text[:at]
    body = before.rstrip()
    if not body or "\n" in before[len(body) :]:
        return True
    return SENTENCE_END.search(body) is not None


def starts_entity(text: str, at: int, names: frozenset[str] | None = None) -> bool:
    """Whether the text after place `at` of `text` begins an entity (module docstring). `names`: the text's
    `proper_names` (computed here when None; pass them when asking about many places of one text)."""
    rest = text[at:].lstrip()
    if rest.startswith("#"):
        rest = rest.lstrip("#").lstrip()
    if _NUMBER.match(rest) or _QUOTED.match(rest):
        return True
    if _DEFINED.match(rest) or _IMPORTED.match(rest):
        return True
    for pattern in (_CALLED, _ASSIGNED):
        m = pattern.match(rest)
        if m and not keyword.iskeyword(m.group(1).split(".")[0]):
            return True
    word = _WORD.match(rest)
    if word is None or not word.group()[0].isupper() or word.group() == "I":
        return False
    if not at_sentence_start(text, at):
        return True
    names = proper_names(text) if names is None else names
    return word.group() in names


__all__ = ["SENTENCE_END", "at_sentence_start", "proper_names", "starts_entity"]
