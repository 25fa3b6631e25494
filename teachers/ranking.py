"""The teachers' training losses: pointwise cross-entropy, class-balanced, listwise and pairwise.

The ranking losses score a candidate by the log-odds of the positive label and compare the
candidates of one group (question) with each other.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from tmkd.teachers.device import to_device

GROUP_LOSSES = ("listwise", "pairwise")


def relevance_scores(logits: torch.Tensor, positive: int) -> torch.Tensor:
    """Log-odds of the positive label: logit[pos] - logsumexp(other logits). With 2 labels, l1 - l0."""
    others = torch.cat([logits[:, :positive], logits[:, positive + 1 :]], dim=1)
    return logits[:, positive] - torch.logsumexp(others, dim=1)


def group_log_softmax(x: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """log_softmax of [B, H] scores within each group (``groups``: 0..num_groups-1 per row), vectorised."""
    idx = groups.unsqueeze(1).expand_as(x)
    top = x.new_full((num_groups, x.shape[1]), float("-inf")).scatter_reduce(0, idx, x, "amax")
    shifted = x - top.gather(0, idx)
    total = x.new_zeros((num_groups, x.shape[1])).index_add(0, groups, shifted.exp())
    return shifted - total.log().gather(0, idx)


def rankable_groups(relevant: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, int]:
    """Per row, the index of its group among the batch's groups that rank something (at least one relevant and
    one irrelevant candidate), else -1; and how many such groups there are.

    Computed on the host from the batch's labels and groups, which the job has there anyway: the loss then needs
    no data-dependent shapes on the device, so a GPU step never waits for the host.
    """
    groups = np.asarray(groups)
    relevant = np.asarray(relevant, dtype=bool)
    out = np.full(len(groups), -1, dtype=np.int64)
    valid = groups >= 0
    if not valid.any():
        return out, 0
    _, inv = np.unique(groups[valid], return_inverse=True)
    rel = np.bincount(inv, weights=relevant[valid])
    size = np.bincount(inv)
    ok = (rel > 0) & (rel < size)
    out[valid] = np.where(ok[inv], (np.cumsum(ok) - 1)[inv], -1)
    return out, int(ok.sum())


def listwise_loss(scores: torch.Tensor, relevant: np.ndarray, groups: np.ndarray,
                  over: int | None = None) -> torch.Tensor:
    """Softmax cross-entropy over each group's candidates, target uniform over its relevant ones.

    Mean over the groups that have at least one relevant and one irrelevant candidate (the others rank nothing);
    0 (with a gradient path) when there is none. ``relevant`` and ``groups`` are host arrays (rankable_groups).
    ``over``: divide the sum by this many groups instead: the whole batch's rankable groups (at least this part's),
    so that a part's loss is its share of the batch's mean.
    """
    index, n = rankable_groups(relevant, groups)
    if n == 0:
        return scores.sum() * 0.0
    rows = np.flatnonzero(index >= 0)
    g = index[rows]
    rel = np.asarray(relevant, dtype=np.float64)[rows]
    target = rel / np.bincount(g, weights=rel)[g]  # uniform over each group's relevant candidates
    dev = scores.device
    g_t = to_device(torch.from_numpy(g), dev)
    log_p = group_log_softmax(scores[to_device(torch.from_numpy(rows), dev)].unsqueeze(1), g_t, n)[:, 0]
    target_t = to_device(torch.from_numpy(target), dev).to(scores.dtype)
    return -scores.new_zeros(n).index_add(0, g_t, target_t * log_p).sum() / (n if over is None else over)


def pairwise_loss(scores: torch.Tensor, relevant: np.ndarray, groups: np.ndarray,
                  over: int | None = None) -> torch.Tensor:
    """Logistic (RankNet) loss log(1 + exp(s_neg - s_pos)) over each group's (relevant, irrelevant) pairs.

    Averaged within a group, then over groups, so a question with many candidates does not dominate. The pairs are
    listed on the host (``relevant`` and ``groups`` are host arrays), the loss is one vectorised expression.
    ``over``: as in listwise_loss.
    """
    index, n = rankable_groups(relevant, groups)
    if n == 0:
        return scores.sum() * 0.0
    rel = np.asarray(relevant, dtype=bool)
    same = (index[:, None] == index[None, :]) & (index[:, None] >= 0)
    pos, neg = np.nonzero(same & rel[:, None] & ~rel[None, :])
    g = index[pos]
    weight = 1.0 / (np.bincount(g, minlength=n)[g] * (n if over is None else over))  # mean in a group, then over groups
    dev = scores.device
    diff = scores[to_device(torch.from_numpy(pos), dev)] - scores[to_device(torch.from_numpy(neg), dev)]
    return (F.softplus(-diff) * to_device(torch.from_numpy(weight), dev).to(scores.dtype)).sum()


def class_weights(labels: np.ndarray, num_labels: int) -> np.ndarray:
    """Weights inverse to class frequency, normalised so a balanced corpus gets all 1s (a host array)."""
    counts = np.bincount(labels, minlength=num_labels).astype(np.float64)
    return np.where(counts > 0, counts.sum() / (num_labels * np.maximum(counts, 1)), 0.0).astype(np.float32)


def loss_denominators(spec, labels: np.ndarray, groups: np.ndarray, positive: int,
                      weights: np.ndarray) -> tuple[float, int]:
    """What batch_loss divides its sums by on this batch: the cross-entropy's total row weight (the row count,
    or the class weights' sum for ``balanced``) and the number of groups that rank. Computed once over a whole
    batch and passed to each of its micro-batches, the micro-batches' losses add up to the batch's loss, and so
    do their gradients."""
    ce = float(weights[labels].sum()) if spec.loss == "balanced" else float(len(labels))
    ranked = rankable_groups(labels == positive, groups)[1] if spec.loss in GROUP_LOSSES else 0
    return ce, ranked


def batch_loss(spec, logits, labels: np.ndarray, groups: np.ndarray, positive: int, weights: np.ndarray,
               denominators: tuple[float, int] | None = None) -> torch.Tensor:
    """The teacher's training loss on one batch (logits in float32); ``spec`` is its TeacherConfig
    (``loss``: pointwise | balanced | listwise | pairwise, ``pointwise_weight``). ``labels`` and ``groups`` are
    the batch's host arrays: the ranking losses list its groups and pairs there, and ``weights`` (class_weights)
    is one too. ``denominators``: the whole batch's (loss_denominators) when these rows are one micro-batch of it;
    default, this batch's own."""
    if denominators is None:
        denominators = loss_denominators(spec, labels, groups, positive, weights)
    ce_total, groups_total = denominators
    target = to_device(torch.from_numpy(labels), logits.device)
    weight = to_device(torch.from_numpy(weights), logits.device) if spec.loss == "balanced" else None
    ce = F.cross_entropy(logits, target, weight=weight, reduction="sum") / ce_total
    if spec.loss not in GROUP_LOSSES:
        return ce
    scores = relevance_scores(logits, positive)
    rank_loss = listwise_loss if spec.loss == "listwise" else pairwise_loss
    return rank_loss(scores, labels == positive, groups, over=groups_total) + spec.pointwise_weight * ce
