"""`litattn pretrain`: train a GPT from scratch (or from initial weights) with Lightning Fabric.

    litattn pretrain --config config_hub/pretrain/quickstart.yaml [--train.max_steps 100 ...]

One optimizer step = `global_batch_size` windows of the epoch's permutation (a pure function of
seed and epoch), split over devices and gradient-accumulation micro-steps. A checkpoint stores
(step, epoch, step within epoch), so a resumed run continues with exactly the windows the
uninterrupted run would have seen.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch

from litattn.args import EvalArgs, LogArgs, OptimizerArgs, TrainArgs
from litattn.config import Config
from litattn.data import DataModule, StdlibCorpus
from litattn.plan import TrainingPlan
from litattn.training import (
    Interrupted,
    StopSignal,
    Throughput,
    collate,
    epoch_order,
    flops_per_token,
    lr_at,
    make_optimizer,
    measure_matmul_peak,
    peak_memory_bytes,
    set_lr,
)


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
    precision: str = "32-true",
    accelerator: str = "auto",
    devices: int | str = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    compile: bool = False,
    seed: int = 42,
    cache_dir: Path = Path("cache"),
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
        precision: 32-true, bf16-mixed, bf16-true (16-mixed on CUDA).
        accelerator: cpu, cuda, or auto.
        devices: Devices per node (or "auto").
        num_nodes: Number of nodes.
        strategy: auto, ddp or fsdp.
        compile: torch.compile each transformer block.
        seed: Seed for initialisation and data order.
        cache_dir: Where the trained tokenizer and tokenized data are cached.
    """
    hyperparameters = _hyperparameters(dict(locals()))
    from litattn.args import check_run_args
    from litattn.config import resolve_model_config

    check_run_args(seed=seed, devices=devices, num_nodes=num_nodes, train=train)  # before any work

    data = StdlibCorpus() if data is None else data
    plan = TrainingPlan(resolve_model_config(model_name, model), initial_checkpoint_dir)
    fabric = launch_fabric(out_dir, log, precision, accelerator, devices, num_nodes, strategy, seed)
    code = fit(
        fabric,
        plan,
        data,
        out_dir,
        tokenizer_dir,
        resume,
        train,
        eval,
        optimizer,
        log,
        compile,
        seed,
        cache_dir,
        hyperparameters,
        overwrite=overwrite,
    )
    if code:
        sys.exit(code)


def launch_fabric(
    out_dir: Path, log: LogArgs, precision: str, accelerator: str, devices, num_nodes: int, strategy: str, seed: int
):
    """A launched Fabric (processes started for multi-device strategies) with the run's logger, seeded."""
    from lightning_fabric import Fabric

    fabric = Fabric(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        precision=precision,
        loggers=[_make_logger(log, out_dir)],
    )
    fabric.launch()
    fabric.seed_everything(seed)
    return fabric


def fit(
    fabric,
    plan: TrainingPlan,
    data: DataModule,
    out_dir: Path,
    tokenizer_dir: Path | None,
    resume: bool | str | Path,
    train: TrainArgs,
    eval: EvalArgs,
    optimizer_args: OptimizerArgs,
    log: LogArgs,
    compile: bool,
    seed: int,
    cache_dir: Path,
    hyperparameters: dict[str, Any],
    epoch_start_hooks: list[Callable[[int], None]] = (),
    overwrite: bool = False,
) -> int:
    """Run the training loop; returns the process exit code (0 done, or stopped by a signal and saved;
    1 diverged; 128 + signal when stopped before the first optimizer step, with nothing to save).

    `plan` says what trains and what checkpoints hold (litattn/plan.py): pretraining trains everything,
    the finetuning methods a part, LoRA saves merged weights. The run first claims out_dir
    (litattn/run_dir.py: one run per directory), then resumes from there or starts afresh."""
    if (train.max_seq_length or plan.config.block_size) > plan.config.block_size:
        raise ValueError(
            f"train.max_seq_length={train.max_seq_length} exceeds the model's block_size={plan.config.block_size}"
        )
    run = _claim_out_dir(fabric, Path(out_dir), resume, overwrite)
    try:
        return _fit(
            fabric, plan, data, Path(out_dir), tokenizer_dir, run.resume_dir, train, eval, optimizer_args, log,
            compile, seed, cache_dir, hyperparameters, epoch_start_hooks,
        )  # fmt: skip
    finally:
        run.release()


