"""Tests for :func:`curvlab.linalg.cg` against dense ``torch.linalg.solve``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlab.linalg import KrylovResult, cg
from curvlab.linops._base import MatvecOperator

F64 = torch.float64


def spd(n: int, log_cond: float, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    """Random SPD matrix with eigenvalues log-spaced in [10^-log_cond, 1]."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    eig = torch.logspace(-log_cond, 0, n, dtype=F64)
    return ((Q * eig) @ Q.T).to(dtype)


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 30), log_cond=st.floats(0.0, 4.0), seed=st.integers(0, 10_000))
def test_cg_matches_dense_solve_spd(n: int, log_cond: float, seed: int) -> None:
    A = spd(n, log_cond, seed)
    b = randn(n, seed=seed + 1)
    res = cg(A, b, tol=1e-12)
    x_ref = torch.linalg.solve(A, b)
    assert isinstance(res, KrylovResult)
    assert res.converged and res.status == "converged"
    assert res.x.shape == b.shape and res.x.dtype == F64
    assert res.residual_norm.shape == ()
    true_res = torch.linalg.vector_norm(b - A @ res.x)
    assert true_res <= 1e-9 * torch.linalg.vector_norm(b)
    torch.testing.assert_close(res.x, x_ref, rtol=1e-7 * 10**log_cond, atol=1e-10)
    # no x0: no initial residual product; one more only where the true residual was checked
    assert res.n_matvecs == res.n_iter + res.info["residual_checks"] + res.info["restarts_for_residual"]
    assert not res.negative_curvature and res.direction is None


def test_multiple_rhs_match_single_solves_and_freeze_converged_columns() -> None:
    n = 40
    A = spd(n, 3.0, seed=1)
    w, V = torch.linalg.eigh(A)
    B = torch.stack([V[:, -1], randn(n, seed=2), randn(n, seed=3)], dim=1)  # column 0: an eigenvector
    res = cg(A, B, tol=1e-10)
    assert res.converged and res.x.shape == (n, 3) and res.residual_norm.shape == (3,)
    torch.testing.assert_close(res.x, torch.linalg.solve(A, B), rtol=1e-6, atol=1e-9)
    singles = [cg(A, B[:, j], tol=1e-10) for j in range(3)]
    assert singles[0].n_iter == 1
    for j, s in enumerate(singles):
        torch.testing.assert_close(res.x[:, j], s.x, rtol=1e-8, atol=1e-10)
    # the converged eigenvector column is dropped from the block: it costs one product, not n_iter
    assert res.n_matvecs <= sum(s.n_matvecs for s in singles) + 2
    assert res.n_matvecs < 3 * res.n_iter


def test_check_every_gives_same_answer() -> None:
    A = spd(30, 2.0, seed=4)
    B = randn(30, 2, seed=5)
    r1 = cg(A, B, tol=1e-10)
    r5 = cg(A, B, tol=1e-10, check_every=5)
    assert r5.converged
    torch.testing.assert_close(r5.x, r1.x, rtol=1e-8, atol=1e-10)
    assert r5.n_iter % 5 == 0 and r1.n_iter <= r5.n_iter < r1.n_iter + 5


def test_jacobi_preconditioner_reduces_iterations() -> None:
    n = 60
    d = torch.logspace(-3, 3, n, dtype=F64)
    A = d.sqrt()[:, None] * spd(n, 1.0, seed=6) * d.sqrt()[None, :]  # badly scaled, well-conditioned core
    b = randn(n, seed=7)
    plain = cg(A, b, tol=1e-8, maxiter=2000)
    pre = cg(A, b, tol=1e-8, M=lambda r: r / torch.diagonal(A))
    pre_dense = cg(A, b, tol=1e-8, M=torch.diag(1 / torch.diagonal(A)))
    assert pre.converged and pre_dense.converged
    assert pre.n_iter < plain.n_iter / 2
    assert pre.n_iter == pre_dense.n_iter
    torch.testing.assert_close(pre.x, torch.linalg.solve(A, b), rtol=1e-5, atol=1e-8)


def test_x0() -> None:
    A = spd(25, 2.0, seed=8)
    b = randn(25, seed=9)
    x_ref = torch.linalg.solve(A, b)
    exact = cg(A, b, x0=x_ref.clone(), tol=1e-8)
    assert exact.converged and exact.n_iter == 0 and exact.n_matvecs == 1  # just the initial residual
    near = cg(A, b, x0=x_ref + 1e-6 * randn(25, seed=10), tol=1e-10)
    far = cg(A, b, tol=1e-10)
    assert near.converged and near.n_iter < far.n_iter
    assert near.n_matvecs == near.n_iter + 1
    torch.testing.assert_close(near.x, x_ref, rtol=1e-7, atol=1e-9)


