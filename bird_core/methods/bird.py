"""``bird``: bias-aware distillation with student feedback.

Each step (φ every ``meta_interval`` steps):

* Stage I (inner, virtual): θ' = θ − α ∇_θ L_inner(θ, φ) on the train batch, with
  L_inner = CE + λ_kd·L_feat(θ, φ) (+ λ_logit·KD when teacher logits exist). Computed with
  ``torch.func.functional_call`` and ``create_graph=True`` so θ' is a function of φ; the virtual
  copy is discarded.
* Stage II (outer, bias feedback): L_outer = CE(f_θ'(x_m), y_m) + γ·L_fair(f_θ'(x_m), y_m, s_m)
  on a meta batch from the held-out slice; φ ← φ − β ∇_φ L_outer. Under DDP the meta-gradient is
  averaged across ranks, so every rank keeps the same φ.
* Stage III (joint): the training loop's ordinary step on
  L_joint = L_inner(θ, φ) + λ_fair·L_fair(f_θ(x), y, s), which updates θ and P, not φ.

``virtual_params`` picks θ for Stage I: ``"all"`` (every student parameter; second-order
through the whole network) or ``"head"`` (the student's embedding layer and classifier, whose
inputs are computed once without gradient — the cheap default; φ still reaches θ' because
L_feat acts on the embedding layer's output).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch.func import functional_call

from bird_core.data.base import Task
from bird_core.fairdistill import FairDistill
from bird_core.losses import kd_loss, probabilities, soft_equal_opportunity_gap, task_loss
from bird_core.methods.base import Batch, Method, MethodOptions, StepContext, require
from bird_core.models import Net, NetOutput


@contextmanager
def running_stats_frozen(module: torch.nn.Module) -> Iterator[None]:
    """Batch norm keeps using batch statistics but leaves its running statistics untouched.

    Virtual passes must leave no trace. Restoring the buffers afterwards would not do: the
    joint step's graph holds the very same buffer tensors and autograd rejects in-place
    changes to them, so the update must not happen in the first place.
    """
    norms = [m for m in module.modules() if getattr(m, "track_running_stats", False)]
    for norm in norms:
        norm.track_running_stats = False
    try:
        yield
    finally:
        for norm in norms:
            norm.track_running_stats = True


@dataclass(frozen=True)
class BIRDOptions(MethodOptions):
    """BIRD's options; their meaning and defaults are documented in docs/methods.md ("BIRD")."""

    inner_lr: float = 0.1  # α, Stage I step size
    phi_lr: float = 100.0  # β, the φ learning rate (meta-gradients on φ are small)
    lambda_kd: float = 1.0  # weight of L_feat
    lambda_logit: float = 1.0  # weight of logit KD where teacher logits exist
    temperature: float = 3.0
    gamma: float = 5.0  # weight of L_fair in L_outer
    lambda_fair: float = 5.0  # weight of L_fair in L_joint
    meta_fraction: float = 0.1  # share of the train split held out for meta batches
    meta_interval: int = 1  # update φ every k steps
    meta_batch_size: int | None = None  # default: the training batch size
    # "balanced": meta batches drawn evenly over (class, group) cells so the fairness signal
    # sees the minority group; "random": uniform over the held-out slice.
    meta_sampling: Literal["balanced", "random"] = "balanced"
    virtual_params: Literal["head", "all"] = "head"
    gate_init: float = 4.0  # sigmoid(4) ≈ 0.98: the gate starts open

    def __post_init__(self) -> None:
        self._check_positive("inner_lr", "phi_lr", "lambda_kd", "temperature")
        self._check_positive("lambda_logit", "gamma", "lambda_fair", allow_zero=True)
        if not 0.0 < self.meta_fraction < 1.0:
            raise ValueError(f"option meta_fraction must be in (0, 1), got {self.meta_fraction}")
        if not isinstance(self.meta_interval, int) or self.meta_interval < 1:
            raise ValueError(
                f"option meta_interval must be an integer >= 1, got {self.meta_interval!r}"
            )
        if self.meta_batch_size is not None and self.meta_batch_size < 2:
            raise ValueError(f"option meta_batch_size must be >= 2, got {self.meta_batch_size}")
        if self.meta_sampling not in ("balanced", "random"):
            raise ValueError(
                f"option meta_sampling must be 'balanced' or 'random', got {self.meta_sampling!r}"
            )
        if self.virtual_params not in ("head", "all"):
            raise ValueError(
                f"option virtual_params must be 'head' or 'all', got {self.virtual_params!r}"
            )


