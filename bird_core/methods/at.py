"""``at``: attention transfer from the teacher's last spatial feature map."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bird_core.losses import at_loss, attention_map, task_loss
from bird_core.methods.base import Batch, Method, MethodOptions, StepContext, require
from bird_core.models import NetOutput


@dataclass(frozen=True)
class ATOptions(MethodOptions):
    """λ (``lambda_at``) as in the attention-transfer paper (β = 1000)."""

    lambda_at: float = 1000.0

    def __post_init__(self) -> None:
        self._check_positive("lambda_at", allow_zero=True)


class AttentionTransfer(Method):
    """CE + ½·λ·mean((at_S − at_T)²), at(x) = normalize(mean_c x²)."""

    name = "at"
    options_class = ATOptions
    needs_teacher_attention = True

    def loss(
        self, out: NetOutput, batch: Batch, ctx: StepContext
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """CE plus the attention-map distance at the teacher map's resolution."""
        opts: ATOptions = self.options  # type: ignore[assignment]
        teacher_att = require(batch.teacher_attention, "teacher attention maps", self.name)
        if out.feature_map is None:
            raise ValueError("method 'at' needs a student with a spatial feature map (not an MLP)")
        student_att = attention_map(out.feature_map, size=tuple(teacher_att.shape[-2:]))
        ce = task_loss(out.logits, batch.label, ctx.task)
        at = at_loss(student_att, teacher_att.flatten(1), opts.lambda_at)
        return ce + at, {"ce": ce, "at": at}
