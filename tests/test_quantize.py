"""The int8 frozen base (quantize.py, Model.quantize): what changes and what does not, int8 error bounds on the tiny
and the roberta-base-shaped models, every adapter kind and task on it, adapter files moving between the float and
the int8 base, the refusals, and predict's --quantize (train.py's is in test_train.py, the server's in
test_serve.py)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from roberta_lite import AdapterConfig, Config, Model, Tokenizer
from roberta_lite import quantize as Q
from roberta_lite.predict import main as predict_main

# Bounds on |int8 - fp32| / |fp32| (whole tensors), about twice what was measured when they were set.
TINY_BOUND = 0.01  # measured: hidden states 0.04%, logits 0.02-0.3% (tiny random base, each adapter kind)
MLM_BOUND = 0.03  # measured: 1.4% (mlm.dense is int8 too)
MERGED_BOUND = 0.04  # measured: 1.7% (a LoRA of random weights merged into the base, then quantized)
BASE_BOUND = 0.06  # measured at roberta-base shape, random weights: hidden states 2.9%, logits 2.0%

KINDS = {  # name: (config, num_labels, task)
    "houlsby": ("houlsby", 2, "classification"),
    "pfeiffer": (AdapterConfig("pfeiffer", reduction_factor=8), 3, "classification"),
    "lora": (AdapterConfig("lora", r=4, alpha=8, targets=("query", "value", "attn_out", "ffn_up", "ffn_down")), 1,
             "regression"),
    "tags": (AdapterConfig("houlsby", activation="gelu"), 4, "multilabel"),
    "ner": (AdapterConfig("pfeiffer"), 5, "token-classification"),  # a tag per token: (B, T, 5) logits
}
TEXTS = ["a good film", "the plot was dull and the acting was weak", "wonderful", "really quite boring " * 10]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def trained(model: Model, names=KINDS, seed: int = 0) -> Model:
    """Adapters of every kind with random weights (as if trained: up and B are not zero)."""
    g = torch.Generator().manual_seed(seed)
    for name in names:
        cfg, k, task = KINDS[name]
        model.add_adapter(name, cfg, num_labels=k, task=task)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if f".{name}." in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def tok(tiny_roberta):
    return Tokenizer.from_pretrained(tiny_roberta)


@pytest.fixture(scope="module")
def inputs(tok):
    return tok(TEXTS)  # padded: the shorter texts have padding


@pytest.fixture(scope="module")
def pair(tiny_roberta):
    """The same adapters (and the same fresh own classifier) on a float32 base and on an int8 one."""
    return float_model(tiny_roberta), float_model(tiny_roberta).quantize()


def float_model(base, names=KINDS) -> Model:
    torch.manual_seed(0)  # the checkpoint has no classifier: the fresh one is the same in every model
    return trained(Model.from_pretrained(base), names)


def run(model, ids, mask, **kw):
    with torch.inference_mode():
        return model(ids, mask, **kw)


# ---------------------------------------------------------------------------------------------- what changes

def test_quantize_swaps_the_base_linears_and_nothing_else(tiny_roberta):
    model = trained(Model.from_pretrained(tiny_roberta))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fingerprints = model.base_fingerprint(1), model.base_fingerprint(2)
    assert model.quantize("int8") is model and model.quantized == "int8" and not model.training
    swapped = {n for n, m in model.named_modules() if isinstance(m, Q.Int8Linear)}
    L = model.config.num_layers
    assert swapped == {f"layers.{i}.{p}" for i in range(L) for p in Q.BASE_LINEARS} | {"mlm.dense"}
    after = dict(model.named_parameters())
    gone = set(before) - set(after)
    assert gone == {f"{m}.{k}" for m in swapped for k in ("weight", "bias")}  # and nothing else went
    for n, p in after.items():  # embeddings, LayerNorms, adapters, LoRAs, heads: as they were, float32
        assert p.dtype == torch.float32 and torch.equal(p, before[n]), n
    base = {n for n in after if n.startswith(("embed.", "layers.")) and not any(f".{k}." in n for k in KINDS)}
    assert base and not any(after[n].requires_grad for n in base)  # the base is frozen
    assert (model.base_fingerprint(1), model.base_fingerprint(2)) == fingerprints  # the float weights'


def test_int8_weights_are_per_output_channel(tiny_roberta):
    """One output row with weights 100x the others' keeps its own scale: both are recovered to int8 precision."""
    torch.manual_seed(0)
    linear = nn.Linear(32, 8)
    with torch.no_grad():
        linear.weight[3] *= 100
    q = Q.Int8Linear(linear, "test")
    x = torch.randn(5, 32)
    with torch.no_grad():
        want, got = linear(x), q(x)
    for row in (0, 3):
        assert rel(got[:, row], want[:, row]) < 0.02, row


