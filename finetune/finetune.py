"""`litattn finetune`: continue training a checkpoint on instruction data, fully, with SSA only, or with LoRA.

    litattn finetune --config config_hub/finetune/pydoc-ssa.yaml
    litattn finetune --checkpoint_dir out/pretrain/quickstart/final --method lora --data AlpacaJSON \\
        --data.train_file my_data.json

The attention may change at this point (`--model.attention.name ssa`): the checkpoint's weights load into
the new mechanism's model and its own parameters start from their init (`identity_init: true` starts from
exactly the checkpoint's function). The loop is pretraining's (`litattn.loop.fit`): resume,
atomic checkpoints, epochs, validation; here each validation also prints the answer the model now gives
to the first validation question.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from litattn import checkpoint as ckpt
from litattn.args import EvalArgs, LogArgs, LoRAArgs, OptimizerArgs, RuntimeArgs, TrainArgs, check_run_args, start_work
from litattn.data import DataModule, PyDocQA
from litattn.data.instructions import InstructionData, format_prompt
from litattn.finetune.methods import Method, make_plan
from litattn.loop import hyperparameters_of, launch_and_fit


def setup(
    checkpoint_dir: Path,
    method: Method = "mechanism",
    model: dict[str, Any] | None = None,
    out_dir: Path = Path("out/finetune"),
    data: DataModule | None = None,
    resume: bool | Literal["auto"] | Path = False,
    overwrite: bool = False,
    train: TrainArgs = TrainArgs(
        global_batch_size=16, micro_batch_size=4, epochs=1, lr_warmup_steps=10, save_interval=100, log_interval=10
    ),
    eval: EvalArgs = EvalArgs(interval=50, max_iters=None, initial_validation=True),
    optimizer: OptimizerArgs = OptimizerArgs(lr=1e-4, min_lr=1e-5, weight_decay=0.0),
    lora: LoRAArgs = LoRAArgs(),
    log: LogArgs = LogArgs(sample_prompt=None, sample_tokens=60, sample_at_validation=True),
    precision: str = RuntimeArgs.precision,
    accelerator: str = RuntimeArgs.accelerator,
    devices: int | str = RuntimeArgs.devices,
    num_nodes: int = RuntimeArgs.num_nodes,
    strategy: str = RuntimeArgs.strategy,
    compile: bool = RuntimeArgs.compile,
    seed: int = RuntimeArgs.seed,
    cache_dir: Path = RuntimeArgs.cache_dir,
) -> None:
    """Finetune a checkpoint.

    Args:
        checkpoint_dir: The checkpoint to start from (litattn, converted from Hugging Face, or litgpt); its
            tokenizer is used.
        method: full (every parameter), mechanism (only the attention mechanism's own parameters; `ssa` is an
            alias) or lora
            (adapters + the mechanism's parameters, merged into the saved weights).
        model: Overrides of the checkpoint's config, e.g. `{attention: {name: ssa, identity_init: true}}`.
        out_dir: Directory for checkpoints (`step-XXXXXXXX/`, `final/`) and logs.
        data: Instruction data module; default: PyDocQA (questions on the standard library, answered from its
            docstrings). AlpacaJSON reads your own JSON/JSONL file.
        resume: Continue a run: `auto` (the newest checkpoint in out_dir, if any) or a checkpoint path.
        overwrite: Delete the checkpoints and logs of a previous run in out_dir first. Without it a run refuses
            an out_dir that holds another run's checkpoints (resume it, or choose another out_dir).
        train: Batch sizes, stopping limits and checkpointing; max_seq_length (default: the model's block_size)
            is the length examples are truncated to.
        eval: Validation schedule (initial_validation gives the checkpoint's own loss, before finetuning).
        optimizer: AdamW and LR schedule; mechanism_lr gives the mechanism's parameters their own LR.
        lora: Rank, scale, dropout and target layers of the adapters (method=lora).
        log: Logging, progress and samples; sample_prompt is an instruction (it is put in the prompt
            template); default: the first validation question.
        precision: 32-true, bf16-mixed, bf16-true (16-mixed on CUDA). bf16 pays on a CPU only with native bf16
            (AVX-512-BF16, AMX); elsewhere the run warns before training, with the measured matmul slowdown.
        accelerator: cpu, cuda, or auto.
        devices: Devices per node (or "auto").
        num_nodes: Number of nodes.
        strategy: auto, ddp or fsdp.
        compile: torch.compile the training forward and loss head as one graph (off by default: the first step
            comes later, and what it gains per step is measured in docs/benchmarks.md).
        seed: Seed for data order and the adapters' init.
        cache_dir: Where tokenized examples are cached.
    """
    hyperparameters = hyperparameters_of(dict(locals()))

    check_run_args(seed=seed, devices=devices, num_nodes=num_nodes, train=train)
    start_work()  # the checks that need the checkpoint come after, in the command itself
    config = ckpt.load_config(checkpoint_dir, **(model or {}))
    if not ckpt.has_tokenizer(checkpoint_dir):
        raise FileNotFoundError(
            f"{checkpoint_dir} has no tokenizer (tokenizer.json or tokenizer.model); finetuning uses the "
            "checkpoint's own tokenizer: copy the one it was trained with into the directory"
        )
    data = PyDocQA() if data is None else data
    if log.sample_prompt is not None and isinstance(data.innermost(), InstructionData):
        log = replace(log, sample_prompt=format_prompt(log.sample_prompt))
    plan = make_plan(method, config, Path(checkpoint_dir), lora)

    runtime = RuntimeArgs(precision, accelerator, devices, num_nodes, strategy, compile, seed, cache_dir)
    launch_and_fit(
        plan, data, Path(checkpoint_dir), hyperparameters, out_dir=out_dir, resume=resume, overwrite=overwrite,
        train=train, eval=eval, optimizer=optimizer, log=log, runtime=runtime,
    )  # fmt: skip
