"""What a task kind means for training and evaluation: the loss, the metrics, and which epoch counts as best.

    classification  one label per text: softmax + cross-entropy; accuracy
    regression      one number per text (a 1-output head): mean squared error; Pearson, Spearman, MSE
    multilabel      any number of labels per text: a sigmoid per label + binary cross-entropy; micro/macro F1,
                    exact-match accuracy
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from roberta_lite import metrics as M


@dataclass(frozen=True)
class Task:
    kind: str
    primary: str  # the metric that chooses the best epoch (ties broken by the lower loss)

    def label_tensor(self, labels) -> torch.Tensor:
        """Labels as the loss wants them: class ids (long), numbers (float) or multi-hot rows (float)."""
        return torch.as_tensor(np.asarray(labels), dtype=torch.long if self.kind == "classification" else torch.float32)

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


TASKS = {kind: Task(kind, primary) for kind, primary in M.MAIN_METRIC.items()}
