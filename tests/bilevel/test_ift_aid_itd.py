"""IFT, AID and ITD (presets of the composition) against closed forms, dense solves and finite differences."""

from __future__ import annotations

import math

import pytest
import torch

import bilevel as bl
from bilevel._hypergradient import implicit_hypergradient, unrolled_hypergradient
from bilevel.itd import itd_hypergradient
from bilevel.problems import quadratic

D = torch.float64


@pytest.fixture(scope="module")
def q():
    return quadratic(dx=5, dy=10, cond=10.0, reg=1.0, seed=3)


def _rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


# ------------------------------------------------------------------ hypergradient estimators
@pytest.mark.parametrize("solve", ["auto", "cg", "minres", "gmres", "dense"])
def test_implicit_hypergradient_equals_closed_form(q, solve):
    x = torch.randn(5, dtype=D, generator=torch.Generator().manual_seed(1))
    y = q.y_star(x)
    h = implicit_hypergradient(q.problem, x, y, solve=solve, tol=1e-12)
    assert h.status == "converged"
    assert _rel(h.grad, q.hypergradient(x)) < 1e-9
    torch.testing.assert_close(h.w, torch.linalg.solve(q.A, q.problem.grad_f_y(x, y)))  # the adjoint
    assert abs(float(h.value) - q.outer_value(x)) < 1e-10 * max(1.0, abs(q.outer_value(x)))


def test_neumann_converges_as_k_grows(q):
    """Lorraine et al.'s series converges to the exact hypergradient (alpha = 1/λmax)."""
    x = torch.randn(5, dtype=D)
    y = q.y_star(x)
    alpha = 1.0 / float(torch.linalg.eigvalsh(q.A).max())
    errs = [
        _rel(
            implicit_hypergradient(q.problem, x, y, solve="neumann", solve_options={"alpha": alpha, "K": K}).grad,
            q.hypergradient(x),
        )
        for K in (5, 50, 400)
    ]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-8


def test_corrected_value_is_second_order_in_the_inner_error(q):
    """F̃ = f − wᵀ∇_y g: error O(‖y − y*‖²) where f's is O(‖y − y*‖)."""
    x = torch.randn(5, dtype=D)
    ys = q.y_star(x)
    F = q.outer_value(x)
    d = torch.randn(10, dtype=D)
    errs_f, errs_c = [], []
    for eps in (1e-2, 1e-3):
        h = implicit_hypergradient(q.problem, x, ys + eps * d, solve="dense")
        errs_f.append(abs(float(h.value) - F))
        errs_c.append(abs(float(h.corrected) - F))
    assert errs_f[0] / errs_f[1] < 20  # first order: ~10x per decade
    assert errs_c[0] / errs_c[1] > 50  # second order: ~100x per decade
    assert errs_c[1] < errs_f[1]


def test_warm_started_adjoint_needs_fewer_iterations():
    q = quadratic(dx=5, dy=200, cond=100.0, seed=4)
    x = torch.randn(5, dtype=D)
    y = q.y_star(x)
    cold = implicit_hypergradient(q.problem, x, y, solve="cg", tol=1e-12)
    warm = implicit_hypergradient(q.problem, x, y, solve="cg", tol=1e-12, w0=cold.w + 1e-6 * torch.randn(200, dtype=D))
    assert _rel(warm.grad, q.hypergradient(x)) < 1e-9
    assert warm.n_iter < cold.n_iter


def test_unrolled_hypergradient_converges_and_measures_its_bias(q):
    x = torch.randn(5, dtype=D)
    lr = 1.0 / float(torch.linalg.eigvalsh(q.A).max())
    errs, biases = [], []
    for K in (5, 20, 80, 320):
        h = unrolled_hypergradient(q.problem, x, torch.zeros(10, dtype=D), K, lr)
        errs.append(_rel(h.grad, q.hypergradient(x)))
        biases.append(h.bias)
        assert h.grads == K + 1 and h.hvps == K
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert all(a > b for a, b in zip(biases, biases[1:])), biases
    assert errs[-1] < 1e-6 and biases[-1] < 1e-5
    # from the fixed point the bias is the factor ‖(I − βA)^K ∇_y f‖ / ‖∇_y f‖ exactly
    ys = q.y_star(x)
    K = 7
    h = unrolled_hypergradient(q.problem, x, ys, K, lr)
    v = q.problem.grad_f_y(x, ys)
    M = torch.linalg.matrix_power(torch.eye(10, dtype=D) - lr * q.A, K)
    assert abs(h.bias - float((M @ v).norm() / v.norm())) < 1e-8
    g, yk, val, _ = itd_hypergradient(q.problem, x, ys, K, lr, None, [None] * K)  # compatibility wrapper
    torch.testing.assert_close(g, h.grad)


