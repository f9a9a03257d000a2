import random
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from torch import nn

from litattn import GPT, Config
from litattn import checkpoint as ckpt
from litattn.attention import AttentionMechanism, AttentionOptions, register_attention


def _model(name: str, **overrides) -> GPT:
    return GPT(Config.from_name(name, **overrides)).eval()


def _idx(vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12))


def _tokenizer(tmp_path):
    from litattn.tokenizer import Tokenizer

    text = tmp_path / "corpus.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 20 + "the quick brown fox jumps over the lazy dog\n" * 20)
    return Tokenizer.train([text], 300, tmp_path / "tok")


# ---------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-pythia"])
def test_save_load_round_trip_gives_identical_logits(tmp_path, name):
    model = _model(name)
    hparams = {"lr": 3e-4, "out_dir": tmp_path / "run", "betas": (0.9, 0.95)}
    out = ckpt.save_checkpoint(tmp_path / "ckpt", model.state_dict(), model.config, hyperparameters=hparams)
    assert sorted(p.name for p in out.iterdir()) == ["hyperparameters.yaml", "model.safetensors", "model_config.yaml"]

    loaded, tokenizer, config = ckpt.load(out)
    idx = _idx()
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    assert tokenizer is None and config == model.config
    assert ckpt.load_hyperparameters(out) == {"lr": 3e-4, "out_dir": str(tmp_path / "run"), "betas": [0.9, 0.95]}


