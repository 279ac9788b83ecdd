"""peft LoRA directories (roberta_lite.formats.peft) against peft itself.

The yardstick is a pure-PyTorch reference, independent of the format's tables: transformers'
RobertaForSequenceClassification with each LoRA delta, computed from the INTERCHANGE tensors, added by a forward
hook on the adapted Linear (y += s * x A^T B^T). Reading: peft's own logits == the reference on what `read` returned.
Writing: peft's logits on what `write` wrote == the reference on what was given to `write`.
"""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import RobertaForSequenceClassification  # noqa: E402

from checkpoints import make_hf  # noqa: E402
from roberta_lite import Model  # noqa: E402
from roberta_lite.formats import peft as fmt  # noqa: E402
from roberta_lite.weights import CheckpointError  # noqa: E402
from test_parity import TOL, batch  # noqa: E402

C, L, F, K = 64, 2, 96, 3
CFG = dict(vocab_size=99, hidden_size=C, num_hidden_layers=L, num_attention_heads=4, intermediate_size=F,
           max_position_embeddings=40, layer_norm_eps=1e-5, type_vocab_size=1, pad_token_id=1, num_labels=K)
SIX = ["query", "key", "value", "attn_out", "ffn_up", "ffn_down"]

# The reference's own map, written from transformers' module tree: interchange prefix -> module it adapts.
REF_MODULES = {
    "layers.{}.attn.qkv_lora.query": "roberta.encoder.layer.{}.attention.self.query",
    "layers.{}.attn.qkv_lora.key": "roberta.encoder.layer.{}.attention.self.key",
    "layers.{}.attn.qkv_lora.value": "roberta.encoder.layer.{}.attention.self.value",
    "layers.{}.attn.proj_lora": "roberta.encoder.layer.{}.attention.output.dense",
    "layers.{}.ffn.up_lora": "roberta.encoder.layer.{}.intermediate.dense",
    "layers.{}.ffn.down_lora": "roberta.encoder.layer.{}.output.dense",
}
REF_TARGET = dict(zip(REF_MODULES, SIX))
REF_HEAD = {"head.dense.weight": "classifier.dense.weight", "head.dense.bias": "classifier.dense.bias",
            "head.out.weight": "classifier.out_proj.weight", "head.out.bias": "classifier.out_proj.bias"}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("peft-base")
    make_hf("RobertaForSequenceClassification", **CFG).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def inputs():
    return batch(CFG["vocab_size"], CFG["pad_token_id"], T=17)


def load_base(base_dir) -> RobertaForSequenceClassification:
    return RobertaForSequenceClassification.from_pretrained(base_dir).eval()


def reference_logits(base_dir, f: fmt.AdapterFile, ids, mask) -> torch.Tensor:
    """transformers' base + hooks adding s * x A^T B^T from the interchange tensors; the file's head if it has one."""
    model = load_base(base_dir)
    c = f.config
    scale = c["alpha"] / (math.sqrt(c["r"]) if c["use_rslora"] else c["r"])
    modules = dict(model.named_modules())
    for prefix, module in REF_MODULES.items():
        for i in range(L):
            if f"{prefix.format(i)}.A" in f.tensors:
                a, b = f.tensors[f"{prefix.format(i)}.A"], f.tensors[f"{prefix.format(i)}.B"]
                modules[module.format(i)].register_forward_hook(
                    lambda m, args, out, a=a, b=b: out + scale * (args[0] @ a.T @ b.T))
    with torch.no_grad():
        if f.num_labels is not None:
            params = dict(model.named_parameters())
            for ours, theirs in REF_HEAD.items():
                params[theirs].copy_(f.tensors[ours])
        return model(input_ids=ids, attention_mask=mask).logits


