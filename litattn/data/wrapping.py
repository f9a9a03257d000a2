"""What a wrapping data module (InjectTokens, SampledPrefix, PasskeyMix) wraps: kept apart from base.py so the
default corpus can be named without the base module importing its own subclass."""

from __future__ import annotations

from litattn.data.base import DataModule
from litattn.data.stdlib import StdlibCorpus


def wrapped_data(inner: DataModule | None, name: str, examples: str, wrapper: type) -> DataModule:
    """The data module a wrapper (InjectTokens, SampledPrefix, PasskeyMix) reads from: `inner`, or StdlibCorpus
    when None; one-line errors for a value that is not a data module or is the wrapper itself."""
    if inner is None:
        return StdlibCorpus()
    if not isinstance(inner, DataModule):
        raise TypeError(f"{name} must be a data module (e.g. {examples}), got {inner!r}")
    if isinstance(inner, wrapper):
        article = "an" if wrapper.__name__[0] in "AEIOU" else "a"
        raise ValueError(f"{name} is already {article} {wrapper.__name__}: give one {wrapper.__name__} all its options")
    return inner
