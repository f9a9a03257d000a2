import json
import pickle
import re
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch
import yaml

from litattn import tokens as tk
from litattn.cli import main
from litattn.data import AlpacaJSON, DisruptPlacement, InjectTokens, SETPlacement, TextFiles
from litattn.data.inject import InjectedDataset, Injector
from litattn.data.instructions import IGNORE_INDEX, InstructionDataset
from litattn.tokenizer import Tokenizer
from litattn.tokens import decode_sample
from litattn.training import collate

PROSE = (
    "Hello world. This is it! Done?\nThe end of a paragraph.\n\nA new paragraph starts. It has two sentences.\n"
    "    \nAnother one, after a blank line that holds spaces.\n"
)
FILLER = " z" * 40  # no sentence end, no newline
CODE = 'def f(x):\n    """Return x. Then more."""\n    return os.path.join(x, "1.5")\n# Done here. Next one.\nx = 1\n'


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ["textwrap.py", "fnmatch.py", "bisect.py"]:
        shutil.copy(stdlib / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, corpus) -> Tokenizer:
    root = tmp_path_factory.mktemp("tok")
    (root / "prose.txt").write_text(PROSE * 30)
    return Tokenizer.train([*sorted(corpus.glob("*.py")), root / "prose.txt"], 512, root / "tok")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def window(ids) -> dict[str, torch.Tensor]:
    """A pretraining item over len(ids) tokens: seq_len = len(ids) - 1."""
    t = torch.tensor(ids, dtype=torch.long)
    return {"input_ids": t[:-1], "labels": t[1:]}


def inject(tokenizer, item, disrupt=None, set=None, seed=0, **kwargs):
    disrupt = DisruptPlacement(**disrupt) if disrupt is not None else None
    set = SETPlacement(**set) if set is not None else None
    return Injector(tokenizer, disrupt, set, **kwargs)(item, torch.Generator().manual_seed(seed))


def text_of(tokenizer, item) -> str:
    return decode_sample(tokenizer, item["input_ids"])


def injected_ids(tokenizer) -> set[int]:
    return {tk.disrupt_id(tokenizer), *tk.set_ids(tokenizer)}


def sequence(item) -> list[int]:
    """The item's tokens: its inputs up to the last target, then that target."""
    labels = item["labels"]
    last = int((labels != IGNORE_INDEX).nonzero()[-1])
    return [*item["input_ids"][: last + 1].tolist(), int(labels[last])]


# ---------------------------------------------------------------------------------- placements
def test_disrupt_every_n_tokens_and_at_window_start(tokenizer):
    a = list(range(300, 317))  # 17 ordinary tokens: seq_len 16
    D = tk.disrupt_id(tokenizer)
    item = inject(tokenizer, window(a), {"every": None, "window_start": True, "every_n_tokens": 4})
    # gaps 0, 4, 8, 12, 16 (before a[j]); the window keeps its first 17 tokens
    expected = [D, *a[0:4], D, *a[4:8], D, *a[8:12], D, a[12]]
    assert item["input_ids"].tolist() == expected[:-1]
    assert item["labels"].tolist() == [*a[0:4], -100, *a[4:8], -100, *a[8:12], -100, a[12]]
    assert item["segment_ids"].tolist() == [1] * 5 + [2] * 5 + [3] * 5 + [4]
    assert item["segment_ids"].dtype == torch.int64 and item["input_ids"].shape == (16,)
    # without window_start: none at 0
    item = inject(tokenizer, window(a), {"every": None, "every_n_tokens": 5})
    assert item["input_ids"].tolist() == [*a[0:5], D, *a[5:10], D, *a[10:14]]


def test_disrupt_at_document_starts(tokenizer):
    a, eos, D = list(range(300, 320)), tokenizer.eos_id, tk.disrupt_id(tokenizer)
    ids = [*a[:5], eos, *a[5:10], eos, eos, *a[10:14]]  # the last EOS ends an empty document
    item = inject(tokenizer, window(ids), {"every": "document"})
    assert item["input_ids"].tolist() == [*a[:5], eos, D, *a[5:10], eos, D, eos, D]  # then a[10] the last label
    assert item["labels"].tolist()[-1] == a[10]
    assert item["segment_ids"].tolist() == [0] * 6 + [1] * 7 + [2] * 2 + [3]


