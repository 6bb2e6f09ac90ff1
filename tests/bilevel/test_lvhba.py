"""LV-HBA (Yao et al. 2024): toy problem with a coupled lower-level constraint, quadratic problem, options."""

from __future__ import annotations

import io

import pytest
import torch

from bilevel import BilevelProblem
from bilevel.lvhba import LVHBA, project_feasible
from bilevel.problems import quadratic

TOY_KW = dict(lr=0.1, lr_inner=0.1, lr_z=0.5, gamma1=1.0, gamma2=1.0, c_lower=1.0, p=0.5)


def toy(n: int = 10):
    r"""LV-HBA's toy problem with a coupled lower-level constraint (Yao et al. 2024, Section 5.1; authors' code).

    min_{x, y} ½‖x − y₂‖² + ½‖y₁ − 1‖²  s.t.  y ∈ argmin_{y'} {½‖y₁'‖² − xᵀy₁' + 1ᵀy₂' : 1ᵀx + 1ᵀy' ≥ 0},
    written with c(x, y) = −(1ᵀx + 1ᵀy) ≤ 0. The lower-level solution set is
    {y₁ = x + 1, 1ᵀy₂ = −1ᵀx − 1ᵀy₁} (not a singleton); the solution is x* = −0.3·1,
    y₁* = 0.7·1, y₂* = −0.4·1.
    """

    def outer(x, y, b):
        return 0.5 * ((x - y[n:]) ** 2).sum() + 0.5 * ((y[:n] - 1) ** 2).sum()

    def inner(x, y, b):
        return 0.5 * (y[:n] ** 2).sum() - x @ y[:n] + y[n:].sum()

    def cons(x, y):
        return -(x.sum() + y.sum()).reshape(1)

    d = torch.float64
    p = BilevelProblem(outer, inner, torch.zeros(n, dtype=d), torch.zeros(2 * n, dtype=d), constraints=cons)
    xs = torch.full((n,), -0.3, dtype=d)
    ys = torch.cat([torch.full((n,), 0.7, dtype=d), torch.full((n,), -0.4, dtype=d)])
    return p, xs, ys


def test_toy_reaches_known_solution_and_stays_feasible():
    p, xs, ys = toy()
    r = LVHBA(**TOY_KW).solve(p, max_iter=1500)
    assert float((r.x_flat - xs).norm() / xs.norm()) < 3e-2  # stated tolerance: 3 % relative error
    assert float((r.y_flat - ys).norm() / ys.norm()) < 3e-2
    viol = r.history["violation"]
    assert max(viol) <= 1e-8  # the lower-level constraint holds at every iterate
    assert float(r.state["lmbda"][0]) == pytest.approx(1.0, abs=2e-2)  # the multiplier of the active constraint
    assert r.state["hvps"] == 0


def test_toy_paper_defaults_reduce_distance():
    p, xs, ys = toy()
    r = LVHBA().solve(p, max_iter=300)
    assert float((r.x_flat - xs).norm()) < 0.7 * float((p.x0 - xs).norm())
    assert max(r.history["violation"]) <= 1e-8


def test_converges_on_unconstrained_quadratic():
    q = quadratic(dx=5, dy=8, cond=4.0, reg=1.0, coupling=1.0)
    r = LVHBA(lr=0.5, lr_inner=0.5, c_lower=1.0, p=0.5, schedule="paper").solve(q.problem, max_iter=1000, rtol=0.0)
    assert float((r.x_flat - q.x_star).norm() / q.x_star.norm()) < 3e-2  # stated tolerance: 3 %
    assert r.state["hvps"] == 0
    assert r.state["lmbda"].numel() == 0


def test_reduces_outer_objective_stochastic():
    q = quadratic(dx=5, dy=8, cond=4.0, reg=1.0, coupling=1.0, n_batches=8)
    r = LVHBA(lr=0.2, lr_inner=0.2, c_lower=1.0, p=0.5).solve(q.problem, max_iter=400)
    gap0 = q.outer_value(q.problem.x0) - q.outer_star
    assert q.outer_value(r.x_flat) - q.outer_star < 0.3 * gap0  # constant steps: down to a noise floor


def test_project_feasible_exact_for_one_affine_constraint():
    p, _, _ = toy(n=3)
    x, y = torch.ones(3, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    x2, y2, n = project_feasible(p, -x, -y)
    assert n == 1
    w = torch.cat([-x, -y])
    w_proj = w - (w.sum() / w.numel())  # projection onto {1ᵀw >= 0} from a point with 1ᵀw < 0
    assert torch.allclose(torch.cat([x2, y2]), w_proj, atol=1e-12)
    assert float(p.c(x2, y2).max()) <= 1e-12


def test_save_resume_identical():
    p, _, _ = toy(n=4)
    solver = LVHBA(**TOY_KW)
    full = solver.solve(p, max_iter=20)
    half = solver.solve(p, max_iter=10)
    buf = io.BytesIO()
    torch.save(half.state, buf)
    buf.seek(0)
    resumed = solver.solve(p, max_iter=20, state=torch.load(buf, weights_only=False))
    for key in ("x", "y", "theta", "lmbda", "z"):
        assert torch.equal(resumed.state[key], full.state[key]), key


@pytest.mark.parametrize(
    "kw",
    [
        {"lr": 0.0},
        {"gamma1": -1.0},
        {"c_lower": 0.0},
        {"p": -0.1},
        {"multiplier_radius": 0.0},
        {"lmbda0": -1.0},
        {"feasibility_steps": -1},
    ],
)
def test_bad_options_rejected(kw):
    with pytest.raises(ValueError, match="LVHBA"):
        LVHBA(**kw)


def test_unknown_option_rejected():
    with pytest.raises(TypeError, match="unknown option"):
        LVHBA(alpha=0.1)


def test_defaults_converge_on_the_closed_form_quadratic():
    """Defaults (deterministic unconstrained: "adaptive"): relative F gap < 1e-3, "converged", honest y = θ = y*(x)."""
    q = quadratic(dx=4, dy=12, cond=100.0, seed=3)
    r = LVHBA().solve(q.problem, max_iter=20000)
    gap = (q.outer_value(r.x_flat) - q.outer_star) / (q.outer_value(q.problem.x0) - q.outer_star)
    assert r.status == "converged" and r.n_iter < 2000, (r.status, r.n_iter)
    assert 0 <= gap < 1e-3
    ys = q.y_star(r.x_flat)
    assert float((r.y_flat - ys).norm()) <= 1e-6 * float(ys.norm())
    assert r.outer_value == pytest.approx(q.outer_value(r.x_flat), rel=1e-9)


def test_adaptive_refuses_constraints():
    p, _, _ = toy(n=3)
    with pytest.raises(ValueError, match="schedule='paper'"):
        LVHBA(schedule="adaptive").solve(p, max_iter=1)
    assert not LVHBA().adaptive(p)  # "auto" keeps Algorithm 1 on a constrained problem
