#!/usr/bin/env python3
"""Adapter fine-tuning of a frozen RoBERTa for text classification: data in, trained adapter + metrics out.

    python train.py --data imdb                              # roberta-base + Houlsby adapters on IMDB
    python train.py --data reviews.csv --model ./my-roberta  # any CSV/JSONL/aclImdb data, any local checkpoint
    python train.py --data imdb --resume                     # continue from weights/adapters/imdb-houlsby/checkpoint
    torchrun --nproc_per_node=4 train.py --data imdb         # DistributedDataParallel, one process per GPU
    python -m roberta_lite.predict --adapter weights/adapters/imdb-houlsby "A wonderful film."

The file reads top to bottom: arguments, then small helpers (distributed setup, checkpoints, evaluation), then
`train()`: model files, data, tokens, model, optimizer, the training loop, the final test, the outputs.

Defaults and where they come from (all overridable):
  * --lr 1e-4, --batch-size 32, --epochs 15 with --patience 4 (stop when validation accuracy has not improved for
    4 epochs) are AdapterHub's own IMDB recipe for roberta-base (adapter-hub/efficient-task-transfer,
    run_configs/imdb.json, the training behind AdapterHub/roberta-base-pf-imdb). Houlsby et al. (2019) also train
    with batch size 32 and pick the learning rate from {3e-5, 3e-4, 3e-3} on GLUE and {1e-5 ... 1e-3} elsewhere;
    1e-4 sits in the middle and is the usual adapter learning rate (10x full fine-tuning's 1e-5..3e-5).
  * --warmup 0.1: the learning rate rises linearly over the first 10% of steps, then decays linearly to zero
    (Houlsby et al. 2019, §3.1).
  * --reduction-factor 16 (a 48-wide bottleneck on roberta-base), ReLU for Pfeiffer and swish for Houlsby
    adapters: AdapterHub's SeqBnConfig / DoubleSeqBnConfig defaults.
  * AdamW with weight decay 0.01 on weight matrices only (never biases or LayerNorm), gradient clipping at 1.0
    (BERT's fine-tuning setup, Devlin et al. 2019; transformers' Trainer clips at 1.0 too).
  * --max-length 512: whole reviews (AdapterHub cut at 256; longer context is worth ~0.5-1 point on IMDB).
  * --attention-dropout 0: dropout on the frozen base's attention maps only adds noise where nothing learns, and
    on CPU it forces PyTorch's slow unfused attention; hidden dropout (the checkpoint's 0.1) is kept.
    AdapterHub kept the checkpoint's 0.1 for both; --attention-dropout 0.1 restores that.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from roberta_lite import AdapterConfig, CheckpointError, Config, Model, Tokenizer
from roberta_lite import adapters as A
from roberta_lite import data as D
from roberta_lite import weights as W
from roberta_lite.predict import limit_heap_growth, resolve_base, select_device, select_dtype

CHECKPOINT_FORMAT = "roberta_lite.train-checkpoint/1"
# Flags that only steer this invocation; every other flag defines the training run and must match on --resume.
RUN_CONTROL = {"resume", "output", "save_every", "stop_after_steps", "device", "cache_dir", "test_limit",
               "eval_batch_size", "threads"}


# ---------------------------------------------------------------------------------------------- arguments

class UsageError(ValueError):
    """A bad command line: printed as one `error:` line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the whole usage text; one line is enough
        raise UsageError(message)


class _Help(argparse.HelpFormatter):
    def _get_help_string(self, action):  # "(default: X)" where there is one and the help does not say it
        shown = action.default not in (None, False, argparse.SUPPRESS) and "default" not in (action.help or "")
        return (action.help or "") + (" (default: %(default)s)" if shown else "")


def _int_at_least(lo: int):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {v}")
        return v
    return parse


