#!/usr/bin/env python3
"""Adapter fine-tuning of a frozen RoBERTa (classification, sentence pairs, regression, multilabel, token
classification): data in, trained adapter + metrics out.

    python train.py --data imdb                              # roberta-base + Houlsby adapters on IMDB
    python train.py --data reviews.csv --model ./my-roberta  # any CSV/JSONL/aclImdb data, any local checkpoint
    python train.py --data ner.conll --task token-classification  # BIO tags per word: CoNLL or JSONL files
    python train.py --data imdb --resume                     # continue from weights/adapters/imdb-houlsby/checkpoint
    torchrun --nproc_per_node=4 train.py --data imdb         # DistributedDataParallel, one process per GPU
    python -m roberta_lite.predict --adapter weights/adapters/imdb-houlsby "A wonderful film."

The file reads top to bottom: arguments, small helpers (distributed setup, evaluation), the run's state, then the
steps, each a short function, and at the bottom `train()`, which is the list of steps: start, locate_base,
load_splits, build_model, build_optimizer, fit (epochs of train_step and end_epoch), finish (test, outputs).

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
import datetime
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from roberta_lite import AdapterConfig, CheckpointError, Config, Model, Tokenizer
from roberta_lite import adapters as A
from roberta_lite import checkpoint as CK
from roberta_lite import data as D
from roberta_lite import weights as W
from roberta_lite.runtime import (base_dtype, limit_heap_growth, peak_resident_mb, resident_mb, resolve_base,
                                  select_device, select_dtype)
from roberta_lite.tasks import TASKS, Task
# Flags that only steer this invocation; every other flag defines the training run and must match on --resume.
RUN_CONTROL = {"resume", "output", "save_every", "stop_after_steps", "device", "cache_dir", "test_limit",
               "eval_batch_size", "threads", "pad_multiple", "quantize"}


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
    p = _Parser(description="Train an adapter (Houlsby, Pfeiffer or LoRA) + head on a frozen RoBERTa.",
                allow_abbrev=False, formatter_class=_Help)
    _data_arguments(p.add_argument_group("data"))
    _model_arguments(p.add_argument_group("model"))
    _optimisation_arguments(p.add_argument_group("optimisation"))
    _running_arguments(p.add_argument_group("running"))
    return p


def _data_arguments(g: argparse._ArgumentGroup):
    g.add_argument("--data", help="'imdb' (the official archive, downloaded once into the cache), an aclImdb "
                   "archive or directory, or a .csv/.tsv/.jsonl file with 'text' and 'label' "
                   "(required unless --resume)")
    g.add_argument("--task", choices=D.TASKS, default="classification",
                   help="classification: one class per text; regression: one number (MSE loss, Pearson/Spearman); "
                        "multilabel: a list of labels per text (JSON list or a|b in CSV; sigmoid + BCE, F1); "
                        "token-classification: a BIO tag per word (CoNLL .conll/.txt or JSONL {tokens, tags}; "
                        "entity F1)")
    g.add_argument("--text-columns", help="the text column, or two comma-separated columns for sentence pairs "
                   "(default: 'text', plus 'text_pair' when the file has it; GLUE: e.g. sentence1,sentence2)")
    g.add_argument("--label-column", help="the label column (default: 'label')")
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


def _model_arguments(g: argparse._ArgumentGroup):
    g.add_argument("--model", default="roberta-base", help="base checkpoint: a local directory or a Hugging Face "
                   "hub id (downloaded into weights/<id>/ and reused offline)")
    g.add_argument("--adapter", choices=A.KINDS, default="houlsby",
                   help="houlsby: adapters after attention and FFN; pfeiffer: after the FFN only; lora: low-rank "
                        "updates of the attention/FFN projections")
    g.add_argument("--reduction-factor", type=_int_at_least(1), default=16,
                   help="adapter bottleneck = hidden size / this")
    g.add_argument("--activation", choices=sorted(A.ACTIVATIONS),
                   help="adapter non-linearity (default: swish for houlsby, relu for pfeiffer, as AdapterHub)")
    g.add_argument("--lora-r", type=_int_at_least(1), default=8, help="LoRA rank")
    g.add_argument("--lora-alpha", type=_float_in(0, 1e6, lo_open=True), default=16.0,
                   help="LoRA scale numerator: updates are scaled by alpha / r")
    g.add_argument("--lora-targets", default="query,value",
                   help=f"comma-separated projections LoRA adapts, of {','.join(A.LORA_TARGETS)}")
    g.add_argument("--lora-dropout", type=_float_in(0, 1, hi_open=True), default=0.0,
                   help="dropout on LoRA's input (peft's lora_dropout)")
    g.add_argument("--dropout", type=_float_in(0, 1, hi_open=True),
                   help="hidden-state dropout (default: the checkpoint's, 0.1 for roberta-base)")
    g.add_argument("--attention-dropout", type=_float_in(0, 1, hi_open=True), default=0.0,
                   help="dropout on the frozen base's attention probabilities")


def _optimisation_arguments(g: argparse._ArgumentGroup):
    g.add_argument("--epochs", type=_int_at_least(1), default=15, help="passes over the training data")
    g.add_argument("--patience", type=_int_at_least(0), default=4,
                   help="stop when the validation metric has not improved for this many epochs (0: never)")
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


def _running_arguments(g: argparse._ArgumentGroup):
    g.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="frozen base precision; auto: bf16 on CUDA and on CPUs with AVX512-BF16/AMX, else fp32")
    g.add_argument("--threads", type=_int_at_least(1),
                   help="CPU threads per process (default: torch's choice; torchrun sets 1 per process)")
    g.add_argument("--eval-batch-size", type=_int_at_least(1), default=64, help="examples per evaluation batch")
    g.add_argument("--quantize", choices=["int8"], help="validate and test on an int8 copy of the frozen base (CPU; "
                                                        "the adapter is copied into it before each pass); training "
                                                        "itself stays float")
    g.add_argument("--pad-multiple", type=_int_at_least(1), default=D.PAD_MULTIPLE,
                   help="round each batch's length up to a multiple of this: few distinct shapes, so memory levels "
                        "off (1: pad to the longest text only)")
    g.add_argument("--output", help="output directory (default: weights/adapters/<data>-<adapter>/)")
    g.add_argument("--save-every", type=_int_at_least(1),
                   help="also write OUTPUT/checkpoint/ every N steps (it is always written at each epoch's end)")
    g.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint/")
    g.add_argument("--stop-after-steps", type=_int_at_least(1), help=argparse.SUPPRESS)  # tests: a clean stop


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def default_output(data: str, adapter: str) -> Path:
    name = "imdb" if data == "imdb" else re.sub(r"(\.tar)?\.(gz|tgz|bz2|xz|tar|csv|tsv|jsonl|json|conll|txt)$", "",
                                                  Path(data.rstrip("/\\")).name) or "data"
    return Path("weights") / "adapters" / f"{name}-{adapter}"


def adapter_config(args: argparse.Namespace) -> AdapterConfig:
    if args.adapter == "lora":
        return AdapterConfig("lora", r=args.lora_r, alpha=args.lora_alpha, targets=args.lora_targets,
                             dropout=args.lora_dropout)
    # swish for Houlsby and relu for Pfeiffer: AdapterHub's DoubleSeqBnConfig / SeqBnConfig defaults
    activation = args.activation or ("swish" if args.adapter == "houlsby" else "relu")
    return AdapterConfig(args.adapter, args.reduction_factor, activation)


# ---------------------------------------------------------------------------------------------- helpers

def setup_distributed(device_arg: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun (WORLD_SIZE > 1) this joins the process group: NCCL on CUDA,
    gloo on CPU; each process takes the GPU of its LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    try:
        device = select_device(device_arg, local_rank, world)
    except ValueError as e:
        raise UsageError(f"argument {e}") from None
    if device.type == "cuda":
        torch.cuda.set_device(device)  # else the CUDA context (and bf16 check) lands on GPU 0
    if world > 1:
        import torch.distributed as dist

        # Generous: the other ranks wait here while rank 0 downloads the model and the data the first time.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))
    return rank, world, device


def barrier(world: int):
    if world > 1:
        torch.distributed.barrier()


def rank0_first(run: "Run", fn):
    """fn() on rank 0, then on the others: downloads and caches are filled once, then read by everyone."""
    result = fn() if run.main else None
    barrier(run.world)
    return result if run.main else fn()


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
        import threading

        if hasattr(signal, "SIGTERM") and threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _fused_if_supported(device: torch.device) -> dict:
    """AdamW's fused kernel: one pass over all parameters instead of a dozen small ops per tensor."""
    return {"fused": True} if device.type in ("cuda", "cpu") else {}