def _fit(
    fabric,
    plan: TrainingPlan,
    data: DataModule,
    out_dir: Path,
    tokenizer_dir: Path | None,
    resume_dir: Path | None,
    train: TrainArgs,
    eval: EvalArgs,
    optimizer_args: OptimizerArgs,
    log: LogArgs,
    compile: bool,
    seed: int,
    cache_dir: Path,
    hyperparameters: dict[str, Any],
    epoch_start_hooks: list[Callable[[int], None]],
) -> int:
    from litattn import checkpoint as ckpt

    t0 = time.perf_counter()
    config = plan.config
    seq_len = train.max_seq_length or config.block_size
    # ---- data and tokenizer (rank 0 prepares the cache, the others then read it)
    with fabric.rank_zero_first():
        tokenizer = run_tokenizer(tokenizer_dir, resume_dir or plan.initial_checkpoint_dir)
        tokenizer = data.setup(tokenizer, config.vocab_size, seq_len, Path(cache_dir))
    tokenizer.check_fits(config.padded_vocab_size)
    train_data, val_data = data.train_dataset(), data.val_dataset()
    fabric.print(data.describe())

    world = fabric.world_size
    micro, global_batch = train.micro_batch_size, train.global_batch_size
    if global_batch % (micro * world):
        raise ValueError(
            f"global_batch_size={global_batch} must be a multiple of micro_batch_size x devices = {micro} x {world}"
        )
    accum = global_batch // (micro * world)
    steps_per_epoch = len(train_data) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(
            f"The training data has {len(train_data)} windows of {seq_len} tokens, fewer than one global batch "
            f"({global_batch}); lower train.global_batch_size or train.max_seq_length, or add data"
        )
    tokens_per_step = global_batch * seq_len
    total_steps = _total_steps(train, steps_per_epoch, tokens_per_step)

    # ---- model and optimizer
    model = plan.build(fabric, resuming=resume_dir is not None)
    if compile:
        for block in model.transformer.h:
            block.compile()
    fabric.print(
        f"Model: {config.name or 'custom'} ({model.num_parameters():,} parameters), attention {config.attention}; "
        f"{plan.describe(model)}"
    )
    optimizer = make_optimizer(plan.parameter_groups(model, optimizer_args), optimizer_args, fabric.device)
    model = fabric.setup(model)
    model.mark_forward_method("loss")
    optimizer = fabric.setup_optimizers(optimizer)
    # tokens: input tokens processed (padding trimmed by `collate` excluded); loss_tokens: those with a target
    state = {"step": 0, "epoch": 0, "epoch_step": 0, "tokens": 0, "loss_tokens": 0}

    if resume_dir is not None:
        _load_resumable(plan, resume_dir, _unwrap(model), optimizer, state)
        fabric.print(f"Resumed from {resume_dir} at step {state['step']} (epoch {state['epoch']})")
    saved_steps: dict[str, int] = {}  # checkpoint directory name -> the step it holds (this run's saves)

    def save(name: str) -> None:
        if fabric.global_rank == 0:
            try:
                ckpt.save_checkpoint(
                    out_dir / name,
                    plan.weights(_unwrap(model)),
                    config,
                    tokenizer,
                    hyperparameters,
                    training_state={**_training_state(optimizer, state, seed), **plan.resume_state(_unwrap(model))},
                )
            except ckpt.CheckpointWriteError as e:
                kept = ckpt.latest_checkpoint(out_dir)
                raise ckpt.CheckpointWriteError(
                    f"{e}. "
                    + (f"The last good checkpoint, {kept}, is kept" if kept else "No checkpoint was saved")
                    + "; free space or fix the directory, then --resume auto"
                ) from e.__cause__
        fabric.barrier()
        saved_steps[name] = state["step"]

    def validate(max_iters: int | None) -> float:
        return validation_loss(fabric, model, val_data, micro, max_iters)

    sample_prompt = _sample_prompt(log, tokenizer, val_data)

    def write_sample() -> None:
        if sample_prompt is not None and fabric.global_rank == 0:
            _sample(_unwrap(model), tokenizer, sample_prompt, log.sample_tokens, seed)
            model.train()

    # ---- the loop
    val_loss, val_label = float("nan"), "final val loss"
    fabric.print(
        f"Training {train.limits()} ({total_steps or '?'} steps of {global_batch} x {seq_len} tokens; "
        f"{steps_per_epoch} steps per epoch; micro batch {micro} x {accum} accumulation x {world} devices)"
    )
    throughput = Throughput()
    first_step_logged = False
    progress = _progress(fabric, log, total_steps, state["step"])
    training_done = False
    with StopSignal(interrupt_sections=world == 1) as stop:
        try:
            if eval.initial_validation:
                with stop.section():
                    val_loss = validate(eval.max_iters)
                fabric.log_dict({"val_loss": val_loss, "val_ppl": math.exp(val_loss)}, step=state["step"])
                fabric.print(f"step {state['step']}: val loss {val_loss:.4f} (before training)")
            while not _done(state, train, total_steps, throughput):
                if state["epoch_step"] == 0:
                    for hook in epoch_start_hooks:
                        hook(state["epoch"])
                order = epoch_order(len(train_data), seed, state["epoch"])
                start = state["epoch_step"] * global_batch
                batch_indices = order[start : start + global_batch].view(accum * world, micro)
                lr = lr_at(state["step"], optimizer_args, train.lr_warmup_steps, total_steps)
                set_lr(optimizer, lr)
                loss_sum = torch.zeros((), device=fabric.device)
                counts = torch.zeros(2, dtype=torch.long)  # (tokens, loss tokens) of this step on this rank
                for micro_step in range(accum):
                    batch = collate(train_data, batch_indices[micro_step * world + fabric.global_rank])
                    counts += torch.stack([torch.tensor(batch["input_ids"].numel()), (batch["labels"] != -100).sum()])
                    batch = {k: v.to(fabric.device) for k, v in batch.items()}
                    with fabric.no_backward_sync(model, enabled=micro_step < accum - 1):
                        # fabric.autocast: on one device Fabric does not route marked methods through forward
                        with fabric.autocast():
                            loss = model.loss(
                                batch.pop("input_ids"), batch.pop("labels"), chunk_size=train.loss_chunk_size, **batch
                            )
                        fabric.backward(loss / accum)
                    loss_sum += loss.detach()
                if not torch.isfinite(loss_sum):
                    progress.close()
                    fabric.print(
                        f"Loss is {loss_sum.item()} at step {state['step']}: stopping. The last good checkpoint is "
                        "kept; lower optimizer.lr or raise train.lr_warmup_steps, then --resume auto"
                    )
                    fabric.logger.finalize("failed")
                    return 1
                if train.max_norm:
                    fabric.clip_gradients(model, optimizer, max_norm=train.max_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if world > 1:
                    counts = fabric.all_reduce(counts.to(fabric.device), reduce_op="sum").cpu()
                state["step"] += 1
                state["epoch_step"] += 1
                state["tokens"] += int(counts[0])
                state["loss_tokens"] += int(counts[1])
                throughput.tokens += int(counts[0])
                if state["epoch_step"] >= steps_per_epoch:
                    state["epoch"] += 1
                    state["epoch_step"] = 0
                if not first_step_logged:
                    fabric.print(f"First optimizer step done {time.perf_counter() - t0:.1f}s after start")
                    first_step_logged = True

                if state["step"] % train.log_interval == 0 or state["step"] == total_steps:
                    train_loss = fabric.all_reduce(loss_sum / accum, reduce_op="mean").item()
                    metrics = {
                        "train_loss": train_loss,
                        "lr": lr,
                        "tokens": state["tokens"],
                        "loss_tokens": state["loss_tokens"],
                        "epoch": state["epoch"],
                        "tokens_per_sec": throughput.tokens_per_sec,
                    }
                    fabric.log_dict(metrics, step=state["step"])
                    progress.set_postfix(
                        loss=f"{train_loss:.3f}", tok_s=f"{throughput.tokens_per_sec:,.0f}", refresh=False
                    )
                if eval.interval and state["step"] % eval.interval == 0:
                    with stop.section():
                        val_loss = validate(eval.max_iters)
                        fabric.log_dict(
                            {"val_loss": val_loss, "val_ppl": math.exp(val_loss), "tokens": state["tokens"]},
                            step=state["step"],
                        )
                        ppl = math.exp(val_loss)
                        progress.write(f"step {state['step']}: val loss {val_loss:.4f}, val ppl {ppl:.2f}")
                        if log.sample_at_validation and state["step"] != total_steps:  # the final sample follows
                            write_sample()
                progress.update(1)
                if train.save_interval and state["step"] % train.save_interval == 0:
                    save(ckpt.step_dir_name(state["step"]))
                if stop.should_stop(fabric):
                    raise Interrupted(stop.received)
            progress.close()
            training_done = True
            elapsed = throughput.elapsed
            if eval.final_validation:
                with stop.section():
                    val_loss = validate(None)
                fabric.log_dict(
                    {"val_loss": val_loss, "val_ppl": math.exp(val_loss), "tokens": state["tokens"]}, step=state["step"]
                )
            elif math.isfinite(val_loss):
                val_label = f"last val loss ({eval.max_iters or 'all'} batches, step {state['step']})"
            save("final")
            if stop.should_stop(fabric):
                raise Interrupted(stop.received)
            with stop.section():
                _summary(fabric, _unwrap(model), throughput, elapsed, seq_len, val_loss, val_label, state, out_dir)
                fabric.logger.finalize("success")
                write_sample()
        except Interrupted:
            progress.close()
            return _stopped(fabric, stop, state, saved_steps, save, training_done, out_dir)
    return 0


def _stopped(fabric, stop: StopSignal, state: dict, saved_steps: dict, save, training_done: bool, out_dir: Path) -> int:
    """Save what a signal interrupted (unless saved already) and say how to continue; the exit code."""
    from litattn import checkpoint as ckpt

    if state["step"] == 0:
        fabric.print(f"Stopped by {stop.received} before the first optimizer step: nothing trained, nothing saved")
        fabric.logger.finalize("interrupted")
        return stop.exit_code
    name = "final" if training_done else ckpt.step_dir_name(state["step"])
    if saved_steps.get(name) != state["step"]:
        save(name)
        how = "continue with --resume auto"
        if training_done:
            how = "the final validation was skipped; --resume auto runs it"
        fabric.print(f"Stopped by {stop.received}; saved {out_dir / name} (step {state['step']}): {how}")
    else:
        fabric.print(f"Stopped by {stop.received} after saving {out_dir / name} (step {state['step']})")
    fabric.logger.finalize("interrupted")
    return 0


def _claim_out_dir(fabric, out_dir: Path, resume, overwrite: bool):
    """Rank 0 claims out_dir (litattn/run_dir.py); every rank learns the outcome, so an error stops all
    of them (not only rank 0, leaving the others waiting at the next collective)."""
    from litattn import run_dir

    claim, error = None, None
    if fabric.global_rank == 0:
        try:
            claim = run_dir.claim(out_dir, resume, overwrite)
        except (ValueError, FileNotFoundError) as e:
            error = e
    if fabric.world_size > 1:
        outcome = fabric.broadcast((str(claim.resume_dir) if claim and claim.resume_dir else None, error), src=0)
        if fabric.global_rank != 0:
            resume_dir, error = outcome
            claim = run_dir.RunClaim(out_dir, Path(resume_dir) if resume_dir else None)
    if error is not None:
        raise error
    return claim


def run_tokenizer(tokenizer_dir: Path | None, checkpoint_dir: Path | None):
    """The tokenizer a run uses: a run that starts from a checkpoint (resumed, initial weights, finetuning)
    keeps the checkpoint's, since its weights were trained on those ids; `tokenizer_dir` may name it too,
    but a different one is an error. Otherwise `tokenizer_dir`'s, or None (the data module trains one)."""
    from litattn import checkpoint as ckpt
    from litattn.tokenizer import Tokenizer

    given = Tokenizer(tokenizer_dir) if tokenizer_dir else None
    if checkpoint_dir is None:
        return given
    if not ckpt.has_tokenizer(checkpoint_dir):
        if given is not None:
            return given
        raise FileNotFoundError(
            f"{checkpoint_dir} has no tokenizer (tokenizer.json or tokenizer.model), and its weights need the one "
            "they were trained with: copy it into the directory or pass it with --tokenizer_dir"
        )
    own = Tokenizer(checkpoint_dir)
    if given is not None and given.fingerprint() != own.fingerprint():
        raise ValueError(
            f"--tokenizer_dir {tokenizer_dir} differs from the tokenizer of {checkpoint_dir}, whose weights were "
            "trained on that one's ids: leave --tokenizer_dir out to use the checkpoint's"
        )
    return own


@torch.no_grad()
def validation_loss(fabric, model, val_data, micro_batch_size: int, max_iters: int | None) -> float:
    """Mean loss per target token (labels != -100) over the validation sequences, split over ranks and
    reduced: the same number `litattn evaluate` reports. For pretraining windows every position has a
    target, so this is also the mean of window means.

    max_iters limits the work to max_iters micro-batches per rank, taken evenly spaced over the whole split
    (its first windows are one file, or one module's questions: no sample of the rest); None: every sequence.
    """
    model.eval()
    n_all = len(val_data)
    n = n_all if max_iters is None else min(n_all, max_iters * micro_batch_size * fabric.world_size)
    chosen = torch.linspace(0, n_all - 1, n).round().long() if n < n_all else torch.arange(n_all)
    total = torch.zeros(2, device=fabric.device, dtype=torch.float64)  # (sum of token losses, target tokens)
    mine = chosen[fabric.global_rank :: fabric.world_size]
    for chunk in mine.split(micro_batch_size):
        batch = {k: v.to(fabric.device) for k, v in collate(val_data, chunk).items()}
        idx, labels = batch.pop("input_ids"), batch.pop("labels")
        logits = model(idx, **batch).float()
        loss_sum = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
        )
        total += torch.stack([loss_sum.double(), (labels != -100).sum().double()])
    total = fabric.all_reduce(total, reduce_op="sum")
    model.train()
    if total[1] == 0:
        raise ValueError("The validation data has no target token (every label is -100); check the data module")
    return (total[0] / total[1]).item()


