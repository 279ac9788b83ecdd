"""Adapter kinds, and many named adapters on one frozen base.

model.py has empty insertion points (`Slot`s): two for bottleneck adapters in every layer (`attn_adapter`,
`ffn_adapter`) and four for LoRA (`attn.qkv_lora`, `attn.proj_lora`, `ffn.up_lora`, `ffn.down_lora`). Adding an
adapter named N puts one small module under the key N into each slot its kind uses, plus a classification head
`heads[N]`. So N's parameters are `layers.3.ffn_adapter.N.down.weight`, `heads.N.out.weight`, ...; its file keys
are the same names with `.N` taken out (see `adapter_tensors`).

Which adapter each example of a batch uses is a `Route`, worked out once per forward from the `adapter=`
argument and read by every slot: one name for the whole batch costs nothing extra; a list of names (one per
example) runs the frozen base once and each adapter on its own rows only (gather, compute, scatter-add).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from functools import partial
from typing import TYPE_CHECKING, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from roberta_lite import weights as W

if TYPE_CHECKING:  # model.py imports this module; the classes are only needed at call time
    from roberta_lite.model import ClassificationHead, Config, Model

# ---------------------------------------------------------------------------------------------- kinds

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,  # exact (erf) GELU
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's tanh approximation (AdapterHub's old "gelu")
    "swish": F.silu,
    "silu": F.silu,
    "tanh": torch.tanh,
}
BOTTLENECK_KINDS = ("houlsby", "pfeiffer")
KINDS = (*BOTTLENECK_KINDS, "lora")
LORA_TARGETS = ("query", "key", "value", "attn_out", "ffn_up", "ffn_down")
TASKS = ("classification", "regression", "multilabel")


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


# ---------------------------------------------------------------------------------------------- routes

@dataclass
class Route:
    """Which adapter each example uses. `groups`: (name, rows) for the adapters whose modules run, rows None
    meaning every example; `head_groups`: the same for the heads (a merged LoRA runs inside the base weights,
    so it has a head group but no slot group); `batch`: the number of examples."""

    groups: list[tuple[str, torch.Tensor | None]]
    head_groups: list[tuple[str | None, torch.Tensor | None]]
    batch: int


def make_route(model: "Model", adapter: str | Sequence[str] | None, ids: torch.Tensor) -> Route | None:
    """`adapter`: None (the active adapter, if any), one name, or one name per example of `ids`' batch."""
    batch, device = ids.shape[0], ids.device
    merged = model.merged_adapter
    if adapter is None:
        adapter = model.active_adapter
        if adapter is None:
            if merged is not None:
                raise RuntimeError(f"adapter {merged!r} is merged into the base: unmerge it before running without it")
            return None
    names = [adapter] if isinstance(adapter, str) else list(adapter)
    if not isinstance(adapter, str) and len(names) != batch:
        raise ValueError(f"adapter: {len(names)} names for a batch of {batch} examples (give one per example)")
    for n in dict.fromkeys(names):
        if n not in model.adapter_configs:
            raise KeyError(f"adapter {n!r} is not in this model (it has {', '.join(model.adapter_names) or 'none'})")
    if merged is not None and model.training:
        raise RuntimeError(f"adapter {merged!r} is merged into the base weights, where it cannot train: "
                           f"unmerge_adapter() first")
    if merged is not None and set(names) != {merged}:
        raise RuntimeError(f"adapter {merged!r} is merged into the base weights, so every example must use it; "
                           f"unmerge_adapter() first to run {sorted(set(names) - {merged})}")
    if isinstance(adapter, str) or len(set(names)) == 1:
        head_groups = [(names[0], None)]
    else:
        head_groups = [(n, torch.tensor([i for i, m in enumerate(names) if m == n], device=device))
                       for n in dict.fromkeys(names)]
    return Route([g for g in head_groups if g[0] != merged], head_groups, batch)


def classify(model: "Model", route: Route | None, x: torch.Tensor) -> torch.Tensor:
    """Each example's logits from its adapter's head: (B, K). Heads with fewer outputs than the widest one in a
    mixed batch have their missing columns filled with -inf (softmax gives them probability 0)."""
    if route is None:
        return model.head(x)
    if len(route.head_groups) == 1:
        return model.heads[route.head_groups[0][0]](x)
    parts = [(rows, model.heads[name](x.index_select(0, rows))) for name, rows in route.head_groups]
    width = max(y.shape[1] for _, y in parts)
    out = x.new_full((route.batch, width), float("-inf"), dtype=parts[0][1].dtype)
    for rows, y in parts:
        out = out.index_copy(0, rows, F.pad(y, (0, width - y.shape[1]), value=float("-inf")))
    return out


# ---------------------------------------------------------------------------------------------- adding and removing