@torch.inference_mode()  # no autograd graph: evaluation memory stays one batch's, whatever the split's size
def predict_all(model: Model, seqs: list[np.ndarray], *, batch_size: int, pad_id: int, device: torch.device,
                rank: int, world: int, desc: str, pad_multiple: int = D.PAD_MULTIPLE) -> torch.Tensor:
    """Logits for every example, float32 on the CPU, in the order of `seqs`; length-sorted batches, split
    across ranks and gathered back. A token head's (B, T, K) logits come back as one (T_i, K) tensor per example
    (its own tokens, padding dropped), in a list."""
    was_training = model.training
    model.eval()
    batches = D.length_batches([len(s) for s in seqs], batch_size=batch_size, shuffle=False)[rank::world]
    rows, parts = [], []
    for batch in tqdm(batches, desc=desc, leave=False, disable=rank != 0, unit="batch"):
        ids, mask = D.collate([seqs[i] for i in batch], pad_id, pad_multiple, model.config.max_tokens)
        logits = model(ids.to(device), mask.to(device)).float().cpu()
        parts.extend(logits[row, :len(seqs[i])].clone() if logits.dim() == 3 else logits[row]
                     for row, i in enumerate(batch))
        rows.extend(batch)
    model.train(was_training)
    gathered = [(rows, parts)]
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, (rows, parts))
    out: list = [None] * len(seqs)
    for r, logits in gathered:
        for i, row in zip(r, logits):
            out[i] = row
    if out and out[0].dim() == 2:  # per token
        return out
    return torch.stack(out) if out else torch.zeros(0, model.num_labels)


