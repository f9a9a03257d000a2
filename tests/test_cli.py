import subprocess
import sys

from litattn.attention import available_attention
from litattn.cli import main


def test_attention_list_names_each_mechanism_with_a_description(capsys):
    main(["attention", "list"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == available_attention()  # every mechanism, once, sorted
    causal = [line for line in lines if line.split()[0] == "causal"]
    assert causal and "causal" in causal[0].split(None, 1)[1].lower()
    assert all(len(line.split(None, 1)) == 2 for line in lines)  # every mechanism has a description


def test_model_list_shows_presets(capsys):
    main(["model", "list"])
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[1:]}
    # params (gpt2: 124.44M published + 47 padded embedding rows), layers, n_embd, heads, kv heads, context
    assert rows["gpt2"] == ["124.48M", "12", "768", "12", "12", "1024"]
    assert rows["pythia-160m"] == ["162.32M", "12", "768", "12", "12", "2048"]
    assert rows["tinyllama-1.1b"] == ["1.10B", "22", "2048", "32", "4", "2048"]
    assert rows["mistral-7b"][:5] == ["7.24B", "32", "4096", "32", "8"]


def test_model_list_shows_what_an_attention_spec_adds(capsys):
    main(["model", "list", "--attention", "{name: ssa}"])
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    # per layer: beta and gate + n_head (head_size + 1) + n_query_groups (head_size + 1) = 2 + 12 * 65 * 2
    assert (2 + 2 * 12 * 65) * 12 == 18_744
    assert rows["gpt2"].endswith("18,744 (0.015%)") and rows["pythia-160m"].endswith("18,744 (0.012%)")
    # with grouped-query attention: tinyllama 22 x (2 + (32 + 4) x 65), tiny-llama 2 x (2 + (4 + 2) x 9)
    assert rows["tinyllama-1.1b"].endswith("51,524 (0.005%)") and rows["tiny-llama"].split()[-2] == "112"


def test_console_script_help_and_bad_subcommand():
    ok = subprocess.run([sys.executable, "-m", "litattn", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "attention" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "litattn", "atention", "list"], capture_output=True, text=True)
    assert bad.returncode != 0 and "atention" in bad.stderr
