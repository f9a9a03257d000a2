"""`litattn evaluate attention`: how spread out, how spiky and how sink-heavy a checkpoint's attention is.

    litattn evaluate attention --checkpoint_dirs [out/a/final,out/b/final] [--length 256] [--windows 16]

Windows of a data module's validation split (with the metadata the mechanism reads, e.g. hybrid's
`prefix_len`, and trailing padding trimmed as validation trims it) go through each checkpoint with attention
computed one query chunk at a time (`GPT.observe`), reduced by `AttentionStatistics`
(litattn/attention/statistics.py): per layer, by query-position bucket, the entropy of each query's
distribution (raw and normalised by ln of the keys it sees), the largest probability, and the mass on the
first 1..k positions. Several checkpoints run side by side on the same windows (their tokenizers must be the
same); `attention` overrides each checkpoint's spec. Writes attention_stats.json and attention_stats.png
(normalised entropy against position, a line per layer and checkpoint) to out_dir, and prints a table per
checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from litattn.args import check_range, start_work
from litattn.attention.base import AttentionMechanism
from litattn.attention.statistics import AttentionStatistics, bucket_label
from litattn.checkpoint import load_with_tokenizer
from litattn.data.base import DataModule
from litattn.data.stdlib import StdlibCorpus
from litattn.training import collate
from litattn.utils import atomic_write, atomic_write_text, progress_bar
from litattn.validation import attention_batch, may_trim
from litattn.visualize import describe_spec


def attention_statistics(
    checkpoint_dirs: list[Path],
    data: DataModule | None = None,
    length: int | None = None,
    windows: int = 16,
    micro_batch_size: int = 4,
    attention: dict | None = None,
    sinks: int = 4,
    per_head: bool = False,
    out_dir: Path = Path("out/attention_stats"),
    cache_dir: Path = Path("cache"),
    context: int | None = None,
) -> dict[str, Any]:
    """Attention statistics of one or more checkpoints on the same validation windows.

    Args:
        checkpoint_dirs: Checkpoint directories, compared side by side.
        data: Data module whose validation split is read; default: the Python standard library (StdlibCorpus).
        length: Tokens per window; default: the first checkpoint's block_size.
        windows: Validation windows read (spread evenly over the split).
        micro_batch_size: Windows per forward.
        attention: Evaluate with another attention spec than each checkpoint's, e.g. `{name: causal}`; keys
            without a `name` update the saved spec's options.
        sinks: Report the mass on the first 1 .. sinks positions.
        per_head: Also report every head (in the JSON).
        out_dir: Where attention_stats.json and attention_stats.png go.
        cache_dir: Where tokenized data is cached.
        context: Accept a length beyond what the attention handles at block_size (RoPE extrapolation).

    Returns:
        The results written to attention_stats.json: per checkpoint, per layer, each statistic by bucket.
    """
    if not checkpoint_dirs:
        raise ValueError("checkpoint_dirs is empty: give one or more checkpoint directories, e.g. [out/a/final]")
    check_range("length", length, ge=2, null="the block_size")
    check_range("windows", windows, ge=1)
    check_range("micro_batch_size", micro_batch_size, ge=1)
    check_range("sinks", sinks, ge=1)
    check_range("context", context, ge=1, null="what the attention handles")
    start_work()
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:  # RuntimeError: the CLI reports it in one line
        raise RuntimeError(f"The attention plot needs matplotlib: pip install 'litattn[plot]' ({e})") from None
    data = StdlibCorpus() if data is None else data
    results, first_tokenizer = [], None
    for checkpoint_dir in map(Path, checkpoint_dirs):
        model, tokenizer, config = load_with_tokenizer(checkpoint_dir, attention=attention, context=context)
        model.eval()
        n = length or config.block_size
        if n > model.max_seq_length:
            raise ValueError(
                f"length {n} is beyond what {checkpoint_dir} handles ({model.max_seq_length} tokens with attention "
                f"{config.attention['name']!r}); lower --length or pass --context"
            )
        first_tokenizer = first_tokenizer or tokenizer
        if tokenizer.fingerprint() != first_tokenizer.fingerprint():
            raise ValueError(
                f"{checkpoint_dir}'s tokenizer is not the first checkpoint's ({first_tokenizer.checkpoint_dir}): "
                "compare checkpoints that share a tokenizer, so they read the same windows"
            )
        data.setup(tokenizer, config.vocab_size, n, Path(cache_dir))
        val = data.val_dataset()
        if len(val) == 0:
            raise ValueError("The validation split has no window of this length; lower --length or add data")
        chosen = torch.linspace(0, len(val) - 1, min(windows, len(val))).round().long()  # spread over the split
        stats = AttentionStatistics(sinks)
        device = model.lm_head.weight.device
        with MechanismProbe(model, stats) as probe, progress_bar(len(chosen), _short(checkpoint_dir)) as bar:
            for chunk in chosen.split(micro_batch_size):
                # as validation reads them: padding columns trimmed where the mechanism allows, the metadata it reads
                batch = attention_batch(model, collate(val, chunk, trim=may_trim(model)))
                batch = {k: v.to(device) for k, v in batch.items()}
                batch.pop("labels")
                model.observe(batch.pop("input_ids"), stats, **batch)
                bar.update(len(chunk))
        results.append(_result(checkpoint_dir, config.attention, stats, per_head, n, len(chosen)))
        results[-1]["temperatures"] = probe.temperature_summary()
        print(format_table(results[-1]))
    out = {"length": results[0]["length"], "windows": windows, "sinks": sinks, "checkpoints": results}
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "attention_stats.json", json.dumps(out, indent=2) + "\n")
    plot(out, out_dir / "attention_stats.png")
    print(f"Saved {out_dir / 'attention_stats.json'} and {out_dir / 'attention_stats.png'}")
    return out


class MechanismProbe:
    """Forward pre-hooks on every block's attention mechanism, for what the probabilities alone do not show: a
    segmenting mechanism's segment ids go to the statistics observer (mass in the query's own segment), and a
    mechanism with `temperatures(q, v, ctx)` (SSA) has its query and value temperatures recorded."""

    QUANTILES = (0.05, 0.5, 0.95)

    def __init__(self, model: torch.nn.Module, stats: AttentionStatistics) -> None:
        self.model, self.stats = model, stats
        self.values: dict[tuple[int, str], list[torch.Tensor]] = {}  # (block, query|value) -> flattened batches
        self._handles: list = []

    def __enter__(self) -> MechanismProbe:
        for module in self.model.modules():
            if isinstance(module, AttentionMechanism):
                self._handles.append(module.register_forward_pre_hook(self._before))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _before(self, mechanism: AttentionMechanism, args: tuple) -> None:
        q, _, v, ctx = args
        key = mechanism.segment_key
        if key is not None and key in ctx.metadata:
            self.stats.segments = ctx.metadata[key]
        if hasattr(mechanism, "temperatures"):
            for kind, t in mechanism.temperatures(q, v, ctx).items():
                self.values.setdefault((mechanism.block_idx, kind), []).append(t.detach().float().flatten().cpu())

    def temperature_summary(self) -> list[dict[str, Any]]:
        """Per block and kind: mean, std, min, max and the 5/50/95% quantiles over every token and head."""
        out = []
        for (block, kind), parts in sorted(self.values.items()):
            t = torch.cat(parts)
            q = torch.quantile(t, torch.tensor(self.QUANTILES))
            quantiles = {f"q{round(100 * p)}": x.item() for p, x in zip(self.QUANTILES, q, strict=True)}
            out.append(
                {"layer": block, "kind": kind, "mean": t.mean().item(), "std": t.std().item(), "min": t.min().item(),
                 "max": t.max().item(), **quantiles}
            )  # fmt: skip
        return out


def _clean(x: float) -> float | None:
    return None if math.isnan(x) else x


def _result(checkpoint_dir: Path, spec: dict, stats: AttentionStatistics, per_head: bool, n: int, windows: int):
    summary, overall = stats.summary(), stats.overall()
    heads = stats.summary(per_head=True) if per_head else {}
    buckets = max(len(v["rows"]) for v in summary.values())
    layers = []
    for layer, columns in summary.items():
        entry = {
            "layer": layer,
            "overall": {k: _clean(v) for k, v in overall[layer].items()},
            "by_bucket": {k: [_clean(float(x)) for x in v] for k, v in columns.items()},
        }
        if per_head:
            entry["per_head"] = {k: [[_clean(float(x)) for x in row] for row in v] for k, v in heads[layer].items()}
        layers.append(entry)
    return {
        "checkpoint_dir": str(checkpoint_dir),
        "attention": spec,
        "length": n,
        "windows": windows,
        "buckets": [bucket_label(b, n) for b in range(buckets)],
        "layers": layers,
    }


def format_table(result: dict[str, Any]) -> str:
    """Per layer: normalised entropy by position bucket, then the largest probability and sink masses overall."""
    sinks = [k for k in result["layers"][0]["overall"] if k.startswith("sink_")]
    header = ["layer", *(f"H/ln n {b}" for b in result["buckets"][1:]), "max p", *sinks]
    lines = [f"{result['checkpoint_dir']} ({describe_spec(result['attention'])}, {result['windows']} windows "
             f"of {result['length']})", " ".join(f"{h:>11}" for h in header)]  # fmt: skip
    segments = any(e["overall"]["segment_mass"] is not None for e in result["layers"])
    if segments:
        lines[1] += f" {'own segment':>11}"
    for entry in result["layers"]:
        norm = entry["by_bucket"]["normalized_entropy"][1:]
        cells = [str(entry["layer"]), *(_fmt(v) for v in norm), _fmt(entry["overall"]["max_prob"])]
        cells += [_fmt(entry["overall"][k]) for k in sinks]
        cells += [_fmt(entry["overall"]["segment_mass"])] if segments else []
        lines.append(" ".join(f"{c:>11}" for c in cells))
    for t in result.get("temperatures", []):
        lines.append(
            f"layer {t['layer']} {t['kind']} temperature: mean {t['mean']:.3f}, 5-95% {t['q5']:.3f}-{t['q95']:.3f}"
        )
    return "\n".join(lines)


def _short(path: Path | str) -> str:
    """The last two parts of a checkpoint path (`seed-1/final`), enough to tell checkpoints apart."""
    return "/".join(Path(path).parts[-2:])


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def plot(out: dict[str, Any], path: Path) -> Path:
    """Normalised entropy against query position (log2 buckets): a line per layer, a panel per checkpoint."""
    from matplotlib.figure import Figure

    checkpoints = out["checkpoints"]
    fig = Figure(figsize=(4.2 * len(checkpoints), 3.4), layout="constrained")
    axes = fig.subplots(1, len(checkpoints), squeeze=False, sharey=True)[0]
    for ax, result in zip(axes, checkpoints, strict=True):
        for entry in result["layers"]:
            ys = entry["by_bucket"]["normalized_entropy"]
            points = [(b, y) for b, y in enumerate(ys) if y is not None]
            ax.plot([b for b, _ in points], [y for _, y in points], marker="o", label=f"layer {entry['layer']}")
        ax.set_xticks(range(len(result["buckets"])), result["buckets"], rotation=45, fontsize=7)
        ax.set_xlabel("query position")
        ax.set_title(f"{_short(result['checkpoint_dir'])} · {describe_spec(result['attention'])}", fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("entropy / ln(visible keys)")
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return Path(path)
