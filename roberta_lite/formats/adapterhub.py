"""AdapterHub adapter directories (the `adapters` library, 1.x, and adapter-transformers before it), both ways.

A saved AdapterHub adapter is a directory:
    adapter_config.json      {"name", "config": {BnConfig options}, "hidden_size", "model_type", "version", ...}
    adapter.safetensors      or pytorch_adapter.bin (what `save_adapter` writes without use_safetensors=True)
    head_config.json         optional: the prediction head's options and labels
    model_head.safetensors   or pytorch_model_head.bin

Only the two bottleneck placements roberta_lite computes are accepted: seq_bn (Pfeiffer: after the FFN, reading the
LayerNorm'd sum) and double_seq_bn (Houlsby: after attention and after the FFN, reading the sublayer output), with one
reduction factor and an activation from ACTIVATIONS. Every other BnConfig option must keep the value under which the
two compute the same thing; anything else is refused with the file, option and value named, never approximated.

Heads: the flex ClassificationHead (classification, multilabel_classification; RoBERTa's dense + tanh + out) and the
flex TaggingHead (head_type "tagging", layers=1: dropout and one Linear(C, K) on every token, our TokenHead), or the
static classifier of adapters.init(RobertaFor{Sequence,Token}Classification). A tagging head with more layers puts a
Linear(C, C) and an activation before its output, which TokenHead has not: refused.

Names and semantics follow the `adapters` 1.3 source: methods/modeling.py (Adapter.pre_forward / forward /
post_forward), methods/bottleneck.py, configuration/adapter_config.py (BnConfig), loading.py, heads/base.py.
`adapters` is not imported here: it is a test dependency only.
"""

from __future__ import annotations

import io
import json
import re

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from roberta_lite.formats.file import AdapterFile
from roberta_lite.weights import CheckpointError, atomic_write, read_json


FORMAT = "adapterhub"


# File names, as adapters' utils.py spells them (CONFIG_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_NAME, HEAD_*).
CONFIG = "adapter_config.json"
WEIGHTS = ("adapter.safetensors", "pytorch_adapter.bin")  # safetensors first; .bin only with weights_only=True
HEAD_CONFIG = "head_config.json"
HEAD_WEIGHTS = ("model_head.safetensors", "pytorch_model_head.bin")

FORMAT_VERSION = "adapters.1.3.0"  # the format written; any "version" key also stops the pre-v2 "gelu" rename

