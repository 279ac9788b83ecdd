"""Side-by-side speed benchmark: roberta_lite against transformers' RobertaForSequenceClassification.

    python -m roberta_lite.bench                          # CPU, roberta-base shape, 8 x 256, train and infer
    python -m roberta_lite.bench --precision bf16         # bf16 even where the CPU has no native bf16 (slow there)
    python -m roberta_lite.bench --lengths imdb --steps 8 # an IMDB-like length mix, batches padded to their longest
    python -m roberta_lite.bench --device cuda --fp32 --json bench.json
    python -m roberta_lite.bench --adapters 8             # one adapter vs 8 mixed in one batch vs 8 passes
    python -m roberta_lite.bench --adapter lora           # LoRA: training vs peft; merged inference vs the base
    python -m roberta_lite.bench --task token-classification  # a token head vs RobertaForTokenClassification

What is compared, so that only the implementations differ:
  * the same weights: a random roberta-base-shaped (or --config tiny) checkpoint is written once to a temporary
    directory with transformers' save_pretrained and loaded by both sides (or --checkpoint DIR, a real one);
  * the same Houlsby adapters (reduction 16, relu) with the same weights, copied from roberta_lite's into the
    transformers model. They sit where roberta_lite puts them: on the attention-output and FFN-output projections'
    result after its dropout, before the residual add + LayerNorm (`h = dropout(dense(x)); h + up(relu(down(h)))`);
  * everything frozen but adapters + classifier, dropout on (model.train()), AdamW (fused where the device
    supports it, else foreach) on the trainable parameters, the same batches in the same order;
  * steps alternate between the sides (the order rotates every step) and the medians are reported.

Precision, in every mode: `--precision auto` (the default) is bf16 only where the hardware has it natively, else
fp32 (runtime.select_dtype, the choice train.py makes: a CPU without AVX512-BF16/AMX runs bf16 matmuls several
times slower than fp32); `--precision bf16` / `fp32` force one. Both sides run in that precision.

Recipes, bf16. roberta_lite: `Model.from_pretrained(..., dtype=torch.bfloat16)`, fp32 adapters/head, no autocast.
transformers at its best simple recipe on the device: CPU: bf16 autocast with the fastest of its "sdpa" and
"eager" attention (timed here, per mode, and reported); GPU: bf16 autocast + SDPA + length-sorted batches, and
torch.compile as a second row. --fp32 adds fp32 rows for both sides beside the bf16 ones.
Recipes, fp32: the same with `dtype=torch.float32` and no autocast (transformers' attention timed in fp32); --fp32
adds nothing then. Each row's `x_vs_transformers` is its tokens/s over transformers' uncompiled row in the same
precision (`x_vs_transformers_bf16`: over transformers' bf16 row, None in an fp32 run); `ratio` and the summary
are roberta_lite over transformers per precision. --attention-dropout P sets the attention-probability dropout of
both sides (roberta_lite's set_dropout(attention=P) recipe, timed fairly).

`--task token-classification` times the same two sides with a per-token head instead of the sentence classifier:
roberta_lite's token head (dropout + one Linear on every token, 21 labels: WNUT-16's O and B-/I- of 10 types; the
last layer then computes every token) against transformers' RobertaForTokenClassification with the same Houlsby
adapters and the same classifier weights; random labels on every real token, cross-entropy ignoring padding.

Two more modes, roberta_lite's adapters against themselves and against peft:
  * `--adapters N`: one model with N Houlsby adapters (and N heads), all of them training, timed three ways on
    the same batches: (a) every example with one adapter; (b) one adapter per example, N different ones (the
    mixed batch: one pass of the base, each adapter on its own rows); (c) N separate passes, each adapter over its
    own examples (what a library without mixed batches does), logits put back in batch order, then one optimizer
    step. Reported: (b)/(a) (the price of mixing; the target is <= 1.2) and (c)/(b), from median step times.
  * `--adapter lora`: training with a LoRA (r 8, alpha 16, query and value) against transformers + peft holding the
    same LoRA weights and classifier (written by save_adapter(format="peft"), read by PeftModel.from_pretrained);
    inference with the LoRA merged into the base (merge_adapter) against the plain base, the unmerged LoRA and peft.
    Parity is also checked in fp32, next to the LoRA's own effect on the logits.
  Both time one precision (`--precision`, above). Every mode measures the device's matmul peak (the FFN's
  (2048 x 768) x (768 x 3072), bf16 and fp32) in the same run and reports each row's share.

On a shared CPU (other processes busy), OpenMP's spin-waiting worker threads can make every step several times
slower; run with OMP_WAIT_POLICY=PASSIVE in the environment (it must be set before torch starts) or --threads 1.
The 1-minute load average at start and end is recorded, and a note printed when the CPU was not idle.

Tokens/s counts real (non-padding) tokens: real tokens per batch / median step time for one fixed shape, the median
of the per-step rates for a length mix (the JSON also has total tokens / total time). Achieved TFLOP/s counts the matmul work actually done on the padded
batch (see `flops`):
  forward  = 2 * (matmul weights of the layers, adapters and head) per token + 4*T*T*C per layer per sequence
             (Q K^T and P V); embeddings are gathers, LayerNorm/GELU/softmax are not counted;
  training = forward + backward. The base is frozen, so the backward needs only input gradients: one matmul per
             forward matmul (1x forward), attention core 2x (dQ, dK from dS; dV, dP from dO); none at all for layer
             0's attention block, whose input (the frozen embeddings) needs no gradient; plus weight gradients
             for adapters and head (1x their forward). So training ~= 2x forward.
Memory: CUDA: torch.cuda.max_memory_allocated over one extra (untimed) step, minus what was allocated before it.
CPU (tracemalloc cannot see torch's allocations): resident memory from /proc/self/status over one extra untimed
step: free heap handed back first (malloc_trim), the peak reset (/proc/self/clear_refs), VmHWM read after; both
sides live in one process, so the delta (peak minus resident before the step) is the per-side number.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from roberta_lite.adapters import AdapterConfig, adapter_tensors
from roberta_lite.api import Model
from roberta_lite.data import PAD_MULTIPLE, padded_length

CONFIGS = {
    # roberta-base's shape
    "base": dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072),
    # for the smoke test: seconds, not minutes
    "tiny": dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128),
}
COMMON = dict(max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0,
              eos_token_id=2, hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
              initializer_range=0.02, model_type="roberta", architectures=["RobertaForSequenceClassification"])
NUM_LABELS = 2
TOKEN_LABELS = 21  # --task token-classification: WNUT-16's O + B-/I- of 10 entity types
ADAPTER = AdapterConfig(kind="houlsby", reduction_factor=16, activation="relu")
IMDB_MEDIAN, IMDB_SIGMA = 230.0, 0.7  # log-normal fit of IMDB review lengths in RoBERTa tokens (~13% over 512)


# ---------------------------------------------------------------------------------------------- checkpoint

def write_checkpoint(directory: Path, config: str, seed: int = 0) -> dict:
    """A random checkpoint of the given shape, with a 2-class classifier. Uses transformers' save_pretrained when
    transformers is installed, else writes the same key names with safetensors directly."""
    cfg = {**COMMON, **CONFIGS[config]}
    torch.manual_seed(seed)
    try:
        from transformers import RobertaConfig, RobertaForSequenceClassification
        from transformers.utils import logging as hf_logging
    except ImportError:
        return _write_checkpoint_plain(directory, cfg)
    hf_logging.disable_progress_bar()
    hf_cfg = RobertaConfig(**{k: v for k, v in cfg.items() if k not in ("model_type", "architectures")},
                           num_labels=NUM_LABELS)
    RobertaForSequenceClassification(hf_cfg).save_pretrained(directory)
    return cfg


def _write_checkpoint_plain(directory: Path, cfg: dict) -> dict:
    from safetensors.torch import save_file

    C, Fs, V, P = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["max_position_embeddings"]
    std = cfg["initializer_range"]
    shapes = {"roberta.embeddings.word_embeddings.weight": (V, C),
              "roberta.embeddings.position_embeddings.weight": (P, C),
              "roberta.embeddings.token_type_embeddings.weight": (cfg["type_vocab_size"], C),
              "roberta.embeddings.LayerNorm.weight": (C,), "roberta.embeddings.LayerNorm.bias": (C,),
              "classifier.dense.weight": (C, C), "classifier.dense.bias": (C,),
              "classifier.out_proj.weight": (NUM_LABELS, C), "classifier.out_proj.bias": (NUM_LABELS,)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"roberta.encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes[p + name + ".weight"], shapes[p + name + ".bias"] = (C, C), (C,)
        shapes[p + "intermediate.dense.weight"], shapes[p + "intermediate.dense.bias"] = (Fs, C), (Fs,)
        shapes[p + "output.dense.weight"], shapes[p + "output.dense.bias"] = (C, Fs), (C,)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[p + name + ".weight"], shapes[p + name + ".bias"] = (C,), (C,)
    tensors = {}
    for k, s in shapes.items():
        if k.endswith("LayerNorm.weight"):
            tensors[k] = torch.ones(s)
        elif len(s) == 1:
            tensors[k] = torch.zeros(s)
        else:
            tensors[k] = torch.randn(s) * std
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({**cfg, "num_labels": NUM_LABELS}, indent=2))
    return cfg


# ---------------------------------------------------------------------------------------------- batches

@dataclass
class Batch:
    ids: torch.Tensor  # (B, T) int64
    mask: torch.Tensor  # (B, T) int64, 1 on real tokens
    labels: torch.Tensor  # (B,); (B, T) for a token head, -100 on padding
    real_tokens: int
    lengths: list[int]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.ids.shape)


def sample_lengths(kind: str, n: int, length: int, max_len: int, rng: np.random.Generator) -> list[int]:
    if kind == "fixed":
        return [min(length, max_len)] * n
    # IMDB-like: log-normal with median ~230 tokens, cut at the model's limit (512 for roberta-base)
    x = np.exp(rng.normal(math.log(IMDB_MEDIAN), IMDB_SIGMA, size=n))
    return [int(v) for v in np.clip(np.round(x), 8, max_len)]


def make_batches(kind: str, steps: int, batch: int, length: int, vocab: int, max_len: int, sort: bool,
                 seed: int, device: torch.device, multiple: int = 1, token_labels: int | None = None) -> list[Batch]:
    rng = np.random.default_rng(seed)
    lengths = sample_lengths(kind, steps * batch, length, max_len, rng)
    if sort:  # length-sorted batches (less padding); their order is then shuffled
        lengths = sorted(lengths)
    groups = [lengths[i * batch:(i + 1) * batch] for i in range(steps)]
    if sort:
        rng.shuffle(groups)
    out = []
    for g in groups:
        T = padded_length(max(g), multiple, max_len)  # as train.py pads: to a multiple of 16 by default
        ids = torch.from_numpy(rng.integers(3, vocab, size=(batch, T))).long()
        mask = torch.zeros(batch, T, dtype=torch.long)
        for i, n in enumerate(g):
            ids[i, 0], ids[i, n - 1] = 0, 2  # <s> ... </s>
            ids[i, n:] = 1  # <pad>
            mask[i, :n] = 1
        labels = torch.from_numpy(rng.integers(0, NUM_LABELS, size=batch)).long()
        if token_labels:  # a label on every real token (the loss ignores -100)
            labels = torch.from_numpy(rng.integers(0, token_labels, size=(batch, T))).long().masked_fill(mask == 0, -100)
        out.append(Batch(ids.to(device), mask.to(device), labels.to(device), int(sum(g)), list(g)))
    return out


# ---------------------------------------------------------------------------------------------- FLOPs

def adapter_weights(cfg: dict, adapter: AdapterConfig | None) -> int:
    """Matmul weights one layer's adapter holds (none for a merged LoRA or no adapter)."""
    C, Fs = cfg["hidden_size"], cfg["intermediate_size"]
    if adapter is None:
        return 0
    if adapter.is_lora:
        fans = {"query": (C, C), "key": (C, C), "value": (C, C), "attn_out": (C, C), "ffn_up": (C, Fs),
                "ffn_down": (Fs, C)}
        return sum(adapter.r * (fans[t][0] + fans[t][1]) for t in adapter.targets)
    return (2 if adapter.kind == "houlsby" else 1) * 2 * C * (C // adapter.reduction_factor)


def flops(cfg: dict, B: int, T: int, train: bool, adapter: AdapterConfig | None = ADAPTER,
          task: str = "classification") -> float:
    """Matmul FLOPs of one step on a (B, T) batch; see the module docstring for the model."""
    C, Fs, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    tok = B * T
    attn_block = 2 * (3 * C * C + C * C) * tok  # qkv + output projection
    attn_core = 4 * T * T * C * B  # Q K^T and P V
    ffn = 2 * (2 * C * Fs) * tok
    adapters = 2 * adapter_weights(cfg, adapter) * tok
    head = 2 * C * TOKEN_LABELS * tok if task == "token-classification" else 2 * (C * C + C * NUM_LABELS) * B
    fwd = L * (attn_block + attn_core + ffn + adapters) + head
    if not train:
        return float(fwd)
    # a LoRA on query/key/value in layer 0 learns through layer 0's attention core
    first_core = 2 * attn_core if adapter is not None and adapter.is_lora and \
        {"query", "key", "value"} & set(adapter.targets) else 0
    bwd_input = L * (ffn + adapters) + (L - 1) * (attn_block + 2 * attn_core) + first_core + head
    bwd_weight = L * adapters + head
    return float(fwd + bwd_input + bwd_weight)


# ---------------------------------------------------------------------------------------------- memory

_LIBC = None


def _malloc_trim():
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _proc_status(key: str) -> int | None:
    """A /proc/self/status field in bytes (Linux), else None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _maxrss() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


class MemoryProbe:
    """Peak memory of one step: before() / after() -> (peak bytes, peak above what was held before)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated"
        elif _proc_status("VmHWM") is not None and _reset_hwm():
            self.method = "RSS: /proc/self/status VmHWM, reset per step via /proc/self/clear_refs"
        else:
            self.method = "RSS: resource.getrusage ru_maxrss (process lifetime peak; delta is a lower bound)"

    def before(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        elif self.method.startswith("RSS: /proc"):
            _malloc_trim()
            self.base = _proc_status("VmRSS")
            _reset_hwm()
        else:
            _malloc_trim()
            self.base = _maxrss()

    def after(self) -> tuple[int, int]:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        elif self.method.startswith("RSS: /proc"):
            peak = _proc_status("VmHWM")
        else:
            peak = _maxrss()
        return peak, max(0, peak - self.base)


# ---------------------------------------------------------------------------------------------- contenders

class HoulsbyAfterDropout(nn.Module):
    """Takes the place of a transformers sublayer's dropout: h = dropout(y); h + up(relu(down(h))), which is
    exactly where roberta_lite's Houlsby adapter reads and writes."""

    def __init__(self, dropout: nn.Module, hidden: int, bottleneck: int):
        super().__init__()
        self.dropout = dropout
        self.down = nn.Linear(hidden, bottleneck)
        self.up = nn.Linear(bottleneck, hidden)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        h = self.dropout(y)
        return h + self.up(F.relu(self.down(h)))


@dataclass
class Contender:
    label: str  # table row
    side: str  # "roberta_lite" or "transformers"
    recipe: str
    model: nn.Module  # the module (trained / evaluated); `call` may be a compiled wrapper of it
    call: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids, mask) -> logits
    autocast: torch.dtype | None = None
    precision: str = "bf16"
    compiled: bool = False
    opt: torch.optim.Optimizer | None = None
    adapter: AdapterConfig | None = field(default_factory=lambda: ADAPTER)  # what the FLOPs count; None: base alone
    task: str = "classification"  # the head the FLOPs count: "token-classification" for a per-token head
    times: dict = field(default_factory=dict)  # mode -> [(seconds, real tokens, flops padded, flops real)]
    memory: dict = field(default_factory=dict)  # mode -> (peak, delta)

    def autocast_ctx(self, device: torch.device):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)


