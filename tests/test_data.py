"""Tests for roberta_lite.data: every input format, every user error, downloads, the token cache,
and the batching invariants that training relies on.

Everything is built in ``tmp_path``; the only outside input is the real IMDB archive in ``../shared``,
whose test skips when that folder is absent.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import logging
import random
import socket
import tarfile
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from roberta_lite import data
from roberta_lite.data import (
    IMDB_BYTES,
    IMDB_SHA256,
    IMDB_URL,
    DataError,
    TextDataset,
    cache_dir,
    collate,
    download,
    length_batches,
    load_data,
    padding_fraction,
    shard,
    tokenize_cached,
    train_val_split,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_IMDB = SHARED / "data" / "aclImdb-labelled.tar.gz"

# (split, label, id, rating) -> review bytes. Ids are chosen so that numeric and string order differ.
REVIEWS: dict[tuple[str, str, int, int], bytes] = {
    ("train", "pos", 10, 9): b"Great film.<br /><br />Loved it.",
    ("train", "pos", 2, 8): b"Fine<br/>acting<br>and<BR />music.",
    ("train", "neg", 7, 1): b"Dull.",
    ("train", "neg", 100, 3): b"Too long.",
    ("test", "pos", 1, 10): b"A masterpiece.",
    ("test", "neg", 3, 2): b"Bad caf\xe9 scene.",  # latin-1 byte: not UTF-8
}
TRAIN_ORDER = [("neg", 7), ("neg", 100), ("pos", 2), ("pos", 10)]
JUNK_MEMBERS = {
    "train/unsup/5_0.txt": b"unlabelled",
    "train/labeledBow.feat": b"0:1 1:2",
    "train/urls_pos.txt": b"http://example.com",
    "train/pos/._10_9.txt": b"\x00\x05\x16\x07 macOS metadata",
    "README": b"readme",
    "imdb.vocab": b"the\nand",
}


def review_name(split: str, label: str, rid: int, rating: int) -> str:
    return f"{split}/{label}/{rid}_{rating}.txt"


def make_imdb_archive(path: Path, prefix: str = "aclImdb/", reviews=REVIEWS, junk=JUNK_MEMBERS, seed: int = 1) -> Path:
    """A tar archive in the aclImdb layout with members in a scrambled order."""
    members = [(prefix + review_name(*key), body) for key, body in reviews.items()]
    members += [(prefix + name, body) for name, body in junk.items()]
    random.Random(seed).shuffle(members)
    mode = "w:gz" if path.name.endswith((".gz", ".tgz")) else "w"
    with tarfile.open(path, mode) as archive:
        for folder in ("aclImdb", "aclImdb/train", "aclImdb/train/pos"):  # directory entries are skipped
            if prefix == "aclImdb/" or not folder.startswith("aclImdb"):
                info = tarfile.TarInfo(folder)
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
        for name, body in members:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            archive.addfile(info, io.BytesIO(body))
    return path


def make_imdb_tree(root: Path, reviews=REVIEWS, junk=JUNK_MEMBERS) -> Path:
    for key, body in reviews.items():
        file = root / review_name(*key)
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(body)
    for name, body in junk.items():
        file = root / name
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(body)
    return root


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def data_error(spec: str | Path, test_spec: str | Path | None = None, **kwargs) -> str:
    """The message of the DataError that load_data raises; asserts it is a single line."""
    with pytest.raises(DataError) as info:
        load_data(str(spec), None if test_spec is None else str(test_spec), **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    return message


# --------------------------------------------------------------------------------------------------
# IMDB archives and trees


def check_tiny_imdb(train: TextDataset, test: TextDataset) -> None:
    assert train.label_names == test.label_names == ["neg", "pos"]
    assert [(train.label_names[label], text) for label, text in zip(train.labels, train.texts)] == [
        ("neg", "Dull."),
        ("neg", "Too long."),
        ("pos", "Fine\nacting\nand\nmusic."),
        ("pos", "Great film.\n\nLoved it."),
    ]
    assert test.texts == ["Bad caf\ufffd scene.", "A masterpiece."]
    assert test.labels == [0, 1]
    assert (train.replaced, test.replaced) == (0, 1)


@pytest.mark.parametrize("name", ["aclImdb_v1.tar.gz", "reviews.tgz", "reviews.tar", "no_extension"])
def test_imdb_archive_reads_labelled_reviews_in_sorted_order(tmp_path: Path, name: str) -> None:
    path = make_imdb_archive(tmp_path / name)
    train, test = load_data(str(path))
    check_tiny_imdb(train, test)
    assert train.source == f"{path} (train)" and test.source == f"{path} (test)"


@pytest.mark.parametrize("prefix", ["", "./", "./aclImdb/"])
def test_imdb_archive_without_top_folder(tmp_path: Path, prefix: str) -> None:
    check_tiny_imdb(*load_data(str(make_imdb_archive(tmp_path / "a.tar.gz", prefix=prefix))))


def test_imdb_archive_order_does_not_depend_on_member_order(tmp_path: Path) -> None:
    first = load_data(str(make_imdb_archive(tmp_path / "a.tar.gz", seed=1)))
    second = load_data(str(make_imdb_archive(tmp_path / "b.tar.gz", seed=2)))
    assert [d.texts for d in first] == [d.texts for d in second]


def test_imdb_archive_is_read_without_extracting(tmp_path: Path) -> None:
    path = make_imdb_archive(tmp_path / "a.tar.gz")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    load_data(str(path))
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_imdb_directory_and_its_parent(tmp_path: Path) -> None:
    tree = make_imdb_tree(tmp_path / "aclImdb")
    check_tiny_imdb(*load_data(str(tree)))
    check_tiny_imdb(*load_data(str(tmp_path)))


def test_imdb_spec_downloads_into_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = make_imdb_archive(tmp_path / "src.tar.gz")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    calls = []

    def fake_download(url, dest, *, sha256, size=None):
        calls.append((url, Path(dest), sha256, size))
        return archive

    monkeypatch.setattr(data, "download", fake_download)
    check_tiny_imdb(*load_data("imdb"))
    assert calls == [(IMDB_URL, tmp_path / "xdg" / "roberta_lite" / "aclImdb_v1.tar.gz", IMDB_SHA256, IMDB_BYTES)]


def test_imdb_without_test_split_holds_out_part_of_train(tmp_path: Path) -> None:
    reviews = {key: body for key, body in REVIEWS.items() if key[0] == "train"}
    train, test = load_data(str(make_imdb_archive(tmp_path / "a.tar.gz", reviews=reviews)), test_fraction=0.25)
    assert (len(train), len(test)) == (3, 1)
    expected = ["Dull.", "Fine\nacting\nand\nmusic.", "Great film.\n\nLoved it.", "Too long."]
    assert sorted(train.texts + test.texts) == expected


def test_imdb_without_reviews_is_an_error(tmp_path: Path) -> None:
    archive = make_imdb_archive(tmp_path / "empty.tar.gz", reviews={})
    message = data_error(archive)
    assert message.startswith(f"{archive}: no labelled reviews found (expected aclImdb/train/pos/*.txt")
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    assert data_error(empty_dir).startswith(f"{empty_dir}: no labelled reviews found")


def test_imdb_with_only_test_reviews_is_an_error(tmp_path: Path) -> None:
    reviews = {key: body for key, body in REVIEWS.items() if key[0] == "test"}
    message = data_error(make_imdb_archive(tmp_path / "a.tar.gz", reviews=reviews))
    assert "no labelled training reviews found" in message


def test_corrupt_and_truncated_archives(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(b"this is not an archive" * 100)
    assert data_error(garbage) == f"{garbage}: not a readable tar archive (corrupt or incomplete download?)"

    # A big archive cut in half: the header is fine, the stream ends early.
    many = {("train", "pos" if i % 2 else "neg", i, 7): random.Random(i).randbytes(2000) for i in range(200)}
    whole = make_imdb_archive(tmp_path / "whole.tar.gz", reviews=many, junk={})
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    message = data_error(cut)
    assert str(cut) in message and ("corrupt or truncated" in message or "not a readable tar archive" in message)


# --------------------------------------------------------------------------------------------------
# CSV and JSON Lines


def test_csv_integer_labels_extra_columns_and_multiline_text(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text(
        'id,text,label,note\n'
        '1,"first, with comma",0,x\n'
        '\n'
        '2,"second\nspans two lines",2,y\n'
        '3,third, 2 ,z\n'
        '4,fourth,0,\n',
        encoding="utf-8",
    )
    train, test = load_data(str(path), str(path))  # same file as test split: no held-out part
    assert train.texts == ["first, with comma", "second\nspans two lines", "third", "fourth"]
    assert train.labels == [0, 2, 2, 0]
    assert train.label_names == ["0", "1", "2"]  # class ids as given; the gap stays a class
    assert test.texts == train.texts and test.labels == train.labels


def test_csv_utf8_bom_and_case_insensitive_header(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_bytes("\ufeffText,Label\nhello,pos\nbye,neg\n".encode())
    train, _ = load_data(str(path), str(path))
    assert train.texts == ["hello", "bye"] and train.labels == [1, 0]


def test_tsv(tmp_path: Path) -> None:
    path = tmp_path / "data.tsv"
    path.write_text("label\ttext\nb\tone, two\na\tthree\n", encoding="utf-8")
    train, _ = load_data(str(path), str(path))
    assert train.texts == ["one, two", "three"] and train.labels == [1, 0]


def test_name_labels_are_sorted_alphabetically(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "label": name} for i, name in enumerate(["sports", "arts", "tech", "arts"])]
    train, _ = load_data(str(write_jsonl(tmp_path / "d.jsonl", rows)), str(tmp_path / "d.jsonl"))
    assert train.label_names == ["arts", "sports", "tech"]
    assert train.labels == [1, 0, 2, 0]


def test_jsonl_ints_and_digit_strings_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text(
        '{"text": "a", "label": 1, "extra": [1, 2]}\n\n{"text": "b", "label": "0"}\n  \n{"label": 3, "text": "c"}\n',
        encoding="utf-8",
    )
    train, _ = load_data(str(path), str(path))
    assert train.texts == ["a", "b", "c"] and train.labels == [1, 0, 3]
    assert train.label_names == ["0", "1", "2", "3"]


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path: Path) -> None:
    csv_path = tmp_path / "data.csv"
    csv_path.write_bytes(b"text,label\ncaf\xe9 au lait,0\nplain,1\n\xff\xfe bad start,1\n")
    train, _ = load_data(str(csv_path), str(csv_path))
    assert train.texts == ["caf\ufffd au lait", "plain", "\ufffd\ufffd bad start"]
    assert train.replaced == 2

    jsonl_path = tmp_path / "data.jsonl"
    jsonl_path.write_bytes(
        b'{"text": "na\xefve", "label": 0}\n'
        b'{"text": "fine", "label": 1}\n'
        b'{"text": "broken emoji \\ud83d here", "label": 1}\n'
        b'{"text": "ok", "label": 0, "id": "\xff"}\n'
    )
    train, _ = load_data(str(jsonl_path), str(jsonl_path))
    assert train.texts == ["na\ufffdve", "fine", "broken emoji \ufffd here", "ok"]
    assert train.replaced == 2  # the bad byte in "id" did not touch a text


def test_held_out_test_split_is_seeded_and_disjoint(tmp_path: Path) -> None:
    rows = [{"text": f"review {i}", "label": i % 3} for i in range(50)]
    path = str(write_jsonl(tmp_path / "d.jsonl", rows))
    train, test = load_data(path, seed=3, test_fraction=0.2)
    assert (len(train), len(test)) == (40, 10)
    assert set(train.texts).isdisjoint(test.texts)
    assert sorted(train.texts + test.texts) == sorted(r["text"] for r in rows)
    for ds in (train, test):  # labels still belong to their texts
        assert all(ds.labels[i] == int(t.split()[1]) % 3 for i, t in enumerate(ds.texts))
    assert load_data(path, seed=3)[1].texts == test.texts
    assert load_data(path, seed=4)[1].texts != test.texts
    assert "held-out 20%" in test.source


def test_held_out_split_of_two_examples(tmp_path: Path) -> None:
    path = str(write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1}]))
    train, test = load_data(path, test_fraction=0.01)
    assert (len(train), len(test)) == (1, 1)


def test_test_spec_in_another_format(tmp_path: Path) -> None:
    train_path = tmp_path / "train.csv"
    train_path.write_text("text,label\ngood,pos\nbad,neg\nok,pos\n", encoding="utf-8")
    test_path = write_jsonl(tmp_path / "test.jsonl", [{"text": "meh", "label": "neg"}])
    train, test = load_data(str(train_path), str(test_path))
    assert len(train) == 3 and test.texts == ["meh"] and test.labels == [0]
    assert test.label_names == train.label_names == ["neg", "pos"]


def test_test_spec_replaces_the_official_imdb_test_split(tmp_path: Path) -> None:
    archive = make_imdb_archive(tmp_path / "a.tar.gz")
    test_path = tmp_path / "mine.csv"
    test_path.write_text("text,label\nmine,pos\n", encoding="utf-8")
    train, test = load_data(str(archive), str(test_path))
    assert len(train) == 4 and test.texts == ["mine"] and test.labels == [1]
    # an aclImdb test_spec contributes its test/ reviews
    _, test = load_data(str(archive), str(archive))
    assert test.texts == ["Bad caf\ufffd scene.", "A masterpiece."]


def test_imdb_test_spec_without_test_reviews(tmp_path: Path) -> None:
    reviews = {key: body for key, body in REVIEWS.items() if key[0] == "train"}
    only_train = make_imdb_archive(tmp_path / "only_train.tar.gz", reviews=reviews)
    message = data_error(make_imdb_archive(tmp_path / "a.tar.gz"), only_train)
    assert message.startswith(f"{only_train}: no labelled test reviews found")


# Each case: file name, contents, expected message (exact, with {path} for the file as given).
ERROR_CASES = {
    "no label column": ("data.csv", "text,b\n1,2\n", "{path}: no 'label' column (columns: text, b)"),
    "no columns": ("data.csv", "a,b\n1,2\n", "{path}: no 'text' and no 'label' column (columns: a, b)"),
    "no text column": ("data.csv", "label,body\n1,x\n", "{path}: no 'text' column (columns: label, body)"),
    "empty csv": ("data.csv", "", "{path}: empty file (expected a header row with 'text' and 'label' columns)"),
    "empty text": ("data.csv", "text,label\nfine,0\n  ,1\n", "{path} line 3: empty text in 'text'"),
    "missing label value": (
        "data.csv",
        "text,label\nfine,0\nshort\n",
        "{path} line 3: no 'label' value (the row has 1 fields, the header 2)",
    ),
    "empty label": ("data.csv", "text,label\nfine,0\nx, \n", "{path} line 3: empty label"),
    "mixed labels": (
        "data.csv",
        "text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(5)) + "odd,maybe\nlast,1\n",
        "{path} line 7: label 'maybe' is neither an integer nor a known label name (the other labels in {path} "
        "are integer class ids, e.g. {path} line 2: 0); labels must be all integers or all names",
    ),
    "an integer among names": (
        "data.jsonl",
        '{"text": "a", "label": "pos"}\n{"text": "b", "label": 1}\n{"text": "c", "label": "neg"}\n',
        "{path} line 2: label 1 is an integer but the other labels in {path} are names "
        "(e.g. {path} line 1: 'pos'); labels must be all integers or all names",
    ),
    "negative label": (
        "data.csv",
        "text,label\na,0\nb,-1\n",
        "{path} line 3: label -1 is negative; integer labels are class ids 0, 1, 2, ...",
    ),
    "invalid json": (
        "data.jsonl",
        '{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n{"text": "c" "label": 1}\n',
        "{path} line 3: invalid JSON (Expecting ',' delimiter)",
    ),
    "not an object": (
        "data.jsonl", '{"text": "a", "label": 0}\n["b", 1]\n',
        "{path} line 2: expected a JSON object with 'text' and 'label', got [\"b\", 1]",
    ),
    "json array": (
        "data.json",
        '[\n{"text": "a", "label": 0}\n]\n',
        "{path}: looks like a JSON array; expected JSON Lines (one object per line)",
    ),
    "no text field": (
        "data.jsonl", '{"body": "a", "label": 0}\n', "{path} line 1: no 'text' field (keys: body, label)"
    ),
    "text not a string": ("data.jsonl", '{"text": 5, "label": 0}\n', "{path} line 1: 'text' value 5 is not a string"),
    "bool label": (
        "data.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": true}\n',
        "{path} line 2: label true is a boolean; labels must be integer class ids or label names",
    ),
    "float label": (
        "data.jsonl", '{"text": "a", "label": 1.5}\n',
        "{path} line 1: label 1.5 is a float; labels must be integer class ids or label names",
    ),
    "null label": (
        "data.jsonl", '{"text": "a", "label": null}\n',
        "{path} line 1: label null is null; labels must be integer class ids or label names",
    ),
    "empty jsonl": ("data.jsonl", "\n\n", "{path}: no examples (the file is empty)"),
    "one class": (
        "data.csv", "text,label\na,pos\nb,pos\n",
        "{path}: every training example has label 'pos'; a classifier needs at least two classes",
    ),
    "one example": (
        "data.csv", "text,label\na,1\n",
        "{path}: only 1 example; need at least 2 to hold out a test split (or pass a test file)",
    ),
    "unknown type": (
        "data.parquet", "PAR1",
        "{path}: unsupported data file type; expected 'imdb', an aclImdb directory, a .tar.gz/.tgz/.tar archive in "
        "the aclImdb layout, a .csv/.tsv file with 'text' and 'label' columns, or a .jsonl/.json file of "
        "{{\"text\", \"label\"}} objects",
    ),
}


@pytest.mark.parametrize("case", ERROR_CASES, ids=list(ERROR_CASES))
def test_data_errors_name_file_line_and_value(tmp_path: Path, case: str) -> None:
    name, contents, expected = ERROR_CASES[case]
    path = tmp_path / name
    path.write_text(contents, encoding="utf-8")
    assert data_error(path) == expected.format(path=path)


def test_test_label_unseen_in_training(tmp_path: Path) -> None:
    train_path = tmp_path / "train.csv"
    train_path.write_text("text,label\na,pos\nb,neg\n", encoding="utf-8")
    test_path = write_jsonl(tmp_path / "test.jsonl", [{"text": "c", "label": "pos"}, {"text": "d", "label": "neutral"}])
    message = data_error(train_path, test_path)
    assert message == (
        f"{test_path} line 2: label 'neutral' does not occur in the training data {train_path} (labels: neg, pos)"
    )


def test_test_class_id_beyond_training_classes(tmp_path: Path) -> None:
    train_path = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1}])
    test_path = tmp_path / "test.csv"
    test_path.write_text("text,label\nc,1\nd,5\n", encoding="utf-8")
    message = data_error(train_path, test_path)
    assert message.startswith(f"{test_path} line 3: label 5 does not occur in the training data")


def test_imdb_training_with_integer_test_labels(tmp_path: Path) -> None:
    test_path = tmp_path / "test.csv"
    test_path.write_text("text,label\nc,1\n", encoding="utf-8")
    message = data_error(make_imdb_archive(tmp_path / "a.tar.gz"), test_path)
    assert message.startswith(f"{test_path} line 2: label 1 does not occur in the training data")
    assert message.endswith("(labels: neg, pos)")


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    assert data_error(missing) == f"data path not found: {missing}"
    good = tmp_path / "ok.csv"
    good.write_text("text,label\na,0\nb,1\n", encoding="utf-8")
    assert data_error(good, missing) == f"data path not found: {missing}"


def test_invalid_test_fraction(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,label\na,0\nb,1\n", encoding="utf-8")
    assert "test_fraction must be between 0 and 1" in data_error(path, test_fraction=1.0)


def test_data_error_is_one_line() -> None:
    error = DataError("first\nsecond\r\nthird")
    assert str(error) == "first second  third" and isinstance(error, ValueError)


# --------------------------------------------------------------------------------------------------
# TextDataset and splits


def make_dataset(n: int, classes: int = 2) -> TextDataset:
    texts = [f"text {i}" for i in range(n)]
    return TextDataset(texts, [i % classes for i in range(n)], [str(c) for c in range(classes)], "mem")


def test_text_dataset_len_subset_and_validation() -> None:
    ds = TextDataset(["a", "b\ufffd", "c"], [0, 1, 1], ["neg", "pos"], "mem", replaced=1)
    assert len(ds) == 3
    sub = ds.subset(np.array([2, 1]))
    assert (sub.texts, sub.labels, sub.label_names) == (["c", "b\ufffd"], [1, 1], ["neg", "pos"])
    assert (sub.source, sub.replaced) == ("mem", 1)
    assert ds.subset([0]).replaced == 0
    with pytest.raises(ValueError):
        TextDataset(["a"], [0, 1], ["x", "y"], "mem")
    with pytest.raises(ValueError):
        TextDataset(["a"], [2], ["x", "y"], "mem")


def test_train_val_split_is_seeded_disjoint_and_complete() -> None:
    ds = make_dataset(200)
    train, val = train_val_split(ds, 0.05, seed=1)
    assert (len(train), len(val)) == (190, 10)
    assert set(train.texts).isdisjoint(val.texts) and set(train.texts) | set(val.texts) == set(ds.texts)
    assert all(t == f"text {i}" for t, i in zip(val.texts, sorted(int(t.split()[1]) for t in val.texts)))  # order kept
    again = train_val_split(ds, 0.05, seed=1)
    assert again[1].texts == val.texts and again[0].texts == train.texts
    assert train_val_split(ds, 0.05, seed=2)[1].texts != val.texts
    assert all(val.labels[i] == int(t.split()[1]) % 2 for i, t in enumerate(val.texts))


def test_train_val_split_small_datasets() -> None:
    train, val = train_val_split(make_dataset(2), 0.05)
    assert (len(train), len(val)) == (1, 1)
    train, val = train_val_split(make_dataset(1), 0.05)
    assert (len(train), len(val)) == (1, 0)
    with pytest.raises(DataError):
        train_val_split(make_dataset(10), 0.0)


# --------------------------------------------------------------------------------------------------
# cache_dir and download


def test_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "roberta_lite" and cache_dir().is_dir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert cache_dir() == tmp_path / "home" / ".cache" / "roberta_lite"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == tmp_path / "home" / ".cache" / "roberta_lite" and cache_dir().is_dir()


@pytest.fixture
def http_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str, list[str]]]:
    """A local HTTP server on 127.0.0.1 serving a temp folder; yields (folder, base URL, request log)."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    root = tmp_path / "www"
    root.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self) -> None:
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/aclImdb_v1.tar.gz"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_download_success_then_cached(http_server, tmp_path: Path) -> None:
    root, base, requests = http_server
    payload = random.Random(0).randbytes(3 * (1 << 20) + 17)  # several read chunks
    (root / "file.bin").write_bytes(payload)
    dest = tmp_path / "cache" / "sub" / "file.bin"
    digest = hashlib.sha256(payload).hexdigest()
    assert download(f"{base}/file.bin", dest, sha256=digest, size=len(payload)) == dest
    assert dest.read_bytes() == payload and leftovers(dest.parent) == ["file.bin"]
    assert requests == ["/file.bin"]
    # Already there with the right checksum: no request, even for an unreachable URL.
    assert download(closed_port_url(), dest, sha256=digest.upper()) == dest
    assert requests == ["/file.bin"]


