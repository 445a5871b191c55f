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

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch.func import functional_call

from bird_core.data.base import Task
from bird_core.fairdistill import FairDistill
from bird_core.losses import kd_loss, probabilities, soft_equal_opportunity_gap, task_loss
from bird_core.methods.base import Batch, Method, MethodOptions, StepContext, require
from bird_core.models import Net, NetOutput

GATE_HISTOGRAM_BINS = 10  # bins of the gate histogram a checkpoint records


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
    """BIRD's options; the defaults and how they were chosen are in docs/methods.md."""

    inner_lr: float = 0.1  # α, Stage I step size
    inner_steps: int = 1  # virtual steps of Stage I
    phi_lr: float = 0.05  # β, the φ learning rate; 0 keeps φ fixed but still measures ∇φ
    # "sgd": φ ← φ − β∇φ; "adam": Adam on φ (the meta-gradient's scale varies by orders of
    # magnitude across settings; Adam's step does not).
    phi_optimizer: Literal["sgd", "adam"] = "adam"
    freeze_gate: bool = False  # skip Stages I–II: φ stays at gate_init (the ablation)
    gate_init: float = 0.0  # initial φ: sigmoid(0) = 0.5, where the gate is most sensitive
    # Gate the teacher's logits as well: the KD target becomes the teacher's prediction from its
    # gated features (needs the teacher's head, fitted from the held-out rows). Gating only the
    # features never reached the student's predictions in our measurements (docs/results.md).
    gate_logits: bool = True
    # "zero": closing a dimension sets the teacher feature to 0; "mean": to its mean over the
    # held-out rows (the gate scales only each sample's deviation from the mean).
    gate_reference: Literal["zero", "mean"] = "zero"
    # "mean": L_feat averages squared errors over dimensions; "standardised": each dimension's
    # error is divided by the teacher feature's standard deviation first.
    feature_loss_norm: Literal["mean", "standardised"] = "mean"
    lambda_kd: float = 1.0  # weight of L_feat
    lambda_logit: float = 5.0  # weight of logit KD (to the gated logits with gate_logits)
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

    def __post_init__(self) -> None:
        self._check_positive("inner_lr", "lambda_kd", "temperature")
        self._check_positive("phi_lr", "lambda_logit", "gamma", "lambda_fair", allow_zero=True)
        if not math.isfinite(self.gate_init) or abs(self.gate_init) > 50:
            raise ValueError(
                f"option gate_init must be a number in [-50, 50], got {self.gate_init}"
            )
        if not 0.0 < self.meta_fraction < 1.0:
            raise ValueError(f"option meta_fraction must be in (0, 1), got {self.meta_fraction}")
        for name in ("meta_interval", "inner_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"option {name} must be an integer >= 1, got {value!r}")
        if self.meta_batch_size is not None and self.meta_batch_size < 2:
            raise ValueError(f"option meta_batch_size must be >= 2, got {self.meta_batch_size}")
        for name, allowed in (
            ("meta_sampling", ("balanced", "random")),
            ("virtual_params", ("head", "all")),
            ("phi_optimizer", ("sgd", "adam")),
            ("gate_reference", ("zero", "mean")),
            ("feature_loss_norm", ("mean", "standardised")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"option {name} must be one of {list(allowed)}, got {getattr(self, name)!r}"
                )


class BIRD(Method):
    """FairDistill gate φ tuned by the meta-gradient of a fairness loss (see module docstring)."""

    name = "bird"
    options_class = BIRDOptions
    needs_meta_batch = True

    def setup(
        self, *, student_dim: int, teacher_dim: int | None, num_classes: int, task: Task
    ) -> None:
        """Create the gate φ and the projector P (and φ's Adam moments with ``adam``)."""
        super().setup(
            student_dim=student_dim, teacher_dim=teacher_dim, num_classes=num_classes, task=task
        )
        assert teacher_dim is not None
        opts: BIRDOptions = self.options  # type: ignore[assignment]
        gate_logits = opts.gate_logits and task != "multilabel"
        self.fair = FairDistill(
            student_dim,
            teacher_dim,
            gate_init=opts.gate_init,
            num_classes=num_classes if gate_logits else None,
            centred=opts.gate_reference == "mean",
            standardised=opts.feature_loss_norm == "standardised",
        )
        if opts.phi_optimizer == "adam":
            # Buffers, so a checkpoint carries them and a resumed run continues the same Adam.
            self.register_buffer("phi_exp_avg", torch.zeros(teacher_dim))
            self.register_buffer("phi_exp_avg_sq", torch.zeros(teacher_dim))
            self.register_buffer("phi_steps", torch.zeros((), dtype=torch.long))
        self._grad_norms: list[float] = []

    def fit_to_teacher(
        self, teacher_embedding: torch.Tensor, teacher_logits: torch.Tensor | None
    ) -> dict[str, float]:
        """Fit what the gate needs from the teacher's outputs on these rows (the held-out
        slice): the features' mean and scale, and with ``gate_logits`` the teacher's head W_T."""
        self.fair.fit_statistics(teacher_embedding)
        if not self.fair.gates_logits or teacher_logits is None:
            return {}
        return {
            "teacher_head_residual": self.fair.fit_teacher_head(teacher_embedding, teacher_logits)
        }

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
        """L_inner = CE + λ_kd·L_feat(θ, φ) (+ λ_logit·KD, to gated logits with ``gate_logits``)."""
        opts: BIRDOptions = self.options  # type: ignore[assignment]
        teacher = require(batch.teacher_embedding, "teacher features", self.name)
        ce = task_loss(logits, batch.label, task)  # type: ignore[arg-type]
        feat = self.fair.feature_loss(embedding, teacher, phi)
        total = ce + opts.lambda_kd * feat
        parts = {"ce": ce, "feat": feat}
        if opts.lambda_logit > 0 and batch.teacher_logits is not None and task != "multilabel":
            target = batch.teacher_logits
            if self.fair.gates_logits:
                target = self.fair.gated_logits(teacher, batch.teacher_logits, phi)
            # The gated target depends on φ: keep its graph for the meta-gradient.
            kd = kd_loss(logits, target, opts.temperature, detach_teacher=False)
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
        """L_outer(θ'(φ)) for a given φ: the virtual step(s) (Stage I) then the meta loss.

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

        virtual: dict[str, torch.Tensor] = params
        for _ in range(opts.inner_steps):
            embedding, logits = run(virtual, inputs)
            inner, _ = self.inner_loss(embedding, logits, batch, task, phi)
            grads = torch.autograd.grad(inner, list(virtual.values()), create_graph=True)
            virtual = {
                n: p - opts.inner_lr * g for (n, p), g in zip(virtual.items(), grads, strict=True)
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
        if opts.freeze_gate or ctx.step % opts.meta_interval != 0:
            return {}
        phi = self.fair.phi.detach().clone().requires_grad_(True)
        outer = self.outer_loss_of_phi(student, batch, meta_batch, phi, ctx.task, train_pooled)
        (grad,) = torch.autograd.grad(outer, phi)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Average across ranks: each rank saw its own batches, all must keep one φ.
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
            grad /= dist.get_world_size()
        with torch.no_grad():
            self.fair.phi.sub_(self._phi_update(grad).to(self.fair.phi.dtype))
        grad_norm = float(grad.norm())
        self._grad_norms.append(grad_norm)
        return {"outer": float(outer.detach()), "phi_grad_norm": grad_norm}

    @torch.no_grad()
    def _phi_update(self, grad: torch.Tensor) -> torch.Tensor:
        """The step subtracted from φ: β·g (``sgd``) or Adam's step (``adam``)."""
        opts: BIRDOptions = self.options  # type: ignore[assignment]
        if opts.phi_optimizer == "sgd":
            return opts.phi_lr * grad
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        grad = grad.to(self.phi_exp_avg.dtype)
        self.phi_steps += 1
        self.phi_exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        self.phi_exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        t = int(self.phi_steps)
        m_hat = self.phi_exp_avg / (1 - beta1**t)
        v_hat = self.phi_exp_avg_sq / (1 - beta2**t)
        return opts.phi_lr * m_hat / (v_hat.sqrt() + eps)

    # -- what the gate did -------------------------------------------------------------------

    def gate_summary(self) -> dict[str, float]:
        """The gate's distribution now: min, quantiles, max, mean, dimensions below 0.5."""
        gate = self.fair.gate.detach().float().cpu()
        q = torch.quantile(gate, torch.tensor([0.1, 0.5, 0.9]))
        return {
            "gate_min": float(gate.min()),
            "gate_p10": float(q[0]),
            "gate_median": float(q[1]),
            "gate_p90": float(q[2]),
            "gate_max": float(gate.max()),
            "gate_mean": float(gate.mean()),
            "gate_below_half": float((gate < 0.5).sum()),
        }

    def epoch_metrics(self) -> dict[str, float]:
        """Per epoch: the gate's distribution at the epoch's end and the mean |∇φ| of its steps."""
        out = self.gate_summary()
        if self._grad_norms:
            out["phi_grad_norm"] = sum(self._grad_norms) / len(self._grad_norms)
        self._grad_norms = []
        return out

    def extra_state_for_checkpoint(self) -> dict[str, Any]:
        """The learned gate: its summary and a histogram of sigmoid(φ) over [0, 1]."""
        gate = self.fair.gate.detach().float().cpu()
        counts = torch.histc(gate, bins=GATE_HISTOGRAM_BINS, min=0.0, max=1.0)
        edges = torch.linspace(0.0, 1.0, GATE_HISTOGRAM_BINS + 1)
        summary: dict[str, Any] = dict(self.gate_summary())
        summary["gate_below_half"] = int(summary["gate_below_half"])
        summary["gate_dims"] = int(gate.numel())
        summary["gate_histogram"] = {
            "edges": [round(float(e), 4) for e in edges],
            "counts": [int(c) for c in counts],
        }
        return summary
