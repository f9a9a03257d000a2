"""`litattn evaluate passkey`: the passkey retrieval test (Landmark attention; Self-Extend).

    litattn evaluate passkey --checkpoint_dir out/pretrain/final [--lengths [1024,2048]] [--depths [0.0,0.5,1.0]]

A random 5-digit key is hidden at a chosen depth of repetitive filler text, and the model is asked for it:

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you
    about the important information there. The grass is green. The sky is blue. ... The pass key is 12345.
    Remember it. 12345 is the pass key. ... The grass is green. ... What is the pass key? The pass key is

The filler is a cycle of five sentences; its count is chosen per prompt so that the prompt, tokenized by the
checkpoint's tokenizer, has at most `length - max_new_tokens` tokens and as many as fit (the actual counts are
reported). The key sentence goes after `round(depth * filler sentences)` of them: depth 0 right after the
instructions, depth 1 right before the question. The model answers greedily (KV cache) with up to
`max_new_tokens` tokens; an answer is correct when the first number in it (spaces removed) is the key. Its
digit accuracy (the share of the key's digits it has at their place) shows partial retrieval too.
Each cell (length, depth) uses the same `trials` keys, drawn from `random.Random(seed)`.
"""

from __future__ import annotations

import json
import random
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from litattn.args import check_range, check_seed, start_work
from litattn.checkpoint import load_with_tokenizer
from litattn.evaluate import require_some_run, too_long
from litattn.generate import generate
from litattn.passkey_prompts import (  # noqa: F401  (the passkey test's prompts, also read as passkey.*)
    DEFAULT_DEPTHS,
    FILLER,
    INTRO,
    KEY_SENTENCE,
    QUESTION,
    Prompt,
    PromptBuilder,
    build_prompt,
    digits_correct,
    is_correct,
    prompt_text,
)
from litattn.tokenizer import Tokenizer
from litattn.utils import atomic_write, atomic_write_text
from litattn.visualize import describe_spec, plain_text


def _answer(model: Any, tokenizer: Any, ids: list[int], max_new_tokens: int) -> str:
    """The model's greedy continuation of the prompt ids, decoded (without an end-of-sequence token)."""

    out = generate(model, torch.tensor(ids, dtype=torch.long), max_new_tokens, temperature=0.0, eos_id=tokenizer.eos_id)
    new = [t for t in out.tolist()[len(ids) :] if t != tokenizer.eos_id]
    return tokenizer.decode(new)


def passkey(
    checkpoint_dir: Path,
    lengths: list[int] | None = None,
    depths: list[float] | None = None,
    trials: int = 5,
    seed: int = 0,
    attention: dict | None = None,
    out_dir: Path | None = None,
    max_new_tokens: int = 8,
    context: int | None = None,
) -> dict[str, Any]:
    """Passkey retrieval accuracy of a checkpoint: a 5-digit key hidden in filler text, answered greedily.

    Args:
        checkpoint_dir: A checkpoint directory (model.safetensors, model_config.yaml, tokenizer).
        lengths: Total lengths in tokens (the prompt, at most `length - max_new_tokens` tokens, plus the answer);
            default: the model's block_size. A length beyond what the attention mechanism handles is reported
            as an error row.
        depths: Where the key goes in the filler, as fractions in [0, 1] (0: first, 1: last);
            default: [0.0, 0.25, 0.5, 0.75, 1.0].
        trials: Keys tried per (length, depth) cell; every cell uses the same keys.
        seed: Seed of the keys (random.Random), for reproducible runs (0 to 2**32 - 1).
        attention: Evaluate with another attention spec than the checkpoint's, e.g. `{name: causal, kernel: sdpa}`;
            keys without a `name` update the saved spec's options.
        out_dir: Where to write passkey.json and passkey.png; default: `<checkpoint_dir>/eval/`.
        max_new_tokens: Most tokens the model may answer with.
        context: Accept lengths up to this many tokens, beyond what the attention handles at block_size (RoPE
            positions extrapolate: the baseline for context extension); default: what the attention handles.

    Returns:
        The results written to passkey.json: the checkpoint, attention spec, keys and one row per length with a
        cell per depth (`correct`, `trials`, `accuracy`, the prompts' token counts and answers), or an `error`.
    """

    checkpoint_dir = Path(checkpoint_dir)
    check_range("trials", trials, ge=1)
    check_range("max_new_tokens", max_new_tokens, ge=1)
    check_seed("seed", seed)
    check_range("context", context, ge=1, null="what the attention handles")
    if lengths is not None:
        if not lengths:
            raise ValueError("lengths must be a non-empty list of token counts (or null for block_size), got []")
        for n in lengths:
            check_range(f"lengths (each of {list(lengths)})", n, ge=1)
    if depths is not None and not depths:
        raise ValueError("depths must be a non-empty list of fractions in [0, 1] (or null for the default), got []")
    depths = [float(d) for d in (DEFAULT_DEPTHS if depths is None else depths)]
    for d in depths:
        check_range(f"depths (each of {depths})", d, ge=0, le=1)
    start_work()
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:  # RuntimeError: the CLI reports it in one line
        raise RuntimeError(f"The passkey heatmap needs matplotlib: pip install 'litattn[plot]' ({e})") from None
    rng = random.Random(seed)
    keys = [rng.randint(10000, 99999) for _ in range(trials)]
    try:
        tokenizer = Tokenizer(checkpoint_dir)  # to check the lengths before the model loads
    except FileNotFoundError:
        tokenizer = None  # load_with_tokenizer says what is missing
    if tokenizer is not None and lengths is not None:
        _check_lengths(tokenizer, lengths, keys, max_new_tokens)

    model, tokenizer, config = load_with_tokenizer(checkpoint_dir, attention=attention, context=context)
    model.eval()
    max_len = model.max_seq_length
    lengths = [int(n) for n in lengths] if lengths else [config.block_size]
    _check_lengths(tokenizer, lengths, keys, max_new_tokens)
    build = PromptBuilder(tokenizer)

    rows: list[dict[str, Any]] = []
    valid = [n for n in lengths if n <= max_len]
    with tqdm(total=len(valid) * len(depths) * trials, desc="passkey", unit="prompt", delay=2.0, leave=False) as bar:
        for n in lengths:
            if n > max_len:
                rows.append({"length": n, "error": too_long(n, max_len, config)})
                continue
            cells = []
            for depth in depths:
                answers = []
                for key in keys:
                    bar.set_postfix(length=n, depth=depth)
                    prompt = build(key, depth, n - max_new_tokens)
                    with torch.no_grad():
                        text = _answer(model, tokenizer, prompt.ids, max_new_tokens)
                    answers.append(
                        {
                            "key": key,
                            "answer": text,
                            "correct": is_correct(text, key),
                            "digits": digits_correct(text, key),
                            "prompt_tokens": len(prompt.ids),
                            "filler_sentences": prompt.filler_sentences,
                            "key_position": prompt.key_position,
                        }
                    )
                    bar.update(1)
                correct = sum(a["correct"] for a in answers)
                tokens = [a["prompt_tokens"] for a in answers]
                cells.append(
                    {
                        "depth": depth,
                        "correct": correct,
                        "trials": len(answers),
                        "accuracy": correct / len(answers),
                        "digit_accuracy": sum(a["digits"] for a in answers) / len(answers),
                        "prompt_tokens_min": min(tokens),
                        "prompt_tokens_max": max(tokens),
                        "answers": answers,
                    }
                )
            rows.append({"length": n, "cells": cells})

    result = {
        "checkpoint_dir": str(checkpoint_dir),
        "attention": config.attention,
        "max_seq_length": max_len,
        "lengths": lengths,
        "depths": depths,
        "trials": trials,
        "seed": seed,
        "keys": keys,
        "max_new_tokens": max_new_tokens,
        "results": rows,
    }
    print(format_table(rows, depths))
    require_some_run(rows)
    out_dir = checkpoint_dir / "eval" if out_dir is None else Path(out_dir)

    atomic_write_text(out_dir / "passkey.json", json.dumps(result, indent=2) + "\n")
    heatmap(result, out_dir / "passkey.png")
    print(f"Saved {out_dir / 'passkey.json'} and {out_dir / 'passkey.png'}")
    return result


