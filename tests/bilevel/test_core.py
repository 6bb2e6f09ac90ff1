"""BilevelProblem validation and oracles, sets, the shared solve loop (counting, save/resume, non-finite)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import bilevel as bl
from bilevel import ALL, BilevelProblem
from bilevel.problems import quadratic

D = torch.float64


def _fns():
    def outer(x, y, b):
        return ((y - 1) ** 2).sum() + (x**2).sum()

    def inner(x, y, b):
        return ((y - x) ** 2).sum()

    return outer, inner


# ----------------------------------------------------------------- validation
def test_validation_errors_name_the_argument():
    outer, inner = _fns()
    z = torch.zeros(2, dtype=D)
    with pytest.raises(TypeError, match="outer must be a function"):
        BilevelProblem(3, inner, z, z)
    with pytest.raises(TypeError, match="inner must be a function"):
        BilevelProblem(outer, None, z, z)
    with pytest.raises(ValueError, match=r"outer\(x, y, batch\) must return a scalar"):
        BilevelProblem(lambda x, y, b: y, inner, z, z)
    with pytest.raises(ValueError, match=r"inner\(x, y, batch\) must return a scalar"):
        BilevelProblem(outer, lambda x, y, b: x * y, z, z)
    with pytest.raises(TypeError, match="constraints must be a function"):
        BilevelProblem(outer, inner, z, z, constraints=torch.zeros(1))
    with pytest.raises(ValueError, match="constraints.*must return a tensor"):
        BilevelProblem(outer, inner, z, z, constraints=lambda x, y: 1.0)
    with pytest.raises(TypeError, match="x_set must be a bilevel.sets.Set"):
        BilevelProblem(outer, inner, z, z, x_set=(0, 1))
    with pytest.raises(TypeError, match="x0"):
        BilevelProblem(outer, inner, [1.0, 2.0], z)
    with pytest.raises(TypeError, match="y0"):
        BilevelProblem(outer, inner, z, "y")
    with pytest.raises(ValueError, match="share one dtype"):
        BilevelProblem(outer, inner, z, z.float())
    with pytest.raises(ValueError, match=r"outer must accept \(x, y, batch\)"):
        BilevelProblem(lambda x, y: (x**2).sum(), inner, z, z)


def test_solver_refuses_constrained_and_non_problems():
    outer, inner = _fns()
    z = torch.zeros(2, dtype=D)
    p = BilevelProblem(outer, inner, z, z, constraints=lambda x, y: y.sum() - 1)
    assert p.constrained and p.n_constraints == 1
    for solver in (bl.IFT(), bl.AID(), bl.ITD()):
        with pytest.raises(ValueError, match=f"{type(solver).__name__} cannot handle lower-level constraints.*LVHBA"):
            solver.solve(p)
    with pytest.raises(TypeError, match="BilevelProblem"):
        bl.AID().solve(quadratic(dx=2, dy=2).problem.xspec)
    with pytest.raises(TypeError, match="unknown option"):
        bl.IFT(lrr=0.1)
    with pytest.raises(ValueError, match="lr"):
        bl.AID(lr=-1.0)
    with pytest.raises(ValueError, match="linear_solve"):
        bl.IFT(linear_solve="nope")
    with pytest.raises(ValueError, match="max_iter"):
        bl.AID().solve(quadratic(dx=2, dy=2).problem, max_iter=0)


# ------------------------------------------------------------------- oracles
def test_oracles_match_dense_references():
    q = quadratic(dx=3, dy=4, seed=1)
    p = q.problem
    x = torch.randn(3, dtype=D)
    y = torch.randn(4, dtype=D)
    v = torch.randn(4, dtype=D)
    gx, gy = p.grad_g(x, y)
    torch.testing.assert_close(gy, q.A @ y - q.B @ x - q.b)
    torch.testing.assert_close(gx, -q.B.T @ y)
    torch.testing.assert_close(p.grad_g_y(x, y), gy)
    torch.testing.assert_close(p.hvp_yy_g(x, y, v), q.A @ v)
    torch.testing.assert_close(p.jvp_xy_g(x, y, v), -q.B.T @ v)
    torch.testing.assert_close(p.hvp_yy_operator(x, y)(v), q.A @ v)
    fx, fy = p.grad_f(x, y)
    torch.testing.assert_close(fy, y - q.y_target)
    torch.testing.assert_close(fx, q.reg * x)
    assert p.f(x, y).ndim == 0 and not p.f(x, y).requires_grad


def test_all_is_the_weighted_mean_over_batches():
    qs = quadratic(dx=3, dy=4, n_batches=4, seed=2)
    q = quadratic(dx=3, dy=4, seed=2)
    p = qs.problem
    assert p.stochastic and p.draw_inner(5) is p.draw_inner(1)
    x, y, v = torch.randn(3, dtype=D), torch.randn(4, dtype=D), torch.randn(4, dtype=D)
    torch.testing.assert_close(p.grad_g(x, y, ALL)[1], q.problem.grad_g(x, y)[1])
    torch.testing.assert_close(p.hvp_yy_g(x, y, v, ALL), q.A @ v)
    mean_hvp = sum(p.hvp_yy_g(x, y, v, p.draw_inner(k)) for k in range(4)) / 4
    torch.testing.assert_close(mean_hvp, q.A @ v)


def test_structured_variables_and_modules():
    net = nn.Linear(3, 1).double()
    X = torch.randn(20, 3, dtype=D)
    t = torch.randn(20, 1, dtype=D)

    def inner(x, params, batch):
        out = torch.func.functional_call(net, params, (batch[0],))
        return ((out - batch[1]) ** 2).mean() + torch.exp(x["log_lam"]) * (params["weight"] ** 2).sum()

    def outer(x, params, batch):
        out = torch.func.functional_call(net, params, (batch[0],))
        return ((out - batch[1]) ** 2).mean()

    x0 = {"log_lam": torch.zeros((), dtype=D)}
    p = BilevelProblem(outer, inner, x0, net, outer_data=(X, t), inner_data=(X, t))
    assert (p.dx, p.dy) == (1, 4)
    gx, gy = p.grad_g(p.x0, p.y0)
    assert gx.shape == (1,) and gy.shape == (4,)
    r = bl.AID(lr=0.5, inner_steps=50).solve(p, max_iter=3)
    assert isinstance(r.y, nn.Linear) and isinstance(r.x, dict)
    assert r.y is not net


# ---------------------------------------------------------------------- sets
def test_sets_project_and_contain():
    v = torch.tensor([-2.0, 0.5, 3.0], dtype=D)
    torch.testing.assert_close(bl.Box(-1.0, 1.0).project(v), torch.tensor([-1.0, 0.5, 1.0], dtype=D))
    torch.testing.assert_close(
        bl.Box(torch.tensor([0.0, 0.0, 0.0]), torch.tensor([1.0, 0.2, 5.0])).project(v),
        torch.tensor([0.0, 0.2, 3.0], dtype=D),
    )
    torch.testing.assert_close(bl.NonNegative().project(v), torch.tensor([0.0, 0.5, 3.0], dtype=D))
    b = bl.Ball(1.0, center=1.0)
    pv = b.project(v)
    assert math.isclose(float(torch.linalg.vector_norm(pv - 1.0)), 1.0, rel_tol=1e-12)
    assert b.contains(pv) and not b.contains(v)
    inside = torch.tensor([1.1, 0.9, 1.0], dtype=D)
    torch.testing.assert_close(b.project(inside), inside)
    s = bl.Simplex().project(v)
    assert math.isclose(float(s.sum()), 1.0) and bool((s >= 0).all())
    # brute-force check of the simplex projection: no feasible point on a grid is closer
    grid = torch.stack(torch.meshgrid(*(torch.linspace(0, 1, 41, dtype=D),) * 2, indexing="ij"), -1).reshape(-1, 2)
    grid = grid[grid.sum(1) <= 1]
    pts = torch.cat([grid, 1 - grid.sum(1, keepdim=True)], 1)
    assert float(torch.linalg.vector_norm(s - v)) <= float(torch.linalg.vector_norm(pts - v, dim=1).min()) + 1e-12
    with pytest.raises(ValueError, match="lower must be <= upper"):
        bl.Box(1.0, 0.0)
    with pytest.raises(ValueError, match="radius"):
        bl.Ball(-1.0)


def test_sets_bind_structured_bounds_and_solvers_project():
    outer, inner = _fns()
    x0 = {"a": torch.zeros(2, dtype=D)}
    box = bl.Box({"a": torch.tensor([0.0, 0.0], dtype=D)}, {"a": torch.tensor([0.1, 0.2], dtype=D)})

    def outer_d(x, y, b):
        return outer(x["a"], y, b) - 10 * x["a"].sum()

    def inner_d(x, y, b):
        return inner(x["a"], y, b)

    p = BilevelProblem(outer_d, inner_d, x0, torch.zeros(2, dtype=D), x_set=box, y_set=bl.Ball(5.0))
    r = bl.AID(lr=0.5).solve(p, max_iter=20)
    torch.testing.assert_close(r.x["a"], torch.tensor([0.1, 0.2], dtype=D))


# -------------------------------------------------------------- solve loop
def test_oracle_counts():
    q = quadratic(dx=3, dy=5)
    r = bl.IFT(lr=0.1, inner_lr=0.5, T=3, K=6).solve(q.problem, max_iter=4)
    h = r.history
    # T inner gradients + ∇f + the recorded ∇_y g of the hypergradient per step
    assert h["grads"] == [5 * k for k in range(1, 5)]
    assert h["hvps"] == [6 * k for k in range(1, 5)]  # K - 1 Neumann products + 1 mixed product
    r = bl.ITD(lr=0.1, inner_lr=0.5, K=7, optimizer="sgd").solve(q.problem, max_iter=2)
    assert (r.state["grads"], r.state["hvps"]) == (16, 14)
    assert set(h.keys()) >= {"iter", "outer_value", "hypergrad_norm", "inner_residual", "time", "grads", "hvps"}


@pytest.mark.parametrize("make", [lambda: bl.AID(lr=0.3), lambda: bl.IFT(lr=0.1, optimizer="adam"), lambda: bl.ITD()])
def test_save_and_resume_equals_uninterrupted(make, tmp_path):
    q = quadratic(dx=4, dy=6, n_batches=3)
    full = make().solve(q.problem, max_iter=10)
    half = make().solve(q.problem, max_iter=5)
    torch.save(half.state, tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=False)
    resumed = make().solve(q.problem, max_iter=10, state=state)
    assert resumed.n_iter == 10
    torch.testing.assert_close(resumed.x_flat, full.x_flat)
    torch.testing.assert_close(resumed.y_flat, full.y_flat)
    assert resumed.state["grads"] == full.state["grads"]


def test_tol_callback_and_nan():
    q = quadratic(dx=3, dy=4, reg=1.0)
    r = bl.AID(lr=1.0 / q.L_outer).solve(q.problem, max_iter=500, tol=1e-6)
    assert r.converged and r.status == "converged" and r.n_iter < 500
    r = bl.AID().solve(q.problem, max_iter=50, callback=lambda s: s["iter"] >= 3)
    assert r.status == "callback" and r.n_iter == 3

    def outer(x, y, b):
        return torch.where(x.sum() > 1, torch.tensor(float("nan"), dtype=D), ((y - 1) ** 2).sum() - 5 * x.sum())

    p = BilevelProblem(outer, lambda x, y, b: ((y - x) ** 2).sum(), torch.zeros(1, dtype=D), torch.zeros(1, dtype=D))
    fixed = dict(lr=0.2, optimizer="sgd", line_search=False)
    r = bl.AID(**fixed).solve(p, max_iter=100)
    assert r.status == "nan" and bool(torch.isfinite(r.x_flat).all()) and math.isfinite(r.outer_value)
    with pytest.raises(FloatingPointError):
        bl.AID(**fixed).solve(p, max_iter=100, raise_on_nan=True)
    # the line search treats a non-finite F as "too long a step": it never accepts NaN; when every trial
    # (down to the shortest) is non-finite the run stops with status "nan" at the last finite iterate
    r = bl.AID(lr=0.2).solve(p, max_iter=100)
    assert r.status == "nan" and float(r.x_flat.sum()) <= 1.0 and math.isfinite(r.outer_value)
    with pytest.raises(FloatingPointError):
        bl.AID(lr=0.2).solve(p, max_iter=100, raise_on_nan=True)


def test_progress_bar_runs():
    q = quadratic(dx=2, dy=3)
    r = bl.ITD().solve(q.problem, max_iter=3, progress=True)
    assert r.n_iter == 3 and len(r.history) == 3


# -------------------------------------------------------------- the stop rule of BilevelSolver.solve
@pytest.mark.parametrize("name", ["AID", "IFT", "ITD", "F2SA", "BOREP", "LVHBA"])
def test_deterministic_save_and_resume_with_defaults_is_bit_identical(name, tmp_path):
    q = quadratic(dx=4, dy=6, cond=20.0, seed=5)
    full = getattr(bl, name)().solve(q.problem, max_iter=8, window=0, tol=0.0)
    half = getattr(bl, name)().solve(q.problem, max_iter=4, window=0, tol=0.0)
    torch.save(half.state, tmp_path / "s.pt")
    resumed = getattr(bl, name)().solve(
        q.problem, max_iter=8, window=0, tol=0.0, state=torch.load(tmp_path / "s.pt", weights_only=False)
    )
    assert resumed.n_iter == full.n_iter
    assert torch.equal(resumed.x_flat, full.x_flat) and torch.equal(resumed.y_flat, full.y_flat)
    assert resumed.state["grads"] == full.state["grads"] and resumed.state["hvps"] == full.state["hvps"]


def test_relative_tolerance_and_old_absolute_calls():
    q = quadratic(dx=3, dy=5, cond=10.0, seed=2)
    r = bl.AID().solve(q.problem, max_iter=500, rtol=1e-4)
    h0 = r.state["hg_scale"]
    assert r.status == "converged" and "rtol" in r.message
    assert r.history["hypergrad_norm"][-1] <= 1e-4 * h0
    assert all(v > 1e-4 * h0 for v in r.history["hypergrad_norm"][:-1])  # stopped at the first that met it
    # tol alone is the old absolute test; tol=0 switches it off (runs until another test or max_iter)
    r = bl.AID(lr=0.05, optimizer="sgd").solve(q.problem, max_iter=15, tol=0.0, window=0)
    assert r.status == "max_iter" and r.n_iter == 15
    with pytest.raises(ValueError, match="rtol"):
        bl.AID().solve(q.problem, rtol=-1.0)
    with pytest.raises(ValueError, match="window"):
        bl.AID().solve(q.problem, window=-1)
    with pytest.raises(ValueError, match="time_limit"):
        bl.AID().solve(q.problem, time_limit=0.0)


def test_no_progress_window_stops_as_converged():
    q = quadratic(dx=3, dy=5, cond=10.0, seed=2)
    # fixed tiny steps: F changes below its rounding noise, the hypergradient stays large
    r = bl.AID(lr=1e-30, optimizer="sgd").solve(q.problem, max_iter=500, tol=0.0)
    assert r.status == "converged" and "no progress" in r.message and r.n_iter <= 12  # 10 flat after the 1st
    r = bl.AID(lr=1e-30, optimizer="sgd").solve(q.problem, max_iter=30, tol=0.0, window=0)
    assert r.status == "max_iter"


def test_a_step_at_a_stationary_point_reports_convergence():
    q = quadratic(dx=3, dy=5, cond=10.0, seed=2)
    p = BilevelProblem(q.problem.outer, q.problem.inner, q.x_star.clone(), q.y_star(q.x_star).clone())
    r = bl.AID().solve(p, max_iter=1000, rtol=0.0, window=0)  # only the step's own test can stop it
    assert r.status == "converged" and r.n_iter <= 5
    assert "line search" in r.message or "predicted decrease" in r.message


def _slow_problem(delay):
    import time

    q = quadratic(dx=3, dy=5, cond=10.0, seed=2)

    def inner(x, y, b):
        time.sleep(delay)
        return q.problem.inner(x, y, b)

    return q, BilevelProblem(q.problem.outer, inner, q.problem.x0.clone(), q.problem.y0.clone())


def test_time_limit_stops_inside_an_outer_iteration():
    import time

    q, p = _slow_problem(0.01)  # every inner evaluation costs 10 ms: one outer iteration takes far longer than 0.3 s
    t = time.perf_counter()
    r = bl.AID().solve(p, max_iter=100, time_limit=0.3)
    elapsed = time.perf_counter() - t
    assert r.status == "time_limit"
    assert elapsed < 1.5, elapsed  # bounded by a few oracle calls after the deadline, not by an iteration
    assert bool(torch.isfinite(r.x_flat).all())
    assert r.state.get("status") is None  # the state resumes
    r2 = bl.AID().solve(q.problem, max_iter=100, state=r.state)
    assert r2.status == "converged"


def test_callback_can_stop_inside_an_outer_iteration():
    q, p = _slow_problem(0.005)
    views = []

    def cb(s):
        views.append(dict(s))
        return bool(s.get("partial"))

    solver = bl.AID()
    solver.callback_interval = 0.0  # call from inside at every phase
    r = solver.solve(p, max_iter=100, callback=cb)
    assert r.status == "callback" and "inside" in r.message
    inside = [v for v in views if v.get("partial")]
    assert inside and inside[-1]["phase"] in ("adjoint", "line_search")
    assert r.n_iter == inside[-1]["iter"]  # the last completed iteration is returned


def test_users_module_is_untouched():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 1)).double()
    X = torch.randn(32, 4, dtype=D)
    t = torch.randn(32, 1, dtype=D)
    before = {k: v.clone() for k, v in net.state_dict().items()}

    def inner(x, params, batch):
        out = torch.func.functional_call(net, params, (X,))
        return ((out - t) ** 2).mean() + torch.exp(x).sum() * sum((w**2).sum() for w in params.values())

    def outer(x, params, batch):
        return ((torch.func.functional_call(net, params, (X,)) - t) ** 2).mean()

    p = BilevelProblem(outer, inner, torch.tensor([-3.0], dtype=D), net)
    for name in ("AID", "IFT", "ITD"):
        r = getattr(bl, name)().solve(p, max_iter=3)
        assert isinstance(r.y, nn.Sequential) and r.y is not net
        after = net.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), name