# Their key template -> interchange template. `{}` is the layer index, `{name}` the file's "name" (adapter_config.json
# for adapter keys, head_config.json for head keys). Adapter keys may carry the `roberta.` prefix (RobertaAdapterModel,
# RobertaFor...) or not (adapters.init(RobertaModel)). For each interchange key, the first entry is what write() uses.
KEYS: dict[str, str | None] = {
    # adapters.{name}: Adapter.adapter_down is Sequential(Linear, activation), adapter_up a Linear.
    "encoder.layer.{}.attention.output.adapters.{name}.adapter_down.0.weight": "layers.{}.attn_adapter.down.weight",
    "encoder.layer.{}.attention.output.adapters.{name}.adapter_down.0.bias": "layers.{}.attn_adapter.down.bias",
    "encoder.layer.{}.attention.output.adapters.{name}.adapter_up.weight": "layers.{}.attn_adapter.up.weight",
    "encoder.layer.{}.attention.output.adapters.{name}.adapter_up.bias": "layers.{}.attn_adapter.up.bias",
    "encoder.layer.{}.output.adapters.{name}.adapter_down.0.weight": "layers.{}.ffn_adapter.down.weight",
    "encoder.layer.{}.output.adapters.{name}.adapter_down.0.bias": "layers.{}.ffn_adapter.down.bias",
    "encoder.layer.{}.output.adapters.{name}.adapter_up.weight": "layers.{}.ffn_adapter.up.weight",
    "encoder.layer.{}.output.adapters.{name}.adapter_up.bias": "layers.{}.ffn_adapter.up.bias",
    # adapter-transformers 1.x names, which adapters' AdapterLoader.legacy_weights_mapping renames to the above.
    "encoder.layer.{}.attention.output.attention_text_task_adapters.{name}.adapter_down.0.weight":
        "layers.{}.attn_adapter.down.weight",
    "encoder.layer.{}.attention.output.attention_text_task_adapters.{name}.adapter_down.0.bias":
        "layers.{}.attn_adapter.down.bias",
    "encoder.layer.{}.attention.output.attention_text_task_adapters.{name}.adapter_up.weight":
        "layers.{}.attn_adapter.up.weight",
    "encoder.layer.{}.attention.output.attention_text_task_adapters.{name}.adapter_up.bias":
        "layers.{}.attn_adapter.up.bias",
    "encoder.layer.{}.output.layer_text_task_adapters.{name}.adapter_down.0.weight":
        "layers.{}.ffn_adapter.down.weight",
    "encoder.layer.{}.output.layer_text_task_adapters.{name}.adapter_down.0.bias": "layers.{}.ffn_adapter.down.bias",
    "encoder.layer.{}.output.layer_text_task_adapters.{name}.adapter_up.weight": "layers.{}.ffn_adapter.up.weight",
    "encoder.layer.{}.output.layer_text_task_adapters.{name}.adapter_up.bias": "layers.{}.ffn_adapter.up.bias",
    "encoder.layer.{}.attention.output.attention_text_lang_adapters.{name}.adapter_down.0.weight":
        "layers.{}.attn_adapter.down.weight",
    "encoder.layer.{}.attention.output.attention_text_lang_adapters.{name}.adapter_down.0.bias":
        "layers.{}.attn_adapter.down.bias",
    "encoder.layer.{}.attention.output.attention_text_lang_adapters.{name}.adapter_up.weight":
        "layers.{}.attn_adapter.up.weight",
    "encoder.layer.{}.attention.output.attention_text_lang_adapters.{name}.adapter_up.bias":
        "layers.{}.attn_adapter.up.bias",
    "encoder.layer.{}.output.layer_text_lang_adapters.{name}.adapter_down.0.weight":
        "layers.{}.ffn_adapter.down.weight",
    "encoder.layer.{}.output.layer_text_lang_adapters.{name}.adapter_down.0.bias": "layers.{}.ffn_adapter.down.bias",
    "encoder.layer.{}.output.layer_text_lang_adapters.{name}.adapter_up.weight": "layers.{}.ffn_adapter.up.weight",
    "encoder.layer.{}.output.layer_text_lang_adapters.{name}.adapter_up.bias": "layers.{}.ffn_adapter.up.bias",
    # Flex classification head (heads/base.py, layers=2): 0 Dropout, 1 Linear(C, C), 2 tanh, 3 Dropout, 4 Linear(C, K).
    "heads.{name}.1.weight": "head.dense.weight",
    "heads.{name}.1.bias": "head.dense.bias",
    "heads.{name}.4.weight": "head.out.weight",
    "heads.{name}.4.bias": "head.out.bias",
    # Static head of adapters.init(RobertaForSequenceClassification): transformers' own classifier.
    "classifier.dense.weight": "head.dense.weight",
    "classifier.dense.bias": "head.dense.bias",
    "classifier.out_proj.weight": "head.out.weight",
    "classifier.out_proj.bias": "head.out.bias",
}
# A tagging head (token classification) has its own table: its out layer is index 1 of the flex head, where the
# classification head has its dense layer. Only head keys; the adapter's come from KEYS.
TAGGING_KEYS: dict[str, str] = {
    # Flex TaggingHead (heads/base.py, layers=1): 0 Dropout, 1 Linear(C, K) on every token.
    "heads.{name}.1.weight": "head.out.weight",
    "heads.{name}.1.bias": "head.out.bias",
    # Static head of adapters.init(RobertaForTokenClassification): transformers' own classifier, a Linear(C, K).
    "classifier.weight": "head.out.weight",
    "classifier.bias": "head.out.bias",
}
PREFIX = "roberta."  # RobertaAdapterModel's base_model_prefix; write() uses it, as save_adapter does

# ---------------------------------------------------------------------------------------------- BnConfig options
# The placement options, in this order, -> our kind. Adapter.pre_forward/forward/post_forward compute, for sublayer
# output h and residual x:  residual_before_ln=True: r = h; original_ln_before: a = LN(x + h) else a = h;
# out = LN(x + r + up(act(down(a)))). With original_ln_before=False, residual_before_ln=False also gives r = h.
PLACEMENT_KEYS = ("mh_adapter", "output_adapter", "original_ln_before", "residual_before_ln")
PLACEMENTS = {
    (False, True, True, True): "pfeiffer",  # seq_bn: LN(x + h + A(LN(x + h))), after the FFN only
    (True, True, False, True): "houlsby",  # double_seq_bn: LN(x + h + A(h)), after attention and after the FFN
    (True, True, False, False): "houlsby",  # the same computation (r = a = h)
}
PLACEMENT_DEFAULTS = {"original_ln_before": False, "residual_before_ln": True}  # BnConfig's; the others are required

