import pytest

from litattn import Config
from litattn.config import PRESETS


def test_yaml_round_trip(tmp_path):
    config = Config.from_name("tiny-llama", n_layer=3, attention={"name": "causal", "kernel": "sdpa"})
    config.save(tmp_path / "model_config.yaml")
    loaded = Config.from_file(tmp_path / "model_config.yaml")
    assert loaded == config
    assert loaded.attention == {"name": "causal", "kernel": "sdpa"}


def test_overrides_recompute_derived_fields():
    config = Config.from_name("tiny-gpt2", n_embd=64)
    assert config.head_size == 16 and config.intermediate_size == 256
    assert Config.from_name("tiny-gpt2", n_embd=64, head_size=8).head_size == 8
    assert Config.from_name("tiny-gpt2", vocab_size=300).padded_vocab_size == 320


def test_attention_spec_from_a_plain_dict_or_name():
    assert Config.from_name("tiny-gpt2", attention="causal").attention == {"name": "causal", "kernel": "auto"}


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown model preset 'gpt3'.*gpt2"):
        Config.from_name("gpt3")


def test_unknown_key_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown model config key\(s\) \['n_layers'\]"):
        Config.from_name("tiny-gpt2", n_layers=3)
    path = tmp_path / "c.yaml"
    path.write_text("n_embd: 32\nn_heads: 4\n")
    with pytest.raises(ValueError, match="n_heads"):
        Config.from_file(path)


def test_unknown_mechanism_lists_registered_names():
    with pytest.raises(ValueError, match="Unknown attention mechanism 'flash'. Registered: .*causal"):
        Config.from_name("tiny-gpt2", attention={"name": "flash"})


def test_unknown_mechanism_option_is_an_error():
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['kernal'\] for attention 'causal'"):
        Config.from_name("tiny-gpt2", attention={"name": "causal", "kernal": "sdpa"})


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        Config.from_file(tmp_path / "nope.yaml")


def test_every_preset_builds_a_config():
    for name in PRESETS:
        assert Config.from_name(name).name == name


def test_resolve_model_config_merges_attention_overrides():
    from litattn.config import resolve_model_config

    base = Config.from_name("tiny-llama", attention={"name": "ssa", "beta_init": 1.5, "base": {"name": "causal"}})
    kept = resolve_model_config("tiny-llama", {"attention.base.kernel": "sdpa"}, base=base)
    assert kept.attention["beta_init"] == 1.5 and kept.attention["base"] == {"name": "causal", "kernel": "sdpa"}
    with pytest.warns(UserWarning, match=r"switching 'ssa' -> 'causal' drops option\(s\) .*beta_init.*base"):
        switched = resolve_model_config("tiny-llama", {"attention": {"name": "causal"}}, base=base)
    assert switched.attention == {"name": "causal", "kernel": "auto"}  # ssa's own options do not carry over
    assert resolve_model_config("tiny-llama", {"n_layer": 3}).n_layer == 3
    with pytest.raises(ValueError, match="Unknown model preset"):
        resolve_model_config("gpt-5")


@pytest.mark.parametrize("dotted_first", [True, False])
def test_dotted_and_nested_overrides_of_one_mapping_combine(dotted_first):
    """`--model.attention.name ssa --model.attention.identity_init true` reaches the entry point as a dotted and a
    nested key of the same mapping, in either order."""
    from litattn.config import resolve_model_config

    parts = [
        ("attention.name", "ssa"),
        ("attention", {"identity_init": True, "base": {"name": "causal", "kernel": "sdpa"}}),
    ]
    config = resolve_model_config("tiny-llama", dict(parts if dotted_first else parts[::-1]))
    assert config.attention["name"] == "ssa" and config.attention["identity_init"] is True
    assert config.attention["base"]["kernel"] == "sdpa"
