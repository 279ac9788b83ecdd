"""AdapterHub tagging heads (token classification) both ways against the `adapters` library, and token heads in the
native and peft formats (peft's TOKEN_CLS task).

The tiny random base, the library's models and the helpers are test_adapterhub's; every weight of the adapter and
the head is random (std 0.5), so a transposed, misplaced or unused tensor shows in the per-token logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

adapters = pytest.importorskip("adapters")

from checkpoints import save_hf  # noqa: E402
from roberta_lite import AdapterConfig, CheckpointError, Model  # noqa: E402
from roberta_lite.formats import adapterhub as ah  # noqa: E402
from test_adapterhub import (C, HUB, L, copy_of, edit_json, hub_logits, inputs, library_config,  # noqa: E402
                             ours, randomize, refused, set_config)
from test_parity import TOL, max_diff  # noqa: E402

TAGS = ["O", "B-person", "I-person", "B-loc", "I-loc"]
K = len(TAGS)
TOKEN = "token-classification"
FIGURES: dict[str, tuple[float, float]] = {}  # test id -> (max |logit difference|, max |logit|) over real tokens


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tag-base")
    save_hf(d, "RobertaModel", **HUB)
    return d


def tagging_model(base: Path, config, name: str = "ner", seed: int = 0, **head):
    """adapters' RobertaAdapterModel with adapter + tagging head `name` (add_tagging_head), every weight random."""
    m = adapters.AutoAdapterModel.from_pretrained(str(base))
    m.add_adapter(name, config=config)
    m.add_tagging_head(name, num_labels=K, id2label=dict(enumerate(TAGS)), **head)
    m.set_active_adapters(name)
    randomize(m, (f"adapters.{name}.", f"heads.{name}."), seed)
    return m.eval()


def token_logits(model: Model, ids, mask, adapter=None) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, mask, adapter=adapter)


def our_tagger(base: Path, kind: str, act: str = "relu", name: str = "ours", seed: int = 5) -> Model:
    """roberta_lite's Model with a bottleneck adapter and a random token head (K tags)."""
    model = Model.from_pretrained(base)
    model.add_adapter(name, AdapterConfig(kind=kind, reduction_factor=4, activation=act), num_labels=K, labels=TAGS,
                      task=TOKEN)
    randomize(model, ("_adapter.", "heads."), seed)
    return model.eval()


# ---------------------------------------------------------------------------------------------- adapters -> ours

@pytest.mark.parametrize("kind, act, safe", [("houlsby", "relu", False), ("houlsby", "swish", True),
                                             ("pfeiffer", "gelu", True), ("pfeiffer", "tanh", False)])
def test_read_parity(base, tmp_path, kind, act, safe, request):
    """A double_seq_bn / seq_bn adapter with add_tagging_head, saved by save_adapter(with_head=True): same (B, T, K)."""
    m = tagging_model(base, library_config(kind, act))
    m.save_adapter(str(tmp_path), "ner", with_head=True, use_safetensors=safe)
    head = json.loads((tmp_path / ah.HEAD_CONFIG).read_text())["config"]
    assert (head["head_type"], head["layers"], head["label2id"]) == ("tagging", 1, {t: i for i, t in enumerate(TAGS)})

    f = ah.read(tmp_path, C, L)
    assert (f.name, f.config, f.num_labels, f.labels, f.task) == \
        ("ner", {"kind": kind, "reduction_factor": 8, "activation": act}, K, TAGS, TOKEN)
    assert sorted(k for k in f.tensors if k.startswith("head.")) == ["head.out.bias", "head.out.weight"]
    ids, mask = inputs()
    theirs = hub_logits(m, ids, mask)
    mine = token_logits(ours(base, f), ids, mask)
    assert mine.shape == theirs.shape == (*ids.shape, K) and mine.dtype == torch.float32
    err = max_diff(theirs, mine, mask)
    FIGURES[request.node.name] = err, theirs[mask.bool()].abs().max().item()
    assert err <= TOL


