import random

import pytest
import torch

from litattn import tokens as tk
from litattn.tokenizer import SPECIAL_TOKENS, Tokenizer
from litattn.tokens import DisruptToken, SETToken, decode_sample, encode_sample, segment_ids, split_sample

PROSE = "This is a sentence. Another one follows! Is it a question?\n\nA new paragraph starts here.\n"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    root = tmp_path_factory.mktemp("tokens")
    (root / "prose.txt").write_text(PROSE * 40)
    return Tokenizer.train([root / "prose.txt"], 300, root / "tok")


@pytest.fixture(scope="module")
def plain_tokenizer(tmp_path_factory) -> Tokenizer:
    """A Hugging Face tokenizer without litattn's reserved tokens (as a converted checkpoint may have)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    root = tmp_path_factory.mktemp("plain")
    hf = HFTokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(root / "tokenizer.json"))
    return Tokenizer(root)


def sid(tokenizer, i: int) -> int:
    return tokenizer.special_tokens[f"<|set_{i}|>"]


def test_the_readme_sample_as_a_list_encodes_and_decodes(tokenizer):
    sample = ["This is a sentence."]
    sample.insert(0, DisruptToken())
    sample.append(SETToken(entity=True))
    ids = encode_sample(tokenizer, sample)
    assert ids == [tokenizer.special_tokens["<|disrupt|>"], *tokenizer.encode("This is a sentence."), sid(tokenizer, 0)]
    text = decode_sample(tokenizer, ids)
    assert text == "<|disrupt|>This is a sentence.<|set_0|>"
    assert decode_sample(tokenizer, torch.tensor(ids)) == text  # a tensor too
    assert split_sample(text) == [DisruptToken(), "This is a sentence.", SETToken(entity=True, index=0)]
    assert encode_sample(tokenizer, split_sample(text)) == ids  # the round trip closes


def test_entity_and_topic_tokens_come_from_separate_halves_of_the_pool(tokenizer):
    assert tk.ENTITY_SET_IDS == tuple(range(8)) and tk.TOPIC_SET_IDS == tuple(range(8, 16))
    assert tk.set_ids(tokenizer, "entity") == [sid(tokenizer, i) for i in range(8)]
    assert tk.set_ids(tokenizer, "topic") == [sid(tokenizer, i) for i in range(8, 16)]
    assert tk.set_ids(tokenizer) == [sid(tokenizer, i) for i in range(16)]
    # None cycles per kind: the k-th SET token of a kind gets index k mod 8
    sample = [SETToken(entity=True), SETToken(topic=True), SETToken(entity=True), SETToken(topic=True, index=5)]
    sample += [SETToken(topic=True)] + [SETToken(entity=True)] * 7
    ids = encode_sample(tokenizer, sample)
    assert ids[:5] == [sid(tokenizer, 0), sid(tokenizer, 8), sid(tokenizer, 1), sid(tokenizer, 13), sid(tokenizer, 10)]
    assert ids[5:] == [sid(tokenizer, i % 8) for i in range(2, 9)]  # wraps around after set_7
    # an int gives every one that index; a token's own index wins
    assert encode_sample(tokenizer, sample[:4], set_index=3) == [sid(tokenizer, i) for i in (3, 11, 3, 13)]
    # a seeded random.Random draws reproducibly, within the kind
    a = encode_sample(tokenizer, [SETToken(topic=True)] * 20, set_index=random.Random(1))
    assert a == encode_sample(tokenizer, [SETToken(topic=True)] * 20, set_index=random.Random(1))
    assert set(a) <= set(tk.set_ids(tokenizer, "topic")) and len(set(a)) > 1
    assert decode_sample(tokenizer, encode_sample(tokenizer, SETToken(topic=True, index=7))) == "<|set_15|>"
    assert str(SETToken(topic=True, index=2)) == "<|set_10|>" and str(DisruptToken()) == "<|disrupt|>"
    # SETToken(entity=False) is a topic token: the same object and the same ids as SETToken(topic=True)
    assert SETToken(entity=False) == SETToken(topic=True) and SETToken(topic=False) == SETToken(entity=True)
    assert SETToken(entity=False).kind == "topic" and SETToken(entity=False, topic=True).kind == "topic"
    assert encode_sample(tokenizer, [SETToken(entity=False), SETToken(entity=True)]) == [
        sid(tokenizer, 8),
        sid(tokenizer, 0),
    ]


def test_a_sample_may_be_text_alone_and_other_specials_decode_by_name(tokenizer):
    assert encode_sample(tokenizer, "A new paragraph") == tokenizer.encode("A new paragraph")
    ids = [tokenizer.eos_id, *tokenizer.encode("Is it"), tokenizer.special_tokens["<|pad|>"]]
    assert decode_sample(tokenizer, ids) == "<|endoftext|>Is it<|pad|>"
    assert split_sample("a<|endoftext|>b<|set_99|>") == ["a<|endoftext|>b<|set_99|>"]  # not SET/Disrupt markers


def test_bad_token_objects_and_samples_are_clear_errors(tokenizer):
    for kwargs in ({}, {"entity": True, "topic": True}, {"entity": False, "topic": False}, {"entity": 1}):
        with pytest.raises(ValueError, match=r"^SETToken needs exactly one kind: SETToken\(entity=True\), SETToken\("):
            SETToken(**kwargs)
    with pytest.raises(ValueError, match=r"^SETToken index must be an integer in \[0, 7\] or None, got 8$"):
        SETToken(entity=True, index=8)
    with pytest.raises(TypeError, match="A sample holds str, DisruptToken and SETToken pieces, got int: 5"):
        encode_sample(tokenizer, ["text", 5])
    with pytest.raises(ValueError, match=r"^set_index must be in \[0, 7\]"):
        encode_sample(tokenizer, [SETToken(entity=True)], set_index=8)
    assert DisruptToken() == DisruptToken() and hash(SETToken(entity=True)) == hash(SETToken(entity=True))
    with pytest.raises(AttributeError):  # frozen
        SETToken(entity=True).index = 3


def test_a_tokenizer_without_the_reserved_tokens_is_a_one_line_error(plain_tokenizer, tokenizer):
    assert "<|disrupt|>" not in plain_tokenizer.special_tokens
    for sample in ([DisruptToken(), "hello"], ["hello", SETToken(topic=True)]):
        with pytest.raises(ValueError) as e:
            encode_sample(plain_tokenizer, sample)
        message = str(e.value)
        assert "\n" not in message and "has no <|" in message
        assert "use a tokenizer trained by litattn" in message and str(plain_tokenizer.checkpoint_dir) in message
    with pytest.raises(ValueError, match=r"has no <\|disrupt\|> token"):
        tk.disrupt_id(plain_tokenizer)
    assert encode_sample(plain_tokenizer, "hello world") == [1, 2]  # text alone needs none
    assert tk.disrupt_id(tokenizer) == SPECIAL_TOKENS.index("<|disrupt|>")


def test_segment_ids_count_disrupt_tokens_and_a_disrupt_token_belongs_to_its_segment():
    D = 2
    ids = torch.tensor([5, 6, D, 7, 8, D, D, 9])
    assert segment_ids(ids, D).tolist() == [0, 0, 1, 1, 1, 2, 3, 3]
    batch = torch.tensor([[D, 5, 6, 7], [5, 6, 7, 8], [5, D, 6, D]])
    out = segment_ids(batch, D)
    assert out.dtype == torch.int64 and out.shape == (3, 4)
    assert out.tolist() == [[1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 1, 2]]  # rows are independent
    assert segment_ids([5, D, 6], D).tolist() == [0, 1, 1]  # a list too
    assert segment_ids(torch.zeros(0, dtype=torch.long), D).shape == (0,)
    with pytest.raises(ValueError, match=r"^input_ids must have shape \(T,\) or \(B, T\), got \(1, 2, 3\)$"):
        segment_ids(torch.zeros(1, 2, 3, dtype=torch.long), D)