def peft_saved(base_dir, out, seed=0, safe=True, **lora):
    """A peft LoRA on the tiny base with every A, B and the classifier random (not peft's no-op init), saved to
    `out`; returns the PeftModel (eval mode)."""
    model = peft.get_peft_model(load_base(base_dir), peft.LoraConfig(task_type="SEQ_CLS", **lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.eval()
    model.save_pretrained(out, safe_serialization=safe)
    return model


def peft_logits(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def max_err(a, b) -> float:
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------------------------ reading

READ_CASES = {
    "query+value": dict(r=4, lora_alpha=8, target_modules=["query", "value"]),
    "six, rslora": dict(r=3, lora_alpha=5, use_rslora=True, lora_dropout=0.1,
                        target_modules=["query", "key", "value", "dense"]),
    "all-linear": dict(r=2, lora_alpha=3, target_modules="all-linear"),
}
READ_TARGETS = {"query+value": ["query", "value"], "six, rslora": SIX, "all-linear": SIX}


@pytest.mark.parametrize("case", READ_CASES)
def test_read_matches_peft(case, base_dir, inputs, tmp_path):
    lora = READ_CASES[case]
    model = peft_saved(base_dir, tmp_path, **lora)
    f = fmt.read(tmp_path, hidden_size=C, num_layers=L)
    assert f.config == {"kind": "lora", "r": lora["r"], "alpha": float(lora["lora_alpha"]),
                        "targets": READ_TARGETS[case], "dropout": lora.get("lora_dropout", 0.0),
                        "use_rslora": lora.get("use_rslora", False)}
    assert (f.num_labels, f.labels, f.task, f.name) == (K, ["LABEL_0", "LABEL_1", "LABEL_2"], "classification",
                                                        tmp_path.name)
    assert f.base["hidden_size"] == C and f.base["num_layers"] == L and f.base["model"] == str(base_dir)
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in f.tensors.values())
    ids, mask = inputs
    expected = peft_logits(model, ids, mask)
    assert max_err(reference_logits(base_dir, f, ids, mask), expected) <= TOL
    # The LoRA deltas matter: without them the reference is far off (so a dropped or swapped tensor would show).
    no_lora = fmt.AdapterFile(f.name, f.config, {k: v for k, v in f.tensors.items() if k.startswith("head.")}, K)
    assert max_err(reference_logits(base_dir, no_lora, ids, mask), expected) > 1e-2


def test_legacy_bin_reads_the_same(base_dir, tmp_path):
    peft_saved(base_dir, tmp_path / "st", seed=3, **READ_CASES["six, rslora"])
    peft_saved(base_dir, tmp_path / "bin", seed=3, safe=False, **READ_CASES["six, rslora"])
    assert not (tmp_path / "bin" / fmt.WEIGHTS_FILE).exists()
    a, b = fmt.read(tmp_path / "st", C, L), fmt.read(tmp_path / "bin", C, L)
    assert a.config == b.config and a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


class _Payload:
    ran = False

    def __reduce__(self):
        return _mark_ran, ()


def _mark_ran():
    _Payload.ran = True


def test_bin_is_never_fully_unpickled(base_dir, tmp_path):
    peft_saved(base_dir, tmp_path, safe=False, **READ_CASES["query+value"])
    torch.save({"x": _Payload()}, tmp_path / fmt.LEGACY_WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match=r"adapter_model\.bin: not a plain tensor file"):
        fmt.read(tmp_path, C, L)
    assert not _Payload.ran


# Which of our six each target_modules list selects, as peft itself selects them (checked against peft below).
TARGET_NAMES = {
    "query": ["query"],
    "attention.output.dense": ["attn_out"],
    "intermediate.dense": ["ffn_up"],
    "output.dense": ["attn_out", "ffn_down"],  # attention.output.dense ends with "output.dense" too
    "dense": ["attn_out", "ffn_up", "ffn_down"],  # classifier.dense is modules_to_save, never LoRA
    "key,self.value": ["key", "value"],
    "roberta.encoder.layer.0.output.dense,roberta.encoder.layer.1.output.dense": ["ffn_down"],
}


@pytest.mark.parametrize("names", TARGET_NAMES)
def test_target_names_select_what_peft_selects(names, base_dir, tmp_path):
    model = peft_saved(base_dir, tmp_path, r=2, target_modules=names.split(","))
    adapted = {n.removeprefix("base_model.model.").removesuffix(".lora_A") for n, _ in model.named_modules()
               if n.endswith(".lora_A")}
    by_peft = {REF_TARGET[p] for p, m in REF_MODULES.items() for i in range(L) if m.format(i) in adapted}
    assert fmt.read(tmp_path, C, L).config["targets"] == TARGET_NAMES[names]
    assert set(TARGET_NAMES[names]) == by_peft


# ------------------------------------------------------------------------------------------------ refusals

@pytest.fixture(scope="module")
def good(base_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("good-peft")
    peft_saved(base_dir, d, **READ_CASES["query+value"])
    return d


def edited(good, tmp_path, **changes):
    """A copy of the good adapter with adapter_config.json fields changed (None removes the field)."""
    d = tmp_path / "edited"
    shutil.copytree(good, d)
    cfg = json.loads((d / fmt.CONFIG_FILE).read_text())
    cfg.update(changes)
    (d / fmt.CONFIG_FILE).write_text(json.dumps(cfg))
    return d


REFUSED = [
    ("use_dora", True), ("lora_bias", True), ("bias", "all"), ("bias", "lora_only"), ("fan_in_fan_out", True),
    ("layers_to_transform", [0]), ("layers_to_transform", 0), ("rank_pattern", {"query": 8}),
    ("alpha_pattern", {"value": 2}), ("exclude_modules", ["layer.0.attention.self.query"]),
    ("target_modules", ".*\\.(query|value)"), ("target_modules", ["query", "value", "word_embeddings"]),
    ("target_modules", ["layer.0.attention.self.query", "value"]), ("target_modules", ["LayerNorm"]),
    ("task_type", "CAUSAL_LM"), ("init_lora_weights", "pissa"), ("init_lora_weights", "loftq"),
    ("init_lora_weights", "olora"), ("modules_to_save", ["classifier", "roberta.pooler"]), ("peft_type", "IA3"),
    ("trainable_token_indices", [5]), ("a_future_option", 3), ("r", 0), ("lora_alpha", "8"), ("lora_dropout", 1.0),
]


@pytest.mark.parametrize("key,value", REFUSED, ids=[f"{k}={v}" for k, v in REFUSED])
def test_refused_option_names_file_key_and_value(good, tmp_path, key, value):
    d = edited(good, tmp_path, **{key: value})
    with pytest.raises(CheckpointError) as e:
        fmt.read(d, C, L)
    msg = str(e.value)
    assert msg.startswith(str(d / fmt.CONFIG_FILE)) and repr(key) in msg and json.dumps(value) in msg
    assert "\n" not in msg


def test_dense_adapts_the_classifier_unless_it_is_kept_out(base_dir, tmp_path):
    """peft keeps modules_to_save out of LoRA's reach, and SEQ_CLS always puts the classifier there."""
    peft_saved(base_dir, tmp_path / "dense", r=2, target_modules=["dense"])
    d = edited(tmp_path / "dense", tmp_path / "seq-cls", modules_to_save=None)
    assert fmt.read(d, C, L).config["targets"] == ["attn_out", "ffn_up", "ffn_down"]
    d = edited(tmp_path / "dense", tmp_path / "no-task", modules_to_save=None, task_type=None)
    with pytest.raises(CheckpointError, match="selects 'classifier.dense', which roberta_lite has no LoRA for"):
        fmt.read(d, C, L)


def test_missing_target_modules_means_peft_default(good, tmp_path):
    d = edited(good, tmp_path, target_modules=None)
    assert fmt.read(d, C, L).config["targets"] == ["query", "value"]


def rewrite_tensors(d, change):
    path = d / fmt.WEIGHTS_FILE
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


Q0A = "base_model.model.roberta.encoder.layer.0.attention.self.query.lora_A.weight"
V1B = "base_model.model.roberta.encoder.layer.1.attention.self.value.lora_B.weight"
K0A = "base_model.model.roberta.encoder.layer.0.attention.self.key.lora_A.weight"
OUT_B = "base_model.model.classifier.out_proj.bias"
BAD_TENSORS = {
    "unknown key": (lambda t: t.update({Q0A.replace("lora_A.weight", "lora_magnitude_vector"): torch.ones(C)}),
                    "unexpected key '" + Q0A.replace("lora_A.weight", "lora_magnitude_vector'")),
    "missing": (lambda t: t.pop(V1B), f"tensor '{V1B}' is missing"),
    "wrong shape": (lambda t: t.update({Q0A: torch.zeros(4, C - 1)}), f"key '{Q0A}' has shape (4, 63)"),
    "rank differs from r": (lambda t: t.update({Q0A: torch.zeros(5, C)}), f"key '{Q0A}' has shape (5, 64)"),
    "untargeted module": (lambda t: t.update({K0A: torch.zeros(4, C)}), f"key '{K0A}': a module target_modules"),
    "partial head": (lambda t: t.pop(OUT_B), f"tensor '{OUT_B}' is missing"),
    "integer tensor": (lambda t: t.update({Q0A: torch.zeros(4, C, dtype=torch.int64)}), f"key '{Q0A}' has dtype"),
}


@pytest.mark.parametrize("case", BAD_TENSORS)
def test_bad_tensor_is_named(good, tmp_path, case):
    change, message = BAD_TENSORS[case]
    d = edited(good, tmp_path)
    rewrite_tensors(d, change)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(d / fmt.WEIGHTS_FILE))}: .*{re.escape(message)}"):
        fmt.read(d, C, L)


@pytest.mark.parametrize("hidden,layers,message", [
    (32, L, f"key '{Q0A}' has shape \\(4, 64\\), expected \\(4, 32\\)"),
    (C, 1, "layer.1.attention.* is for layer 1, but the model has 1 layers"),
    (C, 3, r"LoRA tensors for layers \[0, 1\] only, but the model has 3 layers"),
])
def test_file_for_another_base_is_refused(good, hidden, layers, message):
    with pytest.raises(CheckpointError, match=message):
        fmt.read(good, hidden, layers)


def test_corrupt_files_are_named(good, tmp_path):
    d = edited(good, tmp_path)
    (d / fmt.WEIGHTS_FILE).write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(d / fmt.WEIGHTS_FILE))}: not a readable safetensors file"):
        fmt.read(d, C, L)
    (d / fmt.CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(d / fmt.CONFIG_FILE))}: invalid JSON"):
        fmt.read(d, C, L)


