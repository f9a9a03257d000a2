"""Every YAML in config_hub/ parses against its entry point's signature (a misspelt key fails)."""

from pathlib import Path

import pytest

from litattn.__main__ import main

HUB = Path(__file__).resolve().parents[1] / "config_hub"
ENTRY_POINT = {"pretrain": "pretrain"}  # config_hub/<folder> -> subcommand


@pytest.mark.parametrize("path", sorted(p for p in HUB.rglob("*.yaml") if p.parent.name in ENTRY_POINT), ids=str)
def test_config_hub_yaml_matches_its_entry_point(path, capsys):
    with pytest.raises(SystemExit) as e:
        main([ENTRY_POINT[path.parent.name], "--config", str(path), "--print_config"])
    assert e.value.code == 0
    assert "train:" in capsys.readouterr().out


def test_every_config_hub_folder_has_an_entry_point():
    assert {p.parent.name for p in HUB.rglob("*.yaml")} <= set(ENTRY_POINT)


def test_a_misspelt_key_is_rejected(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text((HUB / "pretrain" / "debug.yaml").read_text().replace("max_steps", "max_step"))
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--config", str(bad), "--print_config"])
    assert e.value.code != 0
    assert "max_step" in capsys.readouterr().err
