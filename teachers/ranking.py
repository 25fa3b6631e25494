"""The teachers' training losses: pointwise cross-entropy, class-balanced, listwise and pairwise.

The ranking losses score a candidate by the log-odds of the positive label and compare the
candidates of one group (question) with each other.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

GROUP_LOSSES = ("listwise", "pairwise")


def relevance_scores(logits: torch.Tensor, positive: int) -> torch.Tensor:
    """Log-odds of the positive label: logit[pos] - logsumexp(other logits). With 2 labels, l1 - l0."""
    others = torch.cat([logits[:, :positive], logits[:, positive + 1 :]], dim=1)
    return logits[:, positive] - torch.logsumexp(others, dim=1)


def listwise_loss(scores: torch.Tensor, relevant: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy over each group's candidates, target uniform over its relevant ones.

    Mean over the groups that have at least one relevant and one irrelevant candidate (the
    others rank nothing); 0 (with a gradient path) when there is none.
    """
    losses = []
    for g in torch.unique(groups[groups >= 0]):
        mask = groups == g
        rel = relevant[mask].float()
        if rel.sum() == 0 or rel.sum() == len(rel):
            continue
        losses.append(-(rel / rel.sum() * F.log_softmax(scores[mask], dim=0)).sum())
    return torch.stack(losses).mean() if losses else scores.sum() * 0.0


def pairwise_loss(scores: torch.Tensor, relevant: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Logistic (RankNet) loss log(1 + exp(s_neg - s_pos)) over each group's (relevant, irrelevant) pairs.

    Averaged within a group, then over groups, so a question with many candidates does not dominate.
    """
    losses = []
    for g in torch.unique(groups[groups >= 0]):
        mask = groups == g
        s, rel = scores[mask], relevant[mask]
        if rel.all() or not rel.any():
            continue
        diff = s[rel][:, None] - s[~rel][None, :]
        losses.append(F.softplus(-diff).mean())
    return torch.stack(losses).mean() if losses else scores.sum() * 0.0


def class_weights(labels: np.ndarray, num_labels: int) -> torch.Tensor:
    """Weights inverse to class frequency, normalised so a balanced corpus gets all 1s."""
    counts = np.bincount(labels, minlength=num_labels).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / (num_labels * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def batch_loss(spec, logits, labels, groups, positive: int, weights) -> torch.Tensor:
    """The teacher's training loss on one batch (logits in float32); ``spec`` is its TeacherConfig
    (``loss``: pointwise | balanced | listwise | pairwise, ``pointwise_weight``)."""
    ce = F.cross_entropy(logits, labels, weight=weights if spec.loss == "balanced" else None)
    if spec.loss not in GROUP_LOSSES:
        return ce
    scores = relevance_scores(logits, positive)
    rank = (listwise_loss if spec.loss == "listwise" else pairwise_loss)(scores, labels == positive, groups)
    return rank + spec.pointwise_weight * ce
