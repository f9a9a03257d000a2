"""Benchmark every registered attention mechanism against `causal`: time and peak memory per sequence length.

    python scripts/bench_attention.py [--lengths 512,2048,8192] [--repeats 5] [--batch_size 1] [--dtype float32]
        [--mechanisms causal,ssa] [--variant 'ssa-position={"name": "ssa", "token_temperature": false}']
        [--heads 8] [--segment_every 128]

`--variant LABEL=SPEC` (repeatable) adds a row for an attention spec with options, as YAML/JSON.

What runs, for each mechanism (`available_attention()`, without the tests' `test_*` ones) and length T:
- attn fwd, attn fwd+bwd: the mechanism alone, `mechanism(q, k, v, ctx)` (RoPE, mask, kernel) on random
  q, k, v of the quickstart preset's shape (4 heads of 64; `--heads` sets another count of 64-dim heads),
  batch `--batch_size`; fwd+bwd backpropagates the sum of the output into q, k, v. Attention metadata: with
  `--segment_every N`, mechanisms that read `segment_ids` get a new segment every N tokens; others none.
- step: one training step (forward, loss, backward, AdamW step) of the quickstart preset with 2 layers and
  block_size T, on random token ids (with `--segment_every N`, every mechanism's ids hold the Disrupt token
  every N tokens, which mechanisms that read segments derive them from).

Times: median of `--repeats` runs after warmup runs. All mechanisms of one length are built in this process
and their runs are interleaved (causal, a, b, causal, a, b, ...), so a slower or busier machine moves every
mechanism alike and the ratios to causal stay meaningful.

Peak memory: what one run needs on top of what existed before it.
- CUDA: `torch.cuda.max_memory_allocated` minus the memory allocated before the run (tensors only).
- CPU: the growth of the process's peak resident set (Linux VmHWM, reset through /proc/self/clear_refs) over
  one run, after a warmup run, in a fresh subprocess per mechanism and length. glibc's mmap threshold is fixed
  (MALLOC_MMAP_THRESHOLD_) and `malloc_trim` runs before the measured run, so freed tensors return to the OS
  instead of hiding in the heap. This counts every page the run touches (tensors, allocator and kernel
  workspaces, thread stacks), not the tensor high-water mark; expect +-1 MiB of noise.

A mechanism that raises (e.g. one that needs metadata such as segment ids) is skipped with a note; an
inference-only one gets forward numbers only.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

KINDS = ("fwd", "fwd_bwd", "step")
HEADERS = {"fwd": "attn fwd", "fwd_bwd": "attn fwd+bwd", "step": "train step"}


# ---------------------------------------------------------------------------------- what is run
def build(
    spec: dict, T: int, batch_size: int, dtype: torch.dtype, device: torch.device, heads=None, segment_every=None
) -> dict[str, Callable | str]:
    """The three runs of one attention spec at length T: kind -> a no-argument callable, or why it is skipped."""
    from litattn.attention import AttentionContext
    from litattn.attention.registry import split_spec
    from litattn.config import Config
    from litattn.model import GPT, RoPE
    from litattn.tokenizer import SPECIAL_TOKENS

    shape = {"n_head": heads, "n_query_groups": heads, "n_embd": heads * 64} if heads else {}
    config = Config.from_name("quickstart", n_layer=2, block_size=T, attention=spec, **shape)
    cls, options = split_spec(config.attention)
    mech = cls(config, 0, options)
    mech.reset_parameters()
    mech.to(device=device, dtype=dtype)
    rope = RoPE(config)
    positions = torch.arange(T, device=device)
    cos, sin = rope(positions)
    nh, ng, hs = config.n_head, config.n_query_groups, config.head_size

    def leaf(heads: int) -> torch.Tensor:
        return torch.randn(batch_size, heads, T, hs, device=device, dtype=dtype, requires_grad=True)

    q, k, v = leaf(nh), leaf(ng), leaf(ng)
    metadata = {}
    if segment_every and "segment_ids" in cls.metadata_keys:
        metadata["segment_ids"] = (positions // segment_every).expand(batch_size, -1)

    def attend() -> torch.Tensor:  # a fresh context per call, as in GPT
        ctx = AttentionContext(positions=positions, cos=cos, sin=sin, rope=rope, kv_len=T, metadata=dict(metadata))
        return mech(q, k, v, ctx)

    def fwd() -> None:
        with torch.no_grad():
            attend()

    def fwd_bwd() -> None:
        attend().sum().backward()
        q.grad = k.grad = v.grad = None

    runs: dict[str, Callable | str] = {"fwd": fwd}
    if not cls.supports_training:
        return {**runs, "fwd_bwd": "inference-only", "step": "inference-only"}
    model = GPT(config).to(device=device, dtype=dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    idx = torch.randint(len(SPECIAL_TOKENS), config.vocab_size, (batch_size, T + 1), device=device)
    if segment_every:
        idx[:, segment_every::segment_every] = SPECIAL_TOKENS.index("<|disrupt|>")

    def step() -> None:
        model.loss(idx[:, :-1], idx[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {**runs, "fwd_bwd": fwd_bwd, "step": step}


def mechanisms(requested: str | None, variants: list[str]) -> dict[str, dict]:
    """Row label -> attention spec: causal first (the baseline), then the requested mechanisms, then variants."""
    import yaml

    from litattn.attention import available_attention

    names = [n for n in available_attention() if not n.startswith("test_")]
    if requested:
        wanted = requested.split(",")
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            raise SystemExit(f"Unknown mechanism(s) {unknown}; registered: {', '.join(names)}")
        names = wanted
    specs = {n: {"name": n} for n in ["causal"] + [n for n in names if n != "causal"]}
    for variant in variants:
        label, sep, text = variant.partition("=")
        spec = yaml.safe_load(text) if sep else None
        if not isinstance(spec, dict) or "name" not in spec:
            raise SystemExit(f"--variant {variant!r}: expected LABEL={{name: ..., option: value}}")
        specs[label] = spec
    return specs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _try(fn: Callable) -> str | None:
    """Run fn; the one-line reason if it raises."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 (any failure of a mechanism is a skip, reported, never a crash)
        if "out of memory" in str(e).lower() and torch.cuda.is_available():
            torch.cuda.empty_cache()
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return None