def test_load_adapter_gives_a_token_head(base, tmp_path):
    """Model.load_adapter on the library's directory: the adapter's head is a TokenHead with the file's tags."""
    m = tagging_model(base, "double_seq_bn")
    m.save_adapter(str(tmp_path), "ner", with_head=True)
    model = Model.from_pretrained(base).load_adapter(tmp_path).eval()
    head = model.heads["ner"]
    assert (type(head).__name__, head.task, head.labels, head.num_labels) == ("TokenHead", TOKEN, TAGS, K)
    assert model.active_adapter == "ner" and model.active_head.task == TOKEN
    assert torch.equal(head.out.weight.detach(), m.heads["ner"][1].weight.detach())
    ids, mask = inputs()
    assert max_diff(hub_logits(m, ids, mask), token_logits(model, ids, mask), mask) <= TOL


def test_mixed_batch_of_loaded_taggers(base, tmp_path):
    """Two library taggers with different tag sets in one batch: each row is its own adapter's logits, the narrower
    head padded with -inf; a library classification adapter in the same batch is refused (model.RoBERTa's answer)."""
    from test_adapterhub import hub_model

    tagging_model(base, "double_seq_bn", name="ner", seed=1).save_adapter(str(tmp_path / "ner"), "ner")
    m = adapters.AutoAdapterModel.from_pretrained(str(base))
    m.add_adapter("pos", config="seq_bn")
    m.add_tagging_head("pos", num_labels=2, id2label={0: "NOUN", 1: "VERB"})
    randomize(m, ("adapters.pos.", "heads.pos."), seed=2)
    m.save_adapter(str(tmp_path / "pos"), "pos")
    hub_model(base, library_config("pfeiffer", "relu"), name="sst").save_adapter(str(tmp_path / "sst"), "sst")
    model = Model.from_pretrained(base)
    for name in ("ner", "pos", "sst"):
        model.load_adapter(tmp_path / name)
    model.eval()
    ids, mask = inputs()
    rows = ["pos", "ner", "ner", "pos"]
    mixed = token_logits(model, ids, mask, adapter=rows)
    assert mixed.shape == (*ids.shape, K)
    for i, name in enumerate(rows):
        own = token_logits(model, ids[i:i + 1], mask[i:i + 1], adapter=name)[0]
        width = own.shape[-1]
        assert max_diff(mixed[i:i + 1, :, :width], own[None], mask[i:i + 1]) <= TOL
        assert bool((mixed[i, :, width:] == float("-inf")).all())
    with pytest.raises(ValueError, match="token and sentence"):
        model(ids, mask, adapter=["ner", "sst", "ner", "pos"])


def test_static_token_head(base, tmp_path, request):
    """adapters.init(RobertaForTokenClassification): the head is transformers' own classifier.weight / .bias."""
    from transformers import RobertaForTokenClassification

    m = RobertaForTokenClassification.from_pretrained(str(base), num_labels=K)
    adapters.init(m)
    m.add_adapter("ner", config=library_config("pfeiffer", "relu"))
    m.set_active_adapters("ner")
    randomize(m, ("adapters.ner.", "classifier."), seed=3)
    m.eval()
    m.save_adapter(str(tmp_path), "ner", with_head=True, use_safetensors=True)
    assert json.loads((tmp_path / ah.HEAD_CONFIG).read_text())["model_class"] == "RobertaForTokenClassification"
    f = ah.read(tmp_path, C, L)
    assert (f.num_labels, f.labels, f.task) == (K, [f"LABEL_{i}" for i in range(K)], TOKEN)
    ids, mask = inputs()
    theirs = hub_logits(m, ids, mask)
    err = max_diff(theirs, token_logits(ours(base, f), ids, mask), mask)
    FIGURES[request.node.name] = err, theirs[mask.bool()].abs().max().item()
    assert err <= TOL


# ---------------------------------------------------------------------------------------------- ours -> adapters