def test_disrupt_at_paragraphs_and_documents(tokenizer):
    text = PROSE + "<|endoftext|>Next document." + FILLER
    item = inject(tokenizer, window(tokenizer.encode(text)), {"every": "paragraph"})
    assert text_of(tokenizer, item).startswith(
        "Hello world. This is it! Done?\nThe end of a paragraph.\n\n<|disrupt|>A new paragraph starts. It has two "
        "sentences.\n    \n<|disrupt|>Another one, after a blank line that holds spaces.\n<|endoftext|><|disrupt|>"
        "Next document. z z"
    )
    assert text_of(tokenizer, item).count("<|disrupt|>") == 3
    # a blank line split over several tokens counts: "\n" "\n" here
    assert tokenizer.decode(tokenizer.encode(".\n\nA")[1:2]) == "\n"


def test_set_after_sentences(tokenizer):
    text = "Hello world. This is it! Done?\nos.path 1.5 (see above.) end. x" + FILLER
    item = inject(tokenizer, window(tokenizer.encode(text)), set={"after": "sentence", "pool": 1})
    assert text_of(tokenizer, item).startswith(
        "Hello world.<|set_0|> This is it!<|set_0|> Done?<|set_0|>\nos.path 1.5 (see above.)<|set_0|> "
        "end.<|set_0|> x z z"
    )  # not after "os." or "1." (no whitespace follows); after "above.)" (closing bracket)
    assert text_of(tokenizer, item).count("<|set_") == 5
    assert "segment_ids" in item and item["segment_ids"].eq(0).all()  # no Disrupt token: one segment


def test_set_after_paragraphs_draws_from_the_pool_of_its_kind(tokenizer):
    text = "A b.\n\nC d.<|endoftext|>E f.\n\n\nG h." + FILLER
    item = inject(tokenizer, window(tokenizer.encode(text)), set={"after": "paragraph", "kind": "topic", "pool": 1})
    assert text_of(tokenizer, item).startswith("A b.<|set_8|>\n\nC d.<|set_8|><|endoftext|>E f.<|set_8|>\n\n\nG h. z")
    # pool 3: the ids are drawn from set_8..set_10
    drawn = set()
    for seed in range(30):
        item = inject(
            tokenizer, window(tokenizer.encode(text)), set={"after": "paragraph", "kind": "topic", "pool": 3}, seed=seed
        )
        drawn |= set(item["input_ids"].tolist()) & set(tk.set_ids(tokenizer))
    assert drawn == set(tk.set_ids(tokenizer, "topic")[:3])


def test_disrupt_every_sentence_in_prose_and_code(tokenizer):
    item = inject(tokenizer, window(tokenizer.encode(PROSE + FILLER)), {"every": "sentence"})
    assert text_of(tokenizer, item).startswith(
        "<|disrupt|>Hello world.<|disrupt|> This is it!<|disrupt|> Done?<|disrupt|>\nThe end of a paragraph."
        "<|disrupt|>\n\nA new paragraph starts.<|disrupt|> It has two sentences.<|disrupt|>\n    \nAnother one, "
        "after a blank line that holds spaces.<|disrupt|>\n z z"
    )  # the item's start, then the gap after each sentence end (the SET rule's places)
    code = CODE
    item = inject(tokenizer, window(tokenizer.encode(code + FILLER)), {"every": "sentence"})
    assert text_of(tokenizer, item).startswith(
        '<|disrupt|>def f(x):\n    """Return x.<|disrupt|> Then more."""<|disrupt|>\n    return os.path.join(x, "1.5")'
        "\n# Done here.<|disrupt|> Next one.<|disrupt|>\nx = 1\n z"
    )  # code's sentences are in its docstrings and comments: not after "os." or "1."
    eos, D = tokenizer.eos_id, tk.disrupt_id(tokenizer)
    a = list(range(300, 310))
    item = inject(tokenizer, window([*a[:4], eos, *a[4:]]), {"every": "sentence"})
    assert item["input_ids"].tolist()[:7] == [D, *a[:4], eos, D]  # document starts too


