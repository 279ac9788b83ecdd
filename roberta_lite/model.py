"""RoBERTa with adapters, from scratch: the architecture alone, to be read top to bottom.

RoBERTa (Liu et al. 2019) is BERT's encoder trained better: the same layers, byte-level BPE, no next-sentence
task. Each layer is two sublayers, each followed by a residual add and a LayerNorm ("post-LN", the original
Transformer's order; GPT-2 and later put the norm first). One layer, and where adapters sit:

    x (B, T, C) ─┬─► qkv(+LoRA) ─► attention ─► proj(+LoRA) ─► dropout ─► h ─┬─► A_attn(a) ──┐  Houlsby only
                 └─────────────────────────────────────────────────────► x + h ───────────► (+) ─► LayerNorm ─► x
    x ───────────┬─► up(+LoRA) C→4C ─► GELU ─► down(+LoRA) 4C→C ─► dropout ─► h ─┬─► A_ffn(a) ───┐  Houlsby, Pfeiffer
                 └─────────────────────────────────────────────────────────► x + h ───────────► (+) ─► LayerNorm ─► x
    (the FFN row's x is the attention row's output; a = h (Houlsby) or LN(x + h) (Pfeiffer, FFN row only); +LoRA: below)

  * Bottleneck adapter (Houlsby et al. 2019): A(a) = up(act(down(a))), C → C/f → C; AdapterConfig's defaults, both
    kinds: f (reduction_factor) 16, activation "relu" (AdapterHub's Houlsby: swish); a loaded file keeps its own.
    kind "houlsby": one after each sublayer (slots attn_adapter, ffn_adapter), reading h:  x ← LN(x + h + A(h)).
    kind "pfeiffer": one after the FFN only (ffn_adapter), reading the normalised sum:  x ← LN(x + h + A(LN(x + h))),
    the same LayerNorm (ffn_norm) twice: AdapterHub's SeqBnConfig (original_ln_before=True, residual_before_ln=True).
  * kind "lora" (Hu et al. 2021): a frozen projection W x becomes W x + (alpha/r) B A dropout(x), A: r × in, B: out × r
    (alpha/sqrt(r) with use_rslora; defaults r 8, alpha 16, dropout 0, targets query and value). Target → slot: query,
    key, value → attn.qkv_lora (one QKVLoRA); attn_out → attn.proj_lora; ffn_up, ffn_down → ffn.up_lora, .down_lora.
All kinds add nothing at first (up and B are zero), so training starts from the pretrained model. Everything trains
until `freeze_base()` (train.py adds an adapter, then calls it), then only the active adapter `n`: its modules (e.g.
layers.0.ffn_adapter.n.up.weight, layers.0.attn.qkv_lora.n.value.B) and its own head (heads.n.*), or with none active
the model's own `head`. Other adapters, mlm.* and LayerNorms stay frozen, as in AdapterHub and peft.

Hugging Face names → ours (weights.HF_TO_OURS; a leading "roberta." stripped):
    embeddings.{word,position,token_type}_embeddings, embeddings.LayerNorm → embed.{tok,pos,token_type}, embed.norm
    encoder.layer.{i}.attention.self.{query,key,value} → rows [0,C), [C,2C), [2C,3C) of layers.{i}.attn.qkv
    encoder.layer.{i}.attention.output.{dense,LayerNorm} → layers.{i}.{attn.proj,attn_norm}
    encoder.layer.{i}.{intermediate.dense,output.dense,output.LayerNorm} → layers.{i}.{ffn.up,ffn.down,ffn_norm}
    classifier.{dense,out_proj} → head.{dense,out};  lm_head.{dense,layer_norm,bias} → mlm.{dense,norm,bias}
    dropped unread: pooler.*, position_ids, token_type_ids, lm_head.decoder.weight/.bias (= embed.tok.weight/mlm.bias)
(.weight, .bias alike; lm_head.bias is a tensor.) Unknown or missing tensors: errors; classifier.*, lm_head.* optional.

Precision, one rule: the frozen base's weights and biases (embeddings, qkv, proj, up, down, mlm.dense, mlm.bias) are
bf16 when from_pretrained's dtype says so; all else (residual stream, LayerNorms, adapters, LoRAs, classifier heads)
and all that encode, forward, mlm_logits return is float32. `K.Linear` (nn.Linear, weight (out, in)) and
`K.linear(x, w, b)` cast x to the weight's dtype and return that dtype; `K.LayerNorm`/`K.Embedding` return float32. A
float32 LoRA term makes its sum float32; only qkv's is cast back (attention runs in the base's dtype).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from roberta_lite import adapters, formats, kernels as K, weights as W
from roberta_lite.adapters import AdapterConfig, Route


@dataclass
class Config:
    """Architecture. Defaults are roberta-base (roberta-large: hidden 1024, 24 layers, 16 heads, ffn 4096; nothing
    else changes). `from_hf` reads config.json by W.HF_CONFIG_KEYS ("HF:" names below, else the field's name); other
    keys are ignored, but hidden_act must be gelu, position_embedding_type absolute, is_decoder false (else errors)."""

    vocab_size: int = 50265
    hidden_size: int = 768  # C
    num_layers: int = 12  # HF: num_hidden_layers
    num_heads: int = 12  # HF: num_attention_heads; must divide C: heads of 64 in roberta-base
    ffn_size: int = 3072  # HF: intermediate_size; 4C
    max_positions: int = 514  # HF: max_position_embeddings; 512 + pad_id + 1 (rows 0..pad_id: never a real token's)
    type_vocab_size: int = 1  # RoBERTa has no sentence-B embedding; the table is kept for checkpoint fidelity
    layer_norm_eps: float = 1e-5  # RoBERTa's; BERT uses 1e-12
    pad_id: int = 1  # HF: pad_token_id; <pad> in roberta-base's vocabulary; it also sets where positions start
    dropout: float = 0.1  # HF: hidden_dropout_prob; hidden states, after embeddings and after each sublayer
    attention_dropout: float = 0.1  # HF: attention_probs_dropout_prob; on the attention probabilities
    classifier_dropout: float | None = None  # None: use `dropout`
    initializer_range: float = 0.02  # std of fresh (head/adapter) weights, as the checkpoint was trained with

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "Config":
        return cls(**W.config_fields(d, source, cls))

    @property
    def max_tokens(self) -> int:  # the longest text: real tokens take positions pad_id + 1 .. max_positions - 1
        return self.max_positions - self.pad_id - 1


class Zero:  # what an empty Slot returns: t + ZERO is t itself, where t + 0 would run a kernel and copy t
    __add__ = __radd__ = lambda self, t: t  # t + ZERO: Tensor.__add__ returns NotImplemented, so __radd__ runs


ZERO = Zero()


class Slot(nn.ModuleDict):
    """Where adapters may sit: name -> module, filled by add_adapter. route (adapters.Route, from make_route): its
    groups = [(name, indices)] put each example in one group, e.g. [("sst", tensor([0, 2])), ("nli", tensor([1]))];
    route.batch = B (here 3); indices None: all; route None: no adapter. Sums the terms of names with a module here."""

    def forward(self, route: Route | None, *inputs):
        out = ZERO
        for name, examples in (route.groups if route is not None else []):  # None: no adapter named, none active
            if name in self and examples is None:  # the whole batch uses this adapter
                out = out + self[name](*inputs)
            elif name in self:  # a mixed batch: run the adapter on its examples, add its term to their rows only
                y = self[name](*(t.index_select(0, examples) if torch.is_tensor(t) else t for t in inputs))
                out = y.new_zeros((route.batch, *y.shape[1:])) if out is ZERO else out  # (B, ...)
                out = out.index_put_((examples,), y, accumulate=True)  # in place; autograd saves no y (index_add would)
        return out


class Adapter(nn.Module):
    """Bottleneck adapter: returns its own term A(a) = up(act(down(a))); the layer adds it to x + h."""

    def __init__(self, hidden_size: int, cfg: AdapterConfig, std: float):  # std: Config.initializer_range
        super().__init__()
        self.down = K.Linear(hidden_size, hidden_size // cfg.reduction_factor)
        self.up = K.Linear(hidden_size // cfg.reduction_factor, hidden_size)
        self.act = adapters.ACTIVATIONS[cfg.activation]  # relu, gelu (erf), gelu_new (tanh), swish = silu, tanh
        self.reads_sum = cfg.kind == "pfeiffer"
        nn.init.normal_(self.down.weight, std=std)
        for t in (self.down.bias, self.up.weight, self.up.bias):  # zero up: a fresh adapter adds exactly nothing
            nn.init.zeros_(t)

    def forward(self, h: torch.Tensor, x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
        a = norm(x + h) if self.reads_sum else h  # Pfeiffer: the sum, normalised by the layer's norm; Houlsby: h
        return self.up(self.act(self.down(a)))  # (B, T, C) -> (B, T, C/f) -> (B, T, C)


class LoRA(nn.Module):
    """Low-rank update of a frozen projection: scale B A x; A: (r, in), B: (out, r); scale alpha/r or alpha/sqrt(r)."""

    def __init__(self, fan_in: int, fan_out: int, cfg: AdapterConfig):
        super().__init__()
        self.A = nn.Parameter(torch.empty(cfg.r, fan_in))
        self.B = nn.Parameter(torch.zeros(fan_out, cfg.r))  # zero: a fresh LoRA changes nothing
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # peft's (and nn.Linear's) initialisation
        self.scale = cfg.alpha / (math.sqrt(cfg.r) if cfg.use_rslora else cfg.r)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = K.dropout(x, self.dropout, self.training)  # = F.dropout(x, p, training), cheaper on CPU
        return K.linear(K.linear(x, self.A), self.B) * self.scale  # (B, T, in) -> (B, T, r) -> (B, T, out)


class QKVLoRA(nn.ModuleDict):
    """LoRA on query, key and/or value: one LoRA (with its own dropout) per part targeted. They share the fused
    projection, so each part's update fills its third of the (B, T, 3C) output; untargeted thirds get zeros."""
    PARTS = ("query", "key", "value")

    def __init__(self, hidden_size: int, cfg: AdapterConfig):
        super().__init__({p: LoRA(hidden_size, hidden_size, cfg) for p in self.PARTS if p in cfg.targets})
        self.hidden_size = hidden_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zero = x.new_zeros((), dtype=torch.float32).expand(*x.shape[:-1], self.hidden_size)  # a view of one 0
        return torch.cat([self[p](x) if p in self else zero for p in self.PARTS], dim=-1)  # (B, T, 3C)


class SelfAttention(nn.Module):
    """Multi-head self-attention, bidirectional: every token sees every token the attention mask allows."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = K.Linear(cfg.hidden_size, 3 * cfg.hidden_size)  # query | key | value, fused: one matmul
        self.proj = K.Linear(cfg.hidden_size, cfg.hidden_size)
        self.qkv_lora, self.proj_lora = Slot(), Slot()  # LoRA targets "query"/"key"/"value", and "attn_out"
        self.dropout = cfg.attention_dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, route: Route | None,
                rows: int | None = None) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x)  # (B, T, 3C): query | key | value
        qkv = (qkv + self.qkv_lora(route, x)).to(qkv.dtype)  # a QKVLoRA per adapter; cast back (docstring: Precision)
        q, k, v = qkv.view(B, T, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)  # (B, H, T, C/H)
        q = q[:, :, :rows]  # only the first `rows` tokens ask (all when None); all T keys and values answer
        # softmax(q k^T / sqrt(C/H)) v; the (B, 1, 1, T) mask (True = attend) hides padding keys from every query.
        y = K.attention(q, k, v, mask, self.dropout, self.training)  # (B, H, Tq, C/H)
        y = y.transpose(1, 2).reshape(B, q.shape[2], C)  # (B, Tq, C): the heads side by side again
        return self.proj(y) + self.proj_lora(route, y)


class FeedForward(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.up = K.Linear(cfg.hidden_size, cfg.ffn_size)
        self.down = K.Linear(cfg.ffn_size, cfg.hidden_size)
        self.up_lora, self.down_lora = Slot(), Slot()  # LoRA targets "ffn_up" and "ffn_down"

    def forward(self, x: torch.Tensor, route: Route | None) -> torch.Tensor:
        # Exact, erf-based GELU (BERT's "gelu"), not GPT-2's tanh approximation: the weights were trained with it.
        g = F.gelu(self.up(x) + self.up_lora(route, x))  # (B, T, 4C)
        return self.down(g) + self.down_lora(route, g)  # (B, T, C)


class Layer(nn.Module):
    """One encoder layer: the picture at the top of this file. forward's `rows`: compute only the first `rows`
    tokens' outputs (each still attends to all); None: every token."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.attn_norm = K.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn_adapter = Slot()  # Houlsby's first adapter
        self.ffn = FeedForward(cfg)
        self.ffn_norm = K.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn_adapter = Slot()  # Houlsby's second adapter, Pfeiffer's only one
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, route: Route | None,
                rows: int | None = None) -> torch.Tensor:
        h = K.dropout(self.attn(x, mask, route, rows), self.dropout, self.training)  # (B, rows or T, C)
        x = x[:, :rows]  # the residual stream (float32) keeps only the rows computed (all when rows is None)
        x = self.attn_norm(x + h + self.attn_adapter(route, h, x, self.attn_norm))  # post-LN: norm after the add
        h = K.dropout(self.ffn(x, route), self.dropout, self.training)
        return self.ffn_norm(x + h + self.ffn_adapter(route, h, x, self.ffn_norm))  # (B, rows or T, C)