@pytest.mark.parametrize("kind, act", [("houlsby", "relu"), ("pfeiffer", "gelu_new"), ("houlsby", "tanh")])
def test_write_parity(base, tmp_path, kind, act, request):
    """Model.save_adapter(format="adapterhub"); adapters' plain load_adapter(dir) builds a TaggingHead that computes
    what our model does, with our tags as its id2label."""
    model = our_tagger(base, kind, act)
    model.save_adapter(tmp_path, "ours", format="adapterhub")
    m = adapters.AutoAdapterModel.from_pretrained(str(base))
    name = m.load_adapter(str(tmp_path))
    m.set_active_adapters(name)
    head = m.heads[name]
    assert name == "ours" and type(head).__name__ == "TaggingHead"
    assert head.config["label2id"] == {t: i for i, t in enumerate(TAGS)}
    assert m.get_labels_dict("ours") == dict(enumerate(TAGS))
    ids, mask = inputs()
    mine = token_logits(model, ids, mask)
    theirs = hub_logits(m.eval(), ids, mask, head="ours")
    assert theirs.shape == mine.shape == (*ids.shape, K)
    err = max_diff(mine, theirs, mask)
    FIGURES[request.node.name] = err, theirs[mask.bool()].abs().max().item()
    assert err <= TOL


def test_written_head_config_is_the_library_config(base, tmp_path):
    """head_config.json's "config" block is what add_tagging_head's TaggingHead saves, key for key."""
    our_tagger(base, "pfeiffer").save_adapter(tmp_path / "ours", "ours", format="adapterhub")
    tagging_model(base, "seq_bn", name="ours").save_adapter(str(tmp_path / "theirs"), "ours", with_head=True)
    mine, theirs = (json.loads((tmp_path / d / ah.HEAD_CONFIG).read_text()) for d in ("ours", "theirs"))
    assert mine["config"] == theirs["config"]
    assert {k: mine[k] for k in ("model_class", "model_type", "name", "hidden_size")} == \
        {k: theirs[k] for k in ("model_class", "model_type", "name", "hidden_size")}


def test_round_trip(base, tmp_path):
    """ours -> adapters' load_adapter -> adapters' own save_adapter -> ours: the same tensors, tags and task."""
    model = our_tagger(base, "houlsby", "swish")
    model.save_adapter(tmp_path / "ours", "ours", format="adapterhub")
    m = adapters.AutoAdapterModel.from_pretrained(str(base))
    m.load_adapter(str(tmp_path / "ours"))
    m.save_adapter(str(tmp_path / "theirs"), "ours", with_head=True)
    g = ah.read(tmp_path / "theirs", C, L)
    mine = model.adapter_state_dict("ours")
    assert (g.name, g.num_labels, g.labels, g.task) == ("ours", K, TAGS, TOKEN)
    assert g.tensors.keys() == mine.keys() and all(torch.equal(g.tensors[k], mine[k]) for k in mine)


def test_key_table_is_what_the_library_saves(base):
    for kind in ("pfeiffer", "houlsby"):
        m = tagging_model(base, library_config(kind, "relu", rf=4), name="wnut-16")
        theirs = {k for k in m.state_dict() if ".adapters.wnut-16." in k or k.startswith("heads.wnut-16.")}
        shapes = ah.expected_shapes({"kind": kind, "reduction_factor": 4}, K, C, L, TOKEN)
        assert {ah.their_key(k, "wnut-16", keys=ah.key_table(TOKEN) if k.startswith("head.") else ah.KEYS)
                for k in shapes} == theirs


def test_tagging_options_cover_the_library(base):
    """Every option TaggingHead takes or saves is decided on (must-be or free): a new one is not silently accepted."""
    import inspect

    taken = set(inspect.signature(adapters.TaggingHead.__init__).parameters) - {"self", "model", "head_name"}
    saved = set(tagging_model(base, "seq_bn").heads["ner"].config)
    assert taken | saved == ah.TAGGING_HEAD_KEYS and saved == ah.TAGGING_HEAD_KEYS - {"id2label"}


# ---------------------------------------------------------------------------------------------- refusals

@pytest.fixture(scope="module")
def saved(base, tmp_path_factory) -> dict[str, Path]:
    """One valid directory (houlsby adapter + tagging head, safetensors), as copy_of expects."""
    d = tmp_path_factory.mktemp("tagging")
    tagging_model(base, "double_seq_bn").save_adapter(str(d), "ner", with_head=True, use_safetensors=True)
    return {"houlsby": d}


