"""The shipped problems: closed forms, real-data problems, hyper-cleaning with IFT/AID, constrained problems."""

from __future__ import annotations

import pytest
import torch

import bilevel as bl
from bilevel.problems import constrained_svm, hyper_cleaning, logreg, lvhba_toy, quadratic, weight_decay

pytest.importorskip("sklearn")
D = torch.float64


def test_quadratic_closed_forms_agree_with_finite_differences():
    q = quadratic(dx=3, dy=6, cond=20.0, seed=5)
    x = torch.randn(3, dtype=D)
    assert float(q.problem.grad_g_y(x, q.y_star(x)).norm()) < 1e-12
    eps = 1e-6
    fd = torch.tensor(
        [(q.outer_value(x + eps * e) - q.outer_value(x - eps * e)) / (2 * eps) for e in torch.eye(3, dtype=D)], dtype=D
    )
    torch.testing.assert_close(fd, q.hypergradient(x), atol=1e-6, rtol=1e-6)
    assert float(q.hypergradient(q.x_star).norm()) < 1e-10
    assert abs(q.L_inner / q.mu_inner - 20.0) < 1e-9


def test_stochastic_quadratic_batches_average_to_the_deterministic_problem():
    qs = quadratic(dx=3, dy=6, n_batches=5, seed=6)
    q = quadratic(dx=3, dy=6, seed=6)
    torch.testing.assert_close(qs.x_star, q.x_star)
    x = torch.randn(3, dtype=D)
    y = q.y_star(x)
    assert abs(float(qs.problem.f(x, y)) - qs.outer_value(x)) < 1e-10
    for k in range(5):  # every minibatch inner problem stays strongly convex
        assert float(torch.linalg.eigvalsh(qs.problem.draw_inner(k)[0]).min()) > 0


@pytest.mark.parametrize("dataset,per_feature", [("breast_cancer", False), ("breast_cancer", True)])
def test_logreg_hyperparameter_selection_lowers_validation_loss(dataset, per_feature):
    lr_ = logreg(dataset, per_feature=per_feature, x0=2.0)
    p = lr_.problem
    assert p.dx == (lr_.n_features if per_feature else 1)
    W0 = lr_.solve_inner(p.x0)
    r = bl.AID().solve(p, max_iter=15, time_limit=60.0)  # defaults
    W1 = lr_.solve_inner(r.x_flat)
    assert lr_.loss(W1, "val") < lr_.loss(W0, "val")
    assert 0.8 < lr_.test_accuracy(W1) <= 1.0
    assert p.value(r.x_flat) == pytest.approx(lr_.loss(W1, "val"), rel=1e-12)


@pytest.mark.parametrize("name", ["IFT", "AID"])
def test_hyper_cleaning_on_digits(name):
    h = hyper_cleaning("digits", corruption=0.5)
    assert h.corrupted_mask.float().mean().item() == pytest.approx(0.5, abs=0.05)
    base = h.test_accuracy(h.solve_inner(None))  # unweighted training on the corrupted set
    r = getattr(bl, name)().solve(h.problem, max_iter=30, time_limit=60.0)  # defaults
    acc = h.test_accuracy(h.solve_inner(r.x_flat))  # retrained at the returned weights
    corrupted, clean = h.mean_weights(r.x)
    assert acc > base + 0.1, (acc, base)
    assert corrupted < 0.5 * clean, (corrupted, clean)


def test_weight_decay_mlp_problem():
    w = weight_decay()
    p = w.problem
    assert p.dy == 64 * 32 + 32 + 32 * 10 + 10 == 2410 and p.dx == 2 and p.dtype == torch.float32
    assert w.layers == [["0.weight", "0.bias"], ["2.weight", "2.bias"]]
    before = {k: v.clone() for k, v in w.model.state_dict().items()}
    y = w.retrain(p.x0, on_failure="raise")
    assert all(torch.equal(before[k], v) for k, v in w.model.state_dict().items())
    # the penalty by hand: ½ Σ_l e^{x_l} ‖θ_l‖²
    params = p.yspec.unflatten(y)
    pen = 0.5 * sum(torch.exp(p.x0[i]) * sum((params[n] ** 2).sum() for n in ns) for i, ns in enumerate(w.layers))
    A, b = w.splits["train"]
    assert float(p.g(p.x0, y)) == pytest.approx(
        float(torch.nn.functional.cross_entropy(w._logits(y, A), b) + pen), rel=1e-5
    )
    assert w.accuracy(y, "test") > 0.9
    assert w.loss(y, "val") == pytest.approx(float(p.f(p.x0, y)), rel=1e-5)


def test_fashion_mnist_missing_gives_install_hint(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        hyper_cleaning("fashion-mnist", data_dir=str(tmp_path))


def test_lvhba_toy_known_solution_is_feasible_and_kkt():
    t = lvhba_toy(n=7)
    p = t.problem
    assert p.constrained and p.n_constraints == 2
    assert float(p.c(t.x_star, t.y_star).abs().max()) < 1e-12
    # lower-level KKT at y*: ∇_y g + J_y cᵀλ = 0 with λ = (0, 1) (the equality's multiplier is -1)
    gy = p.grad_g_y(t.x_star, t.y_star)
    _, cy = p.grad_c_dot(t.x_star, t.y_star, torch.tensor([0.0, 1.0], dtype=D))
    assert float((gy + cy).abs().max()) < 1e-12
    # upper level on the solution set y1 = x + 1, y2_i = -2 x_i - 1 (symmetric): minimised at x_i = -0.3
    a = torch.linspace(-1, 1, 2001, dtype=D)
    vals = 0.5 * (3 * a + 1) ** 2 + 0.5 * a**2
    assert abs(float(a[vals.argmin()]) + 0.3) < 1e-3
    assert t.relative_error(t.x_star) == 0.0
    with pytest.raises(ValueError, match="IFT cannot handle lower-level constraints"):
        bl.IFT().solve(p)


def test_constrained_svm_builds():
    s = constrained_svm()
    p = s.problem
    assert p.constrained and p.n_constraints == s.n_train
    assert set(p.yspec.keys) == {"w", "b", "xi"}
    c = p.c(p.x0, p.y0)
    assert c.shape == (s.n_train,)
    gx, gy = p.grad_c_dot(p.x0, p.y0, torch.ones(s.n_train, dtype=D))
    assert float(gx.abs().max()) == 0 and gy.shape == (p.dy,)
    assert 0 <= s.test_accuracy(p.to_user_y(p.y0)) <= 1
    with pytest.raises(ValueError, match="AID cannot handle"):
        bl.AID().solve(p)
