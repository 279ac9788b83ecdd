"""RoBERTa with bottleneck adapters, from scratch, in one file.

RoBERTa (Liu et al. 2019) is BERT's encoder trained better: same layers, byte-level BPE, no next-sentence task.
Each of its layers is two sublayers, each followed by a residual add and a LayerNorm ("post-LN", the original
Transformer arrangement; GPT-2 and later models moved the norm before the sublayer):

        x ─────────────────────────────┐                         x: (B, T, C) hidden states
        │                              │
        ├─► attention ─► proj ─► dropout ─► [Houlsby adapter] ─►(+)─► LayerNorm ─► x
        │                                                                          │
        x ─────────────────────────────┐                                           │
        │                              │                                           ▼
        ├─► up (C→4C) ─► GELU ─► down (4C→C) ─► dropout ─► [adapter] ─►(+)─► LayerNorm ─► x

A bottleneck adapter (Houlsby et al. 2019) is a tiny residual MLP, C → C/r → C, trained while the whole
pretrained model stays frozen: ~1.4% of the parameters (Houlsby, r=16, roberta-base) learn a new task, and one
copy of the base serves every task.
    Houlsby:  adapters in both places above, reading the sublayer's output h:   x ← LN(x + h + A(h))
    Pfeiffer: one adapter after the FFN only, reading the normalised sum:       x ← LN(x + h + A(LN(x + h)))
              (the layer's own LayerNorm is used twice, as in AdapterHub's SeqBnConfig)
The adapter's up-projection starts at zero, so an untrained adapter is the identity and the model starts exactly
as pretrained.

Reading order: Config, Adapter, SelfAttention, FeedForward, Layer, Embeddings, the heads, then Model, whose
`from_pretrained` loads Hugging Face checkpoints through the table in weights.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from roberta_lite import weights as W


# ---------------------------------------------------------------------------------------------- configuration

@dataclass
class Config:
    """Architecture. Defaults are roberta-base; `from_hf` reads any checkpoint's config.json."""

    vocab_size: int = 50265
    hidden_size: int = 768  # C
    num_layers: int = 12
    num_heads: int = 12  # C must divide evenly: head size 64
    ffn_size: int = 3072  # 4C
    max_positions: int = 514  # 512 tokens + the pad_id+1 positions RoBERTa skips (see Embeddings)
    type_vocab_size: int = 1  # RoBERTa has no sentence-B embedding; the table is kept for checkpoint fidelity
    layer_norm_eps: float = 1e-5  # RoBERTa's; BERT uses 1e-12
    pad_id: int = 1  # <pad> in roberta-base's vocabulary; it also sets where positions start
    dropout: float = 0.1  # hidden states, after embeddings and after each sublayer
    attention_dropout: float = 0.1  # attention probabilities
    classifier_dropout: float | None = None  # None: use `dropout`
    initializer_range: float = 0.02  # std of fresh (head/adapter) weights, as the checkpoint was trained with

    # config.json key -> our field. Everything architectural comes from the checkpoint, nothing is assumed.
    HF_KEYS = {
        "vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_hidden_layers": "num_layers",
        "num_attention_heads": "num_heads", "intermediate_size": "ffn_size",
        "max_position_embeddings": "max_positions", "type_vocab_size": "type_vocab_size",
        "layer_norm_eps": "layer_norm_eps", "pad_token_id": "pad_id", "hidden_dropout_prob": "dropout",
        "attention_probs_dropout_prob": "attention_dropout", "classifier_dropout": "classifier_dropout",
        "initializer_range": "initializer_range",
    }
    REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "pad_token_id")

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "Config":
        model_type = d.get("model_type")
        if model_type != "roberta":
            raise ValueError(f"{source}: model_type {model_type!r} is not supported (only 'roberta')")
        act = d.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"{source}: hidden_act {act!r} is not supported (RoBERTa uses exact 'gelu')")
        for key in cls.REQUIRED:
            if key not in d:
                raise ValueError(f"{source}: required key {key!r} is missing")
        kw = {}
        types = {f.name: f.type for f in fields(cls)}  # "int", "float", "float | None" (annotations are strings)
        for hf_key, name in cls.HF_KEYS.items():
            if hf_key not in d:
                continue
            v, want = d[hf_key], types[name]
            number = isinstance(v, (int, float)) and not isinstance(v, bool)
            if not ((number and (isinstance(v, int) or "float" in want)) or (v is None and "None" in want)):
                raise ValueError(f"{source}: {hf_key}={v!r} is not a valid {want}")
            kw[name] = v
        cfg = cls(**kw)
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(f"{source}: hidden_size {cfg.hidden_size} is not divisible by "
                             f"num_attention_heads {cfg.num_heads}")
        return cfg

    @property
    def max_tokens(self) -> int:
        """Longest sequence the position table allows: RoBERTa spends pad_id+1 rows before the first token."""
        return self.max_positions - self.pad_id - 1