def test_download_replaces_a_corrupt_copy(http_server, tmp_path: Path) -> None:
    root, base, requests = http_server
    (root / "f.bin").write_bytes(b"good data")
    dest = tmp_path / "f.bin"
    dest.write_bytes(b"bad data!")
    download(f"{base}/f.bin", dest, sha256=hashlib.sha256(b"good data").hexdigest())
    assert dest.read_bytes() == b"good data" and requests == ["/f.bin"]


def test_download_checksum_mismatch(http_server, tmp_path: Path) -> None:
    root, base, _ = http_server
    (root / "aclImdb_v1.tar.gz").write_bytes(b"tampered")
    dest = tmp_path / "dl" / "aclImdb_v1.tar.gz"
    with pytest.raises(DataError) as info:
        download(f"{base}/aclImdb_v1.tar.gz", dest, sha256="0" * 64)
    message = str(info.value)
    assert f"downloaded {base}/aclImdb_v1.tar.gz but its sha256 is {hashlib.sha256(b'tampered').hexdigest()}" in message
    assert "--data PATH/aclImdb_v1.tar.gz" in message and "\n" not in message
    assert leftovers(dest.parent) == []  # neither dest nor a temp file


def test_download_size_mismatch(http_server, tmp_path: Path) -> None:
    root, base, _ = http_server
    (root / "f.bin").write_bytes(b"12345")
    dest = tmp_path / "f.bin"
    with pytest.raises(DataError, match=r"got 5 bytes, expected 6.*--data PATH/f\.bin"):
        download(f"{base}/f.bin", dest, sha256=hashlib.sha256(b"12345").hexdigest(), size=6)
    with pytest.raises(DataError, match="larger than the expected 4 bytes"):
        download(f"{base}/f.bin", dest, sha256=hashlib.sha256(b"12345").hexdigest(), size=4)
    assert leftovers(tmp_path) == ["www"]


