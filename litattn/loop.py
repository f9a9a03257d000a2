"""The training loop both entry points share: `fit(fabric, plan, data, run)`.

    litattn pretrain  (pretrain/pretrain.py)  -> TrainingPlan: every parameter, fresh or from initial weights
    litattn finetune  (finetune/finetune.py)  -> the finetuning methods' plans (finetune/methods.py)

`fit` claims the run's out_dir, resumes from there or starts afresh, then runs these steps:

    data       tokenizer (the checkpoint's, given, or trained) and the tokenized splits
    batching   global batch = micro batch x gradient accumulation x devices; steps per epoch; the step limit
    model      the plan builds it (and says what trains); optimizer; Fabric wraps both; resume loads them
    hooks      the model's and the data module's TrainingHooks (litattn/hooks.py)
    loop       per epoch: hooks.on_epoch_start; per step: dataset.set_epoch(epoch) where the training dataset
               has one (items that depend on the epoch); the epoch's windows, forward/backward per
               micro-batch, optimizer step, hooks.on_step_end, log, validate, save; stop on a signal
    end        final validation, `final/`, summary.json, a sample

One optimizer step = `global_batch_size` windows of the epoch's permutation (a pure function of seed and
epoch), split over devices and gradient-accumulation micro-steps. A checkpoint stores (step, epoch, step
within epoch), the optimizer and the RNG, so a resumed run continues with exactly the windows, weights and
random draws the uninterrupted run would have had.
"""

from __future__ import annotations

import math
import sys
import time
import types
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from lightning_fabric import Fabric
from lightning_fabric.loggers import TensorBoardLogger
from tqdm import tqdm

from litattn import checkpoint as ckpt
from litattn import run_dir
from litattn.args import EvalArgs, LogArgs, OptimizerArgs, RuntimeArgs, TrainArgs, start_work
from litattn.config import Config
from litattn.cpu import warn_if_slow_bf16
from litattn.csv_log import CSVLogger
from litattn.data import DataModule
from litattn.data.base import EpochAware
from litattn.hooks import HookContext, TrainingHook
from litattn.plan import TrainingPlan
from litattn.precision import choose_precision, fabric_precision
from litattn.run_summary import write_summary
from litattn.sampling import sample_prompt, write_sample
from litattn.tokenizer import Tokenizer
from litattn.train_state import TrainState
from litattn.training import (
    Interrupted,
    StopSignal,
    Throughput,
    collate,
    epoch_order,
    lr_at,
    make_optimizer,
    set_lr,
)
from litattn.utils import WriteError
from litattn.validation import attention_batch, may_trim, unwrap, validation_loss