def test_detect(good, tmp_path):
    assert fmt.detect(good)
    assert not fmt.detect(tmp_path)
    (tmp_path / fmt.CONFIG_FILE).write_text(json.dumps({"name": "sst-2", "config": {"architecture": "bottleneck"}}))
    assert not fmt.detect(tmp_path)  # AdapterHub's adapter_config.json has no peft_type
    (tmp_path / fmt.CONFIG_FILE).write_text("{")
    assert not fmt.detect(tmp_path)


# ------------------------------------------------------------------------------------------------ writing

def random_adapter(targets, r, alpha, rslora=False, seed=0) -> fmt.AdapterFile:
    g = torch.Generator().manual_seed(seed)
    shapes = {"query": (C, C), "key": (C, C), "value": (C, C), "attn_out": (C, C), "ffn_up": (C, F),
              "ffn_down": (F, C)}  # (in, out)
    tensors = {}
    for prefix, target in REF_TARGET.items():
        if target in targets:
            lin, lout = shapes[target]
            for i in range(L):
                tensors[f"{prefix.format(i)}.A"] = torch.randn(r, lin, generator=g) * 0.2
                tensors[f"{prefix.format(i)}.B"] = torch.randn(lout, r, generator=g) * 0.2
    for key, shape in {"head.dense.weight": (C, C), "head.dense.bias": (C,), "head.out.weight": (K, C),
                       "head.out.bias": (K,)}.items():
        tensors[key] = torch.randn(shape, generator=g) * 0.2
    config = {"kind": "lora", "r": r, "alpha": alpha, "targets": targets, "dropout": 0.05, "use_rslora": rslora}
    return fmt.AdapterFile("mine", config, tensors, num_labels=K, labels=["neg", "neu", "pos"], task="classification")