def test_download_http_error(http_server, tmp_path: Path) -> None:
    _, base, _ = http_server
    with pytest.raises(DataError) as info:
        download(f"{base}/missing.tar.gz", tmp_path / "m.tar.gz", sha256="0" * 64)
    assert str(info.value).startswith(f"could not download {base}/missing.tar.gz (the server answered HTTP 404")
    assert "--data PATH/m.tar.gz" in str(info.value)


def test_download_unreachable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    url = closed_port_url()
    dest = tmp_path / "dl" / "aclImdb_v1.tar.gz"
    with pytest.raises(DataError) as info:
        download(url, dest, sha256=IMDB_SHA256, size=IMDB_BYTES)
    message = str(info.value)
    assert message.startswith(f"could not download {url} (")
    assert message.endswith(
        "you seem to be offline — download it elsewhere and pass the local copy with --data PATH/aclImdb_v1.tar.gz"
    )
    assert "\n" not in message and leftovers(dest.parent) == []


# --------------------------------------------------------------------------------------------------
# Token cache


class FakeTokenizer:
    """Maps each word to a stable id; ``<s>``=0, ``</s>``=2; counts how many texts it encodes."""

    def __init__(self, fingerprint: str = "fake-v1") -> None:
        self.fingerprint = fingerprint
        self.encoded = 0
        self.calls = 0

    def encode_batch(self, texts: list[str], max_length: int) -> list[list[int]]:
        self.calls += 1
        self.encoded += len(texts)
        out = []
        for text in texts:
            words = [3 + int.from_bytes(hashlib.md5(w.encode()).digest()[:2], "little") for w in text.split()]
            out.append(([0] + words)[: max_length - 1] + [2])
        return out


