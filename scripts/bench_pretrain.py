"""Benchmark the real `litattn pretrain` loop on a fixed small config, per precision.

    python scripts/bench_pretrain.py [--steps 60] [--precisions 32-true,bf16-mixed,bf16-true]

Config (the `quickstart` preset): 4 layers, 4 heads, n_embd 256, block 256, vocab 4096, GELU MLP
1024, LayerNorm, tied embeddings, micro batch 8 (global batch 8: no accumulation), stdlib corpus.
Each precision runs as its own process, so "first step" is measured from process start
(imports included) to the loop's first completed optimizer step. tokens/s, peak RSS and MFU come
from the loop's own final summary; MFU is against the matmul peak the loop measures on the
same machine and dtype. The tokenizer and token cache are prepared once before timing.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time

SUMMARY = re.compile(
    r"Done: ([\d,]+) tokens in ([\d.]+)s = ([\d,]+) tokens/s; peak memory ([\d.]+) GiB; "
    r"MFU ([\d.]+)% of ([\d.]+) TFLOP/s"
)


def run(precision: str, steps: int, out_dir: str) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "litattn",
        "pretrain",
        "--model_name",
        "quickstart",
        "--out_dir",
        out_dir,
        "--precision",
        precision,
        "--train.global_batch_size",
        "8",
        "--train.micro_batch_size",
        "8",
        "--train.max_seq_length",
        "256",
        "--train.max_steps",
        str(steps),
        "--train.save_interval",
        "null",
        "--train.lr_warmup_steps",
        "10",
        "--eval.interval",
        "0",
        "--eval.final_validation",
        "false",
        "--log.sample_prompt",
        "null",
        "--log.progress_bar",
        "false",
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_step, lines = None, []
    for line in proc.stdout:
        lines.append(line)
        if first_step is None and line.startswith("First optimizer step"):
            first_step = time.perf_counter() - start
    if proc.wait() != 0:
        raise RuntimeError(f"{precision} run failed:\n{''.join(lines[-20:])}")
    m = SUMMARY.search("".join(lines))
    if m is None:
        raise RuntimeError(f"no summary line in the output of the {precision} run:\n{''.join(lines[-20:])}")
    return {
        "precision": precision,
        "tokens_per_sec": float(m.group(3).replace(",", "")),
        "peak_rss_gib": float(m.group(4)),
        "first_step_s": first_step,
        "mfu": float(m.group(5)),
        "peak_tflops": float(m.group(6)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--precisions", default="32-true,bf16-mixed,bf16-true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run("32-true", 1, tmp + "/warmup")  # prepares the tokenizer and token cache outside the timings
        rows = [run(p, args.steps, f"{tmp}/{p}") for p in args.precisions.split(",")]
    base = rows[0]["tokens_per_sec"]
    print(f"\n{'precision':<11} {'tokens/s':>9} {'vs fp32':>7} {'peak RSS':>9} {'1st step':>8} {'MFU':>6} {'peak':>11}")
    for r in rows:
        print(
            f"{r['precision']:<11} {r['tokens_per_sec']:>9,.0f} {r['tokens_per_sec'] / base:>6.2f}x "
            f"{r['peak_rss_gib']:>7.2f}Gi {r['first_step_s']:>7.1f}s {r['mfu']:>5.1f}% "
            f"{r['peak_tflops'] * 1000:>6.0f} GF/s"
        )


if __name__ == "__main__":
    main()