@dataclass
class AdapterConfig:
    """A bottleneck adapter: where it sits (`kind`) and how wide it is (hidden_size // reduction_factor)."""

    kind: str = "houlsby"  # "houlsby": after attention and after FFN; "pfeiffer": after FFN only
    reduction_factor: int = 16  # 768 / 16 = a 48-wide bottleneck on roberta-base
    activation: str = "relu"  # "relu", "gelu", "swish" or "tanh"

    KINDS = ("houlsby", "pfeiffer")
    ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu, "silu": F.silu, "tanh": torch.tanh}

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise ValueError(f"adapter kind {self.kind!r}: expected one of {', '.join(self.KINDS)}")
        if self.activation not in self.ACTIVATIONS:
            raise ValueError(f"adapter activation {self.activation!r}: expected one of {', '.join(self.ACTIVATIONS)}")
        if isinstance(self.reduction_factor, bool) or not isinstance(self.reduction_factor, int) or self.reduction_factor < 1:
            raise ValueError(f"adapter reduction_factor {self.reduction_factor!r}: expected a positive integer")

    @classmethod
    def of(cls, spec: "AdapterConfig | str | dict") -> "AdapterConfig":
        """'houlsby' / 'pfeiffer' shorthand, a dict (from adapter_config.json), or an AdapterConfig."""
        if isinstance(spec, AdapterConfig):
            return spec
        if isinstance(spec, str):
            return cls(kind=spec)
        if isinstance(spec, dict):
            unknown = set(spec) - {f.name for f in fields(cls)}
            if unknown:
                raise ValueError(f"adapter config: unknown keys {sorted(unknown)}")
            return cls(**spec)
        raise TypeError(f"adapter: expected 'houlsby', 'pfeiffer' or an AdapterConfig, got {spec!r}")

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- building blocks

class _CheapDropout(torch.autograd.Function):
    """Dropout with a mask built from 16 random bits per element, drawn 64 at a time.

    PyTorch's CPU dropout draws one random float per element (`bernoulli_`): on a (8, 256, 768) bf16 tensor that
    is ~10 ms on one core, about a sixth of the matmul before it. Drawing a quarter as many int64s and comparing
    their 16-bit pieces with a threshold takes ~4 ms, keeps p exact to 1/65536, and keeps a 1-byte mask for the
    backward instead of a full-size one."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        n = x.numel()
        bits = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
        threshold = round(p * 65536)
        keep = bits.view(torch.int16)[:n].view(x.shape) >= threshold - 32768  # P(keep) = 1 - threshold/65536
        scale = 65536 / (65536 - threshold)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x * keep * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return grad * keep * ctx.scale, None


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout: zero a fraction p of the values and scale the rest by 1/(1-p), in training only."""
    if not training or p <= 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, True)  # CUDA's counter-based RNG is already cheap
    return _CheapDropout.apply(x, p)


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """A Linear applied in the input's precision: fp32 adapter/head master weights meet a bf16 base this way."""
    w, b = layer.weight, layer.bias
    if w.dtype != x.dtype:
        w, b = w.to(x.dtype), (b.to(x.dtype) if b is not None else None)
    return F.linear(x, w, b)