def build(config: "Config", cfg: AdapterConfig) -> dict[str, nn.Module]:
    """The modules of one adapter, by the slot they go into ('layers.3.ffn_adapter', 'layers.3.attn.qkv_lora', ...)."""
    from roberta_lite.model import Adapter, LoRA, QKVLoRA

    C, F_, std, out = config.hidden_size, config.ffn_size, config.initializer_range, {}
    if not cfg.is_lora and C // cfg.reduction_factor < 1:
        raise ValueError(f"adapter reduction_factor {cfg.reduction_factor} leaves no bottleneck at hidden size {C}")
    for i in range(config.num_layers):
        p = f"layers.{i}"
        if cfg.kind == "houlsby":
            out[f"{p}.attn_adapter"] = Adapter(C, cfg, std)
        if cfg.kind in BOTTLENECK_KINDS:
            out[f"{p}.ffn_adapter"] = Adapter(C, cfg, std)
            continue
        if {"query", "key", "value"} & set(cfg.targets):
            out[f"{p}.attn.qkv_lora"] = QKVLoRA(C, cfg)
        for target, slot, fan_in, fan_out in (("attn_out", "attn.proj_lora", C, C), ("ffn_up", "ffn.up_lora", C, F_),
                                              ("ffn_down", "ffn.down_lora", F_, C)):
            if target in cfg.targets:
                out[f"{p}.{slot}"] = LoRA(fan_in, fan_out, cfg)
    return out


def expected_shapes(model: "Model", cfg: AdapterConfig, num_labels: int) -> dict[str, tuple[int, ...]]:
    """File key -> shape of everything an adapter of this config (with a head of num_labels) holds."""
    from roberta_lite.model import ClassificationHead

    with torch.device("meta"):
        modules = {**build(model.config, cfg), "head": ClassificationHead(model.config, num_labels)}
    return {f"{path}.{k}": tuple(p.shape) for path, m in modules.items() for k, p in m.named_parameters()}


def add(model: "Model", name, cfg, num_labels: int | None, labels: Sequence[str] | None, task: str, replace: bool):
    if cfg is None and (not isinstance(name, str) or name in KINDS):  # add_adapter("houlsby"), of earlier versions
        name, cfg, replace = "default", name, True
    cfg = AdapterConfig.of(cfg or "houlsby")
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name {name!r}: expected a non-empty string without '.'")
    if name in model.adapter_configs and not replace:
        raise ValueError(f"adapter {name!r} already exists (delete_adapter it, or pass replace=True)")
    if task not in TASKS:
        raise ValueError(f"task {task!r}: expected one of {', '.join(TASKS)}")
    modules = build(model.config, cfg)  # validates before anything changes
    device = model.embed.tok.weight.device
    if num_labels is None and labels is not None and len(labels) != model.head.num_labels:
        num_labels = len(labels)  # names for another number of outputs than the model's classifier has: a new head
    if num_labels is None:  # start from the model's own classifier: its trained weights if the checkpoint had one
        head = copy.deepcopy(model.head)
        head.task = task
        head.labels = list(head.labels if labels is None else labels)
    else:
        head = new_head(model, num_labels, labels, task)
    if name in model.adapter_configs:
        if model.merged_adapter == name:
            raise RuntimeError(f"adapter {name!r} is merged into the base weights: unmerge_adapter() first")
        _remove(model, name)
    slots = dict(model.named_modules())
    for path, m in modules.items():
        slots[path][name] = m.to(device).train(model.training)
    model.heads[name] = head.to(device).train(model.training)
    model.adapter_configs[name] = cfg
    model.active_adapter = name


def new_head(model: "Model", num_labels: int, labels: Sequence[str] | None, task: str) -> "ClassificationHead":
    """A freshly initialised classification head with these output names (default LABEL_i) and task kind."""
    from roberta_lite.model import ClassificationHead

    if labels is not None and len(labels) != num_labels:
        raise ValueError(f"labels: {len(labels)} names for {num_labels} outputs")
    head = ClassificationHead(model.config, num_labels)
    head.apply(partial(W.init_fresh, std=model.config.initializer_range))
    if labels is not None:
        head.labels = list(labels)
    head.task = task
    return head


def set_head(model: "Model", num_labels: int, labels: Sequence[str] | None):
    old = model.active_head
    head = new_head(model, num_labels, labels, old.task)
    head.to(old.out.weight.device).train(model.training)
    if model.active_adapter is None:
        model.head = head
    else:
        model.heads[model.active_adapter] = head


def delete(model: "Model", name: str):
    if name not in model.adapter_configs:
        raise KeyError(f"adapter {name!r} is not in this model (it has {', '.join(model.adapter_names) or 'none'})")
    if model.merged_adapter == name:
        raise RuntimeError(f"adapter {name!r} is merged into the base weights: unmerge_adapter() first")
    if model.active_adapter == name:  # else model(ids) would silently answer for another task
        raise RuntimeError(f"adapter {name!r} is the active adapter: set model.active_adapter to another one "
                           f"(or None) before deleting it")
    _remove(model, name)


