"""F2SA (Kwon et al. 2023): convergence on the quadratic problem, first-order only, options, resume."""

from __future__ import annotations

import io

import pytest
import torch

from bilevel import BilevelProblem
from bilevel.f2sa import F2SA
from bilevel.problems import quadratic


def _quad(**kw):
    return quadratic(dx=5, dy=8, cond=4.0, reg=1.0, coupling=1.0, **kw)


def _relerr(q, x):
    return float((x - q.x_star).norm() / q.x_star.norm())


def test_converges_to_closed_form_deterministic():
    q = _quad()
    r = F2SA(lr_y=0.1, lr_z=1.0, n_inner_steps=5, schedule="paper").solve(q.problem, max_iter=600, rtol=0.0)
    assert r.status == "max_iter"
    assert _relerr(q, r.x_flat) < 2e-2  # stated tolerance: 2 % relative error in x after 600 steps
    assert r.state["hvps"] == 0  # fully first order
    assert r.state["grads"] == 600 * (3 * 5 + 3)
    # λ_k = λ_0 (k + 1)^{1/3} in the deterministic regime, λ_0 = γ_0 / (2 α_0)
    assert r.state["lmbda"] == pytest.approx(5.0 * 601 ** (1 / 3), rel=1e-9)


def test_momentum_variant_converges():
    q = _quad()
    r = F2SA(lr_y=0.1, lr_z=1.0, n_inner_steps=5, momentum=True, schedule="paper").solve(
        q.problem, max_iter=600, rtol=0.0
    )
    assert _relerr(q, r.x_flat) < 2e-2
    assert r.state["hvps"] == 0


def test_reduces_outer_objective_stochastic():
    q = _quad(n_batches=8)
    solver = F2SA(lr_y=0.1, lr_z=1.0, n_inner_steps=5)
    assert solver.schedule_exponents(q.problem) == (5 / 7, 4 / 7)
    assert not solver.adaptive(q.problem)
    r = solver.solve(q.problem, max_iter=300)
    gap0 = q.outer_value(q.problem.x0) - q.outer_star
    gap = q.outer_value(r.x_flat) - q.outer_star
    assert gap < 0.1 * gap0
    assert r.state["hvps"] == 0 and r.state["draws_inner"] > 0 and r.state["draws_outer"] > 0


def test_projection_onto_x_set():
    from bilevel.sets import Box

    q = _quad()
    p = q.problem
    boxed = BilevelProblem(p.outer, p.inner, p.x0, p.y0, x_set=Box(-0.1, 0.1))
    r = F2SA(lr_y=0.1, lr_z=1.0, n_inner_steps=2, schedule="paper").solve(boxed, max_iter=20)
    assert float(r.x_flat.abs().max()) <= 0.1 + 1e-12


def test_refuses_constrained_problem():
    p = BilevelProblem(
        lambda x, y, b: (y**2).sum(),
        lambda x, y, b: ((y - x) ** 2).sum(),
        torch.zeros(2),
        torch.zeros(2),
        constraints=lambda x, y: y - 1,
    )
    with pytest.raises(ValueError, match="F2SA cannot handle lower-level constraints"):
        F2SA().solve(p, max_iter=2)
    with pytest.raises(ValueError, match="constraints"):
        F2SA().init(p)


@pytest.mark.parametrize("momentum", [False, True])
def test_save_resume_identical(momentum):
    q = _quad(n_batches=4)
    solver = F2SA(lr_y=0.1, lr_z=1.0, n_inner_steps=3, momentum=momentum, schedule="paper")
    full = solver.solve(q.problem, max_iter=12)
    half = solver.solve(q.problem, max_iter=6)
    buf = io.BytesIO()
    torch.save(half.state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=False)
    resumed = solver.solve(q.problem, max_iter=12, state=state)
    assert torch.equal(resumed.x_flat, full.x_flat)
    assert torch.equal(resumed.y_flat, full.y_flat)
    assert resumed.state["grads"] == full.state["grads"]
    assert resumed.n_iter == 12


@pytest.mark.parametrize(
    "kw",
    [
        {"lr_y": -1.0},
        {"lr_z": 0.0},
        {"lmbda0": -2.0},
        {"n_inner_steps": 0},
        {"regime": "noisy"},
        {"exponents": (0.2, 0.5)},
        {"k0": 0.5},
        {"momentum": "yes"},
        {"schedule": "fast"},
        {"lmbda_growth": 1.0},
        {"max_inner_steps": 0},
    ],
)
def test_bad_options_rejected(kw):
    with pytest.raises(ValueError, match="F2SA"):
        F2SA(**kw)


def test_unknown_option_rejected():
    with pytest.raises(TypeError, match="unknown option"):
        F2SA(lr=0.1)


def test_defaults_converge_on_the_closed_form_quadratic():
    """Defaults (deterministic "adaptive" schedule): relative F gap < 1e-3, "converged", honest y = y*(x)."""
    q = quadratic(dx=4, dy=12, cond=100.0, seed=3)
    r = F2SA().solve(q.problem, max_iter=20000)
    gap = (q.outer_value(r.x_flat) - q.outer_star) / (q.outer_value(q.problem.x0) - q.outer_star)
    assert r.status == "converged" and r.n_iter < 2000, (r.status, r.n_iter)
    assert 0 <= gap < 1e-3
    ys = q.y_star(r.x_flat)
    assert float((r.y_flat - ys).norm()) <= 1e-6 * float(ys.norm())  # y is the lower-level solution at x
    # outer_value is f at that lower-level iterate, i.e. F(x) here
    assert r.outer_value == pytest.approx(q.outer_value(r.x_flat), rel=1e-9)
    # hypergrad_norm is the norm of the estimate: close to the exact hypergradient at the returned x
    assert r.history[-1]["hypergrad_norm"] == pytest.approx(float(q.hypergradient(r.x_flat).norm()), rel=0.05, abs=1e-3)


def test_one_paper_step_matches_algorithm_1():
    """One step of schedule="paper" against a hand-written step of Kwon et al. 2023, Algorithm 1."""
    q = _quad()
    p = q.problem
    A, B, b, yt, rho = q.A, q.B, q.b, q.y_target, q.reg
    T, alpha, gamma = 3, 0.05, 0.5
    lam = gamma / (2 * alpha)
    r = F2SA(lr_y=alpha, lr_z=gamma, n_inner_steps=T, schedule="paper").solve(p, max_iter=1, rtol=0.0)
    x, y, z = p.x0.clone(), p.y0.clone(), p.y0.clone()
    for _ in range(T):  # ∇_y g = A y - (B x + b), ∇_y f = y - y_t
        z_new = z - gamma * (A @ z - (B @ x + b))
        y = y - alpha * ((y - yt) + lam * (A @ y - (B @ x + b)))
        z = z_new
    # ∇_x f = ρ x, ∇_x g(x, y) = -Bᵀ y
    x = x - alpha * (rho * x + lam * (-B.T @ y + B.T @ z))
    torch.testing.assert_close(r.x_flat, x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r.y_flat, z, rtol=1e-12, atol=1e-12)  # BilevelResult.y is z
    torch.testing.assert_close(r.state["y_lambda"], y, rtol=1e-12, atol=1e-12)
    assert r.state["hvps"] == 0  # explicit step sizes: fully first order