@pytest.mark.parametrize("changes, key", [
    (dict(layers=2), "'layers' = 2"),  # a Linear(C, C) and tanh before the output: not a TokenHead
    (dict(layers=2, activation_function=None), "'layers' = 2"),
    (dict(layers=0), "'layers' = 0"),
    (dict(use_pooler=False), "'use_pooler'"),  # ClassificationHead options TaggingHead does not take
    (dict(bias=True), "'bias'"),
    (dict(label2id={"O": 0, "B-x": 0}), "'label2id'"),
    (dict(num_labels=True), "'num_labels'"),
])
def test_refused_tagging_head(saved, tmp_path, changes, key):
    d = copy_of(saved, "houlsby", tmp_path)
    set_config(d, ah.HEAD_CONFIG, **changes)
    refused(d, "head_config.json", key)


def test_layers_2_saved_by_the_library_is_refused(base, tmp_path):
    """add_tagging_head(layers=2) as the library saves it: refused by its option, before any tensor is read."""
    tagging_model(base, "seq_bn", layers=2).save_adapter(str(tmp_path), "ner", with_head=True)
    refused(tmp_path, "head_config.json", "'layers' = 2", "Linear(C, K)")


def test_tagging_head_weights_must_match(saved, tmp_path):
    """More tags in the config than in the weights, and a classification head's keys under a tagging config."""
    from safetensors.torch import load_file, save_file

    d = copy_of(saved, "houlsby", tmp_path)
    set_config(d, ah.HEAD_CONFIG, num_labels=K + 1, label2id={**{t: i for i, t in enumerate(TAGS)}, "B-org": K})
    refused(d, "model_head.safetensors", "'heads.ner.1.", "has shape", f"expected ({K + 1}")

    d = copy_of(saved, "houlsby", tmp_path / "b")
    sd = load_file(str(d / "model_head.safetensors"))
    sd["heads.ner.4.weight"] = torch.zeros(K, C)
    save_file(sd, str(d / "model_head.safetensors"))
    refused(d, "model_head.safetensors", "'heads.ner.4.weight'", "unexpected")


def test_a_refused_load_leaves_the_model_unchanged(base, saved, tmp_path):
    d = copy_of(saved, "houlsby", tmp_path)
    set_config(d, ah.HEAD_CONFIG, layers=2)
    model = Model.from_pretrained(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError):
        model.load_adapter(d)
    assert model.adapter_names == [] and model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_write_refuses(base, tmp_path):
    """A LoRA adapter has no AdapterHub form; a token head whose tags are not distinct is refused before writing."""
    model = Model.from_pretrained(base)
    model.add_adapter("lo", "lora", num_labels=K, labels=TAGS, task=TOKEN)
    with pytest.raises(ValueError, match="kind"):
        model.save_adapter(tmp_path / "lo", "lo", format="adapterhub")
    f = ah.AdapterFile("x", {"kind": "pfeiffer", "reduction_factor": 4, "activation": "relu"},
                       our_tagger(base, "pfeiffer").adapter_state_dict("ours"), K, ["O"] * K, TOKEN)
    with pytest.raises(ValueError, match="labels"):
        ah.write(tmp_path / "dup", f, C, L, base_name="b")
    with pytest.raises(ValueError, match="head.dense"):  # a sentence head's tensors are not a token head's
        ah.write(tmp_path / "dense", ah.AdapterFile(**{**f.__dict__, "labels": TAGS,
                                                       "tensors": {**f.tensors, "head.dense.bias": torch.zeros(C)}}),
                 C, L, base_name="b")
    assert not (tmp_path / "lo" / ah.CONFIG).exists()
    assert not (tmp_path / "dup").exists() and not (tmp_path / "dense").exists()  # refused before a byte is written


# ---------------------------------------------------------------------------------------------- other formats