def evaluate(run: "Run", model: Model, split: "Split", desc: str) -> dict[str, float]:
    """The task's metrics (and loss) over a whole split (with --quantize, of the adapter as it is now on the int8
    base)."""
    if run.int8 is not None:
        with torch.no_grad():
            for (_, mine), (_, theirs) in zip(A.adapter_tensors(model, model.active_adapter),
                                              A.adapter_tensors(run.int8, run.int8.active_adapter)):
                theirs.copy_(mine)
        model = run.int8
    logits = predict_all(model, split.tokens, batch_size=run.args.eval_batch_size, pad_id=model.config.pad_id,
                         device=run.device, rank=run.rank, world=run.world, desc=desc,
                         pad_multiple=run.args.pad_multiple)
    return run.task.metrics(logits, split.y)


def plot_curves(output: Path, log_path: Path, epochs: list[dict], primary: str) -> bool:
    """curves.png: training loss per step and the validation metric per epoch (needs matplotlib)."""
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
    b.plot([e["epoch"] for e in epochs], [e[f"val_{primary}"] for e in epochs], marker="o")
    b.set(xlabel="epoch", ylabel=f"validation {primary}")
    b.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(output / "curves.png", dpi=120)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------- the run's state

@dataclass
class Run:
    """What every step reads: arguments, processes, output directory, task; on --resume, the checkpoint."""

    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    output: Path
    config: dict  # the flags that define the run (saved with checkpoints and metrics)
    task: Task
    resume: tuple | None = None  # (state, tensors, directory)
    int8: Model | None = None  # --quantize: the int8 base that validation and test run the adapter on
    t_start: float = field(default_factory=time.perf_counter)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def say(self, *a, **k):
        if self.main:
            print(*a, **k)


@dataclass
class Split:
    tokens: list[np.ndarray]
    y: torch.Tensor  # labels as the task's loss wants them (token classification: tagging.TokenTargets)
    size: int
    cut: int = 0  # token classification: sentences cut at --max-length


@dataclass
class Progress:
    """The training loop's position and history: all of it goes into a checkpoint."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    last_epoch: int = 0
    history: list = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"metrics": None, "epoch": None, "since": 0})
    epoch_loss: float = 0.0
    epoch_steps: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    wall_before: float = 0.0
    resumed_from: int | None = None


# ---------------------------------------------------------------------------------------------- the steps

def start(args: argparse.Namespace, argv: list[str] | None) -> Run:
    """Processes, output directory, and on --resume the checkpoint, whose configuration is the run's."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.data is None and not (args.resume and args.output):
        raise UsageError("--data is required (or --resume with --output DIR)")
    output = Path(args.output) if args.output else default_output(args.data, args.adapter)
    if output.exists() and not output.is_dir():
        raise UsageError(f"argument --output: {output} is a file, not a directory")
    unfinished = [d for d in [output / "checkpoint", *output.glob("checkpoint.old-*")] if d.is_dir()]
    if not args.resume and unfinished:
        raise CheckpointError(f"{output / 'checkpoint'}/ holds an unfinished run: continue it with --resume, or "
                              f"delete it (or choose another --output) to start over")
    resume = CK.load_checkpoint(output) if args.resume else None
    if resume is not None:
        args = resumed_args(resume[0]["config"], argv)
    adapter_config(args)  # a bad adapter flag fails now, before any work
    rank, world, device = setup_distributed(args.device)
    if resume is not None and resume[0]["world_size"] != world:
        raise UsageError(f"--resume: the checkpoint was written by {resume[0]['world_size']} processes, "
                         f"this run has {world}; resume with the same number")
    config = {k: v for k, v in vars(args).items() if k not in RUN_CONTROL}
    return Run(args, rank, world, device, output, config, TASKS[args.task], resume)


