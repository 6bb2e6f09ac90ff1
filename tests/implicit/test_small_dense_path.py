"""The small-system fast path (issue 14 item 8): A and B formed in one batched pass, then factored.

Every case is checked against an independent dense reference (explicit Jacobians by ``torch.func.jacrev``
and ``torch.linalg.solve``) and against the same call through CG, which takes the product route.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import implicit
from implicit._linear_solve import _AUTO_DENSE_MAX, LinearSolver

DT = torch.float64


def test_auto_dense_limit_is_curvlab_default() -> None:
    solve_module = importlib.import_module("curvlab.linalg.solve")
    assert _AUTO_DENSE_MAX == solve_module._DENSE_MAX
    assert LinearSolver("auto", {}, "ignore").factors(_AUTO_DENSE_MAX)
    assert not LinearSolver("auto", {}, "ignore").factors(_AUTO_DENSE_MAX + 1)
    assert not LinearSolver("auto", {"dense_max": 0}, "ignore").factors(5)
    assert LinearSolver("dense", {}, "ignore").factors(10_000)
    assert not LinearSolver("cg", {}, "ignore").factors(5)
    assert not LinearSolver("auto", {"M": lambda v: v}, "ignore").factors(5)


def _problem(seed: int = 0, n: int = 7, p: tuple[int, ...] = (3, 2)):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=g, dtype=DT) + 4 * torch.eye(n, dtype=DT)  # not symmetric
    C = torch.randn(n, *p, generator=g, dtype=DT)

    def F(y, th, c):  # noqa: N802 - a non-symmetric, nonlinear optimality condition
        return M @ y + 0.1 * torch.sin(y) - (C.reshape(n, -1) @ th.reshape(-1)) * c

    th = torch.randn(*p, generator=g, dtype=DT)
    c = torch.tensor(1.5, dtype=DT)
    y = torch.zeros(n, dtype=DT)
    for _ in range(60):  # Newton on F(y) = 0
        J = torch.func.jacrev(F)(y, th, c)
        y = y - torch.linalg.solve(J, F(y, th, c))
    return F, y, th, c


def _reference(F, y, th, c, v):
    A = torch.func.jacrev(F, argnums=0)(y, th, c)
    Bth, Bc = torch.func.jacrev(F, argnums=(1, 2))(y, th, c)
    u = torch.linalg.solve(A.T, v)
    return -(u @ Bth.reshape(len(y), -1)).reshape(th.shape), -(u @ Bc)


@pytest.mark.parametrize("solve", ["auto", "dense"])
def test_custom_root_dense_path_matches_dense_ift(solve: str) -> None:
    F, y, th, c = _problem()
    v = torch.linspace(-1, 1, len(y), dtype=DT)

    @implicit.custom_root(F, solve=solve, nonconvergence="raise")
    def solver(y0, th, c):
        return y

    th_, c_ = th.clone().requires_grad_(), c.clone().requires_grad_()
    g_th, g_c = torch.autograd.grad(solver(torch.zeros_like(y), th_, c_) @ v, (th_, c_))
    r_th, r_c = _reference(F, y, th, c, v)
    torch.testing.assert_close(g_th, r_th, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_c, r_c, rtol=1e-12, atol=1e-14)
    assert solver.last_solve.method == "dense" and solver.last_solve.n_matvecs == len(y)
    # the product route (CG on the normal equations) agrees
    cg_solver = implicit.custom_root(F, solve="gmres", tol=1e-13, nonconvergence="raise")(lambda y0, th, c: y)
    g2 = torch.autograd.grad(cg_solver(torch.zeros_like(y), th_, c_) @ v, (th_, c_))
    torch.testing.assert_close(g_th, g2[0], rtol=1e-9, atol=1e-12)


def test_batched_cotangents_take_the_dense_path() -> None:
    F, y, th, c = _problem(1)
    solver = implicit.custom_root(F, nonconvergence="raise")(lambda y0, th, c: y)
    th_ = th.clone().requires_grad_()
    out = solver(torch.zeros_like(y), th_, c)
    V = torch.eye(len(y), dtype=DT)[:3]
    (G,) = torch.autograd.grad(out, th_, V, is_grads_batched=True)
    for j in range(3):
        torch.testing.assert_close(G[j], _reference(F, y, th, c, V[j])[0], rtol=1e-12, atol=1e-14)


def test_root_vjp_and_hypergradient_dense_path() -> None:
    F, y, th, c = _problem(2)
    v = torch.arange(len(y), dtype=DT)
    g_th, g_c = implicit.root_vjp(F, y, (th, c), v, nonconvergence="raise")
    r_th, r_c = _reference(F, y, th, c, v)
    torch.testing.assert_close(g_th, r_th, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_c, r_c, rtol=1e-12, atol=1e-14)
    # hypergradient: ridge with a per-feature penalty, closed form
    g = torch.Generator().manual_seed(3)
    X, t = torch.randn(20, 5, generator=g, dtype=DT), torch.randn(20, generator=g, dtype=DT)
    lam = torch.rand(5, generator=g, dtype=DT) + 0.1
    H = X.T @ X + torch.diag(lam)
    w = torch.linalg.solve(H, X.T @ t)
    inner = lambda lam, w: 0.5 * ((X @ w - t) ** 2).sum() + 0.5 * (lam * w**2).sum()  # noqa: E731
    outer = lambda lam, w: (w**2).sum()  # noqa: E731
    h, info = implicit.hypergradient(outer, inner, lam, w, full_output=True, nonconvergence="raise")
    exact = -w * torch.linalg.solve(H, 2 * w)
    torch.testing.assert_close(h, exact, rtol=1e-12, atol=1e-14)
    assert info.method == "dense" and info.info["factorization"] == "cholesky"


def test_signature_check_cached_per_call_shape() -> None:
    @implicit.custom_root(lambda y, a: y - a)
    def solver(y0, a):
        return a.detach().clone()

    a = torch.ones(2, dtype=DT, requires_grad=True)
    solver(torch.zeros(2, dtype=DT), a)
    solver(torch.zeros(2, dtype=DT), a)  # cached: still correct
    with pytest.raises(TypeError, match="cannot be called"):
        solver(torch.zeros(2, dtype=DT), a, a)  # a different call shape is checked again
    with pytest.raises(TypeError, match="cannot be called"):
        solver(torch.zeros(2, dtype=DT), a, b=a)