def _remove(model: "Model", name: str):
    from roberta_lite import model as M

    for m in model.modules():
        if isinstance(m, M.Slot) and name in m:
            del m[name]
    del model.heads[name], model.adapter_configs[name]


def adapter_tensors(model: "Model", name: str) -> Iterator[tuple[str, nn.Parameter]]:
    """(file key, parameter) for one adapter and its head: `layers.3.ffn_adapter.N.down.weight` is saved as
    `layers.3.ffn_adapter.down.weight`, `heads.N.out.weight` as `head.out.weight`."""
    from roberta_lite import model as M

    for path, m in model.named_modules():
        if isinstance(m, M.Slot) and name in m:
            for k, p in m[name].named_parameters():
                yield f"{path}.{k}", p
    for k, p in model.heads[name].named_parameters():
        yield f"head.{k}", p


def freeze_base(model: "Model") -> str:
    """Only the active adapter and its head train (the checkpoint's classifier alone when there is no adapter)."""
    model.requires_grad_(False)
    name = model.active_adapter
    for _, p in adapter_tensors(model, name) if name is not None else model.head.named_parameters():
        p.requires_grad_(True)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


def is_base(model: "Model") -> dict[str, bool]:
    """Parameter name -> whether it belongs to the frozen base (not an adapter, not a head)."""
    adapter = {id(p) for n in model.adapter_configs for _, p in adapter_tensors(model, n)}
    own_head = {id(p) for p in model.head.parameters()}
    return {k: id(p) not in adapter | own_head for k, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------------- merging LoRA

def lora_modules(model: "Model", name: str) -> Iterator[tuple[nn.Linear, nn.Module, slice]]:
    """(base linear, LoRA module, rows of the linear's output it updates) for each target of LoRA adapter `name`."""
    from roberta_lite.model import QKVLoRA

    for layer in model.layers:
        for linear, slot in ((layer.attn.qkv, layer.attn.qkv_lora), (layer.attn.proj, layer.attn.proj_lora),
                             (layer.ffn.up, layer.ffn.up_lora), (layer.ffn.down, layer.ffn.down_lora)):
            if name not in slot:
                continue
            m = slot[name]
            if isinstance(m, QKVLoRA):
                C = m.hidden_size
                for part, lora in m.items():
                    i = QKVLoRA.PARTS.index(part)
                    yield linear, lora, slice(i * C, (i + 1) * C)
            else:
                yield linear, m, slice(None)


@torch.no_grad()
def merge(model: "Model", name: str | None):
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
def unmerge(model: "Model"):
    if model.merged_adapter is None:
        raise RuntimeError("unmerge_adapter: no adapter is merged")
    for w, original in model._unmerge:
        w.copy_(original)
    model._unmerge, model.merged_adapter = [], None


# ---------------------------------------------------------------------------------------------- Model's adapter API

class AdapterMethods:
    """Model's bookkeeping methods: adapters, labels, merging, dropout rates (a mixin, so model.py keeps to the
    architecture)."""

    merged_adapter: str | None = None  # a LoRA folded into the base weights (merge_adapter)
    _unmerge: list = []  # (weight, its value before merging), to unmerge bit for bit
    _fingerprints: dict[int, str] = {}  # base_fingerprint(version), each computed once
    _active: str | None = None

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
        delete(self, name)
        return self

    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapter_configs)

    @property
    def adapter_config(self) -> AdapterConfig | None:
        return self.adapter_configs.get(self.active_adapter) if self.active_adapter else None

    @property
    def active_head(self) -> "ClassificationHead":
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
        return {k: p.detach().float() for k, p in adapter_tensors(self, name or self.active_adapter)}

    def set_num_labels(self, num_labels: int, labels: Sequence[str] | None = None) -> "Model":
        """Give the active adapter (or, without one, the model) a fresh classification head."""
        set_head(self, num_labels, labels)
        return self

    def merge_adapter(self, name: str | None = None) -> "Model":
        """Fold a LoRA adapter into the base weights: inference then costs exactly the base's time."""
        merge(self, name)
        return self

    def unmerge_adapter(self) -> "Model":
        """Restore the base weights bit for bit (they were kept when merging)."""
        unmerge(self)
        return self

    def set_dropout(self, hidden: float | None = None, attention: float | None = None) -> "Model":
        """Change dropout rates at run time (None: leave as is). The checkpoint's rates are the default."""
        from roberta_lite.model import Embeddings, Layer, SelfAttention

        for m in self.modules():
            if hidden is not None and isinstance(m, (Embeddings, Layer)):
                m.dropout = hidden
            if attention is not None and isinstance(m, SelfAttention):
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
