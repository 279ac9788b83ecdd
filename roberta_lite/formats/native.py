"""roberta_lite's own adapter files: `adapter.safetensors` (the adapter's tensors under their file keys) and
`adapter_config.json` (kind and size, head labels and task, the base it was trained on)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save

from roberta_lite.formats.file import AdapterFile
from roberta_lite.weights import CheckpointError, atomic_write, read_json

FORMAT = "roberta_lite"
TAG = "roberta_lite.adapter/1"

# Every tensor an adapter file may hold; `{}` is the layer index. The file keys are the model's parameter names
# with the adapter's name taken out (adapters.adapter_tensors), so this table maps each template to itself.
KEYS = {t: t for t in [
    *(f"layers.{{}}.{slot}.{lin}.{p}" for slot in ("attn_adapter", "ffn_adapter") for lin in ("down", "up")
      for p in ("weight", "bias")),  # bottleneck adapters: Houlsby both slots, Pfeiffer ffn_adapter only
    *(f"layers.{{}}.attn.qkv_lora.{part}.{m}" for part in ("query", "key", "value") for m in ("A", "B")),
    *(f"layers.{{}}.{slot}.{m}" for slot in ("attn.proj_lora", "ffn.up_lora", "ffn.down_lora") for m in ("A", "B")),
    "head.dense.weight", "head.dense.bias", "head.out.weight", "head.out.bias",
]}
REQUIRED = ("adapter", "num_labels", "labels", "base_fingerprint")


def detect(directory: Path) -> bool:
    return read_meta(directory).get("format") == TAG


def read_meta(directory: str | Path) -> dict:
    return read_json(Path(directory) / "adapter_config.json", "not an adapter directory written by save_adapter")


def read(directory: Path, hidden_size: int, num_layers: int):
    meta = read_meta(directory)
    for key in REQUIRED:
        if key not in meta:
            raise CheckpointError(f"{directory / 'adapter_config.json'}: key {key!r} is missing")
    path = directory / "adapter.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    return AdapterFile(meta.get("name"), meta["adapter"], {k: t.float() for k, t in tensors.items()},
                       meta["num_labels"], meta["labels"], meta.get("task", "classification"),  # formats.check
                       {"model": meta.get("base_model"), "fingerprint": meta["base_fingerprint"],
                        "fingerprint_version": meta.get("fingerprint_version", 1)}, path)


def write(directory: Path, f, hidden_size: int, num_layers: int, base_name: str) -> Path:
    meta = {
        "format": TAG,
        "name": f.name,
        "adapter": f.config,
        "task": f.task,
        "num_labels": f.num_labels,
        "labels": f.labels,
        "base_model": f.base.get("model"),
        "base_fingerprint": f.base.get("fingerprint"),
        "fingerprint_version": f.base.get("fingerprint_version"),
        "base_config": f.base.get("config"),
    }
    atomic_write(directory / "adapter.safetensors", save(f.tensors))
    atomic_write(directory / "adapter_config.json", (json.dumps(meta, indent=2) + "\n").encode())
    return directory
