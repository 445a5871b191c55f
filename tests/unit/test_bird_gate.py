"""BIRD's gate: freezing it, φ's optimiser, gated logits, the centred gate, the standardised
feature loss, several virtual steps (each checked against finite differences), and what the
gate reports per epoch and in a checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from bird_core.checkpoint import save_checkpoint
from bird_core.fairdistill import FairDistill
from bird_core.methods import StepContext, create_method
from bird_core.methods.base import Batch
from bird_core.models import create_model
from bird_core.preprocess import Preprocessor
from bird_core.train import TrainConfig, compute_teacher_features, fit

pytestmark = pytest.mark.usefixtures("single_thread")

TEACHER_DIM = 6
STUDENT_EMBED = 8


def _batch(n: int, generator: torch.Generator, dtype=torch.float64) -> Batch:
    """A preprocessed batch (8×8 RGB) with every (class, group) cell present; the teacher's
    logits come from a fixed linear head so that the head can be recovered exactly."""
    rows = torch.arange(n)
    embedding = 2 * torch.randn(n, TEACHER_DIM, dtype=dtype, generator=generator)
    return Batch(
        x=torch.randn(n, 3, 8, 8, dtype=dtype, generator=generator),
        label=rows % 3,
        group=(rows // 3) % 2,
        teacher_embedding=embedding,
        teacher_logits=embedding @ _HEAD.to(dtype).T + _BIAS.to(dtype),
    )


_HEAD = torch.tensor(
    [
        [1.0, -2.0, 0.5, 0.0, 1.5, -0.5],
        [0.0, 1.0, -1.0, 2.0, 0.0, 0.5],
        [-1.0, 0.0, 0.0, 1.0, -1.0, 1.0],
    ]
)
_BIAS = torch.tensor([0.1, -0.2, 0.3])


def _bird(virtual_params: str = "head", dtype=torch.float64, **options):
    """A BIRD method, a tiny student, a train and a meta batch, and a random φ."""
    torch.manual_seed(0)
    method = create_method("bird", virtual_params=virtual_params, inner_lr=0.5, **options)
    method.setup(
        student_dim=STUDENT_EMBED, teacher_dim=TEACHER_DIM, num_classes=3, task="multiclass"
    )
    method.to(dtype)
    torch.manual_seed(0)
    student = create_model("small_cnn", 3, width=4, embed_dim=STUDENT_EMBED).to(dtype).train()
    generator = torch.Generator().manual_seed(1)
    batch, meta_batch = _batch(12, generator, dtype), _batch(12, generator, dtype)
    held_out = _batch(40, generator, dtype)
    method.fit_to_teacher(held_out.teacher_embedding, held_out.teacher_logits)
    with torch.no_grad():
        method.fair.phi.copy_(torch.randn(TEACHER_DIM, dtype=dtype, generator=generator))
    return method, student, batch, meta_batch


# -- options -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("phi_optimizer", "rmsprop"),
        ("gate_reference", "median"),
        ("feature_loss_norm", "sum"),
        ("inner_steps", 0),
        ("inner_steps", 1.5),
        ("gate_init", float("inf")),
        ("phi_lr", -1.0),
        ("freeze_gate", "yes"),
        ("gate_logits", 1),
    ],
)
def test_bad_gate_options_name_the_option(option, value):
    with pytest.raises(ValueError, match=rf"option {option}"):
        create_method("bird", **{option: value})


def test_phi_lr_zero_and_freezing_are_both_expressible():
    assert create_method("bird", phi_lr=0.0).options.phi_lr == 0.0
    assert create_method("bird", freeze_gate=True).options.freeze_gate is True


def test_frozen_gate_skips_the_meta_step_and_keeps_phi():
    method, student, batch, meta_batch = _bird(freeze_gate=True)
    phi0 = method.fair.phi.detach().clone()
    logs = method.meta_step(student, batch, meta_batch, StepContext(task="multiclass", step=0))
    assert logs == {}
    assert torch.equal(method.fair.phi, phi0)
    # The joint loss still distils through the (fixed) gate.
    out = student(batch.x, features=True)
    _, parts = method.loss(out, batch, StepContext())
    assert {"feat", "kd"} <= set(parts)


def test_phi_lr_zero_measures_the_meta_gradient_but_keeps_phi():
    method, student, batch, meta_batch = _bird(phi_lr=0.0)
    phi0 = method.fair.phi.detach().clone()
    logs = method.meta_step(student, batch, meta_batch, StepContext(task="multiclass", step=0))
    assert torch.equal(method.fair.phi, phi0)
    assert logs["phi_grad_norm"] > 0


def test_adam_on_phi_matches_torch_adam():
    method, student, batch, meta_batch = _bird(phi_optimizer="adam", phi_lr=0.05)
    reference = torch.nn.Parameter(method.fair.phi.detach().clone())
    adam = torch.optim.Adam([reference], lr=0.05)
    for step in range(3):
        phi = method.fair.phi.detach().clone().requires_grad_(True)
        outer = method.outer_loss_of_phi(student, batch, meta_batch, phi, "multiclass")
        (grad,) = torch.autograd.grad(outer, phi)
        reference.grad = grad.clone()
        adam.step()
        method.meta_step(student, batch, meta_batch, StepContext(task="multiclass", step=step))
        assert torch.allclose(method.fair.phi, reference.detach(), rtol=0, atol=1e-6), step
    assert int(method.phi_steps) == 3
    # Adam's moments live in the method's state, so a checkpoint carries them.
    assert {"phi_exp_avg", "phi_exp_avg_sq", "phi_steps"} <= set(method.state_dict())


# -- gated logits and the centred gate -----------------------------------------------------


def test_teacher_head_is_recovered_and_an_open_gate_returns_the_teacher_logits():
    fair = FairDistill(STUDENT_EMBED, TEACHER_DIM, num_classes=3).double()
    generator = torch.Generator().manual_seed(3)
    held_out = _batch(50, generator)
    residual = fair.fit_teacher_head(
        held_out.teacher_embedding, held_out.teacher_logits, ridge=1e-10
    )
    assert residual < 1e-6
    assert torch.allclose(fair.teacher_head, _HEAD.double(), atol=1e-5)
    batch = _batch(10, generator)
    h, z = batch.teacher_embedding, batch.teacher_logits
    open_gate = torch.full((TEACHER_DIM,), 40.0, dtype=torch.float64)
    assert torch.allclose(fair.gated_logits(h, z, open_gate), z, atol=1e-12)
    # Closing dimension 1 gives the teacher's head applied to features without it.
    phi = open_gate.clone()
    phi[1] = -40.0
    closed = h.clone()
    closed[:, 1] = 0
    expected = closed @ _HEAD.double().T + _BIAS.double()
    assert torch.allclose(fair.gated_logits(h, z, phi), expected, atol=1e-5)


def test_centred_gate_replaces_a_closed_feature_by_its_mean():
    fair = FairDistill(STUDENT_EMBED, TEACHER_DIM, num_classes=3, centred=True).double()
    generator = torch.Generator().manual_seed(4)
    held_out = _batch(50, generator)
    fair.fit_statistics(held_out.teacher_embedding)
    fair.fit_teacher_head(held_out.teacher_embedding, held_out.teacher_logits, ridge=1e-10)
    mean = held_out.teacher_embedding.mean(dim=0)
    batch = _batch(10, generator)
    h, z = batch.teacher_embedding, batch.teacher_logits
    phi = torch.full((TEACHER_DIM,), 40.0, dtype=torch.float64)
    phi[2] = -40.0
    replaced = h.clone()
    replaced[:, 2] = mean[2]
    assert torch.allclose(fair.gated_teacher(h, phi), replaced, atol=1e-12)
    expected = replaced @ _HEAD.double().T + _BIAS.double()
    assert torch.allclose(fair.gated_logits(h, z, phi), expected, atol=1e-5)


def test_standardised_feature_loss_divides_each_dimension_by_its_spread():
    fair = FairDistill(STUDENT_EMBED, TEACHER_DIM, standardised=True).double()
    generator = torch.Generator().manual_seed(5)
    held_out = _batch(50, generator).teacher_embedding * torch.arange(1, TEACHER_DIM + 1)
    fair.fit_statistics(held_out)
    assert torch.allclose(fair.teacher_scale, held_out.std(dim=0))
    student = torch.randn(7, STUDENT_EMBED, dtype=torch.float64, generator=generator)
    teacher = torch.randn(7, TEACHER_DIM, dtype=torch.float64, generator=generator)
    phi = torch.zeros(TEACHER_DIM, dtype=torch.float64)
    error = fair.projector(student) - teacher * 0.5
    expected = (error / held_out.std(dim=0)).pow(2).mean()
    assert fair.feature_loss(student, teacher, phi).item() == pytest.approx(expected.item())


def test_gating_logits_without_a_fitted_head_fails_clearly():
    fair = FairDistill(STUDENT_EMBED, TEACHER_DIM, num_classes=3)
    with pytest.raises(ValueError, match="fit_teacher_head"):
        fair.gated_logits(torch.zeros(2, TEACHER_DIM), torch.zeros(2, 3))
    plain = FairDistill(STUDENT_EMBED, TEACHER_DIM)
    with pytest.raises(ValueError, match="does not gate logits"):
        plain.fit_teacher_head(torch.zeros(2, TEACHER_DIM), torch.zeros(2, 3))


# -- the meta-gradient of every variant against finite differences -------------------------


VARIANTS = [
    {"gate_logits": True},
    {"gate_logits": True, "gate_reference": "mean"},
    {"feature_loss_norm": "standardised", "gate_reference": "mean"},
    {"gate_logits": True, "inner_steps": 3},
]


@pytest.mark.parametrize("virtual_params", ["head", "all"])
@pytest.mark.parametrize(
    "options", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items())
)
def test_meta_gradient_matches_finite_differences(virtual_params, options):
    method, student, batch, meta_batch = _bird(virtual_params, **options)

    def outer(phi: torch.Tensor) -> torch.Tensor:
        return method.outer_loss_of_phi(student, batch, meta_batch, phi, "multiclass")

    phi = method.fair.phi.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(outer(phi), phi)
    assert grad.abs().max() > 1e-6, "φ does not reach θ': the meta-gradient vanishes"
    eps = 1e-6
    numeric = torch.zeros_like(grad)
    for i in range(TEACHER_DIM):
        plus, minus = phi.detach().clone(), phi.detach().clone()
        plus[i] += eps
        minus[i] -= eps
        numeric[i] = (outer(plus).item() - outer(minus).item()) / (2 * eps)
    assert (grad - numeric).norm() <= 1e-4 * grad.norm()
    assert all(p.grad is None for p in student.parameters())


def test_several_virtual_steps_differ_from_one():
    one, student, batch, meta_batch = _bird(gate_logits=True)
    three, *_ = _bird(gate_logits=True, inner_steps=3)
    phi = one.fair.phi.detach().clone()
    a = one.outer_loss_of_phi(student, batch, meta_batch, phi, "multiclass").item()
    b = three.outer_loss_of_phi(student, batch, meta_batch, phi, "multiclass").item()
    assert abs(a - b) > 1e-6


# -- what the gate reports -----------------------------------------------------------------


def test_gate_summary_and_checkpoint_histogram(tmp_path):
    method, *_ = _bird()
    with torch.no_grad():
        method.fair.phi.copy_(torch.tensor([-3.0, -1.0, -0.01, 0.5, 2.0, 5.0]))
    gate = torch.sigmoid(method.fair.phi)
    summary = method.gate_summary()
    assert summary["gate_below_half"] == 3
    assert summary["gate_min"] == pytest.approx(float(gate.min()))
    assert summary["gate_max"] == pytest.approx(float(gate.max()))
    assert summary["gate_median"] == pytest.approx(float(gate.float().quantile(0.5)))

    torch.manual_seed(0)
    student = create_model("small_cnn", 3, width=4, embed_dim=STUDENT_EMBED)
    preprocess = Preprocessor("image", [0.5] * 3, [0.25] * 3)
    path = save_checkpoint(tmp_path / "ckpt", student, preprocess, method=method.float())
    recorded = json.loads((path / "meta.json").read_text())["method_summary"]
    assert recorded["gate_below_half"] == 3
    assert recorded["gate_dims"] == TEACHER_DIM
    histogram = recorded["gate_histogram"]
    assert len(histogram["edges"]) == len(histogram["counts"]) + 1
    assert sum(histogram["counts"]) == TEACHER_DIM
    # sigmoid of (−3, −1, −0.01, 0.5, 2, 5) = 0.047, 0.269, 0.4975, 0.622, 0.881, 0.993
    assert histogram["counts"] == [1, 0, 1, 0, 1, 0, 1, 0, 1, 1]


def test_fit_reports_gate_statistics_and_phi_gradient_every_epoch(tiny_image_data):
    data = tiny_image_data
    preprocess = Preprocessor.from_config(data.preprocessing)
    torch.manual_seed(123)
    teacher = create_model("resnet18", 3, width=4)
    features = compute_teacher_features(teacher, preprocess, data.train, batch_size=64)
    torch.manual_seed(0)
    student = create_model("small_cnn", 3, width=4, embed_dim=STUDENT_EMBED)
    method = create_method("bird", phi_optimizer="adam", phi_lr=0.5, gate_logits=True)
    method.setup(
        student_dim=STUDENT_EMBED,
        teacher_dim=features.embedding.shape[1],
        num_classes=3,
        task="multiclass",
    )
    config = TrainConfig(epochs=2, batch_size=16, max_steps_per_epoch=3)
    result = fit(student, method, data, config, preprocess=preprocess, train_features=features)
    assert bool(method.fair.teacher_head_fitted)  # fitted from the held-out rows
    for epoch in result.epochs:
        train = epoch.train
        for key in ("gate_min", "gate_p10", "gate_median", "gate_p90", "gate_max", "gate_mean"):
            assert 0.0 <= train[key] <= 1.0, key
        assert train["gate_min"] <= train["gate_median"] <= train["gate_max"]
        assert train["phi_grad_norm"] > 0
    last = result.epochs[-1].train
    assert last["gate_mean"] == pytest.approx(float(method.fair.gate.mean()))
    assert last["gate_below_half"] == float((method.fair.gate < 0.5).sum())
    # Adam moved φ away from its initial value in every dimension.
    assert (method.fair.phi != method.options.gate_init).all()
