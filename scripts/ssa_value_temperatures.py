"""SSA's value temperatures on the noisy prefix task, digits against distractors: does the value temperature
learn to suppress the tokens that carry nothing?

    python scripts/ssa_value_temperatures.py out/ablations/ssa-noise/ssa-full/seed-{1,2,3}/final

Each checkpoint reads 64 validation items of the task it was trained on (PrefixTask reverse, noise 0.5,
distractors a-f, lengths 4-8: config_hub/ablations/ssa-noise.yaml); the value temperature of every prefix token
(averaged over the key-value heads) is grouped by whether the token is a digit or a distractor. Prints a
table: mean value temperature per layer and group.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from litattn.attention.ssa import SelectiveSelfAttention
from litattn.checkpoint import load_with_tokenizer
from litattn.data import PrefixTask


def value_temperatures(checkpoint_dir: Path, items: int, cache_dir: Path) -> dict[int, tuple[float, float]]:
    """layer -> (mean value temperature of digit tokens, of distractor tokens) over the items' prefixes."""
    model, tokenizer, config = load_with_tokenizer(checkpoint_dir)
    model.eval()
    data = PrefixTask(noise=0.5, noise_symbols="abcdef", min_length=4, max_length=8, seed=0)
    data.setup(tokenizer, config.vocab_size, 32, cache_dir)
    val = data.val_dataset()
    batch = [val[i] for i in range(min(items, len(val)))]
    idx = torch.stack([b["input_ids"] for b in batch])  # (B, T)
    in_prefix = torch.arange(idx.shape[1])[None, :] < torch.stack([b["prefix_len"] for b in batch])[:, None]
    ids_of = lambda symbols: torch.tensor([tokenizer.encode(f" {c}")[0] for c in symbols])  # noqa: E731 (as PrefixTask writes them)
    digit = torch.isin(idx, ids_of("0123456789")) & in_prefix
    distractor = torch.isin(idx, ids_of("abcdef")) & in_prefix
    seen: dict[int, torch.Tensor] = {}

    def record(mechanism, args):
        q, _, v, ctx = args
        seen[mechanism.block_idx] = mechanism.temperatures(q, v, ctx)["value"].mean(1)  # (B, T)

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, SelectiveSelfAttention)]
    if not hooks:
        raise SystemExit(f"{checkpoint_dir}: not an SSA checkpoint with value temperatures")
    with torch.no_grad():
        model(idx)
    for h in hooks:
        h.remove()
    return {layer: (t[digit].mean().item(), t[distractor].mean().item()) for layer, t in sorted(seen.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--cache_dir", type=Path, default=Path("cache"))
    args = parser.parse_args()
    print("| checkpoint | layer | digits | distractors | distractors - digits |")
    print("| --- | --- | --- | --- | --- |")
    for checkpoint in args.checkpoints:
        for layer, (d, n) in value_temperatures(checkpoint, args.items, args.cache_dir).items():
            name = "/".join(checkpoint.parts[-3:-1])
            print(f"| {name} | {layer} | {d:.3f} | {n:.3f} | {n - d:+.3f} |")


if __name__ == "__main__":
    main()
