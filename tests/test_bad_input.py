"""Bad input through the real command line: one line naming the problem, a non-zero exit, no traceback."""

import collections
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import debug_pretrain_args
from litattn import checkpoint as ckpt
from litattn.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


def litattn(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "litattn", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def assert_one_line_error(proc, *fragments):
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    for fragment in fragments:
        assert fragment in last, last


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text")
    for i in range(4):
        (folder / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 200)
    return folder


def debug(tmp_path, text_dir, *extra):
    return debug_pretrain_args(text_dir, tmp_path / "cache", "--out_dir", str(tmp_path / "out"), *extra)


def test_unknown_attention_name(tmp_path, text_dir):
    proc = litattn(*debug(tmp_path, text_dir, "--model.attention.name", "flash"))
    assert_one_line_error(proc, "Unknown attention mechanism 'flash'", "causal")


def test_misspelt_cli_key(tmp_path, text_dir):
    proc = litattn(*debug(tmp_path, text_dir, "--train.max_step", "3"))
    assert_one_line_error(proc, "unrecognized arguments", "--train.max_step")  # jsonargparse's usage error


def test_missing_data_folder(tmp_path):
    proc = litattn(*debug(tmp_path, tmp_path / "nowhere"))
    assert_one_line_error(proc, "nowhere", "does not exist")


def test_tokenizer_larger_than_the_model_vocabulary(tmp_path, text_dir):
    big = tmp_path / "big_tokenizer"
    Tokenizer.train(sorted(text_dir.glob("*.txt")), vocab_size=700, out_dir=big)
    proc = litattn(
        *debug(
            tmp_path,
            text_dir,
            "--tokenizer_dir",
            str(big),
            "--model.vocab_size",
            "100",
            "--model.padding_multiple",
            "64",
        )
    )
    assert_one_line_error(proc, "padded vocabulary", "128")


def test_generate_from_a_missing_checkpoint(tmp_path):
    proc = litattn("generate", "--checkpoint_dir", str(tmp_path / "missing"))
    assert_one_line_error(proc, "missing", "not found")


def test_resume_from_a_path_that_is_not_a_checkpoint(tmp_path, text_dir):
    proc = litattn(*debug(tmp_path, text_dir, "--resume", str(tmp_path)))
    assert_one_line_error(proc, "not a resumable checkpoint")


# ---------------------------------------------------------------------------------- pickled code
class _Ordered(collections.OrderedDict):
    """A class of this module: not one torch's safe loader knows."""


class _Payload:
    """Unpickling it would run `touch marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("how", ["torch.save", "pickle protocol 0", "pickle protocol 4"])
def test_pickled_code_in_training_state_is_refused_for_safety(tmp_path, how):
    marker = tmp_path / "unpickled"
    state = {"step": 3, "optimizer": {}, "extra": _Payload(marker)}
    path = tmp_path / "training_state.pt"
    if how == "torch.save":
        torch.save(state, path)
    else:  # a plain pickle: torch's loader words its refusal differently (or not at all) for these
        path.write_bytes(pickle.dumps(state, protocol=int(how[-1])))
    with pytest.raises(ValueError) as e:
        ckpt.load_training_state(tmp_path)
    message = str(e.value)
    assert f"holds a pickled Python object ({os.system.__module__}.system)" in message, message
    assert "refuses to unpickle for safety" in message and "corrupt" not in message
    assert not marker.exists()


def test_a_class_pickled_into_a_weights_file_is_named(tmp_path):
    path = tmp_path / "model.pth"
    torch.save(_Ordered(w=torch.ones(2)), path)
    with pytest.raises(ValueError) as e:
        ckpt.load_state_dict(path)
    assert f"pickled Python object ({_Ordered.__module__}._Ordered)" in str(e.value)
    assert "for safety" in str(e.value)
    path.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="not a readable PyTorch file"):
        ckpt.load_state_dict(path)
