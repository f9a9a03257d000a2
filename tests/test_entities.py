"""The rule `set: {kind: auto}` uses to tell an entity from a topic (litattn/data/entities.py), on hand-written
prose and Python."""

import pytest

from litattn.data.entities import at_sentence_start, proper_names, starts_entity


def after(text: str, marker: str = "|") -> bool:
    """starts_entity at the place marked `|` in `text` (the marker removed)."""
    at = text.index(marker)
    return starts_entity(text.replace(marker, "", 1), at)


@pytest.mark.parametrize(
    "text",
    [
        "It was founded in| 1984 by two people.",
        "The cost was| $5 then.",
        'She read| "Hamlet" twice.',
        "Call| `dumps` with a dict.",
        "A docstring ends.| ``object_hook`` is called.",  # reST's literal
        "We moved to| Paris last year.",  # a capitalised word inside a sentence
        "Python is fast. We like| Python a lot.",
        "We like Python a lot. Then we wrote more.| Python is fast.",  # at a sentence start, but a name
        "The end.| 3 more things follow.",
    ],
)
def test_prose_entities(text):
    assert after(text)


@pytest.mark.parametrize(
    "text",
    [
        "It was founded| in 1984.",  # a lower-case word
        "The end.| The next sentence starts.",  # a sentence's opening capital: not a name elsewhere
        "Done.| I think so.",  # "I" never counts
        "We said| so.",
        "An end.|",  # nothing follows
        "A list:| (a) and (b).",  # punctuation
        '# Then.|\n    """Return the table.',  # a docstring opens: not a quoted name
        "Use Python. Then stop.| Then go.",  # "Then" stands capitalised only at sentence starts
    ],
)
def test_prose_topics(text):
    assert not after(text)


@pytest.mark.parametrize(
    "text",
    [
        "# Set up the table.|\ndef build(rows):\n",
        "# First.|\nclass Table:\n",
        "# First.|\nasync def fetch():\n",
        '"""Module."""|\nimport os\n',
        '"""Module."""|\nfrom json import dumps\n',
        "# Then call it.|\n    build(rows)\n",
        "# Then call it.|\n    self.table.build(rows)\n",
        "# Count them.|\n    total = 0\n",
        "# Count them.|\n    self.total += len(rows)\n",
        "# Swap.|\n    a, b = b, a\n",
        "# Typed.|\n    limit: int = 10\n",
        "# One more. Next one.|\n# Table is built here.\n",  # a comment: read past its marker, then a name
    ],
)
def test_python_entities(text):
    assert after(text)


@pytest.mark.parametrize(
    "text",
    [
        "# Done.|\n    return rows\n",
        "# Check.|\n    if (a):\n",  # a keyword before a bracket is not a call
        "# Check.|\n    if a == b:\n",
        "# Compare.|\n    a == b\n",  # a comparison, not an assignment
        '    """Return x.|\n    """\n',  # the docstring closes
        "# Loop.|\n    for row in rows:\n",
    ],
)
def test_python_topics(text):
    assert not after(text)


def test_sentence_starts_and_names():
    text = "Hello there. We like Python.\nNew line"
    assert at_sentence_start(text, 0) and at_sentence_start(text, text.index("We"))
    assert at_sentence_start(text, text.index("New")) and not at_sentence_start(text, text.index("Python"))
    assert proper_names("We like Python and I like Rust. Then Go.\nSo") == {"Python", "Rust", "Go"}
