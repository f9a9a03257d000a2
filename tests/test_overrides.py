"""Command-line overrides merge into what the YAML set, at any depth; attention options and model config
fields are type-checked with one-line errors (issue 9)."""

import functools
import subprocess
import sys
import warnings
from dataclasses import dataclass
from typing import Literal

import pytest
import yaml

from litattn import cli
from litattn.args import start_work
from litattn.attention import AttentionMechanism, AttentionOptions, register_attention
from litattn.attention.registry import merge_attention_specs
from litattn.config import Config, merge_overrides, resolve_model_config

SSA_YAML = {
    "model_name": "tiny-llama",
    "model": {
        "block_size": 64,
        "vocab_size": 512,
        "attention": {"name": "ssa", "beta_init": 1.5, "token_temperature": False},
    },
}
KEPT = {"block_size": 64, "vocab_size": 512}


@dataclass
class TypedOptions(AttentionOptions):
    size: int = 4
    scale: float = 1.0
    mode: Literal["a", "b"] = "a"
    limit: int | None = None
    flag: bool = False
    sizes: list[int] | None = None


@register_attention("test_typed_options")
class TypedAttention(AttentionMechanism):
    """Causal attention with one option of each kind (a test mechanism for the type checks)."""

    Options = TypedOptions


@pytest.fixture
def ssa_yaml(tmp_path):
    path = tmp_path / "ssa.yaml"
    path.write_text(yaml.safe_dump(SSA_YAML))
    return str(path)


@pytest.fixture
def seen(monkeypatch):
    """The entry points, replaced by spies with their signatures: what each one receives lands in `seen`."""
    real, seen = cli.commands, {}

    def spy(fn):
        @functools.wraps(fn)
        def run(**kwargs):
            seen.update(kwargs)
            start_work()  # where the entry point's checks end: --print_config prints from here

        return run

    def commands():
        tree = real()
        for name in ("pretrain", "finetune", "generate"):
            tree[name] = spy(tree[name])
        tree["evaluate"]["perplexity"] = spy(tree["evaluate"]["perplexity"])
        tree["visualize"]["attention"] = spy(tree["visualize"]["attention"])
        return tree

    monkeypatch.setattr(cli, "commands", commands)
    return seen


def run(argv, capsys):
    """(exit code, stdout, stderr) of `litattn <argv>` in this process."""
    try:
        cli.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def pretrain_model(ssa_yaml, seen, capsys, *flags):
    code, _, err = run(["pretrain", "--config", ssa_yaml, *flags], capsys)
    assert code == 0, err
    return seen["model"]


# ---------------------------------------------------------------------------------- merging
@pytest.mark.parametrize("command", [["pretrain", "--model_name", "tiny-llama"], ["finetune", "--checkpoint_dir", "x"]])
def test_a_dotted_override_keeps_the_yaml_options(tmp_path, seen, capsys, command):
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump({"model": SSA_YAML["model"]}))
    code, _, err = run([*command, "--config", str(path), "--model.attention.name", "ssa"], capsys)
    assert code == 0, err
    assert seen["model"] == {**KEPT, "attention": {"name": "ssa", "beta_init": 1.5, "token_temperature": False}}


def test_two_dotted_overrides_of_one_mapping(ssa_yaml, seen, capsys):
    flags = ["--model.attention.beta_init", "2", "--model.attention.identity_init=true", "--model.n_layer", "3"]
    model = pretrain_model(ssa_yaml, seen, capsys, *flags)
    config = resolve_model_config("tiny-llama", model)
    assert config.block_size == 64 and config.vocab_size == 512 and config.n_layer == 3
    assert config.attention["beta_init"] == 2.0 and isinstance(config.attention["beta_init"], float)
    assert config.attention["identity_init"] is True and config.attention["token_temperature"] is False