def _float_in(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
            lo_b, hi_b = "(" if lo_open else "[", ")" if hi_open else "]"
            raise argparse.ArgumentTypeError(f"must lie in {lo_b}{lo:g}, {hi:g}{hi_b}, got {s}")
        return v
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description="Train a bottleneck adapter + classifier head on a frozen RoBERTa.", allow_abbrev=False,
                formatter_class=_Help)
    g = p.add_argument_group("data")
    g.add_argument("--data", help="'imdb' (the official archive, downloaded once into the cache), an aclImdb "
                   "archive or directory, or a .csv/.tsv/.jsonl file with 'text' and 'label' "
                   "(required unless --resume)")
    g.add_argument("--test-data", help="test split for a CSV/JSONL --data (default: a seeded held-out part of it)")
    g.add_argument("--test-fraction", type=_float_in(0, 1, True, True), default=0.2,
                   help="share of a CSV/JSONL file held out as test data when there is no --test-data")
    g.add_argument("--val-fraction", type=_float_in(0, 1, True, True), default=0.05,
                   help="share of the training data held out for choosing the best epoch")
    g.add_argument("--limit", type=_int_at_least(2), help="train on a seeded random N of the training examples")
    g.add_argument("--test-limit", type=_int_at_least(1), help="test on a seeded random N of the test examples")
    g.add_argument("--max-length", type=_int_at_least(2),
                   help="truncate texts to this many tokens (default: 512, or the model's limit if smaller)")
    g.add_argument("--cache-dir", help="where tokenized data is cached (default: the roberta_lite cache's tokens/)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="roberta-base", help="base checkpoint: a local directory or a Hugging Face "
                   "hub id (downloaded into weights/<id>/ and reused offline)")
    g.add_argument("--adapter", choices=A.BOTTLENECK_KINDS, default="houlsby",
                   help="houlsby: adapters after attention and FFN; pfeiffer: after the FFN only")
    g.add_argument("--reduction-factor", type=_int_at_least(1), default=16,
                   help="adapter bottleneck = hidden size / this")
    g.add_argument("--activation", choices=sorted(A.ACTIVATIONS),
                   help="adapter non-linearity (default: swish for houlsby, relu for pfeiffer, as AdapterHub)")
    g.add_argument("--dropout", type=_float_in(0, 1, hi_open=True),
                   help="hidden-state dropout (default: the checkpoint's, 0.1 for roberta-base)")
    g.add_argument("--attention-dropout", type=_float_in(0, 1, hi_open=True), default=0.0,
                   help="dropout on the frozen base's attention probabilities")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=_int_at_least(1), default=15, help="passes over the training data")
    g.add_argument("--patience", type=_int_at_least(0), default=4,
                   help="stop when validation accuracy has not improved for this many epochs (0: never)")
    g.add_argument("--batch-size", type=_int_at_least(1), default=32, help="examples per step (per process)")
    g.add_argument("--max-tokens", type=_int_at_least(1), default=None,
                   help="also cap each batch at this many padded tokens (examples x longest), so batches of "
                        "long texts shrink instead of running out of memory (default: no cap)")
    g.add_argument("--lr", type=_float_in(0, 1, lo_open=True), default=1e-4, help="peak learning rate")
    g.add_argument("--warmup", type=_float_in(0, 1, hi_open=True), default=0.1,
                   help="share of the steps over which the learning rate rises linearly from 0")
    g.add_argument("--weight-decay", type=_float_in(0, 10), default=0.01, help="AdamW decay, on matrices only")
    g.add_argument("--clip", type=_float_in(0, 1e9), default=1.0, help="gradient norm clipping (0: off)")
    g.add_argument("--seed", type=_int_at_least(0), default=0, help="seeds initialisation, splits, order, dropout")
    g = p.add_argument_group("running")
    g.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="frozen base precision; auto: bf16 on CUDA and on CPUs with AVX512-BF16/AMX, else fp32")
    g.add_argument("--threads", type=_int_at_least(1),
                   help="CPU threads per process (default: torch's choice; torchrun sets 1 per process)")
    g.add_argument("--eval-batch-size", type=_int_at_least(1), default=64, help="examples per evaluation batch")
    g.add_argument("--output", help="output directory (default: weights/adapters/<data>-<adapter>/)")
    g.add_argument("--save-every", type=_int_at_least(1),
                   help="also write OUTPUT/checkpoint/ every N steps (it is always written at each epoch's end)")
    g.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint/")
    g.add_argument("--stop-after-steps", type=_int_at_least(1), help=argparse.SUPPRESS)  # tests: a clean stop
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def default_output(data: str, adapter: str) -> Path:
    name = "imdb" if data == "imdb" else re.sub(r"(\.tar)?\.(gz|tgz|bz2|xz|tar|csv|tsv|jsonl|json)$", "",
                                                  Path(data.rstrip("/\\")).name) or "data"
    return Path("weights") / "adapters" / f"{name}-{adapter}"


# ---------------------------------------------------------------------------------------------- helpers

