"""What a task kind means for training and evaluation: the loss, the metrics, and which epoch counts as best.

    classification  one label per text: softmax + cross-entropy; accuracy
    regression      one number per text (a 1-output head): mean squared error; Pearson, Spearman, MSE
    multilabel      any number of labels per text: a sigmoid per label + binary cross-entropy; micro/macro F1,
                    exact-match accuracy
    token-classification
                    a BIO tag per word, learnt and read at the word's first token: cross-entropy over (B, T, K)
                    logits, other tokens ignored (-100); conlleval entity precision/recall/F1, word accuracy, and
                    the three per entity type
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from roberta_lite import metrics as M
from roberta_lite import tagging


@dataclass(frozen=True)
class Task:
    kind: str
    primary: str  # the metric that chooses the best epoch (ties broken by the lower loss)

    def label_tensor(self, labels) -> torch.Tensor:
        """Labels as the loss wants them: class ids (long), numbers (float) or multi-hot rows (float)."""
        return torch.as_tensor(np.asarray(labels), dtype=torch.long if self.kind == "classification" else torch.float32)

    def batch_labels(self, y, batch: list[int], length: int) -> torch.Tensor:
        """The labels of the examples in `batch` (a batch `length` tokens long) as `loss` wants them."""
        return y[batch]

    def loss(self, logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        if self.kind == "classification":
            return F.cross_entropy(logits, y, reduction=reduction)
        if self.kind == "regression":
            return F.mse_loss(logits.squeeze(-1), y, reduction=reduction)
        per_label = F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(-1)  # as transformers
        return per_label.mean() if reduction == "mean" else per_label.sum()

    def metrics(self, logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Every metric of this kind, plus "loss" (the mean of `loss`), over all examples."""
        loss = float(self.loss(logits, y, reduction="sum")) / max(1, len(y))
        return {"loss": loss, **M.compute_metrics(self.kind, logits.numpy(), y.numpy())}

    def better(self, new: dict, best: dict | None) -> bool:
        """Higher primary metric wins; on a tie, the lower loss (a model can keep learning at equal accuracy)."""
        if best is None:
            return True
        return (new[self.primary], -new["loss"]) > (best[self.primary], -best["loss"])


class TokenTask(Task):
    """Token classification: labels are a split's :class:`tagging.TokenTargets`, logits (B, T, K) per token."""

    def label_tensor(self, labels: tagging.TokenTargets) -> tagging.TokenTargets:
        return labels  # ragged: padded batch by batch (batch_labels)

    def batch_labels(self, y: tagging.TokenTargets, batch: list[int], length: int) -> torch.Tensor:
        """(B, length) token labels, IGNORE on padding and on every token but a word's first."""
        out = torch.full((len(batch), length), tagging.IGNORE, dtype=torch.long)
        for row, i in enumerate(batch):
            out[row, :len(y.labels[i])] = torch.as_tensor(y.labels[i], dtype=torch.long)
        return out

    def loss(self, logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy over the labelled tokens (transformers' token-classification loss); "sum" sums them.
        A batch without a labelled token gives 0 (not NaN)."""
        total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1),
                                ignore_index=tagging.IGNORE, reduction="sum")
        return total if reduction == "sum" else total / (y != tagging.IGNORE).sum().clamp(min=1)

    def metrics(self, logits: list[torch.Tensor], y: tagging.TokenTargets) -> dict:
        """Loss per labelled token, then :func:`metrics.entity_scores` of the words' tags, each read at the
        word's first token (tagging.word_tags; a word cut off by max_length counts as tagged O).
        `logits` holds one (T_i, K) tensor per sentence, its own tokens only."""
        loss, counted, predicted = 0.0, 0, []
        for lg, labels, word_ids, tags in zip(logits, y.labels, y.word_ids, y.tags):
            target = torch.as_tensor(labels, dtype=torch.long)
            loss += float(self.loss(lg, target, reduction="sum"))
            counted += int((target != tagging.IGNORE).sum())
            predicted.append(tagging.word_tags(lg.argmax(-1).tolist(), word_ids, len(tags), y.names))
        scores = M.entity_scores(y.tags, predicted)
        return {"loss": loss / max(1, counted), **scores}


TASKS = {kind: (TokenTask if kind == "token-classification" else Task)(kind, primary)
         for kind, primary in M.MAIN_METRIC.items()}
