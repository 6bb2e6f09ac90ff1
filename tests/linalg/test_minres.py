"""Tests for :func:`curvlab.linalg.minres` against dense ``torch.linalg.solve`` / ``lstsq``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlab.linalg import minres
from curvlab.linops._base import MatvecOperator

F64 = torch.float64


def sym(eig: torch.Tensor, seed: int) -> torch.Tensor:
    """``Q diag(eig) Qᵀ`` with a random orthogonal ``Q``."""
    n = eig.shape[0]
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=F64))
    return ((Q * eig.to(F64)) @ Q.T).to(eig.dtype)


def indefinite_eigs(n: int, log_cond: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mags = torch.logspace(-log_cond, 0, n, dtype=F64)
    signs = torch.where(torch.rand(n, generator=g, dtype=F64) < 0.5, -1.0, 1.0).to(F64)
    return mags * signs


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 30), log_cond=st.floats(0.0, 4.0), seed=st.integers(0, 10_000))
def test_minres_matches_dense_solve_indefinite(n: int, log_cond: float, seed: int) -> None:
    A = sym(indefinite_eigs(n, log_cond, seed), seed)
    b = randn(n, seed=seed + 1)
    res = minres(A, b, tol=1e-12)
    assert res.converged and res.status == "converged"
    assert res.x.shape == b.shape and res.residual_norm.shape == ()
    true_res = torch.linalg.vector_norm(b - A @ res.x)
    assert true_res <= 1e-8 * torch.linalg.vector_norm(b)
    torch.testing.assert_close(res.residual_norm, true_res, rtol=1e-2, atol=1e-10)  # recurrence ≈ true
    torch.testing.assert_close(res.x, torch.linalg.solve(A, b), rtol=1e-7 * 10**log_cond, atol=1e-9)
    # + true-residual checks (and restarts) where rounding matters
    assert res.n_matvecs == res.n_iter + res.info["residual_checks"] + res.info["restarts_for_residual"]


def test_shift_and_multiple_rhs() -> None:
    n = 30
    A = sym(torch.linspace(-3.0, 5.0, n, dtype=F64), seed=1)
    B = randn(n, 3, seed=2)
    sigma = 0.37
    res = minres(A, B, shift=sigma, tol=1e-11)
    ref = torch.linalg.solve(A - sigma * torch.eye(n, dtype=F64), B)
    assert res.converged and res.x.shape == (n, 3) and res.residual_norm.shape == (3,)
    torch.testing.assert_close(res.x, ref, rtol=1e-7, atol=1e-9)
    for j in range(3):
        single = minres(A, B[:, j], shift=sigma, tol=1e-11)
        torch.testing.assert_close(res.x[:, j], single.x, rtol=1e-8, atol=1e-10)


def test_finished_columns_leave_the_block() -> None:
    n = 30
    eig = torch.linspace(-3.0, 5.0, n, dtype=F64)
    A = sym(eig, seed=3)
    _, V = torch.linalg.eigh(A)
    B = torch.stack([V[:, 0], randn(n, seed=4)], dim=1)
    res = minres(A, B, tol=1e-10)
    assert res.converged
    assert res.n_matvecs <= res.n_iter + 2  # the eigenvector column stops after one step


def test_preconditioner_reduces_iterations() -> None:
    n = 60
    d = torch.logspace(-3, 3, n, dtype=F64)
    core = sym(indefinite_eigs(n, 0.5, seed=5), seed=5)
    A = d.sqrt()[:, None] * core * d.sqrt()[None, :]
    b = randn(n, seed=6)
    plain = minres(A, b, tol=1e-8, maxiter=3000)
    pre = minres(A, b, tol=1e-8, M=lambda r: r / d)
    assert pre.converged
    assert pre.n_iter < plain.n_iter / 2
    torch.testing.assert_close(pre.x, torch.linalg.solve(A, b), rtol=1e-5, atol=1e-8)
    # with M the reported residual is the true 2-norm
    torch.testing.assert_close(pre.residual_norm, torch.linalg.vector_norm(b - A @ pre.x))
    assert pre.n_matvecs == pre.n_iter + 1


def test_singular_consistent_and_least_squares() -> None:
    n = 20
    eig = torch.linspace(-2.0, 3.0, n, dtype=F64)
    eig[[4, 11]] = 0.0
    A = sym(eig, seed=7)
    x_true = randn(n, seed=8)
    b = A @ x_true  # consistent
    res = minres(A, b, tol=1e-12)
    assert res.converged
    assert torch.linalg.vector_norm(b - A @ res.x) <= 1e-9 * torch.linalg.vector_norm(b)
    # MINRES from x0 = 0 stays in range(A): the minimum-norm solution
    torch.testing.assert_close(res.x, torch.linalg.pinv(A) @ b, rtol=1e-7, atol=1e-9)

    b_bad = b + randn(n, seed=9)  # has a null-space component: incompatible
    res = minres(A, b_bad, tol=1e-10)
    assert res.converged and bool(res.info["least_squares_columns"])
    r = b_bad - A @ res.x
    assert torch.linalg.vector_norm(A @ r) <= 1e-7 * torch.linalg.vector_norm(b_bad)  # normal equations
    # a least-squares solution (MINRES need not return the minimum-norm one for incompatible systems)
    best = torch.linalg.vector_norm(b_bad - A @ (torch.linalg.pinv(A) @ b_bad))
    torch.testing.assert_close(torch.linalg.vector_norm(r), best, rtol=1e-8, atol=0.0)


def test_x0_callable_operator_float32() -> None:
    n = 25
    A = sym(indefinite_eigs(n, 1.0, seed=10), seed=10)
    b = randn(n, seed=11)
    x_ref = torch.linalg.solve(A, b)
    exact = minres(A, b, x0=x_ref.clone(), tol=1e-8)
    assert exact.converged and exact.n_iter == 0
    near = minres(A, b, x0=x_ref + 1e-6 * randn(n, seed=12), tol=1e-10)
    assert near.converged and near.n_iter < minres(A, b, tol=1e-10).n_iter
    torch.testing.assert_close(near.x, x_ref)

    res_fn = minres(lambda v: A @ v, b, tol=1e-10)
    op = MatvecOperator(lambda v: A @ v, n, F64, symmetric=True)
    res_op = minres(op, b, tol=1e-10)
    for r in (res_fn, res_op):
        assert r.converged
        torch.testing.assert_close(r.x, x_ref)
    assert op.n_matvecs == res_op.n_matvecs

    A32, b32 = A.float(), b.float()
    res = minres(A32, b32, tol=1e-5)
    assert res.converged and res.x.dtype == torch.float32
    torch.testing.assert_close(res.x.double(), x_ref, rtol=1e-3, atol=1e-4)


def test_maxiter_and_zero_rhs() -> None:
    A = sym(indefinite_eigs(30, 3.0, seed=13), seed=13)
    res = minres(A, randn(30, seed=14), maxiter=3, tol=1e-12)
    assert res.status == "max_iter" and not res.converged and res.n_iter == 3
    zero = minres(A, torch.zeros(30, 2, dtype=F64))
    assert zero.converged and zero.n_iter == 0 and torch.all(zero.x == 0)


def test_errors() -> None:
    A = sym(torch.linspace(-1.0, 1.0, 4, dtype=F64) + 0.1, seed=15)
    b = torch.ones(4, dtype=F64)
    with pytest.raises(ValueError, match=r"A must be a square.*\(3, 4\)"):
        minres(torch.ones(3, 4, dtype=F64), torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="b must"):
        minres(A, torch.ones(5, dtype=F64))
    with pytest.raises(ValueError, match="maxiter"):
        minres(A, b, maxiter=0)
    with pytest.raises(ValueError, match="tol"):
        minres(A, b, tol=-1e-3)
