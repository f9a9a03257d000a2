"""`litattn pretrain`: train a GPT from scratch (or from initial weights) with Lightning Fabric.

    litattn pretrain --config config_hub/pretrain/quickstart.yaml [--train.max_steps 100 ...]

The entry point only turns its arguments into a plan (every parameter trains), a data module and a
`RunSpec`; the loop, shared with finetuning, is `litattn.loop.fit`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from litattn.args import EvalArgs, LogArgs, OptimizerArgs, RuntimeArgs, TrainArgs, check_run_args
from litattn.config import resolve_model_config
from litattn.data import DataModule, StdlibCorpus
from litattn.loop import hyperparameters_of, launch_and_fit
from litattn.plan import TrainingPlan


def setup(
    model_name: str = "quickstart",
    model: dict[str, Any] | None = None,
    out_dir: Path = Path("out/pretrain"),
    data: DataModule | None = None,
    tokenizer_dir: Path | None = None,
    initial_checkpoint_dir: Path | None = None,
    resume: bool | Literal["auto"] | Path = False,
    overwrite: bool = False,
    train: TrainArgs = TrainArgs(),
    eval: EvalArgs = EvalArgs(),
    optimizer: OptimizerArgs = OptimizerArgs(),
    log: LogArgs = LogArgs(),
    precision: str = RuntimeArgs.precision,
    accelerator: str = RuntimeArgs.accelerator,
    devices: int | str = RuntimeArgs.devices,
    num_nodes: int = RuntimeArgs.num_nodes,
    strategy: str = RuntimeArgs.strategy,
    compile: bool = RuntimeArgs.compile,
    seed: int = RuntimeArgs.seed,
    cache_dir: Path = RuntimeArgs.cache_dir,
) -> None:
    """Pretrain a GPT model.

    Args:
        model_name: Model preset (see `litattn model list`).
        model: Overrides of the preset's config keys, e.g. `{n_layer: 2, attention: {name: causal}}`.
        out_dir: Directory for checkpoints (`step-XXXXXXXX/`, `final/`) and logs.
        data: Data module; default: the Python standard library's source (StdlibCorpus).
        tokenizer_dir: Directory with tokenizer.json or tokenizer.model; default: train a BPE on the data.
        initial_checkpoint_dir: Start from these weights (no optimizer state).
        resume: Continue a run: `auto` (the newest checkpoint in out_dir, if any) or a checkpoint path.
        overwrite: Delete the checkpoints and logs of a previous run in out_dir first. Without it a run refuses
            an out_dir that holds another run's checkpoints (resume it, or choose another out_dir).
        train: Batch sizes, stopping limits and checkpointing.
        eval: Validation schedule.
        optimizer: AdamW and LR schedule.
        log: Logging, progress and the final generated sample.
        precision: 32-true, bf16-mixed, bf16-true (16-mixed on CUDA). bf16 pays on a CPU only with native bf16
            (AVX-512-BF16, AMX); elsewhere the run warns before training, with the measured matmul slowdown.
        accelerator: cpu, cuda, or auto.
        devices: Devices per node (or "auto").
        num_nodes: Number of nodes.
        strategy: auto, ddp or fsdp.
        compile: torch.compile the training forward and loss head as one graph (off by default: the first step
            comes later, and what it gains per step is measured in docs/benchmarks.md).
        seed: Seed for initialisation and data order.
        cache_dir: Where the trained tokenizer and tokenized data are cached.
    """
    hyperparameters = hyperparameters_of(dict(locals()))

    check_run_args(seed=seed, devices=devices, num_nodes=num_nodes, train=train)  # before any work

    data = StdlibCorpus() if data is None else data
    plan = TrainingPlan(resolve_model_config(model_name, model), initial_checkpoint_dir)
    runtime = RuntimeArgs(precision, accelerator, devices, num_nodes, strategy, compile, seed, cache_dir)
    launch_and_fit(
        plan, data, tokenizer_dir, hyperparameters, out_dir=out_dir, resume=resume, overwrite=overwrite, train=train,
        eval=eval, optimizer=optimizer, log=log, runtime=runtime,
    )  # fmt: skip
