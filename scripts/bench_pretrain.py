"""Benchmark litattn's pretraining step against a plain-PyTorch reference of the same model, then the real loop.

    python scripts/bench_pretrain.py [--steps 20] [--warmup 5] [--compile] [--loop-steps 60] [--precisions auto]

Config (the `quickstart` preset): 4 layers, 4 heads, n_embd 256, block 256, vocab 4096, GELU MLP 1024,
LayerNorm, RoPE, tied embeddings (4,208,128 parameters); batch 8 x 256; AdamW as litattn's default
(lr 6e-4, betas 0.9/0.95, eps 1e-8, weight decay 0.1 on weight matrices, fused); gradients clipped at 1.0.

1. In process: one train step (forward, loss, backward, clip, AdamW step) of litattn's GPT (its `loss`, its
   optimizer build functions) and of a reference written here in plain PyTorch (F.scaled_dot_product_attention
   with is_causal=True), on the same random token batches. Steps alternate between the two, so a busy machine
   slows both alike; figures are medians over --steps steps after --warmup. With --compile, the same again
   compiled: litattn's training forward as `--compile` compiles it (`compile_loss`), the reference whole. The
   litattn / reference ratio is the figure that holds across machines.
2. The real loop: `litattn pretrain` as a subprocess per precision, so "1st step" is from process start
   (imports included) to the first optimizer step; tokens/s, peak RSS and MFU from its final summary.
   The tokenizer and token cache are prepared once before timing. --loop-steps 0 skips it.

Precisions: fp32 always; bf16-mixed and bf16-true only on a CPU with native bf16 (AVX-512-BF16, AMX), where
bf16 can pay; elsewhere a line says why they are skipped (name them in --precisions to run them anyway).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

from litattn.args import OptimizerArgs
from litattn.config import Config
from litattn.cpu import detect_isa, format_flops, matmul_peak
from litattn.loop import compile_loss
from litattn.model import GPT
from litattn.training import make_optimizer, parameter_groups

BATCH, SEQ_LEN, PARAMETERS = 8, 256, 4_208_128
SUMMARY = re.compile(
    r"Done: ([\d,]+) tokens in ([\d.]+)s = ([\d,]+) tokens/s; peak memory ([\d.]+) GiB; "
    r"MFU ([\d.]+)% of ([\d,.]+) ([GT])FLOP/s"
)


# ---------------------------------------------------------------------------------- the reference
class RefBlock(nn.Module):
    """Pre-norm block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); qkv laid out [q heads | k heads | v heads]."""

    def __init__(self, d: int, n_head: int, hidden: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.fc_proj = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in self.qkv(self.ln_1(x)).split(C, dim=-1))
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.fc_proj(F.gelu(self.fc(self.ln_2(x))))


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE over the whole head."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat((-x2, x1), dim=-1) * sin.to(x.dtype)


class RefGPT(nn.Module):
    """The quickstart architecture in plain PyTorch: what a hand-written training script would run."""

    def __init__(self, c: Config) -> None:
        super().__init__()
        self.wte = nn.Embedding(c.padded_vocab_size, c.n_embd)
        self.blocks = nn.ModuleList(RefBlock(c.n_embd, c.n_head, c.intermediate_size) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd)
        self.lm_head = nn.Linear(c.n_embd, c.padded_vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        hs = c.n_embd // c.n_head
        self.inv_freq = 1.0 / (c.rope_base ** (torch.arange(0, hs, 2, dtype=torch.float32) / hs))
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        freqs = torch.arange(idx.shape[1], dtype=torch.float32).unsqueeze(-1) * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        x = self.wte(idx)
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def ref_optimizer(model: nn.Module, args: OptimizerArgs) -> torch.optim.Optimizer:
    """AdamW with litattn's default settings: decay on weight matrices, not on norms, biases or the embedding."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and not n.startswith("wte")]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or n.startswith("wte")]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps, fused=True)


