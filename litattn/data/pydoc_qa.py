"""`PyDocQA`: the default instruction data, questions and answers about the Python standard library.

Like `StdlibCorpus` for pretraining, it needs no download: each public top-level function or class with a
docstring becomes "What does `textwrap.dedent(text)` do?" answered by the docstring's first paragraph. The
modules are parsed with `ast`, never imported (importing runs code: `antigravity` opens a browser).
"""

from __future__ import annotations

import ast
import copy
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from litattn.data import prompt_truncation
from litattn.data.instructions import Example, InstructionData, Truncation, check_truncation
from litattn.data.stdlib import StdlibCorpus
from litattn.data.text_files import held_out
from litattn.utils import atomic_write_text, content_key

PYDOC_QA_VERSION = 2
"""Bump when the way examples are built changes, so cached examples are rebuilt."""

MIN_ANSWER_CHARS = 20
"""Docstrings whose first paragraph is shorter than this ("Deprecated.", "Helper.") teach nothing: skipped."""


@dataclass
class PyDocQA(InstructionData):
    """Questions on what the standard library's public functions and classes do, answered from their docstrings."""

    val_fraction: float = 0.05
    """Share of the modules held out for validation (all examples of a module go to the same split)."""
    seed: int = 42
    """Salt of the hash that picks validation modules: change it to hold out a different set."""
    modules: list[str] | None = None
    """Only these modules (dotted names such as "textwrap", "json.decoder"); default: the whole standard library."""
    truncation: Truncation = "right"
    """How examples longer than seq_len + 1 tokens are cut: "right" drops the end of the answer, "left" the
    start of the question (keeping the answer), "attention" / "attention_live" / "idf" the question's least
    important tokens (litattn/data/prompt_truncation.py)."""
    importance: Path | None = None
    """truncation attention: the dictionary (`litattn truncate build`); idf: one from `--method idf` (default:
    the idf of the training prompts)."""
    scorer: Path | None = None
    """truncation attention_live: the checkpoint that scores each prompt's tokens (the same tokenizer)."""
    protect_instruction: bool = True
    """Scored truncation never drops the instruction (only the input) of an example that has an input."""
    prefix: bool = False
    """Batches carry `prefix_len`, each question's (prompt's) length, for attention that reads it (hybrid: the
    prompt is the bidirectional prefix); the loss stays on the answer. Other mechanisms drop it with a warning."""
    with_source: bool = False
    """Give the definition's source code (its own docstring removed: that is the answer) as the example's input:
    long prompts, for truncation experiments."""

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")
        check_truncation(self.truncation)
        prompt_truncation.check_options(self.truncation, self.importance, self.scorer)
        if isinstance(self.modules, str):
            self.modules = [self.modules]
        self._split: dict[str, tuple[int, int]] | None = None  # split -> (examples, modules)
        self._cache: tuple[Path, bool] | None = None  # (examples file, reused)

    def load_examples(self, cache_dir: Path) -> tuple[list[Example], list[Example]]:
        records, path, reused = build_examples(cache_dir, self.modules)
        self._cache = (path, reused)
        names = sorted({r["module"] for r in records})
        if len(names) < 2:
            raise ValueError(
                f"PyDocQA found examples in {len(names)} module(s) ({', '.join(names) or 'none'}): too few to hold "
                f"a module out for validation; name at least two modules with documented public functions"
            )
        is_val = held_out(names, self.seed, self.val_fraction)
        val_modules = {m for m, v in zip(names, is_val, strict=True) if v}
        train = [_example(r, self.with_source) for r in records if r["module"] not in val_modules]
        val = [_example(r, self.with_source) for r in records if r["module"] in val_modules]
        self._split = {"train": (len(train), len(names) - len(val_modules)), "val": (len(val), len(val_modules))}
        return train, val

    def _summary(self) -> str:
        version = ".".join(map(str, sys.version_info[:3]))
        line = f"PyDocQA (Python {version} standard library docstrings"
        line += f", modules {', '.join(self.modules)})" if self.modules else ")"
        if self._split is None:
            return line
        (n_train, m_train), (n_val, m_val) = self._split["train"], self._split["val"]
        path, reused = self._cache
        return (
            f"{line}: {n_train:,} examples from {_plural(m_train, 'module')} for training; validation: {n_val:,} "
            f"examples from {_plural(m_val, 'module')} held out by module-name hash "
            f"(val_fraction={self.val_fraction}, seed={self.seed})"
            f"\nexample cache: {path} ({'reused' if reused else 'built'})"
        )


