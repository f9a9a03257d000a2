import subprocess
import sys

from litattn.__main__ import main


def test_attention_list_names_each_mechanism_with_a_description(capsys):
    main(["attention", "list"])
    lines = capsys.readouterr().out.splitlines()
    causal = [line for line in lines if line.split()[0] == "causal"]
    assert causal and "causal" in causal[0].split(None, 1)[1].lower()
    assert all(len(line.split(None, 1)) == 2 for line in lines)  # every mechanism has a description


def test_model_list_shows_presets(capsys):
    main(["model", "list"])
    out = capsys.readouterr().out
    assert "pythia-160m" in out and "162.32M" in out and "7.24B" in out


def test_console_script_help_and_bad_subcommand():
    ok = subprocess.run([sys.executable, "-m", "litattn", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "attention" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "litattn", "atention", "list"], capture_output=True, text=True)
    assert bad.returncode != 0 and "atention" in bad.stderr
