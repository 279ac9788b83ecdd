"""LoRA (model.LoRA / QKVLoRA, adapters.merge / unmerge): identity at init, peft's numbers, parity with peft on
transformers' RobertaForSequenceClassification, freezing, merging, mixed batches, bf16, files, and learning.

The peft side is peft itself (get_peft_model / PeftModel.from_pretrained) on the same transformers checkpoint; the
tensor map from peft's parameter names to ours is written here from the two module trees (`PEFT_MODULE`,
`OUR_MODULE`), independent of roberta_lite.formats.peft's tables.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from checkpoints import ROBERTA_BASE, make_hf  # noqa: E402
from roberta_lite import AdapterConfig, Config, Model  # noqa: E402
from roberta_lite import adapters as A  # noqa: E402
from roberta_lite import weights as W  # noqa: E402
from roberta_lite.model import LoRA  # noqa: E402
from test_parity import TOL, batch, max_diff  # noqa: E402
from test_peft_format import load_base, peft_logits, peft_saved  # noqa: E402

C, L, F_, K = 64, 2, 96, 3
# initializer_range 0.1 (not 0.02): attention far from uniform, so a LoRA on query or key changes the logits.
CFG = dict(vocab_size=99, hidden_size=C, num_hidden_layers=L, num_attention_heads=4, intermediate_size=F_,
           max_position_embeddings=40, layer_norm_eps=1e-5, type_vocab_size=1, pad_token_id=1, num_labels=K,
           initializer_range=0.1)
SIX = ("query", "key", "value", "attn_out", "ffn_up", "ffn_down")
MERGE_TOL = 1e-5  # fp32: merged vs unmerged, mixed batch vs single-adapter runs

# Our target -> the transformers module peft wraps, and -> our LoRA module ({} layer, {n} adapter name).
PEFT_MODULE = {
    "query": "roberta.encoder.layer.{}.attention.self.query",
    "key": "roberta.encoder.layer.{}.attention.self.key",
    "value": "roberta.encoder.layer.{}.attention.self.value",
    "attn_out": "roberta.encoder.layer.{}.attention.output.dense",
    "ffn_up": "roberta.encoder.layer.{}.intermediate.dense",
    "ffn_down": "roberta.encoder.layer.{}.output.dense",
}
OUR_MODULE = {
    "query": "layers.{}.attn.qkv_lora.{n}.query",
    "key": "layers.{}.attn.qkv_lora.{n}.key",
    "value": "layers.{}.attn.qkv_lora.{n}.value",
    "attn_out": "layers.{}.attn.proj_lora.{n}",
    "ffn_up": "layers.{}.ffn.up_lora.{n}",
    "ffn_down": "layers.{}.ffn.down_lora.{n}",
}
OUR_HEAD = {"dense.weight": "dense.weight", "dense.bias": "dense.bias", "out_proj.weight": "out.weight",
            "out_proj.bias": "out.bias"}  # transformers' classifier -> our head


def peft_target_modules(targets) -> list[str]:
    """target_modules selecting exactly `targets` (FFN-down has no suffix of its own: full names per layer)."""
    names = {"attn_out": ["attention.output.dense"], "ffn_up": ["intermediate.dense"],
             "ffn_down": [PEFT_MODULE["ffn_down"].format(i) for i in range(L)]}
    return [n for t in targets for n in names.get(t, [t])]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora-base")
    make_hf("RobertaForSequenceClassification", **CFG).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def inputs():
    return batch(CFG["vocab_size"], CFG["pad_token_id"], T=17)


def lora_config(targets=("query", "value"), r=4, alpha=8.0, **kw) -> AdapterConfig:
    return AdapterConfig("lora", r=r, alpha=alpha, targets=tuple(targets), **kw)


def loras(model: Model, name: str) -> dict[str, LoRA]:
    """'target.layer' -> our LoRA module of adapter `name`."""
    modules = dict(model.named_modules())
    return {f"{t}.{i}": modules[OUR_MODULE[t].format(i, n=name)] for t in SIX for i in range(L)
            if OUR_MODULE[t].format(i, n=name) in modules}


def randomize(model: Model, name: str, seed: int = 0, b_std: float = 0.2):
    """Trained-looking adapter `name` drawn from `seed`: LoRA A ~ N(0, 1/fan_in), B ~ N(0, b_std^2), the bottleneck
    adapters' and the head's tensors ~ N(0, 0.2^2) (so up-projections are non-zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in adapter_params(model, name):
            std = p.shape[1] ** -0.5 if key.endswith(".A") else b_std if key.endswith(".B") else 0.2
            p.copy_(torch.randn(p.shape, generator=g) * std)


def adapter_params(model: Model, name: str) -> list[tuple[str, nn.Parameter]]:
    """(file key, parameter) of adapter `name` and its head."""
    return list(A.adapter_tensors(model, name))


def logits(model: Model, ids, mask, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, mask, **kw)


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).abs().max() / ref.abs().max()).item()