def _check_lengths(tokenizer: Any, lengths: list[int], keys: list[int], max_new_tokens: int) -> None:
    """ValueError unless every length holds the prompt without filler (for each key) plus max_new_tokens."""
    build = PromptBuilder(tokenizer)
    shortest = max(build.shortest(k) for k in keys) + max_new_tokens

    for n in lengths:
        check_range(f"lengths (each of {list(lengths)}; the prompt without filler plus max_new_tokens)", n, ge=shortest)


def format_table(rows: list[dict[str, Any]], depths: list[float]) -> str:
    """The results as an aligned text table: a line per length, a column per depth, cells `correct/trials`."""
    lines = [f"{'length':>8} {'prompt tokens':>14} " + " ".join(f"{f'depth {d:g}':>10}" for d in depths)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['length']:>8} error: {r['error']}")
            continue
        low = min(c["prompt_tokens_min"] for c in r["cells"])
        high = max(c["prompt_tokens_max"] for c in r["cells"])
        tokens = f"{low}" if low == high else f"{low}-{high}"
        lines.append(
            f"{r['length']:>8} {tokens:>14} " + " ".join(f"{c['correct']}/{c['trials']}".rjust(10) for c in r["cells"])
        )
    return "\n".join(lines)


def heatmap(result: dict[str, Any], out_file: Path) -> Path:
    """Draw the accuracy per (length, depth) as an annotated heatmap PNG (error rows grey), written atomically."""
    import matplotlib
    from matplotlib.figure import Figure

    rows, depths = result["results"], result["depths"]
    acc = np.full((len(rows), len(depths)), np.nan)
    for i, r in enumerate(rows):
        for j, c in enumerate(r.get("cells", [])):
            acc[i, j] = c["accuracy"]
    fig = Figure(figsize=(1.2 + 0.9 * len(depths), 1.4 + 0.45 * len(rows)), layout="constrained")
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="lightgrey")  # grey: an error row
    image = ax.imshow(np.ma.masked_invalid(acc), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_yticks(range(len(rows)), [str(r["length"]) for r in rows])
    ax.set_xlabel("depth of the key")
    ax.set_ylabel("length (tokens)")
    for i, r in enumerate(rows):
        if "error" in r:
            ax.text((len(depths) - 1) / 2, i, "beyond the model's context", ha="center", va="center", fontsize=8)
            continue
        for j, c in enumerate(r["cells"]):
            color = "white" if c["accuracy"] < 0.25 or c["accuracy"] > 0.85 else "black"  # readable on dark red/green
            ax.text(j, i, f"{c['correct']}/{c['trials']}", ha="center", va="center", fontsize=8, color=color)
    fig.colorbar(image, ax=ax, label="accuracy")
    name = Path(result["checkpoint_dir"]).resolve().name
    title = plain_text(f"passkey · {describe_spec(result['attention'])} · {name}")
    width = max(12, int(fig.get_figwidth() * 11))  # characters of 9-point text per line in this figure's width
    ax.set_title("\n".join(textwrap.wrap(title, width, break_long_words=True)), fontsize=9)
    out_file = Path(out_file)
    atomic_write(out_file, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return out_file
