"""The method registry, each method's training step, option validation, and BIRD's
meta-gradient checked against finite differences."""

from __future__ import annotations

import math

import pytest
import torch

from bird_core.data.base import DatasetSplits
from bird_core.methods import (
    Batch,
    StepContext,
    available_methods,
    create_method,
    method_options,
)
from bird_core.methods.base import Method
from bird_core.models import Net, create_model
from bird_core.preprocess import Preprocessor
from bird_core.train import (
    Distiller,
    TeacherFeatures,
    TrainConfig,
    build_optimizer,
    compute_teacher_features,
    fit,
    make_batch,
    train_step,
)

EXPECTED_METHODS = ["none", "bkd", "fitnet", "at", "ad", "mfd", "bird"]
STUDENT_EMBED = 8

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_student(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return create_model("small_cnn", 3, width=4, embed_dim=STUDENT_EMBED)


@pytest.fixture(scope="module")
def preprocess(tiny_image_data: DatasetSplits) -> Preprocessor:
    return Preprocessor.from_config(tiny_image_data.preprocessing)


@pytest.fixture(scope="module")
def teacher_features(
    tiny_image_data: DatasetSplits, preprocess: Preprocessor, single_thread: None
) -> TeacherFeatures:
    torch.manual_seed(123)
    teacher = create_model("resnet18", 3, width=4)
    return compute_teacher_features(teacher, preprocess, tiny_image_data.train, batch_size=64)


def setup_method(name: str, features: TeacherFeatures, **options) -> Method:
    method = create_method(name, **options)
    method.setup(
        student_dim=STUDENT_EMBED,
        teacher_dim=features.embedding.shape[1],
        num_classes=3,
        task="multiclass",
    )
    method.fit_to_teacher(features.embedding, features.logits)  # as fit() does
    return method


# -- registry ----------------------------------------------------------------------------------


def test_registry_lists_every_method_in_table_order():
    assert available_methods() == EXPECTED_METHODS


def test_teacher_features_shapes(teacher_features, tiny_image_data):
    n = len(tiny_image_data.train)
    # resnet18 width 4: last stage has 8·4 = 32 channels, no embedding layer → h_T is 32-d
    assert teacher_features.embedding.shape == (n, 32)
    assert teacher_features.logits.shape == (n, 3)
    assert teacher_features.attention.shape == (n, 4, 4)
    # every attention map is L2-normalised
    norms = teacher_features.attention.flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.ones(n), atol=1e-5)


@pytest.mark.parametrize("name", available_methods())
def test_one_train_step_updates_student(name, tiny_image_data, preprocess, teacher_features):
    data = tiny_image_data
    student = tiny_student()
    method = setup_method(name, teacher_features)
    distiller = Distiller(student, method).train()
    optimizer = build_optimizer(student, method, TrainConfig(lr=1e-2))
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    phi_before = method.fair.phi.detach().clone() if name == "bird" else None

    batch = make_batch(data.train, torch.arange(24), preprocess, teacher_features, "cpu")
    meta_batch = None
    if method.needs_meta_batch:
        meta_batch = make_batch(
            data.train, torch.arange(48, 72), preprocess, teacher_features, "cpu"
        )
    logs = train_step(distiller, optimizer, batch, StepContext(task="multiclass"), meta_batch)

    assert math.isfinite(logs["loss"])
    assert all(math.isfinite(v) for v in logs.values())
    changed = [n for n, p in student.named_parameters() if not torch.equal(p, before[n])]
    assert changed, f"{name}: no student parameter moved"
    # the embedding layer feeds every method's loss, so it must move for all of them
    assert any(n.startswith("head.embed") for n in changed)

    phi_params = [n for n, _ in method.named_parameters() if n.endswith("phi")]
    if name == "bird":
        assert phi_params == ["fair.phi"]
        assert not torch.equal(method.fair.phi, phi_before), "bird: φ did not move"
        assert "outer" in logs and logs["phi_grad_norm"] > 0
        # φ is moved by the meta-gradient only, never by the student's optimizer
        assert all(p is not method.fair.phi for g in optimizer.param_groups for p in g["params"])
    else:
        assert phi_params == []
        assert not hasattr(method, "fair")


