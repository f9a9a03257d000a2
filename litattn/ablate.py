"""`litattn ablate`: run attention variants x seeds at an equal budget and tabulate the outcome.

    litattn ablate --config config_hub/ablations/smoke.yaml [--dry_run true]

Each run is the base recipe (a config_hub YAML) + the ablation's common overrides + the variant's
overrides + the budget + the seed, written to `<out_dir>/<variant>/seed-<seed>/run.yaml` and run
as its own `litattn <entry_point>` process. A given seed means the same initial RNG stream and
the same data order for every variant, so variants differ only in what they override. `{seed}` and
`{variant}` in a string value become the run's own (a second stage continuing each run of a first:
`initial_checkpoint_dir: out/stage-1/{variant}/seed-{seed}/final`).

A run is finished when its `summary.json` exists; a rerun skips finished runs and resumes
interrupted ones from their newest checkpoint (`step-*/` or `final/`: every run gets `--resume auto`), so a
grid killed at any point completes where it stopped. Ctrl-C stops the grid once the running runs (which get
it too) have saved. Results: `results.csv` (one row per run; an empty cell where a run's figure is unknown),
`results.md` (mean and spread over seeds per variant), `loss_curves.png` and `summary.png`. With an
`evaluate` section, each run's final checkpoint is then evaluated (perplexity, passkey) at several lengths
with several attention specs: `evaluation.md` and friends.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from litattn import ablate_evaluate, ablate_prepare
from litattn.args import check_range, check_seed, start_work
from litattn.checkpoint import latest_checkpoint
from litattn.cli import parse_config
from litattn.config import merge_overrides, resolve_model_config
from litattn.stats import format_ci, paired_ci
from litattn.utils import atomic_write, atomic_write_text, remove_stale_temps, version_number


@dataclass
class Run:
    variant: str
    seed: int
    directory: Path

    @property
    def finished(self) -> bool:
        return (self.directory / "summary.json").is_file()

    @property
    def name(self) -> str:
        return f"{self.variant}/seed-{self.seed}"


def ablate(
    base: Path,
    variants: dict[str, dict],
    seeds: list[int] = (1, 2, 3),
    budget: dict[str, int] | None = None,
    overrides: dict | None = None,
    out_dir: Path = Path("out/ablations/run"),
    entry_point: str = "pretrain",
    baseline: str | None = None,
    parallel: int = 1,
    evaluate: dict | None = None,
    prepare: list[dict] | None = None,
    dry_run: bool = False,
) -> Path:
    """Run every variant x seed of an ablation and write results.csv, results.md and plots.

    Args:
        base: The recipe every run starts from (a YAML for the entry point, e.g. config_hub/pretrain/debug.yaml).
        variants: Variant name -> overrides of the recipe, e.g. `{ssa: {model: {attention: {name: ssa}}}}`.
        seeds: Seeds run for every variant (init and data order): distinct integers from 0 to 2**32 - 1.
        budget: The equal budget: train.* limits such as `{max_steps: 200}` or `{max_tokens: 1000000}`.
        overrides: Overrides applied to every run before the variant's (e.g. data, eval interval).
        out_dir: Where runs and results go.
        entry_point: The litattn subcommand that runs the recipe (pretrain or finetune).
        baseline: The variant others are compared with (parameters added); default: the first.
        parallel: Runs at once (>= 1). On CUDA, run i gets device i % parallel; on CPU keep 1 (runs share the cores).
        evaluate: Evaluate each run's final checkpoint afterwards (litattn/ablate_evaluate.py): `attention` maps
            labels to the specs to evaluate with, `perplexity` and `passkey` hold `litattn evaluate` arguments,
            e.g. `{attention: {causal: {name: causal}}, passkey: {lengths: [256, 512], context: 512}}`.
        prepare: litattn commands run before the runs, each skipped once the path it `creates` exists
            (litattn/ablate_prepare.py), e.g. a scorer finetuned and a dictionary built from it;
            `{seed}` in a step runs it once per seed.
        dry_run: Print the planned runs and exit.
    """
    base = Path(base)
    if not base.is_file():
        raise FileNotFoundError(f"Ablation base recipe {str(base)!r} not found")
    if not variants:
        raise ValueError("The ablation has no variants: give `variants: {name: {overrides...}}`")
    if not seeds:
        raise ValueError("The ablation has no seeds: give e.g. `seeds: [1, 2, 3]`")
    for seed in seeds:
        check_seed(f"seeds (each of {list(seeds)})", seed)
    if len(set(seeds)) < len(seeds):
        raise ValueError(f"seeds must differ from each other (each seed is one run per variant), got {list(seeds)}")
    check_range("parallel", parallel, ge=1)
    baseline = baseline or next(iter(variants))
    if baseline not in variants:
        raise ValueError(f"baseline {baseline!r} is not one of the variants {list(variants)}")
    start_work()
    out_dir = Path(out_dir)
    recipe = _load_yaml(base)
    runs = [Run(v, s, out_dir / v / f"seed-{s}") for v in variants for s in seeds]

    configs = {run.name: _run_config(recipe, overrides, variants[run.variant], budget, run) for run in runs}
    for variant in variants:  # a misspelt key in a variant fails now, not after an hour of other runs
        _validate(entry_point, configs[f"{variant}/seed-{seeds[0]}"], variant)

    if evaluate is not None:
        specs = {v: (configs[f"{v}/seed-{seeds[0]}"].get("model") or {}).get("attention") for v in variants}
        trained = {v: a for v, a in specs.items() if isinstance(a, dict)}
        evaluations = ablate_evaluate.plan(evaluate, runs, trained, configs)
    else:
        evaluations = []

    steps = ablate_prepare.plan(prepare, list(seeds)) if prepare is not None else []

    print(f"Ablation {out_dir}: {len(variants)} variants x {len(seeds)} seeds, budget {budget or 'as in the recipe'}")
    for step in steps:
        print(f"  {step.name:<40} {'done' if step.done else 'new'}: creates {step.creates}")
    for run in runs:
        state = "done" if run.finished else ("resume" if _has_checkpoint(run) else "new")
        print(f"  {run.name:<40} {state}")
    for e in evaluations:
        print(f"  {e.run.name:<40} evaluate {e.kind} with {e.label}: {'done' if e.result_file.is_file() else 'new'}")
    if dry_run:
        return out_dir

    for directory in (out_dir, *(run.directory for run in runs)):  # what a killed ablate or run was writing
        remove_stale_temps(directory)
    ablate_prepare.execute(steps, out_dir)
    todo = [r for r in runs if not r.finished]
    for run in todo:
        shutil.rmtree(run.directory / "eval", ignore_errors=True)  # evaluations of a checkpoint about to change
        run.directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run.directory / "run.yaml", yaml.safe_dump(configs[run.name], sort_keys=False))
    _execute(todo, entry_point, parallel)

    report(runs, list(variants), baseline, seeds, budget, out_dir)
    if evaluations:
        ablate_evaluate.execute(evaluations)
        rows = ablate_evaluate.rows(evaluations)
        print(ablate_evaluate.write(rows, list(seeds), out_dir, evaluate.get("baseline"), baseline))
        written = [out_dir / "evaluation.csv", out_dir / "evaluation.md", out_dir / "evaluation.png"]
        if grids := ablate_evaluate.depth_accuracy(evaluations):
            ablate_evaluate.plot_depths(grids, out_dir / "passkey_depths.png")
            written.append(out_dir / "passkey_depths.png")
        print(f"Wrote {', '.join(map(str, written))}")
    return out_dir


def report(runs: list[Run], variants: list[str], baseline: str, seeds: list[int], budget, out_dir: Path) -> None:
    """results.csv, results.md, loss_curves.png and summary.png of finished runs."""
    rows = [_result(run, baseline, runs) for run in runs]
    _write_csv(out_dir / "results.csv", rows)
    table = _markdown(rows, variants, seeds, budget, baseline) + _epoch_tables(runs, variants)
    atomic_write_text(out_dir / "results.md", table)
    print(table)
    _plots(runs, rows, variants, out_dir)
    print(
        f"Wrote {out_dir / 'results.csv'}, {out_dir / 'results.md'}, {out_dir / 'loss_curves.png'}, "
        f"{out_dir / 'summary.png'}"
    )


# ---------------------------------------------------------------------------------- running
def _run_config(recipe: dict, overrides: dict | None, variant: dict | None, budget: dict | None, run: Run) -> dict:
    config = merge_overrides(recipe, overrides or {}, variant or {})
    if budget:  # the budget replaces every limit of the recipe, so all variants stop at the same point
        train = config.setdefault("train", {})
        for limit in ("max_steps", "max_tokens", "epochs", "max_time"):
            train.pop(limit, None)
        train.update(budget)
    config.update(seed=run.seed, out_dir=str(run.directory))
    return _fill_placeholders(config, run)


def _fill_placeholders(value: Any, run: Run) -> Any:
    """`{seed}` and `{variant}` in any string of a run's config become the run's own, so a run can continue its
    seed's checkpoint of an earlier ablation (`initial_checkpoint_dir: out/stage-1/{variant}/seed-{seed}/final`)."""
    if isinstance(value, dict):
        return {k: _fill_placeholders(v, run) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill_placeholders(v, run) for v in value]
    if isinstance(value, str):
        return value.replace("{seed}", str(run.seed)).replace("{variant}", run.variant)
    return value


