"""The key-mapping table, checked on meta tensors: real roberta-base / roberta-large shapes, no weights needed."""

from __future__ import annotations

import pytest
import torch

from checkpoints import KINDS, ROBERTA_BASE, transformers
from roberta_lite import CheckpointError, Config, Model
from roberta_lite.weights import HF_TO_OURS, convert, map_key, to_template

ROBERTA_LARGE = dict(ROBERTA_BASE, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)


def hf_meta_state(kind: str, config: dict) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = getattr(transformers, kind)(transformers.RobertaConfig(**config))
    return model.state_dict()


@pytest.mark.parametrize("shape", [ROBERTA_BASE, ROBERTA_LARGE], ids=["roberta-base", "roberta-large"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_parameter_comes_from_the_checkpoint(kind, shape):
    hf = hf_meta_state(kind, shape)
    cfg = Config.from_hf(dict(shape, model_type="roberta"))
    with torch.device("meta"):
        ours = Model(cfg, num_labels=2, mlm_head=kind == "RobertaForMaskedLM")
    expected = {k: v.shape for k, v in ours.state_dict().items()}
    converted = convert(hf, expected)  # raises on any unknown key or wrong shape
    base = {k for k in expected if not k.startswith(("head.", "mlm."))}
    assert base <= set(converted)
    if kind == "RobertaForMaskedLM":
        assert {k for k in expected if k.startswith("mlm.")} <= set(converted)
    if kind == "RobertaForSequenceClassification":
        assert set(converted) == set(expected)
    if kind == "RobertaForTokenClassification":  # classifier.{weight,bias}: a TokenHead's out
        assert set(converted) == base | {"head.out.weight", "head.out.bias"}
    assert all(converted[k].shape == expected[k] for k in converted)
    C = shape["hidden_size"]
    assert converted["layers.0.attn.qkv.weight"].shape == (3 * C, C)


def test_table_is_one_to_one():
    """No two Hugging Face keys land on the same tensor (or the same third of a fused one)."""
    token_head = {"classifier.weight", "classifier.bias"}  # never in one file with classifier.out_proj.*
    for alternatives in (token_head, set(HF_TO_OURS) - token_head):
        targets = [v for k, v in HF_TO_OURS.items() if v is not None and k in alternatives]
        assert len(targets) == len(set(targets))
    hf_keys = set()
    for kind in KINDS:
        hf_keys |= set(hf_meta_state(kind, ROBERTA_BASE))
    used = {to_template(k)[0] for k in hf_keys}
    # every entry but the two buffers that only old checkpoints saved is exercised by a current transformers model
    assert set(HF_TO_OURS) - used <= {"embeddings.position_ids", "embeddings.token_type_ids"}


def test_fused_qkv_order():
    """Query, key and value land in that order in the fused projection."""
    C = 4
    hf = {f"encoder.layer.0.attention.self.{n}.weight": torch.full((C, C), float(i)) for i, n in enumerate(["query", "key", "value"])}
    fused = convert(hf)["layers.0.attn.qkv.weight"]
    assert fused.shape == (3 * C, C)
    assert fused[:C].eq(0).all() and fused[C : 2 * C].eq(1).all() and fused[2 * C :].eq(2).all()


def test_prefixes_and_drops():
    assert map_key("roberta.encoder.layer.11.output.dense.bias") == "layers.11.ffn.down.bias"
    assert map_key("encoder.layer.11.output.dense.bias") == "layers.11.ffn.down.bias"
    assert map_key("roberta.encoder.layer.3.attention.self.key.weight") == ("layers.3.attn.qkv.weight", 1)
    assert map_key("lm_head.decoder.weight") is None  # tied to the word embeddings
    assert map_key("roberta.pooler.dense.weight") is None
    with pytest.raises(CheckpointError, match="roberta.encoder.layer.0.attention.self.rotary.weight"):
        map_key("roberta.encoder.layer.0.attention.self.rotary.weight")


def test_wrong_shape_and_extra_layer_name_the_key():
    expected = {"layers.0.ffn.down.bias": torch.Size([8])}
    with pytest.raises(CheckpointError, match=r"encoder.layer.0.output.dense.bias.*\(9,\).*\(8,\)"):
        convert({"encoder.layer.0.output.dense.bias": torch.empty(9, device="meta")}, expected)
    with pytest.raises(CheckpointError, match="encoder.layer.1.output.dense.bias"):
        convert({"encoder.layer.1.output.dense.bias": torch.empty(8, device="meta")}, expected)