def make_optimizer(params: list[torch.nn.Parameter], device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    """AdamW, fused where this device supports it, else foreach (the same choice for both sides)."""
    try:
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
        # fused support is checked lazily on some versions: take one step on a throwaway to be sure
        probe = torch.nn.Parameter(torch.zeros(2, device=device))
        probe.grad = torch.zeros(2, device=device)
        torch.optim.AdamW([probe], lr=1e-4, fused=True).step()
        return opt, "fused"
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=1e-4, foreach=True), "foreach"


def load_lite(ckpt: Path, dtype: torch.dtype, device: torch.device, seed: int, attn_dropout: float | None = None,
              names: list[str] | tuple[str, ...] = ("default",), adapter: AdapterConfig = ADAPTER,
              task: str = "classification") -> Model:
    """roberta_lite on the checkpoint with adapters `names` (each with a copy of the checkpoint's classifier, or
    for token-classification a fresh token head of TOKEN_LABELS), their weights random and non-zero; the first one
    active and trainable, the base frozen."""
    m = Model.from_pretrained(ckpt, num_labels=NUM_LABELS, dtype=dtype, device=device)
    for name in names:
        if task == "token-classification":
            m.add_adapter(name, adapter, num_labels=TOKEN_LABELS, task=task)
        else:
            m.add_adapter(name, adapter)
    if attn_dropout is not None:
        if hasattr(m, "set_dropout"):
            m.set_dropout(attention=attn_dropout)
        else:
            for layer in m.layers:
                layer.attn.dropout = attn_dropout
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-zero up-projections, so the adapters do something and the parity check means something
        for name in names:
            for key, p in adapter_tensors(m, name):
                if not key.startswith("head."):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    m.active_adapter = names[0]
    m.freeze_base()
    return m


