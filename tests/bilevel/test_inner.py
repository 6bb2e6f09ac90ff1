"""The one lower-level solve (bilevel._inner): against closed forms and dense solves."""

from __future__ import annotations

import math
import time
import warnings

import pytest
import torch
from torch import nn

import bilevel as bl
import curvlab as cl
from bilevel import BilevelProblem, InnerSolveWarning, inner_lipschitz, inner_step_size, solve_inner
from bilevel._inner import default_inner_rtol
from bilevel.problems import quadratic

D = torch.float64


def test_newton_default_matches_the_closed_form_and_counts_oracles():
    q = quadratic(dx=5, dy=20, cond=100.0, seed=1)
    x = torch.randn(5, dtype=D, generator=torch.Generator().manual_seed(0))
    r = solve_inner(q.problem, x)
    assert r.status == "converged" and r.converged
    assert r.grad_norm <= r.tol
    assert r.tol == pytest.approx(default_inner_rtol(D) * r.scale)
    ys = q.y_star(x)
    # ‖y - y*‖ <= ‖A⁻¹‖ ‖∇g‖ = cond · ‖∇g‖ (eigenvalues in [1/cond, 1])
    assert float((r.y - ys).norm()) <= 100.0 * r.grad_norm * (1 + 1e-6) + 1e-14
    assert float((r.y - ys).norm()) < 1e-8 * float(ys.norm())
    assert r.grads >= r.n_iter + 1 and r.hvps > 0 and r.n_iter >= 1
    assert r.value == pytest.approx(float(q.problem.g(x, ys)), rel=1e-12)


def test_warm_start_keeps_the_scale_and_does_not_touch_inputs():
    q = quadratic(dx=4, dy=12, cond=50.0, seed=2)
    x = torch.randn(4, dtype=D)
    r1 = solve_inner(q.problem, x)
    x2 = x + 1e-3
    y0 = r1.y.clone()
    x2c, y0c = x2.clone(), y0.clone()
    r2 = solve_inner(q.problem, x2, y0, scale=r1.scale)
    assert torch.equal(x2, x2c) and torch.equal(y0, y0c)  # inputs untouched
    assert r2.y is not y0 and r2.scale == r1.scale and r2.tol == r1.tol
    assert r2.converged and float((r2.y - q.y_star(x2)).norm()) < 1e-8
    # without a scale: the larger gradient norm of (y0, problem.y0), not the tiny one at the warm start
    r3 = solve_inner(q.problem, x2, y0)
    g_cold = float(q.problem.grad_g_y(x2, q.problem.y0).norm())
    assert r3.scale == pytest.approx(g_cold)


def test_float32_tolerance_is_reachable():
    q = quadratic(dx=4, dy=30, cond=100.0, seed=3, dtype=torch.float32)
    x = torch.randn(4)
    r = solve_inner(q.problem, x)
    assert r.y.dtype == torch.float32
    assert r.status == "converged", r.message
    assert r.tol == pytest.approx(math.sqrt(torch.finfo(torch.float32).eps) * r.scale, rel=1e-6)
    ys = q.y_star(x).double()
    assert float((r.y.double() - ys).norm()) < 100 * 2 * r.tol


def test_projected_gradient_on_a_box_matches_the_clipped_closed_form():
    # separable inner g = ½ Σ a_i y_i² - yᵀ(x ⊙ c): y* = clip(x ⊙ c / a, -1, 1)
    a = torch.linspace(0.1, 3.0, 8, dtype=D)
    c = torch.linspace(-2.0, 2.0, 8, dtype=D)
    p = BilevelProblem(
        lambda x, y, b: (y**2).sum(),
        lambda x, y, b: 0.5 * (a * y * y).sum() - (y * x * c).sum(),
        torch.ones(8, dtype=D),
        torch.zeros(8, dtype=D),
        y_set=bl.Box(-1.0, 1.0),
    )
    x = torch.full((8,), 1.5, dtype=D)
    r = solve_inner(p, x)
    ref = torch.clamp(x * c / a, -1.0, 1.0)
    assert r.status == "converged", r.message
    torch.testing.assert_close(r.y, ref, atol=1e-8, rtol=0)
    assert bool((r.y.abs() <= 1.0).all())
    with pytest.raises(ValueError, match="y_set"):
        solve_inner(p, x, solver=cl.solvers.GradientDescent())