WRITE_CASES = {
    "query+value+ffn_down": dict(targets=["query", "value", "ffn_down"], r=4, alpha=6.0),
    "six, rslora": dict(targets=SIX, r=3, alpha=5.0, rslora=True),
    "ffn_up alone, fractional alpha": dict(targets=["ffn_up"], r=2, alpha=2.5),
}


@pytest.mark.parametrize("case", WRITE_CASES)
def test_write_loads_in_peft(case, base_dir, inputs, tmp_path):
    f = random_adapter(**WRITE_CASES[case])
    assert fmt.write(tmp_path / "out", f, C, L, base_name=str(base_dir)) == tmp_path / "out"
    cfg = json.loads((tmp_path / "out" / fmt.CONFIG_FILE).read_text())
    assert cfg["base_model_name_or_path"] == str(base_dir) and cfg["task_type"] == "SEQ_CLS"
    model = peft.PeftModel.from_pretrained(load_base(base_dir), tmp_path / "out").eval()
    ids, mask = inputs
    assert max_err(peft_logits(model, ids, mask), reference_logits(base_dir, f, ids, mask)) <= TOL
    back = fmt.read(tmp_path / "out", C, L)
    assert (back.config, back.labels, back.num_labels, back.task) == (f.config, f.labels, K, f.task)
    assert back.tensors.keys() == f.tensors.keys()
    assert all(torch.equal(back.tensors[k], f.tensors[k]) for k in f.tensors)