class Adapter(nn.Module):
    """C → C/r → activation → C, added to what it reads. Trainable; everything else is frozen."""

    def __init__(self, hidden_size: int, cfg: AdapterConfig):
        super().__init__()
        self.cfg = cfg
        self.down = nn.Linear(hidden_size, hidden_size // cfg.reduction_factor)
        self.up = nn.Linear(hidden_size // cfg.reduction_factor, hidden_size)
        self.act = AdapterConfig.ACTIVATIONS[cfg.activation]

    def reset_parameters(self, std: float):
        nn.init.normal_(self.down.weight, std=std)
        nn.init.zeros_(self.down.bias)
        # Zero up-projection: the adapter adds exactly nothing until it has learned something (Houlsby §2.1).
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor, x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
        """h: the sublayer's output (B, T, C); x: the residual stream it will be added to; norm: the layer's LN.
        Returns the new sublayer output; the caller still computes norm(x + result)."""
        a = norm(x + h) if self.cfg.kind == "pfeiffer" else h  # Pfeiffer reads the normalised sum
        return h + linear(self.act(linear(a, self.down)), self.up)  # (B, T, C)


class SelfAttention(nn.Module):
    """Multi-head self-attention, bidirectional: every token sees every non-padding token."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)  # query, key, value fused: one matmul
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout = cfg.attention_dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, first_only: bool = False) -> torch.Tensor:
        B, T, C = x.shape
        H = self.num_heads
        q, k, v = self.qkv(x).view(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4)  # each (B, H, T, C/H)
        if first_only:  # only <s> asks; every token still answers (keys and values)
            q = q[:, :, :1]  # (B, H, 1, C/H)
        # mask: (B, 1, 1, T) bool, True where the key is a real token. Softmax scale is 1/sqrt(head size).
        if self.training and x.device.type == "cpu":
            y = attention_explicit(q, k, v, mask, self.dropout)
        else:
            p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, H, Tq, C/H)
        return self.proj(y.transpose(1, 2).reshape(B, q.shape[2], C))  # (B, Tq, C)


def attention_explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                       p: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v, written out: what scaled_dot_product_attention computes.

    Used for training on CPU, where it beats PyTorch's fused kernel: that kernel's backward is about twice as slow
    as these three ops', and with attention dropout PyTorch abandons it anyway for an unfused float32 path."""
    att = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)  # (B, H, Tq, T)
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))  # padding keys get zero weight
    att = dropout(F.softmax(att, dim=-1), p, training=True)
    return att @ v  # (B, H, Tq, C/H)


