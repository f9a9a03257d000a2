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
    packages: list[str] | None = None
    """Read only these packages of the library (folder names such as `json`, `email`), e.g. a small corpus to
    overfit; None: the whole library. Replaces train_dirs."""

    def __post_init__(self) -> None:
        if self.packages is not None:
            if isinstance(self.packages, str):
                self.packages = [self.packages]
            if not self.packages:
                raise ValueError("packages is empty: name standard-library packages (e.g. [json]) or leave it null")
            root = stdlib_dir()
            missing = [p for p in self.packages if not (root / p).is_dir()]
            if missing:
                raise ValueError(f"{missing} are not packages (folders) of the standard library in {root}")
            self.train_dirs = [root / p for p in self.packages]
        super().__post_init__()

    def _source(self) -> str:
        version = ".".join(map(str, sys.version_info[:3]))
        return f"Python {version} standard library ({', '.join(map(str, self.train_dirs))})"