# Options that must keep adapters' default (a missing key means the default): any other value computes something else.
MUST_BE_DEFAULT = {
    "original_ln_after": True,  # False: no residual + LayerNorm after the adapter
    "ln_before": False,  # the adapter's own LayerNorm before down
    "ln_after": False,  # the adapter's own LayerNorm after up
    "is_parallel": False,  # ParallelAdapter (par_bn): reads the sublayer input
    "scaling": 1.0,  # constant, "learned" or "channel" factor on the adapter output
    "use_gating": False,  # UniPELT's gate
    "inv_adapter": None,  # invertible adapter on the embeddings (MAD-X language adapters)
    "cross_adapter": False,  # cross-attention adapter
    "leave_out": [],  # layers without an adapter
    "phm_layer": False,  # Compacter's PHM projections
    "stochastic_depth": 0.0,  # AdapterPlus's drop-path
}
# Keys that are not BnConfig fields but may be in a file; never written.
LEGACY_MUST_BE_NONE = {
    "architecture": None,  # AdapterConfig._get_config_class: None is BnConfig; "lora", "prefix_tuning", ...
    "invertible_adapter": None,  # adapter-transformers 1.x form of inv_adapter: {"block_type": ..., ...}
}
# Options that cannot change what a trained adapter computes in eval mode: initialisation, training-time dropout, the
# residual order around ln_after (refused above), settings of refused features. Written with adapters' defaults.
FREE = {
    "adapter_residual_before_ln": False, "init_weights": "bert", "init_weights_seed": None, "dropout": 0.0,
    "inv_adapter_reduction_factor": None, "phm_dim": 4, "factorized_phm_W": True, "shared_W_phm": False,
    "shared_phm_rule": True, "factorized_phm_rule": False, "phm_c_init": "normal", "phm_init_range": 0.0001,
    "learn_phm": True, "hypercomplex_nonlinearity": "glorot-uniform", "phm_rank": 1, "phm_bias": True,
}

# non_linearity (lower-cased, as Activation_Function_Class does; transformers' ACT2FN) -> our activation name.
ACTIVATIONS = {"relu": "relu", "swish": "swish", "silu": "swish", "gelu": "gelu", "gelu_new": "gelu_new",
               "tanh": "tanh"}
TO_THEIR_ACTIVATION = {"relu": "relu", "swish": "swish", "silu": "silu", "gelu": "gelu", "gelu_new": "gelu_new",
                       "tanh": "tanh"}
# adapters' utils.ACTIVATION_RENAME, applied by WeightsLoaderHelper.load_weights_config when the file has no "version"
# key (adapter-transformers before v2): their old "gelu" was the tanh approximation.
OLD_ACTIVATION_RENAME = {"gelu": "gelu_new", "gelu_orig": "gelu"}

# ---------------------------------------------------------------------------------------------- head options
HEAD_CLASSES = {"RobertaAdapterModel": "flex", "RobertaModelWithHeads": "flex",  # adapter-transformers' flex class
                "RobertaForSequenceClassification": "static", "RobertaForTokenClassification": "static"}
HEAD_TYPES = {"classification": "classification", "multilabel_classification": "multilabel",
              "tagging": "token-classification"}
# Flex head config keys that must hold one value for RoBERTa's classifier (missing: ClassificationHead's default).
HEAD_MUST_BE = {"layers": 2, "activation_function": "tanh", "use_pooler": False, "bias": True}
HEAD_FREE = {"dropout_prob"}  # training-time only
HEAD_KEYS = {"head_type", "num_labels", "label2id", "id2label"} | set(HEAD_MUST_BE) | HEAD_FREE
# TaggingHead's options (it takes no use_pooler or bias: a file naming them does not load in adapters either). One
# layer is our TokenHead, dropout then Linear(C, K); layers=2 puts a Linear(C, C) and the activation before it.
TAGGING_MUST_BE = {"layers": 1}  # missing: TaggingHead's default, 1
TAGGING_FREE = {"dropout_prob", "activation_function"}  # the activation is unused with one layer (PredictionHead.build)
TAGGING_HEAD_KEYS = {"head_type", "num_labels", "label2id", "id2label"} | set(TAGGING_MUST_BE) | TAGGING_FREE
TAGGING_WRITTEN = {"layers": 1, "activation_function": "tanh"}  # as add_tagging_head(name, num_labels) saves them
TOKEN_TASK = "token-classification"


