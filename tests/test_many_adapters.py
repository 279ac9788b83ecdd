"""One base, many tasks: named adapters side by side, batches that mix them, and their files.

Every adapter here has trained-looking (random, non-zero) weights, so an example routed to the wrong adapter, or
to none, changes its logits. Three kinds, three label counts: "sentiment" Houlsby (2 labels), "topic" Pfeiffer
(4 labels), "lo" LoRA on five projections (3 labels): every slot of every layer is used by someone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from checkpoints import TINY, save_hf
from roberta_lite import AdapterConfig, CheckpointError, Model
from roberta_lite.model import Adapter, LoRA
from test_parity import TOL, batch

SHAPE = dict(TINY, hidden_size=64, intermediate_size=128,  # 2 layers, 4 heads, 99 tokens
             initializer_range=0.02)  # bf16 comparisons: test_parity's scale, not TINY's large GELU-guarding weights
C, L, FF = SHAPE["hidden_size"], SHAPE["num_hidden_layers"], SHAPE["intermediate_size"]
LORA = AdapterConfig("lora", r=4, alpha=8, targets=("query", "value", "attn_out", "ffn_up", "ffn_down"))
KINDS = {"sentiment": ("houlsby", 2), "topic": (AdapterConfig("pfeiffer", reduction_factor=8), 4), "lo": (LORA, 3)}
MIX = ["sentiment", "topic", "lo", "topic", "sentiment", "lo"]  # every adapter, repeated, interleaved
BF16_REL = 1e-2  # test_parity's bound for a bf16 base against fp32 (relative to the largest |logit|)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("base")
    save_hf(d, "RobertaForSequenceClassification", **SHAPE)
    return d


@pytest.fixture(scope="module")
def still(tmp_path_factory) -> Path:
    """The same base with every dropout off, for exact gradient comparisons in train mode."""
    d = tmp_path_factory.mktemp("still")
    save_hf(d, "RobertaForSequenceClassification", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            **SHAPE)
    return d


def randomize(model: Model, names=None, seed: int = 0):
    """Non-zero weights for the adapters and heads named (default: all), so that each one matters."""
    from roberta_lite.adapters import adapter_tensors

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in names or model.adapter_names:
            for _, p in adapter_tensors(model, name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def many(d: Path, dtype=None, seed: int = 0) -> Model:
    model = Model.from_pretrained(d, dtype=dtype)
    for name, (cfg, k) in KINDS.items():
        model.add_adapter(name, cfg, num_labels=k, labels=[f"{name}{i}" for i in range(k)])
    randomize(model, seed=seed)
    return model.eval()


def inputs(B: int = 6, T: int = 13):
    """Ragged right padding (T, T-5, 7, 2, ...)."""
    ids, mask = batch(SHAPE["vocab_size"], SHAPE["pad_token_id"], B=min(B, 4), T=T)
    reps = -(-B // 4)
    return ids.repeat(reps, 1)[:B], mask.repeat(reps, 1)[:B]


def rows_of(names: list[str], name: str) -> list[int]:
    return [i for i, n in enumerate(names) if n == name]


def snapshot(model: Model) -> dict:
    """Everything a failed call must leave as it was."""
    return {"state": {k: v.clone() for k, v in model.state_dict().items()}, "names": model.adapter_names,
            "active": model.active_adapter, "labels": {n: list(h.labels) for n, h in model.heads.items()},
            "configs": dict(model.adapter_configs)}


def assert_unchanged(model: Model, before: dict):
    after = snapshot(model)
    assert after["names"] == before["names"] and after["active"] == before["active"]
    assert after["labels"] == before["labels"] and after["configs"] == before["configs"]
    assert after["state"].keys() == before["state"].keys()
    changed = [k for k in before["state"] if not torch.equal(before["state"][k], after["state"][k])]
    assert not changed, changed[:3]


# ---------------------------------------------------------------------------------------------- the issue's API

def test_the_issue_walkthrough(ckpt, tmp_path):
    model = Model.from_pretrained(ckpt)
    assert model.adapter_names == [] and model.active_adapter is None
    model.add_adapter("sentiment", "houlsby", num_labels=2, labels=["neg", "pos"])
    model.add_adapter("topic", AdapterConfig("pfeiffer", reduction_factor=8), num_labels=4)
    assert model.adapter_names == ["sentiment", "topic"]
    assert model.active_adapter == "topic" and model.labels == [f"LABEL_{i}" for i in range(4)]
    model.active_adapter = "sentiment"
    assert model.labels == ["neg", "pos"] and model.num_labels == 2
    randomize(model)
    model.freeze_base()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".sentiment." in n for n in trainable), trainable
    ids, mask = inputs(3)
    with torch.no_grad():
        assert model(ids, mask).shape == (3, 2)  # the active adapter
        assert model(ids, mask, adapter="topic").shape == (3, 4)
        mixed = model(ids, mask, adapter=["sentiment", "topic", "sentiment"])
    assert mixed.shape == (3, 4) and torch.isinf(mixed[[0, 2], 2:]).all() and torch.isfinite(mixed[1]).all()

    model.save_adapter(tmp_path / "s", name="sentiment")
    model.save_adapter(tmp_path / "ah", name="sentiment", format="adapterhub")
    model.delete_adapter("topic")
    assert model.adapter_names == ["sentiment"]
    assert not [k for k in model.state_dict() if ".topic." in k], "delete_adapter left tensors behind"
    for src in ("s", "ah"):
        fresh = Model.from_pretrained(ckpt).load_adapter(tmp_path / src)
        assert fresh.adapter_names == ["sentiment"] and fresh.active_adapter == "sentiment"
        assert fresh.labels == ["neg", "pos"]
        with torch.no_grad():
            assert (fresh(ids, mask) - model(ids, mask)).abs().max() <= TOL


# ---------------------------------------------------------------------------------------------- mixed batches

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mixed_batch_equals_each_examples_own_adapter(ckpt, dtype):
    """Each example's logits in a batch mixing Houlsby, Pfeiffer and LoRA equal its logits with its adapter alone.
    Narrower heads are padded with -inf to the widest one's width (softmax: probability 0)."""
    model = many(ckpt, dtype)
    ids, mask = inputs(len(MIX))
    with torch.no_grad():
        mixed = model(ids, mask, adapter=MIX)
        alone = {n: model(ids, mask, adapter=n) for n in KINDS}
        reference = many(ckpt, torch.float32)(ids, mask, adapter=MIX) if dtype == torch.bfloat16 else None
    assert mixed.dtype == torch.float32 and mixed.shape == (len(MIX), 4)
    for name, (_, k) in KINDS.items():
        rows = rows_of(MIX, name)
        assert alone[name].shape == (len(MIX), k)
        got, want = mixed[rows, :k], alone[name][rows]
        if dtype == torch.float32:
            assert (got - want).abs().max() <= 1e-5, name
        else:  # a LoRA example lifts the sum of its projection to fp32 for the whole batch: bf16 rounding differs
            scale = reference[rows, :k].abs().max()
            assert (got - want).abs().max() / scale < BF16_REL, name
            assert (got - reference[rows, :k]).abs().max() / scale < BF16_REL, name
        assert torch.isfinite(got).all()
        assert torch.equal(mixed[rows, k:], torch.full_like(mixed[rows, k:], float("-inf")))
        probs = mixed[rows].softmax(-1)
        assert torch.equal(probs[:, k:], torch.zeros_like(probs[:, k:]))
        assert torch.allclose(probs[:, :k], want.softmax(-1), atol=1e-2 if dtype == torch.bfloat16 else 1e-6)
    # the adapters really differ: routing an example to another adapter would change its logits
    assert (alone["sentiment"][0, :2] - alone["lo"][0, :2]).abs().max() > 1e-2


