"""The evaluation stage of `litattn ablate`: every run's final checkpoint evaluated at several lengths, with
several attention specs (e.g. causal against Self-Extend beyond the trained context), as mean ± std over seeds.

    evaluate:
      attention:                  # label -> spec the checkpoint is evaluated with; default {own: null}
        causal: {name: causal}
        se-g4-w64: {name: self_extend, group_size: 4, window: 64}
      perplexity: {lengths: [256, 512], max_batches: 4, context: 512}   # `litattn evaluate perplexity` arguments
      passkey: {lengths: [256, 512], trials: 4, context: 512}           # `litattn evaluate passkey` arguments
      answers: {data: {class_path: litattn.data.PyDocQA}, items: 64}  # `litattn evaluate answers` arguments
                                  # (data: own, seq_len: own: each run's own data and train.max_seq_length)
      variants: [se-g4]           # evaluate only these variants' runs (default: all), e.g. where a spec's
                                  # options belong to one mechanism
      baseline: causal            # the attention label others are compared with, paired by seed (default: the first)

Each evaluation is its own `litattn evaluate <kind> --config <run>/eval/<label>/<kind>.yaml` process writing
`<kind>.json` beside it; one whose JSON exists is skipped, so a rerun finishes only what is missing.
Outputs: `evaluation.csv` (one row per run x attention x kind x length), `evaluation.md` (per kind: mean ± std
and each seed's value, then every other label's difference to the baseline label, and every other variant's
difference to the ablation's baseline variant, paired by seed, with a 95% Student-t interval) and
`evaluation.png`; with passkey, `passkey_depths.png` (accuracy by length and depth). Answers give four kinds
(answer loss, exact match, first-line match, token F1) at one length, the items'.
"""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from litattn.attention.registry import normalize_attention_spec, split_spec
from litattn.cli import parse_config
from litattn.stats import format_ci, paired_ci
from litattn.utils import atomic_write, atomic_write_text

KINDS = ("perplexity", "passkey", "answers")  # the `litattn evaluate` subcommands an ablation runs
TABLES = {  # row kind -> what its table shows
    "perplexity": "perplexity",
    "passkey": "passkey accuracy",
    "passkey_digits": "passkey digit accuracy (share of the key's digits answered at their place)",
    "answer_loss": "answer loss (nats per answer token)",
    "exact_match": "greedy exact match (the whole answer)",
    "first_line_match": "greedy first-line match",
    "token_f1": "greedy token F1",
}
ANSWER_KINDS = ("answer_loss", "exact_match", "first_line_match", "token_f1")
"""The rows `litattn evaluate answers` gives (at one length: the items')."""
FORMATS = {"perplexity": ".3f", "answer_loss": ".4f"}
"""Cell format per row kind (others: .2f, shares)."""


@dataclass
class Evaluation:
    """One `litattn evaluate <kind>` of one run's final checkpoint with one attention spec."""

    run: Any  # litattn.ablate.Run
    kind: str
    label: str
    arguments: dict[str, Any]

    @property
    def directory(self) -> Path:
        return self.run.directory / "eval" / self.label

    @property
    def result_file(self) -> Path:
        return self.directory / f"{self.kind}.json"

    @property
    def config(self) -> dict[str, Any]:
        """The evaluate subcommand's config: the ablation's arguments, the checkpoint, the spec, the output."""
        config = {**self.arguments, "checkpoint_dir": str(self.run.directory / "final")}
        if self.kind in ("perplexity", "answers"):
            config["out_file"] = str(self.result_file)
        else:
            config["out_dir"] = str(self.directory)
        return config


