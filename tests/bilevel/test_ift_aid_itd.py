"""IFT, AID and ITD against the quadratic problem's closed forms."""

from __future__ import annotations

import pytest
import torch

import bilevel as bl
from bilevel._common import implicit_hypergradient
from bilevel.itd import itd_hypergradient
from bilevel.problems import quadratic

D = torch.float64


@pytest.fixture(scope="module")
def q():
    return quadratic(dx=5, dy=10, cond=10.0, reg=1.0, seed=3)


def _rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def test_implicit_hypergradient_equals_closed_form(q):
    p = q.problem
    x = torch.randn(5, dtype=D)
    y = q.y_star(x)
    hg, _, _, info = implicit_hypergradient(p, x, y, None, None, "cg", tol=1e-12)
    assert info.converged
    assert _rel(hg, q.hypergradient(x)) < 1e-9
    # Lorraine et al.'s Neumann series converges to it as K grows (alpha = 1/L_inner)
    errs = [
        _rel(implicit_hypergradient(p, x, y, None, None, "neumann", alpha=1.0, K=K)[0], q.hypergradient(x))
        for K in (5, 50, 400)
    ]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-8


def test_itd_hypergradient_converges_as_k_grows(q):
    p = q.problem
    x = torch.randn(5, dtype=D)
    errs = []
    for K in (5, 20, 80, 320):
        hg, *_ = itd_hypergradient(p, x, torch.zeros(10, dtype=D), K, 1.0, None, [None] * K)
        errs.append(_rel(hg, q.hypergradient(x)))
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-6


SOLVERS = {
    "IFT-neumann": lambda q: bl.IFT(lr=1.0 / q.L_outer, inner_lr=1.0, T=10, K=200),
    "IFT-cg": lambda q: bl.IFT(lr=1.0 / q.L_outer, inner_lr=1.0, T=10, linear_solve="cg"),
    "AID": lambda q: bl.AID(lr=1.0 / q.L_outer),
    "ITD": lambda q: bl.ITD(lr=1.0 / q.L_outer, K=100),
}


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_deterministic_convergence_to_closed_form(q, name):
    r = SOLVERS[name](q).solve(q.problem, max_iter=150)
    # stated tolerance: ‖x − x*‖ / ‖x*‖ < 1e-4 and the outer value within 1e-7 of F(x*)
    assert _rel(r.x_flat, q.x_star) < 1e-4, name
    assert abs(q.outer_value(r.x_flat) - q.outer_star) < 1e-7
    assert _rel(r.y_flat, q.y_star(r.x_flat)) < 1e-3
    assert r.history["hypergrad_norm"][-1] < 1e-4


def test_ift_adam_outer_optimizer(q):
    r = bl.IFT(lr=0.05, inner_lr=1.0, T=10, linear_solve="cg", optimizer="adam").solve(q.problem, max_iter=300)
    assert _rel(r.x_flat, q.x_star) < 1e-2


@pytest.mark.parametrize(
    "make",
    [
        lambda: bl.IFT(lr=0.05, inner_lr=0.5, T=5, K=20),
        lambda: bl.AID(lr=0.05, inner_lr=0.5, inner_steps=10),
        lambda: bl.ITD(lr=0.05, inner_lr=0.5, K=10),
    ],
)
def test_stochastic_regime_reduces_outer_objective(make):
    qs = quadratic(dx=5, dy=10, reg=1.0, n_batches=8, seed=4)
    start = qs.outer_value(qs.problem.x0)
    r = make().solve(qs.problem, max_iter=150)
    end = qs.outer_value(r.x_flat)
    assert end - qs.outer_star < 0.1 * (start - qs.outer_star)
    assert r.state["draws_outer"] == 150 and r.state["draws_inner"] > 150