TEXTS = ["the cat sat", "", "a much longer review about a film " * 3, "caf\ufffd", "the cat sat"]


def test_tokenize_cached_hit_returns_identical_arrays(tmp_path: Path) -> None:
    tok = FakeTokenizer()
    first = tokenize_cached(TEXTS, tok, 8, cache=tmp_path)
    assert tok.encoded == len(TEXTS)
    assert [a.dtype for a in first] == [np.int32] * len(TEXTS) and all(a.ndim == 1 for a in first)
    assert [a.tolist() for a in first] == tok.encode_batch(TEXTS, 8)
    assert max(len(a) for a in first) == 8
    assert [p.suffix for p in tmp_path.iterdir()] == [".npz"]  # one file, no temp files

    tok2 = FakeTokenizer()
    second = tokenize_cached(TEXTS, tok2, 8, cache=tmp_path)
    assert tok2.calls == 0
    assert len(second) == len(first)
    assert all(np.array_equal(a, b) and b.dtype == np.int32 for a, b in zip(first, second))


def test_tokenize_cache_key_depends_on_inputs(tmp_path: Path) -> None:
    tok = FakeTokenizer()
    tokenize_cached(TEXTS, tok, 8, cache=tmp_path)
    tokenize_cached(TEXTS, tok, 16, cache=tmp_path)  # other max_length
    tokenize_cached(TEXTS, FakeTokenizer("fake-v2"), 8, cache=tmp_path)  # other tokenizer
    tokenize_cached(["ab", "c"], tok, 8, cache=tmp_path)
    tokenize_cached(["a", "bc"], tok, 8, cache=tmp_path)  # same characters, other texts
    assert len(list(tmp_path.glob("*.npz"))) == 5
    assert len(tokenize_cached(TEXTS, tok, 16, cache=tmp_path)[2]) == 16