class BIRD(Method):
    """FairDistill gate φ tuned by the meta-gradient of a fairness loss (see module docstring)."""

    name = "bird"
    options_class = BIRDOptions
    needs_meta_batch = True

    def setup(
        self, *, student_dim: int, teacher_dim: int | None, num_classes: int, task: Task
    ) -> None:
        """Create the gate φ and the projector P."""
        super().setup(
            student_dim=student_dim, teacher_dim=teacher_dim, num_classes=num_classes, task=task
        )
        assert teacher_dim is not None
        opts: BIRDOptions = self.options  # type: ignore[assignment]
        self.fair = FairDistill(student_dim, teacher_dim, gate_init=opts.gate_init)

    def check_student(self, student: Net) -> None:
        """``virtual_params="head"`` needs an embedding layer for φ to reach θ'."""
        opts: BIRDOptions = self.options  # type: ignore[assignment]
        embed = student.head.embed
        if opts.virtual_params == "head" and not any(p.requires_grad for p in embed.parameters()):
            raise ValueError(
                "bird with virtual_params='head' needs a student with an embedding layer "
                "(create_model(..., embed_dim=N)): without one the virtual step cannot depend "
                "on φ. Give the student an embed_dim, or use virtual_params='all'."
            )

    # -- losses -----------------------------------------------------------------------------

    def inner_loss(
        self,
        embedding: torch.Tensor,
        logits: torch.Tensor,
        batch: Batch,
        task: str,
        phi: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_inner = CE + λ_kd·L_feat(θ, φ) (+ λ_logit·KD)."""
        opts: BIRDOptions = self.options  # type: ignore[assignment]
        teacher = require(batch.teacher_embedding, "teacher features", self.name)
        ce = task_loss(logits, batch.label, task)  # type: ignore[arg-type]
        feat = self.fair.feature_loss(embedding, teacher, phi)
        total = ce + opts.lambda_kd * feat
        parts = {"ce": ce, "feat": feat}
        if opts.lambda_logit > 0 and batch.teacher_logits is not None and task != "multilabel":
            kd = kd_loss(logits, batch.teacher_logits, opts.temperature)
            total = total + opts.lambda_logit * kd
            parts["kd"] = kd
        return total, parts

    def outer_loss(self, logits: torch.Tensor, batch: Batch, task: str) -> torch.Tensor:
        """L_outer = CE + γ·L_fair on the meta batch."""
        opts: BIRDOptions = self.options  # type: ignore[assignment]
        ce = task_loss(logits, batch.label, task)  # type: ignore[arg-type]
        fair = soft_equal_opportunity_gap(
            probabilities(logits, task),  # type: ignore[arg-type]
            batch.label,
            batch.group,
            task,  # type: ignore[arg-type]
        )
        return ce + opts.gamma * fair

    def loss(
        self, out: NetOutput, batch: Batch, ctx: StepContext
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Stage III: L_joint = L_inner + λ_fair·L_fair on the train batch (φ fixed)."""
        opts: BIRDOptions = self.options  # type: ignore[assignment]
        total, parts = self.inner_loss(out.embedding, out.logits, batch, ctx.task)
        if opts.lambda_fair > 0:
            fair = soft_equal_opportunity_gap(
                probabilities(out.logits, ctx.task), batch.label, batch.group, ctx.task
            )
            total = total + opts.lambda_fair * fair
            parts["fair"] = fair
        return total, parts

    # -- Stages I and II --------------------------------------------------------------------

    def outer_loss_of_phi(
        self,
        student: Net,
        batch: Batch,
        meta_batch: Batch,
        phi: torch.Tensor,
        task: str,
        train_pooled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """L_outer(θ'(φ)) for a given φ: the virtual step (Stage I) then the meta loss.

        With ``virtual_params="head"``, ``train_pooled`` (the body's output on ``batch`` from
        the joint step's own forward pass) saves recomputing it. Exposed separately so a
        finite-difference test can check the gradient.
        """
        opts: BIRDOptions = self.options  # type: ignore[assignment]
        self.check_student(student)
        if opts.virtual_params == "head":
            module: torch.nn.Module = student.head
            # The body is not updated virtually, so its outputs need no graph; its batch-norm
            # statistics must not move either (these passes are virtual).
            with torch.no_grad(), running_stats_frozen(student):
                if train_pooled is None:
                    train_pooled, _ = student.body(batch.x)
                meta_inputs, _ = student.body(meta_batch.x)
            inputs = train_pooled.detach()
            args: dict = {}
        else:
            module, inputs, meta_inputs, args = student, batch.x, meta_batch.x, {"features": True}
        # Detached leaf copies of θ: the virtual step differentiates with respect to these, so
        # the real parameters' autograd hooks (DDP's gradient reducer) never fire for it.
        params = {
            n: p.detach().requires_grad_() for n, p in module.named_parameters() if p.requires_grad
        }
        # Batch-norm running statistics must not move during the virtual passes: give the
        # functional calls their own copies.
        buffers = {n: b.clone() for n, b in module.named_buffers()}

        def run(weights: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            out = functional_call(module, {**weights, **buffers}, (x,), args)
            return (out.embedding, out.logits) if isinstance(out, NetOutput) else out

        embedding, logits = run(params, inputs)
        inner, _ = self.inner_loss(embedding, logits, batch, task, phi)
        grads = torch.autograd.grad(inner, list(params.values()), create_graph=True)
        virtual = {
            n: p - opts.inner_lr * g for (n, p), g in zip(params.items(), grads, strict=True)
        }
        _, meta_logits = run(virtual, meta_inputs)
        return self.outer_loss(meta_logits, meta_batch, task)

    def meta_step(
        self,
        student: Net,
        batch: Batch,
        meta_batch: Batch,
        ctx: StepContext,
        train_pooled: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """Stages I and II: one meta-gradient step on φ (every ``meta_interval`` steps)."""
        opts: BIRDOptions = self.options  # type: ignore[assignment]
        if ctx.step % opts.meta_interval != 0:
            return {}
        phi = self.fair.phi.detach().clone().requires_grad_(True)
        outer = self.outer_loss_of_phi(student, batch, meta_batch, phi, ctx.task, train_pooled)
        (grad,) = torch.autograd.grad(outer, phi)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Average across ranks: each rank saw its own batches, all must keep one φ.
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
            grad /= dist.get_world_size()
        with torch.no_grad():
            self.fair.phi.sub_(opts.phi_lr * grad)
        return {"outer": float(outer.detach()), "gate_mean": float(self.fair.gate.mean())}

    def extra_state_for_checkpoint(self) -> dict[str, float]:
        """Summary of the learned gate."""
        gate = self.fair.gate.detach()
        return {
            "gate_mean": float(gate.mean()),
            "gate_min": float(gate.min()),
            "gate_max": float(gate.max()),
        }
