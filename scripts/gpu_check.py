"""The first thing to run on a GPU: does every mechanism's flex path agree with SDPA, does each train, how fast.

    python scripts/gpu_check.py [--litgpt_dir /tmp/lgx]      # one GPU, a few minutes
    python scripts/gpu_check.py --dry_run                    # the same code at toy sizes on the CPU (tests)

One table per part:
1. Kernels: each mechanism (causal, a sliding window, SSA, Self-Extend, Disrupt/SET with segments, hybrid with a
   thought prefix) built twice from one set of weights, `kernel: flex` and `kernel: sdpa`, forward and backward
   on the same batch in float32 and in bfloat16; the largest difference of the logits and of any parameter's
   gradient (and the gradients' largest magnitude, for scale). On a CPU, flex cannot train in this PyTorch
   (compiled flex is inference-only there): the dry run compares forwards only.
2. Training: each mechanism (kernel auto) takes `--steps` AdamW steps on one fixed batch (bf16 autocast on
   CUDA): the loss must fall and stay finite.
3. Throughput: pythia-160m (dry run: pythia-14m) training steps at batch x 2048 tokens in bf16 autocast, tokens/s
   and MFU against the device's measured bf16 matmul peak; with `--litgpt_dir` (an unpacked litgpt wheel, see
   scripts/bench_vs_litgpt.py) litgpt's GPT of the same config in the same process, steps alternated.
Nothing in this project has run on a GPU before this script: record its table in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_litgpt import load_litgpt  # noqa: E402

from litattn import GPT, Config  # noqa: E402
from litattn.attention.registry import get_attention  # noqa: E402
from litattn.cpu import matmul_peak  # noqa: E402
from litattn.training import flops_per_token  # noqa: E402


def segments(B: int, T: int, device) -> dict:
    """Disrupt/SET metadata: each row in 4 segments of random lengths (a Disrupt token starts each)."""
    g = torch.Generator().manual_seed(1)
    starts = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        starts[b, torch.randperm(T - 1, generator=g)[:3] + 1] = 1
    return {"segment_ids": starts.cumsum(1).to(device)}


def prefixes(B: int, T: int, device) -> dict:
    """Hybrid metadata: a thought prefix of a different length in each row."""
    return {"prefix_len": torch.linspace(T // 8, T // 2, B).long().to(device)}


def mechanisms(T: int) -> dict[str, tuple[dict, dict, Callable | None]]:
    """name -> (attention spec, Config overrides, metadata builder)."""
    return {
        "causal": ({"name": "causal"}, {}, None),
        "sliding window": ({"name": "causal"}, {"sliding_window_size": T // 4}, None),
        "ssa": ({"name": "ssa"}, {}, None),
        "self_extend": ({"name": "self_extend", "group_size": 4, "window": T // 4}, {}, None),
        "disrupt_set": ({"name": "disrupt_set"}, {}, segments),
        "hybrid": ({"name": "hybrid", "thought_layers": 1, "iterations": 2}, {}, prefixes),
    }


def has_flex(spec: dict) -> bool:
    return "flex" in get_attention(spec["name"]).kernels


def build(preset: str, spec: dict, overrides: dict, T: int, kernel: str, device, seed: int = 0) -> GPT:
    config = Config.from_name(preset, block_size=T, attention={**spec, "kernel": kernel}, **overrides)
    torch.manual_seed(seed)
    return GPT(config).to(device)


def kernels_table(preset: str, T: int, B: int, device) -> list[list[str]]:
    train = device.type == "cuda"
    rows = []
    for name, (spec, overrides, meta) in mechanisms(T).items():
        if not has_flex(spec):
            rows.append([name, "-", "no flex path (sdpa only)", "-", "-", "-"])
            continue
        for dtype in (torch.float32, torch.bfloat16):
            flex = build(preset, spec, overrides, T, "flex", device).to(dtype)
            sdpa = build(preset, spec, overrides, T, "sdpa", device).to(dtype)
            sdpa.load_state_dict(flex.state_dict())
            idx = torch.randint(0, flex.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(2))
            idx = idx.to(device)
            metadata = meta(B, T, device) if meta else {}
            outs, grads = [], []
            for model in (flex, sdpa):
                with torch.set_grad_enabled(train):
                    logits = model(idx, **metadata)
                    if train:
                        F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), idx[:, 1:].flatten()).backward()
                        grads.append({n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None})
                outs.append(logits.float().detach())
            d_logits = (outs[0] - outs[1]).abs().max().item()
            if train:
                d_grad = max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[1])
                scale = max(g.abs().max().item() for g in grads[1].values())
                grad_cells = [f"{d_grad:.2e}", f"{scale:.2e}"]
            else:
                grad_cells = ["n/a (CPU)", "n/a (CPU)"]
            finite = bool(torch.isfinite(outs[0]).all() and torch.isfinite(outs[1]).all())
            rows.append([name, str(dtype).removeprefix("torch."), f"{d_logits:.2e}", *grad_cells, str(finite)])
    return rows


def training_table(preset: str, T: int, B: int, steps: int, device) -> list[list[str]]:
    rows = []
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    for name, (spec, overrides, meta) in mechanisms(T).items():
        model = build(preset, spec, overrides, T, "auto", device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        idx = torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(3))
        idx = idx.to(device)
        metadata = meta(B, T, device) if meta else {}
        losses = []
        start = time.perf_counter()
        for _ in range(steps):
            with autocast:
                logits = model(idx, **metadata)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), idx[:, 1:].flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        seconds = time.perf_counter() - start
        ok = all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
        rows.append([name, f"{losses[0]:.3f}", f"{losses[-1]:.3f}", f"{steps * B * T / seconds:,.0f}", str(ok)])
    return rows


def _seconds(step: Callable[[], None], sync: Callable[[], None]) -> float:
    """One step's wall time, the device's queue drained before and after."""
    sync()
    start = time.perf_counter()
    step()
    sync()
    return time.perf_counter() - start


def throughput_table(preset: str, T: int, B: int, steps: int, device, litgpt_dir: Path | None) -> list[list[str]]:
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")
    peak = matmul_peak(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    models = {"litattn": build(preset, {"name": "causal"}, {}, T, "auto", device)}
    if litgpt_dir is not None:
        config_module, model_module = load_litgpt(litgpt_dir)
        ours = models["litattn"].config
        theirs = config_module.Config.from_name(
            preset, block_size=T, vocab_size=ours.vocab_size, padded_vocab_size=ours.padded_vocab_size
        )
        torch.manual_seed(0)
        models["litgpt"] = model_module.GPT(theirs).to(device)
    idx = torch.randint(0, models["litattn"].config.vocab_size, (B, T + 1), device=device)
    times: dict[str, list[float]] = {k: [] for k in models}
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=device.type == "cuda") for k, m in models.items()}

    def step(name: str) -> Callable[[], None]:
        def run() -> None:
            with autocast:
                logits = models[name](idx[:, :-1])
            F.cross_entropy(logits.flatten(0, 1).float(), idx[:, 1:].flatten()).backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)

        return run

    for _ in range(steps):  # alternated, one step each per round, after the first round's warm-up
        for name in models:
            times[name].append(_seconds(step(name), sync))
    rows = []
    for name, model in models.items():
        median = statistics.median(times[name][1:] or times[name])
        tok_s = B * T / median
        mfu = flops_per_token(model, T) * tok_s / peak if name == "litattn" else None
        params = sum(p.numel() for p in model.parameters())
        rows.append([name, preset, f"{params:,}", f"{B} x {T}", f"{tok_s:,.0f}", f"{mfu:.1%}" if mfu else "-"])
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry_run", action="store_true", help="toy sizes on the CPU: the code paths, no figures")
    parser.add_argument("--litgpt_dir", type=Path, help="an unpacked litgpt wheel, for the throughput comparison")
    parser.add_argument("--steps", type=int, default=20, help="training steps per mechanism and per model")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error(f"--steps must be >= 2 (a first step to compare with, a warm-up to drop), got {args.steps}")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if device.type != "cuda" and not args.dry_run:
        raise SystemExit("error: no CUDA device here; run with --dry_run to check the script on the CPU")
    if args.dry_run:
        preset, T, B, big, big_T, big_B, steps = "tiny-llama", 64, 2, "pythia-14m", 128, 2, 3
    else:
        preset, T, B, big, big_T, big_B, steps = "pythia-160m", 1024, 4, "pythia-160m", 2048, 8, args.steps
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    print(f"# GPU check on {name}, torch {torch.__version__}{' (dry run: toy sizes)' if args.dry_run else ''}\n")
    print(f"## 1. flex against SDPA ({preset}, {B} x {T}; max |difference|)\n")
    header = ["mechanism", "dtype", "logits", "gradients", "largest gradient", "finite"]
    print(table(header, kernels_table(preset, T, B, device)) + "\n", flush=True)
    print(f"## 2. {steps} training steps on one batch ({preset}, {B} x {T}, kernel auto)\n")
    header = ["mechanism", "first loss", "last loss", "tokens/s", "falls and finite"]
    print(table(header, training_table(preset, T, B, steps, device)) + "\n", flush=True)
    print(f"## 3. Training throughput ({big}, bf16 autocast on CUDA, medians of {steps} alternated steps)\n")
    header = ["model", "config", "parameters", "batch", "tokens/s", "MFU (measured peak)"]
    print(table(header, throughput_table(big, big_T, big_B, steps, device, args.litgpt_dir)), flush=True)


if __name__ == "__main__":
    main()
