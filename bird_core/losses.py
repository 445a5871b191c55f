"""Loss functions shared by the distillation methods (their forms: docs/methods.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bird_core.data.base import Task


def task_loss(logits: torch.Tensor, labels: torch.Tensor, task: Task) -> torch.Tensor:
    """Cross-entropy for multi-class labels, binary cross-entropy for multi-label 0/1 labels."""
    if task == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, labels.float())
    return F.cross_entropy(logits, labels)


def probabilities(logits: torch.Tensor, task: Task) -> torch.Tensor:
    """Softmax (multi-class) or sigmoid (multi-label) probabilities."""
    return torch.sigmoid(logits) if task == "multilabel" else torch.softmax(logits, dim=1)


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Hinton KD term T²·KL(softmax(z_T/T) ‖ softmax(z_S/T)), averaged over the batch."""
    t = temperature
    log_p_student = F.log_softmax(student_logits / t, dim=1)
    p_teacher = F.softmax(teacher_logits.detach() / t, dim=1)
    return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * t * t


def soft_equal_opportunity_gap(
    probs: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, task: Task
) -> torch.Tensor:
    """Differentiable equal-opportunity gap L_fair.

    For each class c (multi-label: each attribute's positive and negative class), among the
    samples whose label is c, the mean predicted probability of c in each group; the gap is the
    largest group mean minus the smallest. Classes where fewer than two groups have samples are
    skipped; the result is the mean gap over the remaining classes (0 if none remain, still
    attached to the graph so callers can always backpropagate).
    """
    gaps: list[torch.Tensor] = []
    group_ids = torch.unique(groups)
    if task == "multilabel":
        # Attribute a contributes its positive class (prob p, label 1) and negative class
        # (prob 1 - p, label 0), as the DEO metric does.
        columns = [(probs[:, a], labels[:, a] == 1) for a in range(probs.shape[1])]
        columns += [(1 - probs[:, a], labels[:, a] == 0) for a in range(probs.shape[1])]
    else:
        columns = [(probs[:, c], labels == c) for c in range(probs.shape[1])]
    for prob_c, is_c in columns:
        means = []
        for g in group_ids:
            mask = is_c & (groups == g)
            if mask.any():
                means.append(prob_c[mask].mean())
        if len(means) >= 2:
            stacked = torch.stack(means)
            gaps.append(stacked.max() - stacked.min())
    if not gaps:
        return probs.sum() * 0.0
    return torch.stack(gaps).mean()


def attention_map(feature_map: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Attention transfer map: normalize(mean over channels of x²), flattened to ``[N, H·W]``.

    ``size`` resizes the map first (student and teacher maps may differ in resolution).
    """
    att = feature_map.pow(2).mean(dim=1, keepdim=True)
    if size is not None and tuple(att.shape[-2:]) != tuple(size):
        att = F.interpolate(att, size=size, mode="bilinear", align_corners=False)
    return F.normalize(att.flatten(1), dim=1)


def at_loss(student_att: torch.Tensor, teacher_att: torch.Tensor, weight: float) -> torch.Tensor:
    """½·λ·mean((at_S − at_T)²)."""
    return 0.5 * weight * (student_att - teacher_att.detach()).pow(2).mean()


def _rbf(a: torch.Tensor, b: torch.Tensor, sigma: float, sigma_avg: torch.Tensor) -> torch.Tensor:
    sq = (a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1).unsqueeze(0) - 2 * a @ b.t()).clamp(
        min=1e-12
    )
    return torch.exp(-sq / (2 * sigma * sigma_avg))


def mmd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor,
    weight: float,
    sigma: float = 1.0,
) -> torch.Tensor:
    """MFD's fairness MMD: ½·λ_f·Σ_{c,g} MMD²(T_c, S_{c,g}) with an RBF kernel.

    K(a, b) = exp(−‖a−b‖² / (2·σ·σ̄)), σ̄ the batch mean of teacher–student squared distances
    (no gradient). T_c: teacher features of class c over all groups; S_{c,g}: student features of
    class c in group g. ``labels`` must be class indices.
    """
    teacher = teacher.detach()
    with torch.no_grad():
        sigma_avg = (
            (
                (teacher.pow(2).sum(1, keepdim=True) + student.pow(2).sum(1).unsqueeze(0))
                - 2 * teacher @ student.t()
            )
            .clamp(min=1e-12)
            .mean()
        )
    total = student.sum() * 0.0
    for c in torch.unique(labels):
        t_c = teacher[labels == c]
        k_tt = _rbf(t_c, t_c, sigma, sigma_avg).mean()
        for g in torch.unique(groups):
            s_cg = student[(labels == c) & (groups == g)]
            if s_cg.shape[0] == 0:
                continue
            total = (
                total
                + k_tt
                + _rbf(s_cg, s_cg, sigma, sigma_avg).mean()
                - 2 * _rbf(t_c, s_cg, sigma, sigma_avg).mean()
            )
    return 0.5 * weight * total
