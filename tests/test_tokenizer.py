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
