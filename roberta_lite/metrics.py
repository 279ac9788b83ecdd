"""Evaluation metrics for the three tasks of :data:`roberta_lite.data.TASKS`, in numpy alone.

* classification: accuracy of the arg-max class;
* regression: Pearson and Spearman correlation (ties get average ranks, as scipy and GLUE's STS-B
  scoring do) and the mean squared error;
* multilabel: micro and macro F1 and exact-match accuracy of the labels whose logit is above 0
  (probability above 1/2).

For tagging (named entities), :func:`entity_scores` gives conlleval's entity-level precision, recall and F1
(an entity counts only with its exact span and type), per entity type too, and the share of words tagged right.

A correlation is undefined when either side is constant; it is then NaN, as scipy returns it, so a
model that predicts one value for everything never looks like the best one. A label that is neither
true nor predicted anywhere has F1 0 in the macro average, as scikit-learn's default counts it.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np

from roberta_lite.tagging import entities

__all__ = [
    "MAIN_METRIC",
    "accuracy",
    "compute_metrics",
    "entity_scores",
    "mse",
    "multilabel_scores",
    "pearson",
    "rankdata",
    "spearman",
]

#: The metric that picks the best epoch for each task (higher is better for all; token classification: the
#: entity F1 of :func:`entity_scores`).
MAIN_METRIC = {"classification": "accuracy", "regression": "pearson", "multilabel": "micro_f1",
               "token-classification": "f1"}


def _vectors(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two float64 vectors of one length: an ``(N, 1)`` head output counts as ``(N,)``."""
    p = np.asarray(pred, dtype=np.float64).reshape(-1)
    t = np.asarray(target, dtype=np.float64).reshape(-1)
    if p.shape != t.shape or p.size == 0:
        raise ValueError(f"need two non-empty sequences of one length, got {p.size} and {t.size} values")
    return p, t


def pearson(pred: np.ndarray, target: np.ndarray) -> float:
    """Pearson's r; NaN when either side is constant."""
    p, t = _vectors(pred, target)
    p, t = p - p.mean(), t - t.mean()
    denominator = np.sqrt((p * p).sum() * (t * t).sum())
    if denominator == 0.0:
        return float("nan")
    return float(np.clip((p * t).sum() / denominator, -1.0, 1.0))