def test_methods_without_teacher_need_no_teacher_dim():
    for name in ("none", "ad"):
        method = create_method(name)
        method.setup(student_dim=8, teacher_dim=None, num_classes=3, task="multiclass")
    for name in ("bkd", "fitnet", "at", "mfd", "bird"):
        with pytest.raises(ValueError, match="needs teacher features"):
            create_method(name).setup(
                student_dim=8, teacher_dim=None, num_classes=3, task="multiclass"
            )


@pytest.mark.parametrize("name", ["bkd", "fitnet", "mfd"])
def test_multiclass_only_methods_reject_multilabel(name):
    with pytest.raises(ValueError, match="multi-class"):
        create_method(name).setup(student_dim=8, teacher_dim=8, num_classes=3, task="multilabel")


# -- option validation --------------------------------------------------------------------------


def test_unknown_method_lists_valid_names():
    with pytest.raises(ValueError, match="unknown method 'birdd'") as info:
        create_method("birdd")
    for name in EXPECTED_METHODS:
        assert name in str(info.value)


def test_unknown_option_lists_valid_options():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['phi_learning_rate'\]") as info:
        create_method("bird", phi_learning_rate=1.0)
    for option in method_options("bird"):
        assert option in str(info.value)
    with pytest.raises(ValueError, match="valid options: none"):
        create_method("none", temperature=2.0)


def test_method_options_defaults():
    opts = method_options("bird")
    assert opts["phi_lr"] == 0.05
    assert opts["phi_optimizer"] == "adam"
    assert opts["gate_logits"] is True
    assert opts["lambda_logit"] == 5.0
    assert opts["freeze_gate"] is False
    assert opts["virtual_params"] == "head"
    assert opts["gate_init"] == 0.0
    assert method_options("bkd") == {"lambda_kd": 1.0, "temperature": 3.0}
    assert method_options("none") == {}


@pytest.mark.parametrize(
    ("name", "option", "value"),
    [
        ("bird", "phi_lr", "x"),
        ("bird", "meta_interval", 1.5),
        ("bird", "meta_interval", True),
        ("bird", "virtual_params", "everything"),
        ("bird", "meta_sampling", "stratified"),
        ("bird", "meta_batch_size", "16"),
        ("bkd", "temperature", None),
        ("bkd", "lambda_kd", True),
        ("ad", "num_groups", 2.0),
    ],
)
def test_wrong_option_type_names_the_option(name, option, value):
    with pytest.raises(ValueError, match=rf"option {option} must be"):
        create_method(name, **{option: value})


@pytest.mark.parametrize(
    ("name", "option", "value"),
    [
        ("bkd", "lambda_kd", -1.0),
        ("bkd", "temperature", 0.0),
        ("fitnet", "hint_fraction", 1.0),
        ("fitnet", "lambda_hint", -0.5),
        ("at", "lambda_at", -1.0),
        ("ad", "lambda_adv", -2.0),
        ("ad", "num_groups", 1),
        ("mfd", "lambda_f", -3.0),
        ("mfd", "sigma", 0.0),
        ("bird", "lambda_kd", -1.0),
        ("bird", "gamma", -0.1),
        ("bird", "phi_lr", -1.0),
        ("bird", "inner_lr", -0.1),
        ("bird", "meta_fraction", 1.5),
        ("bird", "meta_fraction", 0.0),
        ("bird", "meta_interval", 0),
        ("bird", "meta_batch_size", 1),
    ],
)
def test_out_of_range_option_names_the_option(name, option, value):
    with pytest.raises(ValueError, match=rf"option {option} must be"):
        create_method(name, **{option: value})


def test_valid_options_are_accepted():
    method = create_method("bird", phi_lr=3, meta_interval=2, virtual_params="all", gamma=0)
    assert method.options.phi_lr == 3
    assert method.options.virtual_params == "all"
    assert create_method("bird", meta_batch_size=None).options.meta_batch_size is None


# -- clear errors on missing inputs ----------------------------------------------------------------


def _out_and_batch(features: TeacherFeatures, data: DatasetSplits, preprocess: Preprocessor):
    student = tiny_student()
    batch = make_batch(data.train, torch.arange(12), preprocess, features, "cpu")
    return student, student(batch.x, features=True), batch


