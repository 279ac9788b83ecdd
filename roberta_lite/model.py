"""RoBERTa with adapters in plain PyTorch: the architecture and the whole forward path.

RoBERTa (Liu et al. 2019) is BERT's encoder, trained better. A layer is two sublayers, each followed
by a residual add and a LayerNorm ("post-LN", the original Transformer's order). One layer, and where
the adapters sit:

  x ─┬─► qkv(+LoRA) ─► attention ─► proj(+LoRA) ─► dropout ─► h ─┬─► A_attn(h) ─┐   Houlsby
     └──────────────────────────────────────────────────── x + h ──────────────(+)─► LN ─► x
  x ─┬─► up(+LoRA) ─► GELU ─► down(+LoRA) ─► dropout ────────► h ─┬─► A_ffn(a) ──┐   Houlsby,
     └──────────────────────────────────────────────────── x + h ──────────────(+)─► LN ─► x  Pfeiffer

  * Houlsby (Houlsby et al. 2019): a bottleneck A(a) = up(act(down(a))), C → C/f → C, after each
    sublayer, reading a = h. Pfeiffer: one after the FFN only, reading a = LN(x + h) (ffn_norm).
  * LoRA (Hu et al. 2021): a frozen projection W x becomes W x + scale · B A x, on any of query, key,
    value (thirds of qkv), attn_out (proj), ffn_up (up), ffn_down (down).
Fresh, a LoRA changes nothing (B = 0); a bottleneck nearly nothing (small up and down, as Houlsby's,
so that down learns from the first step: with up = 0 it would get no gradient).

Adapters plug in at one kind of place, a `Slot` (adapter name -> module): `slot(y, route, **inputs)`
is y plus the term each adapter there computes from the inputs (by name: x=, or h=, x=, norm=), for
the examples the `Route` sends it. So one batch can mix adapters: the frozen base runs once, each adapter on its own rows.
Everything here is float32; precision.py makes the frozen base bf16. Quirks are noted where they are.
The K. calls are kernels.py's fast paths: K.dropout (F.dropout, a cheaper CPU mask), K.first_row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from roberta_lite import kernels as K


@dataclass
class Config:
    vocab_size: int = 50265
    hidden_size: int = 768  # C
    num_layers: int = 12
    num_heads: int = 12  # H, divides C
    ffn_size: int = 3072  # 4C
    max_positions: int = 514  # 512 tokens + pad_id + 1 (see Embeddings)
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_id: int = 1
    dropout: float = 0.1  # after the embeddings and after each sublayer
    attention_dropout: float = 0.1  # on the attention probabilities
    classifier_dropout: float | None = None  # None: `dropout`
    initializer_range: float = 0.02  # std of fresh weights

    @property
    def max_tokens(self) -> int:
        return self.max_positions - self.pad_id - 1


def init_weights(module: nn.Module, std: float):
    """BERT's initialisation, for what no checkpoint gives. Adapters initialise themselves (std: this one)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight), nn.init.zeros_(module.bias)


@dataclass
class Route:
    """Which examples each adapter gets: (name, rows), rows None when the whole batch uses that one adapter."""
    slots: list[tuple[str, torch.Tensor | None]]  # what runs in the Slots (not a merged LoRA: it is in W)
    heads: list[tuple[str, torch.Tensor | None]]  # whose head reads which rows
    batch: int  # B


class Slot(nn.ModuleDict):
    """Where adapters sit: name -> module. Returns y plus each routed adapter's term module(**inputs)."""
    def forward(self, y: torch.Tensor, route: Route | None, **inputs) -> torch.Tensor:
        mixed = None  # a mixed batch's terms, each on its own examples' rows: (B, ...)
        for name, rows in route.slots if route is not None else []:
            if name not in self:
                continue
            if rows is None:  # the whole batch uses this adapter
                y = y + self[name](**inputs)
                continue
            term = self[name](**{k: t[rows] if torch.is_tensor(t) else t for k, t in inputs.items()})
            mixed = term.new_zeros((route.batch, *term.shape[1:])) if mixed is None else mixed
            mixed[rows] = term  # (in place, so autograd saves only the row indices)
        return y if mixed is None else y + mixed


ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu, "silu": F.silu, "tanh": torch.tanh,
               "gelu_new": lambda x: F.gelu(x, approximate="tanh")}  # GPT-2's tanh approximation