def resumed_args(saved: dict, argv: list[str] | None) -> argparse.Namespace:
    """The command line over the checkpoint's configuration; a flag that would change the run is an error."""
    parser = build_parser()
    parser.set_defaults(**{k: v for k, v in saved.items() if k not in RUN_CONTROL})
    args = parser.parse_args(argv)
    for k, v in saved.items():
        if k not in RUN_CONTROL and getattr(args, k, v) != v:
            raise UsageError(f"--resume: --{k.replace('_', '-')} {getattr(args, k)} differs from the "
                             f"checkpoint's {v}; drop it to continue the run as it was started")
    return args


def locate_base(run: Run) -> tuple[Path, str, Config]:
    """The base model's files (downloaded once into weights/<id>/), checked before any long work."""
    base_dir, base_name = rank0_first(run, lambda: resolve_base(run.args.model))
    arch = Config.from_hf(W.read_config(base_dir), source=str(base_dir / "config.json"))
    if run.args.max_length is None:
        run.args.max_length = run.config["max_length"] = min(512, arch.max_tokens)
    if run.args.max_length > arch.max_tokens:
        raise UsageError(f"argument --max-length: {run.args.max_length} exceeds the model's limit of "
                         f"{arch.max_tokens} tokens (max_position_embeddings {arch.max_positions} in "
                         f"{base_dir / 'config.json'})")
    return base_dir, base_name, arch


def load_splits(run: Run, base_dir: Path, arch: Config) -> tuple[dict[str, Split], list[str], D.TextDataset]:
    """Train / validation (chooses the epoch) / test (used once, at the end), tokenized and cached on disk."""
    args, t0 = run.args, time.perf_counter()
    columns = tuple(c.strip() for c in args.text_columns.split(",")) if args.text_columns else None
    train_ds, test_ds = rank0_first(run, lambda: D.load_data(
        args.data, args.test_data, seed=args.seed, test_fraction=args.test_fraction, text_columns=columns,
        label_column=args.label_column, task=args.task))
    label_names = list(train_ds.label_names)
    full = len(train_ds), len(test_ds)

    def sample(ds: D.TextDataset, n: int | None, stream: int) -> D.TextDataset:
        """A seeded random n of ds (IMDB's reviews are sorted by label, so never the first n)."""
        if not n or n >= len(ds):
            return ds
        return ds.subset(sorted(np.random.default_rng([args.seed, stream]).permutation(len(ds))[:n]))

    train_ds, test_ds = sample(train_ds, args.limit, 1), sample(test_ds, args.test_limit, 2)
    if len(train_ds) < 2:
        raise D.DataError(f"{args.data}: {len(train_ds)} training example; need at least 2 (one for validation)")
    train_ds, val_ds = D.train_val_split(train_ds, args.val_fraction, seed=args.seed)
    run.say(f"data: {len(train_ds):,} train, {len(val_ds):,} validation, {len(test_ds):,} test "
            f"(of {full[0]:,} + {full[1]:,}; labels {', '.join(label_names)}) from {train_ds.source} "
            f"in {time.perf_counter() - t0:.1f}s")
    if train_ds.replaced + test_ds.replaced:
        run.say(f"note: {train_ds.replaced + test_ds.replaced} text(s) contained bytes that are not valid UTF-8; "
                f"they were replaced by U+FFFD")
    tokenizer, cache, t0 = Tokenizer.from_pretrained(base_dir), Path(args.cache_dir) if args.cache_dir else None, \
        time.perf_counter()
    datasets = {"train": train_ds, "val": val_ds, "test": test_ds}
    tokens = rank0_first(run, lambda: {k: D.tokenize_dataset(ds, tokenizer, args.max_length, cache=cache)
                                       for k, ds in datasets.items()})  # pairs joined: <s> A </s></s> B </s>
    splits = {k: Split(t.seqs, run.task.label_tensor(t.labels), len(t), t.cut) for k, t in tokens.items()}
    lengths = np.array([len(s) for s in splits["train"].tokens])
    cut = (f"sentences cut at {args.max_length} tokens (their last words unlabelled): "
           + ", ".join(f"{s.cut:,} of {s.size:,} {k}" for k, s in splits.items())) if args.task == D.TOKEN_TASK \
        else f"{100 * np.mean(lengths >= args.max_length):.1f}% cut at {args.max_length}"
    run.say(f"tokens: {lengths.sum():,} in training texts, mean {lengths.mean():.0f}, {cut} "
            f"({time.perf_counter() - t0:.1f}s)")
    if tokenizer.pad_id != arch.pad_id:
        run.say(f"warning: the tokenizer pads with id {tokenizer.pad_id}, config.json says pad_token_id "
                f"{arch.pad_id}; using {arch.pad_id}")
    return splits, label_names, train_ds