def test_activations_are_quantized_per_token():
    """A token with activations 1,000x the others' does not take their resolution away (per tensor, it would)."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 16)
    x = torch.randn(6, 64)
    x[2] *= 1000
    with torch.no_grad():
        want, got = linear(x), Q.Int8Linear(linear, "test")(x)
    b = linear.bias.detach()
    for row in range(6):
        assert rel(got[row] - b, want[row] - b) < 0.02, row
    assert got.dtype == torch.float32 and got.shape == want.shape


def test_nd_inputs_zero_rows_and_no_bias():
    linear = nn.Linear(16, 4, bias=False)
    x = torch.randn(2, 3, 16)
    x[1, 2] = 0
    with torch.no_grad():
        got = Q.Int8Linear(linear, "test")(x)
        want = linear(x)
    assert got.shape == (2, 3, 4) and torch.equal(got[1, 2], torch.zeros(4))
    assert rel(got, want) < 0.02


# ---------------------------------------------------------------------------------------------- error bounds

def test_tiny_int8_is_close_to_fp32_for_every_adapter_and_head(pair, inputs):
    f32, i8 = pair
    ids, mask = inputs
    with torch.inference_mode():
        assert rel(i8.encode(ids, mask, adapter="houlsby"), f32.encode(ids, mask, adapter="houlsby")) < TINY_BOUND
        for name in KINDS:
            assert rel(run(i8, ids, mask, adapter=name), run(f32, ids, mask, adapter=name)) < TINY_BOUND, name
        assert rel(i8.mlm_logits(ids, mask), f32.mlm_logits(ids, mask)) < MLM_BOUND
    i8.active_adapter = f32.active_adapter = None  # the checkpoint's own classifier
    assert rel(run(i8, ids, mask), run(f32, ids, mask)) < TINY_BOUND


def test_roberta_base_shape_int8_is_close_to_fp32():
    torch.manual_seed(0)
    f32 = Model(Config(), num_labels=3).eval()
    f32.add_adapter("a", "houlsby", num_labels=3)
    with torch.no_grad():
        for n, p in f32.named_parameters():
            if ".a.up." in n:
                p.normal_(0, 0.02)
    ids = torch.randint(3, 50265, (2, 64))
    mask = torch.ones_like(ids)
    mask[1, 40:] = 0
    with torch.inference_mode():
        want_h, want = f32.encode(ids, mask), f32(ids, mask)
    i8 = f32.quantize("int8")
    with torch.inference_mode():
        got_h, got = i8.encode(ids, mask), i8(ids, mask)
    assert rel(got_h, want_h) < BASE_BOUND
    assert rel(got, want) < BASE_BOUND


def test_mixed_batch_rows_match_their_own_adapters_runs(pair, inputs):
    """Each row of a mixed batch, against its adapter's own run on the int8 base: the same up to the quantization
    of the batch (the kernel's range spans the rows), far inside the int8 error."""
    _, i8 = pair
    ids, mask = inputs
    names = ["houlsby", "lora", "pfeiffer", "tags"]
    mixed = run(i8, ids, mask, adapter=names)
    for row, name in enumerate(names):
        alone = run(i8, ids, mask, adapter=name)[row]
        k = i8.heads[name].num_labels
        assert rel(mixed[row, :k], alone) < 0.01, name
        assert torch.isinf(mixed[row, k:]).all()


def test_adapter_files_move_between_the_float_and_the_int8_base(tiny_roberta, pair, inputs, tmp_path):
    f32, i8 = pair
    ids, mask = inputs
    for name in KINDS:
        f32.save_adapter(tmp_path / f"f-{name}", name=name)
        i8.save_adapter(tmp_path / f"q-{name}", name=name)
    onto_int8 = Model.from_pretrained(tiny_roberta).quantize("int8")
    onto_float = Model.from_pretrained(tiny_roberta)
    for name in KINDS:
        onto_int8.load_adapter(tmp_path / f"f-{name}")
        onto_float.load_adapter(tmp_path / f"q-{name}")
        assert json.loads((tmp_path / f"q-{name}" / "adapter_config.json").read_text())["base_fingerprint"] == \
            f32.base_fingerprint()
        assert torch.equal(run(onto_int8, ids, mask), run(i8, ids, mask, adapter=name))
        assert torch.equal(run(onto_float, ids, mask), run(f32, ids, mask, adapter=name))


def test_adapters_of_another_base_are_still_refused(tiny_roberta, tmp_path):
    from conftest import save_tiny_roberta
    from roberta_lite.weights import CheckpointError

    other = trained(Model.from_pretrained(save_tiny_roberta(tmp_path / "other", seed=1)), ["houlsby"])
    other.save_adapter(tmp_path / "a", name="houlsby")
    i8 = Model.from_pretrained(tiny_roberta).quantize("int8")
    with pytest.raises(CheckpointError, match="fingerprint"):
        i8.load_adapter(tmp_path / "a")
    assert i8.adapter_names == []


def test_merge_then_quantize(tiny_roberta, inputs):
    ids, mask = inputs
    want = run(float_model(tiny_roberta, ["lora"]), ids, mask)
    model = float_model(tiny_roberta, ["lora"]).merge_adapter("lora").quantize("int8")
    assert rel(run(model, ids, mask), want) < MERGED_BOUND
    with pytest.raises(RuntimeError, match="unmerge_adapter: the base is int8"):
        model.unmerge_adapter()
    assert model.merged_adapter == "lora"


# ---------------------------------------------------------------------------------------------- refusals

def test_refusals(tiny_roberta, inputs, tmp_path):
    ids, mask = inputs
    model = trained(Model.from_pretrained(tiny_roberta), ["houlsby", "lora"]).quantize("int8")
    want = run(model, ids, mask)
    with pytest.raises(RuntimeError, match="already int8"):
        model.quantize("int8")
    for scheme in ("int4", "fp8", None):
        with pytest.raises(ValueError, match="not supported"):
            Model.from_pretrained(tiny_roberta).quantize(scheme)
    with pytest.raises(RuntimeError, match="freeze_base: the base is int8"):
        model.freeze_base()
    with pytest.raises(RuntimeError, match="merge_adapter: the base is int8"):
        model.merge_adapter("lora")
    model.train()
    with pytest.raises(RuntimeError, match="layers.0.attn.qkv is int8: the quantized base runs inference only"):
        model(ids, mask)
    model.eval()
    for trainable in (model.embed.norm.weight, model.layers[0].ffn_adapter["houlsby"].up.weight):
        trainable.requires_grad_(True)  # a base part or an adapter before an int8 layer: inference still runs,
        out = model(ids, mask)  # (not under no_grad)
        assert torch.allclose(out, want, atol=1e-6)
        with pytest.raises(RuntimeError, match="gradients cannot flow back through the quantized base"):
            out.sum().backward()  # training through the int8 base does not
    model.embed.norm.weight.requires_grad_(False)
    with pytest.raises(RuntimeError, match="saving the int8 base is refused"):
        model.state_dict()
    with pytest.raises(RuntimeError, match="its float weight is gone"):
        model.layers[0].ffn.up.weight
    assert torch.equal(run(model, ids, mask), want)  # none of it changed the model
    model.save_adapter(tmp_path / "still-saves", name="houlsby")  # adapters still save


def test_a_quantized_model_deep_copies(pair, inputs):
    import copy

    _, i8 = pair
    ids, mask = inputs
    assert rel(run(copy.deepcopy(i8), ids, mask, adapter="houlsby"), run(i8, ids, mask, adapter="houlsby")) < 1e-5


# ---------------------------------------------------------------------------------------------- predict

def test_predict_quantize_int8(tiny_roberta, tmp_path, capsys):
    f32 = trained(Model.from_pretrained(tiny_roberta), ["houlsby"])
    f32.save_adapter(tmp_path / "a", name="houlsby")
    args = ["--adapter", str(tmp_path / "a"), "--model", str(tiny_roberta), "--device", "cpu", *TEXTS]
    assert predict_main(args) == 0
    plain = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert predict_main(args + ["--quantize", "int8"]) == 0
    int8 = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [x["text"] for x in int8] == TEXTS
    for a, b in zip(plain, int8):
        for label, p in a["probabilities"].items():
            assert abs(p - b["probabilities"][label]) < 0.02
    from roberta_lite.predict import Predictor

    assert Predictor(tmp_path / "a", model=str(tiny_roberta), quantize="int8").model.quantized == "int8"
    for bad, words in ((["--quantize", "int4"], "invalid choice: 'int4'"),
                       (["--quantize", "int8", "--precision", "bf16"], "--precision bf16")):
        assert predict_main(args + bad) != 0
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err and "Traceback" not in err, err


def test_a_failed_quantize_leaves_the_model_as_it_was(tiny_roberta, inputs, monkeypatch):
    ids, mask = inputs
    model = float_model(tiny_roberta, ["houlsby"])
    want = run(model, ids, mask)
    made, Int8Linear = [], Q.Int8Linear

    def fails_on_the_third(linear, name):
        if len(made) == 2:
            raise RuntimeError("no int8 kernel here")
        made.append(name)
        return Int8Linear(linear, name)

    monkeypatch.setattr(Q, "Int8Linear", fails_on_the_third)
    with pytest.raises(RuntimeError, match="no int8 kernel here"):
        model.quantize("int8")
    assert model.quantized is None and not any(isinstance(m, Int8Linear) for m in model.modules())
    assert torch.equal(run(model, ids, mask), want)
    monkeypatch.undo()
    assert model.quantize("int8").quantized == "int8"  # and it can be quantized after all