# ------------------------------------------------------------------------------------------ 1. init and scale

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("target", SIX)
def test_fresh_lora_is_the_identity(base_dir, inputs, target, dtype, request):
    ids, mask = inputs
    plain = Model.from_pretrained(base_dir, dtype=dtype)
    adapted = Model.from_pretrained(base_dir, dtype=dtype, adapter=lora_config((target,), dropout=0.1))
    assert len(loras(adapted, "default")) == L
    assert torch.equal(logits(plain, ids, mask), logits(adapted, ids, mask))
    with torch.no_grad():
        assert torch.equal(plain.encode(ids, mask), adapted.encode(ids, mask))


def test_init_is_peft_kaiming_uniform_a_and_zero_b(base_dir):
    # The exact call peft's LoraLayer.reset_lora_parameters makes for init_lora_weights=True, on the same RNG state.
    cfg = lora_config(r=8)
    torch.manual_seed(7)
    lora = LoRA(C, F_, cfg)
    torch.manual_seed(7)
    expected = torch.empty(8, C)
    nn.init.kaiming_uniform_(expected, a=math.sqrt(5))
    assert torch.equal(lora.A, expected) and torch.equal(lora.B, torch.zeros(F_, 8))
    # In a model: every A uniform in +-1/sqrt(fan_in) (fan_in F for FFN-down), every B zero.
    model = Model.from_pretrained(base_dir, adapter=lora_config(SIX, r=8))
    for key, m in loras(model, "default").items():
        fan_in = F_ if key.startswith("ffn_down") else C
        bound = 1 / math.sqrt(fan_in)
        assert m.A.shape == (8, fan_in) and not m.B.any(), key
        assert m.A.abs().max() <= bound and m.A.abs().max() > 0.9 * bound, key
        assert abs(m.A.std().item() - bound / math.sqrt(3)) < 0.15 * bound / math.sqrt(3), key