def plan(
    spec: dict[str, Any],
    runs: list,
    trained_attention: dict[str, dict] | None = None,
    run_configs: dict[str, dict] | None = None,
) -> list[Evaluation]:
    """The evaluations of every run, checked (keys, attention specs, each subcommand's arguments) before any work.

    trained_attention: variant -> the attention spec its runs train with, where the recipe sets one; a spec
    without a `name` (options that update the checkpoint's spec) is checked merged into each chosen variant's.
    run_configs: run name -> its config, where `data: own` and `seq_len: own` come from (its data module, its
    train.max_seq_length): each run evaluated on what it was trained on, e.g. its own truncation.
    """
    if not isinstance(spec, dict):
        raise ValueError(f"evaluate must be a mapping of attention, perplexity and passkey, got {spec!r}")
    unknown = sorted(set(spec) - {"attention", "variants", "baseline", *KINDS})
    if unknown:
        raise ValueError(
            f"evaluate has unknown keys {unknown}; it takes attention, variants, baseline, {', '.join(KINDS)}"
        )
    kinds = [k for k in KINDS if k in spec]
    if not kinds:
        raise ValueError(f"evaluate names no evaluation: give the arguments of one of {list(KINDS)}")
    attention = spec.get("attention") or {"own": None}
    if not isinstance(attention, dict):
        raise ValueError(f"evaluate.attention must map labels to attention specs, got {attention!r}")
    baseline = spec.get("baseline")
    if baseline is not None and baseline not in attention:
        raise ValueError(f"evaluate.baseline {baseline!r} is not one of the attention labels {list(attention)}")
    names = list(dict.fromkeys(run.variant for run in runs))
    chosen = spec.get("variants") or names
    if not isinstance(chosen, list) or any(v not in names for v in chosen):
        raise ValueError(f"evaluate.variants must be a list of this ablation's variants {names}, got {chosen!r}")
    for label, att in attention.items():
        if att is None:
            continue
        if not isinstance(att, dict) or "name" in att:
            _check_attention(label, att)
            continue
        for variant in chosen:  # options alone: valid for every chosen variant's mechanism
            trained = (trained_attention or {}).get(variant)
            if trained is not None and "name" in trained:
                _check_attention(label, {**trained, **att}, f" (with variant {variant!r}'s {trained['name']!r})")
    evaluations = []
    for run in (r for r in runs if r.variant in chosen):
        for kind in kinds:
            arguments = dict(spec[kind] or {})
            if "attention" in arguments or "checkpoint_dir" in arguments:
                raise ValueError(f"evaluate.{kind} sets attention/checkpoint_dir; the ablation sets those itself")
            arguments = _own_values(kind, arguments, (run_configs or {}).get(run.name))
            for label, att in attention.items():
                evaluations.append(Evaluation(run, kind, label, {**arguments, **({"attention": att} if att else {})}))
    checked = set()
    for e in evaluations:  # each distinct config once (runs differ only in their paths, unless `own` is used)
        key = json.dumps({k: v for k, v in e.config.items() if k not in PATHS}, sort_keys=True, default=str)
        if key not in checked:
            checked.add(key)
            _check_arguments(e)
    return evaluations


PATHS = ("checkpoint_dir", "out_file", "out_dir")
"""The config keys that differ between runs' evaluations by construction."""


OWN = {
    "data": lambda config: config.get("data"),
    "seq_len": lambda config: (config.get("train") or {}).get("max_seq_length"),
}
"""Arguments that may be `own`: the run's value, read from its config."""


def _own_values(kind: str, arguments: dict[str, Any], run_config: dict | None) -> dict[str, Any]:
    """`arguments` with each `own` replaced by the run's value (OWN); a one-line error where there is none."""
    out = dict(arguments)
    for key, value in arguments.items():
        if value != "own":
            continue
        if key not in OWN:
            raise ValueError(f"evaluate.{kind}.{key}: only {' and '.join(OWN)} may be `own` (the run's value)")
        own = OWN[key](run_config or {})
        if own is None:
            raise ValueError(f"evaluate.{kind}.{key} is `own` but the run's recipe sets no {key}; name one")
        out[key] = own
    return out


def _check_attention(label: str, spec: Any, where: str = "") -> None:
    try:
        split_spec(normalize_attention_spec(spec))
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"evaluate.attention.{label}{where}: {e}") from None


def _check_arguments(evaluation: Evaluation) -> None:
    """Parse the config against the subcommand's signature, as the process will, without loading anything."""
    try:
        parse_config(["evaluate", evaluation.kind], evaluation.config)
    except ValueError as e:
        raise ValueError(f"evaluate.{evaluation.kind} is not valid for `litattn evaluate`: {e}") from None


def execute(evaluations: list[Evaluation]) -> None:
    """Run the missing evaluations one at a time; a failure stops the stage with its log's tail."""
    for e in evaluations:
        if e.result_file.is_file():
            continue
        e.directory.mkdir(parents=True, exist_ok=True)
        config = e.directory / f"{e.kind}.yaml"
        atomic_write_text(config, yaml.safe_dump(e.config, sort_keys=False))
        log_path = e.directory / f"{e.kind}.log"
        print(f"[{time.strftime('%H:%M:%S')}] evaluating {e.run.name} {e.kind} with {e.label}", flush=True)
        with open(log_path, "w") as log:
            args = [sys.executable, "-m", "litattn", "evaluate", e.kind, "--config", str(config)]
            code = subprocess.call(args, stdout=log, stderr=subprocess.STDOUT)
        if code != 0 or not e.result_file.is_file():
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(f"Evaluation {e.run.name} {e.kind} {e.label} failed (exit {code}): " + " | ".join(tail))


