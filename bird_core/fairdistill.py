"""FairDistill: a learnable per-dimension gate on the teacher's features.

h̃_T = h_T ⊙ sigmoid(φ), φ ∈ R^{d_T}, initialised so that sigmoid(φ) ≈ 1 (training starts as
plain feature distillation). A linear projector P maps the student's features h_S to d_T, and
the feature loss is L_feat = mean ‖P(h_S) − h̃_T‖², the squared error averaged over the batch and
the d_T dimensions (‖·‖²/d_T), so one λ_kd suits teachers of any width.

φ is stored as a parameter with ``requires_grad=False``: only BIRD's meta-gradient moves it
(see ``bird_core.methods.bird``), never the student's optimizer, and DDP leaves it alone.
"""

from __future__ import annotations

import torch
from torch import nn


class FairDistill(nn.Module):
    """Gate φ over teacher features plus the student→teacher projector P."""

    def __init__(self, student_dim: int, teacher_dim: int, gate_init: float = 4.0):
        super().__init__()
        if student_dim <= 0 or teacher_dim <= 0:
            raise ValueError(
                f"feature widths must be positive, got student_dim={student_dim}, "
                f"teacher_dim={teacher_dim}"
            )
        # sigmoid(4) ≈ 0.982: the gate starts (almost) open.
        self.phi = nn.Parameter(torch.full((teacher_dim,), float(gate_init)), requires_grad=False)
        self.projector = nn.Linear(student_dim, teacher_dim)

    @property
    def gate(self) -> torch.Tensor:
        """sigmoid(φ), the current per-dimension weights of the teacher features."""
        return torch.sigmoid(self.phi)

    def gated_teacher(
        self, teacher_features: torch.Tensor, phi: torch.Tensor | None = None
    ) -> torch.Tensor:
        """h_T ⊙ sigmoid(φ); pass ``phi`` to differentiate with respect to a copy of φ."""
        phi = self.phi if phi is None else phi
        return teacher_features * torch.sigmoid(phi)

    def feature_loss(
        self,
        student_features: torch.Tensor,
        teacher_features: torch.Tensor,
        phi: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """L_feat = mean over batch and dimensions of (P(h_S) − h_T ⊙ sigmoid(φ))²."""
        if teacher_features.shape[1] != self.phi.shape[0]:
            raise ValueError(
                f"teacher features have width {teacher_features.shape[1]} but the gate φ has "
                f"{self.phi.shape[0]} dimensions"
            )
        target = self.gated_teacher(teacher_features.detach(), phi)
        return (self.projector(student_features) - target).pow(2).mean()
