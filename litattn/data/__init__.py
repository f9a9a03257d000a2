"""Data modules: a corpus goes in, cached token files and `TokenWindows` datasets come out."""

from litattn.data.base import DataModule, TokenWindows
from litattn.data.bigram_backcopy import BigramBackcopy
from litattn.data.inject import DisruptPlacement, InjectTokens, SETPlacement
from litattn.data.instructions import (
    ALPACA_PROMPT,
    AlpacaJSON,
    Example,
    InstructionData,
    InstructionDataset,
    format_prompt,
    truncate,
)
from litattn.data.passkey_mix import PasskeyMix
from litattn.data.prefix import SampledPrefix
from litattn.data.prefix_tasks import PrefixTask
from litattn.data.pydoc_qa import PyDocQA
from litattn.data.stdlib import StdlibCorpus
from litattn.data.text_files import TextFiles

__all__ = [
    "ALPACA_PROMPT",
    "AlpacaJSON",
    "BigramBackcopy",
    "DataModule",
    "DisruptPlacement",
    "Example",
    "InjectTokens",
    "InstructionData",
    "InstructionDataset",
    "PasskeyMix",
    "PrefixTask",
    "PyDocQA",
    "SETPlacement",
    "SampledPrefix",
    "StdlibCorpus",
    "TextFiles",
    "TokenWindows",
    "format_prompt",
    "truncate",
]