def test_negative_curvature_detected_with_direction() -> None:
    n = 20
    g = torch.Generator().manual_seed(11)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    eig = torch.linspace(1.0, 5.0, n, dtype=F64)
    eig[3] = -2.0
    A = (Q * eig) @ Q.T
    b = torch.randn(n, generator=g, dtype=F64)
    res = cg(A, b, tol=1e-10)
    assert res.negative_curvature and res.status == "negative_curvature" and not res.converged
    d = res.direction
    assert d is not None and d.shape == b.shape and torch.linalg.vector_norm(d) > 0
    assert d @ A @ d <= 0
    # Steihaug: the iterate before the bad step still decreases q(x) = ½xᵀAx - bᵀx below q(0) = 0
    q = 0.5 * res.x @ A @ res.x - b @ res.x
    assert q < 0


def test_negative_curvature_per_column() -> None:
    A = torch.diag(torch.tensor([1.0, 2.0, 3.0, -1.0], dtype=F64))
    B = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=F64)
    res = cg(A, B, tol=1e-12)
    assert res.status == "negative_curvature" and res.negative_curvature
    assert res.info["converged_columns"].tolist() == [True, False]
    assert res.info["negative_curvature_columns"].tolist() == [False, True]
    torch.testing.assert_close(res.x[:, 0], torch.tensor([1.0, 0.5, 1 / 3, 0.0], dtype=F64))
    torch.testing.assert_close(res.x[:, 1], torch.zeros(4, dtype=F64))  # kept the iterate before the bad step
    assert torch.all(res.direction[:, 0] == 0)
    d = res.direction[:, 1]
    assert d @ A @ d < 0


def test_zero_curvature_counts_as_negative() -> None:
    A = torch.diag(torch.tensor([1.0, 0.0], dtype=F64))
    res = cg(A, torch.tensor([0.0, 1.0], dtype=F64))
    assert res.status == "negative_curvature" and res.n_iter == 1


def test_callable_and_operator_inputs() -> None:
    A = spd(15, 1.0, seed=12)
    b = randn(15, seed=13)
    ref = cg(A, b, tol=1e-10)
    calls = []

    def mv(v: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return A @ v

    res_fn = cg(mv, b, tol=1e-10)
    op = MatvecOperator(lambda v: A @ v, 15, F64, symmetric=True)
    res_op = cg(op, b, tol=1e-10)
    for r in (res_fn, res_op):
        assert r.converged and r.n_iter == ref.n_iter and r.n_matvecs == ref.n_matvecs
        torch.testing.assert_close(r.x, ref.x)
    assert len(calls) == res_fn.n_matvecs
    assert op.n_matvecs == res_op.n_matvecs


def test_float32() -> None:
    A = spd(30, 1.5, seed=14, dtype=torch.float32)
    b = randn(30, 2, seed=15, dtype=torch.float32)
    res = cg(A, b, tol=1e-5)
    assert res.converged and res.x.dtype == torch.float32 and res.residual_norm.dtype == torch.float32
    ref = torch.linalg.solve(A.double(), b.double())
    torch.testing.assert_close(res.x.double(), ref, rtol=1e-3, atol=1e-4)


def test_maxiter_zero_rhs_and_callback() -> None:
    A = spd(30, 3.0, seed=16)
    b = randn(30, seed=17)
    res = cg(A, b, maxiter=3, tol=1e-12)
    assert res.status == "max_iter" and not res.converged and res.n_iter == 3
    assert res.residual_norm > 0
    zero = cg(A, torch.zeros(30, dtype=F64))
    assert zero.converged and zero.n_iter == 0 and torch.all(zero.x == 0)
    seen: list[torch.Tensor] = []
    res = cg(A, b, tol=1e-8, callback=lambda x: seen.append(x.clone()))
    assert len(seen) == res.n_iter and seen[-1].shape == b.shape
    torch.testing.assert_close(seen[-1], res.x)


def test_atol_stops_early() -> None:
    A = spd(30, 2.0, seed=18)
    b = randn(30, seed=19)
    loose = cg(A, b, tol=0.0, atol=1e-2)
    tight = cg(A, b, tol=0.0, atol=1e-10)
    assert loose.converged and loose.residual_norm <= 1e-2 and loose.n_iter < tight.n_iter


def test_errors() -> None:
    A = spd(4, 1.0, seed=20)
    b = torch.ones(4, dtype=F64)
    with pytest.raises(ValueError, match=r"A .*square.*\(3, 4\)"):
        cg(torch.ones(3, 4, dtype=F64), torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="b must"):
        cg(A, torch.ones(5, dtype=F64))
    with pytest.raises(ValueError, match="b must"):
        cg(A, torch.ones(4, 1, 1, dtype=F64))
    with pytest.raises(ValueError, match="maxiter"):
        cg(A, b, maxiter=0)
    with pytest.raises(ValueError, match="tol"):
        cg(A, b, tol=-1.0)
    with pytest.raises(ValueError, match="atol"):
        cg(A, b, atol=-1.0)
    with pytest.raises(ValueError, match="x0"):
        cg(A, b, x0=torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="check_every"):
        cg(A, b, check_every=0)
    with pytest.raises(ValueError, match="b must have A's dtype"):
        cg(A, b.float())
    with pytest.raises(ValueError, match="M must"):
        cg(A, b, M=torch.eye(3, dtype=F64))
