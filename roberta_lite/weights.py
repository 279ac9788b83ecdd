"""Checkpoints: find them, read them, and rename Hugging Face tensors to ours through one table.

Everything a checkpoint may hold is listed in `HF_TO_OURS` below. A key is either mapped to one of our
parameter names, or to `None` (dropped on purpose, with the reason beside it); a key the table does not know is an
error, never silently skipped. Only safetensors files are read (memory-mapped); pickled `.bin` files never are.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open

from roberta_lite import adapters as A
from roberta_lite import model as M
from roberta_lite import precision as P

if TYPE_CHECKING:  # api.py imports this module
    from roberta_lite.api import Model


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is: the message names the file and the key at fault."""


# Hugging Face names -> ours, in short (a leading "roberta." stripped; .weight and .bias alike):
#     embeddings.{word,position,token_type}_embeddings, embeddings.LayerNorm -> embed.{tok,pos,token_type}, embed.norm
#     encoder.layer.{i}.attention.self.{query,key,value} -> rows [0,C), [C,2C), [2C,3C) of layers.{i}.attn.qkv
#     encoder.layer.{i}.attention.output.{dense,LayerNorm} -> layers.{i}.{attn.proj,attn_norm}
#     encoder.layer.{i}.{intermediate.dense,output.dense,output.LayerNorm} -> layers.{i}.{ffn.up,ffn.down,ffn_norm}
#     classifier.{dense,out_proj} -> head.{dense,out} (a sentence head); classifier -> head.out (a TokenHead)
#     lm_head.{dense,layer_norm,bias} -> mlm.{dense,norm,bias}
#     dropped: pooler.*, position_ids, token_type_ids, lm_head.decoder.* (= embed.tok.weight and mlm.bias)
# Unknown or missing tensors are errors; classifier.* and lm_head.* are optional.
#
# Hugging Face key template -> our key. `{}` stands for the layer index.
# A `(key, i)` pair is one third of a fused tensor: we keep query, key and value as one (3C, C) projection so
# attention needs one matmul instead of three; i says which third (0 = query, 1 = key, 2 = value).
# Keys are given without the `roberta.` prefix that RobertaForMaskedLM / ...ForSequenceClassification add.
HF_TO_OURS: dict[str, str | tuple[str, int] | None] = {
    "embeddings.word_embeddings.weight": "embed.tok.weight",
    "embeddings.position_embeddings.weight": "embed.pos.weight",
    "embeddings.token_type_embeddings.weight": "embed.token_type.weight",
    "embeddings.LayerNorm.weight": "embed.norm.weight",
    "embeddings.LayerNorm.bias": "embed.norm.bias",
    "embeddings.position_ids": None,  # a saved arange() in older checkpoints; we compute positions from the ids
    "embeddings.token_type_ids": None,  # a saved zeros() buffer; RoBERTa has a single segment
    "encoder.layer.{}.attention.self.query.weight": ("layers.{}.attn.qkv.weight", 0),
    "encoder.layer.{}.attention.self.query.bias": ("layers.{}.attn.qkv.bias", 0),
    "encoder.layer.{}.attention.self.key.weight": ("layers.{}.attn.qkv.weight", 1),
    "encoder.layer.{}.attention.self.key.bias": ("layers.{}.attn.qkv.bias", 1),
    "encoder.layer.{}.attention.self.value.weight": ("layers.{}.attn.qkv.weight", 2),
    "encoder.layer.{}.attention.self.value.bias": ("layers.{}.attn.qkv.bias", 2),
    "encoder.layer.{}.attention.output.dense.weight": "layers.{}.attn.proj.weight",
    "encoder.layer.{}.attention.output.dense.bias": "layers.{}.attn.proj.bias",
    "encoder.layer.{}.attention.output.LayerNorm.weight": "layers.{}.attn_norm.weight",
    "encoder.layer.{}.attention.output.LayerNorm.bias": "layers.{}.attn_norm.bias",
    "encoder.layer.{}.intermediate.dense.weight": "layers.{}.ffn.up.weight",
    "encoder.layer.{}.intermediate.dense.bias": "layers.{}.ffn.up.bias",
    "encoder.layer.{}.output.dense.weight": "layers.{}.ffn.down.weight",
    "encoder.layer.{}.output.dense.bias": "layers.{}.ffn.down.bias",
    "encoder.layer.{}.output.LayerNorm.weight": "layers.{}.ffn_norm.weight",
    "encoder.layer.{}.output.LayerNorm.bias": "layers.{}.ffn_norm.bias",
    "pooler.dense.weight": None,  # BERT's next-sentence pooler; RoBERTa's classifier reads <s> itself
    "pooler.dense.bias": None,
    "lm_head.dense.weight": "mlm.dense.weight",
    "lm_head.dense.bias": "mlm.dense.bias",
    "lm_head.layer_norm.weight": "mlm.norm.weight",
    "lm_head.layer_norm.bias": "mlm.norm.bias",
    "lm_head.bias": "mlm.bias",
    "lm_head.decoder.weight": None,  # tied: the decoder is the word-embedding matrix
    "lm_head.decoder.bias": None,  # the same tensor as lm_head.bias, saved twice by older versions
    "classifier.dense.weight": "head.dense.weight",
    "classifier.dense.bias": "head.dense.bias",
    "classifier.out_proj.weight": "head.out.weight",
    "classifier.out_proj.bias": "head.out.bias",
    "classifier.weight": "head.out.weight",  # RobertaForTokenClassification: one Linear on every token
    "classifier.bias": "head.out.bias",
}

