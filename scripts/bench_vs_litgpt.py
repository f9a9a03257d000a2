"""litattn's training step against litgpt's GPT in one process: the quickstart architecture, batch 8 x 256.

    pip download --no-deps litgpt==0.5.13 -d /tmp/lg && python -m zipfile -e /tmp/lg/litgpt-0.5.13-*.whl /tmp/lgx
    python scripts/bench_vs_litgpt.py --litgpt_dir /tmp/lgx [--precision 32-true bf16-mixed] [--modes eager compiled]

One row per precision and mode at equal settings, then the row a user meets: each framework as its pretrain runs
by default (litattn: `precision: auto` on this machine, eager; litgpt 0.5.13: bf16-mixed, compiled). The table
names the machine's ISA; ratios hold within one process only (steps alternated, medians after 5 warm-up steps).

Only litgpt's `config.py` and `model.py` are imported, from the unpacked wheel (its package `__init__` needs the
`lightning` package, which litattn does not install); litgpt's checkpoint-conversion import is stubbed. Its
config mirrors the preset (LayerNorm, GELU MLP, RoPE over the whole head, biases, sequential residual) and its
head is tied to the embedding, so both count 4,208,128 parameters. litgpt's step is what its pretrain runs with
chunk_size 0: the model's logits and F.cross_entropy; both sides use the same AdamW settings (bench_pretrain's
reference optimizer for litgpt, litattn's own build functions for litattn). Compiled: both compile their whole
training forward (litgpt's pretrain always compiles).
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_pretrain as bp  # noqa: E402

from litattn.args import OptimizerArgs, RuntimeArgs  # noqa: E402
from litattn.cpu import detect_isa  # noqa: E402
from litattn.precision import choose_precision  # noqa: E402


def load_litgpt(folder: Path):
    """litgpt.config and litgpt.model from an unpacked wheel, without running the package's __init__."""
    for name, path in (("litgpt", [str(folder / "litgpt")]), ("litgpt.scripts", [])):
        module = types.ModuleType(name)
        module.__path__ = path
        sys.modules[name] = module
    stub = types.ModuleType("litgpt.scripts.convert_hf_checkpoint")
    stub.qkv_reassemble = None  # used by checkpoint conversion only
    sys.modules[stub.__name__] = stub
    import litgpt.config
    import litgpt.model

    return litgpt.config, litgpt.model


LITGPT_DEFAULT = ("bf16-mixed", True)  # litgpt 0.5.13's pretrain: get_default_supported_precision, torch.compile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--litgpt_dir", type=Path, required=True, help="an unpacked litgpt wheel")
    parser.add_argument("--precision", nargs="+", default=["32-true", "bf16-mixed"], choices=["32-true", "bf16-mixed"])
    parser.add_argument("--modes", nargs="*", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument("--no_defaults", action="store_true", help="skip the row of both frameworks' defaults")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    if args.steps < 2:
        raise SystemExit(f"error: --steps must be at least 2, got {args.steps}")
    if not (args.litgpt_dir / "litgpt" / "model.py").is_file():
        raise SystemExit(f"error: {args.litgpt_dir} holds no litgpt/model.py; unpack a litgpt wheel there first")
    config_module, model_module = load_litgpt(args.litgpt_dir)
    ours_default = (choose_precision("auto", "cpu").precision, RuntimeArgs().compile)
    rows = [("", p, m == "compiled", p, m == "compiled") for p in args.precision for m in args.modes]
    if not args.no_defaults:
        rows.append(("defaults: ", *ours_default, *LITGPT_DEFAULT))
    isa = detect_isa()
    print(
        f"CPU {isa.name}{' (native bf16)' if isa.native_bf16 else ''}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; batch {bp.BATCH} x {bp.SEQ_LEN}, median of {args.steps} alternated steps\n"
    )
    print("| litattn | litgpt | litattn tok/s | litgpt tok/s | litattn / litgpt |")
    print("| --- | --- | --- | --- | --- |")
    for label, ours_precision, ours_compiled, their_precision, their_compiled in rows:
        ours, theirs = pair(config_module, model_module, ours_precision, ours_compiled, their_precision, their_compiled)
        run_alternated((ours, theirs), args.steps)
        print(f"| {label}{setting(ours_precision, ours_compiled)} | {setting(their_precision, their_compiled)} | "
              f"{ours.tokens_per_sec:,.0f} | {theirs.tokens_per_sec:,.0f} | "
              f"{ours.tokens_per_sec / theirs.tokens_per_sec:.2f}x |", flush=True)  # fmt: skip


def setting(precision: str, compiled: bool) -> str:
    return f"{precision} {'compiled' if compiled else 'eager'}"


def pair(config_module, model_module, ours_precision, ours_compiled, their_precision, their_compiled):
    """litattn's trainer (bench_pretrain's, as `litattn pretrain` steps) and litgpt's, equal parameter counts."""
    config = config_module.Config(
        name="quickstart", block_size=256, vocab_size=4096, padded_vocab_size=4096, n_layer=4, n_head=4,
        n_embd=256, n_query_groups=4, rotary_percentage=1.0, parallel_residual=False, bias=True,
        norm_class_name="LayerNorm", mlp_class_name="GptNeoxMLP", intermediate_size=1024,
    )  # fmt: skip
    torch.manual_seed(0)
    theirs = model_module.GPT(config)
    theirs.lm_head.weight = theirs.transformer.wte.weight  # tied, as the quickstart preset
    ours, _ = bp.trainers(ours_precision, ours_compiled)
    n_theirs = sum(p.numel() for p in theirs.parameters())
    if n_theirs != ours.model.num_parameters():
        counts = f"litgpt {n_theirs:,}, litattn {ours.model.num_parameters():,}"
        raise SystemExit(f"error: parameter counts differ: {counts}")

    def their_loss(x, y):
        return F.cross_entropy(theirs(x).reshape(-1, config.padded_vocab_size), y.reshape(-1))

    loss = torch.compile(their_loss) if their_compiled else their_loss
    return ours, bp.Trainer(theirs, bp.ref_optimizer(theirs, OptimizerArgs()), loss, their_precision)


def run_alternated(trainers, steps: int) -> None:
    """5 warm-up steps each, then `steps` steps alternating which goes first (a busy machine slows both alike)."""
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 4096, (bp.BATCH, bp.SEQ_LEN + 1), generator=generator) for _ in range(4)]
    for trainer in trainers:
        for i in range(5):
            trainer.step(batches[i % 4][:, :-1], batches[i % 4][:, 1:], record=False)
    for i in range(steps):
        b = batches[i % 4]
        for trainer in trainers if i % 2 == 0 else trainers[::-1]:
            trainer.step(b[:, :-1], b[:, 1:])


if __name__ == "__main__":
    main()
