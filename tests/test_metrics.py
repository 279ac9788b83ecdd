"""roberta_lite.metrics against hand-computed values, and against scipy / scikit-learn where installed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from roberta_lite.metrics import (
    MAIN_METRIC,
    accuracy,
    compute_metrics,
    entity_scores,
    mse,
    multilabel_scores,
    pearson,
    rankdata,
    spearman,
)


def test_pearson_by_hand() -> None:
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 4 / sqrt(5 * 5)
    assert pearson([1, 2, 3], [2, 4, 6.0]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson(np.array([[1.0], [2.0], [4.0]]), np.array([1.0, 2.0, 3.0])) == pytest.approx(0.98198050606)


def test_rankdata_averages_ties() -> None:
    assert rankdata(np.array([10, 20, 10, 30, 20, 20])).tolist() == [1.5, 4.0, 1.5, 6.0, 4.0, 4.0]
    assert rankdata(np.array([3.0, 1.0, 2.0])).tolist() == [3.0, 1.0, 2.0]
    assert rankdata(np.array([7, 7, 7])).tolist() == [2.0, 2.0, 2.0]


def test_spearman_with_ties_by_hand() -> None:
    # ranks [1, 2.5, 2.5, 4] and [1, 3, 2, 4]: 4.5 / sqrt(4.5 * 5); ordinal ranks would give 0.8, min ranks 0.923
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman([1, 10, 100, 1000], [1, 2, 3, 4]) == pytest.approx(1.0)  # monotone, not linear
    assert pearson([1, 10, 100, 1000], [1, 2, 3, 4]) < 0.9


def test_mse_and_accuracy() -> None:
    assert mse([1.0, 2.0], [2.0, 4.0]) == pytest.approx(2.5)
    assert mse(np.array([[1.0], [2.0]]), np.array([1.0, 2.0])) == 0.0
    logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 0.5], [3.0, 1.0]])
    assert accuracy(logits, np.array([1, 0, 0, 1])) == 0.5


def test_undefined_correlations_are_nan() -> None:
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman([1, 2, 3], [5, 5, 5]))
    assert math.isnan(spearman([1, float("nan"), 3], [1, 2, 3]))
    with pytest.raises(ValueError):
        pearson([1, 2], [1, 2, 3])
    with pytest.raises(ValueError):
        mse([], [])


PRED = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 0, 0]])
TRUE = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0]])


def test_multilabel_scores_by_hand() -> None:
    scores = multilabel_scores(PRED, TRUE)
    # per label (tp, fp, fn): (2, 0, 0) F1 1; (1, 1, 0) F1 2/3; (0, 1, 1) F1 0; (0, 0, 0) F1 0 (sklearn's default)
    assert scores["macro_f1"] == pytest.approx((1 + 2 / 3 + 0 + 0) / 4)
    assert scores["micro_f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))  # tp 3, fp 2, fn 1
    assert scores["exact_match"] == pytest.approx(1 / 3)
    perfect = multilabel_scores(TRUE, TRUE.astype(np.float32))
    assert perfect["micro_f1"] == perfect["exact_match"] == 1.0 and perfect["macro_f1"] == pytest.approx(3 / 4)
    with pytest.raises(ValueError):
        multilabel_scores(PRED, TRUE[:, :3])


def test_compute_metrics_per_task() -> None:
    logits = np.array([[0.1, 0.9], [2.0, -1.0]])
    assert compute_metrics("classification", logits, np.array([1, 1])) == {"accuracy": 0.5}
    scores = compute_metrics("regression", np.array([[1.0], [2.0], [3.0], [4.0]]), np.array([1, 3, 2, 4], np.float32))
    assert scores == pytest.approx({"pearson": 0.8, "spearman": 0.8, "mse": 0.5})
    # multilabel: a label is predicted when its logit is above 0 (probability above 1/2); exactly 0 is not
    ml_logits = np.where(PRED > 0, 2.0, -2.0)
    ml_logits[1, 2] = 0.0
    assert compute_metrics("multilabel", ml_logits, TRUE.astype(np.float32)) == multilabel_scores(PRED, TRUE)
    assert set(MAIN_METRIC) == {"classification", "regression", "multilabel", "token-classification"}
    assert MAIN_METRIC["token-classification"] == "f1" and "f1" in entity_scores([["B-x"]], [["B-x"]])
    for task, name in [(t, n) for t, n in MAIN_METRIC.items() if t != "token-classification"]:
        outputs = {"classification": logits, "regression": logits[:, 0], "multilabel": logits}[task]
        labels = {"classification": np.array([1, 0]), "regression": np.array([0.0, 1.0]),
                  "multilabel": np.array([[0, 1], [1, 0]], np.float32)}[task]
        assert name in compute_metrics(task, outputs, labels)
    with pytest.raises(ValueError):
        compute_metrics("ranking", logits, np.array([1, 1]))


def test_multilabel_threshold_is_probability_one_half() -> None:
    """A label is predicted when sigmoid(logit) > 0.5, i.e. logit > 0: logits strictly between 0 and 0.5 count as
    predicted (a threshold of 0.5 on the raw logit would drop them), small negative ones do not."""
    logits = np.array([[0.3, -0.2, 0.05], [-0.4, 0.45, 0.1]])
    target = np.array([[1, 0, 1], [0, 1, 0]], np.float32)
    scores = compute_metrics("multilabel", logits, target)
    # predicted [[1, 0, 1], [0, 1, 1]]: tp 3, fp 1, fn 0; label columns F1 1, 1, 2/3; one of two rows exact
    assert scores["micro_f1"] == pytest.approx(2 * 3 / (2 * 3 + 1))
    assert scores["macro_f1"] == pytest.approx((1 + 1 + 2 / 3) / 3)
    assert scores["exact_match"] == pytest.approx(0.5)


def test_against_scipy_on_random_data_with_ties() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n in (5, 50, 500):
        x = rng.integers(0, 6, n).astype(float)  # STS-B-like: many ties
        y = x + rng.normal(0, 1.5, n)
        y[: n // 5] = np.round(y[: n // 5])
        assert pearson(y, x) == pytest.approx(stats.pearsonr(y, x)[0], abs=1e-12)
        assert spearman(y, x) == pytest.approx(stats.spearmanr(y, x)[0], abs=1e-12)
        assert np.array_equal(rankdata(y), stats.rankdata(y))


def test_against_sklearn_on_random_data() -> None:
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    true = (rng.random((200, 7)) < 0.3).astype(int)
    pred = np.where(rng.random((200, 7)) < 0.8, true, 1 - true)
    pred[:, 6] = true[:, 6] = 0  # a label that never occurs
    scores = multilabel_scores(pred, true)
    assert scores["micro_f1"] == pytest.approx(sk.f1_score(true, pred, average="micro", zero_division=0))
    assert scores["macro_f1"] == pytest.approx(sk.f1_score(true, pred, average="macro", zero_division=0))
    assert scores["exact_match"] == pytest.approx(sk.accuracy_score(true, pred))


# --------------------------------------------------------------------------------------------------
# Entity scores (tagging), conlleval's way

def test_entity_scores_by_hand() -> None:
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG", "I-ORG"]]
    pred = [["B-PER", "I-PER", "O", "I-ORG"], ["O", "B-ORG", "I-ORG", "O"]]
    # true: PER 0-1, LOC 3 | ORG 1-3; predicted: PER 0-1, ORG 3 (I after O begins one) | ORG 1-2 (a span too short)
    scores = entity_scores(true, pred)
    assert scores["precision"] == pytest.approx(1 / 3) and scores["recall"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx(1 / 3) and scores["accuracy"] == pytest.approx(6 / 8)
    assert scores["per_type"] == {
        "LOC": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1},
        "ORG": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1},
        "PER": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1},
    }


def test_entity_scores_i_after_another_type() -> None:
    # I-LOC after B-PER: PER 0 and LOC 1-2, so a prediction of B-PER I-PER I-PER gets neither of the two
    true, pred = [["B-PER", "I-LOC", "I-LOC", "O"]], [["B-PER", "I-PER", "I-PER", "O"]]
    scores = entity_scores(true, pred)
    assert (scores["precision"], scores["recall"], scores["f1"]) == (0.0, 0.0, 0.0)
    assert scores["accuracy"] == 0.5 and scores["per_type"]["LOC"]["support"] == 1
    # an I-x where B-x was true is the same entity when it follows O (conlleval counts it right)
    assert entity_scores([["O", "B-PER", "I-PER"]], [["O", "I-PER", "I-PER"]])["f1"] == 1.0
    # B-x B-x is two entities, B-x I-x one
    two = entity_scores([["B-PER", "B-PER"]], [["B-PER", "I-PER"]])
    assert (two["precision"], two["recall"]) == (0.0, 0.0) and two["per_type"]["PER"]["support"] == 2
    none = entity_scores([["O", "O"]], [["O", "O"]])
    assert (none["f1"], none["accuracy"], none["per_type"]) == (0.0, 1.0, {})


def test_entity_scores_errors() -> None:
    with pytest.raises(ValueError, match="sentence 1: 2 true tags but 1 predicted"):
        entity_scores([["O"], ["O", "O"]], [["O"], ["O"]])
    with pytest.raises(ValueError, match="2 true tag sequences but 1 predicted"):
        entity_scores([["O"], ["O"]], [["O"]])
    with pytest.raises(ValueError, match="tag 'B' is not O, B-type or I-type"):
        entity_scores([["B"]], [["O"]])
    with pytest.raises(ValueError, match="no tags to score"):
        entity_scores([[]], [[]])


def test_entity_scores_against_seqeval_on_random_tags() -> None:
    """seqeval's default mode is conlleval's; random tags have every odd case (I after O, I-x after B-y, ...)."""
    seqeval = pytest.importorskip("seqeval.metrics")
    rng = np.random.default_rng(2)
    tags = ["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-geo-loc", "I-geo-loc", "I-MISC"]
    for trial in range(20):
        lengths = rng.integers(1, 15, size=int(rng.integers(1, 30)))
        true = [[tags[i] for i in rng.integers(0, len(tags), n)] for n in lengths]
        # predictions: mostly right, so that many entities match
        pred = [[t if rng.random() < 0.7 else tags[rng.integers(0, len(tags))] for t in s] for s in true]
        scores = entity_scores(true, pred)
        assert scores["precision"] == pytest.approx(seqeval.precision_score(true, pred, zero_division=0))
        assert scores["recall"] == pytest.approx(seqeval.recall_score(true, pred, zero_division=0))
        assert scores["f1"] == pytest.approx(seqeval.f1_score(true, pred, zero_division=0))
        assert scores["accuracy"] == pytest.approx(seqeval.accuracy_score(true, pred))
        report = seqeval.classification_report(true, pred, output_dict=True, zero_division=0)
        per_type = {k: v for k, v in report.items() if not k.endswith(" avg")}
        assert set(per_type) == set(scores["per_type"]), trial
        for kind, row in per_type.items():
            ours = scores["per_type"][kind]
            assert (ours["precision"], ours["recall"], ours["f1"]) == pytest.approx(
                (row["precision"], row["recall"], row["f1-score"])) and ours["support"] == row["support"]