@pytest.mark.parametrize("r,alpha,rslora", [(8, 16, False), (8, 16, True), (3, 5, True), (4, 6, False)])
def test_scale_is_peft_scaling(base_dir, r, alpha, rslora):
    theirs = peft.get_peft_model(load_base(base_dir), peft.LoraConfig(
        task_type="SEQ_CLS", **peft_kwargs(SIX, r=r, alpha=alpha, use_rslora=rslora)))
    scalings = {m.scaling["default"] for m in theirs.modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert len(scalings) == 1
    ours = Model.from_pretrained(base_dir, adapter=lora_config(SIX, r=r, alpha=alpha, use_rslora=rslora))
    assert {m.scale for m in loras(ours, "default").values()} == scalings
    assert scalings == {alpha / (math.sqrt(r) if rslora else r)}


# ------------------------------------------------------------------------------------------ 2. parity with peft

PARITY_CASES = {
    "query+value": dict(targets=("query", "value"), r=4, alpha=8),
    **{t: dict(targets=(t,), r=4, alpha=8) for t in SIX},
    "all six, rslora": dict(targets=SIX, r=3, alpha=5, use_rslora=True),
}


def peft_kwargs(targets=("query", "value"), r=4, alpha=8, use_rslora=False, dropout=0.0) -> dict:
    """peft.LoraConfig arguments for our lora_config arguments."""
    return dict(r=r, lora_alpha=alpha, use_rslora=use_rslora, lora_dropout=dropout,
                target_modules=peft_target_modules(targets))


def copy_from_peft(theirs, ours: Model, name: str, targets):
    """Our adapter `name` takes peft's A, B and classifier, by the two module trees' names."""
    src = {k.removeprefix("base_model.model."): p for k, p in theirs.named_parameters()}
    dst = dict(ours.named_parameters())
    with torch.no_grad():
        for t in targets:
            for i in range(L):
                for ab in "AB":
                    dst[f"{OUR_MODULE[t].format(i, n=name)}.{ab}"].copy_(
                        src[f"{PEFT_MODULE[t].format(i)}.lora_{ab}.default.weight"])
        for theirs_key, ours_key in OUR_HEAD.items():
            dst[f"heads.{name}.{ours_key}"].copy_(src[f"classifier.modules_to_save.default.{theirs_key}"])


@pytest.mark.parametrize("case", PARITY_CASES)
def test_parity_with_peft(base_dir, inputs, tmp_path, case):
    spec = PARITY_CASES[case]
    theirs = peft_saved(base_dir, tmp_path, **peft_kwargs(**spec))  # A, B and classifier random, std 0.2
    ids, mask = inputs
    expected = peft_logits(theirs, ids, mask)
    # Through the file peft saved.
    ours = Model.from_pretrained(base_dir).load_adapter(tmp_path, name="file")
    assert ours.adapter_config == lora_config(**spec)
    err_file = max_diff(logits(ours, ids, mask), expected, mask)
    # By copying the parameters.
    ours.add_adapter("copy", lora_config(**spec))
    copy_from_peft(theirs, ours, "copy", spec["targets"])
    err_copy = max_diff(logits(ours, ids, mask), expected, mask)
    print(f"peft parity {case}: file {err_file:.2e}, copy {err_copy:.2e}")
    assert err_file <= TOL and err_copy <= TOL
    # The LoRA matters: the same head without it is far off.
    ours.add_adapter("head only", lora_config(**spec))
    ours.heads["head only"].load_state_dict(ours.heads["copy"].state_dict())
    assert max_diff(logits(ours, ids, mask), expected, mask) > 1e-2


def test_dropout_is_inverted_dropout_on_the_lora_input():
    """A = B = I: the LoRA's output is scale * dropout(x), so each value is 0 or scale * x / (1 - p)."""
    p, n = 0.25, 2000
    lora = LoRA(C, C, lora_config(r=C, alpha=2.0 * C, dropout=p))
    with torch.no_grad():
        lora.A.copy_(torch.eye(C))
        lora.B.copy_(torch.eye(C))
    x = torch.rand(n, C) + 0.5
    torch.manual_seed(0)
    ratio = lora.train()(x) / (2.0 * x)
    kept = ratio != 0
    assert torch.allclose(ratio[kept], torch.full_like(ratio[kept], 1 / (1 - p)))
    assert abs((~kept).float().mean().item() - p) < 0.01  # 128,000 draws: std of the rate 0.0012
    assert torch.allclose(lora.eval()(x), 2.0 * x)


def test_dropout_reaches_the_lora_branch_only_and_eval_ignores_it(base_dir, inputs):
    """Two LoRAs with the same weights, dropout 0.5 and 0, the model's own dropouts off. With B = 0 training mode
    gives bit-equal logits (nothing of the base is dropped); with B random it does not (the branch is); eval mode
    gives bit-equal logits either way."""
    ids, mask = inputs
    model = Model.from_pretrained(base_dir).set_dropout(hidden=0.0, attention=0.0)
    for name, p in (("drop", 0.5), ("keep", 0.0)):
        model.add_adapter(name, lora_config(SIX, dropout=p))
        model.heads[name].dropout = 0.0
    for b_std in (0.0, 0.2):
        for name in ("drop", "keep"):
            randomize(model, name, b_std=b_std)
        runs = {}
        for mode in ("train", "eval"):
            getattr(model, mode)()
            torch.manual_seed(0)
            runs[mode] = [logits(model, ids, mask, adapter=name) for name in ("drop", "keep")]
        assert torch.equal(*runs["eval"])
        assert torch.equal(*runs["train"]) == (b_std == 0.0)
    model.train()
    torch.manual_seed(1)
    assert not torch.equal(logits(model, ids, mask, adapter="drop"), runs["train"][0])  # a fresh mask each time


# ------------------------------------------------------------------------------------------ 3. freeze_base

def test_freeze_base_trains_only_the_lora_and_its_head(base_dir, inputs):
    model = Model.from_pretrained(base_dir, adapter="houlsby")
    model.add_adapter("lora", lora_config(("query", "value"), r=8))  # active; the Houlsby adapter stays frozen
    summary = model.freeze_base()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"{OUR_MODULE[t].format(i, n='lora')}.{ab}" for t in ("query", "value") for i in range(L)
                for ab in "AB"} | {f"heads.lora.{k}" for k in OUR_HEAD.values()}
    assert trainable == expected
    count = L * 2 * (8 * C + C * 8) + (C * C + C + K * C + K)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == count
    assert summary.startswith(f"trainable params: {count:,} || ")

    base = {n: p.detach().clone() for n, p in model.named_parameters() if n not in trainable}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # frozen ones must not move
    model.train()
    ids, mask = inputs
    labels = torch.tensor([0, 1, 2, 0])
    for step in range(3):
        opt.zero_grad()
        F.cross_entropy(model(ids, mask), labels).backward()
        for key, m in loras(model, "lora").items():
            assert m.B.grad is not None and m.B.grad.abs().sum() > 0, key
            # B starts at zero, so A's gradient (s B^T ...) is exactly zero on the first step, as in peft.
            assert m.A.grad is not None and (m.A.grad.abs().sum() > 0) == (step > 0), key
        opt.step()
    for n, p in model.named_parameters():
        if n in base:
            assert p.grad is None and torch.equal(p, base[n]), n
    assert all(m.B.abs().sum() > 0 for m in loras(model, "lora").values())