def setup_distributed(device_arg: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun (WORLD_SIZE > 1) this joins the process group: NCCL on CUDA,
    gloo on CPU; each process takes the GPU of its LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    try:
        device = select_device(device_arg, local_rank)
    except ValueError as e:
        raise UsageError(f"argument {e}") from None
    if world > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def barrier(world: int):
    if world > 1:
        torch.distributed.barrier()


def all_reduce_sum(values: list[float], device: torch.device, world: int) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64 if device.type != "mps" else torch.float32, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warmup to `peak` over `warmup` steps, then linear decay to 0 at `total` (Houlsby et al. 2019)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (total - step) / max(1, total - warmup))


def dropout_seed(seed: int, rank: int, step: int) -> int:
    """The RNG seed of one training step on one rank. Reseeding every step makes dropout a function of
    (seed, rank, step) alone, so a resumed run draws exactly the masks the uninterrupted one would have."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0] >> 1)


def fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class StopRequest:
    """Ctrl-C / SIGTERM ask the loop to stop after the current step and write a checkpoint; a second Ctrl-C
    aborts at once. Handlers are installed only in the main thread and restored on exit."""

    def __init__(self, verbose: bool):
        self.signum: int | None = None
        self.verbose = verbose
        self._old = {}

    def _handler(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if self.verbose:
            print(f"\n{signal.Signals(signum).name}: stopping after this step and writing a checkpoint "
                  f"(Ctrl-C again to abort without one)", file=sys.stderr, flush=True)

    def __enter__(self):
        if hasattr(signal, "SIGTERM") and threading_is_main():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ------------------------------------------------------------------------- checkpoints (never pickled)
#
# OUTPUT/checkpoint/ holds trainable.safetensors (adapters + head), optimizer.safetensors (AdamW moments by
# parameter name), best.safetensors (the best epoch's weights so far) and state.json (step, data position,
# learning-rate schedule, RNG states, history, configuration, and the sha256 of each tensor file).
# It is written as checkpoint.tmp-PID/, then swapped in by two renames: checkpoint -> checkpoint.old-PID,
# checkpoint.tmp-PID -> checkpoint, and only then is the old one deleted. A kill -9 at any moment therefore
# leaves a complete checkpoint/ or (between the renames) a complete checkpoint.old-PID/, which load_checkpoint
# falls back to; every file is verified against its recorded hash before use.

def _fsync_dir(path: Path):
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_file(path: Path, data: bytes):
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(output: Path, tensors: dict[str, dict[str, torch.Tensor]], state: dict) -> Path:
    from safetensors.torch import save

    final = output / "checkpoint"
    if final.is_dir():  # leftovers of a killed run are stale only while a complete checkpoint/ exists
        for stale in list(output.glob("checkpoint.tmp-*")) + list(output.glob("checkpoint.old-*")):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = output / f"checkpoint.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = dict(state, format=CHECKPOINT_FORMAT, files={})
    for name, tdict in tensors.items():
        blob = save({k: v.detach().to("cpu").contiguous() for k, v in tdict.items()})
        _write_file(tmp / f"{name}.safetensors", blob)
        state["files"][f"{name}.safetensors"] = hashlib.sha256(blob).hexdigest()
    _write_file(tmp / "state.json", (json.dumps(state, indent=1) + "\n").encode())
    _fsync_dir(tmp)
    if final.is_dir():
        old = output / f"checkpoint.old-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
        _fsync_dir(output)
    return final


def _read_checkpoint_dir(d: Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    from safetensors.torch import load

    try:
        state = json.loads((d / "state.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{d / 'state.json'}: unreadable ({e})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{d / 'state.json'}: not a {CHECKPOINT_FORMAT} checkpoint")
    tensors = {}
    for fname, digest in state.get("files", {}).items():
        try:
            blob = (d / fname).read_bytes()
        except OSError as e:
            raise CheckpointError(f"{d / fname}: unreadable ({e.strerror or e})") from None
        if hashlib.sha256(blob).hexdigest() != digest:
            raise CheckpointError(f"{d / fname}: contents do not match the checksum in state.json")
        tensors[fname.removesuffix(".safetensors")] = load(blob)
    return state, tensors


def load_checkpoint(output: Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]], Path]:
    """The newest complete checkpoint in `output`: checkpoint/, else one left mid-swap by a kill."""
    candidates = [output / "checkpoint"] + sorted(output.glob("checkpoint.old-*"))
    errors = []
    found = []
    for d in candidates:
        if not d.is_dir():
            continue
        try:
            state, tensors = _read_checkpoint_dir(d)
        except CheckpointError as e:
            errors.append(str(e))
            continue
        found.append((state.get("step", -1), d == candidates[0], state, tensors, d))
    if not found:
        why = f" ({errors[0]})" if errors else ""
        raise CheckpointError(f"--resume: no loadable checkpoint in {output}{why}; expected {output / 'checkpoint'}/ "
                              f"written by --save-every, at an epoch's end, or on Ctrl-C")
    _, _, state, tensors, d = max(found, key=lambda f: (f[0], f[1]))
    return state, tensors, d


def _rng_b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _rng_from_b64(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())


def optimizer_tensors(opt: torch.optim.Optimizer, names: dict[int, str]) -> tuple[dict, dict]:
    """AdamW state as {name.exp_avg: tensor, ...} plus JSON-able per-parameter step counts."""
    tensors, steps = {}, {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if not st:
                continue
            name = names[id(p)]
            tensors[f"{name}.exp_avg"] = st["exp_avg"]
            tensors[f"{name}.exp_avg_sq"] = st["exp_avg_sq"]
            steps[name] = float(st["step"])
    return tensors, steps


def restore_optimizer(opt: torch.optim.Optimizer, names: dict[int, str], tensors: dict, steps: dict, where: Path):
    for group in opt.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            if name not in steps:
                continue
            try:
                m, v = tensors[f"{name}.exp_avg"], tensors[f"{name}.exp_avg_sq"]
            except KeyError:
                raise CheckpointError(f"{where}: optimizer state of {name!r} is incomplete") from None
            if m.shape != p.shape:
                raise CheckpointError(f"{where}: optimizer state of {name!r} has shape {tuple(m.shape)}, "
                                      f"the parameter {tuple(p.shape)}")
            opt.state[p] = {"step": torch.tensor(steps[name], dtype=torch.float32),
                            "exp_avg": m.to(p.device, p.dtype).clone(), "exp_avg_sq": v.to(p.device, p.dtype).clone()}


def load_trainable(model: Model, tensors: dict[str, torch.Tensor], where: Path):
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(tensors):
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise CheckpointError(f"{where}: adapter/head tensors do not match this model "
                              f"(missing {missing[:3]}, unexpected {extra[:3]})")
    with torch.no_grad():
        for n, p in params.items():
            if p.shape != tensors[n].shape:
                raise CheckpointError(f"{where}: {n!r} has shape {tuple(tensors[n].shape)}, expected {tuple(p.shape)}")
            p.copy_(tensors[n])


def trainable_state(model: Model) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------- evaluation

def _fused_if_supported(device: torch.device) -> dict:
    """AdamW's fused kernel: one pass over all parameters instead of a dozen small ops per tensor."""
    return {"fused": True} if device.type in ("cuda", "cpu") else {}


