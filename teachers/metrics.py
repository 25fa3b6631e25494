"""Evaluation metrics: accuracy, F1, and MAP / MRR by group (question).

Ranking metrics count only groups with at least one positive and one negative candidate
(the usual WikiQA protocol: a group with no correct answer, or only correct ones, ranks
nothing); the result says how many groups were counted out of how many. Candidates are
ranked by score, highest first; ties keep the input order (a stable sort).
"""
from __future__ import annotations

import numpy as np


def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    return float((pred == gold).mean()) if len(gold) else 0.0


def f1(pred: np.ndarray, gold: np.ndarray, num_labels: int, positive: int | None = 1) -> float:
    """Binary F1 of the positive class when there are 2 labels (and it is known), else macro F1."""
    classes = [positive] if num_labels == 2 and positive is not None else list(range(num_labels))
    scores = []
    for c in classes:
        tp = float(((pred == c) & (gold == c)).sum())
        fp = float(((pred == c) & (gold != c)).sum())
        fn = float(((pred != c) & (gold == c)).sum())
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


def map_mrr(scores: np.ndarray, relevant: np.ndarray, groups) -> dict:
    """Mean average precision and mean reciprocal rank over groups.

    ``scores``: higher = more relevant; ``relevant``: bool per candidate (non-zero = relevant);
    ``groups``: group id per candidate (None = no group, ignored). The one implementation of
    both: the trainer, fine-tuning and bench/wikiqa_eval.py (the official WikiQA figures) use it.

    Ties: a candidate's rank in its group is 1 + the candidates with a higher score + the
    candidates with the same score that come before it in the input (a stable sort; NaN scores
    rank last, in input order). AP = the mean over the group's relevant candidates of
    precision at their rank; RR = 1 / the rank of the first relevant one. Groups with no
    relevant or no irrelevant candidate are not counted; map and mrr are 0.0 when none counts.
    """
    scores = np.asarray(scores, dtype=np.float64)
    relevant = np.asarray(relevant, dtype=bool)
    by_group: dict = {}
    for i, g in enumerate(groups):
        if g is not None:
            by_group.setdefault(g, []).append(i)
    aps, rrs = [], []
    for idx in by_group.values():
        idx = np.asarray(idx)
        rel = relevant[idx]
        if rel.all() or not rel.any():
            continue
        order = np.argsort(-scores[idx], kind="stable")
        rel_sorted = rel[order]
        ranks = np.flatnonzero(rel_sorted) + 1  # 1-based ranks of the positives
        precision_at_hits = np.arange(1, len(ranks) + 1) / ranks
        aps.append(precision_at_hits.mean())
        rrs.append(1.0 / ranks[0])
    return {
        "map": float(np.mean(aps)) if aps else 0.0,
        "mrr": float(np.mean(rrs)) if rrs else 0.0,
        "groups_counted": len(aps),
        "groups_total": len(by_group),
    }


def evaluate_predictions(logits: np.ndarray, gold: np.ndarray, groups, positive: int | None = 1) -> dict:
    """All metrics for one evaluation pass. Rows without a gold label (< 0) are left out.

    ``positive``: the INDEX of the positive class (callers resolve it from a label name with
    tmkd.data.store.positive_index); None (more than two labels, none named): macro F1, no ranking.
    """
    keep = gold >= 0
    logits, gold = logits[keep], gold[keep]
    groups = [g for g, k in zip(groups, keep) if k]
    num_labels = logits.shape[1]
    pred = logits.argmax(axis=1)
    out = {"rows": int(len(gold)), "accuracy": accuracy(pred, gold), "f1": f1(pred, gold, num_labels, positive)}
    if positive is not None and any(g is not None for g in groups):
        # log-softmax of the positive class: the model's score for "this candidate answers"
        z = logits - logits.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        out.update(map_mrr(logp[:, positive], gold == positive, groups))
    return out