def test_trainable_counts_at_roberta_base_shape():
    cfg = Config.from_hf(dict(ROBERTA_BASE, model_type="roberta"))
    with torch.device("meta"):
        model = Model(cfg, num_labels=2)
    counts = {}
    for name, adapter in (("LoRA r=8 query+value", lora_config(r=8, alpha=16)),
                          ("Houlsby reduction_factor=16", AdapterConfig("houlsby", reduction_factor=16))):
        model.add_adapter(name.split()[0], adapter)
        model.freeze_base()
        counts[name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        base = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("heads.", "head."))
                   and ".LoRA." not in n and ".Houlsby." not in n)
        print(f"roberta-base {name}: {counts[name]:,} trainable (with the 2-label head) of "
              f"{base + counts[name]:,} ({100 * counts[name] / (base + counts[name]):.2f}%)")
    head = 768 * 768 + 768 + 768 * 2 + 2
    assert counts["LoRA r=8 query+value"] == 12 * 2 * (8 * 768 + 768 * 8) + head == 887_042
    assert counts["Houlsby reduction_factor=16"] == 12 * 2 * (768 * 48 + 48 + 48 * 768 + 768) + head == 2_381_186


# ------------------------------------------------------------------------------------------ 4. merging

def base_state(model: Model) -> dict[str, torch.Tensor]:
    """Every tensor of the frozen base (adapters and heads left out), copied."""
    base = A.is_base(model)
    return {k: t.clone() for k, t in model.state_dict().items() if base.get(k, True)}


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("targets", [("query", "value"), ("key",), SIX], ids=["query+value", "key", "six"])
def test_merge_computes_the_same_and_unmerge_restores_the_base(base_dir, inputs, targets, dtype):
    ids, mask = inputs
    model = Model.from_pretrained(base_dir, dtype=dtype, adapter=lora_config(targets, use_rslora=True))
    model.add_adapter("houlsby", "houlsby")
    randomize(model, "default", b_std=0.2 if dtype == torch.float32 else 0.05)
    model.active_adapter = "default"
    before = base_state(model)
    unmerged = logits(model, ids, mask)
    model.merge_adapter()
    assert model.merged_adapter == "default"
    merged = logits(model, ids, mask)
    changed = {k for k, t in base_state(model).items() if not torch.equal(t, before[k])}
    assert changed == {f"layers.{i}.{w}.weight" for i in range(L) for w, ts in (
        ("attn.qkv", {"query", "key", "value"}), ("attn.proj", {"attn_out"}), ("ffn.up", {"ffn_up"}),
        ("ffn.down", {"ffn_down"})) if ts & set(targets)}
    for i in range(L):  # only the rows of the targeted parts of the fused q/k/v projection move
        w, w0 = model.layers[i].attn.qkv.weight, before[f"layers.{i}.attn.qkv.weight"]
        for j, part in enumerate(("query", "key", "value")):
            assert torch.equal(w[j * C:(j + 1) * C], w0[j * C:(j + 1) * C]) == (part not in targets), part
    model.unmerge_adapter()
    assert model.merged_adapter is None
    assert_same_tensors(base_state(model), before)
    assert torch.equal(logits(model, ids, mask), unmerged)
    err = rel(merged, unmerged)
    print(f"merged vs unmerged {'+'.join(targets)} {dtype}: relative {err:.2e}, "
          f"absolute {(merged - unmerged).abs().max().item():.2e}")
    if dtype == torch.float32:
        assert (merged - unmerged).abs().max().item() <= MERGE_TOL
    else:
        assert err < 3e-2  # bf16: the merged weights are rounded to bf16 once more (see the big measurement)


