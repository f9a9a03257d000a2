import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def debug_pretrain_args(data_dir, cache_dir, *extra: str, extensions: str = "[.txt]") -> list[str]:
    """`litattn pretrain` arguments for config_hub/pretrain/debug.yaml on a folder of text files."""
    return [
        "pretrain", "--config", "config_hub/pretrain/debug.yaml", "--data", "TextFiles",
        "--data.train_dirs", f"[{data_dir}]", "--data.extensions", extensions, "--accelerator", "cpu",
        "--cache_dir", str(cache_dir), *extra,
    ]  # fmt: skip
