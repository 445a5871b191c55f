"""``fitnet``: FitNets hints, then logit KD (as in the MFD code base)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bird_core.data.base import Task
from bird_core.losses import kd_loss, task_loss
from bird_core.methods.base import Batch, Method, MethodOptions, StepContext, require
from bird_core.models import NetOutput


@dataclass(frozen=True)
class FitNetOptions(MethodOptions):
    """Hint stage for the first ``hint_fraction`` of training, then CE + λ·T²·KL."""

    hint_fraction: float = 0.5
    lambda_hint: float = 1.0
    lambda_kd: float = 1.0
    temperature: float = 3.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.hint_fraction < 1.0:
            raise ValueError(f"option hint_fraction must be in [0, 1), got {self.hint_fraction}")
        self._check_positive("lambda_hint", "temperature")
        self._check_positive("lambda_kd", allow_zero=True)


class FitNet(Method):
    """Stage 1: ½·λ_hint·MSE(regressor(h_S), h_T) alone; stage 2: KD."""

    name = "fitnet"
    options_class = FitNetOptions
    needs_teacher_logits = True
    has_unused_parameters = True

    def setup(
        self, *, student_dim: int, teacher_dim: int | None, num_classes: int, task: Task
    ) -> None:
        """The hint regressor maps student features to the teacher's width."""
        super().setup(
            student_dim=student_dim, teacher_dim=teacher_dim, num_classes=num_classes, task=task
        )
        if task == "multilabel":
            raise ValueError("method 'fitnet' supports multi-class tasks only")
        assert teacher_dim is not None
        self.regressor = nn.Linear(student_dim, teacher_dim)

    def loss(
        self, out: NetOutput, batch: Batch, ctx: StepContext
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hint loss during the hint stage, CE + KD afterwards."""
        opts: FitNetOptions = self.options  # type: ignore[assignment]
        if ctx.progress < opts.hint_fraction:
            teacher = require(batch.teacher_embedding, "teacher features", self.name)
            hint = 0.5 * opts.lambda_hint * (self.regressor(out.embedding) - teacher).pow(2).mean()
            return hint, {"hint": hint}
        teacher_logits = require(batch.teacher_logits, "teacher logits", self.name)
        ce = task_loss(out.logits, batch.label, ctx.task)
        kd = kd_loss(out.logits, teacher_logits, opts.temperature)
        return ce + opts.lambda_kd * kd, {"ce": ce, "kd": kd}
