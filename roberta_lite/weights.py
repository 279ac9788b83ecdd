"""Checkpoints: find them, read them, and rename Hugging Face tensors to ours through one table.

Everything a checkpoint may hold is listed in `HF_TO_OURS` below. A key is either mapped to one of our
parameter names, or to `None` (dropped on purpose, with the reason beside it); a key the table does not know is an
error, never silently skipped. Only safetensors files are read (memory-mapped); pickled `.bin` files never are.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is: the message names the file and the key at fault."""


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
}

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


# --------------------------------------------------------------------------------------------- reading files

HUB_FILES = ["config.json", "model.safetensors", "model.safetensors.index.json", "*.safetensors",
             "tokenizer.json", "vocab.json", "merges.txt"]


def _looks_like_path(s: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else that does not exist is a missing directory."""
    return s.startswith((".", "/", "~")) or s.count("/") > 1 or s.endswith("/") or "\\" in s


def resolve_checkpoint(name_or_path: str | Path, *, what: str = "model", local_dir: str | Path | None = None) -> Path:
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
        return Path(snapshot_download(repo_id=s, allow_patterns=HUB_FILES, local_dir=local_dir))
    except RepositoryNotFoundError:  # its message's first line is only "404 Client Error."
        raise FileNotFoundError(f"{what} {s!r}: not a local directory, and not found on the Hugging Face Hub "
                                f"(a private or gated repository needs a token: set HF_TOKEN)") from None
    except Exception as e:  # offline, unknown repo, bad token: the library's own exception types vary by version
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"{what} {s!r}: not a local directory, and fetching it from the Hugging Face Hub "
                                f"failed ({reason}); offline, give a local checkpoint directory instead") from None


def read_config(root: Path) -> dict:
    path = root / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (every checkpoint directory needs its config.json)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


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