# ---------------------------------------------------------------------------------- timing
def time_length(specs: dict[str, dict], T: int, args, device: torch.device) -> tuple[dict, dict]:
    """{(label, kind): median seconds} and {(label, kind): skip note} for one length."""
    runs, notes = {}, {}
    for name, spec in specs.items():
        built: dict = {}
        error = _try(lambda spec=spec, built=built: built.update(build(spec, T, args.batch_size, args.dtype, device,
                                                                        args.heads, args.segment_every)))  # fmt: skip
        for kind in KINDS:
            run = built.get(kind, error)
            if not callable(run):
                notes[(name, kind)] = run
            elif (error := _try(run)) is not None:  # the warmup run
                notes[(name, kind)] = error
            else:
                runs[(name, kind)] = run
    times: dict = {key: [] for key in runs}
    for run in runs.values():  # warm again, right before the timed rounds
        run()
    for _ in range(args.repeats):
        for key, run in runs.items():
            _sync(device)
            start = time.perf_counter()
            run()
            _sync(device)
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(t) for key, t in times.items()}, notes


# ---------------------------------------------------------------------------------- memory
def memory_length(specs: dict[str, dict], T: int, args, device: torch.device) -> dict:
    """{(label, kind): peak bytes} for one length (CUDA in this process; CPU in one fresh process per spec)."""
    peaks = {}
    for name, spec in specs.items():
        if device.type == "cuda":
            result = measure_memory(spec, T, args.batch_size, args.dtype, device, args.heads, args.segment_every)
        else:
            result = _memory_subprocess(name, spec, T, args)
        peaks.update({(name, kind): b for kind, b in result.items() if b is not None})
    return peaks


