"""The fast paths model.py calls by name. Each computes exactly what its one-line description in model.py says;
a reader of the model can skip this file.

Precision, the one rule (also stated in model.py's docstring): the frozen base's matmul and embedding weights may
be bf16; the residual stream, LayerNorms, adapters and heads are float32. Three small module types implement it,
so model.py never casts:
  * `Linear` computes in its weight's dtype, whatever the input's (a bf16 base layer reads the float32 stream;
    an fp32 adapter reads a bf16 sublayer output);
  * `LayerNorm` and `Embedding` always return float32.
`param_dtype` says which parameters the rule makes bf16; `weights.load_pretrained` applies it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from roberta_lite.model import Config


# ---------------------------------------------------------------------------------------------- precision

def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b computed in the weight's dtype, whatever the input's. For a float32 model the cast is a no-op."""
    return F.linear(x.to(weight.dtype), weight, bias)


class Linear(nn.Linear):
    """nn.Linear that computes in its own weight's dtype (see `linear`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm over float32: the normalised sums of the residual stream stay float32 in a bf16 model (a bf16
    stream would round every residual add and triple the error; autocast keeps these float32 too)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps)


class Embedding(nn.Embedding):
    """nn.Embedding whose rows come out float32, so the embedding sum is taken in float32 even from bf16 tables."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).float()


def param_dtype(name: str, base_dtype: torch.dtype, trainable: bool) -> torch.dtype:
    """Matmul and embedding weights of the frozen base take `base_dtype`; LayerNorms, adapters and heads stay
    float32 (they are tiny, and the LayerNorms act on the float32 residual stream)."""
    if trainable or "norm." in name:
        return torch.float32
    return base_dtype


# ---------------------------------------------------------------------------------------------- dropout

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


# ---------------------------------------------------------------------------------------------- attention

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, p: float,
              training: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v with dropout p on the probabilities in training. (B, H, Tq, d).

    Training on CPU writes the three ops out: PyTorch's fused kernel's backward is about twice as slow as theirs,
    and with attention dropout PyTorch abandons the fused kernel anyway for an unfused float32 path. Everywhere
    else (inference, CUDA) the fused kernel is used."""
    if training and q.device.type == "cpu":
        return attention_explicit(q, k, v, mask, p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p if training else 0.0)


def attention_explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                       p: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v, written out: what scaled_dot_product_attention computes."""
    att = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)  # (B, H, Tq, T)
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))  # padding keys get zero weight
    att = dropout(F.softmax(att, dim=-1), p, training=True)
    return att @ v  # (B, H, Tq, d)


# ---------------------------------------------------------------------------------------------- inputs

def attention_mask(cfg: "Config", ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Validate, and turn the (B, T) 0/1 mask into SDPA's (B, 1, 1, T) boolean key mask (None: no padding)."""
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
