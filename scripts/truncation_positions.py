"""Do kept tokens read better at their original positions or renumbered? The answer loss of a checkpoint on
PyDoc QA's long-prompt validation questions, each cut to a budget by a scored truncation, evaluated twice: the
survivors at positions 0..n-1 (what finetuning trains on) and at their positions in the uncut example (RoPE
then rotates by the original distances; positions past the trained context extrapolate).

    python scripts/truncation_positions.py --checkpoint_dir out/ablations/truncation/attention/seed-1/final \
        --importance out/truncation/importance.json --budget 129

One example at a time (each has its own positions), loss on the answer tokens, printed as a table.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from litattn.checkpoint import load_with_tokenizer
from litattn.data import PyDocQA
from litattn.data.instructions import tokenize_examples
from litattn.data.prompt_truncation import PromptScorer, fit, protected_spans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint_dir", type=Path, required=True)
    parser.add_argument("--importance", type=Path, default=None, help="dictionary; none: idf of the training prompts")
    parser.add_argument("--strategy", default="attention", choices=["attention", "idf"])
    parser.add_argument("--budget", type=int, default=129, help="tokens an example keeps: seq_len + 1")
    parser.add_argument("--cache_dir", type=Path, default=Path("cache"))
    args = parser.parse_args()

    model, tokenizer, _ = load_with_tokenizer(args.checkpoint_dir, torch.device("cpu"))
    model.eval()
    data = PyDocQA(with_source=True)
    train, val = data.load_examples(args.cache_dir)
    tokens, _, _ = tokenize_examples(train + val, tokenizer, args.cache_dir)
    scorer = PromptScorer(args.strategy, args.importance, None, tokenizer, [p for p, _ in tokens[: len(train)]])
    spans = protected_spans(val, tokenizer, True)
    totals = {"renumbered": [0.0, 0], "original": [0.0, 0]}
    cut_examples = 0
    for (prompt, response), (head, tail) in zip(tokens[len(train) :], spans.tolist(), strict=True):
        scores = scorer.scores([prompt])[0] if len(prompt) + len(response) > args.budget else None
        p, r, positions = fit(prompt, response, args.budget, scores, head, tail, return_positions=True)
        if len(r) == 0:
            continue
        cut_examples += len(p) < len(prompt)
        ids = torch.as_tensor([*p, *r], dtype=torch.long)
        targets = ids[1:].clone()
        targets[: len(p) - 1] = -100  # the loss on the answer only
        for name, pos in (("renumbered", None), ("original", torch.as_tensor(positions[:-1], dtype=torch.long))):
            if pos is not None:
                model.allow_context(max(model.max_seq_length, int(pos.max()) + 1))
            with torch.no_grad():
                logits = model(ids[None, :-1], positions=pos)[0]
            totals[name][0] += F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum").item()
            totals[name][1] += int((targets != -100).sum())
    print(f"{args.checkpoint_dir}: {len(val)} validation examples, {cut_examples} cut to {args.budget} tokens")
    print("| positions | answer loss | ppl |\n|---|---|---|")
    for name, (loss, n) in totals.items():
        print(f"| {name} | {loss / n:.4f} | {math.exp(loss / n):.2f} |")


if __name__ == "__main__":
    main()
