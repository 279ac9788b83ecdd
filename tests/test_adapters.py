"""Adapters: where they sit, that they start as the identity, that only they (and the head) train."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import TINY, save_hf
from roberta_lite.adapters import adapter_tensors
from roberta_lite import AdapterConfig, Config, Model
from roberta_lite.formats.native import read_meta

from test_parity import TOL, batch, max_diff


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("cls")
    hf = save_hf(d, "RobertaForSequenceClassification", **TINY)
    return d, hf


def randomize_adapters(model: Model, seed: int = 0):
    """Trained-looking adapters: non-zero up-projections, so placement actually matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_adapter." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("kind", ["houlsby", "pfeiffer"])
def test_near_identity_at_init_and_both_projections_learn_from_the_first_step(ckpt, kind):
    """Both projections start N(0, initializer_range), as Houlsby et al. and AdapterHub's "bert" init: the states
    barely move, and `down` gets a gradient at once (with `up` = 0 it would get none until `up` had grown, which
    cost a short WNUT-16 run about 0.02 entity F1 against AdapterHub, README)."""
    d, _ = ckpt
    plain, adapted = Model.from_pretrained(d), Model.from_pretrained(d)
    adapted.config.initializer_range = 0.02  # roberta-base's (TINY's 0.2 makes large weights on purpose)
    adapted.add_adapter("default", kind)
    ids, mask = batch(TINY["vocab_size"], 1)
    with torch.no_grad():
        a, b = plain.encode(ids, mask), adapted.encode(ids, mask)
    assert 0 < (a - b).abs().max().item() <= 0.01 * a.abs().max().item()  # measured 3.8e-3 (houlsby)
    adapted.freeze_base()
    adapted.encode(ids, mask).pow(2).mean().backward()
    downs = [p for k, p in adapter_tensors(adapted, "default") if k.endswith("down.weight")]
    assert all(p.grad is not None for p in downs) and sum(p.grad.abs().sum() for p in downs) > 0


def test_slots_per_kind(ckpt):
    d, _ = ckpt
    h = Model.from_pretrained(d, adapter="houlsby")
    p = Model.from_pretrained(d, adapter=AdapterConfig(kind="pfeiffer", reduction_factor=8, activation="gelu"))
    assert all("default" in l.attn_adapter and "default" in l.ffn_adapter for l in h.layers)
    assert all("default" not in l.attn_adapter and "default" in l.ffn_adapter for l in p.layers)
    assert p.layers[0].ffn_adapter["default"].down.out_features == TINY["hidden_size"] // 8


class HFAdapter(nn.Module):
    """An adapter on the transformers side, holding the same weights as ours."""

    def __init__(self, ours):
        super().__init__()
        self.ours = ours

    def forward(self, x):
        return self.ours.up(self.ours.act(self.ours.down(x)))


def test_houlsby_placement_matches_reference(ckpt):
    """Houlsby: after the attention output projection and after the FFN output projection, each before its
    residual add + LayerNorm. Reference: transformers' layers with an adapter added onto those projections."""
    d, hf = ckpt
    ours = Model.from_pretrained(d, adapter="houlsby")
    randomize_adapters(ours)

    class Plus(nn.Module):
        def __init__(self, dense, adapter):
            super().__init__()
            self.dense, self.adapter = dense, adapter

        def forward(self, x):
            y = self.dense(x)
            return y + self.adapter(y)

    import copy
    ref = copy.deepcopy(hf)
    for layer, mine in zip(ref.roberta.encoder.layer, ours.layers):
        layer.attention.output.dense = Plus(layer.attention.output.dense, HFAdapter(mine.attn_adapter["default"]))
        layer.output.dense = Plus(layer.output.dense, HFAdapter(mine.ffn_adapter["default"]))
    ids, mask = batch(TINY["vocab_size"], 1)
    with torch.no_grad():
        diff = max_diff(ref(input_ids=ids, attention_mask=mask).logits, ours(ids, mask), mask)
        moved = max_diff(hf(input_ids=ids, attention_mask=mask).logits, ours(ids, mask), mask)
    assert diff <= TOL
    assert moved > 1e-3  # the adapters really change the output


def test_pfeiffer_placement_matches_reference(ckpt):
    """Pfeiffer (AdapterHub SeqBnConfig): FFN only; the adapter reads LN(x + h) and adds to h, then the same
    LayerNorm is applied to x + h + adapter: original_ln_before, residual_before_ln, original_ln_after."""
    d, hf = ckpt
    ours = Model.from_pretrained(d, adapter="pfeiffer")
    randomize_adapters(ours, seed=1)
    import copy
    ref = copy.deepcopy(hf)
    for layer, mine in zip(ref.roberta.encoder.layer, ours.layers):
        adapter = HFAdapter(mine.ffn_adapter["default"])

        def forward(self, hidden_states, input_tensor, adapter=adapter):
            h = self.dropout(self.dense(hidden_states))
            h = h + adapter(self.LayerNorm(h + input_tensor))
            return self.LayerNorm(h + input_tensor)

        layer.output.forward = types.MethodType(forward, layer.output)
    ids, mask = batch(TINY["vocab_size"], 1)
    with torch.no_grad():
        assert max_diff(ref(input_ids=ids, attention_mask=mask).logits, ours(ids, mask), mask) <= TOL


