"""Classify texts with a trained adapter: one JSON line per text with the label name and its probability.

    python -m roberta_lite.predict --adapter weights/adapters/imdb-houlsby "A wonderful film." "Dull."
    python -m roberta_lite.predict --adapter DIR --file reviews.txt      # one text per line
    python -m roberta_lite.predict --adapter DIR --file reviews.jsonl    # {"text": ...} per line
    ... --file -                                                          # texts from stdin
    python -m roberta_lite.predict --adapter A --adapter B TEXT...        # several tasks at once

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

Also home to the small runtime helpers train.py shares: resolve_base (hub id or directory -> files on disk),
select_device (auto: cuda > mps > cpu) and select_dtype (bf16 where the hardware has it).
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
from roberta_lite.weights import CheckpointError, resolve_checkpoint

WEIGHTS_DIR = Path("weights")  # hub downloads land in weights/<hub id>/, relative to the working directory


# ---------------------------------------------------------------------------------------------- runtime helpers

def limit_heap_growth() -> None:
    """Make glibc hand large freed buffers back to the system (Linux; a no-op elsewhere).

    glibc raises its mmap threshold each time a large block is freed, after which the activations of every new
    batch shape are carved from the heap and kept. Evaluating IMDB's 25k test reviews in ~400 length-sorted
    batch shapes with a bf16 base grew a process to 24 GB and an out-of-memory kill. Pinned at 8 MiB, the
    attention and FFN buffers go back to the system after each batch (MiniLM, 40 shapes: 2.0 GB -> 0.8 GB) for
    ~3% of training speed; at 1 MiB the page faults cost 30%."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 8 << 20)  # M_MMAP_THRESHOLD is -3 in glibc's malloc.h
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to pin
        pass


def _complete(d: Path) -> bool:
    has_weights = (d / "model.safetensors").is_file() or (d / "model.safetensors.index.json").is_file()
    has_tok = (d / "tokenizer.json").is_file() or ((d / "vocab.json").is_file() and (d / "merges.txt").is_file())
    return (d / "config.json").is_file() and has_weights and has_tok


def resolve_base(name_or_path: str | os.PathLike, weights_dir: Path = WEIGHTS_DIR) -> tuple[Path, str]:
    """(directory holding the files, the name to record with an adapter).

    A local directory is used as it is and recorded by its absolute path. A hub id (`roberta-base`,
    `FacebookAI/roberta-base`) is looked for in `weights_dir/<id>/` first (so it works offline once fetched),
    else downloaded there through huggingface_hub; it is recorded as the hub id.
    """
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p.resolve(), str(p.resolve())
    name = str(name_or_path)
    local = weights_dir / name  # an absolute or ../ path never names a hub repository: resolve_checkpoint says so
    if not p.is_absolute() and ".." not in p.parts and _complete(local):
        return local.resolve(), name
    root = resolve_checkpoint(name, local_dir=local).resolve()
    if not _complete(root):  # offline, huggingface_hub returns a non-empty local_dir as it is, even half-fetched
        raise FileNotFoundError(f"model {name!r}: {root} is incomplete (it needs config.json, model.safetensors and "
                                f"tokenizer.json or vocab.json + merges.txt); if a download was cut off, run again "
                                f"online to finish it")
    return root, name


def select_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """auto: CUDA (the process's LOCAL_RANK GPU), else Apple MPS, else CPU. ValueError for an unusable name."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU is available (use --device cpu)")
        index = device.index if device.index is not None else local_rank
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"--device {name}: MPS is not available (use --device cpu)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: expected auto, cpu, cuda, cuda:N or mps")
    return device


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 matrix instructions (x86 AVX512-BF16 or AMX, Arm BF16), where a bf16
    frozen base is several times faster than fp32. torch's own capability string ("AVX512") does not say."""
    cap = ""
    with_cap = getattr(torch.backends.cpu, "get_cpu_capability", None)
    if with_cap is not None:
        cap = str(with_cap()).upper()
    if "AMX" in cap or "BF16" in cap:
        return True
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    except OSError:
        pass
    return False