@pytest.mark.parametrize(
    ("name", "field", "what"),
    [
        ("bird", "teacher_embedding", "teacher features"),
        ("mfd", "teacher_embedding", "teacher features"),
        ("fitnet", "teacher_embedding", "teacher features"),
        ("bkd", "teacher_logits", "teacher logits"),
        ("at", "teacher_attention", "teacher attention maps"),
    ],
)
def test_missing_teacher_output_raises_clearly(
    name, field, what, teacher_features, tiny_image_data, preprocess
):
    _, out, batch = _out_and_batch(teacher_features, tiny_image_data, preprocess)
    setattr(batch, field, None)
    method = setup_method(name, teacher_features)
    with pytest.raises(ValueError, match=f"method '{name}' needs {what} but the batch has none"):
        method.loss(out, batch, StepContext())


def test_bird_meta_step_without_teacher_features_raises(
    teacher_features, tiny_image_data, preprocess
):
    student, _, batch = _out_and_batch(teacher_features, tiny_image_data, preprocess)
    method = setup_method("bird", teacher_features)
    bare = Batch(x=batch.x, label=batch.label, group=batch.group)
    with pytest.raises(ValueError, match="needs teacher features"):
        method.meta_step(student, bare, batch, StepContext())


def test_bird_train_step_without_meta_batch_raises(teacher_features, tiny_image_data, preprocess):
    student, _, batch = _out_and_batch(teacher_features, tiny_image_data, preprocess)
    method = setup_method("bird", teacher_features)
    distiller = Distiller(student, method)
    optimizer = build_optimizer(student, method, TrainConfig())
    with pytest.raises(ValueError, match="needs a meta batch"):
        train_step(distiller, optimizer, batch, StepContext(), None)


def test_at_with_mlp_student_raises_clearly():
    torch.manual_seed(0)
    student = create_model("mlp", 3, in_features=5, hidden=(8,), embed_dim=4)
    method = create_method("at")
    method.setup(student_dim=4, teacher_dim=8, num_classes=3, task="multiclass")
    x = torch.randn(6, 5)
    batch = Batch(
        x=x,
        label=torch.tensor([0, 1, 2, 0, 1, 2]),
        group=torch.tensor([0, 0, 0, 1, 1, 1]),
        teacher_attention=torch.rand(6, 4, 4),
    )
    with pytest.raises(ValueError, match="spatial feature map"):
        method.loss(student(x, features=True), batch, StepContext())


def test_ad_rejects_group_ids_beyond_num_groups(teacher_features, tiny_image_data, preprocess):
    _, out, batch = _out_and_batch(teacher_features, tiny_image_data, preprocess)
    batch.group = batch.group * 2  # ids 0 and 2 with num_groups = 2
    method = setup_method("ad", teacher_features)
    with pytest.raises(ValueError, match="group id 2 out of range for num_groups=2"):
        method.loss(out, batch, StepContext())


def test_fitnet_switches_from_hints_to_kd(teacher_features, tiny_image_data, preprocess):
    _, out, batch = _out_and_batch(teacher_features, tiny_image_data, preprocess)
    method = setup_method("fitnet", teacher_features, hint_fraction=0.5)
    hint_total, hint_parts = method.loss(out, batch, StepContext(progress=0.49))
    assert set(hint_parts) == {"hint"}
    expected_hint = 0.5 * (method.regressor(out.embedding) - batch.teacher_embedding).pow(2).mean()
    assert hint_total.item() == pytest.approx(expected_hint.item(), rel=1e-6)
    kd_total, kd_parts = method.loss(out, batch, StepContext(progress=0.5))
    assert set(kd_parts) == {"ce", "kd"}
    assert kd_total.item() == pytest.approx((kd_parts["ce"] + kd_parts["kd"]).item(), rel=1e-6)


# -- BIRD's meta-gradient --------------------------------------------------------------------------

TEACHER_DIM = 6


def _double_batch(n: int, generator: torch.Generator) -> Batch:
    """A preprocessed float64 batch (8×8 RGB) with every (class, group) cell present."""
    rows = torch.arange(n)
    return Batch(
        x=torch.randn(n, 3, 8, 8, dtype=torch.float64, generator=generator),
        label=rows % 3,
        group=(rows // 3) % 2,
        teacher_embedding=2 * torch.randn(n, TEACHER_DIM, dtype=torch.float64, generator=generator),
        teacher_logits=torch.randn(n, 3, dtype=torch.float64, generator=generator),
    )


def _bird_float64(virtual_params: str, **options):
    torch.manual_seed(0)
    method = create_method("bird", virtual_params=virtual_params, inner_lr=0.5, **options)
    method.setup(
        student_dim=STUDENT_EMBED, teacher_dim=TEACHER_DIM, num_classes=3, task="multiclass"
    )
    method.double()
    student = tiny_student().double().train()
    generator = torch.Generator().manual_seed(1)
    batch, meta_batch = _double_batch(12, generator), _double_batch(12, generator)
    phi = torch.randn(TEACHER_DIM, dtype=torch.float64, generator=generator)
    with torch.no_grad():
        method.fair.phi.copy_(phi)
    held_out = _double_batch(24, generator)  # what fit() fits the teacher's head from
    method.fit_to_teacher(held_out.teacher_embedding, held_out.teacher_logits)
    return method, student, batch, meta_batch


def _buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in module.named_buffers()}