def test_set_kind_auto_chooses_entity_or_topic_by_what_follows(tokenizer):
    E, T = "<|set_0|>", "<|set_8|>"
    prose = (
        'We use Python here. Python is a language. The end. 1984 was a year. "Hamlet" is a play. It ends. '
        "I think so. So it goes."
    )
    item = inject(tokenizer, window(tokenizer.encode(prose + FILLER)), set={"kind": "auto", "pool": 1})
    assert text_of(tokenizer, item).startswith(
        f'We use Python here.{E} Python is a language.{T} The end.{E} 1984 was a year.{E} "Hamlet" is a play.{T} '
        f"It ends.{T} I think so.{T} So it goes.{T} z"
    )  # Python: a name used inside a sentence; 1984: a number; "Hamlet": quoted; The, It, I, So: topics
    code = CODE
    item = inject(tokenizer, window(tokenizer.encode(code + FILLER)), set={"kind": "auto", "pool": 1})
    assert text_of(tokenizer, item).startswith(
        f'def f(x):\n    """Return x.{T} Then more."""{T}\n    return os.path.join(x, "1.5")\n# Done here.{T} '
        f"Next one.{E}\nx = 1\n z"
    )  # `return` is a statement, `x = 1` assigns a name
    # ids drawn from each kind's pool: pool 3 gives set_0..2 and set_8..10
    drawn = set()
    for seed in range(20):
        item = inject(tokenizer, window(tokenizer.encode(prose + FILLER)), set={"kind": "auto", "pool": 3}, seed=seed)
        drawn |= set(item["input_ids"].tolist()) & set(tk.set_ids(tokenizer))
    assert drawn == {*tk.set_ids(tokenizer, "entity")[:3], *tk.set_ids(tokenizer, "topic")[:3]}


def test_the_seeds_example_equals_sentence_placement(tokenizer):
    """The seed's sample: a Disrupt token at its start and `SETToken(entity=True)` appended. Sentences written as
    such samples, one after another, are what `disrupt: {every: sentence}` + `set: {after: sentence}` insert."""
    sentences = ["This is a sentence.", " It has two words more.", " Done here!", " And another one?"]
    written = []
    for sentence in sentences:
        sample = [sentence]
        sample.insert(0, tk.DisruptToken())
        sample.append(tk.SETToken(entity=True))
        written += sample
    expected = tk.encode_sample(tokenizer, [*written, tk.DisruptToken(), FILLER], set_index=0)
    plain = tokenizer.encode("".join(sentences) + FILLER)
    item = inject(tokenizer, window(plain), {"every": "sentence"}, {"after": "sentence", "kind": "entity", "pool": 1})
    assert sequence(item) == expected[: len(plain)]


def test_disrupt_and_set_with_a_probability(tokenizer):
    a, D = list(range(300, 341)), tk.disrupt_id(tokenizer)
    item = inject(tokenizer, window(a), {"every": None, "probability": 1.0})
    assert item["input_ids"].tolist() == [x for t in a[:20] for x in (t, D)]  # before each token but the first
    shares, layouts = [], set()
    for seed in range(40):
        item = inject(tokenizer, window(a), {"every": None, "probability": 0.25}, seed=seed)
        x = item["input_ids"].tolist()
        shares.append(x.count(D) / len(x))
        layouts.add(tuple(x))
    assert 0.15 < sum(shares) / len(shares) < 0.25  # p / (1 + p) of a full window
    assert len(layouts) > 30
    # SET probability: about half the sentence ends
    text = "One. " * 40
    counts = [
        text_of(tokenizer, inject(tokenizer, window(tokenizer.encode(text)), set={"probability": 0.5}, seed=s)).count(
            "<|set_"
        )
        for s in range(20)
    ]
    assert 0.3 < sum(counts) / len(counts) / 30 < 0.7 and len(set(counts)) > 1