def load_hf(ckpt: Path, lite: Model, device: torch.device, attn: str, attn_dropout: float | None = None,
            task: str = "classification") -> nn.Module:
    """transformers' RobertaForSequenceClassification (RobertaForTokenClassification for token-classification) on
    the same checkpoint, fp32 weights, with the same Houlsby adapters (weights copied from `lite`) and the same
    trainable set (adapters + classifier)."""
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    token = task == "token-classification"
    kind = transformers.RobertaForTokenClassification if token else transformers.RobertaForSequenceClassification
    hf = kind.from_pretrained(ckpt, dtype=torch.float32, attn_implementation=attn,
                              **({"num_labels": TOKEN_LABELS, "ignore_mismatched_sizes": True} if token else {}))
    if attn_dropout is not None:  # both its eager and its sdpa attention read this module's p
        for layer in hf.roberta.encoder.layer:
            layer.attention.self.dropout.p = attn_dropout
    C = hf.config.hidden_size
    r = C // ADAPTER.reduction_factor
    for layer, ours in zip(hf.roberta.encoder.layer, lite.layers):
        for parent, a in ((layer.attention.output, ours.attn_adapter["default"]),
                          (layer.output, ours.ffn_adapter["default"])):
            wrapped = HoulsbyAfterDropout(parent.dropout, C, r)
            with torch.no_grad():
                for mine, theirs in ((wrapped.down, a.down), (wrapped.up, a.up)):
                    mine.weight.copy_(theirs.weight.float())
                    mine.bias.copy_(theirs.bias.float())
            parent.dropout = wrapped
    with torch.no_grad():  # the same head too (a checkpoint without a classifier gets a fresh one on each side)
        pairs = ((hf.classifier, lite.active_head.out),) if token else \
            ((hf.classifier.dense, lite.active_head.dense), (hf.classifier.out_proj, lite.active_head.out))
        for mine, theirs in pairs:
            mine.weight.copy_(theirs.weight.float())
            mine.bias.copy_(theirs.bias.float())
    hf.requires_grad_(False)
    for name, p in hf.named_parameters():
        p.requires_grad_(name.startswith("classifier.") or ".dropout.down." in name or ".dropout.up." in name)
    return hf.to(device)


def copy_adapters(src: Model, dst: Model):
    with torch.no_grad():
        d = dict(adapter_tensors(dst, dst.active_adapter))
        for name, t in src.adapter_state_dict().items():
            d[name].copy_(t)


def trainable(m: nn.Module) -> list[nn.Parameter]:
    return [p for p in m.parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------- stepping

def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step(c: Contender, b: Batch, mode: str, device: torch.device):
    if mode == "train":
        c.opt.zero_grad(set_to_none=True)
        with c.autocast_ctx(device):
            logits = c.call(b.ids, b.mask)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), b.labels.reshape(-1))  # -100: ignored
        loss.backward()
        c.opt.step()
    else:
        with torch.inference_mode(), c.autocast_ctx(device):
            c.call(b.ids, b.mask)
    sync(device)


def set_mode(contenders: list[Contender], mode: str):
    for c in contenders:
        c.model.train(mode == "train")


def timed(c: Contender, b: Batch, mode: str, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    step(c, b, mode, device)
    return time.perf_counter() - t0


def pick_attention(load: Callable[[str], nn.Module], device: torch.device, modes: list[str], batch: Batch,
                   log: Callable[[str], None], autocast: torch.dtype | None = torch.bfloat16
                   ) -> tuple[dict[str, str], dict]:
    """transformers' fastest attention on this device per mode, among "sdpa" and "eager" (under `autocast`), for
    the model `load(impl)` builds. GPU: sdpa, by the recipe. CPU: timed here, 1 warm-up + 2 steps each."""
    if device.type == "cuda":
        return {m: "sdpa" for m in modes}, {}
    timings: dict = {}
    for impl in ("sdpa", "eager"):
        hf = load(impl)
        opt, _ = make_optimizer(trainable(hf), device)
        c = Contender("probe", "transformers", "", hf, _hf_call(hf), autocast=autocast, opt=opt)
        for mode in modes:
            hf.train(mode == "train")
            step(c, batch, mode, device)
            timings.setdefault(mode, {})[impl] = min(timed(c, batch, mode, device) for _ in range(2))
        del hf, opt, c
        gc.collect()
    choice = {m: min(t, key=t.get) for m, t in timings.items()}
    for m, t in timings.items():
        log(f"  transformers attention, {m}: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in t.items())
            + f" -> {choice[m]}")
    return choice, timings


def _hf_call(hf: nn.Module) -> Callable:
    return lambda ids, mask: hf(input_ids=ids, attention_mask=mask).logits


def _lite_call(m: nn.Module) -> Callable:
    return lambda ids, mask: m(ids, mask)


# ---------------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m roberta_lite.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("train", "infer", "both"), default="both")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--config", choices=tuple(CONFIGS), default="base", help="model shape (tiny: smoke tests)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="a real Hugging Face RoBERTa checkpoint directory instead of a random one")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=256, help="sequence length with --lengths fixed")
    p.add_argument("--lengths", choices=("fixed", "imdb"), default="fixed",
                   help="fixed: every sequence --length long; imdb: log-normal, median 230 tokens, cut at 512, "
                        "batches padded to their longest rounded up to --pad-multiple")
    p.add_argument("--pad-multiple", type=int, default=PAD_MULTIPLE,
                   help="round each batch's length up to a multiple of this, for both sides, as train.py and "
                        "predict do (1: pad to the longest only)")
    p.add_argument("--sort", action=argparse.BooleanOptionalAction, default=None,
                   help="length-sorted batches, for both sides (default: on for cuda, off for cpu)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode and side")
    p.add_argument("--warmup", type=int, default=2,
                   help="warm-up steps per mode and side (at least one per distinct batch shape timed)")
    p.add_argument("--fp32", action="store_true",
                   help="roberta_lite vs transformers mode: with bf16 chosen (--precision), add fp32 rows for both "
                        "sides; with fp32 chosen they are the main rows already (accepted, adds nothing)")
    p.add_argument("--compile", choices=("none", "transformers", "both"), default=None,
                   help="add torch.compile rows (default: transformers on cuda, none on cpu)")
    p.add_argument("--hf-attn", choices=("auto", "sdpa", "eager"), default="auto",
                   help="transformers' attention (auto: the fastest on CPU, timed; sdpa on cuda)")
    p.add_argument("--attention-dropout", type=float, default=None, metavar="P",
                   help="attention-probability dropout for BOTH sides in training (default: the checkpoint's, "
                        "0.1); e.g. 0 to time roberta_lite's set_dropout(attention=0.0) recipe fairly")
    p.add_argument("--adapters", type=int, default=None, metavar="N",
                   help="many-task mode: N Houlsby adapters on one base; times one adapter for the whole batch, one "
                        "adapter per example (mixed, one pass), and N separate passes")
    p.add_argument("--adapter", choices=("houlsby", "lora"), default="houlsby",
                   help="lora: a LoRA r 8 on query/value against transformers + peft (training), and merged into "
                        "the base against the plain base (inference)")
    p.add_argument("--task", choices=("classification", "token-classification"), default="classification",
                   help="token-classification: a per-token head (21 labels) on both sides, against transformers' "
                        "RobertaForTokenClassification")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="every mode: the base's dtype (auto: bf16 where the CPU or GPU has it natively, as train.py "
                        "chooses, else fp32); transformers runs in the same precision (bf16: autocast; fp32: none) "
                        "and the ratios compare the two")
    p.add_argument("--no-transformers", action="store_true", help="roberta_lite alone")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write results here (atomically)")
    p.add_argument("--quiet", action="store_true", help="only the table")
    p.add_argument("--int8", action="store_true",
                   help="inference only: roberta_lite's int8 base against its best float one, transformers fp32/bf16, "
                        "transformers + torch dynamic int8 and ONNX Runtime int8 (pip install -e '.[bench]')")
    p.add_argument("--int8-fp32", action="store_true", help="with --int8: also time roberta_lite fp32")
    a = p.parse_args(argv)
    if a.steps < 1 or a.batch < 1 or a.length < 2 or a.warmup < 0:
        p.error("--steps and --batch must be >= 1, --length >= 2, --warmup >= 0")
    if a.attention_dropout is not None and not 0.0 <= a.attention_dropout < 1.0:
        p.error("--attention-dropout must be in [0, 1)")
    if a.adapters is not None and not 2 <= a.adapters <= a.batch:
        p.error(f"--adapters {a.adapters}: must lie in 2..--batch ({a.batch}), one adapter per example or more")
    if a.adapters is not None and a.adapter == "lora":
        p.error("--adapters and --adapter lora are separate modes: give one")
    if a.task != "classification" and (a.adapters is not None or a.adapter == "lora"):
        p.error("--task token-classification times roberta_lite against transformers (Houlsby): drop --adapters "
                "and --adapter lora")
    if (a.adapters is not None or a.adapter == "lora") and (a.fp32 or a.compile or a.lengths != "fixed"):
        p.error("--adapters / --adapter lora time fixed-length batches in one precision (--precision): drop --fp32, "
                "--compile and --lengths")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    if a.int8 and (a.device != "cpu" or a.adapters or a.adapter == "lora" or a.fp32 or a.compile):
        p.error("--int8 times CPU inference of the Houlsby rows: drop --device cuda, --adapters, --adapter lora, "
                "--fp32 (its fp32 rows are always there) and --compile")
    return a


