"""Tests for :func:`curvlab.linalg.gmres` against dense ``torch.linalg.solve``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlab.linalg import gmres
from curvlab.linops._base import MatvecOperator

F64 = torch.float64


def nonsym(n: int, log_cond: float, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    """Random non-symmetric ``U diag(s) Vᵀ`` with singular values log-spaced in [10^-log_cond, 1]."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    s = torch.logspace(-log_cond, 0, n, dtype=F64)
    return ((U * s) @ V.T).to(dtype)


def shifted(n: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    """``3 I + G/√n``: non-normal, eigenvalues clustered around 3 (fast GMRES convergence)."""
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.eye(n, dtype=F64) + torch.randn(n, n, generator=g, dtype=F64) / n**0.5).to(dtype)


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 25), log_cond=st.floats(0.0, 3.0), seed=st.integers(0, 10_000))
def test_gmres_matches_dense_solve(n: int, log_cond: float, seed: int) -> None:
    A = nonsym(n, log_cond, seed)
    b = randn(n, seed=seed + 1)
    res = gmres(A, b, tol=1e-12, restart=n)  # full GMRES: exact after n steps
    assert res.converged and res.status == "converged"
    assert res.x.shape == b.shape and res.residual_norm.shape == ()
    true_res = torch.linalg.vector_norm(b - A @ res.x)
    torch.testing.assert_close(res.residual_norm, true_res)  # reported residual is the true one
    assert true_res <= 1e-11 * torch.linalg.vector_norm(b)
    torch.testing.assert_close(res.x, torch.linalg.solve(A, b), rtol=1e-8 * 10**log_cond, atol=1e-9)
    assert res.n_iter <= n


def test_restarts_multiple_rhs_and_counting() -> None:
    n = 40
    A = shifted(n, seed=1)
    B = randn(n, 3, seed=2)
    ref = torch.linalg.solve(A, B)
    full = gmres(A, B, tol=1e-10, restart=40)
    short = gmres(A, B, tol=1e-10, restart=4)
    for r in (full, short):
        assert r.converged and r.x.shape == (n, 3) and r.residual_norm.shape == (3,)
        torch.testing.assert_close(r.x, ref, rtol=1e-8, atol=1e-10)
    assert full.info["restarts"] == 1 and short.info["restarts"] > 1
    assert short.n_iter >= full.n_iter
    # one block step per Arnoldi iteration + one residual block per cycle (columns may leave early)
    assert short.n_matvecs <= 3 * (short.n_iter + short.info["restarts"])
    for j in range(3):
        single = gmres(A, B[:, j], tol=1e-10, restart=4)
        torch.testing.assert_close(short.x[:, j], single.x, rtol=1e-8, atol=1e-10)


def test_preconditioner_reduces_iterations() -> None:
    n = 50
    d = torch.logspace(-2, 2, n, dtype=F64)
    A = d[:, None] * shifted(n, seed=3)  # badly row-scaled
    b = randn(n, seed=4)
    plain = gmres(A, b, tol=1e-9, restart=50)
    pre = gmres(A, b, tol=1e-9, restart=50, M=lambda r: r / d)
    pre_dense = gmres(A, b, tol=1e-9, restart=50, M=torch.diag(1 / d))
    assert pre.converged and pre_dense.converged and pre.n_iter == pre_dense.n_iter
    assert pre.n_iter < plain.n_iter / 2
    torch.testing.assert_close(pre.x, torch.linalg.solve(A, b), rtol=1e-7, atol=1e-9)


def test_x0_callable_operator() -> None:
    n = 30
    A = shifted(n, seed=5)
    b = randn(n, seed=6)
    x_ref = torch.linalg.solve(A, b)
    exact = gmres(A, b, x0=x_ref.clone(), tol=1e-8)
    assert exact.converged and exact.n_iter == 0 and exact.n_matvecs == 1
    near = gmres(A, b, x0=x_ref + 1e-6 * randn(n, seed=7), tol=1e-10)
    assert near.converged and near.n_iter < gmres(A, b, tol=1e-10).n_iter
    torch.testing.assert_close(near.x, x_ref)
    res_fn = gmres(lambda v: A @ v, b, tol=1e-10)
    op = MatvecOperator(lambda v: A @ v, n, F64)
    res_op = gmres(op, b, tol=1e-10)
    for r in (res_fn, res_op):
        assert r.converged
        torch.testing.assert_close(r.x, x_ref)
    assert op.n_matvecs == res_op.n_matvecs


def test_float32() -> None:
    A = shifted(40, seed=8, dtype=torch.float32)
    B = randn(40, 2, seed=9, dtype=torch.float32)
    res = gmres(A, B, tol=1e-5, restart=10)
    assert res.converged and res.x.dtype == torch.float32
    torch.testing.assert_close(res.x.double(), torch.linalg.solve(A.double(), B.double()), rtol=1e-4, atol=1e-5)


def test_maxiter_singular_and_zero_rhs() -> None:
    A = nonsym(30, 3.0, seed=10)
    res = gmres(A, randn(30, seed=11), maxiter=5, restart=3, tol=1e-12)
    assert res.status == "max_iter" and not res.converged and res.n_iter == 5
    zero = gmres(A, torch.zeros(30, dtype=F64))
    assert zero.converged and zero.n_iter == 0 and torch.all(zero.x == 0)
    # singular and incompatible: the Krylov space becomes invariant without solving the system
    S = torch.diag(torch.tensor([1.0, 2.0, 0.0], dtype=F64))
    res = gmres(S, torch.ones(3, dtype=F64), tol=1e-10)
    assert not res.converged and res.status == "breakdown"
    torch.testing.assert_close(res.x[:2], torch.tensor([1.0, 0.5], dtype=F64))  # a least-squares solution
    torch.testing.assert_close(res.residual_norm, torch.tensor(1.0, dtype=F64))


def test_errors() -> None:
    A = shifted(4, seed=12)
    b = torch.ones(4, dtype=F64)
    with pytest.raises(ValueError, match=r"A must be a square.*\(3, 4\)"):
        gmres(torch.ones(3, 4, dtype=F64), torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="b must"):
        gmres(A, torch.ones(2, 4, dtype=F64))
    with pytest.raises(ValueError, match="maxiter"):
        gmres(A, b, maxiter=0)
    with pytest.raises(ValueError, match="restart"):
        gmres(A, b, restart=0)
    with pytest.raises(ValueError, match="tol"):
        gmres(A, b, tol=float("nan"))
