"""Tokenizer parity with transformers' roberta-base tokenizer on the real vocabulary (../shared/roberta-base)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from roberta_lite import Tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
ROBERTA = SHARED / "roberta-base"
pytestmark = pytest.mark.skipif(not (ROBERTA / "vocab.json").is_file(), reason="../shared/roberta-base is absent")

TEXTS = [
    "Hello world! This movie was great.",
    "  leading spaces,\ttabs and\nnewlines\n\n",
    "Unicode: café naïve 東京 🎬🍿 — “quotes” and ‘apostrophes’",
    "I can't believe it's not butter!!! 10/10 would watch again... <br /><br />Really.",
    "",
    "a <mask> token",
    " ".join(["The film drags on and on, a tedious, overlong exercise in style over substance."] * 60),  # > 512 tokens
]


@pytest.fixture(scope="module")
def reference():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(ROBERTA))


@pytest.fixture(scope="module", params=["tokenizer.json", "vocab+merges"])
def ours(request, tmp_path_factory):
    if request.param == "tokenizer.json":
        return Tokenizer.from_pretrained(ROBERTA)
    d = tmp_path_factory.mktemp("bpe")  # the older two-file form, as some checkpoints ship it
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(ROBERTA / f, d / f)
    return Tokenizer.from_pretrained(d)


def test_known_encoding(ours):
    assert ours.encode("Hello world! This movie was great.") == [0, 31414, 232, 328, 152, 1569, 21, 372, 4, 2]
    assert ours.pad_id == 1


@pytest.mark.parametrize("max_length", [512, 16])
def test_parity_with_transformers(ours, reference, max_length):
    for text in TEXTS:
        want = reference(text, truncation=True, max_length=max_length)["input_ids"]
        assert ours.encode(text, max_length=max_length) == want, text[:40]
    long = ours.encode(TEXTS[-1], max_length=max_length)
    assert len(long) == max_length and long[0] == 0 and long[-1] == 2


def test_batch_padding(ours, reference):
    ids, mask = ours(TEXTS[:3], max_length=512)
    ref = reference(TEXTS[:3], truncation=True, max_length=512, padding=True, return_tensors="pt")
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])


def test_fingerprint_identifies_vocabulary(tmp_path):
    """The tokenization cache is keyed by this: same files, same key; one merge fewer, another key."""
    a, b = Tokenizer.from_pretrained(ROBERTA), Tokenizer.from_pretrained(ROBERTA)
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64
    shutil.copy(ROBERTA / "vocab.json", tmp_path / "vocab.json")
    merges = (ROBERTA / "merges.txt").read_text(encoding="utf-8").splitlines()
    (tmp_path / "merges.txt").write_text("\n".join(merges[:-1]) + "\n", encoding="utf-8")
    full = tmp_path / "full"
    full.mkdir()
    shutil.copy(ROBERTA / "vocab.json", full / "vocab.json")
    shutil.copy(ROBERTA / "merges.txt", full / "merges.txt")
    assert Tokenizer.from_pretrained(tmp_path).fingerprint != Tokenizer.from_pretrained(full).fingerprint


# --------------------------------------------------------------------------------------------------
# Sentence pairs: `<s> A </s></s> B </s>`, cut "longest_first" exactly as transformers' fast tokenizer cuts them

LONG = TEXTS[-1]  # > 512 tokens on its own
PAIRS = [
    ("The cat sat on the mat.", "A cat was sitting on a mat."),
    ("Is this a question?", LONG),  # the second alone is longer than any max_length below
    (LONG, "Short hypothesis."),  # the first alone is too long
    ("Unicode: café naïve 東京 🎬🍿", "— “quotes” and ‘apostrophes’ 한국어"),
    ("An empty second text", ""),
    ("", "An empty first text"),
]
# 4 is just the special tokens; odd and even budgets (max_length - 4) exercise who gets the odd token.
PAIR_LENGTHS = [512, 64, 17, 16, 9, 6, 5, 4]


def pairs_for(max_length: int) -> list[tuple[str, str]]:
    """PAIRS plus pairs whose texts are both longer than half of max_length: equal (the tie), first longer,
    second longer. Sized to max_length, since the Rust library's cost grows with the product of the number of
    max_length-sized pieces of the two texts (transformers pays the same)."""
    both = " ".join(["The film drags on, a tedious exercise in style."] * (max_length // 8 + 2))
    more = both + " and more words at the end"
    return PAIRS + [(both, both), (more, both), (both, more)]


@pytest.mark.parametrize("max_length", PAIR_LENGTHS)
def test_pair_parity_with_transformers(ours, reference, max_length):
    pairs = pairs_for(max_length)
    firsts, seconds = [a for a, _ in pairs], [b for _, b in pairs]
    # transformers' batch call: its single call `tok(a, "")` drops an empty second text (see tokenizer.py).
    want = reference(firsts, seconds, truncation=True, max_length=max_length)["input_ids"]
    got = ours.encode_batch(firsts, max_length, text_pairs=seconds)
    for (a, b), w, g in zip(pairs, want, got):
        assert g == w, (a[:20], b[:20])
        assert len(g) <= max_length and g[0] == 0 and g[-1] == 2
    assert sum(len(g) == max_length for g in got) >= 5  # the long pairs were cut
    for (a, b), w in zip(pairs, want):
        assert ours.encode(a, b, max_length=max_length) == w
        if b:
            assert reference(a, b, truncation=True, max_length=max_length)["input_ids"] == w


def test_pair_padding_matches_transformers(ours, reference):
    firsts, seconds = [a for a, _ in PAIRS], [b for _, b in PAIRS]
    ids, mask = ours(firsts, seconds, max_length=40)
    ref = reference(firsts, seconds, truncation=True, max_length=40, padding=True, return_tensors="pt")
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])
    one_ids, one_mask = ours(*PAIRS[0], max_length=40)  # a single pair of strings is a batch of one
    assert torch.equal(one_ids, ids[:1, : one_ids.shape[1]]) and one_mask.sum() == mask[0].sum()


def count(ours, text):
    return len(ours.encode(text, max_length=10_000)) - 2


def test_pair_truncation_rule(ours):
    """The rule itself, independent of transformers: the budget is max_length - 4; a text that fits in
    half of it stays whole; otherwise both get half, the odd token going to the longer text, or to the
    second on a tie."""
    short, mid = "one two three", "one two three four five six seven eight nine ten"
    longer = mid + " eleven twelve"
    n_short, n_mid, n_long = count(ours, short), count(ours, mid), count(ours, longer)
    assert (n_short, n_mid, n_long) == (3, 10, 12)

    def split(a, b, max_length):
        ids = ours.encode(a, b, max_length=max_length)
        assert ids[0] == 0 and ids[-1] == 2
        first = ids.index(2)  # the first </s>, then </s> again before the second text
        assert ids[first + 1] == 2
        return first - 1, len(ids) - first - 3

    assert split(short, longer, 13) == (3, 6)  # the short one fits in half: whole; the long one gets the rest
    assert split(longer, short, 13) == (6, 3)
    assert split(mid, mid, 13) == (4, 5)  # tie: the second gets the odd token
    assert split(longer, mid, 13) == (5, 4)  # the longer first text gets it
    assert split(mid, longer, 13) == (4, 5)
    assert split(mid, longer, 12) == (4, 4)
    assert split(short, mid, 200) == (3, 10)  # nothing to cut
    assert ours.encode(short, short, max_length=4) == [0, 2, 2, 2]


def test_pair_errors(ours):
    with pytest.raises(ValueError, match="max_length=3: must leave room for the 4 special tokens of a pair"):
        ours.encode("a", "b", max_length=3)
    with pytest.raises(ValueError, match="max_length=1: must leave room for the 2 special tokens"):
        ours.encode("a", max_length=1)
    assert ours.encode("a", max_length=2) == [0, 2]
    with pytest.raises(TypeError, match="pass max_length by keyword"):
        ours.encode("a", 16)  # the old positional max_length is now the second text
    with pytest.raises(ValueError, match="2 texts but 1 text_pairs"):
        ours.encode_batch(["a", "b"], 16, text_pairs=["c"])
    with pytest.raises(TypeError):
        ours(["a", "b"], "c")  # one second text for two texts


def test_empty_second_text_is_still_a_pair(ours, reference):
    """`<s> a b </s></s></s>`, as transformers' batch call and its slow tokenizer give (its fast single call
    alone drops the empty text)."""
    slow = pytest.importorskip("transformers").RobertaTokenizer.from_pretrained(str(ROBERTA))
    want = slow("a b", "", truncation=True, max_length=16)["input_ids"]
    assert want == [0, 102, 741, 2, 2, 2]
    assert ours.encode("a b", "", max_length=16) == want
    assert ours.encode("a b", max_length=16) == [0, 102, 741, 2]