class Embeddings(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.pad_id = cfg.pad_id
        self.tok = K.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos = K.Embedding(cfg.max_positions, cfg.hidden_size)
        self.token_type = K.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = K.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = cfg.dropout

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # RoBERTa quirk (fairseq's): padding owns position row pad_id (its padding_idx), real tokens are numbered from
        # pad_id + 1 (rows below unused), as the table was trained: a 512-token text uses rows 2..513 of 514. Only
        # real tokens count, so padding's side does not move positions (but pad on the right: the head reads x[:, 0]).
        real = (ids != self.pad_id).int()  # (B, T); from the ids, not attention_mask, as in transformers
        pos = torch.cumsum(real, dim=1) * real + self.pad_id  # (B, T)
        # Every token is segment 0: RoBERTa dropped BERT's sentence-pair embedding, but the table is kept.
        x = self.tok(ids) + self.pos(pos) + self.token_type(ids.new_zeros(1))  # (B, T, C); segment row: (1, C)
        return K.dropout(self.norm(x), self.dropout, self.training)


class ClassificationHead(nn.Module):
    """RoBERTa's classifier reads <s>'s final state, x[:, 0], so text is padded on the right (no BERT pooler)."""

    def __init__(self, cfg: Config, num_labels: int):
        super().__init__()
        self.dense = K.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out = K.Linear(cfg.hidden_size, num_labels)
        self.dropout = cfg.dropout if cfg.classifier_dropout is None else cfg.classifier_dropout
        self.num_labels = num_labels
        self.labels = [f"LABEL_{i}" for i in range(num_labels)]  # output names, set by add_adapter or a file
        self.task = "classification"  # or "multilabel", "regression": the loss's kind (tasks.py); logits stay raw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = K.dropout(x[:, 0], self.dropout, self.training)  # (B, C): <s>
        x = K.dropout(torch.tanh(self.dense(x)), self.dropout, self.training)
        return self.out(x)  # (B, num_labels)


class MaskedLMHead(nn.Module):
    """Predicts masked tokens: dense → GELU → LayerNorm → the word-embedding matrix again (tied) + a bias."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.dense = K.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = K.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))  # bf16 with a bf16 base (from_pretrained's dtype)

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        x = self.norm(F.gelu(self.dense(x)))
        return K.linear(x, embedding, self.bias).float()  # (B, T, vocab), float32 even from a bf16 base


class Model(adapters.AdapterMethods, nn.Module):
    """Encoder + its own classifier (+ MLM head if the checkpoint has one) + named adapters, each with a head. The
    rest of the API (delete_adapter, labels, merge_adapter, set_dropout, ...) is in adapters.AdapterMethods."""

    def __init__(self, config: Config, num_labels: int = 2, adapter: AdapterConfig | str | None = None,
                 mlm_head: bool = False):
        super().__init__()
        self.config = config
        self.embed = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_layers))
        self.head = ClassificationHead(config, num_labels)  # the checkpoint's own (random if it has none)
        self.mlm = MaskedLMHead(config) if mlm_head else None
        self.heads = nn.ModuleDict()  # adapter name -> its own classifier, used instead of `head` with it
        self.adapter_configs: dict[str, AdapterConfig] = {}  # adapter name -> config, in the order added
        self.active_adapter: str | None = None
        self.name_or_path = ""  # where the base weights came from, recorded with adapters
        # BERT's init for what no checkpoint gives: Linear and Embedding weights normal(0, std), Linear biases 0,
        # LayerNorms 1 and 0 (no zeroed pad row: checkpoints fill embeddings). Adapters, added later, init themselves.
        self.apply(lambda module: W.init_fresh(module, config.initializer_range))
        if adapter is not None:
            self.add_adapter("default", adapter)

    # Forward passes. `adapter`: None (the active one), a name, or one name per example (one pass of the base).
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               adapter: str | Sequence[str] | None = None) -> torch.Tensor:
        """Final hidden states (B, T, C), float32 (no adapter: transformers' RobertaModel(...).last_hidden_state)."""
        return self._encode(input_ids, attention_mask, adapters.make_route(self, adapter, input_ids))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                adapter: str | Sequence[str] | None = None) -> torch.Tensor:
        """Logits (B, num_labels), float32, from each example's adapter's head (none active: the model's own `head`).
        A mixed batch runs each head on its own rows; narrower heads are padded to the widest with -inf (classify)."""
        route = adapters.make_route(self, adapter, input_ids)
        # The head reads <s> alone, so the last layer computes <s>'s row only (it still attends to every token).
        return adapters.classify(self, route, self._encode(input_ids, attention_mask, route, rows=1))

    def mlm_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Masked-LM logits (B, T, vocab), float32, over every position."""
        if self.mlm is None:
            raise RuntimeError(f"{self.name_or_path or 'this model'} has no masked-LM head (no lm_head.* in its file)")
        return self.mlm(self.encode(input_ids, attention_mask), self.embed.tok.weight)

    def _encode(self, ids: torch.Tensor, attention_mask: torch.Tensor | None, route: Route | None,
                rows: int | None = None) -> torch.Tensor:
        # (B, 1, 1, T), True = attend, from attention_mask alone (not the ids); None if it is None or all ones: then
        # every token, padding too, is attended, as in transformers. Also checks ids: in the vocabulary, T ≤ max_tokens.
        mask = K.attention_mask(self.config, ids, attention_mask)
        x = self.embed(ids)  # (B, T, C)
        for layer in self.layers[:-1]:
            x = layer(x, mask, route)
        return self.layers[-1](x, mask, route, rows)  # (B, T, C), or (B, rows, C)

    def add_adapter(self, name: str | AdapterConfig | dict, config: AdapterConfig | str | dict | None = None, *,
                    num_labels: int | None = None, labels: Sequence[str] | None = None,
                    task: str = "classification", replace: bool = False) -> "Model":
        """Add a fresh adapter `name` (the identity until trained) with its own classification head, and make it
        active. The head starts as a copy of the model's own classifier; with num_labels, a fresh one (BERT's init)."""
        adapters.add(self, name, config, num_labels, labels, task, replace)
        return self

    def freeze_base(self) -> str:
        """Train only the active adapter and its head (else `head`); rerun it after switching. Returns a summary."""
        return adapters.freeze_base(self)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, num_labels: int | None = None,
                        adapter: AdapterConfig | str | None = None, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, **kwargs) -> "Model":
        """A transformers RoBERTa checkpoint (directory or hub id); dtype=torch.bfloat16: the fast frozen base.
        num_labels None: the checkpoint classifier's (weights kept), or 2 if it has none; another number: a new head."""
        return W.load_pretrained(cls, name_or_path, num_labels, adapter, dtype, device, **kwargs)

    def save_adapter(self, directory: str | os.PathLike, name: str | None = None, format: str = "roberta_lite"):
        """Write one adapter and its head ("roberta_lite", "adapterhub" or "peft" format); see formats/."""
        return formats.save(self, directory, name, format)

    def load_adapter(self, source: str | os.PathLike, name: str | None = None, replace: bool = False) -> "Model":
        """Add an adapter from a directory or hub id in any supported format, and make it active."""
        formats.load(self, source, name, replace)
        return self