def test_freeze_base_trains_only_adapters_and_head(ckpt):
    d, _ = ckpt
    model = Model.from_pretrained(d, adapter="houlsby")
    summary = model.freeze_base()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("heads.default.") or "_adapter.default." in n for n in trainable)
    assert any("attn_adapter" in n for n in trainable) and any("ffn_adapter" in n for n in trainable)
    assert {"heads.default.dense.weight", "heads.default.out.weight"} <= trainable
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert summary.startswith(f"trainable params: {n_trainable:,} || all params: ")

    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # all params: frozen ones must not move
    model.train()
    ids, mask = batch(TINY["vocab_size"], 1)
    labels = torch.tensor([0, 1, 1, 0])
    for _ in range(3):
        loss = F.cross_entropy(model(ids, mask), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        if n in base_before:
            assert p.grad is None, n
            assert torch.equal(p, base_before[n]), n
    assert any(not torch.equal(p, adapters_before[n]) for n, p in model.named_parameters() if "up" in n and p.requires_grad)


def test_save_load_round_trip(ckpt, tmp_path):
    d, _ = ckpt
    model = Model.from_pretrained(d, adapter=AdapterConfig("pfeiffer", reduction_factor=4, activation="swish"))
    randomize_adapters(model)
    model.set_num_labels(3, ["a", "b", "c"])
    with torch.no_grad():
        model.active_head.out.weight.normal_()
    out = tmp_path / "adapter"
    model.save_adapter(out)
    assert sorted(p.name for p in out.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    meta = read_meta(out)
    assert meta["labels"] == ["a", "b", "c"] and meta["adapter"]["kind"] == "pfeiffer"
    assert meta["base_model"] == str(d) and len(meta["base_fingerprint"]) == 16

    fresh = Model.from_pretrained(d).load_adapter(out)
    assert fresh.labels == ["a", "b", "c"] and fresh.adapter_config == model.adapter_config
    ids, mask = batch(TINY["vocab_size"], 1)
    with torch.no_grad():
        assert torch.equal(model(ids, mask), fresh(ids, mask))
    # bf16 base takes the same adapter (fingerprint is precision-independent) and agrees within bf16 tolerance
    bf = Model.from_pretrained(d, dtype=torch.bfloat16).load_adapter(out)
    with torch.no_grad():
        ref, got = model(ids, mask), bf(ids, mask)
    assert got.dtype == torch.float32
    assert (ref - got).abs().max() / ref.abs().max() < 3e-2


def test_adapter_files_are_tiny_next_to_base(tmp_path):
    from checkpoints import ROBERTA_BASE

    cfg = Config.from_hf(dict(ROBERTA_BASE, model_type="roberta"))
    with torch.device("meta"):
        model = Model(cfg, num_labels=2)
    model.add_adapter("houlsby")
    model.freeze_base()
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"roberta-base Houlsby rf16: {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%)")
    # 12 layers x 2 adapters x (768*48 + 48 + 48*768 + 768) + head (768*768 + 768 + 768*2 + 2)
    assert trainable == 2_381_186
    model.add_adapter("pf", AdapterConfig("pfeiffer", reduction_factor=16))
    model.freeze_base()  # the active adapter (now "pf") alone: 12 x 74,544 + the same head
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 12 * 74_544 + 592_130


def test_add_adapter_labels_without_num_labels(tiny_roberta):
    """labels alone name the outputs: the model's classifier copied when the count matches, else a new head."""
    model = Model.from_pretrained(tiny_roberta)
    model.add_adapter("a", "houlsby", labels=["neg", "pos"])
    assert model.labels == ["neg", "pos"] and model.head.labels == ["LABEL_0", "LABEL_1"]
    assert torch.equal(model.heads["a"].out.weight, model.head.out.weight)
    model.add_adapter("b", "houlsby", labels=["x", "y", "z"])
    assert model.labels == ["x", "y", "z"] and model.heads["b"].out.weight.shape[0] == 3


def test_adapter_names_that_torch_reserves_are_refused_and_train_names_around_them(ckpt):
    """Adapters are keys of nn.ModuleDicts (the Slots, `heads`), which cannot hold a key named like one of their
    attributes ("train", "float", "eval", ...): a clear error, the model unchanged; train.py's names avoid them."""
    from roberta_lite.adapters import name_from

    model = Model.from_pretrained(ckpt[0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for name in ("train", "float", "to", "_modules"):
        with pytest.raises(ValueError, match=f"adapter name '{name}' is an attribute of torch's nn.ModuleDict"):
            model.add_adapter(name, "houlsby")
    assert model.adapter_names == [] and model.state_dict().keys() == before.keys()
    assert name_from("float") == "float_adapter" and name_from("my run.v2") == "my_run_v2" and name_from("") == "default"
    model.add_adapter(name_from("train"), "lora")
    assert model.adapter_names == ["train_adapter"]