# transformers' config.json key -> our Config field. Everything architectural comes from the checkpoint.
HF_CONFIG_KEYS = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads", "intermediate_size": "ffn_size",
    "max_position_embeddings": "max_positions", "type_vocab_size": "type_vocab_size",
    "layer_norm_eps": "layer_norm_eps", "pad_token_id": "pad_id", "hidden_dropout_prob": "dropout",
    "attention_probs_dropout_prob": "attention_dropout", "classifier_dropout": "classifier_dropout",
    "initializer_range": "initializer_range",
}
HF_CONFIG_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                      "max_position_embeddings", "pad_token_id")

_LAYER = re.compile(r"\.(\d+)\.")


def to_template(hf_key: str) -> tuple[str, str | None]:
    """'roberta.encoder.layer.3.output.dense.bias' -> ('encoder.layer.{}.output.dense.bias', '3')."""
    key = hf_key.removeprefix("roberta.")
    m = _LAYER.search(key)
    if m is None:
        return key, None
    return key[: m.start()] + ".{}." + key[m.end() :], m.group(1)


def map_key(hf_key: str) -> str | tuple[str, int] | None:
    """Our name for one Hugging Face key (None: dropped on purpose). Unknown keys raise CheckpointError."""
    template, layer = to_template(hf_key)
    if template not in HF_TO_OURS:
        raise CheckpointError(f"unexpected key {hf_key!r}: not a RoBERTa tensor (no entry in weights.HF_TO_OURS)")
    ours = HF_TO_OURS[template]
    if ours is None or layer is None:
        return ours
    if isinstance(ours, tuple):
        return ours[0].format(layer), ours[1]
    return ours.format(layer)