# ---------------------------------------------------------------------------------- the in-process steps
class Trainer:
    """One model, its optimizer and its loss, stepped and timed the same way for litattn and the reference."""

    def __init__(self, model: nn.Module, optimizer, loss, precision: str) -> None:
        self.model, self.optimizer, self.loss = model, optimizer, loss
        self.autocast = precision == "bf16-mixed"
        self.times: list[float] = []

    def step(self, x: torch.Tensor, y: torch.Tensor, record: bool = True) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext():
            loss = self.loss(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        if record:
            self.times.append(elapsed)
        return loss.item()

    @property
    def tokens_per_sec(self) -> float:
        return BATCH * SEQ_LEN / statistics.median(self.times)


def trainers(precision: str, compiled: bool) -> tuple[Trainer, Trainer]:
    """litattn's GPT with its optimizer build functions, and the reference; equal parameter counts."""
    config = Config.from_name("quickstart")
    args = OptimizerArgs()
    torch.manual_seed(0)
    ours, ref = GPT(config), RefGPT(config)
    n_ref = sum(p.numel() for p in ref.parameters())
    if not ours.num_parameters() == n_ref == PARAMETERS:
        raise RuntimeError(f"parameter counts differ: litattn {ours.num_parameters():,}, reference {n_ref:,}")
    if precision == "bf16-true":
        ours, ref = ours.to(torch.bfloat16), ref.to(torch.bfloat16)
    ours_opt = make_optimizer(parameter_groups(ours, args), args, torch.device("cpu"))
    ref_opt = ref_optimizer(ref, args)
    ours_loss, ref_loss = ours.loss, ref
    if compiled:
        compile_loss(ours)  # as `litattn pretrain --compile` does
        ours_loss = ours.loss
        ref_loss = torch.compile(ref)
    return Trainer(ours, ours_opt, ours_loss, precision), Trainer(ref, ref_opt, ref_loss, precision)


def in_process(precision: str, compiled: bool, steps: int, warmup: int) -> dict:
    ours, ref = trainers(precision, compiled)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 4096, (BATCH, SEQ_LEN + 1), generator=generator) for _ in range(4)]
    warm = {}
    for name, t in (("litattn", ours), ("reference", ref)):
        start = time.perf_counter()
        for i in range(warmup):
            b = batches[i % len(batches)]
            t.step(b[:, :-1], b[:, 1:], record=False)
        warm[name] = time.perf_counter() - start
    for i in range(steps):  # alternate, so load from elsewhere falls on both
        b = batches[i % len(batches)]
        for t in (ours, ref) if i % 2 == 0 else (ref, ours):
            t.step(b[:, :-1], b[:, 1:])
    return {
        "precision": precision,
        "mode": "compiled" if compiled else "eager",
        "litattn": ours.tokens_per_sec,
        "reference": ref.tokens_per_sec,
        "warmup_s": warm,
    }


# ---------------------------------------------------------------------------------- the real loop
def run_loop(precision: str, steps: int, out_dir: str) -> dict:
    cmd = [sys.executable, "-m", "litattn", "pretrain", "--model_name", "quickstart", "--out_dir", out_dir,
           "--precision", precision, "--train.global_batch_size", str(BATCH), "--train.micro_batch_size", str(BATCH),
           "--train.max_seq_length", str(SEQ_LEN), "--train.max_steps", str(steps), "--train.save_interval", "null",
           "--train.lr_warmup_steps", "10", "--eval.interval", "0", "--eval.final_validation", "false",
           "--log.sample_prompt", "null", "--log.progress_bar", "false"]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_step, lines = None, []
    for line in proc.stdout:
        lines.append(line)
        if first_step is None and line.startswith("First optimizer step"):
            first_step = time.perf_counter() - start
    if proc.wait() != 0:
        raise RuntimeError(f"{precision} run failed:\n{''.join(lines[-20:])}")
    m = SUMMARY.search("".join(lines))
    if m is None:
        raise RuntimeError(f"no summary line in the output of the {precision} run:\n{''.join(lines[-20:])}")
    return {
        "precision": precision,
        "tokens_per_sec": float(m.group(3).replace(",", "")),
        "peak_rss_gib": float(m.group(4)),
        "first_step_s": first_step,
        "mfu": float(m.group(5)),
        "peak_flops": float(m.group(6).replace(",", "")) * (1e9 if m.group(7) == "G" else 1e12),
    }


