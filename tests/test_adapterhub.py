"""AdapterHub directories: what the `adapters` library saves, we read and compute identically, and back again."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

adapters = pytest.importorskip("adapters")

from checkpoints import TINY, save_hf  # noqa: E402
from roberta_lite import AdapterConfig, CheckpointError, Model  # noqa: E402
from roberta_lite import formats  # noqa: E402
from roberta_lite.formats import adapterhub as ah  # noqa: E402
from test_parity import TOL, batch, max_diff  # noqa: E402

HUB = dict(TINY, hidden_size=64, intermediate_size=128)  # 2 layers, 4 heads
C, L = HUB["hidden_size"], HUB["num_hidden_layers"]
LABELS = ["neg", "neu", "pos"]
ACTS = ["relu", "swish", "gelu", "tanh"]
FIGURES: dict[str, float] = {}  # test id -> max |logit difference|, printed with -s


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A random transformers RobertaModel, saved as users' checkpoints are: both sides load it."""
    d = tmp_path_factory.mktemp("base")
    save_hf(d, "RobertaModel", **HUB)
    return d


def library_config(kind: str, act: str, rf: int = 8):
    cls = {"pfeiffer": adapters.SeqBnConfig, "houlsby": adapters.DoubleSeqBnConfig}[kind]
    return cls(reduction_factor=rf, non_linearity=act)


def hub_model(base: Path, config, name: str = "a1", seed: int = 0):
    """adapters' RobertaAdapterModel on `base` with adapter + classification head `name`, every weight random."""
    m = adapters.AutoAdapterModel.from_pretrained(str(base))
    m.add_adapter(name, config=config)
    m.add_classification_head(name, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)))
    m.set_active_adapters(name)
    randomize(m, (f"adapters.{name}.", f"heads.{name}."), seed)
    return m.eval()


def randomize(module: torch.nn.Module, parts: tuple[str, ...], seed: int):
    """std 0.5: far from init, large enough that the activation's shape shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if any(part in n for part in parts):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def hub_logits(m, ids, mask, head: str | None = None) -> torch.Tensor:
    with torch.no_grad():
        out = m(input_ids=ids, attention_mask=mask, **({"head": head} if head else {}))
    return out.logits


def ours(base: Path, f: ah.AdapterFile) -> Model:
    """roberta_lite's Model with f's adapter and head, added through the same checks as load_adapter."""
    model = Model.from_pretrained(base)
    formats.add(model, formats.check(model, f, base))
    return model.eval()


def our_logits(model: Model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, mask)


def inputs():
    return batch(HUB["vocab_size"], HUB["pad_token_id"])


def edit_json(path: Path, **changes):
    """Set (or, with value ..., delete) keys of a JSON file's top level."""
    meta = json.loads(path.read_text())
    for k, v in changes.items():
        meta.pop(k, None) if v is ... else meta.__setitem__(k, v)
    path.write_text(json.dumps(meta))


# ---------------------------------------------------------------------------------------------- adapters -> ours

@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("kind", ["pfeiffer", "houlsby"])
def test_read_parity(base, tmp_path, kind, act, request):
    """Pfeiffer saved as safetensors, Houlsby with save_adapter's default pytorch_*.bin (read with weights_only)."""
    m = hub_model(base, library_config(kind, act))
    safe = kind == "pfeiffer"
    m.save_adapter(str(tmp_path), "a1", use_safetensors=safe)
    assert (tmp_path / ("adapter.safetensors" if safe else "pytorch_adapter.bin")).is_file()
    assert not (tmp_path / ("pytorch_adapter.bin" if safe else "adapter.safetensors")).exists()

    f = ah.read(tmp_path, C, L)
    assert (f.name, f.config, f.num_labels, f.labels, f.task) == \
        ("a1", {"kind": kind, "reduction_factor": 8, "activation": act}, 3, LABELS, "classification")
    ids, mask = inputs()
    err = max_diff(hub_logits(m, ids, mask), our_logits(ours(base, f), ids, mask), mask)
    FIGURES[request.node.name] = err
    assert err <= TOL


