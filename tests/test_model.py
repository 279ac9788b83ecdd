"""Model pieces that parity with transformers cannot see: training-mode dropout and its controls."""

from __future__ import annotations

import torch

from roberta_lite import Config, Model
from roberta_lite.kernels import dropout


def test_cheap_dropout_rate_scale_and_gradient():
    torch.manual_seed(0)
    x = torch.ones(1000, 1000, requires_grad=True)
    y = dropout(x, 0.1, training=True)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.1) < 3e-3  # 1e6 draws: the standard error is 3e-4
    kept = y[y != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / 0.9), rtol=1e-4)
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient passes exactly where the value did, scaled alike
    assert dropout(x, 0.1, training=False) is x and dropout(x, 0.0, training=True) is x


def test_cheap_dropout_is_random_and_seeded():
    x = torch.ones(64, 64, dtype=torch.bfloat16)
    torch.manual_seed(1)
    a, b = dropout(x, 0.5, True), dropout(x, 0.5, True)
    torch.manual_seed(1)
    assert not torch.equal(a, b) and torch.equal(a, dropout(x, 0.5, True))
    assert a.dtype == torch.bfloat16


def test_set_dropout_reaches_every_module():
    with torch.device("meta"):
        model = Model(Config(num_layers=2, hidden_size=32, num_heads=4, ffn_size=64, vocab_size=50))
    model.set_dropout(hidden=0.2, attention=0.0)
    assert all(layer.attn.dropout == 0.0 and layer.dropout == 0.2 for layer in model.layers)
    assert model.embed.dropout == 0.2 and model.config.attention_dropout == 0.0


def test_training_mode_is_stochastic_and_eval_is_not():
    torch.manual_seed(0)
    model = Model(Config(num_layers=2, hidden_size=32, num_heads=4, ffn_size=64, vocab_size=50), adapter="houlsby")
    ids = torch.randint(3, 50, (2, 9))
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(ids), model(ids))
        model.eval()
        assert torch.equal(model(ids), model(ids))


def test_training_attention_path_equals_fused_kernel():
    """Training on CPU writes attention out (softmax(qk^T)v); with dropout off it must equal eval's fused SDPA."""
    torch.manual_seed(0)
    model = Model(Config(num_layers=2, hidden_size=32, num_heads=4, ffn_size=64, vocab_size=50), adapter="pfeiffer")
    model.set_dropout(hidden=0.0, attention=0.0)
    model.active_head.dropout = 0.0
    ids = torch.randint(3, 50, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:], mask[2, :3] = 0, 0
    ids[mask == 0] = model.config.pad_id
    with torch.no_grad():
        model.train()
        trained = model.encode(ids, mask), model(ids, mask)
        model.eval()
        fused = model.encode(ids, mask), model(ids, mask)
    for a, b in zip(trained, fused):
        assert (a - b)[..., :].abs().max().item() < 1e-5


def test_classifier_computes_only_first_row_in_last_layer():
    """forward() skips the last layer's rows other than <s>; the logits must not change."""
    torch.manual_seed(0)
    model = Model(Config(num_layers=3, hidden_size=32, num_heads=4, ffn_size=64, vocab_size=50), adapter="houlsby")
    model.eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "up" in n:
                p.normal_()
    ids = torch.randint(3, 50, (2, 7))
    with torch.no_grad():
        full = model.active_head(model.encode(ids))
        assert torch.allclose(model(ids), full, atol=1e-6)