@pytest.mark.parametrize("virtual_params", ["head", "all"])
def test_bird_meta_gradient_matches_finite_differences(virtual_params):
    method, student, batch, meta_batch = _bird_float64(virtual_params)
    buffers_before = _buffers(student)
    assert any("running_mean" in n for n in buffers_before)  # batch norm is exercised

    def outer(phi: torch.Tensor) -> torch.Tensor:
        return method.outer_loss_of_phi(student, batch, meta_batch, phi, "multiclass")

    phi = method.fair.phi.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(outer(phi), phi)
    assert grad.dtype == torch.float64
    assert grad.abs().max() > 1e-6, "φ does not reach θ': the meta-gradient vanishes"

    eps = 1e-6
    numeric = torch.zeros_like(grad)
    for i in range(TEACHER_DIM):
        plus, minus = phi.detach().clone(), phi.detach().clone()
        plus[i] += eps
        minus[i] -= eps
        numeric[i] = (outer(plus).item() - outer(minus).item()) / (2 * eps)
    for i in range(TEACHER_DIM):
        assert grad[i].item() == pytest.approx(numeric[i].item(), rel=1e-4, abs=1e-9), i
    assert (grad - numeric).norm() <= 1e-4 * grad.norm()

    # the virtual passes leave batch-norm statistics and the student's gradients alone
    for n, b in student.named_buffers():
        assert torch.equal(b, buffers_before[n]), n
    assert all(p.grad is None for p in student.parameters())


@pytest.mark.parametrize("virtual_params", ["head", "all"])
def test_bird_meta_gradient_depends_on_virtual_step(virtual_params):
    # With a first-order shortcut (no create_graph, or θ' not depending on φ) the outer loss
    # would not change with φ: check that it does, by more than rounding.
    method, student, batch, meta_batch = _bird_float64(virtual_params)
    phi = method.fair.phi.detach().clone()
    base = method.outer_loss_of_phi(student, batch, meta_batch, phi, "multiclass").item()
    moved = method.outer_loss_of_phi(student, batch, meta_batch, phi - 2.0, "multiclass").item()
    assert abs(moved - base) > 1e-6


@pytest.mark.parametrize("virtual_params", ["head", "all"])
def test_bird_meta_step_moves_phi_by_minus_lr_times_gradient(virtual_params):
    method, student, batch, meta_batch = _bird_float64(
        virtual_params, phi_lr=7.0, phi_optimizer="sgd"
    )
    buffers_before = _buffers(student)
    params_before = {n: p.detach().clone() for n, p in student.named_parameters()}
    phi0 = method.fair.phi.detach().clone()
    phi = phi0.clone().requires_grad_(True)
    outer = method.outer_loss_of_phi(student, batch, meta_batch, phi, "multiclass")
    (grad,) = torch.autograd.grad(outer, phi)

    logs = method.meta_step(student, batch, meta_batch, StepContext(task="multiclass", step=0))

    assert torch.allclose(method.fair.phi, phi0 - 7.0 * grad, rtol=0, atol=1e-13)
    assert not torch.equal(method.fair.phi, phi0)
    assert logs["outer"] == pytest.approx(outer.item(), rel=1e-12)
    assert logs["phi_grad_norm"] == pytest.approx(grad.norm().item(), rel=1e-6)
    assert not method.fair.phi.requires_grad
    for n, b in student.named_buffers():
        assert torch.equal(b, buffers_before[n]), n
    for n, p in student.named_parameters():
        assert torch.equal(p, params_before[n]), n
        assert p.grad is None, n


