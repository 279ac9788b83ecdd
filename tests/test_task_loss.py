"""Task kinds: the loss equals transformers' own for each problem_type, and the best epoch is chosen right."""

from __future__ import annotations

import pytest
import torch

from roberta_lite.tasks import TASKS

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("kind, problem_type, num_labels", [
    ("classification", "single_label_classification", 3),
    ("regression", "regression", 1),
    ("multilabel", "multi_label_classification", 4),
])
def test_loss_equals_transformers(kind, problem_type, num_labels):
    """The same logits and labels through transformers' RobertaForSequenceClassification loss code."""
    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=20, max_position_embeddings=20, num_labels=num_labels,
                                     problem_type=problem_type)
    hf = transformers.RobertaForSequenceClassification(cfg).eval()
    ids = torch.randint(3, 50, (6, 7))
    y = {"classification": torch.randint(0, 3, (6,)), "regression": torch.rand(6) * 5,
         "multilabel": torch.randint(0, 2, (6, 4)).float()}[kind]
    with torch.no_grad():
        out = hf(input_ids=ids, labels=y)
    task = TASKS[kind]
    assert torch.allclose(task.loss(out.logits, task.label_tensor(y.numpy())), out.loss, atol=1e-6)
    metrics = task.metrics(out.logits, task.label_tensor(y.numpy()))
    assert abs(metrics["loss"] - out.loss.item()) < 1e-5 and task.primary in metrics


def test_ties_on_the_metric_go_to_the_lower_loss():
    """Early stopping once kept the first epoch that reached the best accuracy even as the loss kept falling."""
    t = TASKS["classification"]
    first = {"accuracy": 1.0, "loss": 0.62}
    assert t.better(first, None)
    assert t.better({"accuracy": 1.0, "loss": 0.19}, first)  # same accuracy, lower loss: better
    assert not t.better({"accuracy": 1.0, "loss": 0.70}, first)
    assert t.better({"accuracy": 1.0, "loss": 5.0}, {"accuracy": 0.9, "loss": 0.1})  # the metric comes first
    r = TASKS["regression"]
    assert r.primary == "pearson" and not r.better({"pearson": float("nan"), "loss": 0.1}, {"pearson": 0.2, "loss": 1})
