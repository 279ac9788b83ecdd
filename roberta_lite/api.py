"""`Model`: the public class. The architecture and forward passes are model.RoBERTa's; this adds the bookkeeping
(adding, deleting, freezing and merging adapters, labels, dropout rates), checkpoint loading and adapter files,
each a short call into adapters.py, weights.py or formats/."""

from __future__ import annotations

import os
from typing import Sequence

import torch

from roberta_lite import adapters as A
from roberta_lite import formats
from roberta_lite import model as M
from roberta_lite import quantize as Q
from roberta_lite import weights as W
from roberta_lite.adapters import AdapterConfig


class Model(M.RoBERTa):
    """Encoder + its own classifier (+ MLM head if the checkpoint has one) + named adapters, each with a head."""

    _unmerge: list = []  # (weight, its value before merging), to unmerge bit for bit
    _fingerprints: dict[int, str] = {}  # base_fingerprint(version), each computed once
    _active: str | None = None
    quantized: str | None = None  # "int8" after quantize("int8")

    def __init__(self, config: M.Config, num_labels: int = 2, adapter: AdapterConfig | str | None = None,
                 mlm_head: bool = False):
        super().__init__(config, num_labels, mlm_head)
        self.adapter_configs: dict[str, AdapterConfig] = {}  # adapter name -> config, in the order added
        if adapter is not None:
            self.add_adapter("default", adapter)

    # Forward passes: model.RoBERTa's, after checking the inputs. `adapter`: None (the active one), a name,
    # or one name per example (one pass of the base). Every returned tensor is float32.
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               adapter: str | Sequence[str] | None = None) -> torch.Tensor:
        """Final hidden states (B, T, C) (no adapter: transformers' RobertaModel(...).last_hidden_state)."""
        check_inputs(self.config, input_ids, attention_mask)
        return super().encode(input_ids, attention_mask, adapter)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                adapter: str | Sequence[str] | None = None) -> torch.Tensor:
        """Logits (B, num_labels) from each example's adapter's head (none active: the model's own `head`).
        A mixed batch runs each head on its own rows; narrower heads are padded to the widest with -inf."""
        check_inputs(self.config, input_ids, attention_mask)
        return super().forward(input_ids, attention_mask, adapter)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, num_labels: int | None = None,
                        adapter: AdapterConfig | str | None = None, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, **kwargs) -> "Model":
        """A transformers RoBERTa checkpoint (directory or hub id); dtype=torch.bfloat16: the fast frozen base.
        num_labels None: the checkpoint classifier's (weights kept), or 2 if it has none; another number: a new head."""
        return W.load_pretrained(cls, name_or_path, num_labels, adapter, dtype, device, **kwargs)

    def add_adapter(self, name: str | AdapterConfig | dict, config: AdapterConfig | str | dict | None = None, *,
                    num_labels: int | None = None, labels: Sequence[str] | None = None,
                    task: str | None = None, replace: bool = False) -> "Model":
        """Add a fresh adapter `name` with its own head, and make it active. Until trained, a LoRA is the identity
        and a bottleneck nearly so (small random weights, Houlsby's and AdapterHub's init). The head starts as a
        copy of the model's own classifier; with num_labels, a fresh one (BERT's init). task:
        "classification" (default), "regression", "multilabel", or "token-classification" (a TokenHead: logits
        (B, T, K), a label for every token)."""
        A.add(self, name, config, num_labels, labels, task, replace)
        return self

    def freeze_base(self) -> str:
        """Train only the active adapter and its head (else `head`); rerun it after switching. Returns a summary."""
        Q.refuse(self, "freeze_base")
        return A.freeze_base(self)

    def save_adapter(self, directory: str | os.PathLike, name: str | None = None, format: str = "roberta_lite"):
        """Write one adapter and its head ("roberta_lite", "adapterhub" or "peft" format); see formats/."""
        return formats.save(self, directory, name, format)

    def load_adapter(self, source: str | os.PathLike, name: str | None = None, replace: bool = False) -> "Model":
        """Add an adapter from a directory or hub id in any supported format, and make it active."""
        formats.load(self, source, name, replace)
        return self

    @property
    def active_adapter(self) -> str | None:
        """The adapter forward passes use when they name none (None: the model's own classifier)."""
        return self._active

    @active_adapter.setter
    def active_adapter(self, name: str | None):
        if name is not None and name not in self.adapter_configs:
            raise KeyError(f"adapter {name!r} is not in this model (it has {', '.join(self.adapter_names) or 'none'})")
        self._active = name

    def delete_adapter(self, name: str) -> "Model":
        A.delete(self, name)
        return self

    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapter_configs)

    @property
    def adapter_config(self) -> AdapterConfig | None:
        return self.adapter_configs.get(self.active_adapter) if self.active_adapter else None

    @property
    def active_head(self) -> M.ClassificationHead | M.TokenHead:
        return self.heads[self.active_adapter] if self.active_adapter else self.head

    @property
    def labels(self) -> list[str]:
        return self.active_head.labels

    @labels.setter
    def labels(self, names: Sequence[str]):
        if len(names) != self.num_labels:
            raise ValueError(f"labels: {len(names)} names for {self.num_labels} outputs")
        self.active_head.labels = list(names)

    @property
    def num_labels(self) -> int:
        return self.active_head.num_labels

    def adapter_state_dict(self, name: str | None = None) -> dict[str, torch.Tensor]:
        """One adapter's tensors and its head's (default: the active adapter), float32, under their file keys."""
        return {k: p.detach().float() for k, p in A.adapter_tensors(self, name or self.active_adapter)}

    def set_num_labels(self, num_labels: int, labels: Sequence[str] | None = None) -> "Model":
        """Give the active adapter (or, without one, the model) a fresh classification head."""
        A.set_head(self, num_labels, labels)
        return self

    def merge_adapter(self, name: str | None = None) -> "Model":
        """Fold a LoRA adapter into the base weights: inference then costs exactly the base's time."""
        Q.refuse(self, "merge_adapter")
        A.merge(self, name)
        return self

    def unmerge_adapter(self) -> "Model":
        """Restore the base weights bit for bit (they were kept when merging)."""
        Q.refuse(self, "unmerge_adapter")
        A.unmerge(self)
        return self

    def quantize(self, scheme: str = "int8") -> "Model":
        """Make the frozen base int8 for CPU inference, in place (quantize.py): its matmul weights int8 per output
        channel, activations quantized on the fly; adapters, heads, embeddings and LayerNorms stay as they are.
        Inference only; merge a LoRA first if wanted. Returns the model, in eval mode."""
        Q.quantize(self, scheme)
        return self

    def set_dropout(self, hidden: float | None = None, attention: float | None = None) -> "Model":
        """Change dropout rates at run time (None: leave as is). The checkpoint's rates are the default."""
        for m in self.modules():
            if hidden is not None and isinstance(m, (M.Embeddings, M.Layer)):
                m.dropout = hidden
            if attention is not None and isinstance(m, M.SelfAttention):
                m.dropout = attention
        self.config.dropout = self.config.dropout if hidden is None else hidden  # for heads added later
        self.config.attention_dropout = self.config.attention_dropout if attention is None else attention
        return self

    def base_fingerprint(self, version: int = W.FINGERPRINT_VERSION) -> str:
        """A hash of the frozen encoder's weights (weights.fingerprint), recorded in adapter files to catch loading
        onto another base; `version` 1 is the older hash, which also covered the MLM head."""
        if version not in self._fingerprints:
            self._fingerprints = {**self._fingerprints, version: W.fingerprint(self, version)}
        return self._fingerprints[version]


def check_inputs(cfg: M.Config, ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """Token ids must be a (batch, length) integer tensor of ids in the vocabulary, no longer than the position
    table allows; an attention_mask must have their shape."""
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids: expected an integer tensor of shape (batch, length), "
                         f"got {ids.dtype} {tuple(ids.shape)}")
    if ids.shape[1] > cfg.max_tokens:
        raise ValueError(f"input_ids: length {ids.shape[1]} exceeds the model's limit of {cfg.max_tokens} tokens "
                         f"(max_position_embeddings {cfg.max_positions} minus pad_id+1); truncate the text")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= cfg.vocab_size:
        raise ValueError(f"input_ids: token id {lo if lo < 0 else hi} is outside the vocabulary of {cfg.vocab_size} "
                         f"tokens (ids 0..{cfg.vocab_size - 1}); was the text tokenized with this model's tokenizer?")
    if attention_mask is not None and attention_mask.shape != ids.shape:
        raise ValueError(f"attention_mask: shape {tuple(attention_mask.shape)} does not match input_ids "
                         f"shape {tuple(ids.shape)}")