def rankdata(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the average of their ranks (scipy's ``rankdata``, "average")."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    order = np.argsort(v, kind="stable")
    sorted_v = v[order]
    # Runs of equal values: each gets the mean of the ranks first..last of its run.
    starts = np.flatnonzero(np.r_[True, sorted_v[1:] != sorted_v[:-1]])
    ends = np.r_[starts[1:], v.size]
    average = (starts + 1 + ends) / 2.0  # mean of start+1 .. end
    ranks = np.empty(v.size, dtype=np.float64)
    ranks[order] = np.repeat(average, ends - starts)
    return ranks


def spearman(pred: np.ndarray, target: np.ndarray) -> float:
    """Spearman's rho: Pearson's r of the average ranks; NaN when either side is constant or not finite."""
    p, t = _vectors(pred, target)
    if not (np.isfinite(p).all() and np.isfinite(t).all()):  # a NaN has no rank; scipy's answer is NaN too
        return float("nan")
    return pearson(rankdata(p), rankdata(t))


def mse(pred: np.ndarray, target: np.ndarray) -> float:
    p, t = _vectors(pred, target)
    return float(np.mean((p - t) ** 2))


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows whose arg-max over ``(N, C)`` logits is the ``(N,)`` class id."""
    logits, labels = np.asarray(logits), np.asarray(labels).reshape(-1)
    if logits.ndim != 2 or logits.shape[0] != labels.size or labels.size == 0:
        raise ValueError(f"need (N, C) logits and N labels, got {logits.shape} and {labels.size}")
    return float(np.mean(logits.argmax(axis=1) == labels))


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """2tp / (2tp + fp + fn), 0 where nothing was true or predicted."""
    denominator = 2 * tp + fp + fn
    return np.divide(2.0 * tp, denominator, out=np.zeros(np.shape(tp), dtype=np.float64), where=denominator > 0)


def multilabel_scores(predicted: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Micro F1, macro F1 and exact-match accuracy of ``(N, K)`` 0/1 predictions against ``(N, K)`` 0/1 targets.

    Micro F1 pools every (example, label) decision; macro F1 averages the F1 of each label column;
    exact match is the share of examples whose whole label set is right.
    """
    pred, true = np.asarray(predicted) > 0.5, np.asarray(target) > 0.5
    if pred.shape != true.shape or pred.ndim != 2 or pred.size == 0:
        raise ValueError(f"need two (N, K) arrays of one shape, got {pred.shape} and {true.shape}")
    tp = (pred & true).sum(axis=0)
    fp = (pred & ~true).sum(axis=0)
    fn = (~pred & true).sum(axis=0)
    return {
        "micro_f1": float(_f1(tp.sum(), fp.sum(), fn.sum())),
        "macro_f1": float(_f1(tp, fp, fn).mean()),
        "exact_match": float(np.mean((pred == true).all(axis=1))),
    }


def compute_metrics(task: str, outputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """All metrics of ``task`` from the model's raw outputs and :meth:`TextDataset.label_array` labels.

    ``outputs`` are ``(N, C)`` logits (classification), ``(N,)`` or ``(N, 1)`` scores (regression) or
    ``(N, K)`` logits (multilabel: a label is predicted when its logit is above 0).
    """
    outputs = np.asarray(outputs, dtype=np.float64)
    if task == "classification":
        return {"accuracy": accuracy(outputs, labels)}
    if task == "regression":
        return {"pearson": pearson(outputs, labels), "spearman": spearman(outputs, labels), "mse": mse(outputs, labels)}
    if task == "multilabel":
        return multilabel_scores(outputs > 0.0, labels)
    if task == "token-classification":
        raise ValueError("token-classification is scored per entity from word tags: entity_scores")
    raise ValueError(f"task {task!r} is not one of {', '.join(MAIN_METRIC)}")


def _precision_recall_f1(correct: int, predicted: int, true: int) -> dict[str, float]:
    """Precision, recall and F1 of entity counts; 0 where a denominator is 0 (seqeval's default)."""
    precision = correct / predicted if predicted else 0.0
    recall = correct / true if true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def entity_scores(true_tags: Sequence[Sequence[str]], pred_tags: Sequence[Sequence[str]]) -> dict:
    """conlleval's scores of predicted BIO tags against the true ones, one tag list per sentence.

    Returns `precision`, `recall`, `f1` over all entities (micro), `accuracy` (the share of words whose tag is
    right, `O` included) and `per_type`: for each type that is true or predicted somewhere, its `precision`,
    `recall`, `f1` and `support` (the number of true entities). Entities are cut by :func:`tagging.entities`.
    """
    if len(true_tags) != len(pred_tags):
        raise ValueError(f"{len(true_tags)} true tag sequences but {len(pred_tags)} predicted")
    true_count, pred_count, correct_count = Counter(), Counter(), Counter()
    right = words = 0
    for n, (true, pred) in enumerate(zip(true_tags, pred_tags)):
        if len(true) != len(pred):
            raise ValueError(f"sentence {n}: {len(true)} true tags but {len(pred)} predicted")
        true_entities, pred_entities = set(entities(true)), set(entities(pred))
        true_count.update(kind for kind, _, _ in true_entities)
        pred_count.update(kind for kind, _, _ in pred_entities)
        correct_count.update(kind for kind, _, _ in true_entities & pred_entities)
        right += sum(t == p for t, p in zip(true, pred))
        words += len(true)
    if words == 0:
        raise ValueError("no tags to score")
    scores: dict = _precision_recall_f1(sum(correct_count.values()), sum(pred_count.values()),
                                        sum(true_count.values()))
    scores["accuracy"] = right / words
    scores["per_type"] = {
        kind: {**_precision_recall_f1(correct_count[kind], pred_count[kind], true_count[kind]),
               "support": true_count[kind]}
        for kind in sorted(true_count.keys() | pred_count.keys())
    }
    return scores