def test_tied_embeddings_are_stored_once_and_stay_tied(tmp_path):
    model = _model("tiny-gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    ckpt.save_checkpoint(tmp_path / "ckpt", model.state_dict(), model.config)
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    assert "transformer.wte.weight" in stored and "lm_head.weight" not in stored
    # readers of the file still see every key (pretrain resumes with a strict load_state_dict)
    state = ckpt.load_state_dict(tmp_path / "ckpt" / "model.safetensors")
    assert set(state) == set(model.state_dict())
    loaded, _, _ = ckpt.load(tmp_path / "ckpt")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_tokenizer_is_saved_and_loaded(tmp_path):
    tokenizer = _tokenizer(tmp_path)
    model = _model("tiny-llama", vocab_size=300)
    ckpt.save_checkpoint(tmp_path / "ckpt", model.state_dict(), model.config, tokenizer)
    _, loaded, _ = ckpt.load(tmp_path / "ckpt")
    text = "def fox(a):"
    assert loaded.encode(text) == tokenizer.encode(text) and loaded.decode(loaded.encode(text)) == text


def test_dtype_is_kept_or_converted(tmp_path):
    model = _model("tiny-llama").to(torch.bfloat16)
    ckpt.save_checkpoint(tmp_path / "ckpt", model.state_dict(), model.config)
    assert ckpt.load(tmp_path / "ckpt")[0].lm_head.weight.dtype == torch.bfloat16
    loaded = ckpt.load(tmp_path / "ckpt", dtype=torch.float32)[0]
    assert loaded.lm_head.weight.dtype == torch.float32
    assert loaded.rope.inv_freq.dtype == torch.float32  # buffers keep full precision


# ---------------------------------------------------------------------------------- attention override
@dataclass
class GateOptions(AttentionOptions):
    pass


@register_attention("test_ckpt_gate")
class GatedAttention(AttentionMechanism):
    """Causal attention times a learned per-head gate initialised to 1 (a test mechanism)."""

    Options = GateOptions

    def __init__(self, config, block_idx, options):
        super().__init__(config, block_idx, options)
        self.gate = nn.Parameter(torch.ones(config.n_head))

    def reset_parameters(self):
        nn.init.ones_(self.gate)

    def attend(self, q, k, v, ctx):
        return super().attend(q, k, v, ctx) * self.gate.view(1, -1, 1, 1)


def test_attention_override_keeps_base_weights_and_inits_new_parameters(tmp_path):
    model = _model("tiny-llama")
    ckpt.save_checkpoint(tmp_path / "causal", model.state_dict(), model.config)

    gated, _, config = ckpt.load(tmp_path / "causal", attention={"name": "test_ckpt_gate"})
    assert config.attention["name"] == "test_ckpt_gate"
    for key, value in model.state_dict().items():
        assert torch.equal(gated.state_dict()[key], value), key
    assert all(torch.equal(b.attn.mechanism.gate, torch.ones(4)) for b in gated.transformer.h)
    idx = _idx()
    with torch.no_grad():  # a gate of 1 is the identity: same function as the saved model
        torch.testing.assert_close(gated(idx), model(idx))

    # the other way: the gate is dropped, with a warning, when the saved mechanism is overridden
    with torch.no_grad():
        for block in gated.transformer.h:
            block.attn.mechanism.gate.fill_(0.5)
    ckpt.save_checkpoint(tmp_path / "gated", gated.state_dict(), gated.config)
    with pytest.warns(UserWarning, match="ignoring 2 parameter"):
        causal, _, _ = ckpt.load(tmp_path / "gated", attention={"name": "causal"})
    with torch.no_grad():
        assert torch.equal(causal(idx), model(idx))
    # without an override, the gate must be there
    reloaded, _, _ = ckpt.load(tmp_path / "gated")
    assert torch.equal(reloaded.transformer.h[1].attn.mechanism.gate, torch.full((4,), 0.5))


# ---------------------------------------------------------------------------------- atomicity
class _FailingTokenizer:
    """Writes half a file, then fails: a full disk or a crash in the middle of a save."""

    def save(self, out_dir):
        (out_dir / "tokenizer.json").write_text('{"half": ')
        raise OSError("No space left on device")


def _snapshot(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_interrupted_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    old, new = _model("tiny-llama"), _model("tiny-llama")
    target = tmp_path / "step-00000100"
    ckpt.save_checkpoint(target, old.state_dict(), old.config, training_state={"step": 100})
    before = _snapshot(target)

    with pytest.raises(OSError, match="No space left"):
        ckpt.save_checkpoint(target, new.state_dict(), new.config, _FailingTokenizer(), training_state={"step": 200})
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(target, new.state_dict(), new.config, training_state={"step": 200})
    monkeypatch.undo()

    assert _snapshot(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000100"]  # no temp or backup dirs left
    loaded, _, _ = ckpt.load(target)
    idx = _idx()
    with torch.no_grad():
        assert torch.equal(loaded(idx), old(idx))
    # a first save that fails leaves nothing under the final name
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path / "final", new.state_dict(), new.config, _FailingTokenizer())
    assert not (tmp_path / "final").exists()
    # a successful save replaces the old checkpoint
    ckpt.save_checkpoint(target, new.state_dict(), new.config, training_state={"step": 200})
    assert ckpt.load_training_state(target)["step"] == 200


def test_kill_between_the_two_renames_is_recovered(tmp_path):
    model = _model("tiny-gpt2")
    target = tmp_path / "step-00000100"
    ckpt.save_checkpoint(target, model.state_dict(), model.config, training_state={"step": 100})
    target.rename(tmp_path / ".step-00000100.0badc0de.old")  # what a kill after the first rename leaves
    assert ckpt.latest_checkpoint(tmp_path) == target
    assert ckpt.load_training_state(target)["step"] == 100


def test_latest_checkpoint_picks_newest_complete_dir(tmp_path):
    def fake(name, step, complete=True):
        d = tmp_path / name
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"")
        if complete:
            ckpt.save_training_state(d, {"step": step})

    assert ckpt.latest_checkpoint(tmp_path / "missing") is None
    assert ckpt.latest_checkpoint(tmp_path) is None
    assert ckpt.step_dir_name(100) == "step-00000100"
    fake(ckpt.step_dir_name(100), 100)
    fake(ckpt.step_dir_name(200), 200)
    fake(ckpt.step_dir_name(300), 300, complete=False)  # killed before its training state
    fake(".step-00000400.1234abcd.tmp", 400)  # a save in progress
    fake("step-400-copy", 400)
    (tmp_path / "step-00000900").mkdir()  # empty
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step-00000200"
    fake("final", 150)  # a finished run that was then continued to more steps
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step-00000200"
    (tmp_path / "final" / "training_state.pt").unlink()
    ckpt.save_training_state(tmp_path / "final", {"step": 250})
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "final"


# ---------------------------------------------------------------------------------- .pth files
_UNPICKLED = []


def _mark_unpickled():
    _UNPICKLED.append(True)
    return "pwned"


class Payload:
    def __reduce__(self):
        return _mark_unpickled, ()


def test_pickle_with_a_custom_object_is_refused_without_running_it(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"transformer.wte.weight": torch.ones(2), "extra": Payload()}, path)
    with pytest.raises(ValueError, match=r"pickled Python object .*_mark_unpickled"):
        ckpt.load_state_dict(path)
    assert _UNPICKLED == []


