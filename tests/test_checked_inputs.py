"""Inputs checked where they enter (issue 20: items 9, 10, 13, 14, 16 and the smaller points): each bad value is
one line that names what was expected and what was given; on the command line, exit 2 with nothing written."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from litattn import GPT, Config


# ---------------------------------------------------------------------------------- item 9: batch metadata
def _model(attention: dict) -> GPT:
    torch.manual_seed(0)
    return GPT(Config.from_name("tiny-llama", block_size=64, vocab_size=256, attention=attention)).eval()


@pytest.mark.parametrize(
    "segment_ids, said",
    [
        (torch.zeros(2, 40, dtype=torch.long), "got int64 of shape (2, 40)"),  # longer: was silently cut
        (torch.zeros(2, 8, dtype=torch.long), "got int64 of shape (2, 8)"),  # a constant row: was plain causal
        (torch.zeros(16, dtype=torch.long), "got int64 of shape (16,)"),
        (torch.zeros(2, 16, 1, dtype=torch.long), "got int64 of shape (2, 16, 1)"),
        (torch.zeros(2, 16), "got float32 of shape (2, 16)"),
        (torch.zeros(2, 16, dtype=torch.bool), "got bool of shape (2, 16)"),
        ([[0, 1], [0]], "got list [[0, 1], [0]]"),
    ],
)
def test_disrupt_segment_ids_of_the_wrong_shape_or_type_are_one_line_errors(segment_ids, said):
    model, idx = _model({"name": "disrupt_set"}), torch.randint(3, 256, (2, 16))
    with pytest.raises(ValueError) as e:
        model(idx, segment_ids=segment_ids)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("disrupt_set: segment_ids must be integers of shape (2, 16), one per token")
    assert message.endswith(said)


def test_disrupt_segment_ids_as_a_list_or_array_work_like_the_tensor():
    model, idx = _model({"name": "disrupt_set"}), torch.randint(3, 256, (2, 16))
    segments = torch.tensor([[0] * 8 + [1] * 8, [0] * 4 + [1] * 12])
    with torch.no_grad():
        want = model(idx, segment_ids=segments)
        torch.testing.assert_close(model(idx, segment_ids=segments.tolist()), want)
        torch.testing.assert_close(model(idx, segment_ids=segments.numpy().astype(np.int32)), want)
        assert not torch.allclose(model(idx), want)  # the segments matter: they are not ignored


def test_hybrid_prefix_len_uses_the_same_check():
    model, idx = _model({"name": "hybrid", "iterations": 1}), torch.randint(3, 256, (2, 16))
    for bad, said in (([3], "got int64 of shape (1,)"), ("ab", "got str 'ab'"), (torch.ones(2), "got float32")):
        with pytest.raises(ValueError, match=r"^hybrid: prefix_len must be integers of shape \(2,\), one per row") as e:
            model(idx, prefix_len=bad)
        assert said in str(e.value) and "\n" not in str(e.value)