def test_mixed_encode_equals_each_examples_own_adapter(ckpt):
    model = many(ckpt)
    ids, mask = inputs(len(MIX))
    with torch.no_grad():
        mixed = model.encode(ids, mask, adapter=MIX)
        for name in KINDS:
            rows = rows_of(MIX, name)
            alone = model.encode(ids, mask, adapter=name)
            assert (mixed[rows] - alone[rows])[mask[rows].bool()].abs().max() <= 1e-5, name
            assert (alone - model.encode(ids, mask, adapter="sentiment")).abs().max() > 1e-3 or name == "sentiment"


def test_same_name_for_every_example_is_the_single_adapter_path(ckpt):
    model = many(ckpt)
    ids, mask = inputs(4)
    with torch.no_grad():
        assert torch.equal(model(ids, mask, adapter=["topic"] * 4), model(ids, mask, adapter="topic"))
        model.active_adapter = "topic"
        assert torch.equal(model(ids, mask), model(ids, mask, adapter="topic"))


def test_a_mixed_batch_runs_the_base_once(ckpt):
    """Forward hooks count calls: the embeddings and every base projection run once for the whole mixed batch;
    each adapter module runs once, on its own examples only."""
    model = many(ckpt)
    ids, mask = inputs(len(MIX))
    calls: dict[str, list[int]] = {}

    def hook(name):  # the rows of the module's first input (adapters take theirs by keyword)
        return lambda module, args, kwargs, out: calls.setdefault(name, []).append(
            (args or tuple(kwargs.values()))[0].shape[0])

    base = {"embed": model.embed, **{f"{i}.{p}": m for i, layer in enumerate(model.layers)
                                     for p, m in (("qkv", layer.attn.qkv), ("proj", layer.attn.proj),
                                                  ("up", layer.ffn.up), ("down", layer.ffn.down))}}
    adapters = {n: m for n, m in model.named_modules() if isinstance(m, (Adapter, LoRA))}
    handles = [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in {**base, **adapters}.items()]
    with torch.no_grad():
        model(ids, mask, adapter=MIX)
    for h in handles:
        h.remove()
    for name in base:
        assert calls[name] == [len(MIX)], name
    for name in adapters:  # e.g. layers.0.attn.qkv_lora.lo.query, layers.1.ffn_adapter.topic
        owner = next(n for n in KINDS if f".{n}" in name)
        assert calls[name] == [len(rows_of(MIX, owner))], name
    assert len(adapters) == L * (2 + 1 + 5)  # Houlsby 2, Pfeiffer 1, LoRA 5 targets per layer


