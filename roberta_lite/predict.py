"""Classify or tag texts with a trained adapter: one JSON line per text with the label name and its probability,
or, for a token-classification adapter, the entities found in it.

    python -m roberta_lite.predict --adapter weights/adapters/imdb-houlsby "A wonderful film." "Dull."
    python -m roberta_lite.predict --adapter DIR --file reviews.txt      # one text per line
    python -m roberta_lite.predict --adapter DIR --file reviews.jsonl    # {"text": ...} per line
    ... --file -                                                          # texts from stdin
    python -m roberta_lite.predict --adapter A --adapter B TEXT...        # several tasks at once
    python -m roberta_lite.predict --adapter NLI --pair "A man sleeps." "Nobody is awake."   # sentence pairs
    python -m roberta_lite.predict --adapter NLI --file pairs.jsonl      # {"text": ..., "text_pair": ...}
    python -m roberta_lite.predict --adapter DIR --quantize int8 TEXT... # an int8 base on the CPU (quantize.py)

What a result holds follows the adapter's task: classification {"label", "probability", "probabilities"};
regression {"score"}; multilabel {"labels": every label above 0.5, "probabilities": {label: p, ...}};
token-classification {"entities": [{"type": "person", "text": "Meryl Streep", "start": 10, "end": 22,
"score": 0.97}, ...]}, where text[start:end] is the entity. A text is split into words at whitespace, as the
training files' words were; each word's tag is read at its first token (the label of the largest logit) and
the tags are cut into entities as conlleval does (tagging.entities: an I-x that continues no x begins an entity).
An entity's score is the mean, over its words, of the softmax probability of the tag chosen at the word's first
token. Words past --max-length tokens get no tag (no entity). Token adapters run alone or with other token
adapters, never beside sentence adapters, and take single texts, not pairs.

The adapter directory (written by train.py / Model.save_adapter) records its base model, a hub id or a local
directory, so nothing else is needed; `--model` points elsewhere when the base has moved.

With several adapters (all trained on one base: the same base fingerprint), the base is loaded once and every
adapter runs over every text in the same forward passes (a mixed batch: each text once per adapter); each line
is {"text": ..., "adapters": {A: {"label", "probability", "probabilities"}, B: {...}}}, keyed by the --adapter
arguments as given.

From Python:
    from roberta_lite.predict import Predictor
    Predictor("weights/adapters/imdb-houlsby")(["A wonderful film."])  # [{"label": "pos", "probability": ...}]
    Predictor(["runs/sentiment", "runs/topic"])(["A wonderful film."])  # [{"runs/sentiment": {...}, ...}]

"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from roberta_lite.data import PAD_MULTIPLE, TOKEN_TASK, collate
from roberta_lite.formats.native import read_meta
from roberta_lite.api import Model
from roberta_lite.tagging import entity_spans, first_tokens
from roberta_lite.tokenizer import Tokenizer
from roberta_lite.runtime import base_dtype, limit_heap_growth, resolve_base, select_device
from roberta_lite.weights import CheckpointError

# ---------------------------------------------------------------------------------------------- prediction

class IncompatibleAdapters(ValueError):
    """Adapters that cannot run together: trained on different bases, or the same directory twice."""


def shared_base(sources: list[str | os.PathLike], metas: list[dict]) -> str | None:
    """The base the adapters were trained on (the first one's record), refusing adapters of different bases
    (their recorded fingerprints differ) before any model is loaded."""
    seen: dict[Path, str] = {}
    for src in sources:
        where = Path(src).resolve()
        if where in seen:
            raise IncompatibleAdapters(f"--adapter {src}: the same directory as --adapter {seen[where]}")
        seen[where] = str(src)
    first = metas[0]
    for src, meta in zip(sources[1:], metas[1:]):
        # files of two fingerprint versions (weights.fingerprint) are checked against the model when it loads them
        same_version = meta.get("fingerprint_version", 1) == first.get("fingerprint_version", 1)
        if same_version and meta.get("base_fingerprint") != first.get("base_fingerprint"):
            raise IncompatibleAdapters(
                f"--adapter {src} was trained on base {meta.get('base_model')!r} (fingerprint "
                f"{meta.get('base_fingerprint')}), --adapter {sources[0]} on {first.get('base_model')!r} (fingerprint "
                f"{first.get('base_fingerprint')}): adapters run together must share one base")
    return first.get("base_model")


class Predictor:
    """A base model with one trained adapter, or several sharing the base, ready to classify batches of texts."""

    def __init__(self, adapter: str | os.PathLike | list[str | os.PathLike], *, model: str | None = None,
                 device: str = "auto", precision: str = "auto", max_length: int | None = None,
                 quantize: str | None = None):
        self.several = not isinstance(adapter, (str, os.PathLike))
        sources = list(adapter) if self.several else [adapter]
        if not sources:
            raise ValueError("no adapter given")
        recorded = shared_base(sources, [read_meta(src) for src in sources])  # checked even with --model
        base = model or recorded
        if not base:
            raise CheckpointError(f"{Path(sources[0]) / 'adapter_config.json'}: no base_model recorded; pass --model")
        root, _ = resolve_base(base)
        self.device = select_device(device)
        dtype = base_dtype(precision, self.device, quantize)  # quantize="int8": an int8 base (quantize.py)
        self.model = Model.from_pretrained(root, dtype=dtype, device=self.device)
        self.names = []  # the adapters' names in the model, in the order given
        for i, src in enumerate(sources):  # files of one task are often all named "default": number them
            self.model.load_adapter(src, name=f"adapter{i}" if self.several else None)
            self.names.append(self.model.active_adapter)
        self.keys = [str(src) for src in sources]
        token = [self.model.heads[n].task == TOKEN_TASK for n in self.names]
        if any(token) and not all(token):
            raise IncompatibleAdapters("token-classification adapters cannot run beside sentence adapters in one "
                                       "pass: run them in separate calls")
        self.tags = all(token)  # every adapter tags words: results are entities
        if quantize is not None:
            self.model.quantize(quantize)
        self.model.to(self.device).eval()
        self.tokenizer = Tokenizer.from_pretrained(root)
        limit = self.model.config.max_tokens
        if max_length is not None and not 2 <= max_length <= limit:
            raise ValueError(f"--max-length {max_length}: must lie in 2..{limit} for this model")
        self.max_length = max_length or limit

    def __call__(self, texts: list[str], batch_size: int = 32, text_pairs: list[str] | None = None) -> list[dict]:
        """One adapter: [{"label": name, "probability": p, "probabilities": {name: p, ...}}, ...] in the order of
        `texts`. Several: [{adapter argument: that dict, ...}, ...]. `batch_size` counts rows of a forward pass:
        with N adapters, each pass holds batch_size // N texts, each once per adapter."""
        results = self.classify(texts, batch_size, text_pairs)
        return [dict(zip(self.keys, r)) if self.several else r[0] for r in results]

    @torch.inference_mode()
    def classify(self, texts: list[str], batch_size: int = 32, text_pairs: list[str] | None = None) -> list[list[dict]]:
        """For each text (or pair), one result dict per adapter (in the order given), all adapters in the same
        passes; token adapters give each text's entities."""
        if self.tags:
            if text_pairs is not None:
                raise ValueError("token-classification adapters take single texts, not sentence pairs")
            encoded = self.tokenizer.encode_batch_with_offsets(list(texts), self.max_length)
            return self._passes([e.ids for e in encoded], batch_size, lambda i, name, logits: token_output(
                self.model.heads[name], logits[:len(encoded[i].ids)], texts[i], encoded[i]))
        seqs = self.tokenizer.encode_batch(list(texts), self.max_length, text_pairs=text_pairs)
        return self._passes(seqs, batch_size, lambda i, name, logits: head_output(self.model.heads[name], logits))

    def _passes(self, seqs: list[list[int]], batch_size: int, result) -> list[list[dict]]:
        """result(text index, adapter name, that row's logits) for every text and adapter, in length-sorted
        passes of up to batch_size rows."""
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # length-sorted batches: little padding
        out: list[list[dict]] = [[] for _ in seqs]
        pad, n = self.model.config.pad_id, len(self.names)
        per_pass = max(1, batch_size // n)
        for start in range(0, len(order), per_pass):
            idx = order[start:start + per_pass]
            ids, mask = collate([seqs[i] for i in idx], pad, PAD_MULTIPLE, self.model.config.max_tokens)
            # every text once per adapter, side by side: rows (text 0, adapter 0), (text 0, adapter 1), ...
            logits = self.model(ids.repeat_interleave(n, 0).to(self.device),
                                mask.repeat_interleave(n, 0).to(self.device), adapter=self.names * len(idx))
            logits = logits.float().cpu()
            for row, i in enumerate(idx):
                out[i] = [result(i, name, logits[row * n + a]) for a, name in enumerate(self.names)]
        return out


def head_output(head, logits: torch.Tensor) -> dict:
    """One example's result from its adapter's head and its row of logits (float32, on the CPU), by the head's task:
    classification {"label", "probability", "probabilities"}, regression {"score"}, multilabel {"labels",
    "probabilities"}. A row from a mixed batch may be wider than the head (-inf columns): they are dropped."""
    labels = head.labels
    if head.task == TOKEN_TASK:
        raise ValueError("a token-classification adapter's result needs its text and offsets: token_output")
    logits = logits[:len(labels)]  # a mixed batch pads narrower heads with -inf: drop those columns
    if head.task == "regression":
        return {"score": round(float(logits[0]), 6)}
    if head.task == "multilabel":
        p = logits.sigmoid()
        return {"labels": [label for label, q in zip(labels, p) if q > 0.5],
                "probabilities": {label: round(float(q), 6) for label, q in zip(labels, p)}}
    p = logits.softmax(-1)
    k = int(p.argmax())
    return {"label": labels[k], "probability": round(float(p[k]), 6),
            "probabilities": {label: round(float(q), 6) for label, q in zip(labels, p)}}


def token_output(head, logits: torch.Tensor, text: str, encoded) -> dict:
    """One text's entities from its token adapter's (T, K) logits (its own tokens; float32, on the CPU) and
    `encoded`, the text's Tokenizer.encode_with_offsets: {"entities": [{"type", "text", "start", "end", "score"}]}
    with text[start:end] the entity; the score is the mean over the entity's words of the probability of the tag
    chosen at the word's first token. Columns past the head's labels (a mixed batch's -inf) are dropped."""
    p = logits[:, :len(head.labels)].softmax(-1)
    confidence, label = p.max(-1)
    n_words = 1 + max((w for w in encoded.word_ids if w is not None), default=-1)  # words cut off have no token
    firsts = first_tokens(encoded.word_ids, n_words)
    tags = [head.labels[int(label[i])] for i in firsts]
    spans = entity_spans(text, tags, encoded.word_ids, encoded.offsets, [float(confidence[i]) for i in firsts])
    return {"entities": [{**s, "score": round(s["score"], 6)} for s in spans]}


def read_texts(path: str) -> tuple[list[str], list[str | None]]:
    """(texts, second texts) from a file: JSON Lines ({"text": ..., "text_pair": ... optional} per line) when it
    ends in .jsonl/.json or its first line is an object, else one text per non-blank line (no pairs). '-' reads
    standard input."""
    if path == "-":
        raw, shown = sys.stdin.buffer.read(), "<stdin>"
    else:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"--file {path}: no such file")
        raw, shown = p.read_bytes(), path
    lines = raw.decode("utf-8", errors="replace").lstrip("\ufeff").splitlines()
    first = next((ln for ln in lines if ln.strip()), "")
    is_jsonl = shown.lower().endswith((".jsonl", ".json")) or first.lstrip().startswith("{")
    texts, pairs = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not is_jsonl:
            texts.append(line)
            pairs.append(None)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{shown} line {n}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise ValueError(f"{shown} line {n}: expected an object with a string 'text' field")
        if "text_pair" in obj and not isinstance(obj["text_pair"], str):
            raise ValueError(f"{shown} line {n}: 'text_pair' must be a string")
        texts.append(obj["text"])
        pairs.append(obj.get("text_pair"))
    return texts, pairs


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _UsageError(message)


class _UsageError(ValueError):
    pass


def main(argv: list[str] | None = None) -> int:
    limit_heap_growth()
    p = _Parser(prog="python -m roberta_lite.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify")
    p.add_argument("--adapter", required=True, action="append",
                   help="adapter directory written by train.py (adapter_config.json); repeat it to run several "
                        "adapters of one base over the texts in the same passes")
    p.add_argument("--pair", nargs=2, action="append", default=[], metavar=("TEXT", "TEXT_PAIR"),
                   help="a sentence pair (repeatable), for adapters trained on pairs")
    p.add_argument("--file", help="a text file (one text per line) or JSONL file ({'text': ..., 'text_pair': ...}); "
                                  "'-' for stdin")
    p.add_argument("--model", help="base model directory or hub id (default: the one the adapter records)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="base model precision")
    p.add_argument("--quantize", choices=["int8"], help="run the frozen base in int8 on the CPU (faster; see README)")
    p.add_argument("--max-length", type=int, help="truncate texts to this many tokens (default: the model's limit)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="rows per forward pass: texts, or texts x adapters with several adapters")
    try:
        args = p.parse_args(argv)
        from_file = read_texts(args.file) if args.file else ([], [])
        texts = list(args.texts) + [a for a, _ in args.pair] + from_file[0]
        pairs = [None] * len(args.texts) + [b for _, b in args.pair] + from_file[1]
        if not texts:
            raise _UsageError("no texts: give them as arguments, with --pair or with --file")
        if any(x is None for x in pairs) and any(x is not None for x in pairs):
            raise _UsageError("give either single texts or sentence pairs, not both in one run")
        pairs = None if pairs[0] is None else pairs
        if args.batch_size < 1:
            raise _UsageError(f"argument --batch-size: must be at least 1, got {args.batch_size}")
        adapter = args.adapter[0] if len(args.adapter) == 1 else args.adapter
        predictor = Predictor(adapter, model=args.model, device=args.device, precision=args.precision,
                              max_length=args.max_length, quantize=args.quantize)
        for i, result in enumerate(predictor(texts, args.batch_size, pairs)):
            line = {"text": texts[i], **({"text_pair": pairs[i]} if pairs else {})}
            line.update({"adapters": result} if predictor.several else result)
            print(json.dumps(line, ensure_ascii=False), flush=True)
        return 0
    except (_UsageError, IncompatibleAdapters) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