def test_a_set_and_a_disrupt_token_at_one_place_go_set_first(tokenizer):
    text = "One. Two." + FILLER
    item = inject(tokenizer, window(tokenizer.encode(text)), {"every": None, "probability": 1.0}, {"pool": 1})
    decoded = text_of(tokenizer, item)
    assert ".<|set_0|><|disrupt|> T" in decoded  # after "One." both, SET first
    assert "<|disrupt|><|set_" not in decoded


# ---------------------------------------------------------------------------------- labels, lengths, segments
@pytest.mark.parametrize("predict", [False, True])
def test_labels_lengths_and_segments_stay_consistent(tokenizer, predict):
    ids = tokenizer.encode(PROSE * 6)
    injected = injected_ids(tokenizer)
    D = tk.disrupt_id(tokenizer)
    for start in range(0, 120, 7):
        original = ids[start : start + 65]
        item = inject(
            tokenizer,
            window(original),
            {"every": "paragraph", "every_n_tokens": 9, "probability": 0.1},
            {"after": "sentence", "pool": 4, "probability": 0.7},
            seed=start,
            predict_injected=predict,
        )
        x, y = item["input_ids"], item["labels"]
        assert x.shape == y.shape == item["segment_ids"].shape == (64,)
        assert torch.equal(item["segment_ids"], tk.segment_ids(x, D))
        if predict:  # every label is the next token
            assert torch.equal(y[:-1], x[1:]) and (y != IGNORE_INDEX).all()
        else:  # the next token, or -100 where that is an inserted one
            nxt = x[1:]
            is_injected = torch.tensor([int(t) in injected for t in nxt])
            assert torch.equal(y[:-1], torch.where(is_injected, IGNORE_INDEX, nxt))
            assert int(y[-1]) not in injected
            assert any(int(t) in injected for t in x)
        # the real tokens keep their order; the window's tail makes room
        real = [int(t) for t in [*x, y[-1]] if int(t) not in injected and int(t) != IGNORE_INDEX]
        assert real == original[: len(real)] and len(real) < len(original)


def test_segment_ids_can_be_left_out(tokenizer):
    item = inject(tokenizer, window(list(range(300, 320))), {"every_n_tokens": 4}, segment_ids=False)
    assert set(item) == {"input_ids", "labels"}


