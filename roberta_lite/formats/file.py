"""What every format's reader returns and every writer takes: one adapter, its head and what it says of its base."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class AdapterFile:
    name: str | None  # the adapter's name in the file (None: the file has none)
    config: dict  # AdapterConfig fields
    tensors: dict[str, torch.Tensor]  # file keys -> float32 tensors
    num_labels: int | None = None  # head output size; None when the file has no head
    labels: list[str] | None = None  # label names, in index order
    task: str = "classification"  # "classification" | "regression" | "multilabel"
    base: dict = field(default_factory=dict)  # what the file says of its base (model name, fingerprint, sizes)
    source: Path | None = None  # the weights file, for error messages
