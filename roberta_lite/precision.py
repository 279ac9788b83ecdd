"""The precision rule, and the one function that applies it to a model built in float32 (model.py has no casts).

The rule: the frozen base's matmul and embedding weights and biases (embed.tok/pos/token_type, qkv, proj, up,
down, mlm.dense, mlm.bias) take the base dtype, e.g. bf16 from from_pretrained(dtype=torch.bfloat16); everything
else — the residual stream, LayerNorms, adapters, LoRAs, classifier heads — stays float32, and so does all that
encode, forward and mlm_logits return. A bf16 residual stream would round every residual add; autocast keeps
these float32 too.

`mixed_precision(module)` swaps in subclasses that differ from PyTorch's only by where they cast:
  * `Linear` computes in its weight's dtype whatever its input's (a bf16 base layer reads the float32 stream, a
    float32 adapter reads a bf16 sublayer output) and returns that dtype; `LoRA` likewise;
  * `LayerNorm` and `Embedding` return float32;
  * qkv's `Slot` casts its sum back to the base dtype: a float32 LoRA term would otherwise make attention float32;
  * `MaskedLMHead` multiplies in the embedding's dtype and returns float32 logits.
weights.load_pretrained applies it to a model whose base is not float32, adapters.add to each adapter added to one.
Swapping a class keeps every parameter, name and state-dict key.

Measured (issue #18): a Houlsby adapter computing in bf16 (weights cast down, as before commit 6de5ea6) instead
of casting the bf16 sublayer output up trains 4% faster at roberta-base 8 x 256, but bf16 rounding then depends
on which rows a matmul sees: a mixed batch's rows differed from their own adapter's run by 2e-3, against the 1e-5
that tests/test_lora.py holds them to. So adapters stay float32.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from roberta_lite import model as M


def param_dtype(name: str, base_dtype: torch.dtype, trainable: bool) -> torch.dtype:
    """The dtype the rule gives parameter `name` (a state-dict key) of a base loaded in `base_dtype`."""
    if trainable or "norm." in name:
        return torch.float32
    return base_dtype


def is_mixed(model: nn.Module) -> bool:
    return model.embed.tok.weight.dtype != torch.float32


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


class LoRA(M.LoRA):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.A.dtype))


class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps)


class Embedding(nn.Embedding):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).float()


class QKVSlot(M.Slot):
    def forward(self, y: torch.Tensor, route, **inputs) -> torch.Tensor:
        return super().forward(y, route, **inputs).to(y.dtype)


class MaskedLMHead(M.MaskedLMHead):
    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        x = self.norm(F.gelu(self.dense(x)))
        return F.linear(x.to(embedding.dtype), embedding, self.bias).float()


SWAPS = {nn.Linear: Linear, M.LoRA: LoRA, nn.LayerNorm: LayerNorm, nn.Embedding: Embedding,
         M.MaskedLMHead: MaskedLMHead}


def mixed_precision(module: nn.Module) -> nn.Module:
    """Swap the rule's casting subclasses in for the plain modules under `module`, in place; returns it."""
    for m in module.modules():
        if type(m) in SWAPS:
            m.__class__ = SWAPS[type(m)]
        if isinstance(m, M.SelfAttention) and type(m.qkv_lora) is M.Slot:
            m.qkv_lora.__class__ = QKVSlot
    return module
