"""Every YAML in config_hub/ parses against its entry point's signature (a misspelt key fails)."""

from pathlib import Path

import pytest

from litattn.cli import main

HUB = Path(__file__).resolve().parents[1] / "config_hub"
# config_hub/<folder> -> subcommand
ENTRY_POINT = {"pretrain": "pretrain", "finetune": "finetune", "ablations": "ablate"}


@pytest.mark.parametrize("path", sorted(p for p in HUB.rglob("*.yaml") if p.parent.name in ENTRY_POINT), ids=str)
def test_config_hub_yaml_matches_its_entry_point(path, capsys):
    with pytest.raises(SystemExit) as e:
        main([ENTRY_POINT[path.parent.name], "--config", str(path), "--print_config"])
    assert e.value.code == 0
    assert ("variants:" if path.parent.name == "ablations" else "train:") in capsys.readouterr().out


@pytest.mark.parametrize("path", sorted((HUB / "ablations").glob("*.yaml")), ids=str)
def test_every_ablation_variant_is_a_valid_recipe(path, tmp_path, capsys):
    """The dry run parses each variant's merged recipe against the entry point: a typo fails before any run."""
    main(["ablate", "--config", str(path), "--out_dir", str(tmp_path), "--dry_run", "true"])
    assert "new" in capsys.readouterr().out


def test_every_config_hub_folder_has_an_entry_point():
    assert {p.parent.name for p in HUB.rglob("*.yaml")} <= set(ENTRY_POINT)


def test_a_misspelt_key_is_rejected(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text((HUB / "pretrain" / "debug.yaml").read_text().replace("max_steps", "max_step"))
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--config", str(bad), "--print_config"])
    assert e.value.code != 0
    assert "max_step" in capsys.readouterr().err
