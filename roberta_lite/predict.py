"""Classify texts with a trained adapter: one JSON line per text with the label name and its probability.

    python -m roberta_lite.predict --adapter weights/adapters/imdb-houlsby "A wonderful film." "Dull."
    python -m roberta_lite.predict --adapter DIR --file reviews.txt      # one text per line
    python -m roberta_lite.predict --adapter DIR --file reviews.jsonl    # {"text": ...} per line
    ... --file -                                                          # texts from stdin

The adapter directory (written by train.py / Model.save_adapter) records its base model, a hub id or a local
directory, so nothing else is needed; `--model` points elsewhere when the base has moved.

From Python:
    from roberta_lite.predict import Predictor
    Predictor("weights/adapters/imdb-houlsby")(["A wonderful film."])  # [{"label": "pos", "probability": ...}]

"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from roberta_lite.formats.native import read_meta
from roberta_lite.model import Model
from roberta_lite.tokenizer import Tokenizer
from roberta_lite.runtime import limit_heap_growth, resolve_base, select_device, select_dtype
from roberta_lite.weights import CheckpointError

# ---------------------------------------------------------------------------------------------- prediction

class Predictor:
    """A base model with a trained adapter loaded, ready to classify batches of texts."""

    def __init__(self, adapter: str | os.PathLike, *, model: str | None = None, device: str = "auto",
                 precision: str = "auto", max_length: int | None = None):
        meta = read_meta(adapter)
        base = model or meta.get("base_model")
        if not base:
            raise CheckpointError(f"{Path(adapter) / 'adapter_config.json'}: no base_model recorded; pass --model")
        root, _ = resolve_base(base)
        self.device = select_device(device)
        self.model = Model.from_pretrained(root, dtype=select_dtype(precision, self.device), device=self.device)
        self.model.load_adapter(adapter)
        self.model.to(self.device).eval()
        self.tokenizer = Tokenizer.from_pretrained(root)
        limit = self.model.config.max_tokens
        if max_length is not None and not 2 <= max_length <= limit:
            raise ValueError(f"--max-length {max_length}: must lie in 2..{limit} for this model")
        self.max_length = max_length or limit

    @torch.inference_mode()
    def __call__(self, texts: list[str], batch_size: int = 32) -> list[dict]:
        """[{"label": name, "probability": p, "probabilities": {name: p, ...}}, ...] in the order of `texts`."""
        seqs = self.tokenizer.encode_batch(list(texts), self.max_length)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # length-sorted batches: little padding
        out: list[dict | None] = [None] * len(seqs)
        pad = self.model.config.pad_id
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            T = max(len(seqs[i]) for i in idx)
            ids = torch.full((len(idx), T), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), T), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, :len(seqs[i])] = torch.tensor(seqs[i])
                mask[row, :len(seqs[i])] = 1
            probs = self.model(ids.to(self.device), mask.to(self.device)).softmax(-1).cpu()
            for row, i in enumerate(idx):
                p = probs[row]
                k = int(p.argmax())
                out[i] = {"label": self.model.labels[k], "probability": round(float(p[k]), 6),
                          "probabilities": {name: round(float(q), 6) for name, q in zip(self.model.labels, p)}}
        return out  # type: ignore[return-value]


def read_texts(path: str) -> list[str]:
    """Texts from a file: JSON Lines ({"text": ...} per line) when it ends in .jsonl/.json or its first line is an
    object, else one text per non-blank line. '-' reads standard input."""
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
    texts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not is_jsonl:
            texts.append(line)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{shown} line {n}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise ValueError(f"{shown} line {n}: expected an object with a string 'text' field")
        texts.append(obj["text"])
    return texts


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _UsageError(message)


class _UsageError(ValueError):
    pass


def main(argv: list[str] | None = None) -> int:
    limit_heap_growth()
    p = _Parser(prog="python -m roberta_lite.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify")
    p.add_argument("--adapter", required=True, help="adapter directory written by train.py (adapter_config.json)")
    p.add_argument("--file", help="a text file (one text per line) or JSONL file ({'text': ...}); '-' for stdin")
    p.add_argument("--model", help="base model directory or hub id (default: the one the adapter records)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="base model precision")
    p.add_argument("--max-length", type=int, help="truncate texts to this many tokens (default: the model's limit)")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass")
    try:
        args = p.parse_args(argv)
        texts = list(args.texts) + (read_texts(args.file) if args.file else [])
        if not texts:
            raise _UsageError("no texts: give them as arguments or with --file")
        if args.batch_size < 1:
            raise _UsageError(f"argument --batch-size: must be at least 1, got {args.batch_size}")
        predictor = Predictor(args.adapter, model=args.model, device=args.device, precision=args.precision,
                              max_length=args.max_length)
        for text, result in zip(texts, predictor(texts, args.batch_size)):
            print(json.dumps({"text": text, **result}, ensure_ascii=False), flush=True)
        return 0
    except _UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
