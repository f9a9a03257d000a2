"""Attention sinks and streaming, per variant and seed of an ablation: does a model put attention on its first
token, and does keeping that token in a bounded cache help it read beyond its context?

    python scripts/sinks.py out/ablations/sinks [--lengths 2048 4096]

For each `<ablation>/<variant>/seed-<s>/final`, on the data the run was trained on (its hyperparameters.yaml):
- the attention mass on position 0 ("sink mass") per layer at the late query positions (128-255 for a 256-token
  context), from `litattn evaluate attention` on 64 validation windows, beside the mass a uniform row would give
  it (1 / the keys a query sees, averaged over the bucket);
- `litattn evaluate streaming` loss at each length: window only (the latest block_size - 1 tokens), 1 sink + the
  same window, and recompute over the same window; by default 16 tokens per forward (`--stream_chunk`,
  `--stride`: each prediction then sees 240-255 recent tokens; 1 is exact and ~16x slower on a CPU).
A run trained with a `<|disrupt|>` at the start of every window (InjectTokens with `disrupt: {window_start:
true}`, the sink-token variants of config_hub/ablations/sinks*.yaml) has its streams begin with one. Prints
markdown tables, with the paired differences (by seed) and their 95% Student-t intervals; writes
`<ablation>/sinks.json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from jsonargparse import ArgumentParser

from litattn.checkpoint import load_hyperparameters
from litattn.data import DataModule, InjectTokens, StdlibCorpus
from litattn.evaluate import streaming_perplexity
from litattn.evaluate_attention import attention_statistics
from litattn.stats import format_ci, paired_ci
from litattn.utils import atomic_write_text

METHODS = ("window", "sink_window", "recompute")


def run_data(checkpoint: Path) -> DataModule:
    """The data module the checkpoint's run was trained on (the standard library where it names none)."""
    spec = (load_hyperparameters(checkpoint) or {}).get("data")
    if spec is None:
        return StdlibCorpus()
    parser = ArgumentParser()
    parser.add_argument("--data", type=DataModule)
    return parser.instantiate(parser.parse_object({"data": spec})).data


def has_sink_token(data: DataModule) -> bool:
    """Whether every training window began with a `<|disrupt|>` (the dedicated sink token)."""
    return isinstance(data, InjectTokens) and data.disrupt is not None and data.disrupt.window_start


def measure(checkpoint: Path, args: argparse.Namespace) -> dict:
    """Sink mass per layer (late bucket), its uniform value, and streaming loss per length and method."""
    data = run_data(checkpoint)
    sink_token = has_sink_token(data)
    out_dir = checkpoint.parent / "eval" / "attention"
    stats = attention_statistics(
        [checkpoint], data=data, windows=args.windows, out_dir=out_dir, cache_dir=args.cache_dir
    )
    stats = stats["checkpoints"][0]
    late = len(stats["buckets"]) - 2  # the last full power-of-two bucket (the final one holds position T alone)
    lo, hi = (int(x) for x in stats["buckets"][late].split("-"))
    uniform = statistics.fmean(1 / (i + 1) for i in range(lo, hi + 1))  # query i (1-based) sees i keys
    sink = [layer["by_bucket"]["sink_1"][late] for layer in stats["layers"]]
    streaming = {}
    for length in args.lengths:
        result = streaming_perplexity(
            checkpoint,
            length=length,
            sink_size=1,
            stream_chunk=args.stream_chunk,
            stride=args.stride,
            out_file=checkpoint.parent / "eval" / f"streaming-{length}.json",
            data=data.innermost(),
            cache_dir=args.cache_dir,
            first_token="<|disrupt|>" if sink_token else None,
            precision=args.precision,
        )
        streaming[length] = {r["method"]: r["loss"] for r in result["results"]}
    return {"bucket": stats["buckets"][late], "uniform": uniform, "sink_1": sink, "streaming": streaming}


def std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def ci(values: list[float], fmt: str = ".3f") -> str:
    return format_ci(*paired_ci(values), fmt=fmt)


def tables(results: dict[str, dict[int, dict]], lengths: list[int]) -> str:
    variants = list(results)
    seeds = sorted(results[variants[0]])
    first = results[variants[0]][seeds[0]]
    layers = len(first["sink_1"])
    lines = [
        f"Mass on position 0 at query positions {first['bucket']} (uniform: {first['uniform']:.4f}), per seed "
        f"({', '.join(map(str, seeds))}):",
        "",
        "| variant | " + " | ".join(f"layer {i}" for i in range(layers)) + " |",
        "|---|" + "---|" * layers,
    ]
    for v in variants:
        cells = [", ".join(f"{results[v][s]['sink_1'][i]:.3f}" for s in seeds) for i in range(layers)]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    lines += ["", "Streaming loss (nats; mean ± std over seeds), and sink + window minus window, paired by seed:", ""]
    lines += ["| variant | length | window | 1 sink + window | recompute | sink + window - window |"]
    lines += ["|---|---|---|---|---|---|"]
    for v in variants:
        for n in lengths:
            per = {m: [results[v][s]["streaming"][n][m] for s in seeds] for m in METHODS}
            cells = [f"{statistics.fmean(per[m]):.3f} ± {std(per[m]):.3f}" for m in METHODS]
            gain = ci([b - a for a, b in zip(per["window"], per["sink_window"], strict=True)])
            lines.append(f"| {v} | {n} | " + " | ".join(cells) + f" | {gain} |")
    if len(variants) > 1:
        base = variants[0]
        lines += ["", f"Each variant minus {base}, paired by seed:", ""]
        lines += ["| variant | length | window | 1 sink + window | recompute |", "|---|---|---|---|---|"]
        for v in variants[1:]:
            for n in lengths:
                cells = [
                    ci([results[v][s]["streaming"][n][m] - results[base][s]["streaming"][n][m] for s in seeds])
                    for m in METHODS
                ]
                lines.append(f"| {v} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ablation", type=Path, help="an ablation's out_dir: <variant>/seed-<s>/final inside")
    parser.add_argument("--variants", nargs="*", help="variants to measure (default: all, in directory order)")
    parser.add_argument("--lengths", nargs="*", type=int, default=[2048, 4096], help="streamed tokens")
    parser.add_argument("--windows", type=int, default=64, help="validation windows for the attention statistics")
    parser.add_argument("--stream_chunk", type=int, default=16, help="tokens per streaming forward (1: exact)")
    parser.add_argument("--stride", type=int, default=16, help="predictions per recompute forward (1: exact)")
    parser.add_argument("--cache_dir", type=Path, default=Path("cache"))
    parser.add_argument(
        "--precision",
        default="32-true",
        help="of the streaming rows (32-true: as the tables in docs; auto: bf16 "
        "where native, whose rounding is larger than the differences those tables measure)",
    )
    args = parser.parse_args()
    variants = args.variants or sorted(p.name for p in args.ablation.iterdir() if any(p.glob("seed-*/final")))
    if not variants:
        raise SystemExit(f"error: no <variant>/seed-<s>/final under {args.ablation}; run the ablation first")
    results: dict[str, dict[int, dict]] = {}
    for v in variants:
        results[v] = {}
        for final in sorted((args.ablation / v).glob("seed-*/final")):
            seed = int(final.parent.name.split("-")[1])
            results[v][seed] = measure(final, args)
    report = tables(results, args.lengths)
    print(report)
    atomic_write_text(args.ablation / "sinks.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(args.ablation / "sinks.md", report + "\n")


if __name__ == "__main__":
    main()
