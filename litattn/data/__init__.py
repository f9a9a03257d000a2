"""Data modules: a corpus goes in, cached token files and `TokenWindows` datasets come out."""

from litattn.data.base import DataModule, TokenWindows
from litattn.data.stdlib import StdlibCorpus
from litattn.data.text_files import TextFiles

__all__ = ["DataModule", "StdlibCorpus", "TextFiles", "TokenWindows"]