def test_static_head(base, tmp_path, request):
    """adapters.init(RobertaForSequenceClassification): the head is transformers' own classifier.* tensors."""
    from transformers import RobertaForSequenceClassification

    m = RobertaForSequenceClassification.from_pretrained(str(base), num_labels=2)
    adapters.init(m)
    m.add_adapter("a1", config=library_config("houlsby", "tanh"))
    m.set_active_adapters("a1")
    randomize(m, ("adapters.a1.", "classifier."), seed=3)
    m.eval()
    m.save_adapter(str(tmp_path), "a1", use_safetensors=True)
    f = ah.read(tmp_path, C, L)
    assert (f.num_labels, f.labels, f.task) == (2, ["LABEL_0", "LABEL_1"], "classification")
    ids, mask = inputs()
    err = max_diff(hub_logits(m, ids, mask), our_logits(ours(base, f), ids, mask), mask)
    FIGURES[request.node.name] = err
    assert err <= TOL


@pytest.fixture(scope="module")
def old_gelu(base, tmp_path_factory):
    """A file as adapter-transformers v1 wrote it: no "version" key, and "gelu" meaning the tanh approximation."""
    d = tmp_path_factory.mktemp("old-gelu")
    m = hub_model(base, library_config("houlsby", "gelu_new"))
    m.save_adapter(str(d), "a1")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["config"]["non_linearity"] = "gelu"
    del cfg["version"]
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d, m


def test_old_config_gelu_is_tanh_approximation(base, old_gelu, monkeypatch, request):
    d, m = old_gelu
    ids, mask = inputs()
    reference = hub_logits(m, ids, mask)
    reloaded = adapters.AutoAdapterModel.from_pretrained(str(base))
    reloaded.set_active_adapters(reloaded.load_adapter(str(d)))
    assert max_diff(reference, hub_logits(reloaded.eval(), ids, mask, head="a1"), mask) <= TOL  # the library renames

    f = ah.read(d, C, L)
    assert f.config["activation"] == "gelu_new"
    err = max_diff(reference, our_logits(ours(base, f), ids, mask), mask)
    FIGURES[request.node.name] = err
    assert err <= TOL
    exact = our_logits(ours(base, ah.AdapterFile(**{**f.__dict__, "config": {**f.config, "activation": "gelu"}})),
                       ids, mask)
    assert max_diff(reference, exact, mask) > 3 * TOL  # the two GELUs are told apart at this tolerance


@pytest.mark.parametrize("version, act, want", [(..., "gelu_orig", "gelu"), ("adapters.1.3.0", "gelu", "gelu"),
                                               ("adapters.1.3.0", "gelu_new", "gelu_new"), (..., "ReLU", "relu"),
                                               ("adapters.1.3.0", "silu", "swish")])