def test_gd_and_a_curvlab_solver_reach_the_dense_solution():
    q = quadratic(dx=3, dy=10, cond=10.0, seed=4)
    x = torch.randn(3, dtype=D)
    ys = q.y_star(x)
    r = solve_inner(q.problem, x, solver="gd", rtol=1e-8)
    assert r.converged and float((r.y - ys).norm()) < 1e-6
    assert r.hvps > 0  # the power iteration for 1/L
    r = solve_inner(q.problem, x, solver=cl.solvers.GradientDescent(lr=1.0), tol=1e-9)
    assert r.converged and float((r.y - ys).norm()) < 1e-7


def test_power_iteration_against_the_dense_spectrum():
    q = quadratic(dx=3, dy=15, cond=30.0, seed=5)
    x = torch.zeros(3, dtype=D)
    L, n = inner_lipschitz(q.problem, x, q.problem.y0)
    lmax = float(torch.linalg.eigvalsh(q.A).max())
    assert 0.9 * lmax <= L <= lmax * (1 + 1e-10)  # a Rayleigh quotient: a lower bound
    assert 1 <= n <= 20
    assert inner_step_size(q.problem, x, q.problem.y0) == pytest.approx(1.0 / L)
    with pytest.raises(ValueError, match="iters"):
        inner_lipschitz(q.problem, x, q.problem.y0, iters=0)


def test_deadline_cap_and_callback_stop_the_solve():
    q = quadratic(dx=3, dy=40, cond=100.0, seed=6)
    x = torch.randn(3, dtype=D)
    r = solve_inner(q.problem, x, deadline=time.perf_counter() - 1.0)
    assert r.status == "time_limit" and not r.converged and r.n_iter == 0
    torch.testing.assert_close(r.y, q.problem.y0)
    r = solve_inner(q.problem, x, max_iter=1, solver=cl.solvers.NewtonCG(dense_max=0, cg_maxiter=5))  # dense: 1 step
    assert r.status == "max_iter" and not r.converged and r.n_iter == 1
    r = solve_inner(q.problem, x, solver="gd", max_iter=5)
    assert r.status == "max_iter" and r.n_iter == 5
    r = solve_inner(q.problem, x, solver="gd", callback=lambda st: st["iter"] >= 3)
    assert r.status == "callback" and r.n_iter == 3
    r = solve_inner(q.problem, x, solver=cl.solvers.NewtonCG(dense_max=0, cg_maxiter=5), callback=lambda st: True)
    assert r.status == "callback" and r.n_iter == 1


def test_non_finite_inner_stops_with_nan_and_keeps_a_finite_y():
    # g = ½‖y‖² - 5 Σ y outside a region where it turns NaN: Newton's full step lands there
    def inner(x, y, b):
        v = 0.5 * (y * y).sum() - 5.0 * y.sum()
        return torch.where(y.abs().max() > 2.0, torch.full_like(v, float("nan")), v)

    p = BilevelProblem(lambda x, y, b: y.sum(), inner, torch.zeros(1, dtype=D), torch.zeros(3, dtype=D))
    r = solve_inner(p, torch.zeros(1, dtype=D), solver="gd")
    assert not r.converged and r.status in ("nan", "stalled"), r.status
    assert bool(torch.isfinite(r.y).all())
    r = solve_inner(p, torch.zeros(1, dtype=D))
    assert not r.converged and bool(torch.isfinite(r.y).all())


