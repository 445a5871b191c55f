"""``ad``: adversarial debiasing through gradient reversal (as in the MFD code base)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bird_core.data.base import Task
from bird_core.losses import probabilities, task_loss
from bird_core.methods.base import Batch, Method, MethodOptions, StepContext
from bird_core.models import NetOutput


class _GradientReversal(torch.autograd.Function):
    """Identity forward; multiplies the gradient by −scale backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.scale * grad, None


def gradient_reversal(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Gradient reversal layer."""
    return _GradientReversal.apply(x, scale)


@dataclass(frozen=True)
class ADOptions(MethodOptions):
    """λ_adv scales the reversed gradient; the adversary has its own Adam optimizer."""

    lambda_adv: float = 2.0
    adversary_lr: float = 3e-4
    adversary_hidden: int = 32
    num_groups: int = 2

    def __post_init__(self) -> None:
        self._check_positive("lambda_adv", allow_zero=True)
        self._check_positive("adversary_lr", "adversary_hidden")
        if self.num_groups < 2:
            raise ValueError(f"option num_groups must be >= 2, got {self.num_groups}")


class AdversarialDebiasing(Method):
    """CE(z_S, y) + CE(adversary(GRL(p_S)), s): the adversary learns to predict the group from
    the student's output; the reversed gradient teaches the student to hide it."""

    name = "ad"
    options_class = ADOptions
    needs_teacher = False

    def setup(
        self, *, student_dim: int, teacher_dim: int | None, num_classes: int, task: Task
    ) -> None:
        """The adversary: a 2-layer MLP from the student's output to the group."""
        super().setup(
            student_dim=student_dim, teacher_dim=teacher_dim, num_classes=num_classes, task=task
        )
        opts: ADOptions = self.options  # type: ignore[assignment]
        self.adversary = nn.Sequential(
            nn.Linear(num_classes, opts.adversary_hidden),
            nn.ReLU(),
            nn.Linear(opts.adversary_hidden, opts.num_groups),
        )
        self._optimizer: torch.optim.Optimizer | None = None

    def loss(
        self, out: NetOutput, batch: Batch, ctx: StepContext
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Task loss plus the adversary's loss (whose gradient reaches the student reversed)."""
        opts: ADOptions = self.options  # type: ignore[assignment]
        if int(batch.group.max()) >= opts.num_groups:
            raise ValueError(
                f"group id {int(batch.group.max())} out of range for num_groups={opts.num_groups}"
            )
        ce = task_loss(out.logits, batch.label, ctx.task)
        reversed_probs = gradient_reversal(probabilities(out.logits, ctx.task), opts.lambda_adv)
        adv = F.cross_entropy(self.adversary(reversed_probs), batch.group)
        return ce + adv, {"ce": ce, "adversary": adv}

    def aux_parameters(self) -> list[nn.Parameter]:
        """The adversary is trained by its own optimizer."""
        return list(self.adversary.parameters())

    def aux_optimizer(self) -> torch.optim.Optimizer | None:
        """Adam over the adversary (created once, on first use)."""
        if self._optimizer is None:
            opts: ADOptions = self.options  # type: ignore[assignment]
            self._optimizer = torch.optim.Adam(self.adversary.parameters(), lr=opts.adversary_lr)
        return self._optimizer