# ---------------------------------------------------------------------------------- determinism
class Items(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {k: v.clone() for k, v in self.items[i].items()}


def test_items_are_a_pure_function_of_seed_epoch_and_index(tokenizer):
    ids = tokenizer.encode(PROSE * 4)
    base = Items([window(ids[i : i + 49]) for i in range(0, 96, 8)])
    injector = Injector(tokenizer, DisruptPlacement(every=None, probability=0.2), SETPlacement(probability=0.5))

    def items(seed, epoch, split="train"):
        ds = InjectedDataset(base, injector, seed, split)
        ds.set_epoch(epoch)
        return [ds[i]["input_ids"].tolist() for i in range(len(ds))]

    assert items(0, 0) == items(0, 0) and items(3, 2) == items(3, 2)
    assert items(0, 0) != items(0, 1) != items(0, 2)  # re-drawn each epoch
    assert items(0, 0) != items(1, 0)
    assert sum(a != b for a, b in zip(items(0, 0), items(0, 1), strict=True)) > len(base) // 2
    ds = InjectedDataset(base, injector, 0, "train")
    ds.set_epoch(1)
    assert [pickle.loads(pickle.dumps(ds))[i]["input_ids"].tolist() for i in range(len(ds))] == items(0, 1)
    assert ds[-1]["input_ids"].tolist() == items(0, 1)[-1]
    with pytest.raises(IndexError):
        ds[len(ds)]
    # validation: epoch 0 whatever the loop says
    val = InjectedDataset(base, injector, 0, "val", fixed_epoch=True)
    before = [val[i]["input_ids"].tolist() for i in range(len(val))]
    val.set_epoch(5)
    assert [val[i]["input_ids"].tolist() for i in range(len(val))] == before == items(0, 0, "val")
    state = torch.get_rng_state()
    ds[0]
    assert torch.equal(state, torch.get_rng_state())  # no draw from the global RNG


# ---------------------------------------------------------------------------------- instruction items
def instruction(tokenizer, seq_len: int | None = None):
    """(dataset of one example padded to seq_len, its prompt ids, its response ids)."""
    prompt = tokenizer.encode("Do this. Then that!\n\n### Response:\n")
    response = [*tokenizer.encode("Fine. It is done.\n\nAll of it."), tokenizer.eos_id]
    pad = tokenizer.special_tokens["<|pad|>"]
    ds = InstructionDataset([(prompt, response)], seq_len, pad) if seq_len is not None else None
    return ds, prompt, response


def test_instruction_items_keep_prompt_and_response_whole(tokenizer):
    injected = injected_ids(tokenizer)
    config = dict(disrupt={"every": "paragraph", "window_start": True}, set={"pool": 1})
    _, prompt, response = instruction(tokenizer)
    n = len(prompt) + len(response)
    for room in (20, 3, 1, 0):  # padding positions beyond the example
        ds, _, _ = instruction(tokenizer, n - 1 + room)
        item = inject(tokenizer, ds[0], **config)
        x, y = item["input_ids"], item["labels"]
        assert x.shape == y.shape == item["segment_ids"].shape == (n - 1 + room,)
        seq = sequence(item)
        assert [t for t in seq if t not in injected] == prompt + response  # no real token dropped
        assert len(seq) == n + min(room, 8)  # the inserted tokens that fit (3 Disrupt + 5 SET wanted)
        # the loss covers the response (and its EOS) exactly, each label the next token
        targets = (y != IGNORE_INDEX).nonzero().flatten().tolist()
        assert [int(y[i]) for i in targets] == response
        assert all(int(y[i]) == int(x[i + 1]) for i in targets[:-1])  # (the EOS is a label only, then padding)
        assert (x[len(seq) - 1 :] == tokenizer.special_tokens["<|pad|>"]).all()  # padding after
    # room for one: the first inserted token only (the window-start Disrupt token)
    ds, _, _ = instruction(tokenizer, n)
    assert inject(tokenizer, ds[0], **config)["input_ids"][:2].tolist() == [tk.disrupt_id(tokenizer), prompt[0]]
    # the full text with room to spare: paragraph Disrupt tokens, SET tokens after sentences
    ds, _, _ = instruction(tokenizer, n + 30)
    assert decode_sample(tokenizer, sequence(inject(tokenizer, ds[0], **config))) == (
        "<|disrupt|>Do this.<|set_0|> Then that!<|set_0|>\n\n<|disrupt|>### Response:\nFine.<|set_0|> It is done."
        "<|set_0|>\n\n<|disrupt|>All of it.<|set_0|><|endoftext|>"
    )


def test_predicted_injected_tokens_in_instruction_items_are_targets_in_the_response_only(tokenizer):
    ds, prompt, response = instruction(tokenizer, 80)
    item = inject(tokenizer, ds[0], {"every": "paragraph"}, {"pool": 1}, predict_injected=True)
    y = item["labels"]
    targets = [int(t) for t in y if t != IGNORE_INDEX]
    S, D = tk.set_ids(tokenizer)[0], tk.disrupt_id(tokenizer)
    assert [t for t in targets if t not in (S, D)] == response
    assert targets.count(S) == 3 and targets.count(D) == 1  # the response's; the prompt's stay -100


def test_prompt_ids_of_an_injected_instruction_dataset(tokenizer):
    ds, prompt, _ = instruction(tokenizer, 60)
    injector = Injector(tokenizer, DisruptPlacement(every="paragraph", window_start=True), None)
    wrapped = InjectedDataset(ds, injector, 0, "val", fixed_epoch=True)
    ids = wrapped.prompt_ids(0)
    assert decode_sample(tokenizer, ids) == "<|disrupt|>Do this. Then that!\n\n<|disrupt|>### Response:\n"
    assert ids == wrapped[0]["input_ids"][: len(ids)].tolist()
    assert not hasattr(InjectedDataset(Items([window(list(range(300, 310)))]), injector, 0, "val"), "prompt_ids")


def test_collate_trims_segment_ids_with_the_labels(tokenizer):
    ds, _, _ = instruction(tokenizer, 120)
    injector = Injector(tokenizer, DisruptPlacement(every="paragraph"), SETPlacement())
    wrapped = InjectedDataset(Items([ds[0], ds[0]]), injector, 0, "train")
    batch = collate(wrapped, torch.tensor([0, 1]))
    assert batch["input_ids"].shape == batch["segment_ids"].shape == batch["labels"].shape
    assert batch["input_ids"].shape[1] < 120
    assert torch.equal(batch["segment_ids"], tk.segment_ids(batch["input_ids"], tk.disrupt_id(tokenizer)))


# ---------------------------------------------------------------------------------- the data module
def test_inject_tokens_wraps_a_text_corpus(corpus, tokenizer, cache):
    data = InjectTokens(TextFiles([corpus], extensions=[".py"]), disrupt={"every_n_tokens": 16}, set={"kind": "topic"})
    assert isinstance(data.disrupt, DisruptPlacement) and data.disrupt.every == "document"
    with pytest.raises(RuntimeError, match="setup"):
        data.train_dataset()
    assert data.setup(tokenizer, 512, 64, cache) is tokenizer
    train, val, inner = data.train_dataset(), data.val_dataset(), data.data.train_dataset()
    assert len(train) == len(inner) and len(val) == len(data.data.val_dataset())
    first = [train[i]["input_ids"].tolist() for i in range(5)]
    train.set_epoch(1)
    assert [train[i]["input_ids"].tolist() for i in range(5)] != first
    assert all(train[i]["input_ids"][16] == tk.disrupt_id(tokenizer) for i in range(5))
    assert set(train[0]) == {"input_ids", "labels", "segment_ids"}
    assert val.fixed_epoch and not train.fixed_epoch
    assert data.data.training_hooks() == []
    (redraw,) = data.training_hooks()  # the SET pool's re-draw, every epoch by default
    assert redraw.ids == tk.set_ids(tokenizer, "topic")[: tk.POOL_SIZE] and redraw.every_steps is None
    assert InjectTokens(TextFiles([corpus], extensions=[".py"]), set={"redraw": None}).training_hooks() == []
    assert data.describe().startswith(data.data.describe())
    assert data.describe().endswith(
        "token injection: Disrupt tokens at document starts, every 16 tokens; topic SET tokens "
        "(<|set_8|>..<|set_15|>) after sentences, re-drawn every epoch; drawn from (seed 0 (outside a run), "
        "epoch, item), "
        "validation as at epoch 0; "
        "inserted tokens are not targets; items carry segment_ids"
    )


def test_inject_tokens_wraps_instruction_data(tmp_path, tokenizer, cache):
    examples = [
        {"instruction": f"Say {w}. Then stop.", "output": f"{w.title()}. Done.\n\nThat is all."}
        for w in ["yes", "no", "maybe", "never", "always", "soon"]
    ]
    (tmp_path / "train.json").write_text(json.dumps(examples[:4]))
    (tmp_path / "val.json").write_text(json.dumps(examples[4:]))
    inner = AlpacaJSON(tmp_path / "train.json", val_file=tmp_path / "val.json")
    data = InjectTokens(inner, disrupt={"every": "paragraph", "window_start": True}, set={"pool": 2})
    data.setup(tokenizer, 512, 256, cache)
    injected = injected_ids(tokenizer)
    train = data.train_dataset()
    for i in range(len(train)):
        original, item = inner.train_dataset()[i], train[i]
        assert [t for t in sequence(item) if t not in injected] == sequence(original)
        targets = [t for t in item["labels"].tolist() if t != IGNORE_INDEX]
        assert targets == [t for t in original["labels"].tolist() if t != IGNORE_INDEX]  # the response, whole
    prompt = decode_sample(tokenizer, data.val_dataset().prompt_ids(0))
    assert prompt.startswith("<|disrupt|>Below is an instruction") and prompt.endswith("### Response:\n")
    assert "AlpacaJSON" in data.describe()


def test_bad_configuration_is_a_one_line_error(corpus):
    text = TextFiles([corpus], extensions=[".py"])
    cases = [
        (dict(disrupt={"evry": "document"}), "disrupt has no option 'evry'; its options are every, window_start, "),
        (dict(set={"kind": "entity", "pol": 3}), "set has no option 'pol'; its options are after, kind, pool, "),
        (dict(disrupt={"every": "line"}), "disrupt.every must be one of document, paragraph, sentence (or null), got "),
        (dict(disrupt={"every_n_tokens": 0}), "disrupt.every_n_tokens must be >= 1 (or null for none), got 0"),
        (dict(disrupt={"probability": 1.5}), "disrupt.probability must be in [0, 1], got 1.5"),
        (dict(disrupt={"every": None}), "disrupt places no token: set every (document, paragraph or sentence), "),
        (dict(set={"after": "word"}), "set.after must be one of sentence, paragraph, got 'word'"),
        (dict(set={"kind": "person"}), "set.kind must be one of entity, topic, auto, got 'person'"),
        (dict(set={"pool": 9}), "set.pool must be in [1, 8], got 9"),
        (dict(set={"pool": 0}), "set.pool must be in [1, 8], got 0"),
        (dict(set={"probability": 0}), "set.probability must be in (0, 1], got 0"),
        (dict(set={}, seed=-1), "seed must be in [0, 4294967295], got -1"),
        (dict(set={}, predict_injected="yes"), "predict_injected must be true or false, got 'yes'"),
        ({}, "InjectTokens inserts nothing: give disrupt (e.g. {every: document}) and/or set"),
        (dict(set=[1]), "set must be a mapping of options or null, got [1]"),
    ]  # fmt: skip
    for kwargs, message in cases:
        with pytest.raises(ValueError) as e:
            InjectTokens(text, **kwargs)
        assert str(e.value).startswith(message) and "\n" not in str(e.value), kwargs
    with pytest.raises(TypeError, match="data must be a data module"):
        InjectTokens("corpus", set={})
    with pytest.raises(ValueError, match="already an InjectTokens"):
        InjectTokens(InjectTokens(text, set={}), disrupt={})
    assert type(InjectTokens(set={}).data).__name__ == "StdlibCorpus"


def test_bad_configuration_from_the_command_line_names_the_key(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--config", "config_hub/pretrain/disrupt-set-debug.yaml", "--data.disrupt.evry", "document"])
    assert "evry" in capsys.readouterr().err


def test_a_tokenizer_without_reserved_tokens_fails_at_setup(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    hf = HFTokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(
        ValueError, match=r"has no <\|disrupt\|> token .*Disrupt/SET\); use a tokenizer trained by litattn"
    ):
        Injector(Tokenizer(tmp_path), DisruptPlacement(), None)
    with pytest.raises(ValueError, match=r"has no <\|set_0\|> token"):
        Injector(Tokenizer(tmp_path), None, SETPlacement(), segment_ids=False)


# ---------------------------------------------------------------------------------- end to end
def test_pretrain_two_epochs_with_injection_from_the_config_hub(tmp_path, tokenizer, capsys):

    out = tmp_path / "out"
    args = [
        "pretrain", "--config", "config_hub/pretrain/disrupt-set-debug.yaml", "--accelerator", "cpu",
        "--tokenizer_dir", str(tokenizer.checkpoint_dir), "--cache_dir", str(tmp_path / "cache"),
        "--log.sample_prompt", "null", "--out_dir", str(out),
    ]  # fmt: skip
    main(args)
    printed = capsys.readouterr().out
    assert "token injection: Disrupt tokens at document and paragraph starts, every 32 tokens" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epoch"] == 2 and summary["val_loss"] is not None
    data = yaml.safe_load((out / "final" / "hyperparameters.yaml").read_text())["data"]
    assert data["class_path"] == "litattn.data.inject.InjectTokens"
    assert data["init_args"]["disrupt"]["every_n_tokens"] == 32 and data["init_args"]["set"]["pool"] == 4
    assert data["init_args"]["data"]["class_path"] == "litattn.data.stdlib.StdlibCorpus"  # nested, as the CLI reads
    again = tmp_path / "again.yaml"  # the saved section parses back as a data argument
    again.write_text(yaml.safe_dump({"data": data}))
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--config", "config_hub/pretrain/disrupt-set-debug.yaml", "--config", str(again),
              "--print_config"])  # fmt: skip
    assert exit_info.value.code in (0, None)
    assert yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]["data"]["init_args"]["packages"] == ["json"]