# ---------------------------------------------------------------------------------- main
def choose_precisions(given: str) -> tuple[list[str], str | None]:
    """The precisions to run, and why bf16 is skipped (None when it is not)."""
    if given != "auto":
        return given.split(","), None
    isa = detect_isa()
    if isa.native_bf16:
        return ["32-true", "bf16-mixed", "bf16-true"], None
    fp32, bf16 = matmul_peak("cpu", torch.float32), matmul_peak("cpu", torch.bfloat16)
    return ["32-true"], (
        f"bf16-mixed, bf16-true skipped: {isa.name} has no native bf16 (bf16 matmuls {format_flops(bf16)} vs "
        f"{format_flops(fp32)} fp32); name them in --precisions to run them anyway"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed in-process steps per side (after warm-up)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed in-process steps per side first")
    parser.add_argument("--compile", action="store_true", help="also time both sides under torch.compile")
    parser.add_argument("--loop-steps", type=int, default=60, help="optimizer steps of each real-loop run (0: skip)")
    parser.add_argument("--precisions", default="auto", help="comma-separated; auto: fp32, and bf16 where native")
    args = parser.parse_args()

    isa = detect_isa()
    precisions, skipped = choose_precisions(args.precisions)
    fp32, bf16 = matmul_peak("cpu", torch.float32), matmul_peak("cpu", torch.bfloat16)
    print(
        f"CPU {isa.name} ({'native' if isa.native_bf16 else 'no native'} bf16), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; matmul peaks fp32 {format_flops(fp32)}, bf16 {format_flops(bf16)}"
    )
    if skipped:
        print(skipped)

    rows = []
    for precision in precisions:
        for compiled in (False, True) if args.compile else (False,):
            rows.append(in_process(precision, compiled, args.steps, args.warmup))
            r = rows[-1]
            print(f"  measured {precision} {r['mode']}: {r['litattn']:,.0f} vs {r['reference']:,.0f} tokens/s")
    print(
        f"\nIn-process train step, batch {BATCH} x {SEQ_LEN}, median of {args.steps} alternated steps "
        f"after {args.warmup} warm-up:\n"
    )
    print("| precision | mode | litattn tok/s | reference tok/s | litattn / reference | warm-up s (litattn / ref) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        w = r["warmup_s"]
        print(
            f"| {r['precision']} | {r['mode']} | {r['litattn']:,.0f} | {r['reference']:,.0f} | "
            f"{r['litattn'] / r['reference']:.2f}x | {w['litattn']:.1f} / {w['reference']:.1f} |"
        )

    if not args.loop_steps:
        return
    with tempfile.TemporaryDirectory() as tmp:
        run_loop("32-true", 1, tmp + "/warmup")  # prepares the tokenizer and token cache outside the timings
        loop = [run_loop(p, args.loop_steps, f"{tmp}/{p}") for p in precisions]
    base = loop[0]["tokens_per_sec"]
    ref = {r["precision"]: r["reference"] for r in rows if r["mode"] == "eager"}
    print(f"\nThe real loop (`litattn pretrain`, {args.loop_steps} steps, a process per precision):\n")
    print("| precision | tokens/s | vs fp32 | vs eager reference | peak RSS | 1st step | MFU | matmul peak |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in loop:
        vs_ref = r["tokens_per_sec"] / ref[r["precision"]] if r["precision"] in ref else math.nan
        print(
            f"| {r['precision']} | {r['tokens_per_sec']:,.0f} | {r['tokens_per_sec'] / base:.2f}x | {vs_ref:.2f}x | "
            f"{r['peak_rss_gib']:.2f} GiB | {r['first_step_s']:.1f} s | {r['mfu']:.1f}% | "
            f"{format_flops(r['peak_flops'])} |"
        )


if __name__ == "__main__":
    main()