def build_model(run: Run, base_dir: Path, base_name: str, arch: Config, label_names: list[str],
                num_outputs: int) -> Model:
    """The frozen base (bf16 on the fast path) with a fresh adapter and head (float32), the only trainable part."""
    torch.manual_seed(run.args.seed)  # the fresh adapter and head: identical on every rank
    dtype = select_dtype(run.args.precision, run.device)
    model = Model.from_pretrained(base_dir, dtype=dtype, device=run.device)
    model.set_dropout(hidden=run.args.dropout, attention=run.args.attention_dropout)
    name = A.name_from(run.output.name)  # the adapter's name: its directory's
    model.add_adapter(name, adapter_config(run.args), num_labels=num_outputs, labels=label_names,
                      task=run.task.kind)  # always a fresh head, never a checkpoint's classifier
    model.name_or_path = base_name  # what the adapter records: a hub id, or an absolute directory
    summary = model.freeze_base()
    cfg = model.adapter_config
    what = (f"lora r={cfg.r} alpha={cfg.alpha:g} on {','.join(cfg.targets)}" if cfg.is_lora else
            f"{cfg.kind} adapters (reduction {cfg.reduction_factor}, {cfg.activation})")
    run.say(f"model: {base_name} ({arch.num_layers} layers, hidden {arch.hidden_size}) + {what}; {summary}")
    run.say(f"device: {run.device}, base precision {str(dtype).removeprefix('torch.')}, {run.world} "
            f"process{'es' if run.world > 1 else ''}, {torch.get_num_threads()} CPU threads each")
    if run.args.quantize:  # an int8 twin of the base with the same adapter and head, for validation and test
        twin = Model.from_pretrained(base_dir, dtype=base_dtype("auto", run.device, run.args.quantize),
                                     device=run.device)
        twin.add_adapter(name, adapter_config(run.args), num_labels=num_outputs, labels=label_names,
                         task=run.task.kind)
        run.int8 = twin.quantize(run.args.quantize)
        run.say(f"validation and test: on an {run.args.quantize} copy of the base")
    return model