def select_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The frozen base's dtype: bf16 for 'bf16', fp32 for 'fp32'; 'auto' picks bf16 on CUDA GPUs that support it
    and on CPUs with native bf16 instructions, fp32 elsewhere (MPS, older CPUs)."""
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"precision {precision!r}: expected auto, bf16 or fp32")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return torch.float32


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
        if meta.get("base_fingerprint") != first.get("base_fingerprint"):
            raise IncompatibleAdapters(
                f"--adapter {src} was trained on base {meta.get('base_model')!r} (fingerprint "
                f"{meta.get('base_fingerprint')}), --adapter {sources[0]} on {first.get('base_model')!r} (fingerprint "
                f"{first.get('base_fingerprint')}): adapters run together must share one base")
    return first.get("base_model")


class Predictor:
    """A base model with one trained adapter, or several sharing the base, ready to classify batches of texts."""

    def __init__(self, adapter: str | os.PathLike | list[str | os.PathLike], *, model: str | None = None,
                 device: str = "auto", precision: str = "auto", max_length: int | None = None):
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
        self.model = Model.from_pretrained(root, dtype=select_dtype(precision, self.device), device=self.device)
        self.names = []  # the adapters' names in the model, in the order given
        for i, src in enumerate(sources):  # files of one task are often all named "default": number them
            self.model.load_adapter(src, name=f"adapter{i}" if self.several else None)
            self.names.append(self.model.active_adapter)
        self.keys = [str(src) for src in sources]
        self.model.to(self.device).eval()
        self.tokenizer = Tokenizer.from_pretrained(root)
        limit = self.model.config.max_tokens
        if max_length is not None and not 2 <= max_length <= limit:
            raise ValueError(f"--max-length {max_length}: must lie in 2..{limit} for this model")
        self.max_length = max_length or limit

    def __call__(self, texts: list[str], batch_size: int = 32) -> list[dict]:
        """One adapter: [{"label": name, "probability": p, "probabilities": {name: p, ...}}, ...] in the order of
        `texts`. Several: [{adapter argument: that dict, ...}, ...]. `batch_size` counts rows of a forward pass:
        with N adapters, each pass holds batch_size // N texts, each once per adapter."""
        results = self.classify(texts, batch_size)
        return [dict(zip(self.keys, r)) if self.several else r[0] for r in results]

    @torch.inference_mode()
    def classify(self, texts: list[str], batch_size: int = 32) -> list[list[dict]]:
        """For each text, one result dict per adapter (in the order given), all adapters in the same passes."""
        seqs = self.tokenizer.encode_batch(list(texts), self.max_length)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # length-sorted batches: little padding
        out: list[list[dict]] = [[] for _ in seqs]
        pad, n = self.model.config.pad_id, len(self.names)
        per_pass = max(1, batch_size // n)
        for start in range(0, len(order), per_pass):
            idx = order[start:start + per_pass]
            T = max(len(seqs[i]) for i in idx)
            ids = torch.full((len(idx), T), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), T), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, :len(seqs[i])] = torch.tensor(seqs[i])
                mask[row, :len(seqs[i])] = 1
            # every text once per adapter, side by side: rows (text 0, adapter 0), (text 0, adapter 1), ...
            logits = self.model(ids.repeat_interleave(n, 0).to(self.device),
                                mask.repeat_interleave(n, 0).to(self.device), adapter=self.names * len(idx)).cpu()
            for row, i in enumerate(idx):
                out[i] = [self._result(logits[row * n + a], name) for a, name in enumerate(self.names)]
        return out

    def _result(self, logits: torch.Tensor, name: str) -> dict:
        labels = self.model.heads[name].labels
        p = logits[:len(labels)].softmax(-1)  # a mixed batch pads narrower heads with -inf: drop those columns
        k = int(p.argmax())
        return {"label": labels[k], "probability": round(float(p[k]), 6),
                "probabilities": {label: round(float(q), 6) for label, q in zip(labels, p)}}


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
    p.add_argument("--adapter", required=True, action="append",
                   help="adapter directory written by train.py (adapter_config.json); repeat it to run several "
                        "adapters of one base over the texts in the same passes")
    p.add_argument("--file", help="a text file (one text per line) or JSONL file ({'text': ...}); '-' for stdin")
    p.add_argument("--model", help="base model directory or hub id (default: the one the adapter records)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="base model precision")
    p.add_argument("--max-length", type=int, help="truncate texts to this many tokens (default: the model's limit)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="rows per forward pass: texts, or texts x adapters with several adapters")
    try:
        args = p.parse_args(argv)
        texts = list(args.texts) + (read_texts(args.file) if args.file else [])
        if not texts:
            raise _UsageError("no texts: give them as arguments or with --file")
        if args.batch_size < 1:
            raise _UsageError(f"argument --batch-size: must be at least 1, got {args.batch_size}")
        adapter = args.adapter[0] if len(args.adapter) == 1 else args.adapter
        predictor = Predictor(adapter, model=args.model, device=args.device, precision=args.precision,
                              max_length=args.max_length)
        for text, result in zip(texts, predictor(texts, args.batch_size)):
            line = {"text": text, "adapters": result} if predictor.several else {"text": text, **result}
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