def test_wrappers_know_their_innermost_data_module():
    from litattn.data import AlpacaJSON, PasskeyMix, StdlibCorpus

    inner = StdlibCorpus()
    assert InjectTokens(PasskeyMix(inner), disrupt={"every": "document"}).innermost() is inner
    alpaca = AlpacaJSON.__new__(AlpacaJSON)  # no file needed to ask what kind of data it is
    assert InjectTokens(alpaca, set={"kind": "entity"}).innermost() is alpaca and inner.innermost() is inner


def test_the_run_seed_draws_the_placements_unless_the_seed_is_pinned(corpus, tokenizer, cache):
    def items(seed=None, run_seed=None):
        data = InjectTokens(TextFiles([corpus], extensions=[".py"]), set={"probability": 0.5}, seed=seed)
        if run_seed is not None:
            data.seed_from_run(run_seed)
        data.setup(tokenizer, 512, 64, cache)
        return [data.train_dataset()[i]["input_ids"].tolist() for i in range(6)], data.describe()

    run1, described = items(run_seed=1)
    assert run1 != items(run_seed=2)[0] and "seed 1 (the run's)" in described
    assert items(run_seed=0)[0] == items()[0]  # outside a run: seed 0, as before run seeds reached the data
    pinned, described = items(seed=5, run_seed=1)
    assert pinned == items(seed=5, run_seed=2)[0] and "seed 5 (pinned)" in described