def test_pth_of_plain_tensors_loads(tmp_path):
    state = _model("tiny-pythia").state_dict()
    torch.save(state, tmp_path / "plain.pth")
    torch.save({"model": state, "step": 3}, tmp_path / "wrapped.pth")  # litgpt training checkpoint
    for name in ("plain.pth", "wrapped.pth"):
        loaded = ckpt.load_state_dict(tmp_path / name)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())
    torch.save({"a": torch.ones(1), "b": 3}, tmp_path / "mixed.pth")
    with pytest.raises(ValueError, match="not tensors"):
        ckpt.load_state_dict(tmp_path / "mixed.pth")


# ---------------------------------------------------------------------------------- litgpt
_LITATTN_ONLY = ("positional_embedding", "tie_embeddings", "attention", "padding_multiple")


def _litgpt_config(config: Config, **extra) -> dict:
    """A model_config.yaml as litgpt writes it: its own keys, none of litattn's."""
    values = {k: v for k, v in config.to_dict().items() if k not in _LITATTN_ONLY}
    values.update(hf_config={"org": "EleutherAI", "name": "pythia-14m"}, scale_embeddings=False, norm_qk=False)
    values.update(attn_bias=False, n_expert=0, rope_condense_ratio=1, sliding_window_indices=None, padding_multiple=512)
    values.update(extra)
    return values


def test_litgpt_checkpoint_directory_loads_with_identical_weights(tmp_path):
    model = _model("tiny-pythia")
    values = _litgpt_config(model.config)
    del values["parallel_residual"], values["rotary_percentage"]  # litgpt's defaults (True, 0.25) apply
    (tmp_path / "model_config.yaml").write_text(yaml.safe_dump(values))
    torch.save(model.state_dict(), tmp_path / "lit_model.pth")

    with pytest.warns(UserWarning, match=r"litgpt-only config keys .*hf_config.*scale_embeddings"):
        loaded, _, config = ckpt.load(tmp_path)
    assert config.parallel_residual and config.rotary_percentage == 0.25
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    idx = _idx()
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))


def test_legacy_litgpt_interleaved_qkv_is_reassembled(tmp_path):
    model = _model("tiny-llama")  # 4 query heads in 2 groups
    cfg = model.config
    hs, per_group = cfg.head_size, cfg.n_head // cfg.n_query_groups
    state = dict(model.state_dict())
    for i in range(cfg.n_layer):
        w = state.pop(f"transformer.h.{i}.attn.qkv.weight")
        q, k, v = w.split((cfg.n_head * hs, cfg.n_query_groups * hs, cfg.n_query_groups * hs))
        rows = []  # legacy litgpt order, built head by head: [q heads of group g, k_g, v_g] for each g
        for g in range(cfg.n_query_groups):
            rows += [q[(g * per_group + j) * hs : (g * per_group + j + 1) * hs] for j in range(per_group)]
            rows += [k[g * hs : (g + 1) * hs], v[g * hs : (g + 1) * hs]]
        state[f"transformer.h.{i}.attn.attn.weight"] = torch.cat(rows)
    (tmp_path / "model_config.yaml").write_text(yaml.safe_dump(_litgpt_config(cfg)))
    torch.save(state, tmp_path / "lit_model.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded, _, _ = ckpt.load(tmp_path)
    idx = _idx()
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))