def test_merged_bf16_costs_bf16_precision(base_dir, inputs):
    """Trained-looking LoRA (B ~ N(0, 0.02)): merged into a bf16 base, the logits are as far from float32's as
    the unmerged bf16 model's (both rounding errors of one bf16 step; the report has the roberta-base figure)."""
    ids, mask = inputs
    errors = {}
    fp32 = Model.from_pretrained(base_dir, adapter=lora_config(SIX, r=8, alpha=16))
    randomize(fp32, "default", b_std=0.02)
    ref = logits(fp32, ids, mask)
    bf16 = Model.from_pretrained(base_dir, dtype=torch.bfloat16, adapter=lora_config(SIX, r=8, alpha=16))
    randomize(bf16, "default", b_std=0.02)
    errors["unmerged"] = rel(logits(bf16, ids, mask), ref)
    bf16.merge_adapter()
    errors["merged"] = rel(logits(bf16, ids, mask), ref)
    plain = Model.from_pretrained(base_dir)
    plain.head.load_state_dict(fp32.heads["default"].state_dict())
    errors["LoRA's own effect"] = rel(logits(plain, ids, mask), ref)
    print("bf16 vs fp32, relative logit error:", {k: f"{v:.2e}" for k, v in errors.items()})
    assert errors["merged"] < 1e-2 and errors["unmerged"] < 1e-2
    assert errors["LoRA's own effect"] > 10 * errors["merged"]  # the merge keeps the LoRA's effect