@pytest.mark.parametrize("change,message", [
    (lambda f: f.config.update(kind="houlsby"), "the peft format holds LoRA adapters only"),
    (lambda f: f.config.update(targets=["query", "pooler"]), "LoRA target 'pooler'"),
    (lambda f: f.tensors.update({"layers.0.attn_adapter.down.weight": torch.zeros(4, C)}), "has no peft name"),
    (lambda f: f.tensors.pop("layers.1.attn.qkv_lora.value.B"), "value.lora_B.weight' is missing"),
    (lambda f: f.tensors.update({"layers.0.attn.qkv_lora.query.A": torch.zeros(4, 32)}), "has shape \\(4, 32\\)"),
    (lambda f: setattr(f, "labels", ["a", "b"]), "labels \\['a', 'b'\\] are not 3 names"),
])
def test_write_refuses_before_writing(base_dir, tmp_path, change, message):
    good_f = random_adapter(["query", "value"], 4, 8.0)
    out = fmt.write(tmp_path / "out", good_f, C, L, base_name="b")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = random_adapter(["query", "value"], 4, 8.0, seed=1)
    change(bad)
    with pytest.raises(CheckpointError, match=message):
        fmt.write(out, bad, C, L, base_name="b")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing half-written, nothing left behind


# ------------------------------------------------------------------------------------------------ the model

@pytest.mark.skipif(not hasattr(Model, "merge_adapter"), reason="needs the model's LoRA (Model.merge_adapter, "
                                                                "load_adapter of peft dirs, save_adapter(format=...))")
def test_model_parity_with_peft(base_dir, inputs, tmp_path):
    peft_model = peft_saved(base_dir, tmp_path / "peft", **READ_CASES["six, rslora"])
    ids, mask = inputs
    model = Model.from_pretrained(base_dir, num_labels=K).eval()
    model.load_adapter(tmp_path / "peft")
    with torch.no_grad():
        ours = model(ids, mask)
    assert max_err(ours, peft_logits(peft_model, ids, mask)) <= TOL
    model.save_adapter(tmp_path / "out", format="peft")
    reloaded = peft.PeftModel.from_pretrained(load_base(base_dir), tmp_path / "out").eval()
    assert max_err(peft_logits(reloaded, ids, mask), ours) <= TOL
