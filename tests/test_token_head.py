"""Token heads: a label for every token (model.TokenHead), on adapters and from transformers' token checkpoints.

transformers' RobertaForTokenClassification is the reference: the same weights give the same (B, T, K) logits.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from checkpoints import TINY, save_hf
from roberta_lite import Model
from roberta_lite.adapters import adapter_tensors
from roberta_lite.model import ClassificationHead, TokenHead
from test_parity import TOL, batch

TAGS = ["O", "B-person", "I-person", "B-place", "I-place"]


def randomize(model: Model, name: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in adapter_tensors(model, name):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.fixture(scope="module")
def token_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("token")
    labels = {i: t for i, t in enumerate(TAGS)}
    hf = save_hf(d, "RobertaForTokenClassification", num_labels=len(TAGS), id2label=labels,
                 label2id={t: i for i, t in labels.items()}, **TINY)
    return d, hf


@pytest.fixture(scope="module")
def sentence_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("sentence")
    save_hf(d, "RobertaForSequenceClassification", **TINY)
    return d


def test_token_checkpoint_head_parity(token_ckpt):
    """classifier.weight (K, C) loads as a TokenHead; logits equal transformers' on every real token."""
    d, hf = token_ckpt
    model = Model.from_pretrained(d)
    assert isinstance(model.head, TokenHead) and model.labels == TAGS and model.load_report["fresh"] == []
    ids, mask = batch(TINY["vocab_size"], TINY["pad_token_id"])
    with torch.no_grad():
        ours, ref = model(ids, mask), hf(input_ids=ids, attention_mask=mask).logits
    assert ours.shape == ref.shape == (4, 23, len(TAGS)) and ours.dtype == torch.float32
    assert (ours - ref)[mask.bool()].abs().max().item() <= TOL
    # a fresh adapter on it copies the token head (trained weights and names) unless told otherwise
    model.add_adapter("ner", "houlsby")
    assert isinstance(model.heads["ner"], TokenHead) and model.labels == TAGS
    assert torch.equal(model.heads["ner"].out.weight, model.head.out.weight)
    assert model.heads["ner"].out.weight is not model.head.out.weight  # a copy: training it leaves `head` alone


def test_token_checkpoint_with_another_label_count_gets_a_fresh_token_head(token_ckpt):
    model = Model.from_pretrained(token_ckpt[0], num_labels=3)
    assert isinstance(model.head, TokenHead) and model.num_labels == 3
    assert "head.out.weight" in model.load_report["fresh"]


def test_adapter_token_head_is_dropout_and_one_linear_on_every_token(sentence_ckpt):
    model = Model.from_pretrained(sentence_ckpt)
    model.add_adapter("ner", "pfeiffer", labels=TAGS, task="token-classification")
    randomize(model, "ner")
    head = model.heads["ner"]
    assert isinstance(head, TokenHead) and model.labels == TAGS and model.active_head.task == "token-classification"
    assert [k for k, _ in adapter_tensors(model, "ner") if k.startswith("head.")] == ["head.out.weight", "head.out.bias"]
    ids, mask = batch(TINY["vocab_size"], TINY["pad_token_id"])
    with torch.no_grad():
        logits = model(ids, mask)
        hidden = model.encode(ids, mask)
    assert logits.shape == (4, 23, len(TAGS))
    assert (logits - F.linear(hidden, head.out.weight, head.out.bias)).abs().max().item() <= 1e-6


def test_mixed_batches_of_token_heads_and_the_refused_mix(sentence_ckpt):
    model = Model.from_pretrained(sentence_ckpt)
    model.add_adapter("ner", "houlsby", labels=TAGS, task="token-classification")
    model.add_adapter("pos", "lora", num_labels=3, task="token-classification")
    model.add_adapter("sentiment", "houlsby", num_labels=2)
    for i, name in enumerate(model.adapter_names):
        randomize(model, name, seed=i)
    ids, mask = batch(TINY["vocab_size"], TINY["pad_token_id"])
    names = ["ner", "pos", "pos", "ner"]
    with torch.no_grad():
        mixed = model(ids, mask, adapter=names)
        alone = {n: model(ids, mask, adapter=n) for n in ("ner", "pos")}
    assert mixed.shape == (4, 23, len(TAGS))  # the widest head; narrower ones padded with -inf
    for i, n in enumerate(names):
        k = alone[n].shape[-1]
        real = mask[i].bool()
        assert (mixed[i, real, :k] - alone[n][i, real]).abs().max().item() <= 1e-5
        assert torch.isneginf(mixed[i, :, k:]).all()
    with pytest.raises(ValueError, match=r"mixes token and sentence heads \(ner, sentiment\)"):
        model(ids, mask, adapter=["ner", "sentiment", "ner", "sentiment"])


def test_a_token_task_on_a_sentence_model_needs_its_labels(sentence_ckpt):
    model = Model.from_pretrained(sentence_ckpt)
    with pytest.raises(ValueError, match="task 'token-classification' needs a TokenHead.*give num_labels or labels"):
        model.add_adapter("ner", "houlsby", task="token-classification")
    assert model.adapter_names == []  # nothing was added
    with pytest.raises(ValueError, match="task 'tagging'"):
        model.add_adapter("ner", "houlsby", task="tagging")
    model.add_adapter("ner", "houlsby", labels=TAGS, task="token-classification")
    model.set_num_labels(3)  # a fresh head keeps its kind
    assert isinstance(model.heads["ner"], TokenHead) and model.num_labels == 3
    model.add_adapter("cls", "houlsby")  # the default task still copies the sentence classifier
    assert isinstance(model.heads["cls"], ClassificationHead)


def test_token_adapter_file_round_trip(sentence_ckpt, tmp_path):
    model = Model.from_pretrained(sentence_ckpt)
    model.add_adapter("ner", "houlsby", labels=TAGS, task="token-classification")
    randomize(model, "ner")
    model.save_adapter(tmp_path / "ner")
    ids, mask = batch(TINY["vocab_size"], TINY["pad_token_id"])
    other = Model.from_pretrained(sentence_ckpt).load_adapter(tmp_path / "ner")
    assert isinstance(other.active_head, TokenHead) and other.labels == TAGS
    with torch.no_grad():
        assert torch.equal(other(ids, mask), model(ids, mask))


def test_token_head_on_a_bf16_base_and_training(sentence_ckpt):
    """bf16 base: float32 logits close to the fp32 model's; training with ignored (-100) tokens reaches the head."""
    fp32 = Model.from_pretrained(sentence_ckpt)
    bf16 = Model.from_pretrained(sentence_ckpt, dtype=torch.bfloat16)
    for m in (fp32, bf16):
        m.add_adapter("ner", "houlsby", labels=TAGS, task="token-classification")
        randomize(m, "ner")
    ids, mask = batch(TINY["vocab_size"], TINY["pad_token_id"])
    with torch.no_grad():
        a, b = fp32(ids, mask), bf16(ids, mask)
    assert b.dtype == torch.float32
    assert (a - b)[mask.bool()].abs().max().item() <= 3e-2 * a[mask.bool()].abs().max().item()
    bf16.freeze_base()
    bf16.train()
    labels = torch.randint(0, len(TAGS), ids.shape)
    labels[~mask.bool()] = -100
    loss = F.cross_entropy(bf16(ids, mask).flatten(0, 1), labels.flatten(), ignore_index=-100)
    loss.backward()
    assert bf16.heads["ner"].out.weight.grad.abs().sum() > 0
    assert bf16.layers[0].ffn_adapter["ner"].down.weight.grad.abs().sum() > 0
