"""Adapter files: one module per format, each a literal table of key templates plus a short reader and writer.

    native.py      roberta_lite's own (adapter.safetensors + adapter_config.json with "format")
    adapterhub.py  AdapterHub's `adapters` library (adapter_config.json with a "config" block)
    peft.py        Hugging Face peft LoRA (adapter_config.json with "peft_type")

Every reader turns its files into an `AdapterFile` whose tensors carry roberta_lite's file keys (the parameter
names of one adapter with its name taken out, e.g. `layers.3.ffn_adapter.down.weight`, `head.out.weight`); every
writer takes one. `load` checks the whole file against the model before anything in the model changes.
"""

from __future__ import annotations

import os
from dataclasses import asdict, replace
from pathlib import Path

import torch

from roberta_lite import adapters as A
from roberta_lite.formats.file import AdapterFile
from roberta_lite.weights import FINGERPRINT_VERSION, CheckpointError, resolve_checkpoint


ADAPTER_HUB_FILES = ["adapter_config.json", "adapter.safetensors", "pytorch_adapter.bin", "head_config.json",
                     "model_head.safetensors", "pytorch_model_head.bin", "adapter_model.safetensors",
                     "adapter_model.bin"]


def _formats() -> dict:
    from roberta_lite.formats import adapterhub, native, peft

    return {m.FORMAT: m for m in (native, adapterhub, peft)}


def detect(directory: Path):
    """The format module that reads this directory."""
    if not (directory / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{directory / 'adapter_config.json'}: missing (not an adapter directory)")
    for fmt in _formats().values():
        if fmt.detect(directory):
            return fmt
    raise CheckpointError(f"{directory / 'adapter_config.json'}: not an adapter file of any known format "
                          f"({', '.join(_formats())})")


def read(source: str | os.PathLike, model) -> AdapterFile:
    """Read and fully check an adapter (a directory or hub id) against `model`, without changing the model."""
    d = resolve_checkpoint(source, what="adapter", patterns=ADAPTER_HUB_FILES)
    fmt = detect(d)
    f = fmt.read(d, model.config.hidden_size, model.config.num_layers)
    if fmt.FORMAT == "peft" and not Path(source).expanduser().is_dir():
        # peft files hold no name, so the reader takes the directory's; a hub download's is a commit hash
        f = replace(f, name=str(source).rstrip("/").rsplit("/", 1)[-1])
    return check(model, f, d)


def check(model, f: AdapterFile, where: Path) -> AdapterFile:
    """Refuse a file for another base, a config this model cannot compute, or any missing, unexpected or
    wrongly shaped tensor. Returns f with its config as an AdapterConfig."""
    recorded, version = f.base.get("fingerprint"), f.base.get("fingerprint_version", 1)
    if recorded is not None and recorded != model.base_fingerprint(version):
        raise CheckpointError(
            f"{where}: adapter was trained on base {f.base.get('model')!r} (fingerprint {recorded}), but this model "
            f"is {model.name_or_path!r} (fingerprint {model.base_fingerprint(version)}); load the base it was trained on")
    try:
        cfg = A.AdapterConfig.of(f.config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None
    _check_head(f, where)
    expected = A.expected_shapes(model, cfg, f.num_labels or 1, f.task)
    if f.num_labels is None:
        expected = {k: s for k, s in expected.items() if not k.startswith("head.")}
    missing, unexpected = sorted(set(expected) - set(f.tensors)), sorted(set(f.tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{f.source or where}: missing tensors {missing[:3]}, unexpected tensors "
                              f"{unexpected[:3]} for a {cfg.kind} adapter")
    for k, t in f.tensors.items():
        if tuple(t.shape) != expected[k]:
            raise CheckpointError(f"{f.source or where}: tensor {k!r} has shape {tuple(t.shape)}, this model "
                                  f"expects {expected[k]} (adapter saved for another base?)")
    return replace(f, config=cfg)


def _check_head(f: AdapterFile, where: Path) -> None:
    """What the file says of its head: a positive number of outputs (or no head), one name per output, a task
    roberta_lite knows; checked here so that adding the head cannot fail after the model has begun to change."""
    n = f.num_labels
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise CheckpointError(f"{where}: num_labels {n!r}: expected a positive integer")
    if f.labels is not None and (not isinstance(f.labels, list) or len(f.labels) != n
                                 or not all(isinstance(x, str) for x in f.labels)):
        raise CheckpointError(f"{where}: labels {f.labels!r}: expected {n} names, one per output")
    if f.task not in A.TASKS:
        raise CheckpointError(f"{where}: task {f.task!r}: expected one of {', '.join(A.TASKS)}")


def add(model, f: AdapterFile, name: str | None = None, replace_existing: bool = False) -> str:
    """Add a checked adapter file to `model` under `name` (default: the file's, else "default"); make it active."""
    name = name or f.name or "default"
    model.add_adapter(name, f.config, num_labels=f.num_labels, labels=f.labels, task=f.task, replace=replace_existing)
    params = dict(A.adapter_tensors(model, name))
    with torch.no_grad():
        for k, t in f.tensors.items():
            params[k].copy_(t)
    return name


def load(model, source: str | os.PathLike, name: str | None = None, replace: bool = False) -> str:
    return add(model, read(source, model), name, replace)


def save(model, directory: str | os.PathLike, name: str | None = None, format: str = "roberta_lite") -> Path:
    """Write adapter `name` (default: the active one) and its head in `format`."""
    formats = _formats()
    if format not in formats:
        raise ValueError(f"save_adapter: format {format!r}: expected one of {', '.join(formats)}")
    name = name or model.active_adapter
    if name is None:
        raise RuntimeError("save_adapter: this model has no adapter (add one with add_adapter or adapter=...)")
    if name not in model.adapter_configs:
        raise KeyError(f"save_adapter: no adapter {name!r} (this model has {', '.join(model.adapter_names)})")
    head = model.heads[name]
    f = AdapterFile(name, model.adapter_configs[name].to_dict(),
                    {k: p.detach().float().contiguous() for k, p in A.adapter_tensors(model, name)},
                    head.num_labels, list(head.labels), head.task,
                    {"model": str(model.name_or_path), "fingerprint": model.base_fingerprint(),
                     "fingerprint_version": FINGERPRINT_VERSION,
                     "config": asdict(model.config)})
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    formats[format].write(d, f, model.config.hidden_size, model.config.num_layers, str(model.name_or_path))
    return d