def build_optimizer(run: Run, model: Model) -> tuple[torch.optim.Optimizer, dict[int, str]]:
    """AdamW over the trainable parameters, weight decay on matrices only."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": run.args.weight_decay},
                             {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}],
                            lr=run.args.lr, betas=(0.9, 0.999), eps=1e-8, **_fused_if_supported(run.device))
    return opt, {id(p): n for n, p in named}


def epoch_batches(run: Run, lengths: list[int], epoch: int) -> list[list[int]]:
    """This rank's share of one epoch's length-bucketed, shuffled batches (the last partial batch included)."""
    batches = D.length_batches(lengths, batch_size=run.args.batch_size, max_tokens=run.args.max_tokens,
                               shuffle=True, seed=run.args.seed, epoch=epoch)
    return D.shard(batches, run.rank, run.world)


def initial_progress(run: Run, model: Model, opt, names: dict[int, str]) -> tuple[Progress, dict]:
    """(position, best weights so far): fresh, or restored from the checkpoint with the optimizer and RNG."""
    if run.resume is None:
        return Progress(last_epoch=run.args.epochs), CK.trainable_state(model)
    s, tensors, where = run.resume
    CK.load_trainable(model, tensors["trainable"], where)
    CK.restore_optimizer(opt, names, tensors["optimizer"], s["optimizer_steps"], where)
    torch.set_rng_state(CK.rng_from_b64(s["rng"]["torch"]))
    if run.device.type == "cuda" and s["rng"].get("cuda"):
        torch.cuda.set_rng_state(CK.rng_from_b64(s["rng"]["cuda"]), run.device)
    p = Progress(**{k: s[k] for k in ("step", "epoch", "batch_in_epoch", "last_epoch", "history", "best",
                                     "epoch_loss", "epoch_steps", "tokens", "train_seconds")},
                 wall_before=s["wall_seconds"], resumed_from=s["step"])
    run.say(f"resumed from {where} at step {p.step} (epoch {p.epoch + 1}, batch {p.batch_in_epoch})")
    return p, tensors["best"]


def save_progress(run: Run, model: Model, opt, names: dict[int, str], p: Progress, best_weights: dict,
                  schedule: dict) -> Path | None:
    """OUTPUT/checkpoint/: everything --resume needs to continue exactly where this step left off."""
    if not run.main:
        return None
    opt_t, opt_steps = CK.optimizer_tensors(opt, names)
    rng = {"torch": CK.rng_b64(torch.get_rng_state()),
           "cuda": CK.rng_b64(torch.cuda.get_rng_state(run.device)) if run.device.type == "cuda" else None,
           "dropout": "each step reseeds torch with train.dropout_seed(seed, rank, step)"}
    state = {**{k: v for k, v in vars(p).items() if k not in ("wall_before", "resumed_from")},
             "wall_seconds": p.wall_before + time.perf_counter() - run.t_start, "world_size": run.world,
             "schedule": schedule, "optimizer_steps": opt_steps, "rng": rng, "config": run.config}
    return CK.save_checkpoint(run.output, {"trainable": CK.trainable_state(model), "optimizer": opt_t,
                                           "best": best_weights}, state)


def train_step(run: Run, net, opt, model: Model, split: Split, batch: list[int], p: Progress, schedule: dict,
               stop: StopRequest) -> tuple[float, int, bool]:
    """One optimizer step on one batch. Returns (the loss averaged over ranks, the real tokens it trained on,
    whether every rank stops now)."""
    t = time.perf_counter()
    ids, mask = D.collate([split.tokens[i] for i in batch], model.config.pad_id, run.args.pad_multiple,
                          model.config.max_tokens)
    y = run.task.batch_labels(split.y, batch, ids.shape[1])
    ids, mask, y = ids.to(run.device), mask.to(run.device), y.to(run.device)
    lr = lr_at(p.step, schedule["total_steps"], schedule["warmup_steps"], run.args.lr)
    for group in opt.param_groups:
        group["lr"] = lr
    torch.manual_seed(dropout_seed(run.args.seed, run.rank, p.step))
    loss = run.task.loss(net(ids, mask), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()  # under DDP: adapter and head gradients are averaged across processes
    if run.args.clip > 0:
        torch.nn.utils.clip_grad_norm_([q for g in opt.param_groups for q in g["params"]], run.args.clip)
    opt.step()
    p.step, p.batch_in_epoch = p.step + 1, p.batch_in_epoch + 1
    local_stop = float(stop.signum is not None or p.step == run.args.stop_after_steps)
    n_tok = float(sum(len(split.tokens[i]) for i in batch))
    loss_sum, n_stop, n_tok = all_reduce_sum([loss.item(), local_stop, n_tok], run.device, run.world)
    p.tokens += int(n_tok)
    p.train_seconds += time.perf_counter() - t
    p.epoch_loss += loss_sum / run.world
    p.epoch_steps += 1
    return loss_sum / run.world, int(n_tok), n_stop > 0


def end_epoch(run: Run, model: Model, splits: dict[str, Split], p: Progress, best_weights: dict) -> dict:
    """Validate; keep the best epoch's weights (ties broken by the lower loss); stop early when it is stale."""
    m = evaluate(run, model, splits["val"], "validating")
    p.history.append({"epoch": p.epoch + 1, "step": p.step, "train_loss": p.epoch_loss / max(1, p.epoch_steps),
                      **{f"val_{k}": v for k, v in m.items()}})
    if run.task.better(m, p.best["metrics"]):
        p.best, best_weights = {"metrics": m, "epoch": p.epoch + 1, "since": 0}, CK.trainable_state(model)
    else:
        p.best["since"] += 1
    primary = run.task.primary
    run.say(f"epoch {p.epoch + 1}/{run.args.epochs}: train loss {p.history[-1]['train_loss']:.4f}, val {primary} "
            f"{m[primary]:.4f} (loss {m['loss']:.4f}), {p.tokens / max(p.train_seconds, 1e-9):,.0f} tok/s, "
            f"{fmt_time(p.wall_before + time.perf_counter() - run.t_start)}"
            + ("  *best" if p.best["epoch"] == p.epoch + 1 else ""))
    p.epoch, p.batch_in_epoch, p.epoch_loss, p.epoch_steps = p.epoch + 1, 0, 0.0, 0
    if run.args.patience and p.best["since"] >= run.args.patience and p.epoch < p.last_epoch:
        run.say(f"early stop: validation {primary} has not improved for {run.args.patience} epochs "
                f"(best {p.best['metrics'][primary]:.4f} at epoch {p.best['epoch']})")
        p.last_epoch = p.epoch  # saved in the checkpoint: a resumed run has nothing left to train
        p.history[-1]["early_stop"] = True
    return best_weights