# ---------------------------------------------------------------------------------------------- reading

def detect(directory: Path) -> bool:
    """AdapterHub's adapter_config.json holds a "config" block (peft's has "peft_type", roberta_lite's "adapter")."""
    path = Path(directory) / CONFIG
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(meta, dict) and isinstance(meta.get("config"), dict) and "peft_type" not in meta


def read(directory: Path, hidden_size: int, num_layers: int) -> AdapterFile:
    """Read and fully validate an AdapterHub directory against a base of `hidden_size` and `num_layers`."""
    d = Path(directory)
    meta = _read_json(d / CONFIG)
    name = _name(meta, d / CONFIG)
    _check_base(meta, d / CONFIG, hidden_size)
    config = _our_config(meta, d / CONFIG, hidden_size)
    head = _read_head_config(d, hidden_size)
    num_labels = head["num_labels"] if head else None
    task = head["task"] if head else "classification"
    expected = expected_shapes(config, num_labels, hidden_size, num_layers, task)
    tensors = _read_tensors(d / _present(d, WEIGHTS), name, "encoder.", num_layers,
                            {k: s for k, s in expected.items() if not _is_head(k)})
    if head:
        heads = {k: s for k, s in expected.items() if _is_head(k)}
        tensors.update(_read_tensors(d / _present(d, HEAD_WEIGHTS), head["name"], head["family"], num_layers, heads,
                                     key_table(task)))
    base = {"hidden_size": meta.get("hidden_size"), "num_layers": num_layers, "model_name": meta.get("model_name")}
    return AdapterFile(name=name, config=config, tensors=tensors, num_labels=num_labels,
                       labels=head["labels"] if head else None, task=task,
                       base=base)


def _read_json(path: Path) -> dict:
    return read_json(path, f"an AdapterHub adapter directory holds {CONFIG}")


def _name(meta: dict, path: Path) -> str:
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{path}: key 'name' = {name!r}: expected the adapter's name")
    return name


def _check_base(meta: dict, path: Path, hidden_size: int) -> None:
    """A file for another base is refused here, before any tensor is read (its depth is checked by the keys)."""
    if meta.get("model_type", "roberta") != "roberta":
        raise CheckpointError(f"{path}: key 'model_type' = {meta['model_type']!r}: this adapter is for another "
                              f"architecture (roberta_lite is RoBERTa)")
    if "hidden_size" in meta and meta["hidden_size"] != hidden_size:
        raise CheckpointError(f"{path}: key 'hidden_size' = {meta['hidden_size']!r}: this adapter is for another base "
                              f"(this model's hidden size is {hidden_size})")


def _our_config(meta: dict, path: Path, hidden_size: int) -> dict:
    """The file's "config" block -> {"kind", "reduction_factor", "activation"}, or CheckpointError naming the option."""
    cfg = meta.get("config")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: key 'config' = {cfg!r}: expected the adapter's options (a JSON object)")
    # An old task adapter may name an invertible adapter it never trained; adapters drops it (_fix_legacy_config).
    excused = ("inv_adapter", "invertible_adapter") if meta.get("type") == "text_task" else ()
    for key, want in {**LEGACY_MUST_BE_NONE, **MUST_BE_DEFAULT}.items():  # "architecture" first: LoRA is no option
        if key in cfg and key not in excused and not _same(cfg[key], want):
            raise CheckpointError(f"{path}: config key {key!r} = {cfg[key]!r} is not supported (roberta_lite computes "
                                  f"only {key}={want!r})")
    known = set(PLACEMENT_KEYS) | set(MUST_BE_DEFAULT) | set(LEGACY_MUST_BE_NONE) | set(FREE) | {
        "reduction_factor", "non_linearity"}
    for key in cfg:
        if key not in known:
            raise CheckpointError(f"{path}: config key {key!r} = {cfg[key]!r} is not a bottleneck adapter option "
                                  f"roberta_lite knows")
    return {"kind": _kind(cfg, path), "reduction_factor": _reduction_factor(cfg, path, hidden_size),
            "activation": _activation(cfg, path, old="version" not in meta)}