def test_training_a_mixed_batch_sends_gradients_only_to_the_adapters_used(still):
    """Train mode, base frozen, every adapter trainable: a batch of sentiment and LoRA examples gives no gradient
    to "topic", and each used adapter's gradient equals the one from its own examples run alone."""
    model = many(still).train()
    model.requires_grad_(False)
    for name in model.adapter_names:
        for p in (p for n, p in model.named_parameters() if f".{name}." in n):
            p.requires_grad_(True)
    names = ["sentiment", "lo", "lo", "sentiment"]
    ids, mask = inputs(4)
    labels = torch.tensor([1, 2, 0, 0])

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    mixed = grads(F.cross_entropy(model(ids, mask, adapter=names), labels, reduction="sum"))
    assert not [n for n in mixed if ".topic." in n], "an adapter outside the batch got a gradient"
    assert not [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    for name in ("sentiment", "lo"):
        rows = rows_of(names, name)
        alone = grads(F.cross_entropy(model(ids[rows], mask[rows], adapter=name), labels[rows], reduction="sum"))
        mine = {n for n, p in model.named_parameters() if f".{name}." in n}
        assert set(alone) == mine and mine <= set(mixed), name
        for n in mine:
            assert torch.allclose(mixed[n], alone[n], atol=1e-5, rtol=1e-4), n
        assert any(mixed[n].abs().max() > 0 for n in mine if n.endswith((".B", "up.weight")))


def test_mixed_training_with_dropout_keeps_unused_adapters_out(ckpt):
    model = many(ckpt).train()
    model.requires_grad_(True)
    names = ["topic", "topic", "sentiment"]
    ids, mask = inputs(3)
    F.cross_entropy(model(ids, mask, adapter=names), torch.tensor([3, 0, 1])).backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert not [n for n in got if ".lo." in n]
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert {n for n, _ in model.named_parameters() if ".topic." in n or ".sentiment." in n} <= got


# ---------------------------------------------------------------------------------------------- freeze_base

def test_freeze_base_trains_exactly_the_active_adapter_and_its_head(ckpt):
    model = many(ckpt)
    head = {k: C * C + C + k * C + k for k in (2, 3, 4)}  # dense + out
    expected = {
        "sentiment": 2 * L * (C * (C // 16) + C // 16 + (C // 16) * C + C) + head[2],  # two per layer, r 16
        "topic": L * (C * (C // 8) + C // 8 + (C // 8) * C + C) + head[4],  # one per layer, r 8
        "lo": L * 3 * (4 * C + C * 4) + L * (4 * C + FF * 4) + L * (4 * FF + C * 4) + head[3],  # q v o: C->C
    }
    total = sum(p.numel() for p in model.parameters())
    for name, count in expected.items():
        model.active_adapter = name
        summary = model.freeze_base()
        trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
        assert sum(trainable.values()) == count, name
        assert all(f".{name}." in n for n in trainable), name
        assert summary.startswith(f"trainable params: {count:,} || all params: {total:,}")


# ---------------------------------------------------------------------------------------------- errors

def test_unknown_adapter_names_are_refused_and_named(ckpt, tmp_path):
    model = many(ckpt)
    ids, mask = inputs(3)
    before = snapshot(model)
    for call in (lambda: model(ids, mask, adapter="nope"), lambda: model(ids, mask, adapter=["lo", "nope", "lo"]),
                 lambda: model.encode(ids, mask, adapter=["nope"] * 3), lambda: model.delete_adapter("nope"),
                 lambda: model.save_adapter(tmp_path / "no", name="nope"), lambda: model.merge_adapter("nope")):
        with pytest.raises(KeyError) as e:
            call()
        assert "'nope'" in str(e.value) and "sentiment, topic, lo" in str(e.value), str(e.value)
    assert not (tmp_path / "no").exists()
    assert_unchanged(model, before)


def test_a_list_of_the_wrong_length_is_refused(ckpt):
    model = many(ckpt)
    ids, mask = inputs(3)
    for names in (["lo", "lo"], ["lo"] * 4, []):
        with pytest.raises(ValueError, match=f"{len(names)} names for a batch of 3 examples"):
            model(ids, mask, adapter=names)


def test_adding_a_name_twice_needs_replace(ckpt):
    model = many(ckpt)
    before = snapshot(model)
    with pytest.raises(ValueError, match="'topic' already exists"):
        model.add_adapter("topic", "houlsby", num_labels=2)
    for bad in ("", "a.b"):
        with pytest.raises(ValueError, match="adapter name"):
            model.add_adapter(bad, "houlsby")
    with pytest.raises(ValueError, match="labels: 3 names for 2 outputs"):
        model.add_adapter("new", "houlsby", num_labels=2, labels=["a", "b", "c"])
    with pytest.raises(ValueError, match="task"):
        model.add_adapter("new", "houlsby", task="ranking")
    assert_unchanged(model, before)
    model.add_adapter("topic", "houlsby", num_labels=2, replace=True)
    assert model.adapter_configs["topic"].kind == "houlsby" and model.heads["topic"].num_labels == 2
    assert all("topic" in layer.attn_adapter for layer in model.layers)  # Houlsby now: both slots
    assert model.active_adapter == "topic"


def test_deleting_an_adapter_removes_exactly_its_tensors(ckpt):
    model = many(ckpt)
    model.active_adapter = "sentiment"
    before = model.state_dict()
    model.delete_adapter("topic")
    after = model.state_dict()
    assert set(before) - set(after) == {k for k in before if ".topic." in k} != set()
    assert all(torch.equal(before[k], after[k]) for k in after)
    assert model.adapter_names == ["sentiment", "lo"] and model.active_adapter == "sentiment"


def test_deleting_the_active_adapter_is_refused(ckpt):
    model = many(ckpt)
    model.active_adapter = "topic"
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="'topic' is the active adapter"):
        model.delete_adapter("topic")
    assert_unchanged(model, before)


def test_activating_an_unknown_adapter_is_refused(ckpt):
    model = many(ckpt)
    with pytest.raises(KeyError, match="'nope' is not in this model"):
        model.active_adapter = "nope"
    assert model.active_adapter == "lo"


# ---------------------------------------------------------------------------------------------- files

FORMATS = {"roberta_lite": "sentiment", "adapterhub": "topic", "peft": "lo"}  # format -> an adapter it can hold
WEIGHTS = {"roberta_lite": "adapter.safetensors", "adapterhub": "adapter.safetensors",
           "peft": "adapter_model.safetensors"}


@pytest.fixture(scope="module")
def files(ckpt, tmp_path_factory) -> dict[str, Path]:
    """One directory per format, each holding a trained-looking adapter for this base."""
    model, root = many(ckpt, seed=7), tmp_path_factory.mktemp("files")
    return {fmt: model.save_adapter(root / fmt, name=name, format=fmt) for fmt, name in FORMATS.items()}


@pytest.fixture(scope="module")
def other_files(tmp_path_factory) -> dict[str, Path]:
    """The same adapters saved on another base (hidden size 32)."""
    d = tmp_path_factory.mktemp("other")
    save_hf(d, "RobertaForSequenceClassification", **dict(SHAPE, hidden_size=32, intermediate_size=64))
    model = many(d, seed=7)
    return {fmt: model.save_adapter(d / fmt, name=name, format=fmt) for fmt, name in FORMATS.items()}


def damage(fmt: str, how: str, src: Path, other: Path, tmp_path: Path) -> Path:
    """A copy of a good adapter directory, damaged one way."""
    d = tmp_path / fmt
    shutil.copytree(other if how == "wrong base" else src, d)
    if how == "corrupt file":
        weights = d / WEIGHTS[fmt]
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "wrong shapes":  # the config now describes a smaller adapter than the tensors hold
        meta = json.loads((d / "adapter_config.json").read_text())
        block, key = {"roberta_lite": ("adapter", "reduction_factor"), "adapterhub": ("config", "reduction_factor"),
                      "peft": (None, "r")}[fmt]
        block = meta[block] if block else meta
        block[key] = block[key] * 2
        (d / "adapter_config.json").write_text(json.dumps(meta))
    return d


@pytest.mark.parametrize("how", ["corrupt file", "wrong base", "wrong shapes"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_a_failed_load_leaves_the_model_exactly_as_it_was(fmt, how, ckpt, files, other_files, tmp_path):
    """Loading over an existing adapter (replace=True) and as a new one: the error names the file, and the model's
    tensors, adapters, active adapter and labels are untouched."""
    model = many(ckpt)
    model.active_adapter = "topic"
    before = snapshot(model)
    d = damage(fmt, how, files[fmt], other_files[fmt], tmp_path)
    for name, replace in ((FORMATS[fmt], True), ("new", False)):
        with pytest.raises((CheckpointError, ValueError)) as e:
            model.load_adapter(d, name=name, replace=replace)
        assert str(d) in str(e.value), str(e.value)
        assert_unchanged(model, before)


@pytest.mark.parametrize("key, value", [("labels", "neg pos"), ("labels", ["only one"]), ("num_labels", "two"),
                                        ("num_labels", 0), ("task", "ranking")])
def test_a_bad_head_record_is_refused_before_anything_changes(key, value, ckpt, files, tmp_path):
    """What a roberta_lite adapter_config.json says of the head is checked with the tensors: a CheckpointError
    naming the directory and the value (a TypeError or a bare ValueError was a traceback in predict's CLI)."""
    d = shutil.copytree(files["roberta_lite"], tmp_path / "bad")
    meta = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**meta, key: value}))
    model = many(ckpt)
    before = snapshot(model)
    with pytest.raises(CheckpointError) as e:
        model.load_adapter(d, name="sentiment", replace=True)
    assert str(d) in str(e.value) and repr(value) in str(e.value), str(e.value)
    assert_unchanged(model, before)


def test_another_base_of_the_same_shape_is_refused_by_fingerprint(ckpt, files, tmp_path):
    save_hf(tmp_path / "twin", "RobertaForSequenceClassification", seed=1, **SHAPE)
    model = many(tmp_path / "twin")
    before = snapshot(model)
    with pytest.raises(CheckpointError, match="fingerprint"):
        model.load_adapter(files["roberta_lite"], name="sentiment", replace=True)
    assert_unchanged(model, before)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_a_loaded_name_that_is_taken_needs_replace(fmt, ckpt, files):
    model = many(ckpt)
    before = snapshot(model)
    with pytest.raises(ValueError, match="already exists"):
        model.load_adapter(files[fmt], name=FORMATS[fmt])
    assert_unchanged(model, before)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_loading_beside_other_adapters_adds_one_and_keeps_the_rest(fmt, ckpt, files):
    model, saved = many(ckpt), many(ckpt, seed=7)
    ids, mask = inputs(len(MIX))
    with torch.no_grad():
        before = model(ids, mask, adapter=MIX)
        model.load_adapter(files[fmt], name="loaded")
        assert model.adapter_names == [*KINDS, "loaded"] and model.active_adapter == "loaded"
        assert torch.equal(model(ids, mask, adapter=MIX), before)
        want = saved(ids, mask, adapter=FORMATS[fmt])
        assert (model(ids, mask) - want).abs().max() <= TOL
        assert (model(ids, mask, adapter=["loaded", *MIX[1:]])[0, :want.shape[1]] - want[0]).abs().max() <= TOL


def test_the_default_name_and_the_single_adapter_round_trip(ckpt, tmp_path):
    """from_pretrained(adapter=cfg) gives one adapter named "default", saved and loaded back under that name,
    as before named adapters; a second shorthand add replaces it."""
    model = Model.from_pretrained(ckpt, adapter=AdapterConfig("pfeiffer", reduction_factor=4), num_labels=3)
    assert model.adapter_names == ["default"] and model.active_adapter == "default"
    randomize(model)
    model.labels = ["a", "b", "c"]
    model.save_adapter(tmp_path / "one")
    assert json.loads((tmp_path / "one" / "adapter_config.json").read_text())["name"] == "default"
    fresh = Model.from_pretrained(ckpt).load_adapter(tmp_path / "one")
    assert fresh.adapter_names == ["default"] and fresh.labels == ["a", "b", "c"]
    ids, mask = inputs(4)
    with torch.no_grad():
        assert torch.equal(fresh(ids, mask), model(ids, mask))
        assert torch.equal(fresh.adapter_state_dict()["head.out.weight"], model.adapter_state_dict()["head.out.weight"])
    fresh.add_adapter("houlsby")  # shorthand: replaces "default"
    assert fresh.adapter_names == ["default"] and fresh.adapter_config.kind == "houlsby"


def test_merged_lora_serves_only_its_own_examples(ckpt):
    model = many(ckpt)
    ids, mask = inputs(len(MIX))
    with torch.no_grad():
        want = model(ids, mask, adapter="lo")
        model.merge_adapter("lo")
        assert (model(ids, mask, adapter=["lo"] * len(MIX)) - want).abs().max() <= 1e-5
        with pytest.raises(RuntimeError, match="'lo' is merged"):
            model(ids, mask, adapter=MIX)
        model.unmerge_adapter()
        assert torch.equal(model(ids, mask, adapter="lo"), want)


# ---------------------------------------------------------------------------------------------- predict

TEXTS = ["a wonderful film", "the plot was dull and boring", "it is quite moving really"]


def trained_adapter(base: Path, out: Path, kind, labels: list[str], seed: int) -> Path:
    """What train.py leaves: one adapter named "default" with its labels, saved beside nothing else."""
    model = Model.from_pretrained(base)
    model.add_adapter("default", kind, num_labels=len(labels), labels=labels)
    randomize(model, seed=seed)
    return model.save_adapter(out)


@pytest.fixture(scope="module")
def task_dirs(tiny_roberta, tmp_path_factory) -> dict[str, Path]:
    from conftest import save_tiny_roberta

    root = tmp_path_factory.mktemp("tasks")
    other = save_tiny_roberta(root / "other-base", seed=1)
    return {"sentiment": trained_adapter(tiny_roberta, root / "sentiment", "houlsby", ["neg", "pos"], 1),
            "topic": trained_adapter(tiny_roberta, root / "topic", LORA, ["film", "plot", "acting"], 2),
            "elsewhere": trained_adapter(other, root / "elsewhere", "pfeiffer", ["a", "b"], 3)}


def test_predictor_runs_every_adapter_in_the_same_passes(task_dirs):
    from roberta_lite.predict import Predictor

    both = Predictor([task_dirs["sentiment"], task_dirs["topic"]], device="cpu", precision="fp32")
    rows = []
    both.model.embed.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    results = both(TEXTS, batch_size=4)  # 2 texts x 2 adapters per pass
    assert rows == [4, 2], "each pass holds every adapter's rows for its texts"
    for name in ("sentiment", "topic"):
        alone = Predictor(task_dirs[name], device="cpu", precision="fp32")(TEXTS)
        for got, want in zip(results, alone):
            mine = got[str(task_dirs[name])]
            assert mine["label"] == want["label"] and mine["probabilities"].keys() == want["probabilities"].keys()
            assert all(abs(mine["probabilities"][k] - v) <= 2e-6 for k, v in want["probabilities"].items())
    assert len({r[str(task_dirs["topic"])]["probability"] for r in results}) > 1  # the texts really differ


def test_cli_prints_one_line_per_text_with_every_adapter(task_dirs, capsys):
    from roberta_lite import predict

    s, t = str(task_dirs["sentiment"]), str(task_dirs["topic"])
    assert predict.main(["--adapter", s, "--adapter", t, "--device", "cpu", "--precision", "fp32", *TEXTS]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["text"] for line in lines] == TEXTS
    for line in lines:
        assert line.keys() == {"text", "adapters"} and list(line["adapters"]) == [s, t]
        assert set(line["adapters"][s]["probabilities"]) == {"neg", "pos"}
        assert set(line["adapters"][t]["probabilities"]) == {"film", "plot", "acting"}
        for result in line["adapters"].values():
            assert result["probability"] == max(result["probabilities"].values())
            assert result["label"] == max(result["probabilities"], key=result["probabilities"].get)
    # one adapter: the output as it always was
    assert predict.main(["--adapter", s, "--device", "cpu", "--precision", "fp32", TEXTS[0]]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line.keys() == {"text", "label", "probability", "probabilities"} and line["label"] in ("neg", "pos")


@pytest.mark.parametrize("which", ["other base", "same directory twice"])
def test_cli_refuses_adapters_that_cannot_run_together(which, task_dirs, capsys, monkeypatch):
    """Checked from the adapters' records before any model is loaded; one line, exit 2."""
    from roberta_lite import predict

    monkeypatch.setattr(predict.Model, "from_pretrained", lambda *a, **k: pytest.fail("loaded a model"))
    s = str(task_dirs["sentiment"])
    second = str(task_dirs["elsewhere"]) if which == "other base" else s + "/"
    assert predict.main(["--adapter", s, "--adapter", second, "--device", "cpu", "text"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --adapter ") and err.count("\n") == 1 and "Traceback" not in err
    assert second in err and s in err
    assert ("share one base" in err) == (which == "other base")


def test_a_mixed_batch_keeps_no_more_for_backward_than_one_adapter(ckpt):
    """Training memory: a batch mixing adapters saves for backward what the same batch with one adapter saves (the
    adapters' inputs, nothing more). Slot's out-of-place index_add kept every adapter's output until backward and
    allocated a new (B, T, C) sum per adapter: on roberta-base, 8 x 256, 8 Houlsby adapters, 138 MB more saved and
    a 0.9 GB higher peak than one adapter."""
    model = Model.from_pretrained(ckpt)
    for name in ("a", "b", "c"):
        model.add_adapter(name, "houlsby")
    model.train().set_dropout(hidden=0.0, attention=0.0)
    ids, mask = inputs(6)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_bytes(adapter):
        seen = {}

        def pack(t):
            key = t.untyped_storage().data_ptr()
            if key not in params:
                seen[key] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.encode(ids, mask, adapter=adapter).sum()
        return sum(seen.values())

    one, mixed = saved_bytes("a"), saved_bytes(["a", "b", "c", "a", "b", "c"])
    assert mixed <= one + 1024, (mixed, one)  # + the routes' index tensors, a few bytes each
