"""The loss functions against hand-computed values and independent re-implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bird_core.fairdistill import FairDistill
from bird_core.losses import (
    at_loss,
    attention_map,
    kd_loss,
    mmd_loss,
    probabilities,
    soft_equal_opportunity_gap,
    task_loss,
)
from bird_core.methods.ad import gradient_reversal

pytestmark = pytest.mark.usefixtures("single_thread")

# -- kd_loss -----------------------------------------------------------------------------------


def test_kd_loss_hand_computed():
    # T = 2. Row 0: z_T/T = [ln 3, 0] → p_T = [3/4, 1/4]; z_S = 0 → p_S = [1/2, 1/2].
    #   KL(p_T ‖ p_S) = 3/4·ln(3/4 / 1/2) + 1/4·ln(1/4 / 1/2) = 0.75·ln 1.5 − 0.25·ln 2
    #                 = 0.304099 − 0.173287 = 0.130812
    # Row 1: z_S = z_T → KL = 0.
    # batchmean: (0.130812 + 0) / 2, times T² = 4 → 0.261624.
    student = torch.tensor([[0.0, 0.0], [1.0, -1.0]], dtype=torch.float64)
    teacher = torch.tensor([[2 * math.log(3.0), 0.0], [1.0, -1.0]], dtype=torch.float64)
    expected = 4 * (0.75 * math.log(1.5) - 0.25 * math.log(2.0)) / 2
    assert expected == pytest.approx(0.261624, abs=1e-6)
    assert kd_loss(student, teacher, temperature=2.0).item() == pytest.approx(expected, rel=1e-12)


def _softmax_np(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("temperature", [1.0, 3.0, 4.5])
def test_kd_loss_matches_numpy_formula(temperature):
    rng = np.random.default_rng(0)
    zs = rng.normal(size=(7, 5)) * 2
    zt = rng.normal(size=(7, 5)) * 2
    p_t = _softmax_np(zt / temperature)
    p_s = _softmax_np(zs / temperature)
    expected = temperature**2 * np.sum(p_t * (np.log(p_t) - np.log(p_s))) / zs.shape[0]
    got = kd_loss(torch.from_numpy(zs), torch.from_numpy(zt), temperature).item()
    assert got == pytest.approx(expected, rel=1e-10)


def test_kd_loss_gradient_reaches_student_only():
    student = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    kd_loss(student, teacher, 3.0).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_task_loss_and_probabilities_per_task():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    # multi-class: CE = mean(−log softmax[label]) with labels [0, 1]
    #   row 0: log(1 + e^−2), row 1: log(1 + e^−1)
    ce = task_loss(logits, torch.tensor([0, 1]), "multiclass").item()
    assert ce == pytest.approx((math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1))) / 2)
    # multi-label: BCE with logits, averaged over the four entries; labels [[1, 0], [0, 1]]
    #   entries: −log σ(2), −log(1 − σ(0)), −log(1 − σ(0)), −log σ(1)
    bce = task_loss(logits, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "multilabel").item()
    expected = (math.log(1 + math.exp(-2)) + 2 * math.log(2) + math.log(1 + math.exp(-1))) / 4
    assert bce == pytest.approx(expected)
    assert probabilities(logits, "multiclass").sum(1).tolist() == pytest.approx([1.0, 1.0])
    sig = probabilities(logits, "multilabel")
    assert sig[0, 0].item() == pytest.approx(1 / (1 + math.exp(-2)))


# -- soft equal-opportunity gap ------------------------------------------------------------------


def test_soft_eo_gap_multiclass_hand_computed():
    # rows: (label, group, probs)
    #   0: y0 g0 [.8 .1 .1]   1: y0 g0 [.6 .2 .2]   2: y0 g1 [.3 .4 .3]   6: y0 g2 [.5 .3 .2]
    #   3: y1 g0 [.2 .5 .3]   4: y1 g1 [.1 .6 .3]
    #   5: y2 g1 [.1 .2 .7]   (class 2 only in group 1 → skipped)
    # class 0: group means g0 (.8+.6)/2 = .7, g1 .3, g2 .5 → gap max − min = .4
    # class 1: g0 .5, g1 .6 → gap .1
    # mean over the two classes kept: (.4 + .1) / 2 = .25
    probs = torch.tensor(
        [
            [0.8, 0.1, 0.1],
            [0.6, 0.2, 0.2],
            [0.3, 0.4, 0.3],
            [0.2, 0.5, 0.3],
            [0.1, 0.6, 0.3],
            [0.1, 0.2, 0.7],
            [0.5, 0.3, 0.2],
        ],
        dtype=torch.float64,
        requires_grad=True,
    )
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 0])
    groups = torch.tensor([0, 0, 1, 0, 1, 1, 2])
    gap = soft_equal_opportunity_gap(probs, labels, groups, "multiclass")
    assert gap.item() == pytest.approx(0.25, abs=1e-12)
    gap.backward()
    # d gap / d p: class 0 gap = mean_g0 − mean_g1, halved by the mean over 2 classes:
    #   rows 0, 1 (g0, averaged over 2): +1/2·1/2 = .25; row 2 (g1): −.5; row 6 (g2, middle): 0
    # class 1 gap = p[4,1] − p[3,1]: ±.5. Skipped class 2 (row 5) gets no gradient.
    expected = torch.zeros_like(probs)
    expected[0, 0] = expected[1, 0] = 0.25
    expected[2, 0] = -0.5
    expected[4, 1] = 0.5
    expected[3, 1] = -0.5
    assert torch.allclose(probs.grad, expected, atol=1e-12)


def test_soft_eo_gap_multilabel_hand_computed():
    # two attributes; each contributes its positive class (p, rows with label 1) and its
    # negative class (1 − p, rows with label 0).
    #   row 0: g0 y[1,0] p[.9 .2]   row 1: g1 y[1,1] p[.6 .4]
    #   row 2: g0 y[0,1] p[.3 .7]   row 3: g1 y[0,1] p[.1 .8]
    # attr 0 positive: row 0 (g0 .9), row 1 (g1 .6)         → gap .3
    # attr 1 positive: row 2 (g0 .7), rows 1, 3 (g1 (.4+.8)/2 = .6) → gap .1
    # attr 0 negative: row 2 (g0 1−.3 = .7), row 3 (g1 1−.1 = .9)    → gap .2
    # attr 1 negative: row 0 only (g0) → skipped
    # mean: (.3 + .1 + .2) / 3 = .2
    probs = torch.tensor([[0.9, 0.2], [0.6, 0.4], [0.3, 0.7], [0.1, 0.8]], dtype=torch.float64)
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    groups = torch.tensor([0, 1, 0, 1])
    gap = soft_equal_opportunity_gap(probs, labels, groups, "multilabel")
    assert gap.item() == pytest.approx(0.2, abs=1e-12)


def test_soft_eo_gap_is_differentiable_zero_without_two_groups():
    probs = torch.tensor([[0.7, 0.3], [0.2, 0.8]], dtype=torch.float64, requires_grad=True)
    gap = soft_equal_opportunity_gap(
        probs, torch.tensor([0, 1]), torch.tensor([0, 0]), "multiclass"
    )
    assert gap.item() == 0.0
    assert gap.requires_grad
    gap.backward()
    assert torch.equal(probs.grad, torch.zeros_like(probs))


# -- attention transfer ---------------------------------------------------------------------------


def test_attention_map_hand_computed():
    # channel 0 = [[1, 0], [0, 1]], channel 1 = [[1, 2], [0, 1]]
    # mean of squares over channels: [[(1+1)/2, (0+4)/2], [0, (1+1)/2]] = [[1, 2], [0, 1]]
    # flattened [1, 2, 0, 1], L2 norm √6 → [1, 2, 0, 1] / √6
    fmap = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[1.0, 2.0], [0.0, 1.0]]]], dtype=torch.float64)
    att = attention_map(fmap)
    expected = torch.tensor([[1.0, 2.0, 0.0, 1.0]], dtype=torch.float64) / math.sqrt(6)
    assert att.shape == (1, 4)
    assert torch.allclose(att, expected, atol=1e-12)


def test_attention_map_resizes_to_requested_size():
    # A constant 2×2 map stays constant when resized to 3×3: nine equal entries of norm 1 → 1/3.
    fmap = torch.full((2, 4, 2, 2), 2.0, dtype=torch.float64)
    att = attention_map(fmap, size=(3, 3))
    assert att.shape == (2, 9)
    assert torch.allclose(att, torch.full((2, 9), 1 / 3, dtype=torch.float64), atol=1e-12)


def test_at_loss_hand_computed():
    # at_S = [1, 2, 0, 1]/√6, at_T = [.5, .5, .5, .5] (both unit vectors)
    # Σ (at_S − at_T)² = |at_S|² + |at_T|² − 2 at_S·at_T = 2 − 2·(4/√6)·.5 = 2 − 4/√6 = 0.367007
    # mean over 4 entries = 0.0917517; × ½ × λ (λ = 2) → 0.0917517
    at_s = torch.tensor([[1.0, 2.0, 0.0, 1.0]], dtype=torch.float64) / math.sqrt(6)
    at_t = torch.full((1, 4), 0.5, dtype=torch.float64)
    expected = 0.5 * 2.0 * (2 - 4 / math.sqrt(6)) / 4
    assert expected == pytest.approx(0.0917517, abs=1e-7)
    assert at_loss(at_s, at_t, weight=2.0).item() == pytest.approx(expected, rel=1e-12)
    # λ scales linearly
    assert at_loss(at_s, at_t, weight=1000.0).item() == pytest.approx(500 * expected, rel=1e-12)


# -- MFD's MMD ------------------------------------------------------------------------------------


def _mmd_reference(student, teacher, labels, groups, weight, sigma):
    """MFD's formula written out with Python loops over explicit pairs."""
    student = np.asarray(student, dtype=np.float64)
    teacher = np.asarray(teacher, dtype=np.float64)

    def sq(a, b):
        return max(float(np.sum((a - b) ** 2)), 1e-12)

    sigma_avg = np.mean([sq(t, s) for t in teacher for s in student])

    def k_mean(xs, ys):
        return np.mean([math.exp(-sq(a, b) / (2 * sigma * sigma_avg)) for a in xs for b in ys])

    total = 0.0
    for c in sorted(set(labels)):
        t_c = [teacher[i] for i in range(len(labels)) if labels[i] == c]
        for g in sorted(set(groups)):
            s_cg = [student[i] for i in range(len(labels)) if labels[i] == c and groups[i] == g]
            if not s_cg:
                continue
            total += k_mean(t_c, t_c) + k_mean(s_cg, s_cg) - 2 * k_mean(t_c, s_cg)
    return 0.5 * weight * total


