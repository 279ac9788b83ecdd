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
