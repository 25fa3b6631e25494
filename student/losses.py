"""Distillation losses.

Per head k and row i::

    l_ik = soft(s_ik, t_ik)                                  if the row has no gold label (or the stage
                                                             uses none: TMKD stage 1)
    l_ik = alpha * soft(s_ik, t_ik) + (1 - alpha) * CE(s_ik, y_i)   otherwise

    loss = sum_k w_k * mean_i l_ik       (w normalised to sum 1: equal by default)

soft = MSE on logits (mean over classes), or KL(softmax(t/T) || softmax(s/T)) * T^2.
Without teachers (no-KD) the loss is the mean CE over rows that have a gold label.
Every batch carries a ``weight`` (1, or 0 for the padding batches that keep ranks in step),
which multiplies the loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
