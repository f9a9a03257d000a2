"""The loss a model reaches by predicting token frequencies alone: the bar a trained model must beat.

    python scripts/unigram_baseline.py [--vocab_size 4096] [--seq_len 256] [--cache_dir cache]

Prepares (or reuses) the default corpus exactly as `litattn pretrain` does, then prints the
unigram entropy of the training tokens and the unigram cross-entropy on the validation split
(add-one smoothed), in nats, comparable to the validation loss the training loop reports.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from litattn.data import StdlibCorpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--cache_dir", type=Path, default=Path("cache"))
    args = parser.parse_args()
    data = StdlibCorpus()
    tokenizer = data.setup(None, args.vocab_size, args.seq_len, args.cache_dir)
    train, val = data.train_dataset(), data.val_dataset()
    counts = np.bincount(np.asarray(train.data), minlength=tokenizer.vocab_size).astype(np.float64) + 1
    p = counts / counts.sum()
    entropy = -(p * np.log(p)).sum()
    cross_entropy = -np.log(p[np.asarray(val.data)]).mean()
    print(
        f"unigram entropy (train) {entropy:.3f} nats; unigram cross-entropy on validation {cross_entropy:.3f} nats "
        f"(perplexity {np.exp(cross_entropy):.1f})"
    )


if __name__ == "__main__":
    main()