def test_tokenize_cache_corrupt_file_is_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tok = FakeTokenizer()
    expected = [a.tolist() for a in tokenize_cached(TEXTS, tok, 8, cache=tmp_path)]
    (path,) = tmp_path.glob("*.npz")
    for damage in (b"garbage", path.read_bytes()[:100], b""):
        path.write_bytes(damage)
        with caplog.at_level(logging.WARNING, logger="roberta_lite.data"):
            got = tokenize_cached(TEXTS, tok, 8, cache=tmp_path)
        assert [a.tolist() for a in got] == expected
        assert "damaged token cache" in caplog.text
        caplog.clear()
        calls = tok.calls
        tokenize_cached(TEXTS, tok, 8, cache=tmp_path)  # rewritten: a hit again
        assert tok.calls == calls


def test_tokenize_cache_wrong_shape_is_rebuilt(tmp_path: Path) -> None:
    tok = FakeTokenizer()
    tokenize_cached(TEXTS, tok, 8, cache=tmp_path)
    (path,) = tmp_path.glob("*.npz")
    np.savez(path.open("wb"), ids=np.zeros(3, np.int32), offsets=np.array([0, 3], np.int64))  # wrong count
    calls = tok.calls
    assert len(tokenize_cached(TEXTS, tok, 8, cache=tmp_path)) == len(TEXTS) and tok.calls > calls