def test_merge_refusals_leave_the_model_as_it_was(base_dir, inputs):
    ids, mask = inputs
    model = Model.from_pretrained(base_dir, adapter=lora_config())
    model.add_adapter("other", lora_config(("key",)))
    model.add_adapter("bottleneck", "pfeiffer")
    for name in ("default", "other", "bottleneck"):
        randomize(model, name, seed=len(name))
    before = base_state(model)
    with pytest.raises(ValueError, match="'bottleneck' is a pfeiffer bottleneck adapter; only LoRA can be merged"):
        model.merge_adapter("bottleneck")
    with pytest.raises(KeyError, match="no adapter 'nope'"):
        model.merge_adapter("nope")
    with pytest.raises(RuntimeError, match="no adapter is merged"):
        model.unmerge_adapter()
    assert model.merged_adapter is None
    assert_same_tensors(base_state(model), before)

    unmerged = logits(model, ids, mask, adapter="default")
    model.merge_adapter("default")
    merged = base_state(model)
    for attempt, error, message in [
        (lambda: model.merge_adapter("default"), RuntimeError, "'default' is already merged"),
        (lambda: model.merge_adapter("other"), RuntimeError, "'default' is already merged"),
        (lambda: model.delete_adapter("default"), RuntimeError, "'default' is merged into the base weights"),
        (lambda: model.add_adapter("default", "lora", replace=True), RuntimeError, "'default' is merged"),
        (lambda: model(ids, mask, adapter="other"), RuntimeError, r"unmerge_adapter\(\) first to run \['other'\]"),
        (lambda: model(ids, mask, adapter=["default", "bottleneck", "default", "default"]), RuntimeError,
         r"every example must use it; unmerge_adapter\(\) first to run \['bottleneck'\]"),
        (lambda: model(ids, mask), RuntimeError, "'default' is merged"),  # the active adapter is "bottleneck"
    ]:
        with pytest.raises(error, match=message):
            attempt()
        assert model.merged_adapter == "default" and "default" in model.adapter_names
        assert_same_tensors(base_state(model), merged)
    assert torch.equal(logits(model, ids, mask, adapter=["default"] * 4), logits(model, ids, mask, adapter="default"))
    assert (logits(model, ids, mask, adapter="default") - unmerged).abs().max() <= MERGE_TOL
    model.delete_adapter("other")  # another adapter may go
    model.unmerge_adapter()
    assert_same_tensors(base_state(model), before)
    model.active_adapter = None
    model.merge_adapter("default")
    with pytest.raises(RuntimeError, match="unmerge it before running without it"):
        model(ids, mask)
    model.unmerge_adapter()
    with torch.no_grad():  # a non-finite weight in the last layer: the layers before it were merged already
        model.layers[L - 1].attn.qkv_lora["default"]["value"].B[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'default' has non-finite LoRA weights; nothing was merged"):
        model.merge_adapter("default")
    assert model.merged_adapter is None
    assert_same_tensors(base_state(model), before)


def assert_same_files(a, b):
    """Same JSON, same tensors (not the same bytes: safetensors orders header metadata as it likes)."""
    assert sorted(f.name for f in a.iterdir()) == sorted(f.name for f in b.iterdir())
    for f in a.iterdir():
        if f.suffix == ".json":
            assert json.loads(f.read_text()) == json.loads((b / f.name).read_text()), f
        else:
            assert_same_tensors(load_file(f), load_file(b / f.name))


def test_save_while_merged_saves_the_lora_and_the_unmerged_fingerprint(base_dir, inputs, tmp_path):
    ids, mask = inputs
    model = Model.from_pretrained(base_dir, adapter=lora_config(SIX))
    randomize(model, "default")
    expected = logits(model, ids, mask)
    fingerprint = model.base_fingerprint()
    model.merge_adapter()
    assert W.fingerprint(model) != fingerprint  # the merged weights do show in a fresh hash...
    assert model.base_fingerprint() == fingerprint  # ...but the model's fingerprint is its unmerged base's
    for fmt in ("roberta_lite", "peft"):
        model.save_adapter(tmp_path / f"merged-{fmt}", format=fmt)
    model.unmerge_adapter()
    assert model.base_fingerprint() == fingerprint == W.fingerprint(model)
    for fmt in ("roberta_lite", "peft"):
        model.save_adapter(tmp_path / f"unmerged-{fmt}", format=fmt)
        assert_same_files(tmp_path / f"unmerged-{fmt}", tmp_path / f"merged-{fmt}")
        fresh = Model.from_pretrained(base_dir).load_adapter(tmp_path / f"merged-{fmt}")
        assert torch.equal(logits(fresh, ids, mask), expected)


def test_fingerprint_first_asked_while_merged_is_the_unmerged_one(base_dir):
    model = Model.from_pretrained(base_dir, adapter=lora_config(SIX))
    randomize(model, "default")
    model.merge_adapter()
    assert model.base_fingerprint() == Model.from_pretrained(base_dir).base_fingerprint()


# ------------------------------------------------------------------------------------------ 5. mixed batches

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mixed_batch_of_lora_and_bottleneck_adapters(base_dir, inputs, dtype):
    """Each example equals its own adapter's run over the whole batch (heads of 3 and 2 labels: -inf padding).
    Eight examples, each adapter on two of them in different places, so a mixed-up row order would show."""
    more = batch(CFG["vocab_size"], CFG["pad_token_id"], T=17, seed=2, left=True)
    ids, mask = (torch.cat(pair) for pair in zip(inputs, more))
    model = Model.from_pretrained(base_dir, dtype=dtype)
    model.add_adapter("qv", lora_config())
    model.add_adapter("six", lora_config(SIX, r=2, alpha=3.0, use_rslora=True))
    model.add_adapter("houlsby", "houlsby", num_labels=2)
    model.add_adapter("pfeiffer", "pfeiffer")
    for seed, name in enumerate(model.adapter_names):
        randomize(model, name, seed=seed)
    names = ["six", "houlsby", "qv", "pfeiffer", "qv", "six", "pfeiffer", "houlsby"]
    with torch.no_grad():
        mixed, hidden = model(ids, mask, adapter=names), model.encode(ids, mask, adapter=names)
        for i, name in enumerate(names):
            alone = model(ids, mask, adapter=name)[i]
            k = alone.shape[0]
            assert (mixed[i, :k] - alone).abs().max() <= MERGE_TOL, name
            assert torch.isneginf(mixed[i, k:]).all()
            h = model.encode(ids, mask, adapter=name)[i]
            assert (hidden[i] - h)[mask[i].bool()].abs().max() <= MERGE_TOL, name
    for i, name in enumerate(names):  # each adapter matters: another adapter's run differs on that example
        other = names[(i + 1) % len(names)]
        with torch.no_grad():
            assert (model.encode(ids, mask, adapter=other)[i] - hidden[i])[mask[i].bool()].abs().max() > 1e-2


# ------------------------------------------------------------------------------------------ 6. bf16 base

def test_bf16_base_with_lora_is_within_bf16_bounds(base_dir, inputs):
    ids, mask = inputs
    fp32 = Model.from_pretrained(base_dir, adapter=lora_config(SIX))
    bf16 = Model.from_pretrained(base_dir, dtype=torch.bfloat16, adapter=lora_config(SIX))
    for m in (fp32, bf16):
        randomize(m, "default")
    assert bf16.layers[0].attn.qkv.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for _, p in adapter_params(bf16, "default"))
    with torch.no_grad():
        ref, got = fp32(ids, mask), bf16(ids, mask)
        h_ref, h_got = fp32.encode(ids, mask), bf16.encode(ids, mask)
    assert got.dtype == torch.float32 and h_got.dtype == torch.float32
    rel_logits = rel(got, ref)
    rel_hidden = max_diff(h_got, h_ref, mask) / h_ref[mask.bool()].abs().max().item()
    print(f"bf16 base + LoRA vs fp32: relative error logits {rel_logits:.2e}, hidden {rel_hidden:.2e}")
    assert rel_logits < 1e-2 and rel_hidden < 1e-2  # test_parity's bounds for the bare bf16 base


