"""BilevelProblem.value(x): F(x) with an exact inner solve that checks itself (dense references)."""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import pytest
import torch

from bilevel import BilevelProblem, InnerSolveWarning
from bilevel._inner import InnerSolveError
from bilevel.problems import hyper_cleaning, logreg, quadratic

D = torch.float64


def test_value_matches_the_closed_form_of_the_quadratic():
    q = quadratic(dx=4, dy=15, cond=100.0, seed=11)
    x = torch.randn(4, dtype=D, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", InnerSolveWarning)
        F = q.problem.value(x)
    assert F == pytest.approx(q.outer_value(x), rel=1e-9)  # rounding of f at cond 100, |F| ~ 4e3
    F2, y, res = q.problem.value(x, return_y=True)
    assert F2 == F and res.converged
    torch.testing.assert_close(y, q.y_star(x), atol=1e-9, rtol=0)
    assert q.problem.value() == pytest.approx(q.outer_value(q.problem.x0), rel=1e-9)  # default x = x0


def _dense_newton(fn, y, iters=30):
    """A reference inner solve: Newton with the dense Hessian (torch.autograd.functional), full steps + halving."""
    for _ in range(iters):
        g = torch.autograd.functional.jacobian(fn, y)
        if float(g.norm()) < 1e-13:
            break
        H = torch.autograd.functional.hessian(fn, y)
        d = -torch.linalg.solve(H, g)
        t = 1.0
        while float(fn(y + t * d)) > float(fn(y)) and t > 1e-10:
            t *= 0.5
        y = y + t * d
    return y


@pytest.mark.parametrize("per_feature", [False, True])
def test_value_matches_a_dense_inner_solve_on_logreg(per_feature):
    lr_ = logreg("breast_cancer", per_feature=per_feature)
    p = lr_.problem
    gen = torch.Generator().manual_seed(3)
    x = (torch.rand(p.dx, generator=gen, dtype=D) * 6 - 4).to(D)
    F, y, res = p.value(x, return_y=True)
    yref = _dense_newton(lambda w: p.g_diff(x, w), p.y0.clone())
    torch.testing.assert_close(y, yref, atol=1e-8, rtol=0)
    assert F == pytest.approx(float(p.f(x, yref)), rel=1e-10)
    assert res.converged and res.grad_norm <= res.tol


def test_huge_penalties_no_longer_give_w_zero():
    # the issue: the old L-BFGS reference returned W ≈ 0 with ‖∇_y g‖ = 1.47 once a penalty reached ~1e12
    lr_ = logreg("breast_cancer", per_feature=True)
    p = lr_.problem
    x = torch.zeros(p.dx, dtype=D)
    x[:5] = 27.6  # e^27.6 ≈ 1e12 on five features, the others unregularised-ish (e^0 = 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InnerSolveWarning)
        W = lr_.solve_inner(x)
    gy = p.grad_g_y(x, W.reshape(-1))
    assert float(gy.norm()) < 1e-8
    assert float(W[5:].norm()) > 0.1  # not the W ≈ 0 of the failure
    assert float(W[:5].abs().max()) < 1e-9  # the huge penalties do pin their rows at 0
    yref = _dense_newton(lambda w: p.g_diff(x, w), W.reshape(-1).clone())
    torch.testing.assert_close(W.reshape(-1), yref, atol=1e-9, rtol=0)


def test_failure_warns_raises_or_is_ignored():
    q = logreg("breast_cancer", per_feature=True)  # not a quadratic: one Newton step does not solve it
    x = torch.randn(q.problem.dx, dtype=D)
    with pytest.warns(InnerSolveWarning, match="did not converge"):
        F = q.problem.value(x, max_iter=1)
    assert math.isfinite(F)
    with pytest.raises(InnerSolveError, match="max_iter") as e:
        q.problem.value(x, max_iter=1, on_failure="raise")
    assert e.value.result is not None and not e.value.result.converged
    assert isinstance(e.value, RuntimeError)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q.problem.value(x, max_iter=1, on_failure="ignore")
    with pytest.warns(InnerSolveWarning, match="time_limit"):
        q.problem.value(x, deadline=time.perf_counter() - 1)
    with pytest.raises(ValueError, match="on_failure"):
        q.problem.value(x, on_failure="silent")


def test_value_takes_structured_x_and_y0():
    q = quadratic(dx=2, dy=4, seed=13)
    A, B, b, yt = q.A, q.B, q.b, q.y_target

    def inner(x, y, _):
        return 0.5 * y["w"] @ (A @ y["w"]) - y["w"] @ (B @ torch.stack([x["a"], x["b"]]) + b)

    def outer(x, y, _):
        return 0.5 * ((y["w"] - yt) ** 2).sum() + 0.5 * q.reg * (x["a"] ** 2 + x["b"] ** 2)

    p = BilevelProblem(
        outer, inner, {"a": torch.tensor(0.0, dtype=D), "b": torch.tensor(0.0, dtype=D)}, {"w": torch.zeros(4, dtype=D)}
    )
    xs = {"a": torch.tensor(0.3, dtype=D), "b": torch.tensor(-1.2, dtype=D)}
    F = p.value(xs, y0={"w": torch.ones(4, dtype=D)})
    assert F == pytest.approx(q.outer_value(torch.tensor([0.3, -1.2], dtype=D)), rel=1e-12)
    assert p.value(torch.tensor([0.3, -1.2], dtype=D)) == pytest.approx(F, rel=1e-12)
    with pytest.raises(ValueError, match="x must be a flat tensor of shape"):
        p.value(torch.zeros(3, dtype=D))


def test_logreg_accepts_ijcnn_like_and_user_arrays():
    ij = logreg("ijcnn_like")
    assert ij.n_features == 22 and ij.n_classes == 2
    frac = float(ij.splits["train"][1].double().mean())
    assert 0.05 < frac < 0.2  # ijcnn1-like class imbalance
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 5))
    yl = np.where(X[:, 0] + 0.3 * rng.normal(size=200) > 0, 1, -1)  # ±1 labels, mapped to 0/1
    u = logreg((X, yl), per_feature=True, x0=-4.0)
    assert u.dataset == "custom" and u.problem.dx == 5 and u.n_classes == 2
    W = u.solve_inner(u.problem.x0)
    assert u.accuracy(W, "test") > 0.8
    ut = logreg((torch.tensor(X), torch.tensor(yl)))
    torch.testing.assert_close(ut.splits["train"][0], u.splits["train"][0])
    with pytest.raises(ValueError, match="X of shape"):
        logreg((X[:, 0], yl))
    with pytest.raises(TypeError, match="pair"):
        logreg(3.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dataset must be"):
        logreg("ijcnn2")


def test_hyper_cleaning_unweighted_reference_has_unit_weights():
    h = hyper_cleaning("digits", corruption=0.5)
    W1 = h.solve_inner(None)
    A, b = h.splits["train"]
    # the unweighted objective: mean loss + reg ‖W‖² (weights exactly 1), written independently of the problem
    w = W1.reshape(-1).clone().requires_grad_(True)
    obj = (
        torch.nn.functional.cross_entropy(A @ w.reshape(65, 10)[:-1] + w.reshape(65, 10)[-1], b) + h.reg * (w**2).sum()
    )
    (g,) = torch.autograd.grad(obj, w)
    assert float(g.norm()) < 1e-8


EXTREME = {
    # x's that solvers reached on the ijcnn-like set: penalties from e^-72 to e^44.6 (1e19), and up to e^640
    "aid": [18.59, 18.43, 31.67, 2.62, 1.79, 11.09, -3.53, -29.13, 24.31, 21.06, -1.08, -2.94, -4.25, -71.95,
            44.63, -30.01, -50.01, -36.55, -44.70, -47.27, -47.12, -56.21],
    "ift": [265.0, 268.8, 443.8, 45.68, -4.96, 174.3, 21.54, -401.6, 335.3, 298.9, -1.149, -3.024, -3.854,
            -1092.3, 640.4, -322.8, -616.5, -528.9, -661.2, -775.0, -686.4, -769.1],
}  # fmt: skip


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("case", sorted(EXTREME))
def test_value_at_extreme_penalties_is_converged_and_matches_dense_newton(case, dense, monkeypatch):
    # the gradient norm cannot go below eps·‖∇²g‖·‖y‖ there and plain Newton-CG stalls (CG's rounding); the
    # solve must say converged only when y is right
    if not dense:  # the CG path (problems above Newton-CG's dense_max) needs the Jacobi-scaled retry here
        monkeypatch.setattr("bilevel._inner.NEWTON_DENSE_MAX", 0)
    x = torch.tensor(EXTREME[case], dtype=D)
    p = logreg("ijcnn_like", per_feature=True).problem
    with warnings.catch_warnings():
        warnings.simplefilter("error", InnerSolveWarning)
        F, y, res = p.value(x, return_y=True)
    assert res.converged
    if not dense:
        assert "Jacobi-scaled" in res.message  # plain Newton-CG stalls here: CG's rounding
    # the reference: dense Newton steps (least squares on the exact Hessian) refining our y
    w = _dense_newton(lambda v: p.g_diff(x, v), y.clone(), iters=3)
    assert float(p.f(x, w)) == pytest.approx(F, rel=1e-10)
    assert float((w - y).norm()) < 1e-8 * max(1.0, float(y.norm()))
