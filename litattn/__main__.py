"""The `litattn` command line: one subcommand per entry point (jsonargparse).

Every subcommand takes `--config FILE`, `--print_config` and dotted overrides
(`--model.attention.name ssa`). Entry points are imported lazily so `litattn --help` is quick.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


def attention_list() -> None:
    """List the registered attention mechanisms with a one-line description each."""
    from litattn.attention import available_attention, describe, get_attention

    width = max(len(n) for n in available_attention())
    for name in available_attention():
        print(f"{name:<{width}}  {describe(get_attention(name))}")


def model_list(attention: dict | None = None) -> None:
    """List the model presets with their size and context length.

    Args:
        attention: Build them with this attention spec, e.g. `{name: ssa}`, and show the parameters it adds.
    """
    import torch

    from litattn.config import PRESETS, Config
    from litattn.model import GPT

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


def commands() -> dict[str, Callable | dict[str, Callable]]:
    from litattn.ablate import ablate
    from litattn.convert import from_hf_main, to_hf_main
    from litattn.evaluate import perplexity
    from litattn.finetune.finetune import setup as finetune
    from litattn.generate import main as generate
    from litattn.pretrain.pretrain import setup as pretrain
    from litattn.visualize import attention as visualize_attention

    return {
        "pretrain": pretrain,
        "finetune": finetune,
        "generate": generate,
        "ablate": ablate,
        "convert": {"from_hf": from_hf_main, "to_hf": to_hf_main},
        "evaluate": {"perplexity": perplexity},
        "visualize": {"attention": visualize_attention},
        "attention": {"list": attention_list},
        "model": {"list": model_list},
    }


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import CLI, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # field docstrings -> --help
    try:
        CLI(commands(), args=argv, as_positional=False, allow_abbrev=False, prog="litattn")
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly, without the flush error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        # Bad input: one line that names the problem, non-zero exit, no traceback.
        print(f"litattn: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