def build_examples(cache_dir: Path | str, modules: list[str] | None = None) -> tuple[list[dict], Path, bool]:
    """The question/answer records of the standard library (or of `modules`), the cache file, and whether reused.

    The cache is keyed by the stdlib file list (paths, sizes, mtimes) and the module selection: a new Python or
    an edited file rebuilds it.
    """
    files = _stdlib_modules()
    if modules is not None:
        missing = sorted(set(modules) - set(files))
        if missing:
            raise ValueError(
                f"PyDocQA modules not found in the standard library: {', '.join(missing)}; name modules by their "
                f"dotted import path (e.g. textwrap, json.decoder); private modules (a part starting with _) are "
                f"left out"
            )
        files = {m: files[m] for m in sorted(set(modules))}
    stats = [(m, str(f), (s := f.stat()).st_size, s.st_mtime_ns) for m, f in files.items()]
    key = content_key([PYDOC_QA_VERSION, MIN_ANSWER_CHARS, stats])
    path = Path(cache_dir) / f"pydoc-qa-{key}.json"
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
        if cached["version"] == PYDOC_QA_VERSION:
            return cached["examples"], path, True
    except (OSError, ValueError, KeyError, TypeError):
        pass
    records, skipped = [], []
    for module, file in files.items():
        try:
            tree = ast.parse(file.read_bytes(), filename=str(file))
        except (SyntaxError, ValueError, OSError):  # ValueError: null bytes / bad encoding declaration
            skipped.append(str(file))
            continue
        records += module_examples(module, tree)
    data = {"version": PYDOC_QA_VERSION, "files": len(files), "skipped": skipped, "examples": records}
    atomic_write_text(path, json.dumps(data, indent=0))
    return records, path, False


def module_examples(module: str, tree: ast.Module) -> list[dict]:
    """One record per public top-level function or class of `module` whose docstring has a usable first paragraph."""
    defs: dict[str, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            defs[node.name] = node  # a name defined twice: the later definition is the one the module keeps
    records = []
    for name, node in defs.items():
        answer = first_paragraph(ast.get_docstring(node, clean=True) or "")
        if len(answer) < MIN_ANSWER_CHARS:
            continue
        if isinstance(node, ast.ClassDef):
            init = [
                n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == "__init__"
            ]
            # without __init__ the signature is inherited and unknown here: name the class alone
            call = f"{module}.{name}" + (f"({signature(init[-1].args, drop_first=True)})" if init else "")
        else:
            call = f"{module}.{name}({signature(node.args)})"
        kind = "class" if isinstance(node, ast.ClassDef) else "function"
        records.append(
            {
                "module": module,
                "name": name,
                "kind": kind,
                "instruction": f"What does `{call}` do?",
                "output": answer,
                "source": source_without_docstring(node),
            }
        )
    return records


def source_without_docstring(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> str:
    """The definition as code (ast.unparse: comments and layout normalised) without its own docstring."""
    bare = copy.copy(node)  # shallow: the tree the caller holds keeps its docstring
    if ast.get_docstring(node, clean=False) is not None:
        bare.body = node.body[1:] or [ast.Pass()]
    return ast.unparse(bare)


def signature(args: ast.arguments, drop_first: bool = False) -> str:
    """The parameter list as Python would print it, without annotations: `text, width=70, *, sep=' ', **kwargs`.

    `drop_first` leaves out `self` (for a class's `__init__`).
    """
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + args.defaults
    n_posonly = len(args.posonlyargs)
    if drop_first and positional:
        positional, defaults, n_posonly = positional[1:], defaults[1:], max(n_posonly - 1, 0)
    parts = []
    for i, (arg, default) in enumerate(zip(positional, defaults, strict=True)):
        parts.append(arg.arg if default is None else f"{arg.arg}={ast.unparse(default)}")
        if i == n_posonly - 1:
            parts.append("/")
    if args.vararg is not None:
        parts.append(f"*{args.vararg.arg}")
    elif args.kwonlyargs:
        parts.append("*")
    for arg, default in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        parts.append(arg.arg if default is None else f"{arg.arg}={ast.unparse(default)}")
    if args.kwarg is not None:
        parts.append(f"**{args.kwarg.arg}")
    return ", ".join(parts)


def first_paragraph(docstring: str) -> str:
    """The text up to the first blank line, on one line (the docstring is already cleaned by inspect.cleandoc)."""
    return " ".join(re.split(r"\n\s*\n", docstring.strip(), maxsplit=1)[0].split())


def _stdlib_modules() -> dict[str, Path]:
    """Dotted module name -> file for StdlibCorpus's files, private modules (`_pydecimal`, `__main__`) left out."""
    corpus = StdlibCorpus()
    train, val = corpus.find_files()
    roots = [Path(d).resolve() for d in corpus.train_dirs]
    out = {}
    for file in sorted(train + val):
        root = next(r for r in roots if file.is_relative_to(r))
        parts = list(file.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if parts and not any(p.startswith("_") for p in parts):
            out[".".join(parts)] = file
    return out


def _example(record: dict, with_source: bool = False) -> Example:
    return Example(instruction=record["instruction"], output=record["output"], input=record["source"] * with_source)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"
