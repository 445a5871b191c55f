"""``bkd``: Hinton knowledge distillation on the logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bird_core.data.base import Task
from bird_core.losses import kd_loss, task_loss
from bird_core.methods.base import Batch, Method, MethodOptions, StepContext, require
from bird_core.models import NetOutput


@dataclass(frozen=True)
class BKDOptions(MethodOptions):
    """λ (``lambda_kd``) weighs the KD term; T (``temperature``) softens both distributions."""

    lambda_kd: float = 1.0
    temperature: float = 3.0

    def __post_init__(self) -> None:
        self._check_positive("lambda_kd", allow_zero=True)
        self._check_positive("temperature")


class BKD(Method):
    """CE + λ·T²·KL(softmax(z_T/T) ‖ softmax(z_S/T))."""

    name = "bkd"
    options_class = BKDOptions
    needs_teacher_logits = True

    def setup(
        self, *, student_dim: int, teacher_dim: int | None, num_classes: int, task: Task
    ) -> None:
        """Logit KD needs no modules of its own."""
        super().setup(
            student_dim=student_dim, teacher_dim=teacher_dim, num_classes=num_classes, task=task
        )
        if task == "multilabel":
            raise ValueError("method 'bkd' supports multi-class tasks only")

    def loss(
        self, out: NetOutput, batch: Batch, ctx: StepContext
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """CE plus the weighted KD term."""
        opts: BKDOptions = self.options  # type: ignore[assignment]
        teacher_logits = require(batch.teacher_logits, "teacher logits", self.name)
        ce = task_loss(out.logits, batch.label, ctx.task)
        kd = kd_loss(out.logits, teacher_logits, opts.temperature)
        return ce + opts.lambda_kd * kd, {"ce": ce, "kd": kd}
