"""`litattn visualize attention`: draw a checkpoint's attention maps on a prompt to a PNG.

    litattn visualize attention --checkpoint_dir out/pretrain/final --prompt "def add(a, b):" [--layers [0,1]]

The maps are what the configured mechanism computes (`GPT.attention_maps`), so a mask, a scaling (SSA)
or remapped positions show as the model sees them. One panel per layer x head (a "layer" is a block
application: a mechanism whose layer loop repeats blocks shows each application)
(or per layer with the heads averaged); probabilities that are exactly 0 (masked keys) are grey. The colour
scale is a square root, so the small weights next to a dominant one stay visible.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from litattn.args import check_indexes, start_work
from litattn.checkpoint import load_with_tokenizer
from litattn.utils import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MAX_LABELED_TOKENS = 48
"""Prompts up to this many tokens get the token strings as tick labels."""


def attention(
    checkpoint_dir: Path,
    prompt: str,
    out_file: Path = Path("attention.png"),
    layers: list[int] | None = None,
    heads: list[int] | None = None,
    average_heads: bool = False,
    attention_spec: dict | None = None,
) -> Path:
    """Draw the attention maps of a checkpoint on a prompt to a PNG file.

    Args:
        checkpoint_dir: A checkpoint directory (model.safetensors, model_config.yaml, tokenizer).
        prompt: Text whose attention is drawn (at most the model's context; labeled with its tokens up to 48).
        out_file: The PNG file to write.
        layers: Layer indexes to draw (negative counts from the end); default: all.
        heads: Head indexes to draw (negative counts from the end); default: all.
        average_heads: Draw the mean over the chosen heads, one panel per layer.
        attention_spec: Draw another attention spec than the checkpoint's, e.g. `{name: causal}`;
            keys without a `name` update the saved spec's options.

    Returns:
        The path of the PNG file.
    """
    _require_matplotlib()
    start_work()
    checkpoint_dir = Path(checkpoint_dir)
    model, tokenizer, config = load_with_tokenizer(checkpoint_dir, attention=attention_spec)
    check_indexes(layers, model.block_applications(), "layer")  # out of range: an error now, before any map is computed
    check_indexes(heads, config.n_head, "head")
    ids = tokenizer.encode(prompt, bos=tokenizer.use_bos)
    if not ids:
        raise ValueError("The prompt is empty: there is no attention to draw")
    if len(ids) > model.max_seq_length:
        raise ValueError(
            f"The prompt has {len(ids)} tokens, more than the model's context of {model.max_seq_length} "
            f"(attention {config.attention['name']!r}); shorten it"
        )
    maps = model.eval().attention_maps(torch.tensor([ids], device=model.lm_head.weight.device))
    applications = model.block_applications()
    if len(maps) != applications:
        raise RuntimeError(
            f"Attention {config.attention['name']!r} reported maps for {len(maps)} of {applications} block "
            "applications: its attend() must hand its probabilities to ctx.observer when one is set"
        )
    data, layer_idx, head_titles = select_maps(maps, layers, heads, average_heads)
    labels = [token_label(tokenizer.decode([i])) for i in ids] if len(ids) <= MAX_LABELED_TOKENS else None
    title = f"{describe_spec(config.attention)} attention · {checkpoint_dir.resolve().name} · {len(ids)} tokens"
    fig = render(data, layer_idx, head_titles, labels, title)
    out_file = Path(out_file)
    atomic_write(out_file, lambda tmp: fig.savefig(tmp, format="png", dpi=_dpi(fig)))
    print(f"Saved {out_file} ({len(layer_idx)} layers x {len(head_titles)} panels, {len(ids)} tokens)")
    return out_file


def select_maps(
    maps: list[torch.Tensor], layers: list[int] | None, heads: list[int] | None, average_heads: bool
) -> tuple[torch.Tensor, list[int], list[str]]:
    """The panels to draw from `GPT.attention_maps` (first batch row): (len(layers), panels, T, S) float32 on CPU,
    the layer indexes and one title per panel column ("head 3", or "mean of 4 heads")."""
    layer_idx = check_indexes(layers, len(maps), "layer")
    n_head = maps[0].shape[1]
    head_idx = check_indexes(heads, n_head, "head")
    data = torch.stack([maps[i][0, head_idx] for i in layer_idx]).float().cpu()  # (L, H, T, S)
    if average_heads:
        what = "all heads" if heads is None else f"heads {', '.join(map(str, head_idx))}"
        return data.mean(dim=1, keepdim=True), layer_idx, [f"mean of {what}"]
    return data, layer_idx, [f"head {h}" for h in head_idx]


def render(
    data: torch.Tensor, layers: list[int], head_titles: list[str], labels: list[str] | None, title: str
) -> Figure:
    """A grid of heatmaps, one row per layer and one column per head title, with a shared colour bar.

    Uses a bare `Figure` (no pyplot), so drawing never changes the caller's matplotlib backend.
    """
    _require_matplotlib()
    import matplotlib as mpl
    from matplotlib.colors import PowerNorm
    from matplotlib.figure import Figure

    n_rows, n_cols = data.shape[0], data.shape[1]
    T, S = data.shape[-2:]
    cell = max(2.6, 0.13 * max(T, S) + 1.0) if labels else 2.6  # inches; labels need ~0.13 in per token
    fig = Figure(figsize=(n_cols * cell + 1.2, n_rows * cell + 0.9), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    cmap = mpl.colormaps["viridis"].with_extremes(bad="0.85")
    values = data.numpy()
    norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=max(float(values.max()), 1e-6))
    font = 7 if labels and max(T, S) > 24 else 8
    image = None
    for r in range(n_rows):
        for c in range(n_cols):
            ax = axes[r, c]
            panel = np.ma.masked_equal(values[r, c], 0.0)  # exactly 0 = masked key: grey
            image = ax.imshow(panel, cmap=cmap, norm=norm, interpolation="nearest", aspect="equal")
            ax.set_title(f"layer {layers[r]} · {head_titles[c]}", fontsize=9)
            if labels:
                ax.set_xticks(range(S), labels if r == n_rows - 1 else [], rotation=90, fontsize=font)
                ax.set_yticks(range(T), labels if c == 0 else [], fontsize=font)
            else:
                ax.tick_params(labelsize=7, labelbottom=r == n_rows - 1, labelleft=c == 0)
            if r == n_rows - 1:
                ax.set_xlabel("key")
            if c == 0:
                ax.set_ylabel("query")
    bar = fig.colorbar(image, ax=axes, shrink=min(1.0, 0.4 + 0.2 * n_rows), aspect=30, pad=0.02)
    bar.set_label("attention probability (grey: 0, masked)")
    fig.suptitle(plain_text(title), fontsize=11)
    return fig


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:  # RuntimeError: the CLI reports it in one line
        raise RuntimeError(f"Drawing attention needs matplotlib: pip install 'litattn[plot]' ({e})") from None


def token_label(text: str, max_chars: int = 10) -> str:
    """A token's text as a readable tick label: spaces, newlines and tabs made visible, long ones cut."""
    text = text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥")
    text = "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)
    text = text if len(text) <= max_chars else text[: max_chars - 1] + "…"
    return plain_text(text) or "∅"


def describe_spec(spec: dict) -> str:
    """`ssa(identity_init=True)`: the mechanism name and its options beyond the kernel."""
    options = {k: v for k, v in spec.items() if k not in ("name", "module", "kernel")}
    return spec["name"] + (f"({', '.join(f'{k}={v}' for k, v in options.items())})" if options else "")


def plain_text(text: str) -> str:
    """Escape `$`, which matplotlib would otherwise read as the start of math text."""
    return text.replace("$", r"\$")


def _dpi(fig: Figure) -> float:
    """120 dpi (crisp 7-point tick labels), less for very large grids so the image stays under ~8000 pixels a side."""
    return min(120.0, 8000.0 / max(fig.get_size_inches()))
