"""FairDistill: a learnable per-dimension gate on the teacher's features.

h̃_T = h_T ⊙ sigmoid(φ), φ ∈ R^{d_T}. A linear projector P maps the student's features h_S to
d_T, and the feature loss is L_feat = mean ‖P(h_S) − h̃_T‖², the squared error averaged over the
batch and the d_T dimensions (‖·‖²/d_T), so one λ_kd suits teachers of any width.

The gate can also act on what the teacher *predicts*: with the teacher's linear head W_T
(fitted by least squares from teacher features to teacher logits, :meth:`fit_teacher_head`),
the gated logits are z̃_T = z_T − W_T (h_T ⊙ (1 − sigmoid(φ))), i.e. the teacher's logits with
the closed part of each feature removed. For a linear head this is exactly W_T h̃_T + b_T;
written as a correction of z_T it returns the teacher's own logits when the gate is fully open,
even for heads that are not exactly linear.

φ is stored as a parameter with ``requires_grad=False``: only BIRD's meta-gradient moves it
(see ``bird_core.methods.bird``), never the student's optimizer, and DDP leaves it alone.
"""

from __future__ import annotations

import torch
from torch import nn


class FairDistill(nn.Module):
    """Gate φ over teacher features plus the student→teacher projector P."""

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        gate_init: float = 0.0,
        num_classes: int | None = None,
        centred: bool = False,
        standardised: bool = False,
    ):
        super().__init__()
        if student_dim <= 0 or teacher_dim <= 0:
            raise ValueError(
                f"feature widths must be positive, got student_dim={student_dim}, "
                f"teacher_dim={teacher_dim}"
            )
        self.phi = nn.Parameter(torch.full((teacher_dim,), float(gate_init)), requires_grad=False)
        self.projector = nn.Linear(student_dim, teacher_dim)
        # centred: the gate scales each feature's deviation from its mean, so closing a
        # dimension removes what it says about *this* sample, not its average level.
        self.centred = centred
        self.standardised = standardised
        if centred:
            self.register_buffer("teacher_mean", torch.zeros(teacher_dim))
        if standardised:
            # L_feat divides each dimension's error by the teacher feature's spread.
            self.register_buffer("teacher_scale", torch.ones(teacher_dim))
        self.gates_logits = num_classes is not None
        if num_classes is not None:
            # W_T of the teacher's head, fitted once from the teacher's own outputs.
            self.register_buffer("teacher_head", torch.zeros(num_classes, teacher_dim))
            # 1 once fitted (a float: DDP broadcasts buffers, and gloo has no bool type).
            self.register_buffer("teacher_head_fitted", torch.zeros(()))

    @property
    def gate(self) -> torch.Tensor:
        """sigmoid(φ), the current per-dimension weights of the teacher features."""
        return torch.sigmoid(self.phi)

    def gated_teacher(
        self, teacher_features: torch.Tensor, phi: torch.Tensor | None = None
    ) -> torch.Tensor:
        """h_T ⊙ sigmoid(φ); pass ``phi`` to differentiate with respect to a copy of φ."""
        phi = self.phi if phi is None else phi
        if not self.centred:
            return teacher_features * torch.sigmoid(phi)
        mean = self.teacher_mean
        return mean + (teacher_features - mean) * torch.sigmoid(phi)

    def _check_width(self, teacher_features: torch.Tensor) -> None:
        if teacher_features.shape[1] != self.phi.shape[0]:
            raise ValueError(
                f"teacher features have width {teacher_features.shape[1]} but the gate φ has "
                f"{self.phi.shape[0]} dimensions"
            )

    def feature_loss(
        self,
        student_features: torch.Tensor,
        teacher_features: torch.Tensor,
        phi: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """L_feat = mean over batch and dimensions of (P(h_S) − h_T ⊙ sigmoid(φ))²."""
        self._check_width(teacher_features)
        target = self.gated_teacher(teacher_features.detach(), phi)
        error = self.projector(student_features) - target
        if self.standardised:
            error = error / self.teacher_scale
        return error.pow(2).mean()

    @torch.no_grad()
    def fit_statistics(self, teacher_features: torch.Tensor) -> None:
        """Record what the centred gate and the standardised L_feat need: the features' mean
        (the reference a closed dimension falls back to) and standard deviation."""
        self._check_width(teacher_features)
        h = teacher_features.detach().double().cpu()
        if self.centred:
            self.teacher_mean.copy_(h.mean(dim=0).to(self.teacher_mean))
        if self.standardised:
            scale = h.std(dim=0)
            scale = torch.where(scale > 1e-6 * scale.max().clamp_min(1e-12), scale, scale.max())
            self.teacher_scale.copy_(scale.to(self.teacher_scale))

    @torch.no_grad()
    def fit_teacher_head(
        self, teacher_features: torch.Tensor, teacher_logits: torch.Tensor, ridge: float = 1e-4
    ) -> float:
        """Fit W_T, b_T with z_T ≈ W_T h_T + b_T by ridge-regularised least squares.

        Computed in float64 on the CPU (deterministic, so every rank fitting the same rows gets
        the same head). ``ridge`` is relative to the mean squared feature. Returns the relative
        residual ‖z_T − ẑ_T‖ / ‖z_T − mean z_T‖: about 0 for a linear head.
        """
        if not self.gates_logits:
            raise ValueError("this FairDistill does not gate logits (built without num_classes)")
        self._check_width(teacher_features)
        h = teacher_features.detach().double().cpu()
        z = teacher_logits.detach().double().cpu()
        design = torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype)], dim=1)
        gram = design.T @ design
        scale = float(h.pow(2).mean()) * h.shape[0]
        reg = torch.full((design.shape[1],), ridge * scale, dtype=h.dtype)
        reg[-1] = 0.0  # no penalty on the bias
        solution = torch.linalg.solve(gram + torch.diag(reg), design.T @ z)
        fitted = design @ solution
        centred = (z - z.mean(dim=0)).norm().clamp_min(1e-12)
        self.teacher_head.copy_(solution[:-1].T.to(self.teacher_head))
        self.teacher_head_fitted.fill_(1.0)
        return float((z - fitted).norm() / centred)

    def gated_logits(
        self,
        teacher_features: torch.Tensor,
        teacher_logits: torch.Tensor,
        phi: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """z̃_T = z_T − W_T (h_T ⊙ (1 − sigmoid(φ))): the teacher's logits from gated features."""
        if not self.gates_logits or not bool(self.teacher_head_fitted > 0):
            raise ValueError(
                "gating the teacher's logits needs its head: call fit_teacher_head first"
            )
        phi = self.phi if phi is None else phi
        deviation = teacher_features.detach()
        if self.centred:
            deviation = deviation - self.teacher_mean
        closed = deviation * (1 - torch.sigmoid(phi))
        return teacher_logits.detach() - closed @ self.teacher_head.T