def rows(evaluations: list[Evaluation]) -> list[dict[str, Any]]:
    """One row per evaluation and length: the value (perplexity, or passkey accuracy over all depths) or an error."""
    out = []
    for e in evaluations:
        result = json.loads(e.result_file.read_text())
        for r in result["results"]:
            kinds = {"perplexity": ["perplexity"], "answers": ANSWER_KINDS}.get(e.kind, ["passkey", "passkey_digits"])
            values: dict[str, float | None] = dict.fromkeys(kinds)
            if "error" not in r and e.kind == "perplexity":
                values["perplexity"] = r["perplexity"]
            elif "error" not in r and e.kind == "answers":
                values.update({k: r[k] for k in ANSWER_KINDS})
            elif "error" not in r:
                trials = sum(c["trials"] for c in r["cells"])
                values["passkey"] = sum(c["correct"] for c in r["cells"]) / trials
                values["passkey_digits"] = sum(c["digit_accuracy"] * c["trials"] for c in r["cells"]) / trials
            for kind, value in values.items():
                out.append(
                    {
                        "variant": e.run.variant,
                        "seed": e.run.seed,
                        "attention": e.label,
                        "kind": kind,
                        "length": r["length"],
                        "value": value,
                        "error": r.get("error", ""),
                    }
                )
    return out


def _groups(table_rows: list[dict], kind: str) -> tuple[list[tuple[str, str]], list[int]]:
    mine = [r for r in table_rows if r["kind"] == kind]
    keys = list(dict.fromkeys((r["variant"], r["attention"]) for r in mine))
    lengths = sorted({r["length"] for r in mine})
    return keys, lengths


def _by_seed(table_rows: list[dict], kind: str, key: tuple[str, str], length: int) -> dict[int, float] | None:
    """Seed -> value of one cell; None when any seed's evaluation was an error (beyond the context)."""
    cell = [r for r in table_rows if (r["kind"], r["variant"], r["attention"], r["length"]) == (kind, *key, length)]
    if not cell or any(r["value"] is None for r in cell):
        return None
    return {int(r["seed"]): r["value"] for r in cell}


def _values(table_rows: list[dict], kind: str, key: tuple[str, str], length: int) -> list[float] | None:
    """The seeds' values of one cell; None when any seed's evaluation was an error (beyond the context)."""
    values = _by_seed(table_rows, kind, key, length)
    return None if values is None else list(values.values())


def markdown(
    table_rows: list[dict], seeds: list[int], baseline: str | None = None, baseline_variant: str | None = None
) -> str:
    """A table per kind: rows variant x attention, columns lengths, cells mean ± sample std over seeds and each
    seed's value; then, per kind, each other attention label's difference to `baseline` (default: the first
    label) in the same variant, and each other variant's difference to `baseline_variant` (default: the first
    variant) with the same label, paired by seed: mean [95% Student-t interval], `*` where it excludes 0."""
    parts = []
    for kind, title in TABLES.items():
        keys, lengths = _groups(table_rows, kind)
        if not keys:
            continue
        header = ["variant", "attention"] + [str(n) for n in lengths]
        lines = [f"**{title}** by length (tokens)", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        fmt = FORMATS.get(kind, ".2f")
        for key in keys:
            cells = list(key)
            for n in lengths:
                values = _values(table_rows, kind, key, n)
                if values is None:
                    cells.append("n/a")
                    continue
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                each = f" ({', '.join(f'{v:{fmt}}' for v in values)})" if len(values) > 1 else ""
                cells.append(f"{statistics.mean(values):{fmt}} ± {spread:{fmt}}{each}")
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
        for paired in (
            _paired_table(table_rows, kind, title, keys, lengths, baseline),
            _paired_table(table_rows, kind, title, keys, lengths, baseline_variant, by_variant=True),
        ):
            if paired:
                parts.append(paired)
    note = (
        f"Seeds {list(seeds)}; mean ± std over seeds (each seed's value in brackets); differences are paired by "
        "seed with a 95% Student-t interval, * where it excludes 0; n/a: beyond what the attention accepts "
        "(see evaluation.csv)."
    )
    return "\n\n".join(parts) + f"\n\n{note}\n"


def _paired_table(
    table_rows: list[dict],
    kind: str,
    title: str,
    keys: list[tuple[str, str]],
    lengths: list[int],
    baseline: str | None,
    by_variant: bool = False,
) -> str:
    """Each (variant, label) against the same variant's `baseline` label, or with `by_variant` against the
    `baseline` variant's same label; "" when nothing pairs."""
    axis = 0 if by_variant else 1  # which part of the key is compared
    names = list(dict.fromkeys(key[axis] for key in keys))
    baseline = baseline or names[0]

    def base_of(key: tuple[str, str]) -> tuple[str, str]:
        return (baseline, key[1]) if by_variant else (key[0], baseline)

    others = [k for k in keys if k[axis] != baseline and base_of(k) in keys]
    if not others:
        return ""
    short = title.split(" (")[0]
    header = ["variant", "attention"] + [str(n) for n in lengths]
    lines = [
        f"**{short}: difference to {'variant ' if by_variant else ''}{baseline}** (paired by seed; mean [95% CI])",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    fmt = FORMATS.get(kind, ".2f")
    for key in others:
        cells = list(key)
        for n in lengths:
            mine, base = _by_seed(table_rows, kind, key, n), _by_seed(table_rows, kind, base_of(key), n)
            if mine is None or base is None or mine.keys() != base.keys():
                cells.append("n/a")
                continue
            cells.append(format_ci(*paired_ci([mine[seed] - base[seed] for seed in mine]), fmt))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(
    table_rows: list[dict],
    seeds: list[int],
    out_dir: Path,
    baseline: str | None = None,
    baseline_variant: str | None = None,
) -> str:
    """evaluation.csv, evaluation.md and evaluation.png in out_dir; returns the markdown."""

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table_rows[0]))
            writer.writeheader()
            writer.writerows(table_rows)

    atomic_write(out_dir / "evaluation.csv", write_csv)
    table = markdown(table_rows, seeds, baseline, baseline_variant)
    atomic_write_text(out_dir / "evaluation.md", table)
    _plot(table_rows, out_dir / "evaluation.png")
    return table