def write_json(path: Path, data: dict):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    if a.adapters:
        return main_many(a)
    if a.adapter == "lora":
        return main_lora(a)
    if a.int8:
        return main_int8(a)
    log, device, notes, load_start = setup(a)
    dtype, precision = base_dtype(a, device)
    sort = a.sort if a.sort is not None else device.type == "cuda"
    compile_rows = a.compile or ("transformers" if device.type == "cuda" else "none")
    modes = ["train", "infer"] if a.mode == "both" else [a.mode]
    have_hf = not a.no_transformers
    if have_hf:
        try:
            import transformers  # noqa: F401
        except ImportError:
            have_hf = False
            notes.append("transformers is not installed: roberta_lite alone")
    elif a.no_transformers:
        notes.append("--no-transformers: roberta_lite alone")
    if a.fp32 and precision == "fp32":
        notes.append(f"--fp32 with --precision {a.precision} (fp32 here): the fp32 rows are the main rows already")
    for n in notes:
        log(f"note: {n}")

    with tempfile.TemporaryDirectory(prefix="roberta_lite_bench_") as tmp:
        ckpt, cfg, batches = checkpoint_and_batches(a, Path(tmp), have_hf, sort, device, log)

        lite = load_lite(ckpt, dtype, device, a.seed, a.attention_dropout, task=a.task)
        main_lite = lite_row(lite, precision, device)
        hf_recipes, attn_choice, attn_timings = {}, {}, {}
        if have_hf:
            probe_batch = max(batches, key=lambda b: b.shape[1])
            if a.hf_attn == "auto":
                log(f"probing transformers' attention implementations ({precision}) ...")
                attn_choice, attn_timings = pick_attention(
                    lambda impl: load_hf(ckpt, lite, device, impl, a.attention_dropout, a.task), device, modes,
                    probe_batch,
                    log, autocast=AUTOCAST[precision])
            else:
                attn_choice = {m: a.hf_attn for m in modes}
        # one transformers model per attention implementation chosen; its rows differ in autocast/compile only
        hf_models: dict[str, nn.Module] = {}
        parity = {}
        rows_by_mode: dict[str, list[Contender]] = {}
        for mode in modes:
            rows = [main_lite]
            if have_hf:
                impl = attn_choice[mode]
                if impl not in hf_models:
                    hf_models[impl] = load_hf(ckpt, lite, device, impl, a.attention_dropout, a.task)
                rows.append(hf_row(hf_models[impl], impl, precision, device, sort))
                hf_recipes[mode] = rows[-1].recipe
            rows_by_mode[mode] = rows
        if a.fp32 and precision == "bf16":  # fp32 rows beside the bf16 ones (with fp32 chosen they are the main rows)
            lite32 = load_lite(ckpt, torch.float32, device, a.seed, a.attention_dropout, task=a.task)
            copy_adapters(lite, lite32)
            row = lite_row(lite32, "fp32", device)
            for mode in modes:
                rows_by_mode[mode].append(row)
                if have_hf:
                    impl = attn_choice[mode]
                    rows_by_mode[mode].append(hf_row(hf_models[impl], impl, "fp32", device, sort))
        if compile_rows != "none":
            compiled_lite = None
            for mode in modes:
                if compile_rows == "both":
                    if compiled_lite is None:
                        compiled_lite = torch.compile(lite)
                    o, _ = make_optimizer(trainable(lite), device)
                    rows_by_mode[mode].append(Contender(f"{main_lite.label} +compile", "roberta_lite",
                                                        main_lite.recipe + " + torch.compile", lite,
                                                        _lite_call(compiled_lite), precision=precision,
                                                        compiled=True, opt=o))
                if have_hf:
                    plain = rows_by_mode[mode][1]
                    o, _ = make_optimizer(trainable(plain.model), device)
                    chf = torch.compile(plain.model)
                    rows_by_mode[mode].append(Contender(
                        f"{plain.label} +compile", "transformers", f"{plain.recipe} + torch.compile", plain.model,
                        _hf_call(chf), autocast=plain.autocast, precision=precision, compiled=True, opt=o))

        # parity: the two sides compute the same function (eval mode, first batch), each precision against its twin
        if have_hf:
            uncompiled = [r for r in rows_by_mode[modes[0]] if not r.compiled]
            ref = eval_logits(uncompiled, batches[0], device)
            for r in uncompiled:
                twin = f"roberta_lite {r.precision}"
                if r.side == "transformers" and twin in ref:
                    parity[f"{twin} vs {r.label}"] = float((ref[twin] - ref[r.label]).abs().max())
            parity["max |logit| (scale)"] = float(ref[main_lite.label].abs().max())
            log_parity(parity, log)

        for r in {id(r): r for rows in rows_by_mode.values() for r in rows}.values():
            r.task = a.task  # the FLOPs count its head
        results, probe = time_rows(rows_by_mode, batches, cfg, device, a.warmup, log)
        summary = transformers_ratios(results)

    data = {
        **run_info(a, device, batches, sort, load_start, probe, notes),
        "transformers": _version("transformers") if have_hf else None,
        "task": a.task,
        "adapter": ADAPTER.to_dict(),
        "dropout": dropout_info(a, cfg),
        "transformers_recipe": (next(iter(hf_recipes.values())) if len(set(hf_recipes.values())) == 1 else
                                "; ".join(f"{m}: {r}" for m, r in hf_recipes.items())) if hf_recipes else None,
        "transformers_recipe_by_mode": hf_recipes, "transformers_attention": attn_choice,
        "attention_probe_ms": {m: {k: v * 1e3 for k, v in t.items()} for m, t in attn_timings.items()},
        "parity_max_abs_diff": parity,
        "results": results,
        # the main rows: roberta_lite over transformers, both in `precision` (tokens/s)
        "ratio": {m: next(o["x_vs_transformers"] for o in out if o["label"] == main_lite.label)
                  for m, out in results.items()},
        "summary": summary,
    }
    return finish(a, data, log)


AUTOCAST = {"bf16": torch.bfloat16, "fp32": None}  # transformers' autocast per precision (its weights stay fp32)