def test_mmd_loss_hand_computed():
    # 1-d features, one class, two groups: teacher t = [0, 1], student s = [0 (g0), 1 (g1)].
    # σ̄ = mean of the four t–s squared distances (0, 1, 1, 0) = .5 → K(a, b) = exp(−(a−b)²)
    # K_TT mean = (1 + e⁻¹ + e⁻¹ + 1)/4 = (1 + e⁻¹)/2
    # g0: S = {0}: K_SS = 1, K_TS mean = (1 + e⁻¹)/2 → (1 + e⁻¹)/2 + 1 − (1 + e⁻¹) = (1 − e⁻¹)/2
    # g1: the same by symmetry.  Σ = 1 − e⁻¹ = 0.632121;  × ½ λ_f with λ_f = 2 → 0.632121
    teacher = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    student = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    got = mmd_loss(student, teacher, torch.tensor([0, 0]), torch.tensor([0, 1]), weight=2.0)
    assert got.item() == pytest.approx(1 - math.exp(-1), rel=1e-9)


def test_mmd_loss_matches_reference_implementation():
    rng = np.random.default_rng(3)
    student = rng.normal(size=(9, 4))
    teacher = rng.normal(size=(9, 4))
    labels = [0, 0, 0, 1, 1, 1, 2, 2, 0]
    groups = [0, 1, 1, 0, 1, 0, 1, 1, 0]  # class 2 only in group 1
    expected = _mmd_reference(student, teacher, labels, groups, weight=3.0, sigma=0.7)
    got = mmd_loss(
        torch.from_numpy(student),
        torch.from_numpy(teacher),
        torch.tensor(labels),
        torch.tensor(groups),
        weight=3.0,
        sigma=0.7,
    )
    assert got.item() == pytest.approx(expected, rel=1e-9)
    assert got.item() > 0