def test_seed_placement_resumes_across_an_epoch_bit_exactly(tmp_path, tokenizer, capsys):
    """Disrupt per sentence, SET after it with `kind: auto`, placements re-drawn each epoch: a run resumed after
    the epoch boundary ends with the uninterrupted run's weights, and the log gives each SET kind's share."""
    from safetensors.torch import load_file

    seed_placement = tmp_path / "seed-placement.yaml"
    seed_placement.write_text(
        "data:\n  init_args:\n"
        "    disrupt: {every: sentence, every_n_tokens: null}\n"
        "    set: {after: sentence, kind: auto, pool: 4, probability: 1.0}\n"
        "    seed: null\n"
    )

    def run(out, *extra):
        main([
            "pretrain", "--config", "config_hub/pretrain/disrupt-set-debug.yaml", "--config", str(seed_placement),
            "--accelerator", "cpu", "--tokenizer_dir", str(tokenizer.checkpoint_dir),
            "--cache_dir", str(tmp_path / "cache"), "--log.sample_prompt", "null", "--out_dir", str(out),
            "--train.save_interval", "1", "--eval.interval", "0", "--seed", "7", *extra,
        ])  # fmt: skip
        return out

    straight = run(tmp_path / "straight")
    out = capsys.readouterr().out
    assert "Disrupt tokens at item, document and sentence starts; entity or topic (by what follows) SET" in out
    shares = re.search(r"SET kinds in the first \d+ training items: entity \d+% \((\d+)\), topic \d+% \((\d+)\)", out)
    assert shares and int(shares[1]) > 0 and int(shares[2]) > 0  # both kinds in one run
    steps = sorted(int(p.name.split("-")[1]) for p in straight.glob("step-*"))
    per_epoch = steps[-1] // 2
    resumed = run(tmp_path / "resumed", "--resume", str(straight / f"step-{per_epoch + 1:08d}"))
    a = load_file(straight / "final" / "model.safetensors")
    b = load_file(resumed / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