def test_tokenize_cached_chunks_and_default_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(data, "_ENCODE_CHUNK", 3)
    tok = FakeTokenizer()
    texts = [f"text number {i} " + "w " * (i % 7) for i in range(10)]
    got = tokenize_cached(texts, tok, 32)
    assert tok.calls == 4 and [a.tolist() for a in got] == FakeTokenizer().encode_batch(texts, 32)
    assert len(list((tmp_path / "roberta_lite" / "tokens").glob("*.npz"))) == 1
    assert tokenize_cached([], tok, 32) == []


class CountingTokenizer(FakeTokenizer):
    """Cheap stand-in for a real tokenizer on 50k IMDB-sized texts: one id per space."""

    def encode_batch(self, texts: list[str], max_length: int) -> list[list[int]]:
        self.calls += 1
        return [list(range(min(text.count(" "), max_length))) for text in texts]


def test_tokenize_cache_hit_never_tokenizes(tmp_path: Path) -> None:
    """An IMDB-sized cache hit returns the same ids without calling the tokenizer (its speed is the bench's job,
    not a test's: a wall-clock bound fails on a busy machine and proves nothing about correctness)."""
    texts = [f"review {i} " + "word " * (i % 600) for i in range(50_000)]  # IMDB-sized: ~75 MB of text, ~12M ids
    first = tokenize_cached(texts, CountingTokenizer(), 512, cache=tmp_path)
    tok = CountingTokenizer()
    got = tokenize_cached(texts, tok, 512, cache=tmp_path)
    assert tok.calls == 0 and len(got) == 50_000 and len(got[299]) == 301 and len(got[599]) == 512
    assert all(np.array_equal(a, b) for a, b in zip(first, got))


