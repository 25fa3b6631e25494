"""Distillation losses.

Per head k and row i::

    l_ik = soft(s_ik, t_ik)                                  if the row has no gold label (or the stage
                                                             uses none: TMKD stage 1)
    l_ik = alpha * soft(s_ik, t_ik) + (1 - alpha) * CE(s_ik, y_i)   otherwise

    loss = sum_k w_k * mean_i l_ik       (w normalised to sum 1: equal by default)

soft = MSE on logits (mean over classes), or KL(softmax(t/T) || softmax(s/T)) * T^2.
Without teachers (no-KD) the loss is the mean CE over rows that have a gold label.

With ``loss.listwise = lambda > 0`` the stage adds lambda * the listwise term: per head, for each group g
of the batch (a question's candidates), with s_i the log-odds of the positive class (how the teachers
rank) ::

    KL(softmax_{i in g}(t_i / T) || softmax_{i in g}(s_i / T)) * T^2

averaged over the batch's groups of two or more rows (a lone row ranks nothing), then weighted by w_k.
Every batch carries a ``weight`` (1, or 0 for the padding batches that keep ranks in step),
which multiplies the loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tmkd.teachers.ranking import group_log_softmax, relevance_scores


def soft_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float) -> torch.Tensor:
    """[B, K, C] x [B, K, C] -> [B, K]."""
    if kind == "mse":
        return (student - teacher).pow(2).mean(dim=-1)
    if kind == "kl":
        t = temperature
        log_p_s = F.log_softmax(student / t, dim=-1)
        log_p_t = F.log_softmax(teacher / t, dim=-1)
        return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1) * (t * t)
    raise ValueError(f"unknown soft loss {kind!r}")


def hard_loss(student: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE of every head against the gold label: [B, K, C], [B] -> [B, K] (0 where label < 0)."""
    b, k, c = student.shape
    safe = labels.clamp(min=0).repeat_interleave(k)
    ce = F.cross_entropy(student.reshape(b * k, c), safe, reduction="none").view(b, k)
    return ce * (labels >= 0).unsqueeze(1)


def soft_targets(teacher_logits: torch.Tensor, weights: torch.Tensor, ensemble: bool) -> torch.Tensor:
    """Per-teacher targets [B, K, C], or for "ensemble" the weighted mean of the teachers [B, 1, C]."""
    if ensemble:
        return (teacher_logits * weights.view(1, -1, 1)).sum(dim=1, keepdim=True)
    return teacher_logits


def listwise_kl(student: torch.Tensor, teacher: torch.Tensor, groups: torch.Tensor, num_groups: int,
                num_lists: int, temperature: float) -> torch.Tensor:
    """[B, H] student and teacher scores -> [H]: the mean over lists (groups of 2+ rows) of
    KL(teacher || student) of their softmax over the group at ``temperature``, times T^2."""
    t = temperature
    log_p_t = group_log_softmax(teacher / t, groups, num_groups)
    log_p_s = group_log_softmax(student / t, groups, num_groups)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=0)  # a lone row adds 0: both log-probs are 0
    return kl * (t * t) / max(1, num_lists)


def listwise_distill_loss(student: torch.Tensor, teacher_logits: torch.Tensor, groups: torch.Tensor,
                          num_groups: int, num_lists: int, *, weights: torch.Tensor, ensemble: bool, positive: int,
                          temperature: float) -> torch.Tensor:
    """The listwise term of one batch (module docstring): ``student`` [B, H, C], ``teacher_logits`` [B, K, C]."""
    student = student.float()
    target = soft_targets(teacher_logits.float(), weights, ensemble)  # [B, H, C]
    b, h, c = student.shape
    s = relevance_scores(student.reshape(b * h, c), positive).view(b, h)
    t = relevance_scores(target.reshape(b * h, c), positive).view(b, h)
    head_w = torch.ones(1, device=student.device) if ensemble else weights
    return (listwise_kl(s, t, groups, num_groups, num_lists, temperature) * head_w).sum()


def distill_loss(
    student: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    weights: torch.Tensor,
    ensemble: bool,
    soft: str,
    temperature: float,
    alpha: float,
    use_gold: bool,
) -> torch.Tensor:
    """The scalar loss of one batch (see the module docstring). ``student`` is [B, H, C]."""
    student = student.float()
    if teacher_logits is None or teacher_logits.shape[1] == 0:  # no-KD: gold labels only
        has = labels >= 0
        ce = hard_loss(student, labels).mean(dim=1)
        return ce.sum() / has.sum().clamp(min=1)
    target = soft_targets(teacher_logits.float(), weights, ensemble)
    head_w = torch.ones(1, device=student.device) if ensemble else weights
    per = soft_loss(student, target, soft, temperature)  # [B, H]
    if use_gold:
        has = (labels >= 0).unsqueeze(1)
        mixed = alpha * per + (1 - alpha) * hard_loss(student, labels)
        per = torch.where(has, mixed, per)
    return (per.mean(dim=0) * head_w).sum()
