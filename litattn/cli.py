"""The `litattn` command line: one subcommand per entry point (jsonargparse).

Every subcommand takes `--config FILE`, `--print_config` and dotted overrides
(`--model.attention.name ssa`); overrides of a mapping merge into what the YAML set, at any depth
(see `merged_argv`). `main` is the command line as a function: `python -m litattn` calls it, and so does
`litattn ablate` to parse a recipe in-process (`parse_config`). The entry points are named by import path
(`COMMANDS`) and imported when the command line is built, so no entry point's module imports this one back.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Collection

import torch
import yaml
from jsonargparse import CLI, ArgumentParser, set_parsing_settings

from litattn.args import ChecksPassed, checking, checks_only, start_work
from litattn.attention import available_attention, describe, get_attention
from litattn.attention.registry import normalize_attention_spec
from litattn.config import PRESETS, Config, expand_overrides
from litattn.model import GPT


def attention_list() -> None:
    """List the registered attention mechanisms with a one-line description each."""
    start_work()
    width = max(len(n) for n in available_attention())
    for name in available_attention():
        print(f"{name:<{width}}  {describe(get_attention(name))}")


def model_list(attention: dict | None = None) -> None:
    """List the model presets with their size and context length.

    Args:
        attention: Build them with this attention spec, e.g. `{name: ssa}`, and show the parameters it adds.
    """
    if attention:
        normalize_attention_spec(attention)
    start_work()
    added = f" {'attention adds':>20}" if attention else ""
    print(f"{'preset':<16} {'params':>10} {'layers':>6} {'n_embd':>6} {'heads':>5} {'kv':>3} {'context':>7}{added}")
    for name in PRESETS:
        config = Config.from_name(name, **({"attention": attention} if attention else {}))
        with torch.device("meta"):
            model = GPT(config)
        n, extra = model.num_parameters(), model.mechanism_parameters()
        print(
            f"{name:<16} {_human(n):>10} {config.n_layer:>6} {config.n_embd:>6} {config.n_head:>5} "
            f"{config.n_query_groups:>3} {config.block_size:>7}"
            + (f" {f'{extra:,} ({extra / n:.3%})':>20}" if attention else "")
        )


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


COMMANDS = {
    "pretrain": "litattn.pretrain.pretrain:setup",
    "finetune": "litattn.finetune.finetune:setup",
    "generate": "litattn.generate:main",
    "ablate": "litattn.ablate:ablate",
    "convert": {"from_hf": "litattn.convert:from_hf_main", "to_hf": "litattn.convert:to_hf_main"},
    "evaluate": {
        "perplexity": "litattn.evaluate:perplexity",
        "passkey": "litattn.passkey:passkey",
        "streaming": "litattn.evaluate:streaming_perplexity",
        "attention": "litattn.evaluate_attention:attention_statistics",
        "answers": "litattn.answers:answers",
    },
    "visualize": {"attention": "litattn.visualize:attention"},
    "truncate": {"build": "litattn.truncation.cli:build", "apply": "litattn.truncation.cli:apply"},
    "attention": {"list": "litattn.cli:attention_list"},
    "model": {"list": "litattn.cli:model_list"},
}
"""Subcommand -> entry point, as `module:function` (a nested mapping for a group of subcommands)."""


def commands() -> dict[str, Callable | dict[str, Callable]]:
    """COMMANDS with each entry point imported: what jsonargparse builds the command line from."""
    return _imported(COMMANDS)


def _imported(tree: dict) -> dict[str, Callable | dict[str, Callable]]:
    out = {}
    for name, target in tree.items():
        if isinstance(target, dict):
            out[name] = _imported(target)
        else:
            module, function = target.split(":")
            out[name] = getattr(importlib.import_module(module), function)
    return out


# ---------------------------------------------------------------------------------- mapping overrides
# Parameters whose value is a mapping that command-line overrides merge into (True: an attention spec).
MERGED_PARAMETERS = {"model": False, "attention": True, "attention_spec": True}
_SEP = "/"  # nests a key without a dot; see OVERRIDE_KEY_SEPARATORS in litattn.config


def merged_argv(argv: list[str], parameters: Collection[str]) -> list[str]:
    """Rewrite overrides of mapping parameters so that jsonargparse keeps what the YAML set.

    Why: for a `dict` parameter jsonargparse applies `--model.attention.name ssa` as a shallow update,
    `{**model, "attention": {"name": "ssa"}}`, losing the YAML's other attention options, and a whole
    value `--model '{...}'` replaces the mapping. It stores a key without a dot as it is, so each
    override becomes a key of its own, numbered in command-line order: `--model.attention.name ssa` ->
    `--model./0/attention/name ssa`, `--model '{n_layer: 2}'` -> `--model./1 '{n_layer: 2}'`. The parser
    (`_parser_class`) folds these keys back, merging each in turn into what the YAML set
    (`litattn.config.expand_overrides`), before the entry point or `--print_config` sees the mapping.
    """
    out: list[str] = []
    number = 0
    i = 0
    while i < len(argv):
        token = argv[i]
        flag, eq, inline = token.partition("=")
        head, dot, rest = flag[2:].partition(".") if flag.startswith("--") else ("", "", "")
        if head not in parameters:
            out.append(token)
            i += 1
            continue
        if eq:
            value, taken = inline, [token]
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value, taken = argv[i + 1], [token, argv[i + 1]]
        else:  # no value: jsonargparse's error to report
            out.append(token)
            i += 1
            continue
        i += len(taken)
        if not dot:
            try:
                mapping = yaml.safe_load(value)
            except yaml.YAMLError:
                mapping = None
            if not isinstance(mapping, dict):  # null, a file path, a typo: as given
                out += taken
                continue
        key = f"{_SEP}{number}" + (f"{_SEP}{rest.replace('.', _SEP)}" if dot else "")
        out += [f"--{head}.{key}", value]
        number += 1
    return out


def _unnumbered(key):
    """`/3/attention/name` -> `attention/name`, `/4` -> `` (a whole mapping); other keys as they are."""
    if isinstance(key, str) and key.startswith(_SEP):
        return "".join(key.split(_SEP, 2)[2:])
    return key


def _parser_class(parameters: dict[str, bool], path: str):
    """An ArgumentParser that folds the rewritten keys of `parameters` (see `merged_argv`) back into nested
    mappings: in what the entry point receives, and in what `--print_config` shows."""

    def fold(cfg, prefix: str = ""):
        for name, spec in parameters.items():
            value = cfg.get(prefix + name)
            if isinstance(value, dict):
                cfg[prefix + name] = expand_overrides([(_unnumbered(k), v) for k, v in value.items()], spec)
        return cfg

    class Parser(ArgumentParser):
        def parse_args(self, *args, **kwargs):
            return fold(super().parse_args(*args, **kwargs), f"{path}." if path else "")

        def error(self, message: str, ex: Exception | None = None):
            if checking() and self.exit_on_error:
                raise _NotParsed(message)
            if _UNION_DUMP in message:  # say what is wrong, not how each subtype of the Union failed
                key = message.split(":", 1)[0] + ": " if message.startswith("Parser key") else ""
                message = key + reason(ex if ex is not None else ValueError(message))
            super().error(message, ex)

        def dump(self, cfg, *args, **kwargs):
            return super().dump(fold(cfg.clone()), *args, **kwargs)

    return Parser


def _subcommand(argv: list[str], tree: dict) -> tuple[str, Callable | None]:
    """("evaluate.perplexity", its function) for the subcommand that argv names; ("", None) if none."""
    node, names = tree, []
    for token in argv:
        if isinstance(node, dict) and token in node:
            node, names = node[token], [*names, token]
            if callable(node):
                return ".".join(names), node
    return "", None


def main(argv: list[str] | None = None) -> None:
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # field docstrings -> --help
    warnings.formatwarning = one_line_warning  # on the command line a warning is a line, not a source excerpt
    argv = list(sys.argv[1:] if argv is None else argv)
    tree = commands()
    path, function = _subcommand(argv, tree)
    accepted = inspect.signature(function).parameters if function else {}
    parameters = {name: spec for name, spec in MERGED_PARAMETERS.items() if name in accepted}
    try:
        parser_class = _parser_class(parameters, path)

        def run(args: list[str]) -> None:
            args = merged_argv(args, parameters)
            CLI(tree, args=args, as_positional=False, allow_abbrev=False, prog="litattn", parser_class=parser_class)

        if function is not None and any(_is_print_config(token) for token in argv):
            _check_before_printing(run, [token for token in argv if not _is_print_config(token)])
        run(argv)
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly, without the flush error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except (ValueError, OSError, RuntimeError) as e:
        # Bad input (or a full disk, an unwritable path): one line that names the problem, exit 2, no traceback.
        print(f"litattn: error: {reason(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C before a run installs its own handling (e.g. while tokenizing)
        print("litattn: interrupted", file=sys.stderr)
        sys.exit(130)


_UNION_DUMP = "Does not validate against any of the Union subtypes"
_NOT_NONE = "Expected a <class 'NoneType'>"


def reason(e: BaseException) -> str:
    """What an error says to the user: its message; for jsonargparse's dump of how each subtype of a Union failed
    (`data: DataModule | None`, a dataclass option such as `set: SETPlacement | None`: 7-12 lines ending in a
    Namespace), the one failure that matters, e.g. `set.pool must be in [1, 8], got 20`."""
    if _UNION_DUMP not in str(e):
        return str(e)
    while _UNION_DUMP in str(e) and e.__cause__ is not None and not str(e.__cause__).startswith(_NOT_NONE):
        e = e.__cause__  # jsonargparse raises the dump `from` the first subtype's error
    text = str(e)
    if _UNION_DUMP in text:  # no usable cause: the first listed error that is not a subtype mismatch
        items = [line.strip()[2:] for line in text.splitlines() if line.strip().startswith("- ")]
        text = next((i for i in items if not i.startswith((_UNION_DUMP, _NOT_NONE))), text)
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _is_print_config(token: str) -> bool:
    return token == "--print_config" or token.startswith("--print_config=")


def _check_before_printing(run: Callable[[list[str]], object], argv: list[str]) -> None:
    """`--print_config` prints only a config the command would run with: run the entry point without it, up to
    where its checks end (`litattn.args.start_work`); a failed check is then the command's own one-line error.
    A command line that does not parse (e.g. a required argument not given yet: a template is being printed)
    is left to jsonargparse's printing, which reports what it must."""
    try:
        with checks_only():
            run(argv)
    except (ChecksPassed, _NotParsed):
        return
    raise RuntimeError("the command ran without checking its arguments first (litattn.args.start_work)")


class _NotParsed(Exception):
    """The command line did not parse while checking it before `--print_config`."""


def parse_config(command: list[str], config: dict) -> str:
    """The config as `litattn <command> --config ... --print_config` prints it: parsed against the subcommand's
    signature and checked as the command would check it, without running it. ValueError with the error's last
    line when it does not parse or check."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(config, f)
    try:
        return check_command([*command, "--config", f.name])
    finally:
        os.unlink(f.name)


def check_command(argv: list[str]) -> str:
    """What `litattn <argv> --print_config` prints: the command line parsed and checked as the command would check
    it, without running it. ValueError with the error's last line when it does not parse or check."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main([*argv, "--print_config"])
    except SystemExit as e:
        if e.code:
            raise ValueError((err.getvalue().strip().splitlines() or ["(no message)"])[-1]) from None
    return out.getvalue()


def one_line_warning(message, category, filename, lineno, file=None, line=None) -> str:
    return f"litattn: warning: {message}\n"