def test_ift_scales_to_a_million_hyperparameters():
    n = 1_000_000
    t = torch.randn(n, dtype=torch.float32, generator=torch.Generator().manual_seed(0))

    def inner(x, y, b):  # per-coordinate weight decay exp(x_i)
        return 0.5 * ((y - t) ** 2).sum() + 0.5 * (torch.exp(x) * y**2).sum()

    def outer(x, y, b):
        return 0.5 * ((y - 0.3 * t) ** 2).sum()

    def closed_form(x):  # y*(x) = t / (1 + exp(x))
        return float(0.5 * ((t / (1 + torch.exp(x)) - 0.3 * t) ** 2).sum())

    p = bl.BilevelProblem(outer, inner, torch.zeros(n), torch.zeros(n))
    r = bl.IFT(lr=1.0, inner_lr=0.5, T=5, K=5).solve(p, max_iter=3)
    assert r.x_flat.shape == (n,) and r.state["hvps"] == 15
    assert closed_form(r.x_flat) < 0.9 * closed_form(torch.zeros(n))


# ------------------------------------------------- AID with strong inner / outer solvers
def test_inner_graph_products_equal_closed_form(q):
    from bilevel._graph import InnerGraph

    x, y, v = torch.randn(5, dtype=D), torch.randn(10, dtype=D), torch.randn(10, dtype=D)
    G = InnerGraph(q.problem, x, y)
    torch.testing.assert_close(G.gy, q.A @ y - q.B @ x - q.b)
    torch.testing.assert_close(G.hvp(v), q.A @ v)
    torch.testing.assert_close(G.jxy(v), -q.B.T @ v)  # ∇²_xy g · v for g = ½yᵀAy − yᵀ(Bx + b)
    torch.testing.assert_close(G.hessian(), q.A)
    torch.testing.assert_close(G.solve_dense(v), torch.linalg.solve(q.A, v))


def test_warm_started_adjoint_equals_cold_started(q):
    p = q.problem
    x = torch.randn(5, dtype=D)
    y = q.y_star(x)
    cold, w, _, cinfo = implicit_hypergradient(p, x, y, None, None, "cg", tol=1e-12)
    warm, _, _, info = implicit_hypergradient(
        p, x, y, None, None, "cg", tol=1e-12, x0=w + 1e-3 * torch.randn(10, dtype=D)
    )
    assert _rel(warm, cold) < 1e-9 and _rel(warm, q.hypergradient(x)) < 1e-9
    assert info.n_iter <= cinfo.n_iter  # a nearby start needs no more iterations


@pytest.mark.parametrize(
    "make",
    [
        lambda: bl.AID(),  # dense Newton inner + L-BFGS outer with line search
        lambda: bl.AID(inner="newton_cg", solve_tol=1e-12),  # CG's relative tolerance bounds the accuracy
        lambda: bl.AID(inner="newton_cg", linear_solve="dense"),
        lambda: bl.AID(inner=__import__("curvlab").solvers.NewtonCG(cg_tol=1e-12), inner_tol=1e-10, solve_tol=1e-12),
    ],
    ids=["defaults", "newton_cg", "newton_cg-dense", "curvlab-NewtonCG"],
)
def test_aid_strong_inner_converges_to_1e8(q, make):
    r = make().solve(q.problem, max_iter=100, tol=1e-11)
    assert _rel(r.x_flat, q.x_star) < 1e-8, (r.status, r.message)
    assert _rel(r.y_flat, q.y_star(r.x_flat)) < 1e-8
    assert r.n_iter < 60


def test_aid_line_search_decreases_f_monotonically(q):
    values = []
    r = bl.AID(optimizer="sgd").solve(q.problem, max_iter=40, callback=lambda s: values.append(q.outer_value(s["x"])))
    assert r.history["step_size"][0] > 0
    F0 = q.outer_value(q.problem.x0)
    assert all(b <= a + 1e-12 for a, b in zip([F0, *values], values))
    assert values[-1] - q.outer_star < 1e-3 * (F0 - q.outer_star)


def test_aid_option_errors():
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