def test_activation_names(old_gelu, tmp_path, version, act, want):
    """The rename applies only without a "version" key; names are lower-cased as Activation_Function_Class does."""
    d = tmp_path / "a"
    shutil.copytree(old_gelu[0], d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["config"]["non_linearity"] = act
    cfg.pop("version", None) if version is ... else cfg.__setitem__("version", version)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    assert ah.read(d, C, L).config["activation"] == want


@pytest.mark.parametrize("legacy", ["task", "lang"])
def test_legacy_key_names(base, tmp_path, legacy):
    """adapter-transformers 1.x names (attention_text_task_adapters, ...) read as the current ones, as adapters does."""
    m = hub_model(base, library_config("houlsby", "relu"))
    m.save_adapter(str(tmp_path / "new"), "a1")
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    sd = torch.load(tmp_path / "new" / "pytorch_adapter.bin", weights_only=True)
    old = {k.replace("attention.output.adapters.", f"attention.output.attention_text_{legacy}_adapters.")
           .replace(".output.adapters.", f".output.layer_text_{legacy}_adapters."): v for k, v in sd.items()}
    assert all("_adapters." in k and ".adapters." not in k for k in old)
    torch.save(old, tmp_path / "old" / "pytorch_adapter.bin")

    new, legacy_f = ah.read(tmp_path / "new", C, L), ah.read(tmp_path / "old", C, L)
    assert legacy_f.tensors.keys() == new.tensors.keys()
    assert all(torch.equal(legacy_f.tensors[k], new.tensors[k]) for k in new.tensors)
    reloaded = adapters.AutoAdapterModel.from_pretrained(str(base))
    reloaded.set_active_adapters(reloaded.load_adapter(str(tmp_path / "old")))
    ids, mask = inputs()  # the library itself reads these names as the same adapter
    assert max_diff(hub_logits(m, ids, mask), hub_logits(reloaded.eval(), ids, mask, head="a1"), mask) <= TOL


# ---------------------------------------------------------------------------------------------- ours -> adapters

def our_file(base: Path, kind: str, act: str, seed: int = 5) -> tuple[Model, ah.AdapterFile]:
    model = Model.from_pretrained(base, num_labels=3)
    model.add_adapter(AdapterConfig(kind=kind, reduction_factor=4, activation=act))
    model.set_num_labels(3, LABELS)
    randomize(model, ("_adapter.", "head."), seed)
    f = ah.AdapterFile(name="ours", config=model.adapter_config.to_dict(), tensors=model.adapter_state_dict(),
                       num_labels=3, labels=LABELS)
    return model.eval(), f


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("kind", ["pfeiffer", "houlsby"])
def test_write_parity(base, tmp_path, kind, act, request):
    """adapters' load_adapter(dir), no extra arguments (it reads the .bin files), computes what our model does."""
    model, f = our_file(base, kind, act)
    ah.write(tmp_path, f, C, L, base_name=str(base))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(  # nothing else, no temporary files left
        ["adapter_config.json", "adapter.safetensors", "pytorch_adapter.bin", "head_config.json",
         "model_head.safetensors", "pytorch_model_head.bin"])
    m = adapters.AutoAdapterModel.from_pretrained(str(base))
    name = m.load_adapter(str(tmp_path))
    m.set_active_adapters(name)
    assert name == "ours" and m.heads["ours"].config["label2id"] == {n: i for i, n in enumerate(LABELS)}
    ids, mask = inputs()
    err = max_diff(our_logits(model, ids, mask), hub_logits(m.eval(), ids, mask, head="ours"), mask)
    FIGURES[request.node.name] = err
    assert err <= TOL


def test_write_safetensors_twin(base, tmp_path):
    """With use_safetensors=True adapters reads the .safetensors files: they hold the same tensors as the .bin."""
    model, f = our_file(base, "houlsby", "relu")
    ah.write(tmp_path, f, C, L, base_name="b")
    for st, pt in (ah.WEIGHTS, ah.HEAD_WEIGHTS):
        a = adapters.loading.load_file(str(tmp_path / st))
        b = torch.load(tmp_path / pt, weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_written_config_is_the_library_config(base, tmp_path):
    """Every key of the config block as the library's own SeqBnConfig/DoubleSeqBnConfig would save it."""
    for kind in ("pfeiffer", "houlsby"):
        _, f = our_file(base, kind, "gelu")
        ah.write(tmp_path / kind, f, C, L, base_name="b")
        written = json.loads((tmp_path / kind / "adapter_config.json").read_text())
        assert written["config"] == library_config(kind, "gelu", rf=4).to_dict()
        assert written["name"] == "ours" and written["hidden_size"] == C and "version" in written


@pytest.mark.parametrize("task, num_labels, head_class", [("regression", 1, "ClassificationHead"),
                                                          ("multilabel", 3, "MultiLabelClassificationHead"),
                                                          ("classification", 3, "ClassificationHead")])
def test_task_round_trip(base, tmp_path, task, num_labels, head_class):
    """ours -> adapters (which builds the matching head) -> adapters' own save_adapter -> ours: same file."""
    model = Model.from_pretrained(base, num_labels=num_labels, adapter=AdapterConfig("pfeiffer", 8, "swish"))
    randomize(model, ("_adapter.", "head."), seed=7)
    labels = [f"c{i}" for i in range(num_labels)]
    f = ah.AdapterFile("rt", model.adapter_config.to_dict(), model.adapter_state_dict(), num_labels, labels, task)
    ah.write(tmp_path / "ours", f, C, L, base_name="b")
    m = adapters.AutoAdapterModel.from_pretrained(str(base))
    m.load_adapter(str(tmp_path / "ours"))
    assert type(m.heads["rt"]).__name__ == head_class
    m.save_adapter(str(tmp_path / "theirs"), "rt")
    g = ah.read(tmp_path / "theirs", C, L)
    assert (g.name, g.config, g.num_labels, g.labels, g.task) == ("rt", f.config, num_labels, labels, task)
    assert all(torch.equal(g.tensors[k], f.tensors[k]) for k in f.tensors) and g.tensors.keys() == f.tensors.keys()


def test_write_without_head_removes_a_stale_head(base, tmp_path):
    _, f = our_file(base, "pfeiffer", "relu")
    ah.write(tmp_path, f, C, L, base_name="b")
    headless = ah.AdapterFile(f.name, f.config, {k: v for k, v in f.tensors.items() if not k.startswith("head.")})
    ah.write(tmp_path, headless, C, L, base_name="b")
    assert not any((tmp_path / n).exists() for n in (ah.HEAD_CONFIG, *ah.HEAD_WEIGHTS))
    g = ah.read(tmp_path, C, L)
    assert g.num_labels is None and not any(k.startswith("head.") for k in g.tensors)


@pytest.mark.parametrize("change, words", [
    (dict(config={"kind": "lora", "r": 8}), "kind"),
    (dict(config={"kind": "houlsby", "reduction_factor": 4, "activation": "mish"}), "activation"),
    (dict(task="regression"), "regression"),
    (dict(labels=["a", "a", "b"]), "labels"),
    (dict(num_labels=2), "head.out"),
])
def test_write_refuses(base, tmp_path, change, words):
    _, f = our_file(base, "pfeiffer", "relu")
    with pytest.raises(ValueError, match=words):
        ah.write(tmp_path, ah.AdapterFile(**{**f.__dict__, **change}), C, L, base_name="b")
    assert not (tmp_path / ah.CONFIG).exists()


# ---------------------------------------------------------------------------------------------- refusals

@pytest.fixture(scope="module")
def saved(base, tmp_path_factory) -> dict[str, Path]:
    """One valid directory per placement, saved by adapters with safetensors and a head."""
    out = {}
    for kind in ("pfeiffer", "houlsby"):
        d = tmp_path_factory.mktemp(kind)
        hub_model(base, library_config(kind, "relu")).save_adapter(str(d), "a1", use_safetensors=True)
        out[kind] = d
    return out


def copy_of(saved: dict[str, Path], kind: str, tmp_path: Path) -> Path:
    d = tmp_path / kind
    shutil.copytree(saved[kind], d)
    return d


def set_config(d: Path, file: str = "adapter_config.json", replace: dict | None = None, **changes):
    """Change keys of the file's "config" block (value ...: delete), or swap in a whole block with `replace`."""
    meta = json.loads((d / file).read_text())
    cfg = replace if replace is not None else meta["config"]
    for k, v in changes.items():
        cfg.pop(k, None) if v is ... else cfg.__setitem__(k, v)
    meta["config"] = cfg
    (d / file).write_text(json.dumps(meta))


def refused(d: Path, *words: str, hidden: int = C, layers: int = L) -> str:
    with pytest.raises(CheckpointError) as e:
        ah.read(d, hidden, layers)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    return msg


REFUSED = [  # (placement of the valid file, config changes, the key the error must name)
    ("pfeiffer", dict(ln_before=True), "ln_before"),
    ("pfeiffer", dict(ln_after=True), "ln_after"),
    ("houlsby", dict(inv_adapter="nice", inv_adapter_reduction_factor=2), "inv_adapter"),
    ("pfeiffer", dict(invertible_adapter={"block_type": "nice", "reduction_factor": 2}), "invertible_adapter"),
    ("pfeiffer", dict(phm_layer=True), "phm_layer"),
    ("houlsby", dict(use_gating=True), "use_gating"),
    ("pfeiffer", dict(is_parallel=True), "is_parallel"),
    ("houlsby", dict(scaling=2.0), "scaling"),
    ("pfeiffer", dict(scaling="learned"), "scaling"),
    ("pfeiffer", dict(leave_out=[1]), "leave_out"),
    ("houlsby", dict(reduction_factor={"0": 8, "default": 8}), "reduction_factor"),
    ("pfeiffer", dict(reduction_factor=2.5), "reduction_factor"),
    ("pfeiffer", dict(reduction_factor=128), "reduction_factor"),
    ("pfeiffer", dict(non_linearity="leakyrelu"), "non_linearity"),
    ("pfeiffer", dict(original_ln_after=False), "original_ln_after"),
    ("pfeiffer", dict(residual_before_ln=False), "residual_before_ln"),
    ("houlsby", dict(residual_before_ln="post_add"), "residual_before_ln"),
    ("pfeiffer", dict(mh_adapter=True), "mh_adapter"),
    ("houlsby", dict(mh_adapter=False), "mh_adapter"),
    ("houlsby", dict(output_adapter=False), "output_adapter"),
    ("houlsby", dict(original_ln_before=True), "original_ln_before"),
    ("pfeiffer", dict(cross_adapter=True), "cross_adapter"),
    ("pfeiffer", dict(stochastic_depth=0.1), "stochastic_depth"),
    ("pfeiffer", dict(architecture="lora"), "architecture"),
    ("pfeiffer", dict(frobnicate=1), "frobnicate"),
    ("pfeiffer", dict(non_linearity=...), "non_linearity"),
    ("houlsby", dict(mh_adapter=...), "mh_adapter"),
]


@pytest.mark.parametrize("kind, changes, key", REFUSED, ids=[f"{k}-{next(iter(c))}" for _, c, k in REFUSED])
def test_refused_option(saved, tmp_path, kind, changes, key):
    d = copy_of(saved, kind, tmp_path)
    set_config(d, **changes)
    refused(d, "adapter_config.json", repr(key))


@pytest.mark.parametrize("config, key", [("ParBnConfig", "is_parallel"), ("CompacterConfig", "phm_layer"),
                                         ("SeqBnInvConfig", "inv_adapter"), ("AdapterPlusConfig", "original_ln_after"),
                                         ("LoRAConfig", "architecture"), ("PrefixTuningConfig", "architecture")])
def test_refused_library_configs(saved, tmp_path, config, key):
    """The library's own other configurations, as it would save them."""
    d = copy_of(saved, "pfeiffer", tmp_path)
    set_config(d, replace=getattr(adapters, config)().to_dict())
    refused(d, "adapter_config.json", repr(key))


def test_old_task_adapter_naming_an_unused_invertible_adapter(base, saved, tmp_path):
    """adapters' _fix_legacy_config drops an inv_adapter an old text_task adapter never saved: so do we."""
    d = copy_of(saved, "houlsby", tmp_path)
    set_config(d, inv_adapter="nice", inv_adapter_reduction_factor=2)
    edit_json(d / "adapter_config.json", type="text_task", version=...)
    assert ah.read(d, C, L).config["kind"] == "houlsby"
    edit_json(d / "adapter_config.json", type="text_lang")  # a language adapter would use it
    refused(d, "'inv_adapter'")


@pytest.mark.parametrize("changes, key", [(dict(layers=1), "layers"), (dict(activation_function="relu"),
                                          "activation_function"), (dict(use_pooler=True), "use_pooler"),
                                         (dict(bias=False), "bias"), (dict(head_type="qa"), "head_type"),
                                         (dict(head_type="multiple_choice"), "head_type"), (dict(extra=1), "extra"),
                                         (dict(label2id={"a": 0, "b": 0, "c": 2}), "label2id"),
                                         (dict(num_labels=0), "num_labels")])
def test_refused_head(saved, tmp_path, changes, key):
    d = copy_of(saved, "pfeiffer", tmp_path)
    set_config(d, "head_config.json", **changes)
    refused(d, "head_config.json", repr(key))


def test_refused_head_class(saved, tmp_path):
    d = copy_of(saved, "pfeiffer", tmp_path)
    edit_json(d / "head_config.json", model_class="RobertaForMaskedLM")
    refused(d, "head_config.json", "'model_class'")


def test_head_labels_and_task(saved, tmp_path):
    """id2label wins over label2id; head_type multilabel_classification is our "multilabel"."""
    d = copy_of(saved, "pfeiffer", tmp_path)
    set_config(d, "head_config.json", id2label={"0": "x", "2": "z", "1": "y"}, head_type="multilabel_classification")
    f = ah.read(d, C, L)
    assert (f.labels, f.task) == (["x", "y", "z"], "multilabel")


# ---------------------------------------------------------------------------------------------- base and tensors

def test_another_base_is_refused(saved, tmp_path):
    refused(saved["pfeiffer"], "'hidden_size'", "64", hidden=32)
    refused(saved["houlsby"], "layer 1", "1 layers", layers=1)  # a deeper base's adapter
    refused(saved["houlsby"], "layer.2.", "missing", layers=3)  # a shallower one's
    d = copy_of(saved, "pfeiffer", tmp_path)
    edit_json(d / "adapter_config.json", hidden_size=..., model_type="bert")
    refused(d, "adapter_config.json", "'model_type'")
    edit_json(d / "adapter_config.json", model_type=...)  # no hidden_size key: the shapes still tell
    for name in ("model_head.safetensors", "head_config.json"):
        (d / name).unlink()
    refused(d, "adapter.safetensors", "has shape (8", hidden=32)


def rewrite(d: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(str(d / "adapter.safetensors"))
    change(sd)
    save_file(sd, str(d / "adapter.safetensors"))


K0 = "roberta.encoder.layer.0.output.adapters.a1.adapter_up.weight"


@pytest.mark.parametrize("change, words", [
    (lambda sd: sd.__setitem__("roberta.encoder.layer.0.output.adapters.a1.gate.weight", torch.zeros(1, C)),
     ["'roberta.encoder.layer.0.output.adapters.a1.gate.weight'", "unexpected"]),
    (lambda sd: sd.pop(K0), [repr(K0), "missing"]),
    (lambda sd: sd.__setitem__(K0, torch.zeros(C, 4)), [repr(K0), "(64, 4)", "(64, 8)"]),
    (lambda sd: sd.__setitem__(K0, torch.zeros(C, 8, dtype=torch.int64)), [repr(K0), "floating"]),
    (lambda sd: sd.__setitem__(K0.removeprefix("roberta."), sd[K0].clone()), [repr(K0), "same tensor"]),
    (lambda sd: sd.__setitem__(K0.replace("a1", "b2"), sd.pop(K0)), ["'roberta.encoder.layer.0.output.adapters.b2."]),
    (lambda sd: sd.__setitem__("heads.a1.1.weight", torch.zeros(C, C)), ["'heads.a1.1.weight'", "unexpected"]),
])
def test_tensor_errors(saved, tmp_path, change, words):
    d = copy_of(saved, "pfeiffer", tmp_path)
    rewrite(d, change)
    refused(d, "adapter.safetensors", *words)


def test_unprefixed_keys(base, tmp_path):
    """adapters.init(RobertaModel) saves keys without the `roberta.` prefix: the same adapter."""
    from transformers import RobertaModel

    m = RobertaModel.from_pretrained(str(base))
    adapters.init(m)
    m.add_adapter("a1", config=library_config("pfeiffer", "swish"))
    m.save_adapter(str(tmp_path), "a1", use_safetensors=True)
    keys = adapters.loading.load_file(str(tmp_path / "adapter.safetensors")).keys()
    assert all(k.startswith("encoder.") for k in keys)
    f = ah.read(tmp_path, C, L)
    assert f.num_labels is None and len(f.tensors) == 4 * L


@pytest.mark.parametrize("file", ["adapter.safetensors", "model_head.safetensors", "adapter_config.json"])
def test_corrupt_file_is_named(saved, tmp_path, file):
    d = copy_of(saved, "pfeiffer", tmp_path)
    (d / file).write_bytes(b"\x00garbage, not this format" * 3)
    refused(d, str(d / file))


def test_corrupt_bin_is_named(saved, tmp_path):
    d = copy_of(saved, "houlsby", tmp_path)
    (d / "adapter.safetensors").unlink()
    torch.save({}, d / "pytorch_adapter.bin")
    data = (d / "pytorch_adapter.bin").read_bytes()
    (d / "pytorch_adapter.bin").write_bytes(data[: len(data) // 2])
    refused(d, str(d / "pytorch_adapter.bin"))


class _Plant:
    """A pickle that, when unpickled without weights_only, creates a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_bin_is_never_fully_unpickled(saved, tmp_path):
    d = copy_of(saved, "houlsby", tmp_path)
    (d / "adapter.safetensors").unlink()
    marker = tmp_path / "unpickled"
    with open(d / "pytorch_adapter.bin", "wb") as fh:
        pickle.dump({"x": _Plant(marker)}, fh, protocol=2)
    refused(d, str(d / "pytorch_adapter.bin"))
    assert not marker.exists()


def test_missing_files(saved, tmp_path):
    d = copy_of(saved, "pfeiffer", tmp_path)
    (d / "model_head.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model_head.safetensors"):
        ah.read(d, C, L)
    (d / "head_config.json").unlink()
    (d / "adapter.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter.safetensors"):
        ah.read(d, C, L)


# ---------------------------------------------------------------------------------------------- detect, tables

def test_detect(saved, base, tmp_path):
    assert ah.detect(saved["pfeiffer"]) and ah.detect(saved["houlsby"])
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    model = Model.from_pretrained(base, adapter="houlsby")
    model.save_adapter(tmp_path / "ours")
    assert not ah.detect(tmp_path / "peft") and not ah.detect(tmp_path / "ours") and not ah.detect(tmp_path / "none")


def test_option_tables_cover_bnconfig():
    """Every BnConfig field of the installed library is decided on: a new option must not be silently accepted."""
    fields = set(adapters.BnConfig.__dataclass_fields__)
    decided = set(ah.PLACEMENT_KEYS) | set(ah.MUST_BE_DEFAULT) | set(ah.FREE) | {"reduction_factor", "non_linearity"}
    assert decided == fields
    defaults = {k: f.default for k, f in adapters.BnConfig.__dataclass_fields__.items() if k in ah.FREE}
    assert defaults == ah.FREE
    assert dict(adapters.utils.ACTIVATION_RENAME) == ah.OLD_ACTIVATION_RENAME


def test_key_table_is_what_the_library_saves(base):
    """their_key() gives, for every interchange key, exactly the state-dict names of adapters' RobertaAdapterModel."""
    for kind in ("pfeiffer", "houlsby"):
        m = hub_model(base, library_config(kind, "relu", rf=4), name="sst-2")
        theirs = {k for k in m.state_dict() if ".adapters.sst-2." in k or k.startswith("heads.sst-2.")}
        shapes = ah.expected_shapes({"kind": kind, "reduction_factor": 4}, 3, C, L)
        assert {ah.their_key(k, "sst-2") for k in shapes} == theirs


def test_print_figures():
    """Run with -s to see the parity figures of this session (max |logit difference| per test)."""
    for name, err in sorted(FIGURES.items()):
        print(f"{name}: {err:.2e}")
