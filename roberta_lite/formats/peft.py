"""peft's LoRA adapter directories (`adapter_config.json` + `adapter_model.safetensors`) <-> our interchange.

peft saves a LoRA adapter trained on transformers' RobertaForSequenceClassification as
`base_model.model.<module path>.lora_A.weight` (r, in) and `...lora_B.weight` (out, r), and the classifier it
trained in full (`modules_to_save`, added by task_type SEQ_CLS) under its plain module path. With task_type
TOKEN_CLS (RobertaForTokenClassification) that classifier is one Linear(C, K), `classifier.weight` / `.bias`: our
token head (`TOKEN_KEYS`). `KEYS` below lists every key we read; anything else is an error. peft computes
y = W x + b + s * B (A (dropout(x))) with s = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora): exactly our
LoRA, so the tensors are copied unchanged.

Which modules a file adapts is what `target_modules` selects under peft's own rule (a module is adapted when its
name equals an entry or ends with "." + entry; modules inside `modules_to_save` never are). On RoBERTa:

    "query" / "key" / "value"          -> query / key / value
    "attention.output.dense"           -> attn_out
    "intermediate.dense"               -> ffn_up
    "output.dense"                     -> attn_out AND ffn_down  (attention.output.dense ends with it too)
    "dense"                            -> attn_out, ffn_up, ffn_down (classifier.dense is in modules_to_save)
    "roberta.encoder.layer.3.output.dense" (a full name, as "all-linear" is saved) -> ffn_down of layer 3 only

so FFN-down alone has no suffix name: `write` lists it by full name per layer, as peft itself saves "all-linear".
Entries matching no RoBERTa module are ignored (peft ignores them too). We refuse what we would not compute
exactly: targets outside our six (embeddings, the classifier), targets that differ between layers, and every
config option that changes the computation (DoRA, biases, fan_in_fan_out, rank/alpha patterns, regex targets,
initialisations that rewrite the base weights such as PiSSA or LoftQ, ...; see `MUST_BE_OFF`).

Label names and the task, which peft does not store, ride in the safetensors header (`METADATA_KEY`); peft ignores it.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from roberta_lite.formats.file import AdapterFile
from roberta_lite.weights import CheckpointError, atomic_write, read_json


FORMAT = "peft"


CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LEGACY_WEIGHTS_FILE = "adapter_model.bin"  # peft's save_pretrained(safe_serialization=False)
METADATA_KEY = "roberta_lite"  # safetensors header entry: {"labels": [...], "task": ...}

# peft key template -> interchange template ({} = layer index).
KEYS: dict[str, str | None] = {
    "base_model.model.roberta.encoder.layer.{}.attention.self.query.lora_A.weight": "layers.{}.attn.qkv_lora.query.A",
    "base_model.model.roberta.encoder.layer.{}.attention.self.query.lora_B.weight": "layers.{}.attn.qkv_lora.query.B",
    "base_model.model.roberta.encoder.layer.{}.attention.self.key.lora_A.weight": "layers.{}.attn.qkv_lora.key.A",
    "base_model.model.roberta.encoder.layer.{}.attention.self.key.lora_B.weight": "layers.{}.attn.qkv_lora.key.B",
    "base_model.model.roberta.encoder.layer.{}.attention.self.value.lora_A.weight": "layers.{}.attn.qkv_lora.value.A",
    "base_model.model.roberta.encoder.layer.{}.attention.self.value.lora_B.weight": "layers.{}.attn.qkv_lora.value.B",
    "base_model.model.roberta.encoder.layer.{}.attention.output.dense.lora_A.weight": "layers.{}.attn.proj_lora.A",
    "base_model.model.roberta.encoder.layer.{}.attention.output.dense.lora_B.weight": "layers.{}.attn.proj_lora.B",
    "base_model.model.roberta.encoder.layer.{}.intermediate.dense.lora_A.weight": "layers.{}.ffn.up_lora.A",
    "base_model.model.roberta.encoder.layer.{}.intermediate.dense.lora_B.weight": "layers.{}.ffn.up_lora.B",
    "base_model.model.roberta.encoder.layer.{}.output.dense.lora_A.weight": "layers.{}.ffn.down_lora.A",
    "base_model.model.roberta.encoder.layer.{}.output.dense.lora_B.weight": "layers.{}.ffn.down_lora.B",
    "base_model.model.classifier.dense.weight": "head.dense.weight",
    "base_model.model.classifier.dense.bias": "head.dense.bias",
    "base_model.model.classifier.out_proj.weight": "head.out.weight",
    "base_model.model.classifier.out_proj.bias": "head.out.bias",
}
TO_PEFT = {ours: theirs for theirs, ours in KEYS.items()}
# TOKEN_CLS files: the same LoRA keys, and RobertaForTokenClassification's classifier (saved whole) as the head.
TOKEN_KEYS: dict[str, str] = {
    **{theirs: ours for theirs, ours in KEYS.items() if not ours.startswith("head.")},
    "base_model.model.classifier.weight": "head.out.weight",
    "base_model.model.classifier.bias": "head.out.bias",
}
TOKEN_TO_PEFT = {ours: theirs for theirs, ours in TOKEN_KEYS.items()}

# The modules of transformers' RobertaForSequenceClassification that peft's LoRA can wrap -> our target
# (None: one we have no LoRA for). Only Linear and Embedding layers can carry LoRA.
MODULES: dict[str, str | None] = {
    "roberta.encoder.layer.{}.attention.self.query": "query",
    "roberta.encoder.layer.{}.attention.self.key": "key",
    "roberta.encoder.layer.{}.attention.self.value": "value",
    "roberta.encoder.layer.{}.attention.output.dense": "attn_out",
    "roberta.encoder.layer.{}.intermediate.dense": "ffn_up",
    "roberta.encoder.layer.{}.output.dense": "ffn_down",
    "roberta.embeddings.word_embeddings": None,
    "roberta.embeddings.position_embeddings": None,
    "roberta.embeddings.token_type_embeddings": None,
    "classifier.dense": None,
    "classifier.out_proj": None,
    "classifier": None,  # RobertaForTokenClassification's classifier is a Linear itself
}
# Our target -> the target_modules entry `write` gives it ({}: one full name per layer; no suffix names FFN-down alone).
TARGET_NAMES = {"query": "query", "key": "key", "value": "value", "attn_out": "attention.output.dense",
                "ffn_up": "intermediate.dense", "ffn_down": "roberta.encoder.layer.{}.output.dense"}
# Which interchange tensors each target has.
TARGET_KEYS = {"query": "layers.{}.attn.qkv_lora.query", "key": "layers.{}.attn.qkv_lora.key",
               "value": "layers.{}.attn.qkv_lora.value", "attn_out": "layers.{}.attn.proj_lora",
               "ffn_up": "layers.{}.ffn.up_lora", "ffn_down": "layers.{}.ffn.down_lora"}
HEAD_KEYS = ("head.dense.weight", "head.dense.bias", "head.out.weight", "head.out.bias")
TOKEN_HEAD_KEYS = ("head.out.weight", "head.out.bias")
PEFT_DEFAULT_TARGETS = ["query", "value"]  # peft's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["roberta"]
ALL_LINEAR = "all-linear"  # peft's shorthand: every Linear except the classifier (for SEQ_CLS)

# adapter_config.json options that change what the adapter computes: each must be off (absent, null, false, {},
# [] or "none"). An option not named anywhere in this file is held to the same rule: left off, it changes nothing.
MUST_BE_OFF = ("use_dora", "lora_bias", "bias", "fan_in_fan_out", "layers_to_transform", "layers_pattern",
               "rank_pattern", "alpha_pattern", "exclude_modules", "target_parameters", "trainable_token_indices",
               "layer_replication", "megatron_config", "use_qalora", "alora_invocation_tokens", "velora_config",
               "arrow_config", "use_bdlora", "kasa_config", "monteclora_config")
# Options that do not change what a saved adapter computes: bookkeeping, or initialisation of A and B only.
IGNORED = ("base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version",
           "ensure_weight_tying", "megatron_core", "qalora_group_size", "loftq_config", "eva_config", "corda_config",
           "lora_ga_config", "runtime_config")
READ = ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules",
        "modules_to_save", "init_lora_weights")
# init_lora_weights values that leave the base weights alone (PiSSA, CorDA, OLoRA, LoRA-GA and LoftQ rewrite them,
# so their adapters only compute what they were trained to on a base we do not have).
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")
TASK_TYPES = (None, "SEQ_CLS", "TOKEN_CLS")
HEAD_MODULES = ("classifier", "score")  # peft's SEQ_CLS default modules_to_save; RoBERTa's head is `classifier`
TASKS = ("classification", "regression", "multilabel")  # with a SEQ_CLS (or task-less) head
TOKEN_TASK = "token-classification"  # with a TOKEN_CLS head

_LAYER = re.compile(r"\.(\d+)\.")


# --------------------------------------------------------------------------------------------- detect / read

def detect(directory: Path) -> bool:
    """A peft adapter directory: adapter_config.json naming a peft_type (AdapterHub's has none)."""
    try:
        cfg = json.loads((Path(directory) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and "peft_type" in cfg


@dataclass
class _Files:
    """The two files of one adapter directory, for messages."""
    config: Path
    weights: Path


def read(directory: Path, hidden_size: int, num_layers: int) -> AdapterFile:
    """Read a peft LoRA directory for a base of `hidden_size` and `num_layers`. Everything is checked before
    anything is returned; a problem raises CheckpointError naming the file and the key at fault."""
    directory = Path(directory)
    cfg_path = directory / CONFIG_FILE
    cfg = _read_json(cfg_path)
    weights_path, theirs, meta = _read_tensors(directory)
    return _validate(_Files(cfg_path, weights_path), cfg, theirs, meta, hidden_size, num_layers,
                     name=directory.resolve().name)


def _validate(at: _Files, cfg: dict, theirs: dict[str, torch.Tensor], meta: dict, hidden: int, num_layers: int,
              name: str) -> AdapterFile:
    """Everything `read` checks, on a config and tensors in memory (`write` runs it on what it is about to write)."""
    ours = _lora_config(at.config, cfg)
    token = cfg.get("task_type") == "TOKEN_CLS"
    tensors = _rename(at.weights, theirs, num_layers, token)
    ours["targets"] = _resolve_targets(at.config, cfg, num_layers)
    _check_lora_tensors(at.weights, tensors, ours["targets"], num_layers)
    ffn = _check_lora_shapes(at.weights, tensors, hidden, ours["r"])
    num_labels = _check_head(at.weights, tensors, hidden, token)
    labels, task = _labels(at.weights, meta, num_labels, token)
    base = {"hidden_size": hidden, "num_layers": num_layers, "model": cfg.get("base_model_name_or_path")}
    if ffn is not None:
        base["intermediate_size"] = ffn
    return AdapterFile(name=name, config=ours, num_labels=num_labels, labels=labels, task=task, base=base,
                       tensors={k: t.float().contiguous() for k, t in tensors.items()})


def _read_json(path: Path) -> dict:
    return read_json(path, f"a peft adapter directory has {CONFIG_FILE}")


def _refuse(path: Path, cfg: dict, key: str, why: str):
    raise CheckpointError(f"{path}: key {key!r} = {json.dumps(cfg.get(key))}: {why}")


def _is_off(value) -> bool:
    """An option left at its 'does nothing' value. (Not `value in (...)`: 0 == False, and layers_to_transform=0
    means layer 0.)"""
    return value is None or value is False or value == {} or value == [] or value == "none"


def _is_number(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


def _lora_config(path: Path, cfg: dict) -> dict:
    """Our AdapterConfig dict (targets come later), refusing every option we would not compute exactly.
    Defaults are peft's, for configs written by older versions that lack a field."""
    if cfg.get("peft_type") != "LORA":
        _refuse(path, cfg, "peft_type", "only LORA adapters are supported")
    for key, value in cfg.items():
        if key not in READ and key not in IGNORED and not _is_off(value):
            _refuse(path, cfg, key, "a LoRA variant roberta_lite does not compute" if key in MUST_BE_OFF
                    else "an option roberta_lite does not know")
    if cfg.get("task_type") not in TASK_TYPES:
        _refuse(path, cfg, "task_type", "roberta_lite computes sequence (SEQ_CLS) and token (TOKEN_CLS) "
                                        "classification only")
    if cfg.get("init_lora_weights", True) not in PLAIN_INITS:
        _refuse(path, cfg, "init_lora_weights", "this initialisation rewrites the base weights; convert the adapter "
                "to plain LoRA first (peft's save_pretrained(path_initial_model_for_weight_conversion=...))")
    r, alpha, dropout = cfg.get("r", 8), cfg.get("lora_alpha", 8), cfg.get("lora_dropout", 0.0)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        _refuse(path, cfg, "r", "expected a positive integer")
    if not _is_number(alpha):
        _refuse(path, cfg, "lora_alpha", "expected a number")
    if not _is_number(dropout) or not 0 <= dropout < 1:
        _refuse(path, cfg, "lora_dropout", "expected a number in [0, 1)")
    if not isinstance(cfg.get("use_rslora", False), bool):
        _refuse(path, cfg, "use_rslora", "expected true or false")
    return {"kind": "lora", "r": r, "alpha": float(alpha), "targets": [], "dropout": float(dropout),
            "use_rslora": cfg.get("use_rslora", False)}


def _read_tensors(directory: Path) -> tuple[Path, dict[str, torch.Tensor], dict]:
    """(file, its tensors, its safetensors header metadata). safetensors first, as peft does; a legacy .bin only
    through torch.load(weights_only=True), which unpickles tensors and plain containers and nothing else."""
    path = directory / WEIGHTS_FILE
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                return path, {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None
    path = directory / LEGACY_WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {WEIGHTS_FILE} or {LEGACY_WEIGHTS_FILE}")
    try:
        loaded = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a plain tensor file ({_first_line(e)})") from None
    if not isinstance(loaded, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in loaded.items()):
        raise CheckpointError(f"{path}: expected a dict of named tensors, got {type(loaded).__name__}")
    return path, loaded, {}


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _rename(path: Path, theirs: dict[str, torch.Tensor], num_layers: int, token: bool) -> dict[str, torch.Tensor]:
    """Their keys -> interchange keys through KEYS (TOKEN_KEYS for a TOKEN_CLS file). A key the table lacks, a
    non-float tensor, or layers other than the model's (a file for another base) is an error naming the key."""
    keys = TOKEN_KEYS if token else KEYS
    out: dict[str, torch.Tensor] = {}
    layers: set[int] = set()
    for key, t in theirs.items():
        m = _LAYER.search(key)
        template = key if m is None else f"{key[: m.start()]}.{{}}.{key[m.end():]}"
        if template not in keys:
            raise CheckpointError(f"{path}: unexpected key {key!r} (not a RoBERTa LoRA or {'token ' * token}"
                                  f"classifier tensor: no entry in formats.peft.{'TOKEN_' * token}KEYS)")
        if not t.is_floating_point():
            raise CheckpointError(f"{path}: key {key!r} has dtype {t.dtype}, expected floating point")
        if m is not None:
            layers.add(int(m.group(1)))
            if int(m.group(1)) >= num_layers:
                raise CheckpointError(f"{path}: key {key!r} is for layer {m.group(1)}, but the model has "
                                      f"{num_layers} layers (adapter trained on another base?)")
        out[keys[template].format(m.group(1) if m else "")] = t
    if layers and layers != set(range(num_layers)):
        raise CheckpointError(f"{path}: LoRA tensors for layers {sorted(layers)} only, but the model has "
                              f"{num_layers} layers (adapter trained on another base?)")
    return out


def _their_key(ours: str, token: bool = False) -> str:
    """peft's key for an interchange key (for messages, and for `write`); `token`: in a TOKEN_CLS file."""
    table = TOKEN_TO_PEFT if token else TO_PEFT
    m = re.match(r"layers\.(\d+)\.(.*)", ours)
    return table[ours] if m is None else table["layers.{}." + m.group(2)].format(m.group(1))


# --------------------------------------------------------------------------------------------- targets

def _modules_to_save(path: Path, cfg: dict) -> list[str]:
    """What peft keeps out of LoRA's reach: the file's modules_to_save, plus the classifier for SEQ_CLS (which
    PeftModelForSequenceClassification always adds). Only the classifier is allowed."""
    saved = cfg.get("modules_to_save") or []
    if not isinstance(saved, list) or any(s not in HEAD_MODULES for s in saved):
        _refuse(path, cfg, "modules_to_save", "roberta_lite trains only the classifier head in full "
                                              f"(allowed: {', '.join(HEAD_MODULES)})")
    return saved + list(HEAD_MODULES) if cfg.get("task_type") == "SEQ_CLS" else saved


def _selected_modules(path: Path, cfg: dict, modules: list[str]) -> list[str]:
    """The module names peft's check_target_module_exists picks: equal to an entry, or ending in "." + entry
    ("all-linear": every Linear), never one inside modules_to_save."""
    targets = cfg.get("target_modules")
    targets = PEFT_DEFAULT_TARGETS if targets is None else targets
    if isinstance(targets, str):
        if targets.lower() != ALL_LINEAR:
            _refuse(path, cfg, "target_modules", "a regular expression; roberta_lite reads lists of module names")
        picked = [m for m in modules if "embeddings" not in m]
    elif isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        picked = [m for m in modules if m in targets or any(m.endswith("." + t) for t in targets)]
    else:
        _refuse(path, cfg, "target_modules", "expected a list of module names")
    saved = _modules_to_save(path, cfg)
    return [m for m in picked if not any(re.match(rf"(^|.*\.){re.escape(s)}($|\..*)", m) for s in saved)]


def _resolve_targets(path: Path, cfg: dict, num_layers: int) -> list[str]:
    """Our LoRA targets, from target_modules matched against RoBERTa's module names as peft matches them.
    Refused: a module we have no LoRA for, and a target that is not in every layer."""
    names = {template.format(i): template for template in MODULES for i in range(num_layers)}
    layers: dict[str, set[int]] = {}
    for module in _selected_modules(path, cfg, list(names)):
        target = MODULES[names[module]]
        if target is None:
            _refuse(path, cfg, "target_modules", f"selects {module!r}, which roberta_lite has no LoRA for "
                                                 f"(targets: {', '.join(TARGET_KEYS)})")
        layers.setdefault(target, set()).add(int(_LAYER.search(module).group(1)))
    if not layers:
        _refuse(path, cfg, "target_modules", "selects no module of RoBERTa")
    for target, found in layers.items():
        if found != set(range(num_layers)):
            _refuse(path, cfg, "target_modules", f"selects {target} in layers {sorted(found)} only; roberta_lite "
                                                 f"adapts the same modules in all {num_layers} layers")
    return [t for t in TARGET_KEYS if t in layers]


def _check_lora_tensors(path: Path, tensors: dict[str, torch.Tensor], targets: list[str], num_layers: int):
    """The file holds A and B for exactly the targeted modules of every layer."""
    expected = {f"{TARGET_KEYS[t].format(i)}.{ab}" for t in targets for i in range(num_layers) for ab in "AB"}
    for key in sorted(expected - set(tensors)):
        raise CheckpointError(f"{path}: tensor {_their_key(key)!r} is missing (target_modules selects it)")
    for key in sorted(k for k in tensors if k.startswith("layers.") and k not in expected):
        raise CheckpointError(f"{path}: key {_their_key(key)!r}: a module target_modules does not select")


def _check_lora_shapes(path: Path, tensors: dict[str, torch.Tensor], hidden: int, r: int) -> int | None:
    """A is (r, in), B is (out, r): in and out are the hidden size, except intermediate.dense's output and
    output.dense's input, the FFN size F. F is not given: it is taken from the file, the same everywhere.
    Returns F (None when no FFN module is adapted)."""
    ffn_keys = sorted(k for k in tensors if k.endswith((".ffn.up_lora.B", ".ffn.down_lora.A")))
    ffn_from = ffn_keys[0] if ffn_keys else None
    ffn = None
    if ffn_from is not None:
        shape = tensors[ffn_from].shape
        ffn = shape[0 if ffn_from.endswith(".B") else -1] if len(shape) == 2 else -1
    for key, t in tensors.items():
        if not key.startswith("layers."):
            continue
        lora_in = ffn if ".ffn.down_lora." in key else hidden
        lora_out = ffn if ".ffn.up_lora." in key else hidden
        expected = (r, lora_in) if key.endswith(".A") else (lora_out, r)
        if tuple(t.shape) != expected:
            where = f", FFN size from {_their_key(ffn_from)!r}" if ffn_from and ".ffn." in key else ""
            raise CheckpointError(f"{path}: key {_their_key(key)!r} has shape {tuple(t.shape)}, expected {expected} "
                                  f"(hidden size {hidden}, r {r} from {CONFIG_FILE}{where}; adapter trained on "
                                  f"another base?)")
    return ffn


# --------------------------------------------------------------------------------------------- head and labels

def _check_head(path: Path, tensors: dict[str, torch.Tensor], hidden: int, token: bool) -> int | None:
    """The classifier (dense (C, C), out_proj (K, C), with biases; a TOKEN_CLS file's is (K, C) and (K,) only), all
    or nothing; returns K or None."""
    head_keys = TOKEN_HEAD_KEYS if token else HEAD_KEYS
    present = [k for k in head_keys if k in tensors]
    if not present:
        return None
    for key in head_keys:
        if key not in tensors:
            raise CheckpointError(f"{path}: tensor {_their_key(key, token)!r} is missing (the file has "
                                  f"{_their_key(present[0], token)!r}: the classifier is saved whole)")
    out = tensors["head.out.weight"].shape
    k = out[0] if len(out) == 2 and out[0] >= 1 else -1
    expected = {"head.dense.weight": (hidden, hidden), "head.dense.bias": (hidden,),
                "head.out.weight": (k, hidden), "head.out.bias": (k,)}
    for key in head_keys:
        shape = expected[key]
        if tuple(tensors[key].shape) != shape:
            raise CheckpointError(f"{path}: key {_their_key(key, token)!r} has shape {tuple(tensors[key].shape)}, "
                                  f"expected {shape} (hidden size {hidden}; adapter trained on another base?)")
    return k


def _labels(path: Path, meta: dict, num_labels: int | None, token: bool) -> tuple[list[str] | None, str]:
    """Label names and task from our entry in the safetensors header, when there is one; else LABEL_i. A TOKEN_CLS
    file's task is token-classification, and no other file's is."""
    default = [f"LABEL_{i}" for i in range(num_labels)] if num_labels else None
    tasks = (TOKEN_TASK,) if token else TASKS
    if METADATA_KEY not in meta:
        return default, tasks[0]
    try:
        ours = json.loads(meta[METADATA_KEY])
        labels, task = ours.get("labels") or default, ours.get("task", tasks[0])
    except (ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: header entry {METADATA_KEY!r} is not a JSON object ({e})") from None
    if task not in tasks:
        raise CheckpointError(f"{path}: header entry {METADATA_KEY!r}: task {task!r} is not one of {', '.join(tasks)} "
                              f"(task_type {'TOKEN_CLS' if token else 'SEQ_CLS'})")
    if labels is not None and (num_labels is None or not isinstance(labels, list) or len(labels) != num_labels
                               or not all(isinstance(x, str) for x in labels)):
        raise CheckpointError(f"{path}: header entry {METADATA_KEY!r}: labels {labels!r} are not "
                              f"{num_labels or 0} names for the classifier's {num_labels or 0} outputs")
    return labels, task


# --------------------------------------------------------------------------------------------- write

def write(directory: Path, f: AdapterFile, hidden_size: int, num_layers: int, base_name: str) -> Path:
    """A directory peft.PeftModel.from_pretrained(RobertaForSequenceClassification, directory) (for a token head:
    RobertaForTokenClassification) loads as it is, computing what our model computes. Everything is checked as
    `read` checks it before a byte is written; each file is written atomically (weights first, so a config never
    names weights not yet there)."""
    directory = Path(directory)
    cfg = _config_for(f, num_layers, base_name)
    token = cfg["task_type"] == "TOKEN_CLS"
    theirs = {}
    for key, t in f.tensors.items():
        try:
            theirs[_their_key(key, token)] = t.detach().to("cpu", torch.float32).contiguous()
        except KeyError:
            raise CheckpointError(f"{directory}: tensor {key!r} has no peft name "
                                  f"(no entry in formats.peft.{'TOKEN_' * token}KEYS)") from None
    meta = {"format": "pt"}
    if f.num_labels is not None:
        meta[METADATA_KEY] = json.dumps({"labels": f.labels, "task": f.task})
    at = _Files(directory / CONFIG_FILE, directory / WEIGHTS_FILE)
    checked = _validate(at, cfg, theirs, meta, hidden_size, num_layers, name=f.name)
    if checked.num_labels != f.num_labels:
        raise CheckpointError(f"{directory}: num_labels is {f.num_labels}, but the head tensors give "
                              f"{checked.num_labels}")
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(at.weights, save(theirs, metadata=meta))
    atomic_write(at.config, (json.dumps(cfg, indent=2) + "\n").encode())
    return directory


def _config_for(f: AdapterFile, num_layers: int, base_name: str) -> dict:
    """adapter_config.json for our LoRA config: a SEQ_CLS LoRA (TOKEN_CLS for a token head) whose target_modules
    selects exactly our targets."""
    c = f.config
    if c.get("kind") != "lora":
        raise CheckpointError(f"adapter {f.name!r}: kind {c.get('kind')!r}; the peft format holds LoRA adapters only")
    unknown = [t for t in c.get("targets", []) if t not in TARGET_NAMES]
    if unknown:
        raise CheckpointError(f"adapter {f.name!r}: LoRA target {unknown[0]!r} is not one of {', '.join(TARGET_NAMES)}")
    names = [TARGET_NAMES[t].format(i) for t in c["targets"]
             for i in (range(num_layers) if "{}" in TARGET_NAMES[t] else [0])]
    alpha = c["alpha"]
    return {
        "peft_type": "LORA",
        "task_type": "TOKEN_CLS" if f.task == TOKEN_TASK else "SEQ_CLS",
        "base_model_name_or_path": base_name,
        "r": c["r"],
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": c.get("dropout", 0.0),
        "use_rslora": c.get("use_rslora", False),
        "target_modules": names,
        "modules_to_save": ["classifier"] if f.num_labels is not None else None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