class Adapter(nn.Module):
    """Bottleneck adapter (Houlsby, Pfeiffer): its term up(act(down(a)))."""
    def __init__(self, hidden_size: int, spec, std: float):  # spec: adapters.AdapterConfig
        super().__init__()
        self.down = nn.Linear(hidden_size, hidden_size // spec.reduction_factor)
        self.up = nn.Linear(hidden_size // spec.reduction_factor, hidden_size)
        self.act = ACTIVATIONS[spec.activation]
        self.reads_norm = spec.kind == "pfeiffer"
        nn.init.normal_(self.down.weight, std=std), nn.init.normal_(self.up.weight, std=std)  # a small term
        nn.init.zeros_(self.down.bias), nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor, x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
        a = norm(x + h) if self.reads_norm else h  # Pfeiffer: LN(x + h); Houlsby: the sublayer's h
        return self.up(self.act(self.down(a)))  # (B, T, C) -> (B, T, C/f) -> (B, T, C)


class LoRA(nn.Module):
    """Low-rank update of a frozen projection: the term scale · B A dropout(x)."""
    def __init__(self, fan_in: int, fan_out: int, spec):  # spec: adapters.AdapterConfig
        super().__init__()
        self.A = nn.Parameter(torch.empty(spec.r, fan_in))  # (r, in)
        self.B = nn.Parameter(torch.zeros(fan_out, spec.r))  # (out, r)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # peft's (and nn.Linear's) initialisation
        self.scale = spec.alpha / (math.sqrt(spec.r) if spec.use_rslora else spec.r)  # rsLoRA: sqrt
        self.dropout = spec.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = K.dropout(x, self.dropout, self.training)  # = F.dropout, cheaper on CPU
        return F.linear(F.linear(x, self.A), self.B) * self.scale  # (B, T, in) -> r -> out


class QKVLoRA(nn.ModuleDict):
    """LoRA on the fused qkv: one LoRA per part targeted, each filling its third of (B, T, 3C)."""
    PARTS = ("query", "key", "value")

    def __init__(self, hidden_size: int, spec):
        super().__init__({p: LoRA(hidden_size, hidden_size, spec) for p in self.PARTS if p in spec.targets})
        self.hidden_size = hidden_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zero = x.new_zeros(()).expand(*x.shape[:-1], self.hidden_size)  # a view of one 0
        return torch.cat([self[p](x) if p in self else zero for p in self.PARTS], dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)  # query | key | value, fused
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.qkv_lora, self.proj_lora = Slot(), Slot()
        self.dropout = cfg.attention_dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, route: Route | None):
        B, T, C = x.shape
        qkv = self.qkv_lora(self.qkv(x), route, x=x)  # (B, T, 3C)
        q, k, v = qkv.view(B, T, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)  # (B, H, T, C/H)
        y = self.attend(q, k, v, mask).transpose(1, 2).reshape(B, T, C)  # heads side by side again
        return self.proj_lora(self.proj(y), route, x=y)

    def attend(self, q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
        """softmax(q kᵀ / √d + mask) v over the keys the (B, 1, 1, T) mask keeps (True)."""
        if not (self.training and q.is_cpu):  # fused kernel (its CPU backward is slower than ours)
            p = self.dropout if self.training else 0.0
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        att = (q / math.sqrt(q.shape[-1])) @ k.transpose(-2, -1)  # (B, H, Tq, T)
        if mask is not None:
            att = att.masked_fill(~mask, float("-inf"))  # padding keys get weight 0
        att = K.dropout(F.softmax(att, dim=-1), self.dropout, self.training)
        return att @ v  # (B, H, Tq, C/H)


class FeedForward(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.up = nn.Linear(cfg.hidden_size, cfg.ffn_size)
        self.down = nn.Linear(cfg.ffn_size, cfg.hidden_size)
        self.up_lora, self.down_lora = Slot(), Slot()

    def forward(self, x: torch.Tensor, route: Route | None) -> torch.Tensor:
        g = F.gelu(self.up_lora(self.up(x), route, x=x))  # (B, T, 4C); exact (erf) GELU, as BERT
        return self.down_lora(self.down(g), route, x=g)  # (B, T, C)


class Layer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn_adapter = Slot()
        self.ffn = FeedForward(cfg)
        self.ffn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn_adapter = Slot()
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, route: Route | None):
        h = K.dropout(self.attn(x, mask, route), self.dropout, self.training)  # (B, T, C)
        x = self.attn_norm(self.attn_adapter(x + h, route, h=h, x=x, norm=self.attn_norm))  # LN(x + h + A)
        h = K.dropout(self.ffn(x, route), self.dropout, self.training)
        return self.ffn_norm(self.ffn_adapter(x + h, route, h=h, x=x, norm=self.ffn_norm))  # (B, T, C)


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
        # RoBERTa's quirk (fairseq's): real tokens are numbered from pad_id + 1 and padding takes row
        # pad_id, so a 512-token text uses rows 2..513 of 514. Pad on the right: heads read x[:, 0].
        real = (ids != self.pad_id).int()  # (B, T)
        pos = torch.cumsum(real, dim=1) * real + self.pad_id  # (B, T)
        x = self.tok(ids) + self.pos(pos) + self.token_type(ids.new_zeros(1))  # (B, T, C); one type
        return K.dropout(self.norm(x), self.dropout, self.training)


class ClassificationHead(nn.Module):
    def __init__(self, cfg: Config, num_labels: int):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, num_labels)
        self.dropout = cfg.dropout if cfg.classifier_dropout is None else cfg.classifier_dropout
        self.num_labels, self.labels = num_labels, [f"LABEL_{i}" for i in range(num_labels)]
        self.task = "classification"  # or "multilabel", "regression": the loss's kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = K.dropout(x[:, 0], self.dropout, self.training)  # (B, C): <s>'s state; no pooler
        x = K.dropout(torch.tanh(self.dense(x)), self.dropout, self.training)
        return self.out(x)  # (B, num_labels)


class TokenHead(nn.Module):
    """A label for every token (named entities, tags): RobertaForTokenClassification's classifier."""
    def __init__(self, cfg: Config, num_labels: int):
        super().__init__()
        self.out = nn.Linear(cfg.hidden_size, num_labels)
        self.dropout = cfg.dropout if cfg.classifier_dropout is None else cfg.classifier_dropout
        self.num_labels, self.labels = num_labels, [f"LABEL_{i}" for i in range(num_labels)]
        self.task = "token-classification"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(K.dropout(x, self.dropout, self.training))  # (B, T, C) -> (B, T, num_labels)


class MaskedLMHead(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        x = self.norm(F.gelu(self.dense(x)))
        return F.linear(x, embedding, self.bias)  # (B, T, vocab): decoded by the word embeddings


class RoBERTa(nn.Module):
    """The encoder, its own classifier `head`, maybe an MLM head, and a head per adapter."""
    def __init__(self, config: Config, num_labels: int = 2, mlm_head: bool = False):
        super().__init__()
        self.config = config
        self.embed = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_layers))
        self.head = ClassificationHead(config, num_labels)
        self.mlm = MaskedLMHead(config) if mlm_head else None
        self.heads = nn.ModuleDict()  # adapter name -> its classifier
        self.active_adapter: str | None = None  # what a forward pass that names no adapter uses
        self.merged_adapter: str | None = None  # a LoRA folded into the base weights
        self.name_or_path = ""  # where the base weights came from
        self.apply(lambda module: init_weights(module, config.initializer_range))

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               adapter: str | Sequence[str] | None = None) -> torch.Tensor:
        """Final hidden states (B, T, C). adapter: None (the active one), a name, or one per example."""
        route = self.route(adapter, input_ids)
        mask = self.key_mask(attention_mask)
        x = self.embed(input_ids)  # (B, T, C)
        for layer in self.layers:
            x = layer(x, mask, route)
        return x

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                adapter: str | Sequence[str] | None = None) -> torch.Tensor:
        """Logits from each example's adapter's head (no adapter: `head`): (B, labels); TokenHeads' (B, T, labels)."""
        route = self.route(adapter, input_ids)
        mask, every_token = self.key_mask(attention_mask), self.labels_every_token(route)
        x = self.embed(input_ids)
        for layer in self.layers[:-1]:
            x = layer(x, mask, route)
        if every_token:  # a TokenHead reads every token's row (padding's too: the loss ignores those)
            return self.classify(self.layers[-1](x, mask, route), route)
        x = K.first_row(self.layers[-1], x, mask, route)  # = self.layers[-1](x, mask, route)[:, :1]
        return self.classify(x, route)

    def mlm_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Masked-LM logits (B, T, vocab) at every position (through the active adapter, if any)."""
        if self.mlm is None:
            raise RuntimeError(f"{self.name_or_path or 'this model'} has no masked-LM head (no lm_head.* in its file)")
        return self.mlm(self.encode(input_ids, attention_mask), self.embed.tok.weight)

    def labels_every_token(self, route: Route | None) -> bool:
        """True when this batch's heads are TokenHeads; one batch cannot mix them with sentence heads."""
        heads = {"": self.head} if route is None else {n: self.heads[n] for n, _ in route.heads}
        token = [isinstance(h, TokenHead) for h in heads.values()]
        if len(set(token)) > 1:
            raise ValueError(f"one batch mixes token and sentence heads ({', '.join(heads)}): run them apart")
        return token[0]

    def classify(self, x: torch.Tensor, route: Route | None) -> torch.Tensor:
        """Each example's logits from its head; in a mixed batch, narrower heads padded with -inf to the widest."""
        if route is None:
            return self.head(x)
        if len(route.heads) == 1:
            return self.heads[route.heads[0][0]](x)
        parts = [(rows, self.heads[name](x[rows])) for name, rows in route.heads]
        width = max(y.shape[-1] for _, y in parts)
        out = x.new_full((route.batch, *parts[0][1].shape[1:-1], width), float("-inf"))  # (B, width) or (B, T, width)
        for rows, y in parts:
            out = out.index_copy(0, rows, F.pad(y, (0, width - y.shape[-1]), value=float("-inf")))
        return out

    def route(self, adapter: str | Sequence[str] | None, ids: torch.Tensor) -> Route | None:
        """Which adapter each example of `ids` uses; None: no adapter at all."""
        merged, batch = self.merged_adapter, ids.shape[0]
        if adapter is None and self.active_adapter is None:
            if merged is not None:
                raise RuntimeError(f"adapter {merged!r} is merged into the base: unmerge it before running without it")
            return None
        adapter = self.active_adapter if adapter is None else adapter
        names = [adapter] if isinstance(adapter, str) else list(adapter)
        if not isinstance(adapter, str) and len(names) != batch:
            raise ValueError(f"adapter: {len(names)} names for a batch of {batch} examples (give one per example)")
        for n in dict.fromkeys(names):
            if n not in self.heads:
                raise KeyError(f"adapter {n!r} is not in this model (it has {', '.join(self.heads) or 'none'})")
        if merged is not None and (self.training or set(names) != {merged}):
            rest = sorted(set(names) - {merged})
            raise RuntimeError(f"adapter {merged!r} is merged into the base weights: it cannot train, and every example "
                               f"must use it; unmerge_adapter() first to {f'run {rest}' if rest else 'train'}")
        rows = {n: [i for i, m in enumerate(names) if m == n] for n in dict.fromkeys(names)}
        heads = [(n, None if len(rows) == 1 else torch.tensor(r, device=ids.device)) for n, r in rows.items()]
        return Route(slots=[g for g in heads if g[0] != merged], heads=heads, batch=batch)

    @staticmethod
    def key_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The (B, T) 0/1 attention_mask as a (B, 1, 1, T) key mask, True = attend; None hides nothing."""
        hides = attention_mask is not None and not bool(attention_mask.bool().all())
        return attention_mask.bool()[:, None, None, :] if hides else None