def lite_row(m: Model, precision: str, device: torch.device) -> Contender:
    """roberta_lite in `precision`: the base stored in that dtype, fp32 adapters/head, no autocast."""
    opt, kind = make_optimizer(trainable(m), device)
    recipe = {"bf16": "Model.from_pretrained(dtype=torch.bfloat16): bf16 base, fp32 adapters/head, no autocast",
              "fp32": "Model.from_pretrained(dtype=torch.float32): fp32 throughout, no autocast"}[precision]
    return Contender(f"roberta_lite {precision}", "roberta_lite", f"{recipe}; AdamW {kind}", m, _lite_call(m),
                     precision=precision, opt=opt)


def hf_row(hf: nn.Module, impl: str, precision: str, device: torch.device, sort: bool) -> Contender:
    """transformers in `precision`: fp32 weights, under bf16 autocast for bf16, without autocast for fp32."""
    opt, kind = make_optimizer(trainable(hf), device)
    how = (f"fp32 weights + torch.autocast({device.type!r}, dtype=torch.bfloat16)" if precision == "bf16" else
           "fp32, no autocast")
    extra = ", length-sorted batches" if sort else ""
    return Contender(f"transformers {'bf16-autocast' if precision == 'bf16' else 'fp32'} {impl}", "transformers",
                     f"{type(hf).__name__} {how}, attn_implementation={impl!r}{extra}; AdamW {kind}",
                     hf, _hf_call(hf), autocast=AUTOCAST[precision], precision=precision, opt=opt)


def transformers_ratios(results: dict[str, list[dict]]) -> list[str]:
    """Sets each row's x_vs_transformers (its tokens/s over transformers' uncompiled row in the same precision) and
    x_vs_transformers_bf16 (over transformers' bf16 row: None without one, as in an fp32 run); returns the summary,
    one line per uncompiled roberta_lite row that has a transformers row to compare with."""
    summary = []
    for mode, out in results.items():
        hf: dict[str, dict] = {}
        for o in out:
            if o["side"] == "transformers" and not o["compiled"]:
                hf.setdefault(o["precision"], o)
        for o in out:
            same, bf16 = hf.get(o["precision"]), hf.get("bf16")
            o["x_vs_transformers"] = o["tokens_per_s"] / same["tokens_per_s"] if same else None
            o["x_vs_transformers_bf16"] = o["tokens_per_s"] / bf16["tokens_per_s"] if bf16 else None
            if o["side"] == "roberta_lite" and not o["compiled"] and same:
                summary.append(f"{mode}: {o['label']} / {same['label']} = {o['x_vs_transformers']:.2f}x tokens/s")
    return summary


# ---------------------------------------------------------------------------------------------- shared by the modes

def setup(a: argparse.Namespace) -> tuple[Callable[[str], None], torch.device, list[str], float | None]:
    """Threads, device, and the notes about a busy CPU: (log, device, notes, 1-min load average at start)."""
    log = (lambda s: None) if a.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    notes: list[str] = []
    load_start = _loadavg()
    if load_start is not None and device.type == "cpu" and load_start > 0.5:
        notes.append(f"1-min load average {load_start:.1f} at start on {os.cpu_count()} cores: other processes "
                     f"share the CPU; absolute numbers are pessimistic, the alternating ratio less affected")
        if torch.get_num_threads() > 1 and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
            notes.append("on a shared CPU, OpenMP's spin-waiting threads can make every step several times slower: "
                         "run with OMP_WAIT_POLICY=PASSIVE in the environment, or --threads 1")
    return log, device, notes, load_start


def checkpoint_and_batches(a: argparse.Namespace, tmp: Path, have_hf: bool, sort: bool, device: torch.device,
                           log: Callable[[str], None]) -> tuple[Path, dict, list[Batch]]:
    """The checkpoint both sides load (--checkpoint, or a random one written under tmp) and the timed batches."""
    t0 = time.perf_counter()
    if a.checkpoint is not None:
        ckpt = a.checkpoint
        cfg = json.loads((ckpt / "config.json").read_text())
    else:
        ckpt = tmp / "ckpt"
        cfg = write_checkpoint(ckpt, a.config, a.seed) if have_hf else _write_checkpoint_plain(
            ckpt, {**COMMON, **CONFIGS[a.config]})
    log(f"checkpoint: {ckpt if a.checkpoint else 'random ' + a.config} ({time.perf_counter() - t0:.1f}s)")
    max_len = cfg["max_position_embeddings"] - cfg["pad_token_id"] - 1
    batches = make_batches(a.lengths, a.steps, a.batch, a.length, cfg["vocab_size"], max_len, sort, a.seed + 1,
                           device, a.pad_multiple, TOKEN_LABELS if getattr(a, "task", None) == "token-classification"
                           else None)
    return ckpt, cfg, batches