# --------------------------------------------------------------------------------------------------
# Batching


def varied_lengths(n: int = 3000, seed: int = 0) -> list[int]:
    """IMDB-like: many short reviews, a long tail, clipped to 512."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(5.3, 0.7, n), 8, 512).astype(int).tolist()


def assert_partition(batches: list[list[int]], n: int) -> None:
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(n)) and all(batch for batch in batches)


@pytest.mark.parametrize("shuffle", [True, False])
def test_length_batches_fixed_size(shuffle: bool) -> None:
    lengths = varied_lengths()
    batches = length_batches(lengths, batch_size=32, shuffle=shuffle, seed=5)
    assert_partition(batches, len(lengths))
    assert all(len(b) <= 32 for b in batches)
    assert sum(len(b) < 32 for b in batches) <= (len(lengths) // (100 * 32) + 1)  # one short batch per pool


@pytest.mark.parametrize("shuffle", [True, False])
def test_length_batches_token_budget(shuffle: bool) -> None:
    lengths = varied_lengths() + [900, 2000]  # two longer than the budget
    batches = length_batches(lengths, max_tokens=1024, shuffle=shuffle)
    assert_partition(batches, len(lengths))
    for batch in batches:
        assert max(lengths[i] for i in batch) * len(batch) <= 1024 or len(batch) == 1
    assert [len(b) for b in batches if max(lengths[i] for i in b) > 1024] == [1]
    both = length_batches(lengths, batch_size=4, max_tokens=1024, shuffle=shuffle)
    assert_partition(both, len(lengths))
    assert all(len(b) <= 4 and (max(lengths[i] for i in b) * len(b) <= 1024 or len(b) == 1) for b in both)


def test_length_batches_reduce_padding() -> None:
    lengths = varied_lengths()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(lengths)).tolist()
    random_batches = [order[i : i + 32] for i in range(0, len(order), 32)]
    bucketed = length_batches(lengths, batch_size=32, shuffle=True)
    random_padding = padding_fraction(random_batches, lengths)
    bucketed_padding = padding_fraction(bucketed, lengths)
    assert random_padding > 0.3
    assert bucketed_padding < 0.05 and bucketed_padding < random_padding / 5


def test_length_batches_deterministic_per_seed_and_epoch() -> None:
    lengths = varied_lengths()
    a = length_batches(lengths, batch_size=16, shuffle=True, seed=1, epoch=0)
    assert a == length_batches(lengths, batch_size=16, shuffle=True, seed=1, epoch=0)
    assert a != length_batches(lengths, batch_size=16, shuffle=True, seed=1, epoch=1)
    assert a != length_batches(lengths, batch_size=16, shuffle=True, seed=2, epoch=0)
    # seed and epoch are not simply added
    assert length_batches(lengths, batch_size=16, shuffle=True, seed=1, epoch=2) != length_batches(
        lengths, batch_size=16, shuffle=True, seed=2, epoch=1
    )


def test_length_batches_shuffle_the_batch_order() -> None:
    lengths = varied_lengths(500)
    batches = length_batches(lengths, batch_size=8, shuffle=True)  # 63 batches: a single pool
    longest = [max(lengths[i] for i in batch) for batch in batches]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)


def test_length_batches_without_shuffle_are_sorted() -> None:
    lengths = [5, 3, 9, 3, 1, 7, 5]
    batches = length_batches(lengths, batch_size=3, shuffle=False, seed=9, epoch=4)
    assert batches == [[4, 1, 3], [0, 6, 5], [2]]
    assert batches == length_batches(lengths, batch_size=3, shuffle=False)


def test_length_batches_edge_cases() -> None:
    assert length_batches([], batch_size=4, shuffle=True) == []
    assert length_batches([0, 0, 0], max_tokens=2, shuffle=False) == [[0, 1], [2]]  # empty sequences use a row
    for kwargs in ({}, {"batch_size": 0}, {"max_tokens": 0}):
        with pytest.raises(ValueError):
            length_batches([1, 2], shuffle=False, **kwargs)
    with pytest.raises(ValueError):
        length_batches([1, -2], batch_size=2, shuffle=False)


def test_shard_gives_equal_disjoint_shares() -> None:
    batches = [[i] for i in range(11)]
    shares = [shard(batches, rank, 4) for rank in range(4)]
    assert [len(s) for s in shares] == [2, 2, 2, 2]
    flat = [b[0] for s in shares for b in s]
    assert sorted(flat) == list(range(8))  # the last 11 % 4 = 3 batches are dropped
    assert shard(batches, 0, 1) == batches
    assert shard(batches[:3], 2, 4) == []
    for rank, world in ((4, 4), (-1, 4), (0, 0)):
        with pytest.raises(ValueError):
            shard(batches, rank, world)


def test_collate_pads_right_with_mask() -> None:
    seqs = [np.array([5, 6, 7], np.int32), np.array([8], np.int32), np.array([], np.int32)]
    ids, mask = collate(seqs, pad_id=1)
    assert ids.dtype == mask.dtype == torch.int64 and ids.shape == mask.shape == (3, 3)
    assert ids.tolist() == [[5, 6, 7], [8, 1, 1], [1, 1, 1]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    with pytest.raises(ValueError):
        collate([], pad_id=1)


def test_padding_fraction() -> None:
    lengths = [2, 4, 4, 1]
    assert padding_fraction([[0, 1], [2, 3]], lengths) == pytest.approx(1 - 11 / 16)
    assert padding_fraction([[1, 2]], lengths) == 0.0
    assert padding_fraction([], lengths) == 0.0


# --------------------------------------------------------------------------------------------------
# The real IMDB archive


@pytest.mark.skipif(not SHARED_IMDB.is_file(), reason="../shared/data/aclImdb-labelled.tar.gz is not available")
def test_real_imdb_archive() -> None:
    train, test = load_data(str(SHARED_IMDB))
    assert (len(train), len(test)) == (24_996, 24_996)
    assert Counter(train.labels) == {0: 12_498, 1: 12_498}
    assert Counter(test.labels) == {0: 12_500, 1: 12_496}
    assert train.label_names == ["neg", "pos"]
    assert not any("<br" in text.lower() for text in train.texts + test.texts)
    assert all(text.strip() for text in train.texts + test.texts)
    assert train.labels == sorted(train.labels) and test.labels == sorted(test.labels)


def test_padded_length_and_collate_round_up_within_the_limit() -> None:
    assert [data.padded_length(n) for n in (1, 15, 16, 17, 250)] == [16, 16, 16, 32, 256]
    assert data.padded_length(500, 16, limit=511) == 511  # MiniLM's limit is not a multiple of 16
    assert data.padded_length(511, 16, limit=511) == 511 and data.padded_length(7, 1) == 7
    ids, mask = data.collate([np.array([5, 6, 7]), np.array([5])], pad_id=1, multiple=8)
    assert ids.tolist() == [[5, 6, 7] + [1] * 5, [5] + [1] * 7]
    assert mask.sum(1).tolist() == [3, 1] and mask.shape == (2, 8)
    assert data.padding_fraction([[0, 1]], [3, 1], multiple=8) == pytest.approx(1 - 4 / 16)
    with pytest.raises(ValueError, match="multiple"):
        data.padded_length(3, 0)