def fit(run: Run, model: Model, opt, names: dict[int, str], splits: dict[str, Split]) -> tuple[Progress, dict, int | None]:
    """The epochs: train steps, validation at each epoch's end, checkpoints. Returns (progress, best weights,
    exit code if stopped early by a signal or --stop-after-steps, else None)."""
    lengths = [len(s) for s in splits["train"].tokens]
    steps_per_epoch = len(epoch_batches(run, lengths, 0))
    if steps_per_epoch == 0:
        raise D.DataError(f"{run.args.data}: {splits['train'].size} training examples make fewer batches than the "
                          f"{run.world} processes; use more data or fewer processes")
    total = run.args.epochs * steps_per_epoch
    schedule = {"total_steps": total, "warmup_steps": int(run.args.warmup * total), "peak_lr": run.args.lr}
    p, best_weights = initial_progress(run, model, opt, names)
    net = distributed(run, model)
    log = open_log(run, p)
    bar = tqdm(total=total, initial=p.step, unit="step", disable=not run.main, dynamic_ncols=True, mininterval=1.0)
    model.train()
    stop_code = None
    try:
        with StopRequest(verbose=run.main) as stop:
            while p.epoch < p.last_epoch and stop_code is None:
                batches = epoch_batches(run, lengths, p.epoch)
                bar.set_description(f"epoch {p.epoch + 1}/{run.args.epochs}")
                while p.batch_in_epoch < len(batches) and stop_code is None:
                    batch = batches[p.batch_in_epoch]
                    loss, n_tok, stopping = train_step(run, net, opt, model, splits["train"], batch, p, schedule, stop)
                    log_step(run, log, bar, p, loss, n_tok, schedule)
                    if stopping:  # every rank stops at the same step; a signal on another rank counts as SIGTERM
                        stop_code = 128 + stop.signum if stop.signum else \
                            0 if p.step == run.args.stop_after_steps else 128 + signal.SIGTERM
                    elif run.args.save_every and p.step % run.args.save_every == 0:
                        save_progress(run, model, opt, names, p, best_weights, schedule)
                if stop_code is None:
                    best_weights = end_epoch(run, model, splits, p, best_weights)
                    save_progress(run, model, opt, names, p, best_weights, schedule)
                    if all_reduce_sum([float(stop.signum is not None)], run.device, run.world)[0] > 0 \
                            and p.epoch < p.last_epoch:
                        stop_code = 128 + (stop.signum or signal.SIGTERM)
    finally:
        bar.close()
        if log:
            log.close()
    if stop_code is not None:
        path = save_progress(run, model, opt, names, p, best_weights, schedule)
        barrier(run.world)
        run.say(f"stopped at step {p.step}: checkpoint written to {path}; continue with "
                f"python train.py --resume --output {run.output}")
    return p, best_weights, stop_code


def distributed(run: Run, model: Model):
    """Under torchrun: DistributedDataParallel over the adapter and head only (the frozen base is the same
    everywhere, so it is neither broadcast nor all-reduced)."""
    if run.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    DDP._set_params_and_buffers_to_ignore_for_model(model, frozen + [n for n, _ in model.named_buffers()])
    return DDP(model, device_ids=[run.device.index] if run.device.type == "cuda" else None)


def open_log(run: Run, p: Progress):
    """OUTPUT/log.jsonl, one line per step; on resume, lines after the checkpoint's step are dropped."""
    if not run.main:
        return None
    run.output.mkdir(parents=True, exist_ok=True)
    path = run.output / "log.jsonl"
    if path.exists():
        keep = [ln for ln in path.read_text().splitlines()
                if ln.strip() and p.resumed_from is not None and json.loads(ln)["step"] <= p.step]
        W.atomic_write(path, "".join(ln + "\n" for ln in keep).encode())
    return open(path, "a", encoding="utf-8")


def log_step(run: Run, log, bar, p: Progress, loss: float, tokens: int, schedule: dict):
    if not run.main:
        return
    lr = lr_at(p.step - 1, schedule["total_steps"], schedule["warmup_steps"], run.args.lr)
    log.write(json.dumps({"step": p.step, "epoch": p.epoch + 1, "loss": float(f"{loss:.6g}"), "lr": lr,
                          "tokens": tokens, "rss_mb": resident_mb()}) + "\n")
    log.flush()
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{p.tokens / max(p.train_seconds, 1e-9):,.0f}",
                    refresh=False)
    bar.update(1)