def eval_logits(rows: list[Contender], b: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    """Each row's float32 logits on one batch, in eval mode (for the parity figures)."""
    out = {}
    with torch.inference_mode():
        for r in rows:
            r.model.eval()
            with r.autocast_ctx(device):
                out[r.label] = r.call(b.ids, b.mask).float()
    return out


def log_parity(parity: dict[str, float], log: Callable[[str], None]):
    log("parity (eval, batch 0, max |logit diff|): " + ", ".join(f"{k}: {v:.2e}" for k, v in parity.items()))


def time_rows(rows_by_mode: dict[str, list[Contender]], batches: list[Batch], cfg: dict, device: torch.device,
              warmup: int, log: Callable[[str], None]) -> tuple[dict[str, list[dict]], MemoryProbe]:
    """Warm up, time every row on every batch with the order rotating each step, then one untimed step per row
    for memory. Returns mode -> one result dict per row, and the memory probe used."""
    probe = MemoryProbe(device)
    results: dict[str, list[dict]] = {}
    for mode, rows in rows_by_mode.items():
        set_mode(rows, mode)
        # warm-up: every distinct shape once for every row (first sight of a shape is slow), then up to --warmup
        shapes = {}
        for b in batches:
            shapes.setdefault(b.shape, b)
        warm = list(shapes.values())
        while len(warm) < warmup:
            warm.append(batches[len(warm) % len(batches)])
        tw = time.perf_counter()
        for b in warm:
            for r in rows:
                t = time.perf_counter()
                step(r, b, mode, device)
                if r.compiled and "compile_s" not in r.memory:
                    r.memory["compile_s"] = time.perf_counter() - t
        log(f"{mode}: warm-up {len(warm)} step(s) x {len(rows)} row(s) over {len(shapes)} shape(s) "
            f"({time.perf_counter() - tw:.1f}s); timing {len(batches)} step(s) ...")
        times = {r.label: [] for r in rows}
        for i, b in enumerate(batches):
            k = i % len(rows)
            for r in rows[k:] + rows[:k]:  # rotate who goes first
                times[r.label].append(timed(r, b, mode, device))
        mem = {}
        for r in rows:  # one extra, untimed step each for memory
            probe.before()
            step(r, batches[0], mode, device)
            mem[r.label] = probe.after()
        results[mode] = [result_row(r, times[r.label], mem[r.label], batches, cfg, mode) for r in rows]
    return results, probe


def result_row(r: Contender, ts: list[float], mem: tuple[int, int], batches: list[Batch], cfg: dict,
               mode: str) -> dict:
    tps = [b.real_tokens / t for b, t in zip(batches, ts)]
    fl = [flops(cfg, b.shape[0], b.shape[1], mode == "train", r.adapter, r.task) / t for b, t in zip(batches, ts)]
    return {
        "label": r.label, "side": r.side, "precision": r.precision, "compiled": r.compiled,
        "recipe": r.recipe,
        # one shape: real tokens / median step time; a length mix: median of the per-step rates
        "tokens_per_s": (batches[0].real_tokens / statistics.median(ts)
                         if len({b.real_tokens for b in batches}) == 1 else statistics.median(tps)),
        "tokens_per_s_total": sum(b.real_tokens for b in batches) / sum(ts),
        "step_ms_median": statistics.median(ts) * 1e3,
        "step_ms": [t * 1e3 for t in ts],
        "tflops": statistics.median(fl) / 1e12,
        "peak_mem_mb": mem[0] / 2**20,
        "step_mem_mb": mem[1] / 2**20,
        **({"compile_and_first_step_s": r.memory["compile_s"]} if "compile_s" in r.memory else {}),
    }


def matmul_peak(device: torch.device, dtype: torch.dtype, tokens: int = 2048, reps: int = 7) -> float:
    """TFLOP/s of the FFN's up-projection shape, (tokens, 768) x (768, 3072), in `dtype`, median of `reps`
    timings: what this device does on the model's biggest matmul, measured in the same run as the rows."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, 768, generator=g).to(device, dtype)
    w = torch.randn(3072, 768, generator=g).to(device, dtype)
    with torch.inference_mode():
        F.linear(x, w)
        ts = []
        for _ in range(reps):
            sync(device)
            t0 = time.perf_counter()
            F.linear(x, w)
            sync(device)
            ts.append(time.perf_counter() - t0)
    return 2 * tokens * 768 * 3072 / statistics.median(ts) / 1e12


def run_info(a: argparse.Namespace, device: torch.device, batches: list[Batch], sort: bool,
             load_start: float | None, probe: MemoryProbe, notes: list[str]) -> dict:
    """The JSON fields every mode shares: machine, shapes, load, memory method, the matmul peak."""
    real = sum(b.real_tokens for b in batches)
    padded = sum(b.shape[0] * b.shape[1] for b in batches)
    return {
        "device": device.type,
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or
        platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "omp_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "LD_PRELOAD")
                    if k in os.environ},
        "config": a.config if a.checkpoint is None else str(a.checkpoint),
        "batch": a.batch, "lengths": a.lengths, "pad_multiple": a.pad_multiple,
        "length": a.length if a.lengths == "fixed" else None,
        "sorted_batches": sort, "steps": a.steps, "warmup": a.warmup,
        "precision": base_dtype(a, device)[1], "precision_requested": a.precision,
        "real_tokens_per_batch_mean": real / len(batches), "padding_fraction": 1 - real / padded,
        "loadavg_1min": {"start": load_start, "end": _loadavg()},
        "matmul_peak_tflops": {"bf16": matmul_peak(device, torch.bfloat16),
                               "fp32": matmul_peak(device, torch.float32)},
        "memory_method": probe.method,
        "flop_model": "padded-batch matmul FLOPs; forward 2*weights*tokens + 4*T^2*C per layer per sequence; "
                      "train = forward + input-grad backward (attention core 2x, none for layer 0's attention "
                      "block) + adapter/head weight grads",
        "notes": notes,
    }


def dropout_info(a: argparse.Namespace, cfg: dict) -> dict:
    return {"hidden": cfg.get("hidden_dropout_prob", 0.1),
            "attention": a.attention_dropout if a.attention_dropout is not None
            else cfg.get("attention_probs_dropout_prob", 0.1)}


def finish(a: argparse.Namespace, data: dict, log: Callable[[str], None]) -> dict:
    """Each row's share of the matmul peak, then the table, then the JSON."""
    for rows in data["results"].values():
        for o in rows:
            o["fraction_of_matmul_peak"] = o["tflops"] / data["matmul_peak_tflops"][o["precision"]]
    print(format_table(data))
    if a.json:
        write_json(a.json, data)
        log(f"wrote {a.json}")
    return data


# ---------------------------------------------------------------------------------------------- --adapters N

def task_names(n: int) -> list[str]:
    return [f"task{i}" for i in range(n)]


def separate_passes(m: Model, names: list[str]) -> Callable:
    """What a library without mixed batches does: one pass per adapter over its own examples, logits put back in
    the batch's order (the backward, too, runs once per pass)."""
    groups = {n: [i for i, x in enumerate(names) if x == n] for n in dict.fromkeys(names)}
    order = [i for rows in groups.values() for i in rows]
    back = torch.argsort(torch.tensor(order))

    def call(ids, mask):
        out = torch.cat([m(ids[rows], mask[rows], adapter=n) for n, rows in groups.items()])
        return out[back.to(out.device)]

    return call


def base_dtype(a: argparse.Namespace, device: torch.device) -> tuple[torch.dtype, str]:
    """--precision, in every mode: (the base's dtype, its name)."""
    from roberta_lite import runtime  # select_dtype: train.py's choice of the base's dtype

    dtype = runtime.select_dtype(a.precision, device)
    return dtype, "bf16" if dtype == torch.bfloat16 else "fp32"


def main_many(a: argparse.Namespace) -> dict:
    """--adapters N: one model with N Houlsby adapters; (a) a batch with one adapter, (b) the same batch with one
    adapter per example (the mixed batch: one pass of the base), (c) N passes, one per adapter's examples."""
    log, device, notes, load_start = setup(a)
    modes = ["train", "infer"] if a.mode == "both" else [a.mode]
    n = a.adapters
    names = [task_names(n)[i % n] for i in range(a.batch)]
    for note in notes:
        log(f"note: {note}")
    with tempfile.TemporaryDirectory(prefix="roberta_lite_bench_") as tmp:
        ckpt, cfg, batches = checkpoint_and_batches(a, Path(tmp), not a.no_transformers, False, device, log)
        dtype, precision = base_dtype(a, device)
        m = load_lite(ckpt, dtype, device, a.seed, a.attention_dropout, names=task_names(n))
        m.requires_grad_(False)
        for name in m.adapter_names:  # every task trains: the base stays frozen
            for _, p in adapter_tensors(m, name):
                p.requires_grad_(True)
        recipe = f"Model.from_pretrained(dtype={dtype}), {n} Houlsby adapters (rf 16) + heads, base frozen"
        calls = {"one": (f"1 adapter ({a.batch} x task0)", lambda ids, mask: m(ids, mask, adapter="task0")),
                 "mixed": (f"{n} adapters mixed (1 pass)", lambda ids, mask: m(ids, mask, adapter=names)),
                 "separate": (f"{n} adapters, {n} passes", separate_passes(m, names))}
        rows = {k: Contender(f"{label} {precision}", "roberta_lite", recipe, m, call, precision=precision,
                             opt=make_optimizer(trainable(m), device)[0]) for k, (label, call) in calls.items()}
        ref = eval_logits(list(rows.values()), batches[0], device)
        first = [i for i, x in enumerate(names) if x == "task0"]
        parity = {"mixed vs separate passes": float((ref[rows["mixed"].label] - ref[rows["separate"].label])
                                                     .abs().max()),
                  "mixed vs one adapter (task0's examples)": float((ref[rows["mixed"].label][first]
                                                                    - ref[rows["one"].label][first]).abs().max()),
                  "max |logit| (scale)": float(ref[rows["mixed"].label].abs().max())}
        log_parity(parity, log)
        results, probe = time_rows({mode: list(rows.values()) for mode in modes}, batches, cfg, device, a.warmup,
                                   log)
    step_ms = {mode: {k: next(o["step_ms_median"] for o in results[mode] if o["label"] == r.label)
                      for k, r in rows.items()} for mode in modes}
    ratios = {mode: {"mixed / one adapter": s["mixed"] / s["one"], "separate / mixed": s["separate"] / s["mixed"]}
              for mode, s in step_ms.items()}
    data = {**run_info(a, device, batches, False, load_start, probe, notes), "adapters": n,
            "dropout": dropout_info(a, cfg),
            "adapter": ADAPTER.to_dict(), "names_per_example": names, "parity_max_abs_diff": parity,
            "results": results, "ratio": ratios,
            "summary": [f"{mode}: mixed / one adapter = {r['mixed / one adapter']:.2f}x step time (target <= 1.2), "
                        f"{n} passes / mixed = {r['separate / mixed']:.2f}x" for mode, r in ratios.items()]}
    return finish(a, data, log)


# ---------------------------------------------------------------------------------------------- --adapter lora

LORA = AdapterConfig(kind="lora", r=8, alpha=16.0, targets=("query", "value"))


def load_peft(ckpt: Path, adapter_dir: Path, device: torch.device, attn: str,
              attn_dropout: float | None = None) -> nn.Module:
    """transformers' RobertaForSequenceClassification (fp32 weights) wrapped by peft with the LoRA adapter that
    roberta_lite saved in peft's format: the same LoRA weights and classifier, trainable as peft trains them."""
    import peft
    from transformers import RobertaForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf = RobertaForSequenceClassification.from_pretrained(ckpt, dtype=torch.float32, attn_implementation=attn)
    if attn_dropout is not None:
        for layer in hf.roberta.encoder.layer:
            layer.attention.self.dropout.p = attn_dropout
    return peft.PeftModel.from_pretrained(hf, str(adapter_dir), is_trainable=True).to(device)


def main_lora(a: argparse.Namespace) -> dict:
    """--adapter lora: training with a LoRA (r 8, query and value) against transformers + peft holding the same
    LoRA weights; inference with the LoRA merged into the base against the plain base."""
    log, device, notes, load_start = setup(a)
    modes = ["train", "infer"] if a.mode == "both" else [a.mode]
    have_peft = not a.no_transformers
    try:
        import peft  # noqa: F401
    except ImportError:
        have_peft = False
        notes.append("peft is not installed: roberta_lite alone")
    for note in notes:
        log(f"note: {note}")
    with tempfile.TemporaryDirectory(prefix="roberta_lite_bench_") as tmp:
        ckpt, cfg, batches = checkpoint_and_batches(a, Path(tmp), have_peft, False, device, log)
        dtype, precision = base_dtype(a, device)
        lite = load_lite(ckpt, dtype, device, a.seed, a.attention_dropout, adapter=LORA)
        native, in_peft = lite.save_adapter(Path(tmp) / "lora"), lite.save_adapter(Path(tmp) / "peft", format="peft")

        def base():
            return Model.from_pretrained(ckpt, num_labels=NUM_LABELS, dtype=dtype, device=device)

        merged, plain = base().load_adapter(native).merge_adapter(), base()
        opt, opt_kind = make_optimizer(trainable(lite), device)
        lite_row = Contender(f"roberta_lite {precision} LoRA", "roberta_lite", f"Model.from_pretrained(dtype={dtype}) "
                             f"+ LoRA r 8 query/value (fp32); AdamW {opt_kind}", lite, _lite_call(lite),
                             precision=precision, opt=opt, adapter=LORA)
        rows_by_mode = {"train": [lite_row], "infer": [
            Contender(f"roberta_lite {precision} LoRA merged", "roberta_lite", "merge_adapter(): the LoRA folded "
                      "into the base weights", merged, _lite_call(merged), precision=precision, adapter=None),
            Contender(f"roberta_lite {precision} base, no adapter", "roberta_lite", "the same base, no adapter",
                      plain, _lite_call(plain), precision=precision, adapter=None),
            lite_row]}
        attn_choice, peft_recipe, peft_models = {}, None, {}
        if have_peft:
            load = lambda impl: load_peft(ckpt, in_peft, device, impl, a.attention_dropout)  # noqa: E731
            attn_choice = ({m: a.hf_attn for m in modes} if a.hf_attn != "auto" else
                           pick_attention(load, device, modes, batches[0], log,
                                          autocast=torch.bfloat16 if precision == "bf16" else None)[0])
            autocast = f" + torch.autocast({device.type!r}, dtype=torch.bfloat16)" if precision == "bf16" else ""
            for mode in modes:
                impl = attn_choice[mode]
                model = peft_models.get(impl) or peft_models.setdefault(impl, load(impl))
                peft_recipe = (f"peft.PeftModel.from_pretrained(RobertaForSequenceClassification fp32 weights, the "
                               f"same LoRA written by save_adapter(format='peft')){autocast}, "
                               f"attn_implementation={impl!r}; AdamW {opt_kind}")
                rows_by_mode[mode].append(Contender(
                    f"transformers+peft {'bf16-autocast' if autocast else 'fp32'} {impl}", "transformers", peft_recipe,
                    model, _hf_call(model), autocast=torch.bfloat16 if autocast else None, precision=precision,
                    opt=make_optimizer(trainable(model), device)[0], adapter=LORA))
        rows_by_mode = {mode: rows_by_mode[mode] for mode in modes}
        ref = eval_logits(list({id(r): r for rows in rows_by_mode.values() for r in rows}.values()), batches[0],
                          device)
        parity = {f"{lite_row.label} vs {k}": float((ref[lite_row.label] - v).abs().max())
                  for k, v in ref.items() if k != lite_row.label}
        parity.update(lora_parity_fp32(ckpt, native, next(iter(peft_models.values()), None), batches[0], device))
        log_parity(parity, log)
        results, probe = time_rows(rows_by_mode, batches, cfg, device, a.warmup, log)
    ratio = lora_ratios(results, lite_row.label, precision)
    data = {**run_info(a, device, batches, False, load_start, probe, notes), "adapter": LORA.to_dict(),
            "dropout": dropout_info(a, cfg), "peft": _version("peft") if have_peft else None,
            "transformers_recipe": peft_recipe, "transformers_attention": attn_choice, "parity_max_abs_diff": parity,
            "results": results, "ratio": ratio, "summary": [f"{k} = {v:.2f}x" for k, v in ratio.items()]}
    return finish(a, data, log)


def lora_parity_fp32(ckpt: Path, native: Path, peft_model: nn.Module | None, b: Batch,
                     device: torch.device) -> dict[str, float]:
    """In fp32, where rounding cannot hide a difference: roberta_lite's LoRA against peft's, next to the LoRA's own
    effect on the logits (with against without it) and the logits' scale."""
    m = Model.from_pretrained(ckpt, num_labels=NUM_LABELS, device=device).load_adapter(native).eval()
    with torch.inference_mode():
        ours = m(b.ids, b.mask)
        m.active_adapter = None  # the checkpoint's classifier, which the adapter's head copies
        out = {"fp32: LoRA's own effect (roberta_lite with vs without it)": float((ours - m(b.ids, b.mask))
                                                                                .abs().max())}
        if peft_model is not None:
            peft_model.eval()
            theirs = peft_model(input_ids=b.ids, attention_mask=b.mask).logits
            out["fp32: roberta_lite LoRA vs transformers+peft"] = float((ours - theirs).abs().max())
        out["fp32: max |logit| (scale)"] = float(ours.abs().max())
    return out


def lora_ratios(results: dict[str, list[dict]], lite_label: str, precision: str) -> dict[str, float]:
    ratio = {}
    for mode, out in results.items():
        by = {o["label"]: o for o in out}
        peft_row = next((o for o in out if o["side"] == "transformers"), None)
        if peft_row is not None:
            ratio[f"{mode}: roberta_lite / peft tok/s"] = by[lite_label]["tokens_per_s"] / peft_row["tokens_per_s"]
        if mode == "infer":
            merged, plain = by[f"roberta_lite {precision} LoRA merged"], by[f"roberta_lite {precision} base, no adapter"]
            ratio["infer: merged / plain base step time"] = merged["step_ms_median"] / plain["step_ms_median"]
            ratio["infer: unmerged / merged step time"] = by[lite_label]["step_ms_median"] / merged["step_ms_median"]
    return ratio


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _version(pkg: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(pkg)
    except Exception:
        return None


def format_table(d: dict) -> str:
    shape = f"{d['batch']} x {d['length']}" if d["lengths"] == "fixed" else \
        f"{d['batch']} x imdb-mix (mean {d['real_tokens_per_batch_mean'] / d['batch']:.0f} real tokens/seq, " \
        f"{100 * d['padding_fraction']:.0f}% padding{', sorted' if d['sorted_batches'] else ''})"
    task = f", {d['task']} head" if d.get("task", "classification") != "classification" else ""
    lines = [f"roberta_lite bench: {d['config']}{task} on {d['device']} ({d['device_name']}, {d['threads']} threads), "
             f"batch {shape}, dropout {d['dropout']['hidden']:g} / attention {d['dropout']['attention']:g}, "
             f"{d['steps']} timed steps, medians, precision {d['precision']} (--precision {d['precision_requested']})",
             f"{'mode':<6} {'row':<40} {'tok/s':>9} {'ms/step':>9} {'x HF':>9} {'TFLOP/s':>8} {'% peak':>6} "
             f"{'step MiB':>9} {'peak MiB':>9}"]
    for mode, rows in d["results"].items():
        for o in rows:
            x = f"{o['x_vs_transformers']:.2f}x" if o.get("x_vs_transformers") else "-"
            lines.append(f"{mode:<6} {o['label']:<40} {o['tokens_per_s']:>9,.0f} {o['step_ms_median']:>9,.1f} "
                         f"{x:>9} {o['tflops']:>8.3f} {100 * o['fraction_of_matmul_peak']:>5.0f}% "
                         f"{o['step_mem_mb']:>9,.0f} {o['peak_mem_mb']:>9,.0f}")
    peak = d["matmul_peak_tflops"]
    lines.append(f"matmul peak, this run: bf16 {peak['bf16']:.3f}, fp32 {peak['fp32']:.3f} TFLOP/s on (2048 x 768) x "
                 f"(768 x 3072); '% peak' = the row's TFLOP/s over its precision's peak")
    if any(o.get("x_vs_transformers") for rows in d["results"].values() for o in rows):
        lines.append("'x HF' = the row's tok/s over transformers' uncompiled row in the same precision")
    lines.append(f"memory: {d['memory_method']}; 'step' = peak above what was held before one step, "
                 f"'peak' = whole process (every row's models)")
    if d.get("transformers_recipe"):
        lines.append(f"transformers recipe: {d['transformers_recipe']}")
    for k, v in d["parity_max_abs_diff"].items():
        lines.append(f"parity (eval, batch 0, max |logit diff|): {k}: {v:.2e}")
    lines.extend(d.get("summary", []))
    for n in d["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- --int8

def main_int8(a: argparse.Namespace) -> dict:
    """CPU inference: roberta_lite with an int8 base (Model.quantize) against roberta_lite's best float precision
    (--precision; bf16 where the CPU has it; fp32 too with --int8-fp32), transformers fp32 and bf16 autocast (sdpa, or --hf-attn),
    transformers with torch's dynamic int8 (torch.ao.quantization.quantize_dynamic on every nn.Linear), and ONNX
    Runtime's dynamic int8 (the fp32 transformers model, adapters included, exported by torch.onnx and quantized by
    onnxruntime.quantization.quantize_dynamic: int8 weights, per output channel). Rows without their package are
    left out with a note. Every row's logits on batch 0 against roberta_lite fp32's: relative error."""
    import copy

    log, device, notes, load_start = setup(a)
    dtype, precision = base_dtype(a, device)
    impl = "sdpa" if a.hf_attn == "auto" else a.hf_attn
    with tempfile.TemporaryDirectory(prefix="roberta_lite_bench_") as tmp:
        ckpt, cfg, batches = checkpoint_and_batches(a, Path(tmp), True, False, device, log)
        lite = load_lite(ckpt, dtype, device, a.seed)
        rows = [lite_row(lite, precision, device)]
        lite32 = load_lite(ckpt, torch.float32, device, a.seed)  # the reference for the logits (timed with --fp32)
        copy_adapters(lite, lite32)
        if precision != "fp32" and a.int8_fp32:
            rows.append(lite_row(lite32, "fp32", device))
        q = load_lite(ckpt, torch.float32, device, a.seed)  # frozen (freeze_base) before it is quantized
        copy_adapters(lite, q)
        q.quantize("int8")
        rows.insert(0, Contender("roberta_lite int8", "roberta_lite", "Model.from_pretrained(dtype=torch.float32)"
                                 ".quantize('int8'): int8 base (per-channel weights, per-token activations), fp32 "
                                 "rest", q, _lite_call(q), precision="int8"))
        hf = load_hf(ckpt, lite, device, impl)
        rows += [hf_row(hf, impl, "fp32", device, False), hf_row(hf, impl, "bf16", device, False)]
        hfq = _torch_dynamic_int8(copy.deepcopy(hf))
        rows.append(Contender(f"transformers fp32 {impl} + torch int8", "transformers",
                              "torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8) "
                              "(fbgemm/x86 defaults: per-tensor weights and activations, 7-bit activations)",
                              hfq, _hf_call(hfq), precision="int8"))
        ort_row = _onnxruntime_int8(hf, batches, Path(tmp), notes, log)
        if ort_row is not None:
            rows.append(ort_row)
        for n in notes:
            log(f"note: {n}")
        ref = eval_logits(rows, batches[0], device)
        base = eval_logits([lite_row(lite32, "fp32", device)], batches[0], device)["roberta_lite fp32"]
        parity = {k: float((v - base).norm() / base.norm()) for k, v in ref.items() if k != "roberta_lite fp32"}
        log("logits on batch 0, |row - roberta_lite fp32| / |roberta_lite fp32|: "
            + ", ".join(f"{k}: {v:.2e}" for k, v in parity.items()))
        results, probe = time_rows({"infer": rows}, batches, cfg, device, a.warmup, log)
    out = results["infer"]
    summary = transformers_ratios(results)
    by = {o["label"]: o for o in out}
    mine = by["roberta_lite int8"]
    for o in out:
        o["x_vs_roberta_lite_int8"] = o["tokens_per_s"] / mine["tokens_per_s"]
    summary += [f"infer: roberta_lite int8 / {o['label']} = {mine['tokens_per_s'] / o['tokens_per_s']:.2f}x tokens/s"
                for o in out if o is not mine]
    summary += [f"logits on batch 0, relative error against roberta_lite fp32: {k} {v:.2e}" for k, v in parity.items()]
    data = {
        **run_info(a, device, batches, False, load_start, probe, notes),
        "transformers": _version("transformers"), "onnxruntime": _version("onnxruntime"),
        "cpu_flags": _cpu_flags(), "adapter": ADAPTER.to_dict(), "dropout": dropout_info(a, cfg),
        "transformers_attention": {"infer": impl},
        "parity_max_abs_diff": {}, "logits_relative_error_vs_roberta_lite_fp32": parity,
        "results": results, "summary": list(dict.fromkeys(summary)),
    }
    data["matmul_peak_tflops"]["int8"] = int8_matmul_peak()
    return finish(a, data, log)


def _torch_dynamic_int8(model: nn.Module) -> nn.Module:
    import warnings

    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in torch 2.13; it is the opponent here
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


class _OrtModel(nn.Module):
    """An ONNX Runtime session as a module the timing loop can call (train/eval do nothing)."""

    def __init__(self, session):
        super().__init__()
        self.session = session

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        feed = {"input_ids": ids.cpu().numpy(), "attention_mask": mask.cpu().numpy()}
        return torch.from_numpy(self.session.run(None, feed)[0])


def _onnxruntime_int8(hf: nn.Module, batches: list[Batch], tmp: Path, notes: list[str],
                      log: Callable[[str], None]) -> Contender | None:
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        notes.append("onnxruntime is not installed (pip install -e '.[bench]'): no ONNX Runtime row")
        return None
    import contextlib
    import io
    import warnings

    t0 = time.perf_counter()
    b = batches[0]
    dim = {0: torch.export.Dim("batch"), 1: torch.export.Dim("length")}
    fp32, int8 = tmp / "model.onnx", tmp / "model.int8.onnx"
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            hf.eval()
            torch.onnx.export(hf, (b.ids, b.mask), str(fp32), input_names=["input_ids", "attention_mask"],
                              output_names=["logits"], dynamo=True, dynamic_shapes=(dim, dim))
            quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True)
    except Exception as e:  # an exporter without onnxscript, or one that fails on this model: say so, go on
        notes.append(f"ONNX export/quantization failed, no ONNX Runtime row: {' '.join(str(e).split())[:300]}")
        return None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(int8), opts, providers=["CPUExecutionProvider"])
    log(f"ONNX Runtime int8: exported and quantized in {time.perf_counter() - t0:.1f}s")
    m = _OrtModel(session)
    return Contender("onnxruntime int8", "onnxruntime",
                     f"onnxruntime {ort.__version__} CPUExecutionProvider, torch.onnx.export(dynamo=True) of the "
                     f"transformers fp32 model + quantize_dynamic(weight_type=QInt8, per_channel=True), "
                     f"{opts.intra_op_num_threads} intra-op threads", m, m, precision="int8")


def int8_matmul_peak(tokens: int = 2048, reps: int = 7) -> float:
    """TOP/s of roberta_lite's int8 linear (quantize.Int8Linear) on the matmul_peak shape, (tokens, 768) x
    (768, 3072), its per-token quantization included."""
    from roberta_lite.quantize import Int8Linear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, 768, generator=g)
    lin = Int8Linear(nn.Linear(768, 3072), "peak")
    with torch.inference_mode():
        lin(x)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            lin(x)
            ts.append(time.perf_counter() - t0)
    return 2 * tokens * 768 * 3072 / statistics.median(ts) / 1e12


def _cpu_flags() -> list[str]:
    """The CPU's vector and matrix flags that decide bf16 and int8 speed."""
    wanted = {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile"}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return sorted(wanted & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return []


if __name__ == "__main__":
    main()