@torch.inference_mode()
def evaluate(model: Model, seqs: list[np.ndarray], labels: list[int], *, batch_size: int, pad_id: int,
             device: torch.device, rank: int, world: int, desc: str) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) over every example; length-sorted batches, split across ranks."""
    was_training = model.training
    model.eval()
    batches = D.length_batches([len(s) for s in seqs], batch_size=batch_size, shuffle=False)[rank::world]
    y_all = torch.tensor(labels, dtype=torch.long)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for batch in tqdm(batches, desc=desc, leave=False, disable=rank != 0, unit="batch"):
        ids, mask = D.collate([seqs[i] for i in batch], pad_id)
        y = y_all[batch].to(device)
        logits = model(ids.to(device), mask.to(device))
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        correct += (logits.argmax(-1) == y).sum()
    loss, right = all_reduce_sum([loss_sum.item(), float(correct.item())], device, world)
    model.train(was_training)
    return right / len(seqs), loss / len(seqs)


def plot_curves(output: Path, log_path: Path, epochs: list[dict]) -> bool:
    """curves.png: training loss per step and validation accuracy per epoch (needs matplotlib)."""
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=0.5)
    a.set(xlabel="step", ylabel="training loss", yscale="log")
    b.plot([e["epoch"] for e in epochs], [e["val_accuracy"] for e in epochs], marker="o")
    b.set(xlabel="epoch", ylabel="validation accuracy")
    b.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(output / "curves.png", dpi=120)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------- training

def train(args: argparse.Namespace, argv: list[str] | None) -> int:
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = setup_distributed(args.device)
    main_process = rank == 0
    say = print if main_process else (lambda *a, **k: None)

    # --- where things go; on --resume the checkpoint's configuration is the run's configuration
    if args.data is None and not (args.resume and args.output):
        raise UsageError("--data is required (or --resume with --output DIR)")
    output = Path(args.output) if args.output else default_output(args.data, args.adapter)
    resume_state, resume_tensors, resume_dir = None, None, None
    if not args.resume and [d for d in [output / "checkpoint", *output.glob("checkpoint.old-*")] if d.is_dir()]:
        raise CheckpointError(f"{output / 'checkpoint'}/ holds an unfinished run: continue it with --resume, or "
                              f"delete it (or choose another --output) to start over")
    if args.resume:
        resume_state, resume_tensors, resume_dir = load_checkpoint(output)
        saved = resume_state["config"]
        parser = build_parser()
        parser.set_defaults(**{k: v for k, v in saved.items() if k not in RUN_CONTROL})
        args = parser.parse_args(argv)
        for k, v in saved.items():
            if k not in RUN_CONTROL and getattr(args, k, v) != v:
                raise UsageError(f"--resume: --{k.replace('_', '-')} {getattr(args, k)} differs from the "
                                 f"checkpoint's {v}; drop it to continue the run as it was started")
        if resume_state["world_size"] != world:
            raise UsageError(f"--resume: the checkpoint was written by {resume_state['world_size']} processes, "
                             f"this run has {world}; resume with the same number")
    activation = args.activation or ("swish" if args.adapter == "houlsby" else "relu")
    dtype = select_dtype(args.precision, device)
    config = {k: v for k, v in vars(args).items() if k not in RUN_CONTROL}

    # --- the base model's files (downloaded once into weights/<id>/), checked before any long work
    if main_process:
        base_dir, base_name = resolve_base(args.model)
    barrier(world)
    if not main_process:
        base_dir, base_name = resolve_base(args.model)
    arch = Config.from_hf(W.read_config(base_dir), source=str(base_dir / "config.json"))
    if args.max_length is None:
        args.max_length = config["max_length"] = min(512, arch.max_tokens)
    if args.max_length > arch.max_tokens:
        raise UsageError(f"argument --max-length: {args.max_length} exceeds the model's limit of {arch.max_tokens} "
                         f"tokens (max_position_embeddings {arch.max_positions} in {base_dir / 'config.json'})")

    # --- data: train / validation (for choosing the epoch) / test (used once, at the end)
    t0 = time.perf_counter()
    train_ds, test_ds = D.load_data(args.data, args.test_data, seed=args.seed, test_fraction=args.test_fraction)
    label_names = list(train_ds.label_names)
    replaced = train_ds.replaced + test_ds.replaced
    full_train, full_test = len(train_ds), len(test_ds)
    def sample(ds: D.TextDataset, n: int | None, stream: int) -> D.TextDataset:
        """A seeded random n of ds (IMDB's reviews are sorted by label, so never the first n)."""
        if not n or n >= len(ds):
            return ds
        return ds.subset(sorted(np.random.default_rng([args.seed, stream]).permutation(len(ds))[:n]))

    train_ds, test_ds = sample(train_ds, args.limit, 1), sample(test_ds, args.test_limit, 2)
    if len(train_ds) < 2:
        raise D.DataError(f"{args.data}: {len(train_ds)} training example; need at least 2 (one for validation)")
    train_ds, val_ds = D.train_val_split(train_ds, args.val_fraction, seed=args.seed)
    say(f"data: {len(train_ds):,} train, {len(val_ds):,} validation, {len(test_ds):,} test "
        f"(of {full_train:,} + {full_test:,}; labels {', '.join(label_names)}) from {train_ds.source} "
        f"in {time.perf_counter() - t0:.1f}s")
    if replaced:
        say(f"note: {replaced} text(s) contained bytes that are not valid UTF-8; they were replaced by U+FFFD")

    # --- tokens, cached on disk by tokenizer + texts + max length (rank 0 fills the cache, the others read it)
    tokenizer = Tokenizer.from_pretrained(base_dir)
    cache = Path(args.cache_dir) if args.cache_dir else None
    t0 = time.perf_counter()
    splits = {}
    for turn in (0, 1):
        if (turn == 0) == main_process:
            splits = {name: D.tokenize_cached(ds.texts, tokenizer, args.max_length, cache=cache)
                      for name, ds in (("train", train_ds), ("val", val_ds), ("test", test_ds))}
        if turn == 0:
            barrier(world)
    train_tok, val_tok, test_tok = splits["train"], splits["val"], splits["test"]
    lengths = [len(s) for s in train_tok]
    say(f"tokens: {sum(lengths):,} in training texts, mean {np.mean(lengths):.0f}, "
        f"{100 * np.mean(np.array(lengths) >= args.max_length):.1f}% cut at {args.max_length} "
        f"({time.perf_counter() - t0:.1f}s)")

    # --- model: frozen base (bf16 on the fast path), fp32 adapters + head
    torch.manual_seed(args.seed)  # the fresh adapters and head: identical on every rank
    model = Model.from_pretrained(base_dir, num_labels=len(label_names), dtype=dtype, device=device,
                                  adapter=AdapterConfig(args.adapter, args.reduction_factor, activation))
    model.set_dropout(hidden=args.dropout, attention=args.attention_dropout)
    model.set_num_labels(len(label_names), label_names)  # always a fresh head (never a checkpoint's classifier)
    model.name_or_path = base_name  # what the adapter records: a hub id, or an absolute directory
    summary = model.freeze_base()
    pad_id = model.config.pad_id
    if tokenizer.pad_id != pad_id:
        say(f"warning: the tokenizer pads with id {tokenizer.pad_id}, config.json says pad_token_id {pad_id}; "
            f"using {pad_id}")
    say(f"model: {base_name} ({arch.num_layers} layers, hidden {arch.hidden_size}) + {args.adapter} adapters "
        f"(reduction {args.reduction_factor}, {activation}); {summary}")
    say(f"device: {device}, base precision {str(dtype).removeprefix('torch.')}, "
        f"{world} process{'es' if world > 1 else ''}, {torch.get_num_threads()} CPU threads each")

    # --- optimizer: AdamW, weight decay on matrices only; schedule: linear warmup, linear decay
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    param_names = {id(p): n for n, p in named}
    opt = torch.optim.AdamW([{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": args.weight_decay},
                             {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.999), eps=1e-8, **_fused_if_supported(device))

    def epoch_batches(epoch: int) -> list[list[int]]:
        batches = D.length_batches(lengths, batch_size=args.batch_size, max_tokens=args.max_tokens, shuffle=True,
                                   seed=args.seed, epoch=epoch)
        return D.shard(batches, rank, world)

    steps_per_epoch = len(epoch_batches(0))
    if steps_per_epoch == 0:
        raise D.DataError(f"{args.data}: {len(train_ds)} training examples make fewer batches than the "
                          f"{world} processes; use more data or fewer processes")
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = int(args.warmup * total_steps)
    pad_frac = D.padding_fraction(epoch_batches(0), lengths)

    # --- training state, fresh or from the checkpoint
    step, epoch, batch_in_epoch, last_epoch = 0, 0, 0, args.epochs
    history: list[dict] = []
    best = {"val_accuracy": -1.0, "epoch": None, "since": 0}
    best_weights = trainable_state(model)
    epoch_loss, epoch_steps = 0.0, 0
    tokens_done, train_seconds, wall_before = 0, 0.0, 0.0
    log_path = output / "log.jsonl"
    if resume_state is not None:
        load_trainable(model, resume_tensors["trainable"], resume_dir)
        restore_optimizer(opt, param_names, resume_tensors["optimizer"], resume_state["optimizer_steps"], resume_dir)
        best_weights = resume_tensors["best"]
        s = resume_state
        step, epoch, batch_in_epoch, last_epoch = s["step"], s["epoch"], s["batch_in_epoch"], s["last_epoch"]
        history, best = s["history"], s["best"]
        epoch_loss, epoch_steps = s["epoch_loss"], s["epoch_steps"]
        tokens_done, train_seconds, wall_before = s["tokens"], s["train_seconds"], s["wall_seconds"]
        torch.set_rng_state(_rng_from_b64(s["rng"]["torch"]))
        if device.type == "cuda" and s["rng"].get("cuda"):
            torch.cuda.set_rng_state(_rng_from_b64(s["rng"]["cuda"]), device)
        say(f"resumed from {resume_dir} at step {step} (epoch {epoch + 1}, batch {batch_in_epoch})")
    resumed_from = step if resume_state is not None else None
    if main_process:
        output.mkdir(parents=True, exist_ok=True)
        if log_path.exists():  # drop steps logged after the checkpoint we continue from (or a previous run's)
            keep = [ln for ln in log_path.read_text().splitlines()
                    if ln.strip() and resume_state is not None and json.loads(ln)["step"] <= step]
            W.atomic_write(log_path, "".join(ln + "\n" for ln in keep).encode())

    def checkpoint() -> Path | None:
        if not main_process:
            return None
        opt_t, opt_steps = optimizer_tensors(opt, param_names)
        rng = {"torch": _rng_b64(torch.get_rng_state()),
               "cuda": _rng_b64(torch.cuda.get_rng_state(device)) if device.type == "cuda" else None,
               "dropout": "each step reseeds torch with train.dropout_seed(seed, rank, step)"}
        state = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "last_epoch": last_epoch,
                 "world_size": world,
                 "schedule": {"total_steps": total_steps, "warmup_steps": warmup_steps, "peak_lr": args.lr},
                 "history": history, "best": best, "epoch_loss": epoch_loss, "epoch_steps": epoch_steps,
                 "tokens": tokens_done, "train_seconds": train_seconds,
                 "wall_seconds": wall_before + time.perf_counter() - t_start,
                 "optimizer_steps": opt_steps, "rng": rng, "config": config, "labels": label_names}
        return save_checkpoint(output, {"trainable": trainable_state(model), "optimizer": opt_t,
                                        "best": best_weights}, state)

    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Only adapters and head are synchronised and all-reduced; the frozen base is identical everywhere.
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        DDP._set_params_and_buffers_to_ignore_for_model(model, frozen + [n for n, _ in model.named_buffers()])
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    # --- the loop
    train_y = torch.tensor(train_ds.labels, dtype=torch.long)
    stop_code = None
    log_file = open(log_path, "a", encoding="utf-8") if main_process else None
    bar = tqdm(total=total_steps, initial=step, unit="step", disable=not main_process, dynamic_ncols=True,
               mininterval=1.0, desc="training")
    model.train()
    try:
        with StopRequest(verbose=main_process) as stop:
            while epoch < last_epoch and stop_code is None:
                batches = epoch_batches(epoch)
                bar.set_description(f"epoch {epoch + 1}/{args.epochs}")
                while batch_in_epoch < len(batches):
                    t_step = time.perf_counter()
                    batch = batches[batch_in_epoch]
                    ids, mask = D.collate([train_tok[i] for i in batch], pad_id)
                    ids, mask, y = ids.to(device), mask.to(device), train_y[batch].to(device)
                    lr = lr_at(step, total_steps, warmup_steps, args.lr)
                    for group in opt.param_groups:
                        group["lr"] = lr
                    torch.manual_seed(dropout_seed(args.seed, rank, step))
                    loss = F.cross_entropy(net(ids, mask), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()  # under DDP: adapter and head gradients are averaged across processes
                    if args.clip > 0:
                        torch.nn.utils.clip_grad_norm_([p for _, p in named], args.clip)
                    opt.step()
                    step += 1
                    batch_in_epoch += 1
                    local_stop = float(stop.signum is not None or step == args.stop_after_steps)
                    loss_sum, n_stop, n_tok = all_reduce_sum([loss.item(), local_stop, float(sum(len(train_tok[i])
                                                              for i in batch))], device, world)
                    step_loss = loss_sum / world
                    tokens_done += int(n_tok)
                    train_seconds += time.perf_counter() - t_step
                    epoch_loss += step_loss
                    epoch_steps += 1
                    if main_process:
                        log_file.write(json.dumps({"step": step, "epoch": epoch + 1, "loss": float(f"{step_loss:.6g}"),
                                                   "lr": lr, "tokens": int(n_tok)}) + "\n")
                        log_file.flush()
                        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}",
                                        tok_s=f"{tokens_done / max(train_seconds, 1e-9):,.0f}", refresh=False)
                        bar.update(1)
                    if n_stop > 0:  # every rank stops at the same step
                        stop_code = 128 + stop.signum if stop.signum else 0 if local_stop else 128 + signal.SIGTERM
                        break
                    if args.save_every and step % args.save_every == 0:
                        checkpoint()
                if stop_code is not None:
                    break
                # End of epoch: validate, remember the best weights, checkpoint.
                val_acc, val_loss = evaluate(model, val_tok, val_ds.labels, batch_size=args.eval_batch_size,
                                             pad_id=pad_id, device=device, rank=rank, world=world, desc="validating")
                history.append({"epoch": epoch + 1, "step": step, "train_loss": epoch_loss / max(1, epoch_steps),
                                "val_accuracy": val_acc, "val_loss": val_loss})
                if val_acc > best["val_accuracy"]:
                    best = {"val_accuracy": val_acc, "epoch": epoch + 1, "since": 0}
                    best_weights = trainable_state(model)
                else:
                    best["since"] += 1
                if main_process:
                    bar.write(f"epoch {epoch + 1}/{args.epochs}: train loss {history[-1]['train_loss']:.4f}, "
                              f"val accuracy {val_acc:.4f} (loss {val_loss:.4f}), "
                              f"{tokens_done / max(train_seconds, 1e-9):,.0f} tok/s, "
                              f"{fmt_time(wall_before + time.perf_counter() - t_start)}"
                              + ("  *best" if best["epoch"] == epoch + 1 else ""))
                epoch, batch_in_epoch, epoch_loss, epoch_steps = epoch + 1, 0, 0.0, 0
                if args.patience and best["since"] >= args.patience and epoch < last_epoch:
                    say(f"early stop: validation accuracy has not improved for {args.patience} epochs "
                        f"(best {best['val_accuracy']:.4f} at epoch {best['epoch']})")
                    last_epoch = epoch  # saved in the checkpoint: a resumed run has nothing left to train
                    history[-1]["early_stop"] = True
                checkpoint()
                if all_reduce_sum([float(stop.signum is not None)], device, world)[0] > 0 and epoch < last_epoch:
                    stop_code = 128 + (stop.signum or signal.SIGTERM)
    finally:
        bar.close()
        if log_file:
            log_file.close()

    if stop_code is not None:
        path = checkpoint()
        barrier(world)
        say(f"stopped at step {step}: checkpoint written to {path}; continue with "
            f"python train.py --resume --output {output}")
        return stop_code

    # --- the test split, once, with the weights of the best validation epoch
    load_trainable(model, best_weights, output / "checkpoint")
    test_acc, test_loss = evaluate(model, test_tok, test_ds.labels, batch_size=args.eval_batch_size, pad_id=pad_id,
                                   device=device, rank=rank, world=world, desc="testing")
    wall = wall_before + time.perf_counter() - t_start
    if main_process:
        model.save_adapter(output)
        metrics = {
            "test_accuracy": test_acc, "test_loss": test_loss,
            "val_accuracy": [h["val_accuracy"] for h in history], "best_epoch": best["epoch"],
            "best_val_accuracy": best["val_accuracy"], "epochs": history,
            "train_tokens_per_second": tokens_done / max(train_seconds, 1e-9), "train_tokens": tokens_done,
            "train_seconds": train_seconds, "wall_seconds": wall, "steps": step, "resumed_from_step": resumed_from,
            "padding_fraction": pad_frac, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
            "world_size": world, "examples": {"train": len(train_ds), "validation": len(val_ds), "test": len(test_ds)},
            "labels": label_names, "replaced_non_utf8": replaced, "base_model": base_name,
            "trainable_parameters": sum(p.numel() for _, p in named), "adapter_activation": activation,
            "config": config,
        }
        W.atomic_write(output / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
        plotted = plot_curves(output, log_path, history)
        say(f"test accuracy {test_acc:.4f} (loss {test_loss:.4f}) on {len(test_ds):,} examples, best epoch "
            f"{best['epoch']}; {step} steps, {metrics['train_tokens_per_second']:,.0f} train tok/s, {fmt_time(wall)}")
        say(f"saved: {output}/adapter.safetensors, adapter_config.json, metrics.json, log.jsonl"
            + (", curves.png" if plotted else ""))
        for d in [output / "checkpoint", *output.glob("checkpoint.old-*"), *output.glob("checkpoint.tmp-*")]:
            shutil.rmtree(d, ignore_errors=True)  # the run is complete: nothing to resume
    barrier(world)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run training; user errors become one `error: ...` line on stderr (exit 2 for arguments, 1 otherwise)."""
    limit_heap_growth()
    rank = int(os.environ.get("RANK", "0"))
    prefix = "error: " if rank == 0 else f"error (rank {rank}): "
    try:
        return train(parse_args(argv), argv)
    except UsageError as e:
        print(prefix + str(e), file=sys.stderr)
        return 2
    except (D.DataError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(prefix + " ".join(str(e).split()), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