def test_native_round_trip(base, tmp_path):
    """roberta_lite's own format records the task: a token head comes back as one, computing the same logits."""
    model = our_tagger(base, "houlsby")
    model.save_adapter(tmp_path, "ours")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task"] == TOKEN
    again = Model.from_pretrained(base).load_adapter(tmp_path).eval()
    assert (type(again.active_head).__name__, again.active_head.labels) == ("TokenHead", TAGS)
    ids, mask = inputs()
    assert torch.equal(token_logits(model, ids, mask), token_logits(again, ids, mask))


@pytest.fixture(scope="module")
def token_base(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("token-base")
    save_hf(d, "RobertaForTokenClassification", **HUB, num_labels=K)
    return d


def peft_token_model(token_base: Path, seed: int = 0):
    """peft's LoRA (TOKEN_CLS) on RobertaForTokenClassification, LoRA and classifier random."""
    peft = pytest.importorskip("peft")
    from transformers import RobertaForTokenClassification

    base = RobertaForTokenClassification.from_pretrained(str(token_base)).eval()
    m = peft.get_peft_model(base, peft.LoraConfig(task_type="TOKEN_CLS", r=4, lora_alpha=8,
                                                  target_modules=["query", "value", "intermediate.dense"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return m.eval()


def test_peft_token_cls_read(token_base, tmp_path, request):
    from roberta_lite.formats import peft as pf

    m = peft_token_model(token_base)
    m.save_pretrained(tmp_path)
    f = pf.read(tmp_path, C, L)
    assert (f.num_labels, f.task, sorted(k for k in f.tensors if k.startswith("head."))) == \
        (K, TOKEN, ["head.out.bias", "head.out.weight"])
    model = Model.from_pretrained(token_base).load_adapter(tmp_path).eval()
    assert type(model.active_head).__name__ == "TokenHead"
    ids, mask = inputs()
    theirs = hub_logits(m, ids, mask)
    err = max_diff(theirs, token_logits(model, ids, mask), mask)
    FIGURES[request.node.name] = err, theirs[mask.bool()].abs().max().item()
    assert err <= TOL


def test_peft_token_cls_write(token_base, tmp_path, request):
    """Ours -> peft: task_type TOKEN_CLS, the head as classifier.weight/.bias; PeftModel.from_pretrained agrees."""
    peft = pytest.importorskip("peft")
    from transformers import RobertaForTokenClassification

    model = Model.from_pretrained(token_base)
    model.add_adapter("lo", AdapterConfig(kind="lora", r=4, alpha=8, targets=("query", "value", "ffn_down")),
                      num_labels=K, labels=TAGS, task=TOKEN)
    randomize(model, ("_lora.", "heads."), seed=9)
    model.eval().save_adapter(tmp_path, "lo", format="peft")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (cfg["task_type"], cfg["modules_to_save"]) == ("TOKEN_CLS", ["classifier"])
    m = peft.PeftModel.from_pretrained(RobertaForTokenClassification.from_pretrained(str(token_base)), str(tmp_path))
    ids, mask = inputs()
    theirs = hub_logits(m.eval(), ids, mask)
    err = max_diff(token_logits(model, ids, mask), theirs, mask)
    FIGURES[request.node.name] = err, theirs[mask.bool()].abs().max().item()
    assert err <= TOL
    again = Model.from_pretrained(token_base).load_adapter(tmp_path)
    assert (again.active_head.task, again.active_head.labels) == (TOKEN, TAGS)


def test_peft_sentence_head_under_token_cls_is_refused(token_base, tmp_path):
    """A TOKEN_CLS config over a sentence classifier's tensors (classifier.dense / out_proj): the key is named."""
    from roberta_lite.formats import peft as pf

    m = peft_token_model(token_base)
    m.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tmp_path / "adapter_model.safetensors"))
    sd["base_model.model.classifier.out_proj.weight"] = sd.pop("base_model.model.classifier.weight")
    save_file(sd, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="'base_model.model.classifier.out_proj.weight'.*TOKEN_KEYS"):
        pf.read(tmp_path, C, L)


def test_print_figures():
    """Run with -s to see the parity figures of this session (max |logit difference| and max |logit| per test)."""
    for name, (err, size) in sorted(FIGURES.items()):
        print(f"{name}: {err:.2e} (max |logit| {size:.1f})")
