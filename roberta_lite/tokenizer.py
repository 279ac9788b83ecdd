"""Tokenizer: RoBERTa's byte-level BPE (or any `tokenizer.json`) through the Rust `tokenizers` library.

RoBERTa's tokenizer is GPT-2's byte-level BPE plus two special tokens around every text:
`<s> text </s>` (ids 0 and 2 in roberta-base), padding with `<pad>` (id 1). A checkpoint directory carries it
either as one `tokenizer.json` or as the older pair `vocab.json` + `merges.txt`; both load here and give the
same ids as transformers' `RobertaTokenizer(..., truncation=True)`.

Sentence pairs are `<s> A </s></s> B </s>`, encoded by the Rust library exactly as transformers' fast tokenizer
does (it calls the same code): when too long, the longer text is cut first ("longest_first"); when both must be
cut, the budget `max_length - 4` is split in halves, the odd token going to the text that was longer (to the
second on a tie). One deliberate difference: transformers' single-example call `tok(a, "")` treats an empty
second text as no pair at all (`if text_pair` in `_encode_plus`), while its batch call and its slow tokenizer
give `<s> a </s></s></s>`; here an empty second text is always a pair, so one example never depends on how it
was batched.

Words instead of text (`is_split_into_words=True`, for tagging data such as CoNLL): each word is tokenized on its
own with a space before it, as transformers' `RobertaTokenizerFast(add_prefix_space=True)` does, so a word
tokenizes the same wherever it stands in a sentence. Words go to the Rust library as they are: a word with
spaces inside is tokenized like that text would be (one word id for all its tokens), an empty word gets no
token at all, and a word that is a special token's text (`</s>`) is that special token (transformers does the same
in all three). :meth:`Tokenizer.encode_words` also gives which word each token came
from; :meth:`Tokenizer.encode_with_offsets` splits a plain text at whitespace into such words and gives each
token's character span in the original text.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken
from tokenizers import Tokenizer as _RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors

from roberta_lite.weights import resolve_checkpoint

# The padding token under the names the common vocabularies give it (RoBERTa/BPE first, then BERT/WordPiece).
_PAD_TOKENS = ("<pad>", "[PAD]")


@dataclass(frozen=True)
class Encoded:
    """One encoded sequence with where each token came from.

    `word_ids[i]` is the index of the word token `i` belongs to, None for the special tokens (transformers'
    `BatchEncoding.word_ids`); `offsets[i]` is its character span `(start, end)`, `(0, 0)` for the special tokens.
    `truncated` says that tokens were cut at max_length.
    """

    ids: list[int]
    word_ids: list[int | None]
    offsets: list[tuple[int, int]]
    truncated: bool


class Tokenizer:
    """Text -> token ids, with truncation to the model's length and padding to tensors."""

    def __init__(self, tokenizer: _RustTokenizer, source: str = ""):
        self._tok = tokenizer
        # The model pads and truncates itself (per call); a file that asks for fixed padding is overridden.
        self._tok.no_padding()
        self._tok.no_truncation()
        self._words_tok: _RustTokenizer | None = None  # made on first use by _words_tokenizer (0.4 s for roberta-base)
        self.source = source
        self.pad_id = self._find_pad_id()
        # What makes two tokenizers equal: used as a cache key for tokenized datasets.
        self.fingerprint = hashlib.sha256(self._tok.to_str().encode()).hexdigest()

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path) -> "Tokenizer":
        """Load from a checkpoint directory or a hub id (`roberta-base`): tokenizer.json, else vocab.json + merges.txt."""
        root = resolve_checkpoint(name_or_path, what="tokenizer")
        if (root / "tokenizer.json").is_file():
            try:
                return cls(_RustTokenizer.from_file(str(root / "tokenizer.json")), str(name_or_path))
            except Exception as e:  # the Rust library's message says what is wrong, not in which file
                raise ValueError(f"{root / 'tokenizer.json'}: not a valid tokenizer file ({e})") from None
        vocab, merges = root / "vocab.json", root / "merges.txt"
        if vocab.is_file() and merges.is_file():
            return cls(_byte_level_bpe(vocab, merges), str(name_or_path))
        raise FileNotFoundError(f"{root}: no tokenizer found (expected tokenizer.json, or vocab.json + merges.txt)")

    def _find_pad_id(self) -> int:
        for token in _PAD_TOKENS:
            i = self._tok.token_to_id(token)
            if i is not None:
                return i
        raise ValueError(f"{self.source or 'tokenizer'}: no padding token (looked for {', '.join(_PAD_TOKENS)})")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(
        self, text: str | list[str], text_pair: str | None = None, max_length: int = 512, *,
        is_split_into_words: bool = False,
    ) -> list[int]:
        """Ids with the special tokens, cut to `max_length` (the end `</s>` is kept, as transformers does).

        With `is_split_into_words`, `text` is one sentence's list of words.
        """
        if is_split_into_words:
            if text_pair is not None:
                raise ValueError("is_split_into_words takes no text_pair: pairs of word lists are not supported")
            return self.encode_words([text], max_length)[0].ids
        return self.encode_batch([text], max_length, text_pairs=None if text_pair is None else [text_pair])[0]

    def encode_batch(
        self, texts: list[str] | list[list[str]], max_length: int = 512, *, text_pairs: list[str] | None = None,
        is_split_into_words: bool = False,
    ) -> list[list[int]]:
        """Encode many texts (or `(texts[i], text_pairs[i])` pairs) at once; the Rust library uses all cores.

        With `is_split_into_words`, `texts` is a list of sentences, each a list of words.
        """
        if is_split_into_words:
            if text_pairs is not None:
                raise ValueError("is_split_into_words takes no text_pairs: pairs of word lists are not supported")
            return [e.ids for e in self.encode_words(texts, max_length)]
        inputs = _inputs(texts, text_pairs)
        self._truncate(self._tok, max_length, pair=text_pairs is not None)
        return [e.ids for e in self._tok.encode_batch(inputs)]

    def encode_words(self, sentences: list[list[str]], max_length: int = 512) -> list[Encoded]:
        """Encode sentences given as word lists: ids, the word of each token, and offsets within each word.

        Token for token transformers' `RobertaTokenizerFast(add_prefix_space=True)(sentences,
        is_split_into_words=True, truncation=True, return_offsets_mapping=True)`.
        """
        sentences = _word_lists(sentences)
        tok = self._words_tokenizer()
        self._truncate(tok, max_length, pair=False)
        return [_encoded(e) for e in tok.encode_batch(sentences, is_pretokenized=True)]

    def _words_tokenizer(self) -> _RustTokenizer:
        """The same tokenizer with a space added before each word, for word lists (see the module docstring)."""
        if self._words_tok is None:
            self._words_tok = _with_prefix_space(self._tok)
        return self._words_tok

    def encode_with_offsets(self, text: str, max_length: int = 512) -> Encoded:
        """Encode a plain text as its whitespace-separated words, with offsets into `text` itself.

        The ids are those of :meth:`encode_words` on the words (so a text tokenizes as its words did in
        training), `word_ids` count those words, and `text[start:end]` of a token's offsets is the text it covers.
        For text whose words are separated by single spaces, this is token for token transformers'
        `RobertaTokenizerFast(add_prefix_space=True)(text, return_offsets_mapping=True)`.
        """
        return self.encode_batch_with_offsets([text], max_length)[0]

    def encode_batch_with_offsets(self, texts: list[str], max_length: int = 512) -> list[Encoded]:
        """:meth:`encode_with_offsets` for many texts at once."""
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] is {type(t).__name__}, not a string")
        spans = [[m.span() for m in _WORD.finditer(t)] for t in texts]
        encoded = self.encode_words([[t[a:b] for a, b in s] for t, s in zip(texts, spans)], max_length)
        out = []
        for e, word_spans in zip(encoded, spans):
            offsets = [(0, 0) if w is None else (word_spans[w][0] + a, word_spans[w][0] + b)
                       for w, (a, b) in zip(e.word_ids, e.offsets)]
            out.append(Encoded(e.ids, e.word_ids, offsets, e.truncated))
        return out

    def _truncate(self, tok: _RustTokenizer, max_length: int, pair: bool) -> None:
        """Set `tok` to cut at `max_length`, which must leave room for the special tokens."""
        needed = tok.num_special_tokens_to_add(pair)
        if max_length < max(needed, 1):
            what = "a pair" if pair else "a single text"
            raise ValueError(f"max_length={max_length}: must leave room for the {needed} special tokens of {what}")
        tok.enable_truncation(max_length, strategy="longest_first")

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def __call__(
        self, texts: str | list[str] | list[list[str]], text_pairs: str | list[str] | None = None,
        max_length: int = 512, *, is_split_into_words: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode and right-pad to a batch: (input_ids, attention_mask), both int64 of shape (B, T).

        With `is_split_into_words`, `texts` is one list of words or a list of such lists (as in transformers).
        """
        if is_split_into_words:
            if text_pairs is not None:
                raise ValueError("is_split_into_words takes no text_pairs: pairs of word lists are not supported")
            one = isinstance(texts, (list, tuple)) and all(isinstance(w, str) for w in texts)  # [] is one empty sentence
            return self.pad(self.encode_batch([texts] if one else texts, max_length, is_split_into_words=True))
        if isinstance(texts, str):
            texts = [texts]
            text_pairs = [text_pairs] if isinstance(text_pairs, str) else text_pairs
        return self.pad(self.encode_batch(texts, max_length, text_pairs=text_pairs))

    def pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad id lists with `pad_id`; the mask marks real tokens with 1."""
        T = max(map(len, seqs))
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        return ids, mask


# A word of a plain text: what str.split() would give, with its position.
_WORD = re.compile(r"\S+")


def _encoded(e) -> Encoded:
    """Our :class:`Encoded` from the Rust library's `Encoding`."""
    return Encoded(list(e.ids), list(e.word_ids), [tuple(o) for o in e.offsets], len(e.overflowing) > 0)


def _word_lists(sentences: list[list[str]]) -> list[list[str]]:
    """Check that `sentences` is a list of lists of strings (one sentence's word list alone is a TypeError)."""
    if isinstance(sentences, str) or not isinstance(sentences, (list, tuple)):
        raise TypeError(f"sentences must be a list of word lists, got {type(sentences).__name__}")
    out = []
    for i, words in enumerate(sentences):
        if isinstance(words, str) or not isinstance(words, (list, tuple)):
            raise TypeError(f"sentences[{i}] is {type(words).__name__}, not a list of words")
        for j, w in enumerate(words):
            if not isinstance(w, str):
                raise TypeError(f"sentences[{i}][{j}] is {type(w).__name__}, not a string")
        out.append(list(words))
    return out


def _with_prefix_space(tok: _RustTokenizer) -> _RustTokenizer:
    """A copy of `tok` whose byte-level parts add a space before each word, as transformers' RobertaTokenizerFast
    sets them for `add_prefix_space=True` (both the pre-tokenizer and the post-processor, which trims offsets by it).
    A tokenizer without byte-level parts (WordPiece, ...) is copied unchanged."""
    config = json.loads(tok.to_str())
    for part in ("pre_tokenizer", "post_processor"):
        component = config.get(part) or {}
        for c in [component, *component.get("pretokenizers", []), *component.get("processors", [])]:
            if "add_prefix_space" in c:
                c["add_prefix_space"] = True
    return _RustTokenizer.from_str(json.dumps(config))


def _inputs(texts: list[str], text_pairs: list[str] | None) -> list[str] | list[tuple[str, str]]:
    """What the Rust `encode_batch` takes: the texts, or (text, pair) tuples; anything else is a TypeError.

    Checked here because `encode(text, 16)` (the old positional max_length) would otherwise reach Rust as a pair.
    """
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] is {type(t).__name__}, not a string")
    if text_pairs is None:
        return texts
    if isinstance(text_pairs, str) or not isinstance(text_pairs, (list, tuple)):
        raise TypeError(f"text_pairs must be a list of strings (one per text) or None, got {type(text_pairs).__name__}"
                        " (pass max_length by keyword)")
    if len(text_pairs) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(text_pairs)} text_pairs")
    for i, t in enumerate(text_pairs):
        if not isinstance(t, str):
            raise TypeError(f"text_pairs[{i}] is {type(t).__name__}, not a string (pass max_length by keyword)")
    return list(zip(texts, text_pairs))


def _byte_level_bpe(vocab: Path, merges: Path) -> _RustTokenizer:
    """Rebuild RoBERTa's tokenizer from the GPT-2-style pair of files, as transformers' RobertaTokenizer does."""
    try:
        vocab_map = json.loads(vocab.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{vocab}: invalid JSON ({e})") from None
    lines = merges.read_text(encoding="utf-8").splitlines()
    merge_pairs = []
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{merges} line {n}: expected two space-separated symbols, got {line!r}")
        merge_pairs.append((parts[0], parts[1]))
    tok = _RustTokenizer(models.BPE(vocab_map, merge_pairs))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    bos, eos = "<s>", "</s>"
    for t in (bos, eos):
        if t not in vocab_map:
            raise ValueError(f"{vocab}: special token {t} missing from the vocabulary")
    tok.post_processor = processors.RobertaProcessing((eos, vocab_map[eos]), (bos, vocab_map[bos]))
    # `<mask>` swallows the space before it, so "a <mask>" predicts the word with its leading space.
    specials = [AddedToken(t, lstrip=t == "<mask>") for t in ("<s>", "<pad>", "</s>", "<unk>", "<mask>") if t in vocab_map]
    tok.add_special_tokens(specials)
    return tok