@dataclass
class RunSpec:
    """Where a run lives and how it trains: everything `fit` needs besides the plan and the data. The entry
    points fill it from their command-line arguments (whose docstrings describe each field)."""

    out_dir: Path
    """Checkpoints (`step-XXXXXXXX/`, `final/`), logs and summary.json."""
    tokenizer_dir: Path | None = None
    """A tokenizer to use; None: the checkpoint's when starting from one, else the data module trains one."""
    resume: bool | str | Path = False
    """False, True or "auto" (the newest checkpoint in out_dir, if any), or a checkpoint path."""
    overwrite: bool = False
    """Delete a previous run's checkpoints and logs in out_dir first."""
    train: TrainArgs = field(default_factory=TrainArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    optimizer: OptimizerArgs = field(default_factory=OptimizerArgs)
    log: LogArgs = field(default_factory=LogArgs)
    runtime: RuntimeArgs = field(default_factory=RuntimeArgs)
    """Precision, devices, compile, the seed (of the data order and the hooks' generators; Fabric is seeded with it
    too) and the cache of the tokenizer and the tokenized data."""
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    """The run's arguments as plain data (`hyperparameters_of`), saved into every checkpoint."""
    hooks: Sequence[TrainingHook] = ()
    """Hooks beyond the model's and the data module's (for runs started from Python)."""

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.tokenizer_dir = Path(self.tokenizer_dir) if self.tokenizer_dir is not None else None


def launch_fabric(out_dir: Path, log: LogArgs, runtime: RuntimeArgs):
    """A launched Fabric (processes started for multi-device strategies) with the run's logger, seeded."""
    fabric = Fabric(
        accelerator=runtime.accelerator,
        devices=runtime.devices,
        num_nodes=runtime.num_nodes,
        strategy=runtime.strategy,
        precision=choose_precision(runtime.precision, runtime.accelerator).precision,
        loggers=[_make_logger(log, out_dir)],
    )
    fabric.launch()
    fabric.seed_everything(runtime.seed)
    return fabric


def launch_and_fit(
    plan: TrainingPlan,
    data: DataModule,
    tokenizer_dir: Path | None,
    hyperparameters: dict[str, Any],
    *,
    out_dir: Path,
    resume,
    overwrite: bool,
    train: TrainArgs,
    eval: EvalArgs,
    optimizer: OptimizerArgs,
    log: LogArgs,
    runtime: RuntimeArgs,
) -> None:
    """What the training entry points (pretrain, finetune) share once they have a plan and data: launch
    Fabric, run `fit`, exit with its code when it is not 0."""
    check_sequence_length(plan, train)
    start_work()  # the argument checks end here (--print_config stops here); files are read from here on
    run_tokenizer(tokenizer_dir, plan.initial_checkpoint_dir)  # an unreadable or swapped one fails before any work
    fabric = launch_fabric(out_dir, log, runtime)
    run = RunSpec(
        out_dir=out_dir,
        tokenizer_dir=tokenizer_dir,
        resume=resume,
        overwrite=overwrite,
        train=train,
        eval=eval,
        optimizer=optimizer,
        log=log,
        runtime=runtime,
        hyperparameters=hyperparameters,
    )
    code = fit(fabric, plan, data, run)
    if code:
        sys.exit(code)


def check_sequence_length(plan: TrainingPlan, train: TrainArgs) -> None:
    if (train.max_seq_length or plan.config.block_size) > plan.config.block_size:
        raise ValueError(
            f"train.max_seq_length={train.max_seq_length} exceeds the model's block_size={plan.config.block_size}"
        )


def fit(fabric, plan: TrainingPlan, data: DataModule, run: RunSpec) -> int:
    """Run the training loop; returns the process exit code (0 done, or stopped by a signal and saved;
    1 diverged; 128 + signal when stopped before the first optimizer step, with nothing to save).

    `plan` says what trains and what checkpoints hold (litattn/plan.py): pretraining trains everything,
    the finetuning methods a part, LoRA saves merged weights. The run first claims out_dir
    (litattn/run_dir.py: one run per directory), then resumes from there or starts afresh."""
    check_sequence_length(plan, run.train)
    claim = _claim_out_dir(fabric, run.out_dir, run.resume, run.overwrite)
    try:
        return _fit(fabric, plan, data, run, claim.resume_dir)
    except WriteError as e:  # a full disk or an unwritable file: say what is kept and how to go on
        kept = ckpt.latest_checkpoint(run.out_dir)
        raise type(e)(
            f"{e}. "
            + (f"The last good checkpoint, {kept}, is kept" if kept else "No checkpoint was saved")
            + "; free space or fix the directory, then --resume auto"
        ) from e.__cause__
    finally:
        claim.release()


@dataclass
class _Batching:
    """How one optimizer step splits over devices and micro-steps, and how many steps the run makes."""

    n_windows: int
    seq_len: int
    micro: int
    global_batch: int
    world: int
    accum: int
    steps_per_epoch: int
    total_steps: int | None


def _fit(fabric, plan: TrainingPlan, data: DataModule, run: RunSpec, resume_dir: Path | None) -> int:
    t0 = time.perf_counter()
    precision = fabric_precision(fabric, run.runtime.precision, run.runtime.accelerator)
    fabric.print(precision.describe())
    warn_if_slow_bf16(fabric)  # before any work: bf16 on a CPU that emulates it is many times slower than fp32
    config = plan.config
    train, eval, log, seed, out_dir = run.train, run.eval, run.log, run.runtime.seed, run.out_dir
    tokenizer, train_data, val_data = _prepare_data(fabric, plan, data, run, resume_dir)
    b = _batching(fabric, train, config, len(train_data))
    model, optimizer = _build(fabric, plan, run, resuming=resume_dir is not None)
    state = TrainState()
    saved_steps: dict[str, int] = {}  # checkpoint directory name -> the step it holds (this run's saves)
    if resume_dir is not None:
        state = _load_resumable(plan, resume_dir, unwrap(model), optimizer)
        fabric.print(f"Resumed from {resume_dir} at step {state.step} (epoch {state.epoch})")
        saved_steps[resume_dir.name] = state.step
    hooks = training_hooks(unwrap(model), data, run.hooks)
    throughput: Throughput | None = None  # this session's training time, from the loop's start
    seconds_before = state.train_seconds  # the earlier sessions' (None: unknown)

    def save(name: str) -> None:
        if throughput is not None and not training_done:  # after training, the figures stay those of its end
            state.account(seconds_before, throughput.elapsed, fabric.device)
        if fabric.global_rank == 0:
            ckpt.save_checkpoint(
                out_dir / name,
                plan.weights(unwrap(model)),
                config,
                tokenizer,
                run.hyperparameters,
                training_state={**_training_state(optimizer, state, seed), **plan.resume_state(unwrap(model))},
            )
        fabric.barrier()
        saved_steps[name] = state.step

    def validate(max_iters: int | None) -> float:
        """The validation loss, logged with the step's tokens and kept in the state (so checkpoints carry it);
        a signal cuts it short."""
        with stop.section():
            loss = validation_loss(fabric, model, val_data, b.micro, max_iters)
            fabric.log_dict({"val_loss": loss, "val_ppl": math.exp(loss), "tokens": state.tokens}, step=state.step)
        state.val_loss, state.val_step, state.val_batches = loss, state.step, max_iters
        return loss

    prompt_ids, sample_prefix_len = sample_prompt(log, tokenizer, val_data)

    def sample() -> None:
        if prompt_ids is not None and fabric.global_rank == 0:
            write_sample(unwrap(model), tokenizer, prompt_ids, log.sample_tokens, seed, sample_prefix_len)
            model.train()

    def call_hooks(event: str) -> None:
        ctx = HookContext(unwrap(model), optimizer, state.epoch, state.step, seed, fabric)
        for hook in hooks:
            getattr(hook, event)(ctx)

    # ---- the loop
    fabric.print(
        f"Training {train.limits()} ({b.total_steps or '?'} steps of {b.global_batch} x {b.seq_len} tokens; "
        f"{b.steps_per_epoch} steps per epoch; micro batch {b.micro} x {b.accum} accumulation x {b.world} devices)"
    )
    throughput = Throughput()
    first_step_logged = False
    progress = _progress(fabric, log, b.total_steps, state.step)
    training_done = False
    with StopSignal(interrupt_sections=b.world == 1) as stop:
        try:
            if eval.initial_validation and state.step == 0:  # before training only, not at a resumed step
                val_loss = validate(eval.max_iters)
                fabric.print(f"step {state.step}: val loss {val_loss:.4f} (before training)")
            while not _done(state, train, b.total_steps, throughput):
                if state.epoch_step == 0:  # a run resumed mid-epoch has this epoch's start in its checkpoint
                    call_hooks("on_epoch_start")
                lr = lr_at(state.step, run.optimizer, train.lr_warmup_steps, b.total_steps)
                set_lr(optimizer, lr)
                if isinstance(train_data, EpochAware):  # items that depend on the epoch (token injection)
                    train_data.set_epoch(state.epoch)
                loss_sum, counts = _forward_backward(fabric, model, train_data, _step_windows(state, b, seed), b, train)
                if not torch.isfinite(loss_sum):
                    progress.close()
                    return _diverged(fabric, loss_sum, state)
                throughput.tokens += _optimizer_step(fabric, model, optimizer, counts, state, b, train.max_norm)
                call_hooks("on_step_end")
                state.end_step(b.steps_per_epoch)
                if not first_step_logged:
                    fabric.print(f"First optimizer step done {time.perf_counter() - t0:.1f}s after start")
                    first_step_logged = True
                if state.step % train.log_interval == 0 or state.step == b.total_steps:
                    _log_training(fabric, progress, loss_sum / b.accum, lr, state, throughput)
                if eval.interval and state.step % eval.interval == 0:
                    val_loss = validate(eval.max_iters)
                    progress.write(f"step {state.step}: val loss {val_loss:.4f}, val ppl {math.exp(val_loss):.2f}")
                    if log.sample_at_validation and state.step != b.total_steps:  # the final sample follows
                        with stop.section():
                            sample()
                progress.update(1)
                if train.save_interval and state.step % train.save_interval == 0:
                    save(ckpt.step_dir_name(state.step))
                if stop.should_stop(fabric):
                    raise Interrupted(stop.received)
            progress.close()
            state.account(seconds_before, throughput.elapsed, fabric.device)
            training_done = True
            validated = eval.final_validation and not state.validated_in_full()  # a resumed final/ may hold it
            if validated:
                validate(None)
            if validated or saved_steps.get("final") != state.step:  # (not when resumed from final/ as it is)
                save("final")
            if stop.should_stop(fabric):
                raise Interrupted(stop.received)
            with stop.section():
                write_summary(fabric, unwrap(model), b.seq_len, state, out_dir, precision)
                fabric.logger.finalize("success")
                sample()
        except Interrupted:
            progress.close()
            return _stopped(fabric, stop, state, saved_steps, save, training_done, out_dir)
    return 0


# ---------------------------------------------------------------------------------- the steps
def _prepare_data(fabric, plan: TrainingPlan, data: DataModule, run: RunSpec, resume_dir: Path | None):
    """(tokenizer, train dataset, validation dataset); rank 0 prepares the cache, the others then read it."""
    config = plan.config
    seq_len = run.train.max_seq_length or config.block_size
    data.seed_from_run(run.runtime.seed)  # the data's random draws follow the run's seed unless pinned
    with fabric.rank_zero_first():
        tokenizer = run_tokenizer(run.tokenizer_dir, resume_dir or plan.initial_checkpoint_dir)
        tokenizer = data.setup(tokenizer, config.vocab_size, seq_len, run.runtime.cache_dir)
    tokenizer.check_fits(config.padded_vocab_size)
    train_data, val_data = data.train_dataset(), data.val_dataset()
    fabric.print(data.describe())
    return tokenizer, train_data, val_data


def _batching(fabric, train: TrainArgs, config: Config, n_windows: int) -> _Batching:
    seq_len = train.max_seq_length or config.block_size
    world = fabric.world_size
    micro, global_batch = train.micro_batch_size, train.global_batch_size
    if global_batch % (micro * world):
        raise ValueError(
            f"global_batch_size={global_batch} must be a multiple of micro_batch_size x devices = {micro} x {world}"
        )
    steps_per_epoch = n_windows // global_batch
    if steps_per_epoch == 0:
        raise ValueError(
            f"The training data has {n_windows} windows of {seq_len} tokens, fewer than one global batch "
            f"({global_batch}); lower train.global_batch_size or train.max_seq_length, or add data"
        )
    total_steps = _total_steps(train, steps_per_epoch, global_batch * seq_len)
    accum = global_batch // (micro * world)
    return _Batching(n_windows, seq_len, micro, global_batch, world, accum, steps_per_epoch, total_steps)


def _build(fabric, plan: TrainingPlan, run: RunSpec, resuming: bool):
    """The plan's model and its optimizer, set up by Fabric (the model's `loss` routed like `forward`)."""
    model = plan.build(fabric, resuming=resuming)
    if run.runtime.compile:
        compile_loss(model)
    fabric.print(
        f"Model: {plan.config.name or 'custom'} ({model.num_parameters():,} parameters), "
        f"attention {plan.config.attention}; {plan.describe(model)}"
    )
    optimizer = make_optimizer(plan.parameter_groups(model, run.optimizer), run.optimizer, fabric.device)
    model = fabric.setup(model)
    model.mark_forward_method("loss")
    return model, fabric.setup_optimizers(optimizer)


def compile_loss(model) -> None:
    """torch.compile the model's training forward, `loss` (embeddings, every block, the fused head): one graph
    for the step instead of one per block (what it gains per step, and how much later the first step comes, is
    measured in docs/benchmarks.md); a mechanism whose layer loop reads tensor values on the host gets graph
    breaks there, still correct. Evaluation and generation stay eager."""
    model.loss = types.MethodType(torch.compile(type(model).loss), model)  # a method: Fabric routes it


def training_hooks(model, data: DataModule, extra: Sequence[TrainingHook] = ()) -> list[TrainingHook]:
    """The hooks a run calls, in this order: the model's (each attention mechanism's), the data module's, then
    `extra`."""
    from_model = getattr(model, "training_hooks", None)  # GPT.training_hooks gathers the mechanisms' hooks
    return [*(from_model() if from_model is not None else []), *data.training_hooks(), *extra]


def _step_windows(state: TrainState, b: _Batching, seed: int) -> torch.Tensor:
    """The windows of the next optimizer step, (accum x world, micro): row `micro_step * world + rank` is one
    rank's micro-batch."""
    order = epoch_order(b.n_windows, seed, state.epoch)
    start = state.epoch_step * b.global_batch
    return order[start : start + b.global_batch].view(b.accum * b.world, b.micro)


def _forward_backward(fabric, model, train_data, windows: torch.Tensor, b: _Batching, train: TrainArgs):
    """This rank's micro-steps of one optimizer step, gradients accumulated (synchronised across ranks at the
    last); returns (sum of the micro-batch losses, (tokens, loss tokens) read by this rank)."""
    loss_sum = torch.zeros((), device=fabric.device)
    counts = torch.zeros(2, dtype=torch.long)  # (tokens, loss tokens) of this step on this rank
    for micro_step in range(b.accum):
        batch = collate(train_data, windows[micro_step * b.world + fabric.global_rank], trim=may_trim(model))
        counts += torch.stack([torch.tensor(batch["input_ids"].numel()), (batch["labels"] != -100).sum()])
        batch = {k: v.to(fabric.device) for k, v in attention_batch(model, batch).items()}
        with fabric.no_backward_sync(model, enabled=micro_step < b.accum - 1):
            # fabric.autocast: on one device Fabric does not route marked methods through forward
            with fabric.autocast():
                loss = model.loss(
                    batch.pop("input_ids"), batch.pop("labels"), chunk_size=train.loss_chunk_size, **batch
                )
            fabric.backward(loss / b.accum)
        loss_sum += loss.detach()
    return loss_sum, counts


def _optimizer_step(fabric, model, optimizer, counts: torch.Tensor, state: TrainState, b: _Batching, max_norm) -> int:
    """Clip, step, and count the step's tokens into the state (summed over ranks); returns the tokens read."""
    if max_norm:
        fabric.clip_gradients(model, optimizer, max_norm=max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if b.world > 1:
        counts = fabric.all_reduce(counts.to(fabric.device), reduce_op="sum").cpu()
    state.step += 1
    state.epoch_step += 1
    state.tokens += int(counts[0])
    state.loss_tokens += int(counts[1])
    return int(counts[0])


def _diverged(fabric, loss_sum: torch.Tensor, state: TrainState) -> int:
    fabric.print(
        f"Loss is {loss_sum.item()} at step {state.step}: stopping. The last good checkpoint is "
        "kept; lower optimizer.lr or raise train.lr_warmup_steps, then --resume auto"
    )
    fabric.logger.finalize("failed")
    return 1


def _log_training(fabric, progress, loss: torch.Tensor, lr: float, state: TrainState, throughput: Throughput) -> None:
    """The step's training loss (the mean over ranks) and counters, to the logger and the progress bar."""
    train_loss = fabric.all_reduce(loss, reduce_op="mean").item()
    metrics = {
        "train_loss": train_loss,
        "lr": lr,
        "tokens": state.tokens,
        "loss_tokens": state.loss_tokens,
        "epoch": state.epoch,
        "tokens_per_sec": throughput.tokens_per_sec,
    }
    fabric.log_dict(metrics, step=state.step)
    progress.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{throughput.tokens_per_sec:,.0f}", refresh=False)


def _stopped(
    fabric, stop: StopSignal, state: TrainState, saved_steps: dict, save, training_done: bool, out_dir: Path
) -> int:
    """Save what a signal interrupted (unless saved already) and say how to continue; the exit code."""
    if state.step == 0:
        fabric.print(f"Stopped by {stop.received} before the first optimizer step: nothing trained, nothing saved")
        fabric.logger.finalize("interrupted")
        return stop.exit_code
    name = "final" if training_done else ckpt.step_dir_name(state.step)
    if saved_steps.get(name) != state.step:
        save(name)
        how = "continue with --resume auto"
        if training_done:
            how = "the final validation was skipped; --resume auto runs it"
        fabric.print(f"Stopped by {stop.received}; saved {out_dir / name} (step {state.step}): {how}")
    else:
        fabric.print(f"Stopped by {stop.received} after saving {out_dir / name} (step {state.step})")
    fabric.logger.finalize("interrupted")
    return 0


def _claim_out_dir(fabric, out_dir: Path, resume, overwrite: bool):
    """Rank 0 claims out_dir (litattn/run_dir.py); every rank learns the outcome, so an error stops all
    of them (not only rank 0, leaving the others waiting at the next collective)."""
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


def _done(state: TrainState, train: TrainArgs, total_steps: int | None, throughput: Throughput) -> bool:
    if total_steps is not None and state.step >= total_steps:
        return True
    return train.max_time is not None and throughput.elapsed >= train.max_time


def _training_state(optimizer, state: TrainState, seed: int) -> dict:
    return {**state.as_dict(), "seed": seed, "optimizer": optimizer.state_dict(), "rng": ckpt.rng_state()}


def _load_resumable(plan: TrainingPlan, directory: Path, model, optimizer) -> TrainState:
    saved = ckpt.load_training_state(directory)
    plan.restore(model, directory, saved)
    optimizer.load_state_dict(saved["optimizer"])
    ckpt.set_rng_state(saved["rng"])
    return TrainState.from_checkpoint(saved)


def _make_logger(log: LogArgs, out_dir: Path):

    if log.logger == "tensorboard":
        try:
            return TensorBoardLogger(root_dir=out_dir / "logs", name="tensorboard")
        except ModuleNotFoundError as e:
            raise ValueError(f"log.logger=tensorboard needs TensorBoard: pip install tensorboard ({e})") from e
    return CSVLogger(out_dir / "logs", "csv")  # every row on disk, whole, when it is logged (litattn/csv_log.py)


def _progress(fabric, log: LogArgs, total: int | None, initial: int):
    return tqdm(
        total=total,
        initial=initial,
        unit="step",
        dynamic_ncols=True,
        disable=not log.progress_bar or fabric.global_rank != 0,
    )


def hyperparameters_of(arguments: dict[str, Any]) -> dict[str, Any]:
    """The run's arguments as plain YAML-able data (saved into every checkpoint)."""
    out = {}
    for key, value in arguments.items():
        if isinstance(value, DataModule):
            value = _class_path(value)
        elif hasattr(value, "__dataclass_fields__"):
            value = asdict(value)
        if isinstance(value, Config):
            value = value.to_dict()
        out[key] = _plain(value)
    return out


def _class_path(module: DataModule) -> dict[str, Any]:
    """A data module as the CLI reads one: class_path and init_args, nested data modules (a wrapper's) alike."""
    init_args = {}
    for f in fields(module):
        if f.init:
            value = getattr(module, f.name)
            init_args[f.name] = _class_path(value) if isinstance(value, DataModule) else _plain_dataclass(value)
    return {"class_path": f"{type(module).__module__}.{type(module).__qualname__}", "init_args": init_args}


def _plain_dataclass(value):
    return asdict(value) if hasattr(value, "__dataclass_fields__") else value


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
