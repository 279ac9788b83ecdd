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


# --------------------------------------------------------------------------------------------------
# Words instead of text (tagging data): transformers' RobertaTokenizerFast(add_prefix_space=True) with
# is_split_into_words=True, ids, word ids and offsets alike

WORD_LISTS = [
    ["Hello", ",", "world", "!"],
    ["@paulwalk", "It", "'s", "the", "view", "from", "where", "I", "'m", "living", "."],
    ["Empire", "State", "Building", "=", "ESB", ".", "#photography", "http://bit.ly/bgCyZ0", "..."],
    ["café", "naïve", "東京", "🎬🍿", "—", "“quotes”", "RT", ":", "lol", "!!!", "10/10", "<3"],
    ["a", "<mask>", "token", "</s>"],  # special-token text inside a word
    [" leading", "trailing ", "in side", "", "\t", "after"],  # spaces kept as given; an empty word gets no token
    [],
    ["The", "film", "drags", "on", "and", "on", ",", "a", "tedious", "exercise", "."] * 50,  # > 512 tokens
]


@pytest.fixture(scope="module")
def reference_words():
    transformers = pytest.importorskip("transformers")
    return transformers.RobertaTokenizerFast.from_pretrained(str(ROBERTA), add_prefix_space=True)


@pytest.mark.parametrize("max_length", [512, 8])
def test_words_parity_with_transformers(ours, reference_words, max_length):
    ref = reference_words(WORD_LISTS, is_split_into_words=True, truncation=True, max_length=max_length,
                          return_offsets_mapping=True)
    got = ours.encode_words(WORD_LISTS, max_length)
    for i, (words, g) in enumerate(zip(WORD_LISTS, got)):
        assert g.ids == ref["input_ids"][i], words[:3]
        assert g.word_ids == ref.word_ids(i), words[:3]
        assert g.offsets == ref["offset_mapping"][i], words[:3]
        full = reference_words(words, is_split_into_words=True)["input_ids"]
        assert g.truncated == (len(full) > max_length)
        assert ours.encode(words, max_length=max_length, is_split_into_words=True) == g.ids
    assert ours.encode_batch(WORD_LISTS, max_length, is_split_into_words=True) == ref["input_ids"]
    assert sum(g.truncated for g in got) == (1 if max_length == 512 else 5)
    ids, mask = ours(WORD_LISTS, max_length=max_length, is_split_into_words=True)
    padded = reference_words(WORD_LISTS, is_split_into_words=True, truncation=True, max_length=max_length,
                             padding=True, return_tensors="pt")
    assert torch.equal(ids, padded["input_ids"]) and torch.equal(mask, padded["attention_mask"])


def test_words_tokenize_with_a_space_before_each(ours):
    """`Hello` as a word is `ĠHello` (20920), not the text-initial `Hello` (31414); `,` is `Ġ,` (2156)."""
    assert ours.encode(["Hello", ",", "world"], is_split_into_words=True) == [0, 20920, 2156, 232, 2]
    assert ours.encode("Hello, world") == [0, 31414, 6, 232, 2]
    one, batch = ours(["Hello", "world"], is_split_into_words=True), ours([["Hello", "world"]], is_split_into_words=True)
    assert torch.equal(one[0], batch[0]) and one[0].tolist() == [[0, 20920, 232, 2]]
    empty = ours.encode_words([[], [""], ["", "a"]])
    assert [e.ids for e in empty] == [[0, 2], [0, 2], [0, 10, 2]]
    assert empty[2].word_ids == [None, 1, None]  # the empty word 0 has no token
    assert ours.encode_words([]) == []
    assert ours([], is_split_into_words=True)[0].tolist() == [[0, 2]]  # one sentence of no words, as transformers


TEXTS_WITH_OFFSETS = [
    "@paulwalk It 's the view from where I 'm living for two weeks . Empire State Building = ESB .",
    "Pxleyes Top 50 Photography Contest Pictures of August 2010 ... http://bit.ly/bgCyZ0 #photography",
    "café naïve 東京 🎬🍿 “quotes” <3",
    "  irregular   spacing,\ttabs\nand newlines  ",
    "",
    "   ",
]


def test_offsets_index_the_original_text(ours, reference_words):
    for text in TEXTS_WITH_OFFSETS:
        e = ours.encode_with_offsets(text)
        words = text.split()
        assert e.ids == ours.encode(words, is_split_into_words=True), text[:20]
        ref = reference_words(words, is_split_into_words=True, return_offsets_mapping=True)
        assert e.word_ids == ref.word_ids()
        starts, position = [], 0
        for w in words:
            position = text.index(w, position)
            starts.append(position)
            position += len(w)
        shifted = [(0, 0) if w is None else (starts[w] + a, starts[w] + b)
                   for w, (a, b) in zip(ref.word_ids(), ref["offset_mapping"])]
        assert e.offsets == shifted, text[:20]
        for w, word in enumerate(words):  # a word's tokens cover exactly the word, in order
            spans = [o for o, i in zip(e.offsets, e.word_ids) if i == w]
            assert text[spans[0][0]:spans[-1][1]] == word
            # in order; the byte pieces of one character (an emoji) share its span
            assert all(a1 <= a2 and b1 <= b2 for (a1, b1), (a2, b2) in zip(spans, spans[1:]))
        if "  " not in text and "\t" not in text and "\n" not in text:  # single spaces: as transformers' text call
            plain = reference_words(text, return_offsets_mapping=True)
            assert e.ids == plain["input_ids"] and e.offsets == plain["offset_mapping"]
    assert ours.encode_with_offsets("") == ours.encode_with_offsets("   ")
    assert ours.encode_with_offsets("   ").ids == [0, 2]
    assert ours.encode_batch_with_offsets(TEXTS_WITH_OFFSETS[:2], 8) == [
        ours.encode_with_offsets(t, 8) for t in TEXTS_WITH_OFFSETS[:2]]
    cut = ours.encode_with_offsets(TEXTS_WITH_OFFSETS[0], 8)
    # 6 tokens of text: @paulwalk is 4, It 1, and the cut falls inside 's, whose ' (13, 14) is kept
    assert cut.truncated and len(cut.ids) == 8 and cut.word_ids[-2] == 2 and cut.offsets[-2] == (13, 14)


def test_word_input_errors(ours):
    with pytest.raises(TypeError, match=r"sentences\[0\] is str, not a list of words"):
        ours.encode_words(["a", "b"])  # one sentence's words where a list of sentences belongs
    with pytest.raises(TypeError, match=r"sentences\[1\]\[0\] is int, not a string"):
        ours.encode_batch([["a"], [3]], is_split_into_words=True)
    with pytest.raises(ValueError, match="pairs of word lists are not supported"):
        ours.encode(["a"], "b", is_split_into_words=True)
    with pytest.raises(ValueError, match="pairs of word lists are not supported"):
        ours([["a"]], [["b"]], is_split_into_words=True)
    with pytest.raises(ValueError, match="max_length=1: must leave room for the 2 special tokens"):
        ours.encode_words([["a"]], 1)
    with pytest.raises(TypeError, match=r"texts\[0\] is list, not a string"):
        ours.encode_batch_with_offsets([["a"]])