def convert(hf_tensors: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size] | None = None,
            source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Rename (and fuse) a Hugging Face state dict into ours.

    `expected` (our key -> shape) makes it strict: a key we have no parameter for (say a 13th layer when the
    config has 12) or a tensor of the wrong shape raises CheckpointError naming both. Works on meta tensors.
    """
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, tuple[str, torch.Tensor]]] = {}
    for hf_key, t in hf_tensors.items():
        try:
            ours = map_key(hf_key)
        except CheckpointError as e:
            raise CheckpointError(f"{source}: {e}") from None
        if ours is None:
            continue
        if isinstance(ours, tuple):
            name, i = ours
            parts.setdefault(name, {})[i] = (hf_key, t)
            continue
        _check(hf_key, ours, t.shape, expected, source)
        out[ours] = t
    for name, pieces in parts.items():
        if len(pieces) != 3:
            have = ", ".join(k for k, _ in pieces.values())
            qkv = ("query", "key", "value")
            i0 = next(iter(pieces))
            absent = [pieces[i0][0].replace(f".self.{qkv[i0]}.", f".self.{qkv[i]}.") for i in range(3) if i not in pieces]
            raise CheckpointError(f"{source}: tensor {', '.join(map(repr, absent))} is missing (found only {have}; "
                                  f"query, key and value are fused into {name})")
        hf_keys = [pieces[i][0] for i in range(3)]
        shapes = [pieces[i][1].shape for i in range(3)]
        if len({s for s in shapes}) != 1:
            raise CheckpointError(f"{source}: {', '.join(hf_keys)} have different shapes {[tuple(s) for s in shapes]}")
        fused = torch.cat([pieces[i][1] for i in range(3)], dim=0)
        _check(" + ".join(hf_keys), name, fused.shape, expected, source)
        out[name] = fused
    return out


def _check(hf_key: str, ours: str, shape: torch.Size, expected: Mapping[str, torch.Size] | None, source: str):
    if expected is None:
        return
    if ours not in expected:
        raise CheckpointError(f"{source}: key {hf_key!r} maps to {ours!r}, which this model does not have "
                              f"(more layers than config.json's num_hidden_layers?)")
    if tuple(expected[ours]) != tuple(shape):
        raise CheckpointError(f"{source}: key {hf_key!r} has shape {tuple(shape)}, "
                              f"but config.json gives {ours!r} the shape {tuple(expected[ours])}")


def config_fields(d: dict, source: str, config_cls: type) -> dict:
    """Our Config's fields from a transformers config.json dict, every value type-checked."""
    model_type = d.get("model_type")
    if model_type != "roberta":
        raise ValueError(f"{source}: model_type {model_type!r} is not supported (only 'roberta')")
    act = d.get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"{source}: hidden_act {act!r} is not supported (RoBERTa uses exact 'gelu')")
    positions = d.get("position_embedding_type", "absolute")
    if positions != "absolute":
        raise ValueError(f"{source}: position_embedding_type {positions!r} is not supported (only 'absolute')")
    if d.get("is_decoder"):  # a causal-LM RoBERTa masks future tokens; this model attends both ways
        raise ValueError(f"{source}: is_decoder true is not supported (this model is the bidirectional encoder)")
    for key in HF_CONFIG_REQUIRED:
        if key not in d:
            raise ValueError(f"{source}: required key {key!r} is missing")
    kw = {}
    types = {f.name: f.type for f in fields(config_cls)}  # "int", "float", "float | None" (annotations are strings)
    for hf_key, name in HF_CONFIG_KEYS.items():
        if hf_key not in d:
            continue
        v, want = d[hf_key], types[name]
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if not ((number and (isinstance(v, int) or "float" in want)) or (v is None and "None" in want)):
            raise ValueError(f"{source}: {hf_key}={v!r} is not a valid {want}")
        kw[name] = v
    if kw["hidden_size"] % kw["num_heads"]:
        raise ValueError(f"{source}: hidden_size {kw['hidden_size']} is not divisible by "
                         f"num_attention_heads {kw['num_heads']}")
    return kw


class Config(M.Config):
    """The architecture (model.Config), readable from a transformers config.json: `from_hf` reads it by
    HF_CONFIG_KEYS; other keys are ignored, but hidden_act must be gelu, position_embedding_type absolute and
    is_decoder false (else errors)."""

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "Config":
        return cls(**config_fields(d, source, cls))


def hf_names(ours: list[str]) -> list[str]:
    """Our key -> the Hugging Face key it comes from, for error messages (first matching template)."""
    out = []
    for key in ours:
        layer = next((p for p in key.split(".") if p.isdigit()), None)
        template = key.replace(f".{layer}.", ".{}.") if layer else key
        hf = next((h for h, o in HF_TO_OURS.items() if o == template or (isinstance(o, tuple) and o[0] == template)), key)
        out.append(hf.format(layer) if layer else hf)
    return out


# --------------------------------------------------------------------------------------------- reading files

