"""roberta_lite equals transformers' RoBERTa on the same weights (fp32, max abs diff <= 1e-4)."""

from __future__ import annotations

import pytest
import torch

from checkpoints import KINDS, ROBERTA_BASE, TINY, save_hf
from roberta_lite import Model

TOL = 1e-4


def batch(vocab: int, pad: int, B: int = 4, T: int = 23, seed: int = 1, left: bool = False):
    """Ragged lengths (T, T-5, 7, 2) with <s>/</s> ids avoided; padding right, or left when `left`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for i, n in enumerate([T, T - 5, 7, 2][:B]):
        if left:
            ids[i, : T - n], mask[i, : T - n] = pad, 0
        else:
            ids[i, n:], mask[i, n:] = pad, 0
    return ids, mask


def max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Over real tokens only: transformers' outputs at padding positions are not meaningful either."""
    if a.dim() == 2:
        return (a - b).abs().max().item()
    return (a - b)[mask.bool()].abs().max().item()


@pytest.fixture(scope="module", params=KINDS)
def tiny(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    hf = save_hf(d, request.param, **TINY)
    return request.param, hf, Model.from_pretrained(d)


def reference(kind, hf, ids, mask):
    with torch.no_grad():
        if kind == "RobertaModel":
            return hf(input_ids=ids, attention_mask=mask).last_hidden_state
        if kind == "RobertaForMaskedLM":
            return hf.roberta(input_ids=ids, attention_mask=mask).last_hidden_state, hf(input_ids=ids, attention_mask=mask).logits
        return hf.roberta(input_ids=ids, attention_mask=mask).last_hidden_state, hf(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
def test_tiny_parity(tiny, left):
    kind, hf, ours = tiny
    ids, mask = batch(TINY["vocab_size"], TINY["pad_token_id"], left=left)
    with torch.no_grad():
        hidden = ours.encode(ids, mask)
        if kind == "RobertaModel":
            assert max_diff(reference(kind, hf, ids, mask), hidden, mask) <= TOL
            return
        ref_hidden, ref_logits = reference(kind, hf, ids, mask)
        assert max_diff(ref_hidden, hidden, mask) <= TOL
        logits = ours.mlm_logits(ids, mask) if kind == "RobertaForMaskedLM" else ours(ids, mask)
        assert logits.shape == ref_logits.shape
        assert max_diff(ref_logits, logits, mask) <= TOL


def test_left_and_right_padding_agree(tiny):
    """RoBERTa counts positions over real tokens only, so padding side must not change a text's states."""
    _, _, ours = tiny
    r_ids, r_mask = batch(TINY["vocab_size"], TINY["pad_token_id"])
    l_ids, l_mask = batch(TINY["vocab_size"], TINY["pad_token_id"], left=True)
    # build the left-padded batch from the same texts as the right-padded one
    for i in range(len(r_ids)):
        n = int(r_mask[i].sum())
        l_ids[i, -n:] = r_ids[i, :n]
    with torch.no_grad():
        r, l = ours.encode(r_ids, r_mask), ours.encode(l_ids, l_mask)
    for i in range(len(r_ids)):
        n = int(r_mask[i].sum())
        assert (r[i, :n] - l[i, -n:]).abs().max().item() <= TOL


def test_classifier_labels_from_checkpoint(tmp_path):
    cfg = dict(TINY, num_labels=3, id2label={0: "neg", 1: "neutral", 2: "pos"}, label2id={"neg": 0, "neutral": 1, "pos": 2})
    save_hf(tmp_path, "RobertaForSequenceClassification", **cfg)
    model = Model.from_pretrained(tmp_path)
    assert model.num_labels == 3 and model.labels == ["neg", "neutral", "pos"]
    assert model.load_report["fresh"] == []
    # asking for another number of classes gives a fresh head, reported as such
    model = Model.from_pretrained(tmp_path, num_labels=2)
    assert model.num_labels == 2 and "head.out.weight" in model.load_report["fresh"]


def test_roberta_base_shape_parity(tmp_path):
    """Full roberta-base shape (125M parameters, 50265-token vocabulary), classifier checkpoint."""
    hf = save_hf(tmp_path, "RobertaForSequenceClassification", **ROBERTA_BASE)
    ours = Model.from_pretrained(tmp_path)
    ids, mask = batch(ROBERTA_BASE["vocab_size"], 1, B=3, T=64)
    with torch.no_grad():
        ref_hidden = hf.roberta(input_ids=ids, attention_mask=mask).last_hidden_state
        ref_logits = hf(input_ids=ids, attention_mask=mask).logits
        hidden, logits = ours.encode(ids, mask), ours(ids, mask)
    d_hidden, d_logits = max_diff(ref_hidden, hidden, mask), max_diff(ref_logits, logits, mask)
    print(f"roberta-base shape parity: hidden {d_hidden:.2e}, logits {d_logits:.2e}")
    assert d_hidden <= TOL and d_logits <= TOL

    # The fast path: the whole frozen base in bf16 (activations too), head in fp32. Within bf16's tolerance.
    fast = Model.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert fast.embed.tok.weight.dtype == torch.bfloat16 and fast.head.out.weight.dtype == torch.float32
    with torch.no_grad():
        h16, l16 = fast.encode(ids, mask).float(), fast(ids, mask)
    rel_hidden = max_diff(ref_hidden, h16, mask) / ref_hidden[mask.bool()].abs().max().item()
    rel_logits = max_diff(ref_logits, l16, mask) / ref_logits.abs().max().item()
    print(f"bf16 vs fp32 relative error: hidden {rel_hidden:.2e}, logits {rel_logits:.2e}")
    assert l16.dtype == torch.float32
    assert rel_hidden < 1e-2 and rel_logits < 1e-2  # transformers under bf16 autocast: ~5e-3 on both


def test_unpadded_batch_without_mask(tiny):
    _, hf, ours = tiny
    ids = torch.randint(3, TINY["vocab_size"], (2, 11))
    with torch.no_grad():
        ref = hf.roberta(input_ids=ids).last_hidden_state if hasattr(hf, "roberta") else hf(input_ids=ids).last_hidden_state
        assert (ref - ours.encode(ids)).abs().max().item() <= TOL
