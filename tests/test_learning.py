"""Frozen pretrained base + adapters really learn: the real MiniLM-L6 checkpoint on an easy sentiment task."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from checkpoints import build_minilm
from roberta_lite import Model, Tokenizer, runtime

POS = ["wonderful", "excellent", "brilliant", "delightful", "superb", "moving", "charming", "great", "beautiful",
       "enjoyable", "fantastic", "touching", "hilarious", "gripping", "masterful", "lovely"]
NEG = ["terrible", "awful", "boring", "dreadful", "painful", "dull", "horrible", "tedious", "lousy", "stupid",
       "pointless", "awkward", "bland", "clumsy", "annoying", "mediocre"]
TEMPLATES = ["the movie was {}.", "what a {} film, honestly.", "i found the acting {} and the plot {}.",
             "overall a {} experience.", "the director made something {}.", "{} from start to finish."]


def sentences(words_pos, words_neg, n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.randrange(2)
        words = words_pos if label else words_neg
        t = rng.choice(TEMPLATES)
        out.append((t.format(*(rng.choice(words) for _ in range(t.count("{}")))), label))
    return out


@pytest.fixture(autouse=True)
def one_thread():
    """One thread, as test_train.py's runs: with all threads, a busy second core made these tests 7x slower
    (OpenMP's threads wait on each other)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    return build_minilm(tmp_path_factory.mktemp("minilm"))


def train_and_eval(path, dtype, kind="houlsby", steps=60, seed=0):
    torch.manual_seed(seed)
    tok = Tokenizer.from_pretrained(path)
    model = Model.from_pretrained(path, num_labels=2, adapter=kind, dtype=dtype)
    model.freeze_base()
    # unseen words at test time: the adapter must use what the pretrained base knows about them
    train = sentences(POS[:10], NEG[:10], 2000, seed=1)
    test = sentences(POS[10:], NEG[10:], 300, seed=2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    rng = random.Random(seed)
    for step in range(steps):
        b = rng.sample(train, 32)
        ids, mask = tok([t for t, _ in b], max_length=64)
        loss = F.cross_entropy(model(ids, mask), torch.tensor([y for _, y in b]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        ids, mask = tok([t for t, _ in test], max_length=64)
        pred = model(ids, mask).argmax(-1)
    return (pred == torch.tensor([y for _, y in test])).float().mean().item()


@pytest.mark.parametrize("kind,dtype", [("houlsby", torch.float32), ("houlsby", torch.bfloat16),
                                        ("pfeiffer", torch.bfloat16)], ids=["houlsby-fp32", "houlsby-bf16", "pfeiffer-bf16"])
def test_adapters_learn_sentiment(minilm, kind, dtype):
    if dtype == torch.bfloat16 and not runtime.cpu_has_fast_bf16():  # bf16 numerics: test_parity covers them
        pytest.skip("this CPU has no native bf16: a bf16 training run here takes minutes, not seconds")
    acc = train_and_eval(minilm, dtype, kind=kind)
    print(f"MiniLM + {kind}, {dtype}: held-out accuracy {acc:.3f}")
    assert acc >= 0.9