# ---------------------------------------------------------------------------------- helpers
def _total_steps(train: TrainArgs, steps_per_epoch: int, tokens_per_step: int) -> int | None:
    limits = []
    if train.max_steps is not None:
        limits.append(train.max_steps)
    if train.max_tokens is not None:
        limits.append(max(1, train.max_tokens // tokens_per_step))
    if train.epochs is not None:
        limits.append(train.epochs * steps_per_epoch)
    if not limits and train.max_time is None:
        limits.append(steps_per_epoch)  # nothing set: one epoch
    return min(limits) if limits else None


def _done(state: dict, train: TrainArgs, total_steps: int | None, throughput: Throughput) -> bool:
    if total_steps is not None and state["step"] >= total_steps:
        return True
    return train.max_time is not None and throughput.elapsed >= train.max_time


def _unwrap(model):
    return getattr(model, "module", model)


def _training_state(optimizer, state: dict, seed: int) -> dict:
    from litattn import checkpoint as ckpt

    return {**state, "seed": seed, "optimizer": optimizer.state_dict(), "rng": ckpt.rng_state()}


def _load_resumable(plan: TrainingPlan, directory: Path, model, optimizer, state: dict) -> None:
    from litattn import checkpoint as ckpt

    saved = ckpt.load_training_state(directory)
    plan.restore(model, directory, saved)
    optimizer.load_state_dict(saved["optimizer"])
    for key in state:
        state[key] = saved.get(key, state[key])
    ckpt.set_rng_state(saved["rng"])


def _make_logger(log: LogArgs, out_dir: Path):
    from lightning_fabric.loggers import CSVLogger, TensorBoardLogger

    if log.logger == "tensorboard":
        try:
            return TensorBoardLogger(root_dir=out_dir / "logs", name="tensorboard")
        except ModuleNotFoundError as e:
            raise ValueError(f"log.logger=tensorboard needs TensorBoard: pip install tensorboard ({e})") from e
    # Written at every log call: a killed run keeps its metrics. (Lightning flushes when (step + 1) is a
    # multiple of this, which steps that are multiples of log_interval never are.)
    return CSVLogger(root_dir=out_dir / "logs", name="csv", flush_logs_every_n_steps=1)


def _progress(fabric, log: LogArgs, total: int | None, initial: int):
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="step",
        dynamic_ncols=True,
        disable=not log.progress_bar or fabric.global_rank != 0,
    )


def _summary(
    fabric,
    model,
    throughput: Throughput,
    elapsed: float,
    seq_len: int,
    val_loss: float,
    val_label: str,
    state: dict,
    out_dir: Path,
) -> None:
    """Print the run's figures and write them to out_dir/summary.json (what `litattn ablate` tabulates)."""
    import json

    from litattn.utils import atomic_write_text

    tokens_per_sec = throughput.tokens / max(elapsed, 1e-9)
    dtype = torch.bfloat16 if "bf16" in str(fabric.strategy.precision.precision) else torch.float32
    achieved = flops_per_token(model, seq_len) * tokens_per_sec / fabric.world_size
    peak = measure_matmul_peak(fabric.device, dtype, seconds=0.3)
    memory = peak_memory_bytes(fabric.device)
    fabric.print(
        f"Done: {throughput.tokens:,} tokens in {elapsed:.1f}s = {tokens_per_sec:,.0f} tokens/s; "
        f"peak memory {memory / 2**30:.2f} GiB; "
        f"MFU {achieved / peak:.1%} of {peak / 1e12:.2f} TFLOP/s measured matmul peak ({dtype}); "
        + (f"{val_label} {val_loss:.4f} (ppl {math.exp(val_loss):.2f}); " if math.isfinite(val_loss) else "")
        + f"saved {out_dir / 'final'}"
    )
    summary = {
        "step": state["step"],
        "tokens": state["tokens"],
        "epoch": state["epoch"],
        "elapsed_s": elapsed,
        "tokens_per_sec": tokens_per_sec,
        "peak_memory_bytes": memory,
        "mfu": achieved / peak,
        "val_loss": val_loss if math.isfinite(val_loss) else None,
        "val_loss_is": val_label,
        "parameters": model.num_parameters(),
        "mechanism_parameters": model.mechanism_parameters(),
    }
    if fabric.global_rank == 0:
        atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))


