"""Adapter kinds, and many named adapters on one frozen base.

model.py has empty insertion points (`Slot`s): two for bottleneck adapters in every layer (`attn_adapter`,
`ffn_adapter`) and four for LoRA (`attn.qkv_lora`, `attn.proj_lora`, `ffn.up_lora`, `ffn.down_lora`). Adding an
adapter named N puts one small module under the key N into each slot its kind uses, plus a classification head
`heads[N]`. So N's parameters are `layers.3.ffn_adapter.N.down.weight`, `heads.N.out.weight`, ...; its file keys
are the same names with `.N` taken out (see `adapter_tensors`).

Which slots each kind fills is `modules` below; how each example reaches its adapter and head is
model.RoBERTa.route and .classify. This module is the bookkeeping around them: adding, deleting, freezing, merging.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, fields
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from roberta_lite import model as M
from roberta_lite import precision as P
from roberta_lite.model import ACTIVATIONS

# ---------------------------------------------------------------------------------------------- kinds

BOTTLENECK_KINDS = ("houlsby", "pfeiffer")
KINDS = (*BOTTLENECK_KINDS, "lora")
LORA_TARGETS = ("query", "key", "value", "attn_out", "ffn_up", "ffn_down")
TOKEN_TASK = "token-classification"  # a label for every token: a TokenHead
TASKS = ("classification", "regression", "multilabel", TOKEN_TASK)


@dataclass
class AdapterConfig:
    """One adapter's kind and size.

    Bottleneck kinds (`reduction_factor`, `activation`): "houlsby" after attention and after the FFN, "pfeiffer"
    after the FFN only. "lora" (`r`, `alpha`, `targets`, `dropout`, `use_rslora`): a rank-r update
    (alpha/r) B A on each target projection; the defaults are peft's for RoBERTa (query and value), alpha 16."""

    kind: str = "houlsby"
    reduction_factor: int = 16  # 768 / 16 = a 48-wide bottleneck on roberta-base
    activation: str = "relu"
    r: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("query", "value")
    dropout: float = 0.0  # LoRA's dropout on its own input
    use_rslora: bool = False  # scale by alpha / sqrt(r) instead of alpha / r (Kalajdzievski 2023)

    def __post_init__(self):
        def bad(key, expected):
            raise ValueError(f"adapter {key} {getattr(self, key)!r}: expected {expected}")

        if self.kind not in KINDS:
            bad("kind", f"one of {', '.join(KINDS)}")
        if self.activation not in ACTIVATIONS:
            bad("activation", f"one of {', '.join(ACTIVATIONS)}")
        for key in ("reduction_factor", "r"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(key, "a positive integer")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            bad("alpha", "a positive number")
        if isinstance(self.targets, str):
            self.targets = tuple(t.strip() for t in self.targets.split(","))
        self.targets = tuple(self.targets)
        if not self.targets or any(t not in LORA_TARGETS for t in self.targets) or len(set(self.targets)) < len(self.targets):
            bad("targets", f"distinct names from {', '.join(LORA_TARGETS)}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            bad("dropout", "a number in [0, 1)")
        if not isinstance(self.use_rslora, bool):
            bad("use_rslora", "true or false")

    @property
    def is_lora(self) -> bool:
        return self.kind == "lora"

    @classmethod
    def of(cls, spec: "AdapterConfig | str | dict") -> "AdapterConfig":
        """'houlsby' / 'pfeiffer' / 'lora' shorthand, a dict (from adapter_config.json), or an AdapterConfig."""
        if isinstance(spec, AdapterConfig):
            return spec
        if isinstance(spec, str):
            return cls(kind=spec)
        if isinstance(spec, dict):
            unknown = set(spec) - {f.name for f in fields(cls)}
            if unknown:
                raise ValueError(f"adapter config: unknown keys {sorted(unknown)}")
            return cls(**spec)
        raise TypeError(f"adapter: expected 'houlsby', 'pfeiffer', 'lora' or an AdapterConfig, got {spec!r}")

    def to_dict(self) -> dict:
        """The fields this kind uses (what adapter_config.json records)."""
        keys = ("kind", "r", "alpha", "targets", "dropout", "use_rslora") if self.is_lora else \
            ("kind", "reduction_factor", "activation")
        return {k: (list(v) if isinstance(v, tuple) else v) for k in keys for v in [getattr(self, k)]}

# ---------------------------------------------------------------------------------------------- adding and removing

def modules(config: M.Config, spec: "AdapterConfig") -> dict[str, nn.Module]:
    """One adapter's modules by the slot each fills, e.g. 'layers.3.ffn_adapter': Adapter."""
    C, F4, std, out = config.hidden_size, config.ffn_size, config.initializer_range, {}
    if spec.kind != "lora" and C // spec.reduction_factor < 1:
        raise ValueError(f"adapter reduction_factor {spec.reduction_factor} leaves no bottleneck at hidden size {C}")
    lora_slots = (("attn_out", "attn.proj_lora", C, C), ("ffn_up", "ffn.up_lora", C, F4), ("ffn_down", "ffn.down_lora", F4, C))
    for i in range(config.num_layers):
        if spec.kind == "houlsby":
            out[f"layers.{i}.attn_adapter"] = M.Adapter(C, spec, std)
        if spec.kind in ("houlsby", "pfeiffer"):
            out[f"layers.{i}.ffn_adapter"] = M.Adapter(C, spec, std)
        if spec.kind == "lora" and set(M.QKVLoRA.PARTS) & set(spec.targets):
            out[f"layers.{i}.attn.qkv_lora"] = M.QKVLoRA(C, spec)
        for target, slot, fan_in, fan_out in lora_slots if spec.kind == "lora" else ():
            if target in spec.targets:
                out[f"layers.{i}.{slot}"] = M.LoRA(fan_in, fan_out, spec)
    return out


def build(model, cfg: AdapterConfig) -> dict[str, nn.Module]:
    """One adapter's modules by slot path (`modules`), cast as the base's precision needs."""
    return {path: P.mixed_precision(m) if P.is_mixed(model) else m for path, m in modules(model.config, cfg).items()}


def head_class(task: str) -> type[nn.Module]:
    return M.TokenHead if task == TOKEN_TASK else M.ClassificationHead


def expected_shapes(model: "M.RoBERTa", cfg: AdapterConfig, num_labels: int,
                    task: str = "classification") -> dict[str, tuple[int, ...]]:
    """File key -> shape of everything an adapter of this config (with a head of num_labels for task) holds."""
    with torch.device("meta"):
        parts = {**modules(model.config, cfg), "head": head_class(task)(model.config, num_labels)}
    return {f"{path}.{k}": tuple(p.shape) for path, m in parts.items() for k, p in m.named_parameters()}


def check_name(name) -> None:
    """An adapter's name keys torch ModuleDicts (the Slots, `heads`), so it cannot be one of their attributes."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name {name!r}: expected a non-empty string without '.'")
    if _reserved(name):
        raise ValueError(f"adapter name {name!r} is an attribute of torch's nn.ModuleDict, which holds the adapters: "
                         f"choose another name")


def name_from(text: str) -> str:
    """A usable adapter name from free text, such as train.py's output directory."""
    name = re.sub(r"[^\w-]", "_", text) or "default"
    return f"{name}_adapter" if _reserved(name) else name


def _reserved(name: str) -> bool:
    """Whether torch's nn.ModuleDict has an attribute of that name (train, float, eval, ...): not a usable key."""
    return hasattr(nn.ModuleDict(), name)


def add(model: "M.RoBERTa", name, cfg, num_labels: int | None, labels: Sequence[str] | None, task: str, replace: bool):
    if cfg is None and (not isinstance(name, str) or name in KINDS):  # add_adapter("houlsby"), of earlier versions
        name, cfg, replace = "default", name, True
    cfg = AdapterConfig.of(cfg or "houlsby")
    check_name(name)
    if name in model.adapter_configs and not replace:
        raise ValueError(f"adapter {name!r} already exists (delete_adapter it, or pass replace=True)")
    own = model.head  # the model's own classifier
    task = task or (TOKEN_TASK if isinstance(own, M.TokenHead) else "classification")
    if task not in TASKS:
        raise ValueError(f"task {task!r}: expected one of {', '.join(TASKS)}")
    same_kind = isinstance(own, head_class(task))
    if num_labels is None and labels is not None and (len(labels) != own.num_labels or not same_kind):
        num_labels = len(labels)  # names for another number of outputs than the model's classifier has: a new head
    if num_labels is None and not same_kind:
        raise ValueError(f"task {task!r} needs a {head_class(task).__name__}, and the model's own head is a "
                         f"{type(own).__name__}: give num_labels or labels")
    parts = build(model, cfg)  # validates before anything changes
    device = model.embed.tok.weight.device
    if num_labels is None:  # start from the model's own classifier: its trained weights if the checkpoint had one
        head = copy.deepcopy(own)
        head.task = task
        head.labels = list(head.labels if labels is None else labels)
    else:
        head = new_head(model, num_labels, labels, task)
    if name in model.adapter_configs:
        if model.merged_adapter == name:
            raise RuntimeError(f"adapter {name!r} is merged into the base weights: unmerge_adapter() first")
        _remove(model, name)
    slots = dict(model.named_modules())
    for path, m in parts.items():
        slots[path][name] = m.to(device).train(model.training)
    model.heads[name] = head.to(device).train(model.training)
    model.adapter_configs[name] = cfg
    model.active_adapter = name


def new_head(model: "M.RoBERTa", num_labels: int, labels: Sequence[str] | None, task: str) -> nn.Module:
    """A freshly initialised head for the task (a TokenHead for token-classification) with these output names
    (default LABEL_i)."""
    if labels is not None and len(labels) != num_labels:
        raise ValueError(f"labels: {len(labels)} names for {num_labels} outputs")
    head = head_class(task)(model.config, num_labels)
    head.apply(lambda module: M.init_weights(module, model.config.initializer_range))
    if P.is_mixed(model):
        P.mixed_precision(head)
    if labels is not None:
        head.labels = list(labels)
    head.task = task
    return head


def set_head(model: "M.RoBERTa", num_labels: int, labels: Sequence[str] | None):
    old = model.active_head
    head = new_head(model, num_labels, labels, old.task)
    head.to(old.out.weight.device).train(model.training)
    if model.active_adapter is None:
        model.head = head
    else:
        model.heads[model.active_adapter] = head


def delete(model: "M.RoBERTa", name: str):
    if name not in model.adapter_configs:
        raise KeyError(f"adapter {name!r} is not in this model (it has {', '.join(model.adapter_names) or 'none'})")
    if model.merged_adapter == name:
        raise RuntimeError(f"adapter {name!r} is merged into the base weights: unmerge_adapter() first")
    if model.active_adapter == name:  # else model(ids) would silently answer for another task
        raise RuntimeError(f"adapter {name!r} is the active adapter: set model.active_adapter to another one "
                           f"(or None) before deleting it")
    _remove(model, name)


def _remove(model: "M.RoBERTa", name: str):
    for m in model.modules():
        if isinstance(m, M.Slot) and name in m:
            del m[name]
    del model.heads[name], model.adapter_configs[name]


def adapter_tensors(model: "M.RoBERTa", name: str) -> Iterator[tuple[str, nn.Parameter]]:
    """(file key, parameter) for one adapter and its head: `layers.3.ffn_adapter.N.down.weight` is saved as
    `layers.3.ffn_adapter.down.weight`, `heads.N.out.weight` as `head.out.weight`."""
    for path, m in model.named_modules():
        if isinstance(m, M.Slot) and name in m:
            for k, p in m[name].named_parameters():
                yield f"{path}.{k}", p
    for k, p in model.heads[name].named_parameters():
        yield f"head.{k}", p


def freeze_base(model: "M.RoBERTa") -> str:
    """Only the active adapter and its head train (the checkpoint's classifier alone when there is no adapter)."""
    model.requires_grad_(False)
    name = model.active_adapter
    for _, p in adapter_tensors(model, name) if name is not None else model.head.named_parameters():
        p.requires_grad_(True)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


def is_base(model: "M.RoBERTa") -> dict[str, bool]:
    """Parameter name -> whether it belongs to the frozen base (not an adapter, not a head)."""
    adapter = {id(p) for n in model.adapter_configs for _, p in adapter_tensors(model, n)}
    own_head = {id(p) for p in model.head.parameters()}
    return {k: id(p) not in adapter | own_head for k, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------------- merging LoRA

def lora_modules(model: "M.RoBERTa", name: str) -> Iterator[tuple[nn.Linear, nn.Module, slice]]:
    """(base linear, LoRA module, rows of the linear's output it updates) for each target of LoRA adapter `name`."""
    for layer in model.layers:
        for linear, slot in ((layer.attn.qkv, layer.attn.qkv_lora), (layer.attn.proj, layer.attn.proj_lora),
                             (layer.ffn.up, layer.ffn.up_lora), (layer.ffn.down, layer.ffn.down_lora)):
            if name not in slot:
                continue
            m = slot[name]
            if isinstance(m, M.QKVLoRA):
                C = m.hidden_size
                for part, lora in m.items():
                    i = M.QKVLoRA.PARTS.index(part)
                    yield linear, lora, slice(i * C, (i + 1) * C)
            else:
                yield linear, m, slice(None)


@torch.no_grad()
def merge(model: "M.RoBERTa", name: str | None):
    name = name or model.active_adapter
    if name is None or name not in model.adapter_configs:
        raise KeyError(f"merge_adapter: no adapter {name!r} (this model has {', '.join(model.adapter_names) or 'none'})")
    if not model.adapter_configs[name].is_lora:
        raise ValueError(f"merge_adapter: {name!r} is a {model.adapter_configs[name].kind} bottleneck adapter; only "
                         f"LoRA can be merged (a bottleneck adapter's activation cannot be folded into a matrix)")
    if model.merged_adapter is not None:
        raise RuntimeError(f"merge_adapter: {model.merged_adapter!r} is already merged; unmerge_adapter() first")
    for version in (1, 2):  # of the unmerged base, so adapters saved while merged still name their real base
        model.base_fingerprint(version)
    saved = {}
    for linear, lora, rows in lora_modules(model, name):
        w = linear.weight
        if id(w) not in saved:
            saved[id(w)] = (w, w.detach().clone())  # kept to restore the base bit for bit
        delta = (lora.B.float() @ lora.A.float()) * lora.scale  # (out, in), computed in float32
        if not torch.isfinite(delta).all():
            for w, original in saved.values():
                w.copy_(original)
            raise ValueError(f"merge_adapter: {name!r} has non-finite LoRA weights; nothing was merged")
        w[rows] = (w[rows].float() + delta).to(w.dtype)
    model._unmerge = list(saved.values())
    model.merged_adapter = name


@torch.no_grad()
def unmerge(model: "M.RoBERTa"):
    if model.merged_adapter is None:
        raise RuntimeError("unmerge_adapter: no adapter is merged")
    for w, original in model._unmerge:
        w.copy_(original)
    model._unmerge, model.merged_adapter = [], None