def _same(value, want) -> bool:
    """JSON equality without 1 == True: booleans and None compare by identity, numbers by value."""
    if isinstance(want, bool) or want is None:
        return value is want
    if isinstance(want, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == want
    return value == want


def _kind(cfg: dict, path: Path) -> str:
    got = {}
    for key in PLACEMENT_KEYS:
        if key not in cfg and key not in PLACEMENT_DEFAULTS:
            raise CheckpointError(f"{path}: config key {key!r} is missing")
        got[key] = cfg.get(key, PLACEMENT_DEFAULTS.get(key))
        if not isinstance(got[key], bool):
            raise CheckpointError(f"{path}: config key {key!r} = {got[key]!r} is not supported (expected true/false)")
    values = tuple(got.values())
    if values in PLACEMENTS:
        return PLACEMENTS[values]
    distance = {p: sum(a != b for a, b in zip(p, values)) for p in PLACEMENTS}
    nearest = [p for p, n in distance.items() if n == min(distance.values())]
    wrong = ", ".join(f"{k!r} = {v!r}" for i, (k, v) in enumerate(got.items()) if any(p[i] != v for p in nearest))
    raise CheckpointError(f"{path}: config key {wrong} is not supported (roberta_lite computes the seq_bn/pfeiffer "
                          f"and double_seq_bn/houlsby placements only)")


def _reduction_factor(cfg: dict, path: Path, hidden_size: int) -> int:
    rf = cfg.get("reduction_factor")
    why = None
    if isinstance(rf, dict):
        why = "per-layer reduction factors are not supported"
    elif isinstance(rf, bool) or not isinstance(rf, (int, float)) or not float(rf).is_integer() or rf < 1:
        why = "expected one whole number >= 1"
    elif hidden_size // int(rf) < 1:
        why = f"it leaves no bottleneck at hidden size {hidden_size}"
    if why:
        raise CheckpointError(f"{path}: config key 'reduction_factor' = {rf!r}: {why}")
    return int(rf)


def _activation(cfg: dict, path: Path, old: bool) -> str:
    act = cfg.get("non_linearity")
    if not isinstance(act, str):
        raise CheckpointError(f"{path}: config key 'non_linearity' = {act!r}: expected an activation name")
    if old:  # no "version" key: written before adapter-transformers v2
        act = OLD_ACTIVATION_RENAME.get(act, act)
    if act.lower() not in ACTIVATIONS:
        raise CheckpointError(f"{path}: config key 'non_linearity' = {cfg['non_linearity']!r} is not supported "
                              f"(roberta_lite computes {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[act.lower()]


def _read_head_config(d: Path, hidden_size: int) -> dict | None:
    """head_config.json -> {"name", "family" (its keys' KEYS prefix), "num_labels", "labels", "task"}, or None."""
    path = d / HEAD_CONFIG
    weights = [f for f in HEAD_WEIGHTS if (d / f).is_file()]
    if not path.is_file():
        if weights:
            raise CheckpointError(f"{d / weights[0]}: head weights without {HEAD_CONFIG}")
        return None
    if not weights:
        raise FileNotFoundError(f"{d}: {HEAD_CONFIG} but neither {' nor '.join(HEAD_WEIGHTS)}")
    meta = _read_json(path)
    _check_base(meta, path, hidden_size)
    kind = HEAD_CLASSES.get(meta.get("model_class"))
    if kind is None:
        raise CheckpointError(f"{path}: key 'model_class' = {meta.get('model_class')!r}: not a RoBERTa sequence "
                              f"or token classification head (expected one of {', '.join(HEAD_CLASSES)})")
    return _flex_head(meta, path) if kind == "flex" else _static_head(meta, path)


def _flex_head(meta: dict, path: Path) -> dict:
    cfg = meta.get("config")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: key 'config' = {cfg!r}: expected the head's options (a JSON object)")
    if cfg.get("head_type") not in HEAD_TYPES:
        raise CheckpointError(f"{path}: config key 'head_type' = {cfg.get('head_type')!r} is not supported "
                              f"(expected one of {', '.join(HEAD_TYPES)})")
    task = HEAD_TYPES[cfg["head_type"]]
    known, must, what = (TAGGING_HEAD_KEYS, TAGGING_MUST_BE, "roberta_lite's token head is one Linear(C, K)") \
        if task == TOKEN_TASK else (HEAD_KEYS, HEAD_MUST_BE, "RoBERTa's classifier has")
    for key in cfg:
        if key not in known:
            raise CheckpointError(f"{path}: config key {key!r} is not a {cfg['head_type']} head option")
    for key, want in must.items():
        value = cfg.get(key, want)
        if not _same(value.lower() if isinstance(value, str) else value, want):
            raise CheckpointError(f"{path}: config key {key!r} = {value!r} is not supported ({what}: "
                                  f"{key}={want!r})")
    num_labels = _num_labels(cfg.get("num_labels", 2), path)  # 2: the default of ClassificationHead and TaggingHead
    labels = _labels(cfg, num_labels, path)
    if task == "classification" and num_labels == 1:
        task = "regression"  # ClassificationHead: num_labels == 1 trains with MSELoss
    return {"name": _name(meta, path), "family": "heads.", "num_labels": num_labels, "labels": labels, "task": task}


def _static_head(meta: dict, path: Path) -> dict:
    """A transformers classifier saved by adapters.init(RobertaFor{Sequence,Token}Classification): labels at the top
    level."""
    if meta.get("config") is not None:
        raise CheckpointError(f"{path}: key 'config' = {meta['config']!r}: a {meta['model_class']} head has none")
    label2id = meta.get("label2id")
    # get_head_config_and_rename_list: num_labels, else the label map's size, else 2.
    num_labels = _num_labels(meta.get("num_labels") or (len(label2id) if isinstance(label2id, dict) else 2), path)
    task = TOKEN_TASK if meta["model_class"] == "RobertaForTokenClassification" else \
        "regression" if num_labels == 1 else "classification"
    return {"name": "", "family": "classifier.", "num_labels": num_labels, "labels": _labels(meta, num_labels, path),
            "task": task}


def _num_labels(value, path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{path}: key 'num_labels' = {value!r}: expected a positive integer")
    return value


def _labels(block: dict, num_labels: int, path: Path) -> list[str] | None:
    """id2label ({"0": name}) takes precedence over label2id ({name: 0}), as in add_prediction_head_from_config."""
    if block.get("id2label") is not None:
        key, raw = "id2label", block["id2label"]
        pairs = list(raw.items()) if isinstance(raw, dict) else None  # (id, name)
    elif block.get("label2id") is not None:
        key, raw = "label2id", block["label2id"]
        pairs = [(i, n) for n, i in raw.items()] if isinstance(raw, dict) else None
    else:
        return None
    by_id = {str(i): n for i, n in pairs or []}
    wanted = [str(i) for i in range(num_labels)]
    if pairs is None or len(by_id) != len(pairs) or set(by_id) != set(wanted):
        raise CheckpointError(f"{path}: key {key!r} = {raw!r}: expected one name for each class id 0..{num_labels - 1}")
    return [str(by_id[i]) for i in wanted]


def _present(d: Path, names: tuple[str, str]) -> str:
    """The safetensors file when there is one, else the .bin."""
    name = next((n for n in names if (d / n).is_file()), None)
    if name is None:
        raise FileNotFoundError(f"{d}: neither {' nor '.join(names)} is present")
    return name


def _read_tensors(path: Path, name: str, family: str, num_layers: int, expected: dict[str, tuple[int, ...]],
                  keys: dict[str, str] = KEYS) -> dict[str, torch.Tensor]:
    """Load one weights file, rename every key through the `keys` entries of `family`, check the set and each shape."""
    table = concrete_keys(name, num_layers, family, keys)
    out: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    for key, t in _load(path).items():
        ours = table.get(key.removeprefix(PREFIX) if family == "encoder." else key)
        if ours is None or ours not in expected:
            raise CheckpointError(f"{path}: unexpected key {key!r}{_why_unexpected(key, ours, num_layers)}")
        if ours in out:
            raise CheckpointError(f"{path}: keys {source[ours]!r} and {key!r} are the same tensor ({ours})")
        if tuple(t.shape) != expected[ours]:
            raise CheckpointError(f"{path}: key {key!r} has shape {tuple(t.shape)}, expected {expected[ours]}")
        out[ours], source[ours] = t.to(torch.float32).contiguous(), key
    missing = [k for k in expected if k not in out]
    if missing:
        more = f", and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: key {their_key(missing[0], name, family, keys)!r} is missing{more}")
    return out


def _why_unexpected(key: str, ours: str | None, num_layers: int) -> str:
    m = re.search(r"encoder\.layer\.(\d+)\.", key)
    if m and int(m.group(1)) >= num_layers:
        return f": layer {m.group(1)}, but this model has {num_layers} layers (an adapter for another base)"
    if ours is not None:
        return f" ({ours}): not part of this adapter's configuration"
    return " (not in roberta_lite.formats.adapterhub's KEYS or TAGGING_KEYS for this adapter's name)"


def _load(path: Path) -> dict[str, torch.Tensor]:
    """safetensors, or a .bin through torch.load(weights_only=True): nothing else is ever unpickled."""
    try:
        if path.suffix == ".safetensors":
            tensors = load_file(str(path), device="cpu")
        else:
            tensors = torch.load(path, weights_only=True, map_location="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable weights file ({e})") from None
    except Exception as e:  # torch.load's failures on damaged or unsafe pickles come in many types
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable weights file ({type(e).__name__}: {reason})") from None
    if not isinstance(tensors, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(tensors).__name__}")
    for key, t in tensors.items():
        if not isinstance(key, str) or not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise CheckpointError(f"{path}: key {key!r} is not a floating-point tensor")
    return tensors


# ---------------------------------------------------------------------------------------------- the tables, applied

def _is_head(ours: str) -> bool:
    return ours.startswith("head.")


def key_table(task: str) -> dict[str, str]:
    """The table whose head entries hold a head of `task` (the adapter's entries are in KEYS)."""
    return TAGGING_KEYS if task == TOKEN_TASK else KEYS


def concrete_keys(name: str, num_layers: int, family: str, keys: dict[str, str] = KEYS) -> dict[str, str]:
    """Every key of `family` (prefix of a `keys` entry: "encoder.", "heads." or "classifier.") a file for adapter
    `name` on `num_layers` layers may hold, without the `roberta.` prefix -> interchange key."""
    out = {}
    for theirs, ours in keys.items():
        if not theirs.startswith(family):
            continue
        for i in range(num_layers) if "{}" in theirs else [None]:
            t, o = (theirs, ours) if i is None else (theirs.replace("{}", str(i)), ours.replace("{}", str(i)))
            out[t.replace("{name}", name)] = o
    return out


def their_key(ours: str, name: str, family: str | None = None, keys: dict[str, str] = KEYS) -> str:
    """The key for an interchange key: the first `keys` entry for it (of `family` if given), as RobertaAdapterModel's
    save_adapter writes it (adapter keys with the `roberta.` prefix)."""
    layer = next((p for p in ours.split(".") if p.isdigit()), None)
    template = ours.replace(f".{layer}.", ".{}.") if layer else ours
    theirs = next(t for t, o in keys.items() if o == template and t.startswith(family or ""))
    theirs = (theirs.replace("{}", layer) if layer else theirs).replace("{name}", name)
    return PREFIX + theirs if theirs.startswith("encoder.") else theirs


def expected_shapes(config: dict, num_labels: int | None, hidden_size: int, num_layers: int,
                    task: str = "classification") -> dict[str, tuple]:
    """Interchange key -> shape for a bottleneck adapter of `config` (+ the head of `task` when num_labels is given:
    a token head is out only, a sentence head dense and out)."""
    C, R = hidden_size, hidden_size // config["reduction_factor"]
    slots = ("attn_adapter", "ffn_adapter") if config["kind"] == "houlsby" else ("ffn_adapter",)
    part = {"down.weight": (R, C), "down.bias": (R,), "up.weight": (C, R), "up.bias": (C,)}
    out = {f"layers.{i}.{s}.{p}": shape for i in range(num_layers) for s in slots for p, shape in part.items()}
    if num_labels is not None and task != TOKEN_TASK:
        out.update({"head.dense.weight": (C, C), "head.dense.bias": (C,)})
    if num_labels is not None:
        out.update({"head.out.weight": (num_labels, C), "head.out.bias": (num_labels,)})
    return out


# ---------------------------------------------------------------------------------------------- writing

def write(directory: Path, f: AdapterFile, hidden_size: int, num_layers: int, base_name: str) -> Path:
    """Write `f` as a directory that adapters' `model.load_adapter(dir)` loads with no extra arguments, head included.

    load_adapter's default (use_safetensors=False) reads only pytorch_adapter.bin / pytorch_model_head.bin, through
    torch.load(weights_only=True); use_safetensors=True reads the .safetensors twins. Both are written, each atomically,
    config files last; the .bin holds a plain dict of tensors."""
    config = their_config(f.config)
    _check_tensors(f, hidden_size, num_layers)
    head = _their_head_config(f) if f.num_labels is not None else None  # refused here, before anything is written
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    adapter = {their_key(k, f.name): t for k, t in f.tensors.items() if not _is_head(k)}
    _write_weights(d, WEIGHTS, adapter)
    top = {"hidden_size": hidden_size, "model_class": "RobertaAdapterModel", "model_name": base_name,
           "model_type": "roberta", "name": f.name, "version": FORMAT_VERSION}
    if head is not None:
        keys = key_table(f.task)
        _write_weights(d, HEAD_WEIGHTS, {their_key(k, f.name, keys=keys): t for k, t in f.tensors.items()
                                         if _is_head(k)})
        _write_json(d / HEAD_CONFIG, {**top, "config": head})
    else:
        for stale in (HEAD_CONFIG, *HEAD_WEIGHTS):  # a head left from an earlier write would be loaded with this one
            (d / stale).unlink(missing_ok=True)
    _write_json(d / CONFIG, {**top, "config": config})
    return d


def their_config(config: dict) -> dict:
    """Our {"kind", "reduction_factor", "activation"} -> the full BnConfig dict adapters 1.3 saves (every key)."""
    kind, act = config.get("kind"), config.get("activation")
    placement = next((dict(zip(PLACEMENT_KEYS, p)) for p, k in PLACEMENTS.items() if k == kind), None)
    if placement is None:
        raise ValueError(f"adapter kind {kind!r}: the AdapterHub format here writes only 'houlsby' and 'pfeiffer'")
    if act not in TO_THEIR_ACTIVATION:
        raise ValueError(f"adapter activation {act!r}: expected one of {', '.join(TO_THEIR_ACTIVATION)}")
    rf = config.get("reduction_factor")
    if isinstance(rf, bool) or not isinstance(rf, int) or rf < 1:
        raise ValueError(f"adapter reduction_factor {rf!r}: expected a positive integer")
    return {**placement, **MUST_BE_DEFAULT, **FREE, "reduction_factor": rf, "non_linearity": TO_THEIR_ACTIVATION[act]}


def _check_tensors(f: AdapterFile, hidden_size: int, num_layers: int) -> None:
    expected = expected_shapes(f.config, f.num_labels, hidden_size, num_layers, f.task)
    for k in sorted(set(expected) | set(f.tensors)):
        if k not in f.tensors:
            raise ValueError(f"adapter {f.name!r}: tensor {k!r} is missing")
        if k not in expected:
            raise ValueError(f"adapter {f.name!r}: tensor {k!r} has no place in an AdapterHub {f.config['kind']} file")
        if tuple(f.tensors[k].shape) != expected[k]:
            raise ValueError(f"adapter {f.name!r}: tensor {k!r} has shape {tuple(f.tensors[k].shape)}, "
                             f"expected {expected[k]}")


def _their_head_config(f: AdapterFile) -> dict:
    """The flex head's config dict (heads/base.py): ClassificationHead's, where regression is a one-output
    classification head, or TaggingHead's for a token head."""
    head_type = {"classification": "classification", "regression": "classification",
                 "multilabel": "multilabel_classification", TOKEN_TASK: "tagging"}.get(f.task)
    if head_type is None or f.task != TOKEN_TASK and (f.task == "regression") != (f.num_labels == 1):
        raise ValueError(f"adapter {f.name!r}: task {f.task!r} with {f.num_labels} outputs has no AdapterHub head "
                         f"(regression is a head with exactly one output)")
    label2id = None
    if f.labels is not None:
        if len(f.labels) != f.num_labels or len(set(f.labels)) != len(f.labels):
            raise ValueError(f"adapter {f.name!r}: labels {f.labels!r} are not {f.num_labels} distinct names")
        label2id = {str(n): i for i, n in enumerate(f.labels)}
    if f.task == TOKEN_TASK:
        return {**TAGGING_WRITTEN, "head_type": head_type, "num_labels": f.num_labels, "label2id": label2id,
                "dropout_prob": None}
    return {**HEAD_MUST_BE, "head_type": head_type, "num_labels": f.num_labels, "label2id": label2id,
            "dropout_prob": None}


def _write_weights(d: Path, names: tuple[str, str], tensors: dict[str, torch.Tensor]) -> None:
    plain = {k: t.detach().to("cpu", torch.float32).contiguous().clone() for k, t in tensors.items()}
    safetensors_name, bin_name = names
    atomic_write(d / safetensors_name, save(plain, metadata={"format": "pt"}))
    buf = io.BytesIO()
    torch.save(plain, buf)
    atomic_write(d / bin_name, buf.getvalue())


def _write_json(path: Path, obj: dict) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
