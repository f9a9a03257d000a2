import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

import reference  # noqa: F401 (registers test_window)
from litattn import GPT, Config, visualize
from litattn import checkpoint as ckpt
from litattn.attention import AttentionMechanism, register_attention
from litattn.attention.kernels import attend
from litattn.tokenizer import Tokenizer
from litattn.visualize import attention, select_maps, token_label
from reference import causal_mask, naive_attention_probs, naive_rope

PROMPT = "def add(a, b):\n    return a + b"


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> Path:
    """An untrained tiny-llama (2 layers, 4 heads, GQA) with a small byte-level BPE trained here."""
    root = tmp_path_factory.mktemp("visualize")
    tokenizer = Tokenizer.train([Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"], 320, root / "tok")
    config = Config.from_name("tiny-llama", vocab_size=320, block_size=64)
    torch.manual_seed(0)
    return ckpt.save_checkpoint(root / "ckpt", GPT(config).state_dict(), config, tokenizer)


@pytest.fixture
def figures(monkeypatch) -> list:
    """The matplotlib figures `attention` renders, to read back what was drawn."""
    drawn, real = [], visualize.render

    def spy(*args, **kwargs):
        drawn.append(real(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(visualize, "render", spy)
    return drawn


def _reference_maps(checkpoint_dir: Path, prompt: str) -> tuple[list[torch.Tensor], list[int]]:
    model, tokenizer, _ = ckpt.load(checkpoint_dir)
    ids = tokenizer.encode(prompt)
    return model.eval().attention_maps(torch.tensor([ids])), ids


def _drawn(fig) -> np.ndarray:
    """The panels' pixel values as data, (rows, cols, T, T), masked cells read as 0."""
    axes = [ax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"]
    n_cols = len({ax.get_subplotspec().colspan.start for ax in axes})
    panels = [ax.images[0].get_array().filled(0.0) for ax in axes]
    return np.stack(panels).reshape(len(panels) // n_cols, n_cols, *panels[0].shape)


def test_png_shows_every_layer_and_head_of_the_model(checkpoint_dir, tmp_path, figures):
    import matplotlib.image

    out = attention(checkpoint_dir, PROMPT, out_file=tmp_path / "maps.png")
    assert out == tmp_path / "maps.png" and out.is_file()
    (fig,) = figures
    maps, ids = _reference_maps(checkpoint_dir, PROMPT)
    expected = torch.stack([m[0] for m in maps]).numpy()  # (n_layer, n_head, T, T)
    assert expected.shape == (2, 4, len(ids), len(ids))
    np.testing.assert_allclose(_drawn(fig), expected, atol=1e-7)
    # sanity of the data themselves: causal rows of probabilities
    assert np.allclose(expected.sum(-1), 1, atol=1e-5) and np.all(np.triu(expected, k=1) == 0)

    pixels = matplotlib.image.imread(out)
    width, height = fig.get_size_inches() * visualize._dpi(fig)
    assert abs(pixels.shape[0] - height) <= 1 and abs(pixels.shape[1] - width) <= 1
    rgb = pixels[..., :3].reshape(-1, 3)
    assert rgb.std() > 0.1 and len(np.unique(rgb.round(2), axis=0)) > 50  # a real picture, not a blank page
    titles = [ax.get_title() for ax in fig.axes]
    assert "layer 1 · head 3" in titles
    assert fig.get_suptitle().startswith("causal attention") and f"{len(ids)} tokens" in fig.get_suptitle()
    bottom_left = next(ax for ax in fig.axes if ax.get_title() == "layer 1 · head 0")
    tick_labels = [t.get_text() for t in bottom_left.get_xticklabels()]
    _, tokenizer, _ = ckpt.load(checkpoint_dir)
    assert tick_labels == [token_label(tokenizer.decode([i])) for i in ids]
    assert "↵" in "".join(tick_labels) and "␣" in "".join(tick_labels)


def test_selected_layers_and_heads_and_the_head_average(checkpoint_dir, tmp_path, figures):
    maps, _ = _reference_maps(checkpoint_dir, PROMPT)
    attention(checkpoint_dir, PROMPT, out_file=tmp_path / "a.png", layers=[-1], heads=[0, 2])
    attention(checkpoint_dir, PROMPT, out_file=tmp_path / "b.png", layers=[0, 1], heads=[1, 3], average_heads=True)
    picked, averaged = (_drawn(f) for f in figures)
    np.testing.assert_allclose(picked, maps[1][0, [0, 2]][None].numpy(), atol=1e-7)
    expected = np.stack([(m[0, 1] + m[0, 3]).numpy() / 2 for m in maps])[:, None]
    np.testing.assert_allclose(averaged, expected, atol=1e-6)
    assert [ax.get_title() for ax in figures[1].axes[:1]] == ["layer 0 · mean of heads 1, 3"]


def test_select_maps_matches_direct_indexing():
    maps = [torch.rand(2, 4, 5, 5) for _ in range(3)]
    data, layers, titles = select_maps(maps, [2, 0], [-1], average_heads=False)
    assert layers == [2, 0] and titles == ["head 3"]
    torch.testing.assert_close(data, torch.stack([maps[2][0, [3]], maps[0][0, [3]]]))
    data, _, titles = select_maps(maps, None, None, average_heads=True)
    torch.testing.assert_close(data[:, 0], torch.stack([m[0].mean(0) for m in maps]))
    assert titles == ["mean of all heads"]


def test_long_prompt_drops_token_labels(checkpoint_dir, tmp_path, figures):
    prompt = "x = 1\n" * 10  # 60 tokens: > 48, < 64
    attention(checkpoint_dir, prompt, out_file=tmp_path / "long.png", layers=[0], heads=[0])
    (fig,) = figures
    assert 48 < _drawn(fig).shape[-1] <= 64
    assert all(not t.get_text() or t.get_text().lstrip("−-").isdigit() for t in fig.axes[0].get_xticklabels())


def test_bad_requests_are_clear_errors(checkpoint_dir, tmp_path):
    out = tmp_path / "x.png"
    with pytest.raises(ValueError, match="more than the model's context of 64"):
        attention(checkpoint_dir, "word " * 200, out_file=out)
    with pytest.raises(ValueError, match=r"layer index\(es\) \[2\] out of range: the model has 2 layers"):
        attention(checkpoint_dir, PROMPT, out_file=out, layers=[0, 2])
    with pytest.raises(ValueError, match=r"head index\(es\) \[-5\] out of range: the model has 4 heads"):
        attention(checkpoint_dir, PROMPT, out_file=out, heads=[-5])
    with pytest.raises(ValueError, match="empty"):
        attention(checkpoint_dir, "", out_file=out)
    assert not out.exists()


def test_token_labels_are_readable():
    assert token_label(" return") == "␣return"
    assert token_label("\n\t") == "↵⇥"
    assert token_label("$x$") == r"\$x\$"  # not math text
    assert token_label("a" * 20) == "a" * 9 + "…"
    assert token_label("\x00") == "\\x00"


# ------------------------------------------------------------- attention override
@register_attention("test_vis_silent")
class Silent(AttentionMechanism):
    """Causal attention that never reports its maps (a test mechanism)."""

    def attend(self, q, k, v, ctx):
        return attend(q, k, v, is_causal=True)


def test_attention_spec_override_draws_that_mechanism(checkpoint_dir, tmp_path, figures):
    spec = {"name": "test_window", "window": 4}
    attention(checkpoint_dir, PROMPT, out_file=tmp_path / "w.png", layers=[0], heads=[1], attention_spec=spec)
    (fig,) = figures
    drawn = _drawn(fig)[0, 0]
    T = drawn.shape[0]
    i, j = np.indices((T, T))
    assert np.all(drawn[(j > i) | (i - j >= 4)] == 0) and np.all(drawn[(j <= i) & (i - j < 4)] > 0)
    np.testing.assert_allclose(drawn.sum(-1), 1, atol=1e-5)
    # the values: the checkpoint's layer-0 q, k (from its own causal model), rotated and softmaxed naively in a window
    model, tokenizer, config = ckpt.load(checkpoint_dir)
    captured = []
    model.transformer.h[0].attn.mechanism.register_forward_pre_hook(lambda m, args: captured.append(args[:2]))
    with torch.no_grad():
        model.eval()(torch.tensor([tokenizer.encode(PROMPT)]))
    pos = torch.arange(T)
    q, k = (naive_rope(x, pos, config.rope_n_elem, config.rope_base) for x in captured[0])
    expected = naive_attention_probs(q, k, causal_mask(pos, T, window=4))[0, 1]
    np.testing.assert_allclose(drawn, expected.numpy(), atol=1e-6)
    assert fig.get_suptitle().startswith("test_window(window=4) attention")
    with pytest.raises(RuntimeError, match="reported maps for 0 of 2 block applications"):
        attention(checkpoint_dir, PROMPT, out_file=tmp_path / "s.png", attention_spec={"name": "test_vis_silent"})