class FeedForward(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.up = nn.Linear(cfg.hidden_size, cfg.ffn_size)
        self.down = nn.Linear(cfg.ffn_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Exact, erf-based GELU (BERT's "gelu"), not GPT-2's tanh approximation: the weights were trained with it.
        return self.down(F.gelu(self.up(x)))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Layer(nn.Module):
    """One encoder layer: the picture at the top of this file."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg)
        self.ffn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = cfg.dropout
        # Adapter slots, empty until Model.add_adapter fills them.
        self.attn_adapter: Adapter | None = None
        self.ffn_adapter: Adapter | None = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, first_only: bool = False) -> torch.Tensor:
        """first_only: compute the output for the first token (<s>) alone, for the classifier's last layer."""
        # x, the residual stream, is float32 even when the matmul weights are bf16: a bf16 stream would round
        # every residual add and triple the error (as autocast does, sums and LayerNorms stay float32).
        compute = self.ffn.up.weight.dtype
        h = dropout(self.attn(x.to(compute), mask, first_only), self.dropout, self.training)
        if first_only:
            x = x[:, :1]  # (B, 1, C)
        if self.attn_adapter is not None:
            h = self.attn_adapter(h, x, self.attn_norm)
        x = self.attn_norm(x + h)  # post-LayerNorm: normalise after the residual add
        h = dropout(self.ffn(x.to(compute)), self.dropout, self.training)
        if self.ffn_adapter is not None:
            h = self.ffn_adapter(h, x, self.ffn_norm)
        return self.ffn_norm(x + h)  # (B, T, C)


class Embeddings(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.pad_id = cfg.pad_id
        self.tok = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos = nn.Embedding(cfg.max_positions, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = cfg.dropout

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # RoBERTa quirk (inherited from fairseq): positions start at pad_id + 1, not 0, and padding tokens get
        # position pad_id. Counting only real tokens makes left-padded and right-padded text get the same
        # positions. With pad_id 1, a 512-token text uses rows 2..513 of the 514-row table.
        real = (ids != self.pad_id).int()  # (B, T)
        pos = torch.cumsum(real, dim=1) * real + self.pad_id  # (B, T)
        # Every token is segment 0: RoBERTa dropped BERT's sentence-pair embedding, but the table is kept.
        f32 = self.norm.weight.dtype  # the sum is taken in float32 even when the tables are bf16
        x = self.tok(ids).to(f32) + self.pos(pos).to(f32) + self.token_type.weight[0].to(f32)  # (B, T, C)
        return dropout(self.norm(x), self.dropout, self.training)


class ClassificationHead(nn.Module):
    """RoBERTa's sentence classifier reads the <s> token's final state (there is no BERT-style pooler)."""

    def __init__(self, cfg: Config, num_labels: int):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, num_labels)
        self.dropout = cfg.dropout if cfg.classifier_dropout is None else cfg.classifier_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, 0].float()  # (B, C): <s>; the head always computes in fp32, whatever the base's precision
        x = dropout(x, self.dropout, self.training)
        x = torch.tanh(linear(x, self.dense))
        x = dropout(x, self.dropout, self.training)
        return linear(x, self.out)  # (B, num_labels)


class MaskedLMHead(nn.Module):
    """Predicts masked tokens: dense → GELU → LayerNorm → the word-embedding matrix again (tied) + a bias."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        compute = self.dense.weight.dtype
        x = F.gelu(self.dense(x.to(compute)))
        x = self.norm(x.to(self.norm.weight.dtype))
        return F.linear(x.to(compute), embedding, self.bias)  # (B, T, vocab)


# ---------------------------------------------------------------------------------------------- the model

class Model(nn.Module):
    """RoBERTa encoder + classification head (+ the MLM head when the checkpoint has one) + optional adapters."""

    def __init__(self, config: Config, num_labels: int = 2, adapter: AdapterConfig | str | None = None,
                 mlm_head: bool = False):
        super().__init__()
        self.config = config
        self.embed = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_layers))
        self.head = ClassificationHead(config, num_labels)
        self.mlm = MaskedLMHead(config) if mlm_head else None
        self.adapter_config: AdapterConfig | None = None
        self.labels = [f"LABEL_{i}" for i in range(num_labels)]  # class id -> name; saved with the adapter
        self.name_or_path = ""  # where the base weights came from, recorded with adapters
        self._fingerprint: str | None = None
        if not any(p.is_meta for p in self.parameters()):
            self.apply(self._init_fresh)
        if adapter is not None:
            self.add_adapter(adapter)

    # ------------------------------------------------------------------ forward passes

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (B, T, C), float32, equal to transformers' RobertaModel(...).last_hidden_state."""
        return self._encode(input_ids, attention_mask, first_only=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Classification logits (B, num_labels), float32."""
        # The head reads <s> alone, so the last layer computes only <s>'s row: its attention still reads every
        # token, but the other T-1 rows of the last attention output, FFN and adapters would be thrown away.
        return self.head(self._encode(input_ids, attention_mask, first_only=True))

    def _encode(self, ids: torch.Tensor, attention_mask: torch.Tensor | None, first_only: bool) -> torch.Tensor:
        mask = self._check_inputs(ids, attention_mask)
        x = self.embed(ids)  # (B, T, C)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, first_only=first_only and i == last)
        return x  # (B, T, C), or (B, 1, C) with first_only

    def mlm_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Masked-LM logits (B, T, vocab) over every position."""
        if self.mlm is None:
            raise RuntimeError(f"{self.name_or_path or 'this model'} has no masked-LM head: the checkpoint had no "
                               f"lm_head.* tensors (load a RobertaForMaskedLM checkpoint such as roberta-base)")
        return self.mlm(self.encode(input_ids, attention_mask), self.embed.tok.weight)

    def _check_inputs(self, ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Validate, and turn the (B, T) 0/1 mask into SDPA's (B, 1, 1, T) boolean key mask (None: no padding)."""
        cfg = self.config
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids: expected an integer tensor of shape (batch, length), "
                             f"got {ids.dtype} {tuple(ids.shape)}")
        B, T = ids.shape
        if T > cfg.max_tokens:
            raise ValueError(f"input_ids: length {T} exceeds the model's limit of {cfg.max_tokens} tokens "
                             f"(max_position_embeddings {cfg.max_positions} minus pad_id+1); truncate the text")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= cfg.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"input_ids: token id {bad} is outside the vocabulary of {cfg.vocab_size} tokens "
                             f"(ids 0..{cfg.vocab_size - 1}); was the text tokenized with this model's tokenizer?")
        if attention_mask is None:
            return None
        if attention_mask.shape != ids.shape:
            raise ValueError(f"attention_mask: shape {tuple(attention_mask.shape)} does not match input_ids "
                             f"shape {tuple(ids.shape)}")
        mask = attention_mask.bool()
        if bool(mask.all()):
            return None  # nothing to hide: lets attention take its fastest kernel
        return mask[:, None, None, :]

    # ------------------------------------------------------------------ adapters and freezing

    def add_adapter(self, adapter: AdapterConfig | str | dict) -> "Model":
        """Put fresh adapters into every layer (replacing any there): Houlsby in both slots, Pfeiffer after the FFN."""
        cfg = AdapterConfig.of(adapter)
        C = self.config.hidden_size
        if C // cfg.reduction_factor < 1:
            raise ValueError(f"adapter reduction_factor {cfg.reduction_factor} leaves no bottleneck at hidden size {C}")
        device = self.embed.tok.weight.device
        for layer in self.layers:
            layer.attn_adapter = self._new_adapter(cfg, device) if cfg.kind == "houlsby" else None
            layer.ffn_adapter = self._new_adapter(cfg, device)
        self.adapter_config = cfg
        return self

    def _new_adapter(self, cfg: AdapterConfig, device: torch.device) -> Adapter:
        a = Adapter(self.config.hidden_size, cfg).to(device)  # float32 master weights, whatever the base dtype
        if device.type != "meta":
            a.reset_parameters(self.config.initializer_range)
        return a.train(self.training)  # a new module must not switch dropout on in an eval-mode model

    def set_num_labels(self, num_labels: int, labels: list[str] | None = None) -> "Model":
        """A fresh classification head for `num_labels` classes."""
        if labels is not None and len(labels) != num_labels:
            raise ValueError(f"labels: {len(labels)} names for {num_labels} classes")
        device = self.embed.tok.weight.device
        self.head = ClassificationHead(self.config, num_labels).to(device).train(self.training)
        if device.type != "meta":
            self.head.apply(self._init_fresh)
        self.labels = list(labels) if labels is not None else [f"LABEL_{i}" for i in range(num_labels)]
        return self

    def set_dropout(self, hidden: float | None = None, attention: float | None = None) -> "Model":
        """Change dropout rates at run time (None: leave as is). The checkpoint's rates are the default.

        For adapter training, attention=0.0 is the fast recipe: attention-probability dropout only adds noise to
        the frozen base's attention maps (nothing there learns), while hidden dropout, kept, still regularises
        what the adapters read and write. On CPU it also costs the most: a random (B, H, T, T) mask per layer and
        PyTorch's unfused math attention instead of its fused kernel."""
        for m in self.modules():
            if hidden is not None and isinstance(m, (Embeddings, Layer)):
                m.dropout = hidden
            if attention is not None and isinstance(m, SelfAttention):
                m.dropout = attention
        if hidden is not None:
            self.config.dropout = hidden
        if attention is not None:
            self.config.attention_dropout = attention
        return self

    @property
    def num_labels(self) -> int:
        return self.head.out.out_features

    def is_trainable_name(self, name: str) -> bool:
        """Adapters and the classifier head train; the pretrained base (and its MLM head) stays frozen."""
        return name.startswith("head.") or "_adapter." in name

    def freeze_base(self) -> str:
        """Freeze everything but adapters and head. Returns a summary like peft's print_trainable_parameters()."""
        for name, p in self.named_parameters():
            p.requires_grad_(self.is_trainable_name(name))
        return self.trainable_summary()

    def trainable_summary(self) -> str:
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """What an adapter file holds: adapter and head weights, float32."""
        return {k: v.detach().float().contiguous() for k, v in self.state_dict().items() if self.is_trainable_name(k)}

    # ------------------------------------------------------------------ saving and loading adapters

    def base_fingerprint(self) -> str:
        """Identifies the frozen base weights, whatever their dtype: a hash of names, shapes and a strided sample
        of each tensor rounded to bf16 (so a bf16-loaded base has the fingerprint of its fp32 original)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for name, t in sorted(self.state_dict().items()):
                if self.is_trainable_name(name):
                    continue
                flat = t.detach().reshape(-1)
                sample = flat[:: max(1, flat.numel() // 4096)].to("cpu", torch.bfloat16).float()
                h.update(f"{name}{tuple(t.shape)}".encode())
                h.update(sample.numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def save_adapter(self, directory: str | os.PathLike) -> Path:
        """Write `adapter.safetensors` (adapters + head) and `adapter_config.json`, each atomically."""
        from safetensors.torch import save

        if self.adapter_config is None:
            raise RuntimeError("save_adapter: this model has no adapter (add one with add_adapter or adapter=...)")
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": "roberta_lite.adapter/1",
            "adapter": self.adapter_config.to_dict(),
            "num_labels": self.num_labels,
            "labels": self.labels,
            "base_model": str(self.name_or_path),
            "base_fingerprint": self.base_fingerprint(),
            "base_config": asdict(self.config),
        }
        W.atomic_write(d / "adapter.safetensors", save(self.adapter_state_dict()))
        W.atomic_write(d / "adapter_config.json", (json.dumps(meta, indent=2) + "\n").encode())
        return d

    @staticmethod
    def read_adapter_config(directory: str | os.PathLike) -> dict:
        path = Path(directory) / "adapter_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (not an adapter directory written by save_adapter)")
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise W.CheckpointError(f"{path}: invalid JSON ({e})") from None
        for key in ("adapter", "num_labels", "labels", "base_fingerprint"):
            if key not in meta:
                raise W.CheckpointError(f"{path}: key {key!r} is missing")
        return meta

    def load_adapter(self, directory: str | os.PathLike) -> "Model":
        """Create the saved adapters and head in this (pretrained) model and load their weights."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        d = Path(directory)
        meta = self.read_adapter_config(d)
        mine = self.base_fingerprint()
        if meta["base_fingerprint"] != mine:
            raise W.CheckpointError(
                f"{d}: adapter was trained on base {meta.get('base_model')!r} (fingerprint {meta['base_fingerprint']}), "
                f"but this model is {self.name_or_path!r} (fingerprint {mine}); load the base it was trained on")
        path = d / "adapter.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing")
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise W.CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        # Check everything on a shapes-only copy first, so a bad file leaves this model as it was.
        with torch.device("meta"):
            probe = Model(self.config, num_labels=int(meta["num_labels"]), adapter=meta["adapter"])
        expected = {k: v for k, v in probe.state_dict().items() if probe.is_trainable_name(k)}
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise W.CheckpointError(f"{path}: missing tensors {missing[:3]}, unexpected tensors {unexpected[:3]}")
        for k, t in tensors.items():
            if tuple(t.shape) != tuple(expected[k].shape):
                raise W.CheckpointError(f"{path}: tensor {k!r} has shape {tuple(t.shape)}, this model expects "
                                        f"{tuple(expected[k].shape)} (adapter saved for another base?)")
        self.add_adapter(meta["adapter"])
        self.set_num_labels(int(meta["num_labels"]), meta["labels"])
        with torch.no_grad():
            for k, p in self.named_parameters():
                if k in tensors:
                    p.copy_(tensors[k])
        return self

    # ------------------------------------------------------------------ loading pretrained weights

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, num_labels: int | None = None,
                        adapter: AdapterConfig | str | None = None, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, *, local_dir: str | os.PathLike | None = None,
                        verbose: bool = False) -> "Model":
        """Load a RoBERTa checkpoint saved by transformers (RobertaModel, ...ForMaskedLM, ...ForSequenceClassification).

        name_or_path: a directory with config.json + model.safetensors (or a sharded index), or a hub id.
        num_labels:   defaults to the checkpoint's own classifier, else 2; a different number gets a fresh head.
        adapter:      'houlsby', 'pfeiffer' or an AdapterConfig, added fresh to every layer.
        dtype:        the frozen base's precision (torch.bfloat16 is the fast path); adapters and head stay float32.
        """
        t0 = time.perf_counter()
        root = W.resolve_checkpoint(name_or_path, local_dir=local_dir)
        hf_cfg = W.read_config(root)
        config = Config.from_hf(hf_cfg, source=str(root / "config.json"))
        ckpt = W.SafetensorsCheckpoint(root)
        keys = ckpt.keys()
        templates = {W.to_template(k)[0] for k in keys}
        has_mlm = "lm_head.dense.weight" in templates
        ckpt_labels = ckpt.shape(next(k for k in keys if k.endswith("classifier.out_proj.weight")))[0] \
            if "classifier.out_proj.weight" in templates else None
        if num_labels is None:
            num_labels = ckpt_labels or 2
        keep_head = ckpt_labels == num_labels

        with torch.device("meta"):  # no memory, no random init: every base tensor comes from the file
            model = cls(config, num_labels=num_labels, mlm_head=has_mlm)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        hf_tensors = {k: ckpt.get(k) for k in keys if keep_head or not W.to_template(k)[0].startswith("classifier.")}
        ours = W.convert(hf_tensors, expected, source=str(root))
        required = [k for k in expected if not (k.startswith("head.") and not keep_head)]
        missing = [k for k in required if k not in ours]
        if missing:
            inverse = _hf_names(missing)
            raise W.CheckpointError(f"{root}: tensor {inverse[0]!r} (our {missing[0]!r}) is missing"
                                    + (f", and {len(missing) - 1} more" if len(missing) > 1 else ""))
        state = {k: v.to(dtype=model._param_dtype(k, dtype or torch.float32)) for k, v in ours.items()}
        model.load_state_dict(state, strict=False, assign=True)  # strictness checked above, with better messages
        fresh = [n for n, p in model.named_parameters() if p.is_meta]
        for module in model.modules():  # materialise and initialise what the file did not provide
            if any(p.is_meta for p in module.parameters(recurse=False)):
                module.to_empty(device="cpu", recurse=False)
                model._init_fresh(module)
        if device is not None:
            model.to(device)
        if num_labels and hf_cfg.get("id2label") and keep_head:
            id2label = hf_cfg["id2label"]
            model.labels = [str(id2label.get(str(i), f"LABEL_{i}")) for i in range(num_labels)]
        model.name_or_path = str(name_or_path)
        if adapter is not None:
            model.add_adapter(adapter)
        model.load_report = {"fresh": fresh, "seconds": time.perf_counter() - t0}
        if verbose and fresh:
            print(f"roberta_lite: freshly initialised (not in checkpoint): {', '.join(fresh)}")
        return model.eval()

    def _param_dtype(self, name: str, base_dtype: torch.dtype) -> torch.dtype:
        """Matmul and embedding weights take the base dtype; adapters, head and LayerNorms stay float32 (they are
        tiny, and the LayerNorms act on the float32 residual stream)."""
        if self.is_trainable_name(name) or "norm." in name:
            return torch.float32
        return base_dtype

    def _init_fresh(self, module: nn.Module):
        """Initialise a module the checkpoint did not provide, the way the base was trained (BERT's init)."""
        std = self.config.initializer_range
        if isinstance(module, Adapter):
            module.reset_parameters(std)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, MaskedLMHead):
            nn.init.zeros_(module.bias)


def _hf_names(ours: list[str]) -> list[str]:
    """Our key -> the Hugging Face key it comes from, for error messages (first matching template)."""
    out = []
    for key in ours:
        layer = next((p for p in key.split(".") if p.isdigit()), None)
        template = key.replace(f".{layer}.", ".{}.") if layer else key
        hf = next((h for h, o in W.HF_TO_OURS.items() if o == template or (isinstance(o, tuple) and o[0] == template)), key)
        out.append(hf.format(layer) if layer else hf)
    return out