def _validate(entry_point: str, config: dict, variant: str) -> None:
    """Parse a run's config against the entry point's signature, and build its model config."""
    try:
        parse_config([entry_point], config)  # parsed and range-checked as the command would
    except ValueError as e:
        raise ValueError(f"Variant {variant!r} is not a valid {entry_point} recipe: {e}") from None
    if entry_point == "pretrain":
        resolve_model_config(config.get("model_name", "quickstart"), config.get("model"))


def _execute(todo: list[Run], entry_point: str, parallel: int) -> None:
    """Run the processes, at most `parallel` at once; a failed run stops the grid with its log's tail.
    Ctrl-C (which the runs, in the same process group, receive too) waits for the running runs to save."""
    active = []
    try:
        _launch(todo, entry_point, parallel, active)
    except KeyboardInterrupt:
        if active:
            print(
                f"Interrupted: waiting for {', '.join(run.name for run, _, _ in active)} to save "
                "(Ctrl-C again to stop waiting); rerun the ablation to continue",
                file=sys.stderr,
                flush=True,
            )
            try:
                for _, proc, _ in active:
                    proc.wait()
            except KeyboardInterrupt:
                pass
        raise


def _launch(todo: list[Run], entry_point: str, parallel: int, active: list) -> None:
    pending = list(todo)
    while pending or active:
        while pending and len(active) < max(1, parallel):
            run = pending.pop(0)
            # --resume auto: a run killed after any checkpoint (step-*/ or final/) continues from the newest
            args = [sys.executable, "-m", "litattn", entry_point, "--config", str(run.directory / "run.yaml")]
            args += ["--resume", "auto"]
            env = dict(os.environ)
            if parallel > 1 and _cuda_count():
                env["CUDA_VISIBLE_DEVICES"] = str(len(active) % _cuda_count())
            print(f"[{time.strftime('%H:%M:%S')}] running {run.name}", flush=True)
            log = open(run.directory / "log.txt", "a")
            active.append((run, subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        time.sleep(0.2)
        for item in list(active):
            run, proc, log = item
            if proc.poll() is None:
                continue
            active.remove(item)
            log.close()
            if proc.returncode != 0 or not run.finished:
                for _, other, _ in active:
                    other.terminate()
                tail = (run.directory / "log.txt").read_text(errors="replace").strip().splitlines()[-5:]
                raise RuntimeError(
                    f"Run {run.name} failed (exit {proc.returncode}); see {run.directory / 'log.txt'}: "
                    + " | ".join(tail)
                )


def _cuda_count() -> int:
    return torch.cuda.device_count()


def _has_checkpoint(run: Run) -> bool:
    return latest_checkpoint(run.directory) is not None


# ---------------------------------------------------------------------------------- results
def _metrics(run: Run) -> list[dict[str, str]]:
    rows = []
    paths = (run.directory / "logs" / "csv").glob("version_*/metrics.csv")
    for path in sorted(paths, key=lambda p: version_number(p.parent) or 0):  # sessions in order
        with open(path) as f:
            rows.extend(csv.DictReader(f))
    return rows


def _series(rows: list[dict[str, str]], key: str) -> list[tuple[float, float]]:
    """(tokens, value) pairs of one metric, in logging order, the last value kept per step."""
    by_step = {}
    for r in rows:
        if r.get(key) not in (None, ""):
            by_step[int(r["step"])] = (float(r["tokens"]), float(r[key]))
    return [by_step[s] for s in sorted(by_step)]


def _result(run: Run, baseline: str, runs: list[Run]) -> dict[str, Any]:
    """One run's row; None where the figure is unknown (no validation; tokens/s or memory of a session that
    did not record them)."""
    summary = json.loads((run.directory / "summary.json").read_text())
    rows = _metrics(run)
    val = _series(rows, "val_loss")
    train = _series(rows, "train_loss")
    base_run = next(r for r in runs if r.variant == baseline and r.seed == run.seed)
    base_params = json.loads((base_run.directory / "summary.json").read_text())["parameters"]
    final_val = summary.get("val_loss")
    if final_val is None and val:
        final_val = val[-1][1]
    final_train = train[-1][1] if train else None
    memory = summary.get("peak_memory_bytes")
    return {
        "variant": run.variant,
        "seed": run.seed,
        "steps": summary["step"],
        "tokens": summary["tokens"],
        "final_val_loss": final_val,
        "final_val_ppl": math.exp(final_val) if final_val is not None else None,
        "best_val_loss": min([v for _, v in val] + [final_val]) if final_val is not None else None,
        "train_val_gap": final_val - final_train if final_val is not None and final_train is not None else None,
        "tokens_per_sec": summary.get("tokens_per_sec") or None,  # 0 (older summaries): not measured
        "peak_memory_gib": memory / 2**30 if memory else None,
        "parameters": summary["parameters"],
        "params_added": summary["parameters"] - base_params,
    }


def _write_csv(path: Path, rows: list[dict]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


COLUMNS = [  # (results.csv key, header, format)
    ("final_val_loss", "final val loss", ".4f"),
    ("final_val_ppl", "val ppl", ".2f"),
    ("best_val_loss", "best val loss", ".4f"),
    ("train_val_gap", "val - train", ".4f"),
    ("tokens_per_sec", "tokens/s", ",.0f"),
    ("peak_memory_gib", "peak mem GiB", ".2f"),
]


def _markdown(rows: list[dict], variants: list[str], seeds: list[int], budget, baseline: str | None = None) -> str:
    """Mean ± sample standard deviation over seeds (± 0 with one seed), over the runs that know the figure; then
    each variant's paired difference to the baseline (default: the first variant)."""
    header = ["variant", "runs"] + [h for _, h, _ in COLUMNS] + ["params added"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    unknown = False
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant]
        cells = [variant, str(len(mine))]
        for key, _, fmt in COLUMNS:
            values = [r[key] for r in mine if r[key] is not None]
            unknown |= len(values) < len(mine)
            if not values:
                cells.append("n/a")
                continue
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            of = f" ({len(values)} of {len(mine)} runs)" if len(values) < len(mine) else ""
            cells.append(f"{statistics.mean(values):{fmt}} ± {spread:{fmt}}{of}")
        cells.append(f"{mine[0]['params_added']:+,}")
        lines.append("| " + " | ".join(cells) + " |")
    paired = _paired_lines(rows, variants, baseline or variants[0])
    budget_text = ", ".join(f"{k}={v}" for k, v in (budget or {}).items()) or "the recipe's"
    note = (
        "\nn/a, or (k of n runs): a figure some runs do not have (no validation; tokens/s or peak memory of a run "
        "resumed from a checkpoint that does not record its earlier sessions').\n"
        if unknown
        else ""
    )
    return (
        "\n".join(lines)
        + f"\n\nSeeds {list(seeds)}; equal budget: {budget_text}; mean ± std over seeds.\n"
        + note
        + paired
    )


PAIRED = ("final_val_loss", "best_val_loss", "train_val_gap")  # the quality columns compared seed by seed


def _paired_lines(rows: list[dict], variants: list[str], baseline: str) -> str:
    """Each other variant minus the baseline, paired by seed: mean [95% Student-t interval], `*` where the
    interval excludes 0 (a difference larger than the seed-to-seed noise)."""
    others = [v for v in variants if v != baseline]
    if not others:
        return ""
    columns = [(k, h, f) for k, h, f in COLUMNS if k in PAIRED]
    header = ["variant"] + [h for _, h, _ in columns]
    lines = [
        f"\n**difference to {baseline}** (paired by seed; mean [95% CI], * where it excludes 0)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    base = {r["seed"]: r for r in rows if r["variant"] == baseline}
    for variant in others:
        cells = [variant]
        for key, _, fmt in columns:
            diffs = [
                r[key] - base[r["seed"]][key]
                for r in rows
                if r["variant"] == variant and r[key] is not None and base.get(r["seed"], {}).get(key) is not None
            ]
            cells.append(format_ci(*paired_ci(diffs), fmt) if diffs else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _by_epoch(run: Run) -> dict[int, tuple[float, float]]:
    """Epoch (1-based) -> (validation loss at its end, mean training loss over its steps), for the epochs whose
    last step was validated; {} for a run of fewer than two epochs."""
    summary = json.loads((run.directory / "summary.json").read_text())
    epochs = summary.get("epoch") or 0
    if epochs < 2 or summary["step"] % epochs:
        return {}
    per_epoch = summary["step"] // epochs
    rows = _metrics(run)
    train = {int(r["step"]): float(r["train_loss"]) for r in rows if r.get("train_loss")}
    val = {int(r["step"]): float(r["val_loss"]) for r in rows if r.get("val_loss")}
    out = {}
    for epoch in range(1, epochs + 1):
        end = epoch * per_epoch
        losses = [loss for step, loss in train.items() if end - per_epoch < step <= end]
        if end in val and losses:
            out[epoch] = (val[end], statistics.mean(losses))
    return out


def _epoch_tables(runs: list[Run], variants: list[str]) -> str:
    """For multi-epoch runs: validation loss and the validation - training gap at up to six epochs, mean ± std
    over seeds (the training loss is the mean over the epoch's logged steps)."""
    data = {run.name: _by_epoch(run) for run in runs}
    common = sorted(set.intersection(*(set(d) for d in data.values()))) if data else []
    if len(common) < 2:
        return ""
    shown = sorted({common[round(i * (len(common) - 1) / 5)] for i in range(6)})
    parts = []
    for title, value in (("validation loss", lambda v, t: v), ("validation - training loss", lambda v, t: v - t)):
        lines = [f"\n**{title}** at the end of epoch", "", "| variant | " + " | ".join(map(str, shown)) + " |"]
        lines.append("|" + "---|" * (len(shown) + 1))
        for variant in variants:
            cells = []
            for epoch in shown:
                values = [value(*data[r.name][epoch]) for r in runs if r.variant == variant]
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.mean(values):.3f} ± {spread:.3f}")
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n".join(parts) + "\n"


def _plots(runs: list[Run], rows: list[dict], variants: list[str], out_dir: Path) -> None:
    """loss_curves.png (every run's logged losses) and summary.png (the table's final validation losses)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for i, variant in enumerate(variants):
        color = colors[i % len(colors)]
        for j, run in enumerate(r for r in runs if r.variant == variant):
            logged = _metrics(run)
            for ax, key in zip(axes, ("train_loss", "val_loss"), strict=True):
                points = _series(logged, key)
                if points:
                    tokens, values = zip(*points, strict=True)
                    ax.plot(
                        tokens,
                        values,
                        color=color,
                        alpha=0.85,
                        lw=1.3,
                        label=variant if j == 0 else None,
                        marker="o" if key == "val_loss" else None,
                        ms=3,
                    )
    for ax, title in zip(axes, ("training loss", "validation loss"), strict=True):
        ax.set_title(f"{title} (one line per seed)")
        ax.set_xlabel("training tokens")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cross-entropy (nats)")
    labelled = [ax for ax in axes[::-1] if ax.get_legend_handles_labels()[0]]  # runs without validation: none
    if labelled:
        labelled[0].legend(title="variant")
    fig.tight_layout()
    fig.savefig(out_dir / "loss_curves.png", dpi=120)
    plt.close(fig)

    finals = {
        v: [r["final_val_loss"] for r in rows if r["variant"] == v and r["final_val_loss"] is not None]
        for v in variants
    }
    fig, ax = plt.subplots(figsize=(max(4.5, 1.4 * len(variants) + 2), 4))
    means = [statistics.mean(finals[v]) if finals[v] else math.nan for v in variants]  # nan: no bar
    spreads = [statistics.stdev(finals[v]) if len(finals[v]) > 1 else 0 for v in variants]
    ax.bar(variants, means, yerr=spreads, capsize=6, color=[colors[i % len(colors)] for i in range(len(variants))])
    for i, v in enumerate(variants):
        ax.scatter([i] * len(finals[v]), finals[v], color="black", s=12, zorder=3)
    known = [f for v in variants for f in finals[v]]
    if known:
        low, high = min(known), max(known)
        pad = max(0.02, 0.5 * (high - low))
        ax.set_ylim(low - pad, high + pad)
    ax.set_ylabel("final validation loss (nats)")
    ax.set_title("final validation loss\nmean ± std over seeds; dots: single seeds", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "summary.png", dpi=120)
    plt.close(fig)


def _load_yaml(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path} does not hold a YAML mapping")
    return values
