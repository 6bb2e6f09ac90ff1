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
