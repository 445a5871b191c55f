"""``none``: the student trained with the task loss only (the paper's "Baseline" row)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bird_core.losses import task_loss
from bird_core.methods.base import Batch, Method, MethodOptions, StepContext
from bird_core.models import NetOutput


@dataclass(frozen=True)
class NoneOptions(MethodOptions):
    """No options."""


class NoDistillation(Method):
    """Cross-entropy only."""

    name = "none"
    options_class = NoneOptions
    needs_teacher = False

    def loss(
        self, out: NetOutput, batch: Batch, ctx: StepContext
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """CE(z_S, y)."""
        ce = task_loss(out.logits, batch.label, ctx.task)
        return ce, {"ce": ce}