def test_unrolled_hypergradient_equals_finite_differences(q):
    """The unrolled estimate is the exact gradient of x -> f(x, y_K(x)) (float64 central differences)."""
    x = torch.randn(5, dtype=D)
    y0 = torch.zeros(10, dtype=D)
    K, lr = 6, 0.05

    def f_k(xv):
        return float(unrolled_hypergradient(q.problem, xv, y0, K, lr).value)

    h = unrolled_hypergradient(q.problem, x, y0, K, lr)
    fd = torch.stack([torch.tensor((f_k(x + 1e-6 * e) - f_k(x - 1e-6 * e)) / 2e-6) for e in torch.eye(5, dtype=D)])
    torch.testing.assert_close(h.grad, fd.to(D), rtol=1e-6, atol=1e-7)


def test_hypergradient_of_a_nonquadratic_problem_equals_finite_differences():
    """Logistic inner problem: the implicit hypergradient at a tight inner solution vs float64 FD of F(x)."""
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(40, 4, dtype=D, generator=gen)
    b = (torch.rand(40, dtype=D, generator=gen) > 0.5).to(D)
    Av, bv = torch.randn(30, 4, dtype=D, generator=gen), (torch.rand(30, generator=gen) > 0.5).to(D)

    def inner(x, w, batch):
        return torch.nn.functional.binary_cross_entropy_with_logits(A @ w, b) + 0.5 * (torch.exp(x) * w**2).sum()

    def outer(x, w, batch):
        return torch.nn.functional.binary_cross_entropy_with_logits(Av @ w, bv)

    p = bl.BilevelProblem(outer, inner, torch.full((4,), -2.0, dtype=D), torch.zeros(4, dtype=D))

    def ystar(x):
        return bl.solve_inner(p, x, torch.zeros(4, dtype=D), tol=1e-14).y

    def big_f(x):
        return float(outer(x, ystar(x), None))

    x = torch.tensor([-2.0, -1.0, -3.0, 0.5], dtype=D)
    h = implicit_hypergradient(p, x, ystar(x))
    fd = torch.tensor([(big_f(x + 1e-5 * e) - big_f(x - 1e-5 * e)) / 2e-5 for e in torch.eye(4, dtype=D)], dtype=D)
    torch.testing.assert_close(h.grad, fd, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------ presets with defaults
@pytest.mark.parametrize("cond", [10.0, 100.0])
@pytest.mark.parametrize("name", ["AID", "IFT", "ITD"])
def test_defaults_converge_and_stop_on_the_closed_form(name, cond):
    q = quadratic(dx=5, dy=20, cond=cond, seed=int(cond))
    r = getattr(bl, name)().solve(q.problem, max_iter=20000)
    assert r.status == "converged", (r.status, r.message)
    assert r.n_iter < 200
    gap = _rel(r.x_flat, q.x_star)
    assert gap < (1e-8 if name == "AID" else 1e-3), gap
    F_gap = (r.outer_value - q.outer_star) / (q.outer_value(q.problem.x0) - q.outer_star)
    assert F_gap < (1e-10 if name == "AID" else 1e-5)
    # the honest y: the inner solution at the returned x
    assert _rel(r.y_flat, q.y_star(r.x_flat)) < (1e-8 if name == "AID" else 1e-4)


def test_aid_stops_at_a_stationary_point_at_once(q):
    """Started at x*, AID ends as converged within a few iterations (no line-search trials per extra iteration)."""
    p = bl.BilevelProblem(q.problem.outer, q.problem.inner, q.x_star.clone(), q.y_star(q.x_star).clone())
    r = bl.AID().solve(p, max_iter=5000)
    assert r.status == "converged" and r.n_iter <= 12, (r.n_iter, r.message)
    assert _rel(r.x_flat, q.x_star) < 1e-10


def test_old_style_options_still_run(q):
    """The documented options of the old presets keep their meaning (fixed steps, T inner steps, K unroll)."""
    r = bl.IFT(lr=1.0 / q.L_outer, inner_lr=1.0, T=10, K=200, linear_solve="neumann").solve(q.problem, max_iter=150)
    assert _rel(r.x_flat, q.x_star) < 1e-3
    r = bl.IFT(lr=0.05, inner_lr=1.0, T=10, linear_solve="cg", optimizer="adam").solve(q.problem, max_iter=300)
    assert _rel(r.x_flat, q.x_star) < 1e-2
    r = bl.ITD(lr=1.0 / q.L_outer, K=100, optimizer="sgd").solve(q.problem, max_iter=150)
    assert _rel(r.x_flat, q.x_star) < 1e-3
    r = bl.AID(lr=1.0 / q.L_outer, optimizer="sgd").solve(q.problem, max_iter=150)
    assert _rel(r.x_flat, q.x_star) < 1e-4


@pytest.mark.parametrize(
    "make",
    [
        lambda: bl.AID(linear_solve="dense"),
        lambda: bl.AID(inner="newton_cg", solve_tol=1e-12),
        lambda: bl.AID(inner=__import__("curvlab").solvers.NewtonCG(cg_tol=1e-12), inner_tol=1e-12),
    ],
    ids=["dense", "newton_cg", "curvlab-NewtonCG"],
)
def test_aid_variants_reach_1e8(q, make):
    r = make().solve(q.problem, max_iter=200)
    assert r.status == "converged"
    assert _rel(r.x_flat, q.x_star) < 1e-8, (r.status, r.message)


def test_composite_pieces(q):
    r = bl.Composite(linear_solve="minres").solve(q.problem, max_iter=200)
    assert r.status == "converged" and _rel(r.x_flat, q.x_star) < 1e-6
    r = bl.Composite(estimator="unroll").solve(q.problem, max_iter=200)
    assert r.status == "converged" and _rel(r.x_flat, q.x_star) < 1e-3
    assert r.history["K"][-1] >= 20  # adaptive unroll length


def test_minibatch_presets_run_fixed_steps():
    qs = quadratic(dx=3, dy=6, n_batches=4, seed=2)
    for make in (lambda: bl.AID(lr=0.05), lambda: bl.IFT(), lambda: bl.ITD(lr=0.05)):
        r = make().solve(qs.problem, max_iter=200)
        F0 = qs.outer_value(qs.problem.x0)
        assert qs.outer_value(r.x_flat) < F0  # lowers F from the start
        assert r.state["draws_outer"] > 0 and r.state["draws_inner"] > 0


def test_line_search_decreases_the_outer_value_monotonically(q):
    values = []
    r = bl.AID().solve(q.problem, max_iter=40, callback=lambda s: values.append(q.outer_value(s["x"])))
    F0 = q.outer_value(q.problem.x0)
    assert r.history["step_size"][0] > 0
    assert all(b <= a + 1e-12 for a, b in zip([F0, *values], values))


def test_per_example_weights_get_steps_that_do_not_vanish():
    """Hyper-cleaning-like: n per-example weights, hypergradient entries O(1/n); the first step moves x by O(1)."""
    gen = torch.Generator().manual_seed(0)
    n, d = 400, 5
    A = torch.randn(n, d, dtype=D, generator=gen)
    w_true = torch.randn(d, dtype=D, generator=gen)
    t = A @ w_true
    t[: n // 2] = torch.randn(n // 2, dtype=D, generator=gen) * 3  # corrupted half
    Av = torch.randn(100, d, dtype=D, generator=gen)
    tv = Av @ w_true

    def inner(x, w, batch):
        return (torch.sigmoid(x) * (A @ w - t) ** 2).mean() + 1e-3 * (w**2).sum()

    def outer(x, w, batch):
        return ((Av @ w - tv) ** 2).mean()

    p = bl.BilevelProblem(outer, inner, torch.zeros(n, dtype=D), torch.zeros(d, dtype=D))
    for name in ("AID", "IFT", "ITD"):
        r = getattr(bl, name)().solve(p, max_iter=30)
        assert float((r.x_flat - p.x0).norm()) > 1.0, name
        assert r.history["outer_value"][-1] < 0.2 * r.history["outer_value"][0], name
        wts = torch.sigmoid(r.x_flat)
        assert float(wts[n // 2 :].mean()) > float(wts[: n // 2].mean()), name  # clean examples up-weighted


def test_option_errors():
    qs = quadratic(dx=2, dy=3, n_batches=2)
    with pytest.raises(ValueError, match="deterministic"):
        bl.AID(optimizer="lbfgs").solve(qs.problem, max_iter=1)
    assert bl.AID().inner_method(qs.problem) == "gd" and bl.AID().outer_method(qs.problem) == ("sgd", False)
    p = bl.BilevelProblem(
        lambda x, y, b: (y**2).sum(),
        lambda x, y, b: ((y - x) ** 2).sum(),
        torch.zeros(2, dtype=D),
        torch.zeros(2, dtype=D),
        y_set=bl.Ball(1.0),
    )
    with pytest.raises(ValueError, match="y_set"):
        bl.AID(inner="newton").solve(p, max_iter=1)
    with pytest.raises(ValueError, match="inner"):
        bl.AID(inner="bfgs")
    with pytest.raises(ValueError, match="linear_solve"):
        bl.IFT(linear_solve="qr")
    with pytest.raises(ValueError, match="ITD.K"):
        bl.ITD(K=0)
    with pytest.raises(ValueError, match="estimator"):
        bl.Composite(estimator="penalty")
    with pytest.raises(ValueError, match="optimizer"):
        bl.IFT(optimizer="rmsprop")
    assert math.isclose(bl.AID().default_rtol(qs.problem), torch.finfo(D).eps ** (2 / 3))