# ------------------------------------------------------------------------------------------ 7. files

FILE_CASES = {
    "query+value": dict(targets=("query", "value"), r=4, alpha=8.0),
    "six, rslora, dropout": dict(targets=SIX, r=3, alpha=5.0, use_rslora=True, dropout=0.1),
    "ffn_down alone": dict(targets=("ffn_down",), r=2, alpha=2.5),
}


@pytest.mark.parametrize("case", FILE_CASES)
def test_round_trip_native_and_peft(base_dir, inputs, tmp_path, case):
    ids, mask = inputs
    model = Model.from_pretrained(base_dir, adapter=lora_config(**FILE_CASES[case]))
    randomize(model, "default")
    model.labels = ["neg", "neu", "pos"]
    expected = logits(model, ids, mask)
    state = model.adapter_state_dict()
    for fmt in ("roberta_lite", "peft"):
        model.save_adapter(tmp_path / fmt, format=fmt)
        back = Model.from_pretrained(base_dir).load_adapter(tmp_path / fmt)
        assert back.adapter_config == model.adapter_config and back.labels == ["neg", "neu", "pos"]
        assert_same_tensors(back.adapter_state_dict(), state)
        assert torch.equal(logits(back, ids, mask), expected)
    # peft loads our file with no extra arguments, onto transformers' model, and computes the same.
    theirs = peft.PeftModel.from_pretrained(load_base(base_dir), tmp_path / "peft").eval()
    err = max_diff(peft_logits(theirs, ids, mask), expected, mask)
    print(f"peft loads our {case}: {err:.2e}")
    assert err <= TOL
    saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 for t in saved.values())


# ------------------------------------------------------------------------------------------ 8. learning

def test_lora_alone_learns_a_tiny_task(tmp_path):
    """Head frozen too: only the LoRA matrices train, so the loss can fall only through them. The task: is
    token 5 in the sequence?"""
    torch.manual_seed(0)
    cfg = dict(CFG, hidden_size=32, num_attention_heads=2, intermediate_size=64, num_labels=2)
    make_hf("RobertaForSequenceClassification", **cfg).save_pretrained(tmp_path)
    model = Model.from_pretrained(tmp_path, adapter=lora_config(SIX, r=4, alpha=8.0)).set_dropout(0.0, 0.0)
    model.freeze_base()
    model.active_head.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(6, cfg["vocab_size"], (64, 10), generator=g)
    labels = torch.arange(64) % 2
    ids[labels == 1, torch.randint(1, 10, (32,), generator=g)] = 5
    ids[:, 0] = 0
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(model(ids), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"LoRA-only training loss: {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.3 * losses[0]