HUB_FILES = ["config.json", "model.safetensors", "model.safetensors.index.json", "*.safetensors",
             "tokenizer.json", "vocab.json", "merges.txt"]


def _looks_like_path(s: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else that does not exist is a missing directory."""
    return s.startswith((".", "/", "~")) or s.count("/") > 1 or s.endswith("/") or "\\" in s


def resolve_checkpoint(name_or_path: str | Path, *, what: str = "model", local_dir: str | Path | None = None,
                       patterns: list[str] = HUB_FILES) -> Path:
    """A local directory as it is, or a hub id (`roberta-base`, `FacebookAI/roberta-base`) fetched into the
    Hugging Face cache (or `local_dir`). HF_HUB_OFFLINE=1 is honoured: then only what is cached is used."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{p}: is a file; expected a {what} directory (config.json + model.safetensors)")
    s = str(name_or_path)
    if isinstance(name_or_path, Path) or _looks_like_path(s):
        raise FileNotFoundError(f"{what} directory not found: {s}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id=s, allow_patterns=patterns, local_dir=local_dir))
    except RepositoryNotFoundError:  # its message's first line is only "404 Client Error."
        raise FileNotFoundError(f"{what} {s!r}: not a local directory, and not found on the Hugging Face Hub "
                                f"(a private or gated repository needs a token: set HF_TOKEN)") from None
    except Exception as e:  # offline, unknown repo, bad token: the library's own exception types vary by version
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"{what} {s!r}: not a local directory, and fetching it from the Hugging Face Hub "
                                f"failed ({reason}); offline, give a local checkpoint directory instead") from None