def measure_memory(spec: dict, T: int, batch_size: int, dtype, device, heads=None, segment_every=None) -> dict:
    """kind -> bytes one run needs above what existed before it (None if it cannot run)."""
    built: dict = {}
    if _try(lambda: built.update(build(spec, T, batch_size, dtype, device, heads, segment_every))) is not None:
        return dict.fromkeys(KINDS)
    out = {}
    for kind in KINDS:
        run = built[kind]
        if not callable(run) or _try(run) is not None:  # warmup
            out[kind] = None
            continue
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            run()
            torch.cuda.synchronize(device)
            out[kind] = torch.cuda.max_memory_allocated(device) - before
        else:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak resident set to the current one
            before = _proc_status("VmRSS")
            run()
            out[kind] = _proc_status("VmHWM") - before
    return out


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def _memory_subprocess(name: str, spec: dict, T: int, args) -> dict:
    cmd = [sys.executable, __file__, "--_memory", json.dumps(spec), "--lengths", str(T)]
    cmd += ["--batch_size", str(args.batch_size)]
    cmd += ["--dtype", str(args.dtype).removeprefix("torch.")]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    cmd += ["--heads", str(args.heads)] if args.heads else []
    cmd += ["--segment_every", str(args.segment_every)] if args.segment_every else []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}  # fixed: large tensors are unmapped when freed
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["killed (out of memory?)"])[-1]
        print(f"  memory of {name} at T={T} not measured: {tail}", file=sys.stderr)
        return dict.fromkeys(KINDS)
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------- report
def _cell(value: float | None, base: float | None, unit: str, note: str | None) -> str:
    if value is None:
        return "skipped" if note else "-"
    shown = f"{value * 1e3:.2f} ms" if unit == "s" else f"{value / 2**20:.1f} MiB"
    return f"{shown} ({value / base:.2f}x)" if base else shown


def report(T: int, names: list[str], times: dict, peaks: dict, notes: dict) -> str:
    columns = [(k, "s") for k in KINDS] + [(k, "B") for k in KINDS]
    titles = [f"{HEADERS[k]} time" for k in KINDS] + [f"{HEADERS[k]} peak" for k in KINDS]
    width = max(len(n) for n in names) + 2
    lines = [f"{'T=' + str(T):<{width}}" + "".join(f"{t:>22}" for t in titles)]
    for name in names:
        cells = []
        for kind, unit in columns:
            table = times if unit == "s" else peaks
            base = table.get(("causal", kind))
            cells.append(_cell(table.get((name, kind)), base, unit, notes.get((name, kind))))
        lines.append(f"{name:<{width}}" + "".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="512,2048,8192", help="comma-separated sequence lengths")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (the median is shown)")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--mechanisms", default=None, help="comma-separated names (default: all registered)")
    parser.add_argument(
        "--variant", action="append", default=[], help="LABEL=SPEC: one more row, e.g. 'ssa-pos={name: ssa, ...}'"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--heads", type=int, default=None, help="64-dim heads (default: the quickstart preset's 4)")
    parser.add_argument("--segment_every", type=int, default=None, help="a Disrupt segment every N tokens")
    parser.add_argument("--_memory", default=None, help=argparse.SUPPRESS)  # internal: one memory measurement
    args = parser.parse_args()
    for name in ("repeats", "batch_size", "threads", "heads", "segment_every"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    args.dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lengths = [int(n) for n in args.lengths.split(",")]

    if args._memory:
        spec = json.loads(args._memory)
        print(json.dumps(measure_memory(spec, lengths[0], args.batch_size, args.dtype, device, args.heads,
                                        args.segment_every)))  # fmt: skip
        return

    specs = mechanisms(args.mechanisms, args.variant)
    names = list(specs)
    print(
        f"{device.type}, {args.dtype}, batch {args.batch_size}, {args.heads or 4} heads of 64, "
        f"segments every {args.segment_every or '-'} tokens, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; median of {args.repeats} after warmup; ratios to causal"
    )
    all_notes: dict = {}
    for T in lengths:
        times, notes = time_length(specs, T, args, device)
        peaks = memory_length(specs, T, args, device)
        print("\n" + report(T, names, times, peaks, notes), flush=True)
        all_notes.update({(name, kind, T): note for (name, kind), note in notes.items()})
        gc.collect()
    if all_notes:
        print("\nSkipped:")
        for (name, kind, T), note in all_notes.items():
            print(f"  {name} {HEADERS[kind]} at T={T}: {note}")


if __name__ == "__main__":
    main()
