"""Every way loading or running can go wrong raises a clear error that names the file, key or value at fault.

Checkpoints are tiny transformers models written with `save_pretrained`, built once per module and copied per
test (shutil.copytree) before being damaged. Each test asserts the exception type and what the message names.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import roberta_lite
from roberta_lite import AdapterConfig, CheckpointError, Model, Tokenizer
from roberta_lite.adapters import adapter_tensors

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=20, layer_norm_eps=1e-5)


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """Pristine checkpoints, never modified: copy one with `copy_ckpt` before damaging it."""
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaModel

    root = tmp_path_factory.mktemp("ckpts")
    out = {}

    def build(name, cls, seed, **overrides):
        torch.manual_seed(seed)
        cls(RobertaConfig(**{**TINY, **overrides})).eval().save_pretrained(root / name)
        out[name] = root / name

    build("base", RobertaModel, 0)  # base A
    build("base_b", RobertaModel, 1)  # same shapes as A, different random weights
    build("base_c", RobertaModel, 2, hidden_size=48)  # a different architecture
    build("mlm", RobertaForMaskedLM, 3)
    return out


def copy_ckpt(src: Path, tmp_path: Path, name: str = "ckpt") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def read_tensors(d: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def write_tensors(d: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})


def edit_config(d: Path, drop: tuple[str, ...] = (), **changes) -> None:
    path = d / "config.json"
    cfg = json.loads(path.read_text())
    for k in drop:
        del cfg[k]
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def ids_of(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long)


@pytest.fixture(scope="module")
def model(ckpts) -> Model:
    return Model.from_pretrained(ckpts["base"])


def test_checkpoint_error_is_exported():
    assert roberta_lite.CheckpointError is CheckpointError
    assert "CheckpointError" in roberta_lite.__all__
    assert issubclass(CheckpointError, Exception)


# ---------------------------------------------------------------------------------------------- missing files

@pytest.mark.parametrize("path", ["/nonexistent/dir", "./nope"])
def test_missing_model_directory(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # so ./nope really does not exist
    with pytest.raises(FileNotFoundError) as ei:
        Model.from_pretrained(path)
    assert path in str(ei.value)


@pytest.mark.parametrize("path", ["/nonexistent/dir", "./nope"])
def test_missing_tokenizer_directory(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as ei:
        Tokenizer.from_pretrained(path)
    assert path in str(ei.value)


def test_missing_config_json(ckpts, tmp_path):
    d = copy_ckpt(ckpts["base"], tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError) as ei:
        Model.from_pretrained(str(d))
    assert str(d / "config.json") in str(ei.value)


def test_missing_weights_file(ckpts, tmp_path):
    d = copy_ckpt(ckpts["base"], tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as ei:
        Model.from_pretrained(str(d))
    msg = str(ei.value)
    assert str(d) in msg and "model.safetensors" in msg
    assert "pickle" not in msg  # no .bin here: no hint about one


def test_only_pytorch_model_bin_is_never_loaded(ckpts, tmp_path):
    d = copy_ckpt(ckpts["base"], tmp_path)
    tensors = read_tensors(d)
    (d / "model.safetensors").unlink()
    torch.save(tensors, d / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError) as ei:
        Model.from_pretrained(str(d))
    msg = str(ei.value)
    assert str(d) in msg and "pytorch_model.bin" in msg
    assert "pickle" in msg and "never" in msg


# ---------------------------------------------------------------------------------------------- config.json

def test_config_invalid_json(ckpts, tmp_path):
    d = copy_ckpt(ckpts["base"], tmp_path)
    (d / "config.json").write_text('{"model_type": "roberta", "hidden_size": 32,')
    with pytest.raises(CheckpointError) as ei:
        Model.from_pretrained(str(d))
    msg = str(ei.value)
    assert str(d / "config.json") in msg and "JSON" in msg


def test_config_is_a_json_list(ckpts, tmp_path):
    d = copy_ckpt(ckpts["base"], tmp_path)
    (d / "config.json").write_text('[{"model_type": "roberta"}]')
    with pytest.raises(CheckpointError) as ei:
        Model.from_pretrained(str(d))
    msg = str(ei.value)
    assert str(d / "config.json") in msg and "list" in msg


def test_unsupported_model_type(ckpts, tmp_path):
    from transformers import GPT2Config

    d = copy_ckpt(ckpts["base"], tmp_path)
    GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=99).save_pretrained(d)  # replaces config.json
    assert json.loads((d / "config.json").read_text())["model_type"] == "gpt2"
    with pytest.raises(ValueError) as ei:
        Model.from_pretrained(str(d))
    msg = str(ei.value)
    assert "model_type" in msg and "gpt2" in msg and "config.json" in msg


@pytest.mark.parametrize("key, value", [("hidden_act", "gelu_new"), ("position_embedding_type", "relative_key"),
                                        ("is_decoder", True)])
def test_unsupported_architecture(key, value, ckpts, tmp_path):
    d = copy_ckpt(ckpts["base"], tmp_path)
    edit_config(d, **{key: value})
    with pytest.raises(ValueError) as ei:
        Model.from_pretrained(str(d))
    msg = str(ei.value)
    assert key in msg and str(value).lower() in msg.lower() and "config.json" in msg


@pytest.mark.parametrize("key", ["num_attention_heads", "vocab_size", "max_position_embeddings"])
def test_config_missing_required_key(key, ckpts, tmp_path):
    d = copy_ckpt(ckpts["base"], tmp_path)
    edit_config(d, drop=(key,))
    with pytest.raises(ValueError) as ei:
        Model.from_pretrained(str(d))
    msg = str(ei.value)
    assert key in msg and "config.json" in msg


def test_config_non_numeric_value(ckpts, tmp_path):
    d = copy_ckpt(ckpts["base"], tmp_path)
    edit_config(d, hidden_size="big")
    with pytest.raises(ValueError) as ei:
        Model.from_pretrained(str(d))
    msg = str(ei.value)
    assert "hidden_size" in msg and "'big'" in msg and "config.json" in msg


# ---------------------------------------------------------------------------------------------- corrupt files

@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors(damage, ckpts, tmp_path):
    d = copy_ckpt(ckpts["base"], tmp_path)
    path = d / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else bytes(range(256)) * 16)
    with pytest.raises(CheckpointError) as ei:
        Model.from_pretrained(str(d))
    assert str(path) in str(ei.value)


def _shard(d: Path, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Split into two shards (q/k/v of layer 0 deliberately split across them) and write the index."""
    keys = sorted(tensors)
    first = set(keys[: len(keys) // 2]) | {"encoder.layer.0.attention.self.query.weight"}
    first -= {"encoder.layer.0.attention.self.key.weight"}
    names = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    weight_map = {k: names[0] if k in first else names[1] for k in keys}
    for name in names:
        save_file({k: tensors[k].contiguous() for k in keys if weight_map[k] == name}, str(d / name),
                  metadata={"format": "pt"})
    (d / "model.safetensors").unlink()
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return weight_map


def test_sharded_checkpoint_loads_like_single_file(ckpts, tmp_path):
    d = copy_ckpt(ckpts["mlm"], tmp_path)
    _shard(d, read_tensors(d))
    single = Model.from_pretrained(ckpts["mlm"])
    sharded = Model.from_pretrained(str(d))
    ids = ids_of([0, 5, 6, 7, 8, 2], [0, 9, 10, 2, 1, 1])
    mask = (ids != 1).long()
    with torch.no_grad():
        assert torch.equal(single.encode(ids, mask), sharded.encode(ids, mask))
        assert torch.equal(single.mlm_logits(ids, mask), sharded.mlm_logits(ids, mask))
    for (n1, p1), (n2, p2) in zip(single.state_dict().items(), sharded.state_dict().items()):
        assert n1 == n2
        if not n1.startswith("head."):  # the classifier head is freshly initialised in both
            assert torch.equal(p1, p2), n1


def test_sharded_checkpoint_missing_shard(ckpts, tmp_path):
    d = copy_ckpt(ckpts["base"], tmp_path)
    _shard(d, read_tensors(d))
    missing = d / "model-00002-of-00002.safetensors"
    missing.unlink()
    with pytest.raises((FileNotFoundError, CheckpointError)) as ei:
        Model.from_pretrained(str(d))
    assert str(missing) in str(ei.value)


# ---------------------------------------------------------------------------------------------- tensors

def test_missing_tensor(ckpts, tmp_path):
    d = copy_ckpt(ckpts["base"], tmp_path)
    tensors = read_tensors(d)
    del tensors["encoder.layer.1.output.dense.weight"]
    write_tensors(d, tensors)
    with pytest.raises(CheckpointError) as ei:
        Model.from_pretrained(str(d))
    msg = str(ei.value)
    assert "encoder.layer.1.output.dense.weight" in msg and str(d) in msg


def test_missing_tensor_with_roberta_prefix(ckpts, tmp_path):
    d = copy_ckpt(ckpts["mlm"], tmp_path)
    tensors = read_tensors(d)
    del tensors["roberta.encoder.layer.1.output.dense.weight"]
    write_tensors(d, tensors)
    with pytest.raises(CheckpointError) as ei:
        Model.from_pretrained(str(d))
    msg = str(ei.value)
    assert "encoder.layer.1.output.dense.weight" in msg and str(d) in msg


@pytest.mark.parametrize("key", ["encoder.layer.0.attention.self.query.weight",
                                 "encoder.layer.1.attention.self.key.weight",
                                 "encoder.layer.0.attention.self.value.bias"])
def test_missing_one_of_query_key_value(key, ckpts, tmp_path):
    d = copy_ckpt(ckpts["base"], tmp_path)
    tensors = read_tensors(d)
    del tensors[key]
    write_tensors(d, tensors)
    with pytest.raises(CheckpointError) as ei:
        Model.from_pretrained(str(d))
    msg = str(ei.value)
    assert key in msg, f"the missing tensor {key!r} is not named in: {msg}"
    assert str(d) in msg


@pytest.mark.parametrize("key, bad_shape, right_shape", [
    ("encoder.layer.0.intermediate.dense.weight", (36, 32), (37, 32)),
    ("embeddings.word_embeddings.weight", (100, 32), (99, 32)),
    ("encoder.layer.1.output.LayerNorm.bias", (31,), (32,)),
    ("encoder.layer.0.attention.self.query.weight", (31, 32), (32, 32)),
])
def test_wrong_shape(key, bad_shape, right_shape, ckpts, tmp_path):
    d = copy_ckpt(ckpts["base"], tmp_path)
    tensors = read_tensors(d)
    assert tuple(tensors[key].shape) == right_shape
    tensors[key] = torch.zeros(bad_shape)
    write_tensors(d, tensors)
    with pytest.raises(CheckpointError) as ei:
        Model.from_pretrained(str(d))
    msg = str(ei.value)
    assert key in msg and str(bad_shape) in msg and str(right_shape) in msg and str(d) in msg


def test_more_layers_than_config(ckpts, tmp_path):
    d = copy_ckpt(ckpts["base"], tmp_path)
    edit_config(d, num_hidden_layers=1)
    with pytest.raises(CheckpointError) as ei:
        Model.from_pretrained(str(d))
    msg = str(ei.value)
    assert re.search(r"encoder\.layer\.1\.[\w.]+", msg), msg
    assert str(d) in msg


@pytest.mark.parametrize("ckpt, key", [
    ("mlm", "roberta.encoder.layer.0.attention.self.rotary.weight"),
    ("base", "encoder.layer.0.attention.self.rotary.weight"),
    ("base", "foo.bar"),
])
def test_unknown_key(ckpt, key, ckpts, tmp_path):
    d = copy_ckpt(ckpts[ckpt], tmp_path)
    tensors = read_tensors(d)
    tensors[key] = torch.zeros(4)
    write_tensors(d, tensors)
    with pytest.raises(CheckpointError) as ei:
        Model.from_pretrained(str(d))
    msg = str(ei.value)
    assert key in msg
    assert str(d) in msg, f"CheckpointError must name the checkpoint it is about: {msg}"


# ---------------------------------------------------------------------------------------------- inputs

def test_token_id_negative(model):
    with pytest.raises(ValueError) as ei:
        model.encode(ids_of([0, 5, -1, 2]))
    msg = str(ei.value)
    assert "-1" in msg and "99" in msg, msg


def test_token_id_too_large(model):
    with pytest.raises(ValueError) as ei:
        model.encode(ids_of([0, 150, 6, 2]))
    msg = str(ei.value)
    assert "150" in msg and "99" in msg, msg


def test_token_id_boundary(model):
    model.encode(ids_of([0, 98, 2]))  # the last id is fine
    with pytest.raises(ValueError) as ei:
        model.encode(ids_of([0, 99, 2]))
    assert "99" in str(ei.value)


def test_sequence_length_limit(model):
    assert model.config.max_tokens == 18  # 20 positions minus pad_id + 1
    ok = ids_of([0] + [5] * 16 + [2])
    assert ok.shape == (1, 18)
    assert model.encode(ok).shape == (1, 18, 32)
    assert model(ok).shape == (1, 2)
    too_long = ids_of([0] + [5] * 17 + [2])
    with pytest.raises(ValueError) as ei:
        model.encode(too_long)
    msg = str(ei.value)
    assert "18" in msg and "19" in msg


def test_attention_mask_shape_mismatch(model):
    ids = ids_of([0, 5, 6, 7, 2], [0, 8, 2, 1, 1])
    with pytest.raises(ValueError) as ei:
        model.encode(ids, torch.ones(2, 4, dtype=torch.long))
    msg = str(ei.value)
    assert "(2, 4)" in msg and "(2, 5)" in msg


def test_mlm_logits_without_lm_head(model, ckpts):
    ids = ids_of([0, 5, 6, 2])
    with pytest.raises(RuntimeError) as ei:
        model.mlm_logits(ids)
    msg = str(ei.value)
    assert "masked-LM head" in msg or "lm_head" in msg
    assert str(ckpts["base"]) in msg
    # and a checkpoint with lm_head.* has one
    assert Model.from_pretrained(ckpts["mlm"]).mlm_logits(ids).shape == (1, 4, 99)
    # a bf16 base (MLM dense, bias and tied decoder in bf16) still returns float32 logits, as model.py says
    assert Model.from_pretrained(ckpts["mlm"], dtype=torch.bfloat16).mlm_logits(ids).dtype == torch.float32


# ---------------------------------------------------------------------------------------------- adapters

@pytest.fixture(scope="module")
def adapter_a(ckpts, tmp_path_factory) -> Path:
    """An untrained Houlsby adapter saved from base A."""
    d = tmp_path_factory.mktemp("adapter") / "a"
    Model.from_pretrained(ckpts["base"]).add_adapter("houlsby").save_adapter(d)
    return d


def copy_adapter(adapter: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "adapter"
    shutil.copytree(adapter, dst)
    return dst


def test_adapter_loads_on_its_own_base(ckpts, adapter_a):
    m = Model.from_pretrained(ckpts["base"]).load_adapter(adapter_a)
    assert m.adapter_config.kind == "houlsby"


@pytest.mark.parametrize("other", ["base_b", "base_c"])
def test_adapter_for_another_base(other, ckpts, adapter_a):
    m = Model.from_pretrained(ckpts[other])
    with pytest.raises(CheckpointError) as ei:
        m.load_adapter(adapter_a)
    msg = str(ei.value)
    assert str(ckpts["base"]) in msg and str(ckpts[other]) in msg
    assert str(adapter_a) in msg


def test_fingerprint_covers_the_encoder_not_the_mlm_head(tmp_path):
    """One encoder saved with an lm_head (RobertaForMaskedLM) and without (its RobertaModel) is one base: an adapter
    trained on either loads on the other and gives the same logits; another encoder is still refused."""
    from transformers import RobertaConfig, RobertaForMaskedLM

    torch.manual_seed(0)
    with_lm = RobertaForMaskedLM(RobertaConfig(**TINY)).eval()
    with_lm.save_pretrained(tmp_path / "withlm")
    with_lm.roberta.save_pretrained(tmp_path / "nolm")  # the same encoder, no lm_head.* in the file
    torch.manual_seed(1)
    RobertaForMaskedLM(RobertaConfig(**TINY)).eval().save_pretrained(tmp_path / "other")
    a, b = Model.from_pretrained(tmp_path / "withlm"), Model.from_pretrained(tmp_path / "nolm")
    assert a.mlm is not None and b.mlm is None
    assert a.base_fingerprint() == b.base_fingerprint() == Model.from_pretrained(
        tmp_path / "withlm", dtype=torch.bfloat16).base_fingerprint()
    assert a.base_fingerprint(1) != b.base_fingerprint(1)  # the older hash counted mlm.*
    a.add_adapter("s", "houlsby", num_labels=3)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for _, p in adapter_tensors(a, "s"):
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    a.save_adapter(tmp_path / "s")
    assert json.loads((tmp_path / "s" / "adapter_config.json").read_text())["fingerprint_version"] == 2
    b.load_adapter(tmp_path / "s")
    ids = ids_of([0, 5, 6, 7, 2])
    with torch.no_grad():
        assert torch.allclose(a(ids, adapter="s"), b(ids, adapter="s"), atol=1e-6)
        b.save_adapter(tmp_path / "s-from-nolm")
    Model.from_pretrained(tmp_path / "withlm").load_adapter(tmp_path / "s-from-nolm")  # and back
    with pytest.raises(CheckpointError, match="fingerprint"):
        Model.from_pretrained(tmp_path / "other").load_adapter(tmp_path / "s")


def test_adapter_files_with_the_older_fingerprint_still_load(ckpts, adapter_a, tmp_path):
    """Files written before fingerprint version 2 record version 1's hash and no version: checked as version 1."""
    d = copy_adapter(adapter_a, tmp_path)
    meta = json.loads((d / "adapter_config.json").read_text())
    base = Model.from_pretrained(ckpts["base"])
    meta["base_fingerprint"] = base.base_fingerprint(1)
    del meta["fingerprint_version"]
    (d / "adapter_config.json").write_text(json.dumps(meta))
    base.load_adapter(d)
    with pytest.raises(CheckpointError, match=base.base_fingerprint(1)):
        Model.from_pretrained(ckpts["base_b"]).load_adapter(d)


def test_adapter_fingerprint_is_dtype_independent(ckpts, adapter_a):
    m = Model.from_pretrained(ckpts["base"], dtype=torch.bfloat16)
    assert m.embed.tok.weight.dtype == torch.bfloat16
    assert m.base_fingerprint() == Model.from_pretrained(ckpts["base"]).base_fingerprint()
    m.load_adapter(adapter_a)  # must not raise
    saved = json.loads((adapter_a / "adapter_config.json").read_text())
    with safe_open(str(adapter_a / "adapter.safetensors"), framework="pt") as f:
        for k in f.keys():
            assert torch.equal(m.adapter_state_dict()[k], f.get_tensor(k)), k
    with torch.no_grad():
        out = m(ids_of([0, 5, 6, 2]))
    assert out.shape == (1, saved["num_labels"]) and torch.isfinite(out).all()


def test_adapter_missing_config(ckpts, adapter_a, tmp_path):
    d = copy_adapter(adapter_a, tmp_path)
    (d / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError) as ei:
        Model.from_pretrained(ckpts["base"]).load_adapter(d)
    assert str(d / "adapter_config.json") in str(ei.value)


def test_adapter_config_invalid_json(ckpts, adapter_a, tmp_path):
    d = copy_adapter(adapter_a, tmp_path)
    (d / "adapter_config.json").write_text('{"adapter": {"kind": "houlsby"},')
    with pytest.raises(CheckpointError) as ei:
        Model.from_pretrained(ckpts["base"]).load_adapter(d)
    msg = str(ei.value)
    assert str(d / "adapter_config.json") in msg and "JSON" in msg


def test_adapter_safetensors_missing_tensor(ckpts, adapter_a, tmp_path):
    d = copy_adapter(adapter_a, tmp_path)
    path = d / "adapter.safetensors"
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = "layers.1.ffn_adapter.up.weight"
    del tensors[key]
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError) as ei:
        Model.from_pretrained(ckpts["base"]).load_adapter(d)
    msg = str(ei.value)
    assert key in msg and str(path) in msg


@pytest.mark.parametrize("kwargs, value", [
    (dict(kind="prefix"), "'prefix'"),
    (dict(kind="lora", r=0), "0"),
    (dict(kind="lora", targets=("query", "pooler")), "'pooler'"),
    (dict(reduction_factor=0), "0"),
    (dict(reduction_factor=-4), "-4"),
    (dict(activation="foo"), "'foo'"),
])
def test_adapter_config_invalid(kwargs, value):
    with pytest.raises(ValueError) as ei:
        AdapterConfig(**kwargs)
    msg = str(ei.value)
    field = list(kwargs)[-1]  # the key at fault
    assert field in msg and value in msg


# ---------------------------------------------------------------------------------------------- tokenizer

def test_corrupt_tokenizer_json(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"version": "1.0", "model": {"type": "BPE", ')
    with pytest.raises(ValueError) as ei:
        Tokenizer.from_pretrained(str(tmp_path))
    assert str(path) in str(ei.value)


VOCAB = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4, "a": 5, "b": 6, "ab": 7}


def test_vocab_and_merges_pair_loads(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps(VOCAB))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    assert Tokenizer.from_pretrained(str(tmp_path)).encode("ab") == [0, 7, 2]


@pytest.mark.parametrize("bad_line", ["a b c", "ab"])
def test_malformed_merges_line(bad_line, tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps(VOCAB))
    merges = tmp_path / "merges.txt"
    merges.write_text(f"#version: 0.2\na b\n{bad_line}\n")
    with pytest.raises(ValueError) as ei:
        Tokenizer.from_pretrained(str(tmp_path))
    msg = str(ei.value)
    assert str(merges) in msg and re.search(r"\bline 3\b", msg) and bad_line in msg