def read_json(path: Path, needed_by: str) -> dict:
    """A JSON object from `path`; a missing file, invalid JSON or another JSON value is an error naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing ({needed_by})")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_config(root: Path) -> dict:
    return read_json(root / "config.json", "every checkpoint directory needs its config.json")


class SafetensorsCheckpoint:
    """The tensors of one checkpoint, single-file or sharded, read lazily from memory-mapped files."""

    def __init__(self, root: Path):
        single, index = root / "model.safetensors", root / "model.safetensors.index.json"
        if single.is_file():
            files = [single]
            self.where = None
        elif index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
            files = [root / f for f in sorted(set(weight_map.values()))]
            for f in files:
                if not f.is_file():
                    raise FileNotFoundError(f"{f}: shard listed in {index.name} is missing")
        else:
            bins = sorted(p.name for p in root.glob("*.bin"))
            hint = f" (found {', '.join(bins)}: pickle files are never loaded; convert them to safetensors)" if bins else ""
            raise FileNotFoundError(f"{root}: no model.safetensors or model.safetensors.index.json{hint}")
        self.files: dict[str, object] = {}
        self.key_file: dict[str, str] = {}
        for f in files:
            try:
                handle = safe_open(str(f), framework="pt")
                keys = list(handle.keys())
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
            self.files[str(f)] = handle
            for k in keys:
                self.key_file[k] = str(f)

    def keys(self) -> list[str]:
        return list(self.key_file)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.files[self.key_file[key]].get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        try:
            return self.files[self.key_file[key]].get_tensor(key)
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{self.key_file[key]}: cannot read tensor {key!r} ({e})") from None

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for k in self.key_file:
            yield k, self.get(k)


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: a crash leaves the old file or the new, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------- building a model

def load_pretrained(cls: type["Model"], name_or_path: str | os.PathLike, num_labels: int | None = None,
                    adapter=None, dtype: torch.dtype | None = None, device: str | torch.device | None = None, *,
                    local_dir: str | os.PathLike | None = None, verbose: bool = False) -> "Model":
    """Load a RoBERTa checkpoint saved by transformers (RobertaModel, ...ForMaskedLM, ...ForSequenceClassification,
    ...ForTokenClassification: then `head` is a TokenHead).

    name_or_path: a directory with config.json + model.safetensors (or a sharded index), or a hub id.
    num_labels:   defaults to the checkpoint's own classifier, else 2; a different number gets a fresh head.
    adapter:      'houlsby', 'pfeiffer', 'lora' or an AdapterConfig: a fresh adapter named "default".
    dtype:        the frozen base's precision (torch.bfloat16 is the fast path); adapters and heads stay float32.
    The model is built on the meta device (no memory, no random init) and filled straight from the file.
    """
    t0 = time.perf_counter()
    root = resolve_checkpoint(name_or_path, local_dir=local_dir)
    hf_cfg = read_config(root)
    config = Config.from_hf(hf_cfg, source=str(root / "config.json"))
    ckpt = SafetensorsCheckpoint(root)
    keys = ckpt.keys()
    templates = {to_template(k)[0] for k in keys}
    has_mlm = "lm_head.dense.weight" in templates
    token_head = "classifier.weight" in templates  # RobertaForTokenClassification
    head_key = "classifier.weight" if token_head else "classifier.out_proj.weight"
    ckpt_labels = ckpt.shape(next(k for k in keys if k.endswith(head_key)))[0] if head_key in templates else None
    if num_labels is None:
        num_labels = ckpt_labels or 2
    keep_head = ckpt_labels == num_labels

    with torch.device("meta"):
        model = cls(config, num_labels=num_labels, mlm_head=has_mlm)
        if token_head:
            model.head = M.TokenHead(config, num_labels)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    hf_tensors = {k: ckpt.get(k) for k in keys if keep_head or not to_template(k)[0].startswith("classifier.")}
    ours = convert(hf_tensors, expected, source=str(root))
    required = [k for k in expected if not (k.startswith("head.") and not keep_head)]
    missing = [k for k in required if k not in ours]
    if missing:
        raise CheckpointError(f"{root}: tensor {hf_names(missing)[0]!r} (our {missing[0]!r}) is missing"
                              + (f", and {len(missing) - 1} more" if len(missing) > 1 else ""))
    state = {k: v.to(dtype=P.param_dtype(k, dtype or torch.float32, k.startswith("head."))) for k, v in ours.items()}
    model.load_state_dict(state, strict=False, assign=True)  # strictness checked above, with better messages
    fresh = [n for n, p in model.named_parameters() if p.is_meta]
    for module in model.modules():  # materialise and initialise what the file did not provide
        if any(p.is_meta for p in module.parameters(recurse=False)):
            module.to_empty(device="cpu", recurse=False)
            M.init_weights(module, config.initializer_range)
    if P.is_mixed(model):
        P.mixed_precision(model)  # casts where float32 and the base dtype meet (precision.py)
    if device is not None:
        model.to(device)
    if hf_cfg.get("id2label") and keep_head:
        id2label = hf_cfg["id2label"]
        model.head.labels = [str(id2label.get(str(i), f"LABEL_{i}")) for i in range(num_labels)]
    model.name_or_path = str(name_or_path)
    if adapter is not None:
        model.add_adapter("default", adapter)
    model.load_report = {"fresh": fresh, "seconds": time.perf_counter() - t0}
    if verbose and fresh:
        print(f"roberta_lite: freshly initialised (not in checkpoint): {', '.join(fresh)}")
    return model.eval()


FINGERPRINT_VERSION = 2  # recorded beside the fingerprint in our adapter files; files without it hold version 1


def fingerprint(model: "Model", version: int = FINGERPRINT_VERSION) -> str:
    """Identifies the frozen base weights, whatever their dtype: a hash of names, shapes and a strided sample of
    each tensor rounded to bf16 (so a bf16-loaded base has the fingerprint of its fp32 original).

    Version 2 hashes exactly what an adapter's outputs depend on, the embeddings and the encoder layers, so one
    encoder saved with an MLM head (RobertaForMaskedLM) and without (RobertaModel) is one base. Version 1, which
    adapter files written before it record, also hashed mlm.*. Adapters and heads are never hashed."""
    if version not in (1, 2):
        raise ValueError(f"fingerprint version {version!r}: expected 1 or 2")
    base = A.is_base(model)
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if not base.get(name, True) or (version == 2 and not name.startswith(("embed.", "layers."))):
            continue
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].to("cpu", torch.bfloat16).float()
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]
