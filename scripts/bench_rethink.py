"""What re-thinking costs in generation: tokens/s of hybrid attention with `rethink_every` k against none.

    python scripts/bench_rethink.py [--prompt 64] [--new 128] [--every 1,4,16] [--repeats 3]

A quickstart-sized hybrid model (4 layers of width 256, 2 thought blocks, 2 iterations, focus re-weighting;
random weights: the cost does not depend on them), batch 1, float32, greedy: a prompt of `--prompt` tokens read
as the prefix, then `--new` tokens. Without re-thinking each new token is one cached decoding step; with k, every
k tokens the whole text so far is read again as the prefix (a prefill over prompt + output), so the cost grows
with the text's length over k. Each setting's median over `--repeats` runs, interleaved; ratios against none in
the same process.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from litattn import GPT, Config
from litattn.generate import generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--every", default="1,4,16", help="rethink_every values, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    spec = {"name": "hybrid", "thought_layers": 2, "iterations": 2, "reweighting": "focus", "interpolation": True}
    block = args.prompt + args.new
    model = GPT(Config.from_name("quickstart", block_size=block, attention=spec)).eval()
    prompt = torch.randint(100, model.config.vocab_size, (args.prompt,))
    settings = [None, *(int(k) for k in args.every.split(","))]
    times: dict[int | None, list[float]] = {k: [] for k in settings}
    with torch.no_grad():
        generate(model, prompt, 8, temperature=0, prefix_len=args.prompt)  # warm up
        for _ in range(args.repeats):
            for k in settings:
                start = time.perf_counter()
                out = generate(model, prompt, args.new, temperature=0, prefix_len=args.prompt, rethink_every=k)
                times[k].append(time.perf_counter() - start)
                assert len(out) == block
    base = statistics.median(times[None])
    print(f"hybrid, quickstart size, prompt {args.prompt} (the prefix), {args.new} new tokens, batch 1, float32")
    print(f"{'rethink_every':>14} {'tokens/s':>10} {'time':>8}")
    for k in settings:
        t = statistics.median(times[k])
        print(f"{'none' if k is None else k:>14} {args.new / t:>10.1f} {t / base:>7.2f}x")


if __name__ == "__main__":
    main()
