"""Tagging data (named entities and the like): reading it, its label list, and tags between words and tokens.

Files are read as sentences of words with one BIO (IOB2) tag each: `O`, `B-type` (a word that begins an entity)
or `I-type` (a word inside one); a type may contain `-` (`B-geo-loc`). Two layouts:

* CoNLL (`.conll`, `.txt`, `.tsv`): one word a line, the word in the first column and its tag in the last,
  separated by tabs (or, on a line without a tab, by spaces); a line of nothing but whitespace ends a sentence;
  `-DOCSTART-` lines are skipped.
* JSONL (`.jsonl`): one sentence a line, `{"tokens": [...], "tags": [...]}`.

A model sees tokens, not words: :func:`align_labels` gives each word's first token the word's label id and every
other token -100 (ignored by the loss), as transformers' token-classification examples do; :func:`word_tags`
reads a prediction back the same way, from each word's first token. :func:`entities` cuts tags into entities as
conlleval does, and :func:`entity_spans` places them in a text by the tokens' character offsets.

Bad data raises a ValueError whose one-line message names the file, the line and the value at fault.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from roberta_lite.tokenizer import Tokenizer

__all__ = [
    "IGNORE",
    "TaggedSentence",
    "TaggedEncodings",
    "TokenTargets",
    "split_tag",
    "read_tagged",
    "read_conll",
    "read_jsonl",
    "label_list",
    "check_labels",
    "first_tokens",
    "align_labels",
    "encode_tagged",
    "word_tags",
    "entities",
    "entity_spans",
]

#: The label of tokens the loss ignores (torch's cross_entropy default `ignore_index`).
IGNORE = -100

CONLL_SUFFIXES = (".conll", ".txt", ".tsv")
JSONL_SUFFIXES = (".jsonl",)


@dataclass(frozen=True)
class TaggedSentence:
    """A sentence's words and their tags, with where they were read: `lines[i]` is word i's line in `path`."""

    words: list[str]
    tags: list[str]
    path: str
    lines: list[int]


def split_tag(tag: str) -> tuple[str, str]:
    """`B-geo-loc` -> ("B", "geo-loc"); `O` -> ("O", ""); anything else is a ValueError."""
    if tag == "O":
        return "O", ""
    prefix, dash, kind = tag.partition("-")
    if prefix not in ("B", "I") or not dash or not kind:
        raise ValueError(f"tag {tag!r} is not O, B-type or I-type")
    return prefix, kind


def _check_tag(tag: object, path: str, line: int) -> str:
    if not isinstance(tag, str):
        raise ValueError(f"{path} line {line}: tag {tag!r} is not a string")
    try:
        split_tag(tag)
    except ValueError as e:
        raise ValueError(f"{path} line {line}: {e}") from None
    return tag


def read_tagged(path: str | Path) -> list[TaggedSentence]:
    """Read a tagging file, CoNLL or JSONL by its suffix."""
    suffix = Path(path).suffix.lower()
    if suffix in CONLL_SUFFIXES:
        return read_conll(path)
    if suffix in JSONL_SUFFIXES:
        return read_jsonl(path)
    raise ValueError(f"{path}: unknown tagging file suffix {suffix!r} (CoNLL: {', '.join(CONLL_SUFFIXES)}; "
                     f"JSONL: {', '.join(JSONL_SUFFIXES)})")


def read_conll(path: str | Path) -> list[TaggedSentence]:
    """Sentences of a CoNLL file: the word in the first column, the tag in the last; blank lines end sentences."""
    sentences: list[TaggedSentence] = []
    words: list[str] = []
    tags: list[str] = []
    lines: list[int] = []

    def end_sentence() -> None:
        if words:
            sentences.append(TaggedSentence(words.copy(), tags.copy(), str(path), lines.copy()))
        words.clear()
        tags.clear()
        lines.clear()

    with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is not part of the first word
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                end_sentence()
                continue
            fields = [c.strip() for c in line.split("\t" if "\t" in line else " ") if c.strip()]
            if fields[0] == "-DOCSTART-":
                end_sentence()
                continue
            if len(fields) < 2:
                raise ValueError(f"{path} line {n}: no tag after the word {fields[0]!r}")
            words.append(fields[0])
            tags.append(_check_tag(fields[-1], str(path), n))
            lines.append(n)
    end_sentence()
    return sentences


def read_jsonl(path: str | Path) -> list[TaggedSentence]:
    """Sentences of a JSONL file, one `{"tokens": [...], "tags": [...]}` a line; blank lines are skipped."""
    sentences = []
    with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is not part of the first word
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n}: invalid JSON ({e})") from None
            if not isinstance(record, dict) or "tokens" not in record or "tags" not in record:
                raise ValueError(f"{path} line {n}: expected an object with \"tokens\" and \"tags\", got {line.strip()[:80]!r}")
            words, tags = record["tokens"], record["tags"]
            if not isinstance(words, list) or not words:
                raise ValueError(f"{path} line {n}: \"tokens\" must be a non-empty list, got {words!r}")
            if not isinstance(tags, list):
                raise ValueError(f"{path} line {n}: \"tags\" must be a list, got {tags!r}")
            if len(tags) != len(words):
                raise ValueError(f"{path} line {n}: {len(words)} tokens but {len(tags)} tags")
            for w in words:
                if not isinstance(w, str) or not w.strip():
                    raise ValueError(f"{path} line {n}: token {w!r} is not a non-blank string (it would get no token)")
            sentences.append(TaggedSentence(list(words), [_check_tag(t, str(path), n) for t in tags], str(path),
                                            [n] * len(words)))
    return sentences


def label_list(sentences: Sequence[TaggedSentence]) -> list[str]:
    """The label names in a fixed order: `O`, then `B-t`, `I-t` for each entity type t seen, types sorted.

    Both tags of a type are labels even when one of them never occurs, so a test set's multi-word entity of a type
    that training only saw in one word is not refused; the order depends only on the set of types.
    """
    kinds = sorted({split_tag(t)[1] for s in sentences for t in s.tags} - {""})
    return ["O"] + [f"{prefix}-{kind}" for kind in kinds for prefix in ("B", "I")]


def check_labels(sentences: Sequence[TaggedSentence], labels: Sequence[str]) -> None:
    """Refuse (ValueError) the first tag in `sentences` that is not in `labels`, the training label list."""
    known = set(labels)
    for s in sentences:
        for tag, line in zip(s.tags, s.lines):
            if tag not in known:
                raise ValueError(f"{s.path} line {line}: tag {tag!r} never seen in training "
                                 f"(labels: {', '.join(labels)})")


def first_tokens(word_ids: Sequence[int | None], n_words: int) -> list[int | None]:
    """Index of each word's first token, None for a word with no token (cut at max_length, or empty)."""
    first: list[int | None] = [None] * n_words
    for i, w in enumerate(word_ids):
        if w is not None and first[w] is None:
            first[w] = i
    return first