def test_mmd_loss_zero_when_student_equals_teacher_in_one_group():
    feats = torch.randn(6, 3, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    got = mmd_loss(feats.clone(), feats, labels, torch.zeros(6, dtype=torch.long), weight=5.0)
    assert got.item() == pytest.approx(0.0, abs=1e-9)


def test_mmd_loss_gradient_reaches_student_not_teacher():
    student = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    groups = torch.tensor([0, 1, 0, 1, 0, 1])
    mmd_loss(student, teacher, labels, groups, weight=1.0).backward()
    assert teacher.grad is None
    assert student.grad.abs().sum() > 0


# -- FairDistill ---------------------------------------------------------------------------------


def test_fairdistill_gate_init_and_phi_not_trainable():
    fd = FairDistill(student_dim=3, teacher_dim=5)
    assert fd.phi.shape == (5,)
    # φ starts at 0: sigmoid(0) = 0.5, where the gate is most sensitive
    assert torch.equal(fd.phi, torch.zeros(5))
    assert fd.gate.tolist() == [0.5] * 5
    fd = FairDistill(student_dim=3, teacher_dim=5, gate_init=4.0)
    # sigmoid(4) = 1/(1 + e⁻⁴) = 0.98201379
    assert fd.gate.tolist() == pytest.approx([0.98201379] * 5, abs=1e-7)
    assert not fd.phi.requires_grad
    trainable = {n for n, p in fd.named_parameters() if p.requires_grad}
    assert trainable == {"projector.weight", "projector.bias"}


def test_fairdistill_feature_loss_hand_computed():
    # P = identity, φ = 0 → sigmoid(φ) = .5 → target = h_T / 2
    # row 0: h_S = [1, 2], h_T = [2, 2] → target [1, 1], diff [0, 1]
    # row 1: h_S = [0, 0], h_T = [2, −2] → target [1, −1], diff [−1, 1]
    # mean of squares over 2 rows × 2 dims: (0 + 1 + 1 + 1) / 4 = .75
    fd = FairDistill(2, 2, gate_init=0.0).double()
    with torch.no_grad():
        fd.projector.weight.copy_(torch.eye(2))
        fd.projector.bias.zero_()
    h_s = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    h_t = torch.tensor([[2.0, 2.0], [2.0, -2.0]], dtype=torch.float64)
    assert fd.feature_loss(h_s, h_t).item() == pytest.approx(0.75, abs=1e-12)
    # An explicit φ replaces the stored one: φ = [+∞-ish, −∞-ish] → gate [1, 0] → target
    # row 0 [2, 0], row 1 [2, 0]; diffs [−1, 2], [−2, 0] → (1 + 4 + 4 + 0)/4 = 2.25
    phi = torch.tensor([50.0, -50.0], dtype=torch.float64)
    assert fd.feature_loss(h_s, h_t, phi).item() == pytest.approx(2.25, abs=1e-12)


def test_fairdistill_feature_loss_general_formula_and_phi_gradient():
    torch.manual_seed(0)
    fd = FairDistill(3, 4).double()
    h_s = torch.randn(5, 3, dtype=torch.float64)
    h_t = torch.randn(5, 4, dtype=torch.float64)
    phi = torch.randn(4, dtype=torch.float64, requires_grad=True)
    loss = fd.feature_loss(h_s, h_t, phi)
    diff = fd.projector(h_s) - h_t * torch.sigmoid(phi)
    assert loss.item() == pytest.approx(float((diff**2).sum().detach()) / 20, rel=1e-12)
    (grad,) = torch.autograd.grad(loss, phi)
    # ∂/∂φ_j = mean over rows of 2·diff_ij·(−h_T,ij)·σ'(φ_j) / d_T
    sig = torch.sigmoid(phi)
    expected = (2 * diff * (-h_t) * sig * (1 - sig)).sum(0) / 20
    assert torch.allclose(grad, expected.detach(), atol=1e-12)


def test_fairdistill_rejects_wrong_teacher_width():
    fd = FairDistill(3, 4)
    with pytest.raises(ValueError, match="width 5"):
        fd.feature_loss(torch.randn(2, 3), torch.randn(2, 5))
    with pytest.raises(ValueError, match="positive"):
        FairDistill(0, 4)


# -- gradient reversal -----------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.0, 1.0, 2.5])
def test_gradient_reversal_flips_and_scales(scale):
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, dtype=torch.float64)
    y = gradient_reversal(x, scale)
    assert torch.equal(y, x)  # identity forward
    (y * w).sum().backward()
    assert torch.allclose(x.grad, -scale * w, atol=0)