def test_litgpt_features_litattn_lacks_are_errors(tmp_path):
    model = _model("tiny-llama")
    torch.save(model.state_dict(), tmp_path / "lit_model.pth")
    (tmp_path / "model_config.yaml").write_text(yaml.safe_dump(_litgpt_config(model.config, n_expert=8)))
    with pytest.raises(ValueError, match="n_expert=8"):
        ckpt.load(tmp_path)


# ---------------------------------------------------------------------------------- training state
def test_training_state_round_trip_restores_optimizer_and_rng(tmp_path):
    model = _model("tiny-llama").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.loss(_idx(), _idx()).backward()
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "step": 7, "epoch": 1, "data_position": [3, 123], "seed": None}
    state["rng"] = ckpt.rng_state()
    ckpt.save_training_state(tmp_path, state)
    expected = (torch.rand(3), random.random(), np.random.rand(3), np.random.randn())

    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    # the file is plain data: a weights_only load reads it
    raw = torch.load(tmp_path / "training_state.pt", weights_only=True)
    assert raw["step"] == 7 and raw["data_position"] == [3, 123]
    loaded = ckpt.load_training_state(tmp_path)
    ckpt.set_rng_state(loaded["rng"])
    again = (torch.rand(3), random.random(), np.random.rand(3), np.random.randn())
    assert torch.equal(again[0], expected[0]) and again[1] == expected[1]
    assert np.array_equal(again[2], expected[2]) and again[3] == expected[3]

    fresh = torch.optim.AdamW(_model("tiny-llama").parameters(), lr=1e-3)
    fresh.load_state_dict(loaded["optimizer"])
    for p_old, p_new in zip(optimizer.state.values(), fresh.state.values(), strict=True):
        assert torch.equal(p_old["exp_avg"], p_new["exp_avg"]) and torch.equal(p_old["step"], p_new["step"])


def test_training_state_with_objects_is_rejected_when_saved(tmp_path):
    with pytest.raises(TypeError, match=r"training_state\['rng'\]\['numpy'\] is a numpy.ndarray"):
        ckpt.save_training_state(tmp_path, {"rng": {"numpy": np.zeros(3)}})
    assert not (tmp_path / "training_state.pt").exists()


# ---------------------------------------------------------------------------------- errors
def test_missing_and_corrupt_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="Checkpoint directory .*nope.* not found"):
        ckpt.load(tmp_path / "nope")
    model = _model("tiny-llama")
    good = ckpt.save_checkpoint(tmp_path / "good", model.state_dict(), model.config)
    data = (good / "model.safetensors").read_bytes()

    bad = ckpt.save_checkpoint(tmp_path / "bad", model.state_dict(), model.config)
    (bad / "model_config.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="model_config.yaml not found"):
        ckpt.load(bad)
    model.config.save(bad / "model_config.yaml")
    (bad / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="No weights in .*model.safetensors"):
        ckpt.load(bad)
    for corrupt in (data[: len(data) // 2], b"\x00" * 64, b""):
        (bad / "model.safetensors").write_bytes(corrupt)
        with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors file.*corrupt"):
            ckpt.load(bad)
    (bad / "model.pth").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="model.pth is not a readable PyTorch file"):
        ckpt.load_state_dict(bad / "model.pth")
    with pytest.raises(FileNotFoundError, match="training_state.pt not found"):
        ckpt.load_training_state(good)


def test_weights_that_do_not_match_the_config_name_the_keys(tmp_path):
    model = _model("tiny-llama")
    state = dict(model.state_dict())
    del state["transformer.h.1.mlp.fc_2.weight"]
    state["transformer.h.9.extra"] = torch.zeros(1)
    ckpt.save_checkpoint(tmp_path / "ckpt", state, model.config)
    with pytest.raises(ValueError, match=r"missing keys transformer.h.1.mlp.fc_2.weight.*unexpected .*h.9.extra"):
        ckpt.load(tmp_path / "ckpt")
    ckpt.save_checkpoint(tmp_path / "ckpt", model.state_dict(), model.config)
    with pytest.raises(ValueError, match=r"shapes .*transformer.wte.weight: \(256, 32\) vs \(256, 64\)"):
        ckpt.load(tmp_path / "ckpt", n_embd=64, intermediate_size=88)