def _sample_prompt(log: LogArgs, tokenizer, val_data) -> list[int] | None:
    """The sample's prompt ids: log.sample_prompt, else the first validation example's prompt for instruction
    data (whose items have one), else none."""
    if log.sample_prompt is not None:
        return tokenizer.encode(log.sample_prompt)
    if hasattr(val_data, "prompt_ids"):
        return val_data.prompt_ids(0)
    return None


def _sample(model, tokenizer, prompt_ids: list[int], max_tokens: int, seed: int) -> None:
    from litattn.generate import generate

    max_tokens = min(max_tokens, model.max_seq_length - len(prompt_ids))
    if max_tokens < 1:
        print(f"(no sample: the {len(prompt_ids)}-token prompt fills the model's context)")
        return
    prompt = torch.tensor(prompt_ids, device=model.lm_head.weight.device)
    generator = torch.Generator(device=prompt.device).manual_seed(seed)
    print(f"\n--- sample ({max_tokens} tokens) ---\n{tokenizer.decode(prompt_ids)}", end="", flush=True)
    out = generate(
        model.eval(), prompt, max_tokens, temperature=0.8, top_k=50, eos_id=tokenizer.eos_id, generator=generator
    )
    print(tokenizer.decode(out[len(prompt) :].tolist()) + "\n---")


def _hyperparameters(arguments: dict[str, Any]) -> dict[str, Any]:
    """The run's arguments as plain YAML-able data (saved into every checkpoint)."""
    out = {}
    for key, value in arguments.items():
        if hasattr(value, "__dataclass_fields__"):
            value = (
                {"class_path": f"{type(value).__module__}.{type(value).__qualname__}", "init_args": asdict(value)}
                if key == "data"
                else asdict(value)
            )
        if isinstance(value, Config):
            value = value.to_dict()
        out[key] = _plain(value)
    return out


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
