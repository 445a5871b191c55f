"""What every distillation method shares: the batch, the step context, the method interface."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from bird_core.data.base import Task
from bird_core.models import Net, NetOutput


@dataclass
class Batch:
    """One batch: model input, label, sensitive group, and the teacher's precomputed outputs."""

    x: torch.Tensor
    label: torch.Tensor
    group: torch.Tensor
    teacher_embedding: torch.Tensor | None = None
    teacher_logits: torch.Tensor | None = None
    teacher_attention: torch.Tensor | None = None  # [N, H, W], see losses.attention_map

    def to(self, device: torch.device | str) -> Batch:
        """The same batch on ``device``."""
        return Batch(
            **{
                f.name: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                for f in dataclasses.fields(self)
                for v in [getattr(self, f.name)]
            }
        )


@dataclass(frozen=True)
class StepContext:
    """Where training stands, for methods whose loss changes over time (FitNet's stages)."""

    task: Task = "multiclass"
    progress: float = 0.0  # fraction of all training steps done, in [0, 1)
    step: int = 0


@dataclass(frozen=True)
class MethodOptions:
    """Base of every method's options; subclasses add fields and validate in ``__post_init__``."""

    def _check_positive(self, *names: str, allow_zero: bool = False) -> None:
        for name in names:
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"option {name} must be a finite number, got {value!r}")
            if value < 0 or (value == 0 and not allow_zero):
                bound = ">= 0" if allow_zero else "> 0"
                raise ValueError(f"option {name} must be {bound}, got {value!r}")


class Method(nn.Module):
    """A distillation method: its own trainable parts plus the loss of one training step.

    Lifecycle: ``create_method(name, **options)`` → :meth:`setup` with the widths of student and
    teacher features → the training loop calls :meth:`meta_step` (BIRD only) and :meth:`loss` each
    step, optimising the student together with :meth:`main_parameters`; :meth:`aux_optimizer`
    (adversarial debiasing) is stepped after the main optimizer.
    """

    name: ClassVar[str]
    options_class: ClassVar[type[MethodOptions]]
    needs_teacher: ClassVar[bool] = True
    needs_teacher_logits: ClassVar[bool] = False
    needs_teacher_attention: ClassVar[bool] = False
    needs_meta_batch: ClassVar[bool] = False
    # Some parameters (hint regressor after FitNet's hint stage, say) receive no gradient in
    # some steps; DDP must then be told to look for unused parameters.
    has_unused_parameters: ClassVar[bool] = False

    def __init__(self, options: MethodOptions):
        super().__init__()
        self.options = options
        self.task: Task = "multiclass"

    def setup(
        self, *, student_dim: int, teacher_dim: int | None, num_classes: int, task: Task
    ) -> None:
        """Create the method's own modules for these feature widths."""
        if self.needs_teacher and teacher_dim is None:
            raise ValueError(f"method {self.name!r} needs teacher features")
        self.task = task

    def loss(
        self, out: NetOutput, batch: Batch, ctx: StepContext
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss of one step and its named parts (detached copies are logged)."""
        raise NotImplementedError

    def meta_step(
        self,
        student: Net,
        batch: Batch,
        meta_batch: Batch,
        ctx: StepContext,
        train_pooled: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """Update meta-learned state before the joint step (BIRD's φ); others do nothing.

        ``train_pooled`` is the student body's output on ``batch`` when the caller already
        computed it (the training step shares its forward pass this way).
        """
        return {}

    def fit_to_teacher(
        self, teacher_embedding: torch.Tensor, teacher_logits: torch.Tensor | None
    ) -> dict[str, float]:
        """Learn what the method needs of the teacher itself, before training, from the teacher's
        outputs on the held-out meta rows (BIRD: the teacher's head, to gate its logits).

        Deterministic, so every rank fitting the same rows ends up with the same state. Returns
        facts worth logging; the default does nothing.
        """
        return {}

    def epoch_metrics(self) -> dict[str, float]:
        """Per-epoch facts about the method's own state (BIRD: the gate), logged with the loss
        parts of the epoch just finished; the default has none."""
        return {}

    def check_student(self, student: Net) -> None:
        """Raise a clear error if ``student`` cannot be trained with this method."""

    def aux_parameters(self) -> list[nn.Parameter]:
        """Parameters trained by :meth:`aux_optimizer`, not by the main optimizer."""
        return []

    def main_parameters(self) -> list[nn.Parameter]:
        """The method's parameters that the student's optimizer trains alongside the student."""
        aux = {id(p) for p in self.aux_parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in aux]

    def aux_optimizer(self) -> torch.optim.Optimizer | None:
        """An optimizer of the method's own (adversarial debiasing's adversary), if any."""
        return None

    def extra_state_for_checkpoint(self) -> dict[str, Any]:
        """JSON-able facts worth recording with a checkpoint (for example the gate's summary)."""
        return {}


def require(value: torch.Tensor | None, what: str, method: str) -> torch.Tensor:
    """Return ``value`` or raise a clear error saying which teacher output ``method`` lacks."""
    if value is None:
        raise ValueError(f"method {method!r} needs {what} but the batch has none")
    return value