def depth_accuracy(evaluations: list[Evaluation]) -> dict[tuple[str, str], dict[str, Any]]:
    """(variant, attention) -> passkey accuracy pooled over seeds per (length, depth): `lengths`, `depths` and
    `correct`/`trials` grids (rows lengths, columns depths; an error row has 0 trials)."""
    grids: dict[tuple[str, str], dict[str, Any]] = {}
    for e in (e for e in evaluations if e.kind == "passkey"):
        result = json.loads(e.result_file.read_text())
        lengths, depths = [r["length"] for r in result["results"]], result["depths"]
        grid = grids.setdefault(
            (e.run.variant, e.label),
            {"lengths": lengths, "depths": depths, "correct": np.zeros((len(lengths), len(depths)), dtype=int),
             "trials": np.zeros((len(lengths), len(depths)), dtype=int)},
        )  # fmt: skip
        if grid["lengths"] != lengths or grid["depths"] != depths:
            raise ValueError(f"{e.result_file}: lengths/depths differ from the other seeds' {grid['lengths']}")
        for i, r in enumerate(result["results"]):
            for j, c in enumerate(r.get("cells", [])):
                grid["correct"][i, j] += c["correct"]
                grid["trials"][i, j] += c["trials"]
    return grids


def plot_depths(grids: dict[tuple[str, str], dict[str, Any]], path: Path) -> None:
    """A heatmap per (variant, attention): passkey accuracy over all seeds by length (rows) and depth (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(grids), figsize=(1.2 + 3.2 * len(grids), 3.4), squeeze=False, sharey=True, layout="constrained"
    )
    cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="lightgrey")  # grey: beyond the context
    for ax, ((variant, label), g) in zip(axes[0], grids.items(), strict=True):
        with np.errstate(invalid="ignore", divide="ignore"):
            acc = np.where(g["trials"] > 0, g["correct"] / g["trials"], np.nan)
        image = ax.imshow(np.ma.masked_invalid(acc), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
        for i in range(acc.shape[0]):
            for j in range(acc.shape[1]):
                if g["trials"][i, j]:
                    ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(g["depths"])), [f"{d:g}" for d in g["depths"]])
        ax.set_yticks(range(len(g["lengths"])), [str(n) for n in g["lengths"]])
        ax.set_xlabel("depth of the key")
        ax.set_title(label if variant == "" else f"{variant} / {label}", fontsize=9)
    axes[0][0].set_ylabel("length (tokens)")
    fig.colorbar(image, ax=axes[0].tolist(), label="exact accuracy (all seeds)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot(table_rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in TABLES if any(r["kind"] == k for r in table_rows)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        keys, lengths = _groups(table_rows, kind)
        for key in keys:
            points = [(n, v) for n in lengths if (v := _values(table_rows, kind, key, n)) is not None]
            if not points:
                continue
            xs = [n for n, _ in points]
            means = [statistics.mean(v) for _, v in points]
            spreads = [statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in points]
            ax.errorbar(xs, means, yerr=spreads, marker="o", capsize=4, label=" / ".join(key))
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_xlabel("length (tokens)")
        ax.set_title(f"{TABLES[kind].split(' (')[0]} (mean ± std over seeds)")
        if kind == "perplexity":
            ax.set_yscale("log")
        elif kind != "answer_loss":  # shares
            ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
