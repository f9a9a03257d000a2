"""`StdlibCorpus`: the default corpus, the Python standard library of the running interpreter.

Every machine that runs litattn has it, so a first pretraining run needs no download: about 12 MB of `.py`
files (CPython 3.11), without the test suites and installed packages, which are not the library itself.
"""

from __future__ import annotations

import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from litattn.data.text_files import TextFiles

STDLIB_EXCLUDE = ["test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"]
"""Folder names left out at any depth: Lib/test, unittest/test, lib2to3/tests, idlelib/idle_test, packages."""


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@dataclass
class StdlibCorpus(TextFiles):
    """The `.py` files of this interpreter's standard library; whole files are held out for validation."""

    train_dirs: list[Path] = field(default_factory=lambda: [stdlib_dir()])
    """Defaults to the running interpreter's standard library folder."""
    extensions: list[str] = field(default_factory=lambda: [".py"])
    """Python source files only."""
    exclude: list[str] = field(default_factory=lambda: list(STDLIB_EXCLUDE))
    """Folder names left out at any depth: test suites and installed packages are not the library's own code."""

    def _source(self) -> str:
        version = ".".join(map(str, sys.version_info[:3]))
        return f"Python {version} standard library ({', '.join(map(str, self.train_dirs))})"