def _mlp_problem(module: nn.Module) -> tuple[BilevelProblem, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    A = torch.randn(40, 3, generator=g, dtype=D)
    t = (A[:, 0] > 0).to(D)

    def inner(x, w, batch):
        out = torch.func.functional_call(module, w, (A,)).squeeze(-1)
        return nn.functional.binary_cross_entropy_with_logits(out, t) + 0.5 * torch.exp(x[0]) * sum(
            (v**2).sum() for v in w.values()
        )

    return BilevelProblem(lambda x, w, b: inner(x, w, b), inner, torch.zeros(1, dtype=D), module), (A, t)


def test_module_y_matches_a_dense_newton_and_the_module_is_untouched():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).to(D)
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    p, _ = _mlp_problem(m)
    x = torch.tensor([0.0], dtype=D)  # ridge e^0 = 1: strongly convex enough
    r = solve_inner(p, x)
    assert r.converged, r.message
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # parameters and buffers bit-identical
    # the reference: dense Newton on the flat objective from the result, with exact Hessians
    f = lambda y: p.g_diff(x, y)  # noqa: E731
    y = r.y.clone()
    for _ in range(3):
        gr = torch.autograd.functional.jacobian(f, y)
        H = torch.autograd.functional.hessian(f, y)
        y = y - torch.linalg.solve(H, gr)
    assert float(torch.autograd.functional.jacobian(f, y).norm()) < 1e-12
    torch.testing.assert_close(r.y, y, atol=1e-8, rtol=0)
    assert isinstance(p.to_user_y(r.y), nn.Module)


def test_dict_y_matches_the_flat_solution():
    q = quadratic(dx=2, dy=6, cond=5.0, seed=7)
    A, B, b = q.A, q.B, q.b

    def inner(x, y, _):
        v = torch.cat([y["u"], y["v"].reshape(-1)])
        return 0.5 * v @ (A @ v) - v @ (B @ x + b)

    p = BilevelProblem(
        lambda x, y, _: y["u"].sum(),
        inner,
        torch.zeros(2, dtype=D),
        {"u": torch.zeros(2, dtype=D), "v": torch.zeros(2, 2, dtype=D)},
    )
    x = torch.randn(2, dtype=D)
    r = solve_inner(p, x)
    torch.testing.assert_close(r.y, q.y_star(x), atol=1e-9, rtol=0)


def test_bad_arguments_are_named():
    q = quadratic(dx=2, dy=3)
    x = torch.zeros(2, dtype=D)
    with pytest.raises(TypeError, match="BilevelProblem"):
        solve_inner(object(), x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="x must be a flat tensor"):
        solve_inner(q.problem, torch.zeros(3, dtype=D))
    with pytest.raises(ValueError, match="y0 must be a flat tensor"):
        solve_inner(q.problem, x, torch.zeros(2, dtype=D))
    with pytest.raises(ValueError, match="tol"):
        solve_inner(q.problem, x, tol=-1.0)
    with pytest.raises(ValueError, match="max_iter"):
        solve_inner(q.problem, x, max_iter=0)
    with pytest.raises(ValueError, match="solver"):
        solve_inner(q.problem, x, solver="lbfgs")
    with pytest.raises(TypeError, match="solver"):
        solve_inner(q.problem, x, solver=3)  # type: ignore[arg-type]
    assert issubclass(InnerSolveWarning, UserWarning)


@pytest.mark.parametrize("dense", [True, False])
def test_a_tolerance_under_the_rounding_noise_ends_early_and_honestly(dense, monkeypatch):
    # x = 1e5: ‖y*‖ ~ 1e6, so ‖∇_y g‖ cannot go below ~1e-5 in float64 (rounding of A y - B x - b)
    if not dense:  # the CG path of Newton-CG (problems above its dense_max)
        monkeypatch.setattr("bilevel._inner.NEWTON_DENSE_MAX", 0)
    q = quadratic(dx=4, dy=30, cond=100.0, seed=8)
    x = torch.full((4,), 1e5, dtype=D)
    ys = q.y_star(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loose = solve_inner(q.problem, x, scale=1e4)  # reachable level sqrt(eps)·1e4 = 1.5e-4: above the noise
        tight = solve_inner(q.problem, x, scale=1.0)  # reachable level 1.5e-8: under the noise
    assert loose.converged and loose.status == "converged"
    # honest: "converged" only below the reachable sqrt(eps)·scale, else "stalled" (not the cap)
    reach = math.sqrt(torch.finfo(D).eps) * tight.scale
    assert tight.status == ("converged" if tight.grad_norm <= reach else "stalled")
    assert tight.converged == (tight.status == "converged")
    for r in (loose, tight):
        assert r.n_iter < 30  # not the 100-iteration cap of noisy Newton steps
        assert float((r.y - ys).norm() / ys.norm()) < 1e-9  # and the solution is as good as float64 gets