def align_labels(word_ids: Sequence[int | None], word_label_ids: Sequence[int]) -> list[int]:
    """Per-token labels: a word's first token gets its label id; its other tokens and special tokens IGNORE."""
    labels = [IGNORE] * len(word_ids)
    for w, i in enumerate(first_tokens(word_ids, len(word_label_ids))):
        if i is not None:
            labels[i] = word_label_ids[w]
    return labels


@dataclass(frozen=True)
class TaggedEncodings:
    """Tokenized tagging data: per sentence the token ids, the token labels (IGNORE where no label) and the word
    of each token; `cut` counts the sentences that were longer than max_length and lost tokens."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    word_ids: list[list[int | None]]
    cut: int


def encode_tagged(tokenizer: Tokenizer, sentences: Sequence[TaggedSentence], labels: Sequence[str],
                  max_length: int = 512) -> TaggedEncodings:
    """Tokenize sentences as words and align their tags (checked against `labels`) to the tokens."""
    check_labels(sentences, labels)
    label_id = {name: i for i, name in enumerate(labels)}
    encoded = tokenizer.encode_words([s.words for s in sentences], max_length)
    return TaggedEncodings(
        input_ids=[e.ids for e in encoded],
        labels=[align_labels(e.word_ids, [label_id[t] for t in s.tags]) for e, s in zip(encoded, sentences)],
        word_ids=[e.word_ids for e in encoded],
        cut=sum(e.truncated for e in encoded),
    )


@dataclass(frozen=True)
class TokenTargets:
    """What training and evaluation of a tagging split need beside the token ids, one entry per sentence: the
    token labels (:func:`align_labels`: IGNORE off each word's first token), each token's word, the true word
    tags, and the label names the ids index."""

    labels: list[list[int]]
    word_ids: list[list[int | None]]
    tags: list[list[str]]
    names: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def word_tags(token_label_ids: Sequence[int], word_ids: Sequence[int | None], n_words: int,
              labels: Sequence[str]) -> list[str]:
    """Each word's tag: the label predicted at its first token; `O` for a word with no token (cut off)."""
    return ["O" if i is None else labels[int(token_label_ids[i])] for i in first_tokens(word_ids, n_words)]


def entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """The entities of one sentence's tags as (type, first word, end word exclusive), conlleval's way.

    `B-x` always begins an entity; `I-x` continues one of type x right before it, and otherwise begins a new one
    (after `O`, at the start, or after an entity of another type).
    """
    found: list[tuple[str, int, int]] = []
    kind, start = "", 0  # the open entity's type ("" when none) and first word
    for i, tag in enumerate(tags):
        prefix, tag_kind = split_tag(tag)
        if kind and (prefix != "I" or tag_kind != kind):
            found.append((kind, start, i))
            kind = ""
        if prefix != "O" and not kind:
            kind, start = tag_kind, i
    if kind:
        found.append((kind, start, len(tags)))
    return found


def entity_spans(text: str, tags: Sequence[str], word_ids: Sequence[int | None],
                 offsets: Sequence[tuple[int, int]], word_scores: Sequence[float] | None = None) -> list[dict]:
    """The entities of one text as `{"type", "text", "start", "end", "score"}`, `text[start:end]` being the entity.

    `word_ids` and `offsets` are those of :meth:`Tokenizer.encode_with_offsets` (offsets into `text`); `tags` has
    one tag per word. An entity's score is the mean of its words' `word_scores` (None without them).
    """
    n_words = len(tags)
    starts: list[int | None] = [None] * n_words
    ends: list[int | None] = [None] * n_words
    for w, (a, b) in zip(word_ids, offsets):
        if w is not None:
            starts[w] = a if starts[w] is None else min(starts[w], a)
            ends[w] = b if ends[w] is None else max(ends[w], b)
    spans = []
    for kind, first, end in entities(tags):
        if starts[first] is None or ends[end - 1] is None:
            raise ValueError(f"entity {kind!r} at words {first}..{end - 1} has a word with no token")
        start, stop = starts[first], ends[end - 1]
        score = None if word_scores is None else float(sum(word_scores[first:end]) / (end - first))
        spans.append({"type": kind, "text": text[start:stop], "start": start, "end": stop, "score": score})
    return spans