def finish(run: Run, model: Model, splits: dict[str, Split], p: Progress, best_weights: dict, label_names: list[str],
           train_ds: D.TextDataset, base_name: str) -> None:
    """The test split, once, with the best epoch's weights; then the adapter, metrics.json and curves.png."""
    CK.load_trainable(model, best_weights, run.output / "checkpoint")
    test = evaluate(run, model, splits["test"], "testing")
    wall = p.wall_before + time.perf_counter() - run.t_start
    digests = [CK.digest(CK.trainable_state(model))]  # under DDP every rank must end with the same weights
    if run.world > 1:
        digests = [None] * run.world
        torch.distributed.all_gather_object(digests, CK.digest(CK.trainable_state(model)))
    if not run.main:
        return
    model.save_adapter(run.output)
    primary = run.task.primary
    metrics = {
        **{f"test_{k}": v for k, v in test.items()},
        **{f"val_{k}": [h[f"val_{k}"] for h in p.history] for k in test if k not in ("loss", "per_type")},
        "best_epoch": p.best["epoch"],
        f"best_val_{primary}": p.best["metrics"][primary], "epochs": p.history, "task": run.task.kind,
        "train_tokens_per_second": p.tokens / max(p.train_seconds, 1e-9), "train_tokens": p.tokens,
        "train_seconds": p.train_seconds, "wall_seconds": wall, "peak_rss_mb": peak_resident_mb(), "steps": p.step,
        "resumed_from_step": p.resumed_from,
        "padding_fraction": D.padding_fraction(epoch_batches(run, [len(s) for s in splits["train"].tokens], 0),
                                               [len(s) for s in splits["train"].tokens], run.args.pad_multiple,
                                               model.config.max_tokens),
        "device": str(run.device), "dtype": str(next(model.layers[0].parameters()).dtype).removeprefix("torch."),
        "eval_quantize": run.args.quantize,
        "world_size": run.world, "examples": {"validation" if k == "val" else k: s.size for k, s in splits.items()},
        "labels": label_names, "replaced_non_utf8": train_ds.replaced, "base_model": base_name,
        **({"sentences_cut": {k: s.cut for k, s in splits.items()}} if run.task.kind == D.TOKEN_TASK else {}),
        "trainable_parameters": sum(q.numel() for q in model.parameters() if q.requires_grad),
        "adapter": model.adapter_config.to_dict(), "rank_weight_digests": digests, "config": run.config,
    }
    if len(set(digests)) > 1:
        run.say(f"warning: the {run.world} processes ended with different adapter weights ({digests})")
    W.atomic_write(run.output / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
    plotted = plot_curves(run.output, run.output / "log.jsonl", p.history, primary)
    run.say(f"test {primary} {test[primary]:.4f} (loss {test['loss']:.4f}) on {splits['test'].size:,} examples, "
            f"best epoch {p.best['epoch']}; {p.step} steps, {metrics['train_tokens_per_second']:,.0f} train tok/s, "
            f"{fmt_time(wall)}")
    run.say(f"saved: {run.output}/adapter.safetensors, adapter_config.json, metrics.json, log.jsonl"
            + (", curves.png" if plotted else ""))
    for d in [run.output / "checkpoint", *run.output.glob("checkpoint.old-*"), *run.output.glob("checkpoint.tmp-*")]:
        shutil.rmtree(d, ignore_errors=True)  # the run is complete: nothing to resume


# ---------------------------------------------------------------------------------------------- the script

def train(args: argparse.Namespace, argv: list[str] | None) -> int:
    run = start(args, argv)
    base_dir, base_name, arch = locate_base(run)
    splits, label_names, train_ds = load_splits(run, base_dir, arch)
    model = build_model(run, base_dir, base_name, arch, label_names, train_ds.num_outputs)
    opt, names = build_optimizer(run, model)
    progress, best_weights, stop_code = fit(run, model, opt, names, splits)
    if stop_code is not None:
        return stop_code
    finish(run, model, splits, progress, best_weights, label_names, train_ds, base_name)
    barrier(run.world)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run training; user errors become one `error: ...` line on stderr: exit 2 for a bad command line or data
    file (DataError names the file, line or column), 1 for the rest (a missing model, a bad checkpoint)."""
    limit_heap_growth()
    rank = int(os.environ.get("RANK", "0"))
    prefix = "error: " if rank == 0 else f"error (rank {rank}): "
    try:
        return train(parse_args(argv), argv)
    except (UsageError, D.DataError) as e:
        print(prefix + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except (CheckpointError, FileNotFoundError, ValueError) as e:
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
