"""The two fast paths model.py calls by name. Each computes exactly what its name says; a reader of the model can
skip this file. Each is kept because it saves more than 3% (roberta-base shape, 8 x 256, bf16 base, Houlsby,
2 threads on a shared 2-core AVX512-BF16 CPU, median of 6 alternating forward+backward steps against the plain
version; tests/test_model.py keeps each equal to what it replaces):

  * `dropout`: F.dropout with a cheaper random mask on CPU. With F.dropout instead, training is 5.6% slower.
  * `first_row`: the last encoder layer for <s>'s row alone, the one row the classifier reads. Running the whole
    last layer instead is 7.8% slower in training, 7.1% in inference.

(model.py's other speed choice is in its lesson: SelfAttention.attend writes attention out when training on
CPU, where the fused kernel's training step measured 28% slower.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    """F.dropout(x, p, training): zero a fraction p of the values and scale the rest by 1/(1-p), in training only."""
    if not training or p <= 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, True)  # CUDA's counter-based RNG is already cheap
    return _CheapDropout.apply(x, p)


def first_row(layer, x: torch.Tensor, mask: torch.Tensor | None, route) -> torch.Tensor:
    """layer(x, mask, route)[:, :1] for a model.Layer, computing <s>'s row alone: its query attends to every
    token's key and value, but the other rows' queries, output projection, FFN and adapters are skipped (about a
    twelfth of a roberta-base forward). Written from model.Layer.forward and SelfAttention.forward; a test keeps
    the two equal."""
    attn = layer.attn
    B, T, C = x.shape
    qkv = attn.qkv_lora(attn.qkv(x), route, x=x)  # (B, T, 3C)
    q, k, v = qkv.view(B, T, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)  # (B, H, T, C/H)
    y = attn.attend(q[:, :, :1], k, v, mask).transpose(1, 2).reshape(B, 1, C)  # (B, 1, C)
    h = dropout(attn.proj_lora(attn.proj(y), route, x=y), layer.dropout, layer.training)
    x = x[:, :1]
    x = layer.attn_norm(layer.attn_adapter(x + h, route, h=h, x=x, norm=layer.attn_norm))
    h = dropout(layer.ffn(x, route), layer.dropout, layer.training)
    return layer.ffn_norm(layer.ffn_adapter(x + h, route, h=h, x=x, norm=layer.ffn_norm))  # (B, 1, C)