def test_a_misspelt_option_among_two_dotted_flags_is_named(ssa_yaml, capsys):
    argv = ["pretrain", "--config", ssa_yaml, "--model.attention.name", "ssa", "--model.attention.beta_int", "2"]
    code, out, err = run([*argv[:-2], "--print_config"], capsys)
    assert code == 0 and yaml.safe_load(out)["model"]["attention"]["name"] == "ssa"  # `name` is not lost
    code, out, err = run([*argv, "--print_config"], capsys)  # checked before printing (issue 20, item 16)
    assert code == 2 and out == "" and "beta_int" in err
    proc = subprocess.run([sys.executable, "-m", "litattn", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "Unknown option(s) ['beta_int'] for attention 'ssa'" in proc.stderr and "needs a" not in proc.stderr


def test_nested_dotted_override_keeps_the_rest_of_the_nested_spec(tmp_path, ssa_yaml, seen, capsys):
    recipe = {"model": {"attention": {"name": "ssa", "beta_init": 1.5, "base": {"name": "causal", "kernel": "flex"}}}}
    path = tmp_path / "nested.yaml"
    path.write_text(yaml.safe_dump(recipe))
    model = pretrain_model(str(path), seen, capsys, "--model.attention.base.kernel", "sdpa")
    assert model["attention"] == {"name": "ssa", "beta_init": 1.5, "base": {"name": "causal", "kernel": "sdpa"}}
    # no base in the YAML: the override tunes SSA's default base
    model = pretrain_model(ssa_yaml, seen, capsys, "--model.attention.base.kernel", "sdpa")
    assert resolve_model_config("tiny-llama", model).attention["base"] == {"name": "causal", "kernel": "sdpa"}


def test_a_whole_mapping_value_merges(ssa_yaml, seen, capsys):
    model = pretrain_model(ssa_yaml, seen, capsys, "--model", "{attention: {identity_init: true}, n_layer: 3}")
    assert {k: model[k] for k in KEPT} == KEPT
    config = resolve_model_config("tiny-llama", model)
    assert config.n_layer == 3 and config.attention["identity_init"] is True
    assert config.attention["beta_init"] == 1.5 and config.attention["token_temperature"] is False
    # in either order with dotted flags, later wins
    model = pretrain_model(
        ssa_yaml, seen, capsys, "--model.attention.beta_init", "3", "--model={attention: {beta_init: 4}}"
    )
    assert resolve_model_config("tiny-llama", model).attention["beta_init"] == 4.0


def test_one_level_overrides_of_a_mapping_key_merge_too(ssa_yaml, seen, capsys):
    """`--model.attention X` names a key of the mapping, not a path: it merges like the longer forms, and
    repeating it applies each value in turn."""
    model = pretrain_model(ssa_yaml, seen, capsys, "--model.attention", "{identity_init: true}")
    assert model["attention"] == {"name": "ssa", "beta_init": 1.5, "token_temperature": False, "identity_init": True}
    with pytest.warns(UserWarning, match=r"drops option\(s\) beta_init, token_temperature"):
        model = pretrain_model(
            ssa_yaml, seen, capsys, "--model.attention", "causal", "--model.attention", "{kernel: sdpa}"
        )
    assert model == {**KEPT, "attention": {"name": "causal", "kernel": "sdpa"}}


def test_print_config_shows_the_merged_mapping_and_reparses_to_it(ssa_yaml, seen, tmp_path, capsys):
    flags = ["--model.attention.base.kernel", "sdpa", "--model", "{n_layer: 3}", "--model.attention.beta_init", "2"]
    code, printed, err = run(["pretrain", "--config", ssa_yaml, *flags, "--print_config"], capsys)
    assert code == 0, err
    shown = yaml.safe_load(printed)["model"]
    assert shown["attention"] == {"name": "ssa", "beta_init": 2, "token_temperature": False, "base": {"kernel": "sdpa"}}
    assert shown["block_size"] == 64 and shown["n_layer"] == 3
    again = tmp_path / "printed.yaml"
    again.write_text(printed)
    code, reprinted, err = run(["pretrain", "--config", str(again), "--print_config"], capsys)
    assert code == 0 and reprinted == printed
    ran = pretrain_model(ssa_yaml, seen, capsys, *flags)
    assert resolve_model_config("tiny-llama", ran) == resolve_model_config("tiny-llama", shown)


@pytest.mark.parametrize(
    "command, parameter",
    [
        (["generate"], "attention"),
        (["evaluate", "perplexity"], "attention"),
        (["visualize", "attention"], "attention_spec"),
    ],
)
def test_attention_parameters_of_checkpoint_commands_merge(tmp_path, seen, capsys, command, parameter):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({parameter: {"name": "ssa", "beta_init": 1.5, "base": {"kernel": "sdpa"}}}))
    flags = [f"--{parameter}.identity_init", "true", f"--{parameter}", "{base: {name: causal}}"]
    required = ["--prompt", "x"] if parameter == "attention_spec" else []
    code, _, err = run([*command, "--checkpoint_dir", "x", *required, "--config", str(path), *flags], capsys)
    assert code == 0, err
    spec = seen[parameter]
    assert spec == {
        "name": "ssa",
        "beta_init": 1.5,
        "identity_init": "true",
        "base": {"name": "causal", "kernel": "sdpa"},
    }
    # the string from the command line becomes the option's type when the spec is resolved
    assert resolve_model_config("tiny-llama", {"attention": spec}).attention["identity_init"] is True


# ---------------------------------------------------------------------------------- switching mechanism
def test_switching_mechanism_keeps_shared_options_and_names_the_dropped_ones():
    base = Config.from_name("tiny-llama", attention={"name": "ssa", "kernel": "sdpa", "beta_init": 1.5})
    with pytest.warns(UserWarning, match=r"switching 'ssa' -> 'causal' drops option\(s\) .*beta_init") as w:
        config = resolve_model_config("tiny-llama", {"attention.name": "causal"}, base=base)
    assert config.attention == {"name": "causal", "kernel": "sdpa"}  # kernel is kept
    assert len(w) == 1 and "position_temperature" in str(w[0].message) and "kernel" not in str(w[0].message)
    # back to ssa: causal's only option carries, nothing to drop
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = resolve_model_config("tiny-llama", {"attention": {"name": "ssa"}}, base=config)
    assert again.attention["kernel"] == "sdpa" and again.attention["beta_init"] == 2.0  # SSA's default


def test_nested_specs_switch_by_the_same_rule():
    old = {"name": "ssa", "beta_init": 1.5, "base": {"name": "test_typed_options", "size": 8, "kernel": "sdpa"}}
    with pytest.warns(UserWarning, match=r"attention\.base: switching 'test_typed_options' -> 'causal' .* size"):
        merged = merge_attention_specs(old, {"base": {"name": "causal"}})
    assert merged == {"name": "ssa", "beta_init": 1.5, "base": {"name": "causal", "kernel": "sdpa"}}


def test_switching_on_the_command_line_warns(ssa_yaml, seen, capsys):
    with pytest.warns(UserWarning, match=r"drops option\(s\) beta_init, token_temperature"):
        model = pretrain_model(ssa_yaml, seen, capsys, "--model.attention.name", "causal")
    assert model == {**KEPT, "attention": {"name": "causal"}}


def test_only_attention_specs_switch_by_name():
    merged = merge_overrides({"name": "tiny-llama", "n_layer": 2, "data": {"name": "a", "x": 1}}, {"name": "b"})
    assert merged == {"name": "b", "n_layer": 2, "data": {"name": "a", "x": 1}}
    assert merge_overrides({"data": {"name": "a", "x": 1}}, {"data": {"name": "b"}}) == {"data": {"name": "b", "x": 1}}


# ---------------------------------------------------------------------------------- type checks
def test_command_line_strings_become_the_declared_types():
    spec = {"name": "test_typed_options", "size": "2", "scale": "2", "mode": "b", "limit": "null", "flag": "true"}
    config = Config.from_name("tiny-llama", attention={**spec, "sizes": "[1, 2]"}, n_layer="3", norm_eps="1e-3")
    a = config.attention
    assert (a["size"], a["scale"], a["mode"], a["limit"], a["flag"], a["sizes"]) == (2, 2.0, "b", None, True, [1, 2])
    assert type(a["scale"]) is float and config.n_layer == 3 and config.norm_eps == 1e-3
    assert Config.from_name("tiny-llama", sliding_window_size="null").sliding_window_size is None
    assert Config.from_name("tiny-llama", attention={"name": "ssa", "beta_init": 2}).attention["beta_init"] == 2.0


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model.attention.token_temperature", "nope"], "attention 'ssa' option 'token_temperature' expects bool"),
        (["--model.attention.beta_init", "abc"], "attention 'ssa' option 'beta_init' expects float, got 'abc'"),
        (["--model.attention.beta_init", "null"], "attention 'ssa' option 'beta_init' expects float, got None"),
        (["--model.attention.temperature_bound", "true"], "option 'temperature_bound' expects float, got True"),
        (["--model.attention", "{name: test_typed_options, size: 2.5}"], "option 'size' expects int, got 2.5"),
        (["--model.attention", "{name: test_typed_options, mode: c}"], "option 'mode' expects one of 'a', 'b'"),
        (["--model.attention", "{name: test_typed_options, limit: x}"], "option 'limit' expects int or null"),
        (["--model.attention", "{name: test_typed_options, size: true}"], "option 'size' expects int, got True"),
        (["--model.n_layer", "abc"], "model config 'n_layer' expects int, got 'abc'"),
        (["--model.n_layer", "null"], "model config 'n_layer' expects int, got None"),
        (["--model.bias", "maybe"], "model config 'bias' expects bool, got 'maybe'"),
        (["--model.norm_eps", "small"], "model config 'norm_eps' expects float"),
        (["--model.positional_embedding", "alibi"], "'positional_embedding' expects one of 'rope', 'learned'"),
        (["--model.sliding_window_size", "wide"], "'sliding_window_size' expects int or null, got 'wide'"),
        (["--model.n_layer", "0"], "model config 'n_layer' must be >= 1, got 0"),
        (["--model.n_head", "-4"], "model config 'n_head' must be >= 1, got -4"),
        (["--model.norm_eps", "0"], "model config 'norm_eps' must be > 0"),
        (["--model.rotary_percentage", "1.5"], "'rotary_percentage' must be in (0, 1], got 1.5"),
        (["--model.sliding_window_size", "0"], "'sliding_window_size' must be >= 1, got 0"),
    ],
)
def test_bad_types_are_one_line_errors(ssa_yaml, monkeypatch, capsys, flags, message):
    real = cli.commands

    def commands():  # pretrain's signature; it builds the model config and stops
        tree = real()
        fn = tree["pretrain"]
        tree["pretrain"] = functools.wraps(fn)(lambda **kw: resolve_model_config(kw["model_name"], kw["model"]))
        return tree

    monkeypatch.setattr(cli, "commands", commands)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # switching ssa -> test_typed_options drops options
        code, _, err = run(["pretrain", "--config", ssa_yaml, *flags], capsys)
    assert code == 2 and "Traceback" not in err
    assert err.startswith("litattn: error: ") and len(err.strip().splitlines()) == 1
    assert message in err


def test_model_list_attention_type_error_is_one_line(capsys):
    code, _, err = run(["model", "list", "--attention", "{name: ssa, beta_init: abc}"], capsys)
    assert code == 2 and err.strip() == "litattn: error: attention 'ssa' option 'beta_init' expects float, got 'abc'"
