"""BO-REP (Hao, Gong, Liu 2024): convergence on the quadratic problem, refinement, periodic updates, options."""

from __future__ import annotations

import io

import pytest
import torch

from bilevel import BilevelProblem
from bilevel.borep import BOREP
from bilevel.problems import quadratic


def _quad(**kw):
    return quadratic(dx=5, dy=8, cond=4.0, reg=1.0, coupling=1.0, **kw)


def _relerr(q, x):
    return float((x - q.x_star).norm() / q.x_star.norm())


def test_converges_to_closed_form_deterministic():
    q = _quad()
    r = BOREP(lr=0.1, lr_decay=0.5, lr_z=0.5, lr_y=0.5, schedule="paper").solve(q.problem, max_iter=800, rtol=0.0)
    assert _relerr(q, r.x_flat) < 2e-2  # stated tolerance: 2 % relative error in x after 800 steps
    assert float((r.y_flat - q.y_star(r.x_flat)).norm()) < 5e-2
    assert r.state["hvps"] == 800  # one second-order product of g per iteration


def test_default_options_never_end_above_the_start():
    """Deterministic defaults: the step length shrinks on overshoot, so F never ends above F(x0)."""
    q = _quad()
    r = BOREP().solve(q.problem, max_iter=400)
    assert q.outer_value(r.x_flat) < q.outer_value(q.problem.x0)
    assert r.history[-1]["lr"] <= r.history[0]["lr"] * 1.2**400


def test_initialization_refinement_and_periodic_updates():
    q = _quad()
    solver = BOREP(lr_y=0.5, init_epochs=4, init_steps=10, interval=3, n_inner_steps=4, schedule="paper")
    state = solver.init(q.problem)
    # epoch-SGD at x0: 10 + 20 + 40 + 80 steps
    assert state["grads"] == 150
    dist0 = float((q.problem.y0 - q.y_star(q.problem.x0)).norm())
    assert float((state["y"] - q.y_star(q.problem.x0)).norm()) < 0.02 * dist0
    for _ in range(6):
        state = solver.step(q.problem, state)
    # y refreshed at t = 0 and t = 3 (N = 4 steps each); one ∇f per iteration
    assert state["grads"] == 150 + 2 * 4 + 6
    n_power = state["hvps"] - 6  # the power iteration of bilevel.inner_lipschitz (<= 20), then one per step
    assert 1 <= n_power <= 20


def test_z_projection_radius():
    q = _quad()
    r = BOREP(z_radius=0.1).solve(q.problem, max_iter=20)
    assert float(r.state["z"].norm()) <= 0.1 + 1e-12


def test_reduces_outer_objective_stochastic():
    q = _quad(n_batches=8)
    r = BOREP(lr=0.1, lr_decay=0.5, lr_z=0.5, lr_y=0.5).solve(q.problem, max_iter=300, rtol=0.0)
    gap0 = q.outer_value(q.problem.x0) - q.outer_star
    assert q.outer_value(r.x_flat) - q.outer_star < 0.1 * gap0


def test_refuses_constrained_problem():
    p = BilevelProblem(
        lambda x, y, b: (y**2).sum(),
        lambda x, y, b: ((y - x) ** 2).sum(),
        torch.zeros(2),
        torch.zeros(2),
        constraints=lambda x, y: y - 1,
    )
    with pytest.raises(ValueError, match="BOREP cannot handle lower-level constraints"):
        BOREP().solve(p, max_iter=2)


def test_save_resume_identical():
    q = _quad(n_batches=4)
    solver = BOREP(lr=0.1, lr_z=0.5, lr_y=0.5, interval=3, schedule="paper")
    full = solver.solve(q.problem, max_iter=14)
    half = solver.solve(q.problem, max_iter=7)
    buf = io.BytesIO()
    torch.save(half.state, buf)
    buf.seek(0)
    resumed = solver.solve(q.problem, max_iter=14, state=torch.load(buf, weights_only=False))
    assert torch.equal(resumed.x_flat, full.x_flat)
    assert torch.equal(resumed.y_flat, full.y_flat)
    assert resumed.state["grads"] == full.state["grads"] and resumed.state["hvps"] == full.state["hvps"]


@pytest.mark.parametrize(
    "kw",
    [
        {"lr": 0.0},
        {"momentum": 1.0},
        {"momentum": -0.1},
        {"lr_z": -1.0},
        {"interval": 0},
        {"n_inner_steps": 1.5},
        {"init_epochs": -1},
        {"z_radius": 0.0},
        {"lr_decay": -0.5},
        {"schedule": "fast"},
    ],
)
def test_bad_options_rejected(kw):
    with pytest.raises(ValueError, match="BOREP"):
        BOREP(**kw)


def test_unknown_option_rejected():
    with pytest.raises(TypeError, match="unknown option"):
        BOREP(beta=0.9)