def test_bird_meta_interval_skips_steps():
    method, student, batch, meta_batch = _bird_float64("head", meta_interval=3)
    phi0 = method.fair.phi.detach().clone()
    for step in (1, 2, 4):
        assert method.meta_step(student, batch, meta_batch, StepContext(step=step)) == {}
    assert torch.equal(method.fair.phi, phi0)
    assert method.meta_step(student, batch, meta_batch, StepContext(step=3))
    assert not torch.equal(method.fair.phi, phi0)


def test_bird_head_mode_without_embedding_layer_fails_clearly():
    torch.manual_seed(0)
    student = create_model("small_cnn", 3, width=4, embed_dim=None)
    method = create_method("bird")  # virtual_params="head" is the default
    method.setup(student_dim=student.embed_dim, teacher_dim=6, num_classes=3, task="multiclass")
    rows = torch.arange(12)
    batch = Batch(
        x=torch.randn(12, 3, 8, 8),
        label=rows % 3,
        group=(rows // 3) % 2,
        teacher_embedding=torch.randn(12, 6),
    )
    with pytest.raises(ValueError, match="virtual_params='all'"):
        method.meta_step(student, batch, batch, StepContext())
    with pytest.raises(ValueError, match="embed_dim"):
        method.check_student(student)
    # With the full virtual step φ does reach θ' and is meta-learned.
    method = create_method("bird", virtual_params="all")
    method.setup(student_dim=student.embed_dim, teacher_dim=6, num_classes=3, task="multiclass")
    phi0 = method.fair.phi.detach().clone()
    method.meta_step(student, batch, batch, StepContext())
    assert not torch.equal(method.fair.phi, phi0)


@pytest.mark.parametrize(
    ("name", "option"), [("bird", "phi_lr"), ("bkd", "temperature"), ("bird", "inner_lr")]
)
def test_nan_option_is_rejected(name, option):
    with pytest.raises(ValueError, match=rf"option {option}"):
        create_method(name, **{option: float("nan")})
    with pytest.raises(ValueError, match=rf"option {option}"):
        create_method(name, **{option: float("inf")})


def test_bird_joint_loss_is_inner_plus_weighted_fairness(
    teacher_features, tiny_image_data, preprocess
):
    _, out, batch = _out_and_batch(teacher_features, tiny_image_data, preprocess)
    method = setup_method("bird", teacher_features, lambda_fair=2.0, lambda_kd=3.0)
    total, parts = method.loss(out, batch, StepContext())
    assert set(parts) == {"ce", "feat", "kd", "fair"}
    lambda_logit = method.options.lambda_logit
    expected = parts["ce"] + 3.0 * parts["feat"] + lambda_logit * parts["kd"] + 2.0 * parts["fair"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    # Stage III must not move φ: no gradient reaches it
    total.backward()
    assert method.fair.phi.grad is None
    assert method.fair.projector.weight.grad is not None


# -- fit ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", available_methods())
def test_fit_one_epoch_reports_val_metrics(name, tiny_image_data, preprocess, teacher_features):
    student = tiny_student()
    method = setup_method(name, teacher_features)
    config = TrainConfig(epochs=1, batch_size=16, max_steps_per_epoch=3)
    epochs_seen = []
    result = fit(
        student,
        method,
        tiny_image_data,
        config,
        preprocess=preprocess,
        train_features=teacher_features if method.needs_teacher else None,
        on_epoch_end=lambda res, state: epochs_seen.append((res.epoch, state.step)),
    )
    assert len(result.epochs) == 1
    assert not result.stopped_early
    assert epochs_seen == [(0, 3)]
    epoch = result.epochs[0]
    assert math.isfinite(epoch.train["loss"])
    val = epoch.val
    assert val["num_samples"] == len(tiny_image_data.val)
    for key in ("auroc", "f1", "accuracy"):
        assert 0.0 <= val[key] <= 100.0
    assert "delta_mean_deo" in val and "delta_max_deo" in val
    assert len(val["deo"]) == 3
    if name == "bird":
        assert "outer" in epoch.train
    assert result.as_dict()["epochs"][0]["val"]["num_samples"] == len(tiny_image_data.val)


def test_fit_requires_teacher_features_for_teacher_methods(tiny_image_data, preprocess):
    method = create_method("bkd")
    method.setup(student_dim=STUDENT_EMBED, teacher_dim=32, num_classes=3, task="multiclass")
    with pytest.raises(ValueError, match="needs precomputed teacher features"):
        fit(tiny_student(), method, tiny_image_data, TrainConfig(epochs=1), preprocess=preprocess)
