"""Tests for :func:`curvlab.linalg.lanczos` against ``torch.linalg.eigvalsh``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlab.linalg import LanczosResult, lanczos
from curvlab.linops._base import MatvecOperator

F64 = torch.float64


def sym(eig: torch.Tensor, seed: int) -> torch.Tensor:
    n = eig.shape[0]
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=F64))
    return ((Q * eig.to(F64)) @ Q.T).to(eig.dtype)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@settings(max_examples=10, deadline=None)
@given(n=st.integers(2, 40), frac=st.floats(0.2, 1.0), seed=st.integers(0, 10_000))
def test_basis_orthonormal_and_projection_is_tridiagonal(n: int, frac: float, seed: int) -> None:
    A = sym(torch.randn(n, generator=gen(seed), dtype=F64), seed + 1)
    k = max(1, int(frac * n))
    res = lanczos(A, k, generator=gen(seed + 2))
    assert isinstance(res, LanczosResult)
    m = res.alpha.shape[0]
    assert m <= k and res.beta.shape == (m - 1,) and res.Q.shape == (n, m)
    assert res.n_matvecs == m
    torch.testing.assert_close(res.Q.T @ res.Q, torch.eye(m, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(res.Q.T @ A @ res.Q, res.tridiagonal(), rtol=0, atol=1e-10)
    theta, S = res.ritz()
    assert S.shape == (m, m) and torch.all(theta[1:] >= theta[:-1])
    # Cauchy interlacing: Ritz values lie inside the spectrum
    w = torch.linalg.eigvalsh(A)
    assert theta[0] >= w[0] - 1e-10 and theta[-1] <= w[-1] + 1e-10


def test_extreme_ritz_values_converge() -> None:
    n = 200
    eig = torch.cat([torch.tensor([-5.0, -4.0]), torch.linspace(-1.0, 1.0, n - 4), torch.tensor([4.5, 6.0])]).to(F64)
    A = sym(eig, seed=1)
    res = lanczos(A, 40, generator=gen(2))
    theta, _ = res.ritz()
    torch.testing.assert_close(theta[:2], eig[:2], rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(theta[-2:], eig[-2:], rtol=1e-8, atol=1e-8)
    assert not res.breakdown


def test_full_run_recovers_all_eigenvalues() -> None:
    A = torch.diag(torch.arange(1.0, 13.0, dtype=F64))
    res = lanczos(A, 12, generator=gen(3))
    torch.testing.assert_close(res.ritz()[0], torch.arange(1.0, 13.0, dtype=F64))
    over = lanczos(A, 50, generator=gen(3))  # k > n: stops after n steps
    assert over.alpha.shape == (12,) and over.breakdown


def test_breakdown_on_low_rank_matrix() -> None:
    n, r = 50, 4
    G = torch.randn(n, r, generator=gen(4), dtype=F64)
    A = G @ G.T
    res = lanczos(A, 20, generator=gen(5))
    # the Krylov space of a rank-r matrix has dimension at most r + 1
    assert res.breakdown and res.alpha.shape[0] <= r + 1
    theta = res.ritz()[0]
    w = torch.linalg.eigvalsh(A)
    torch.testing.assert_close(theta[-r:], w[-r:], rtol=1e-9, atol=1e-9)
    # start vector inside the range: exactly r steps
    res = lanczos(A, 20, v0=G[:, 0].clone())
    assert res.breakdown and res.alpha.shape[0] == r


def test_no_reorth_and_no_basis() -> None:
    A = sym(torch.linspace(1.0, 10.0, 30, dtype=F64), seed=6)
    full = lanczos(A, 10, generator=gen(7))
    none = lanczos(A, 10, generator=gen(7), reorth="none", store_basis=False)
    lean = lanczos(A, 10, generator=gen(7), store_basis=False)
    assert none.Q is None and lean.Q is None
    torch.testing.assert_close(lean.alpha, full.alpha)
    torch.testing.assert_close(lean.beta, full.beta)
    # few steps: orthogonality is not yet lost, so the recurrences agree closely
    torch.testing.assert_close(none.alpha, full.alpha, rtol=1e-6, atol=1e-6)
    assert lanczos(A, 10, generator=gen(7), reorth="none").Q.shape == (30, 10)


def test_callable_operator_v0_and_float32() -> None:
    A = sym(torch.linspace(-2.0, 3.0, 20, dtype=F64), seed=8)
    v0 = torch.randn(20, generator=gen(9), dtype=F64)
    ref = lanczos(A, 8, v0=v0)
    by_fn = lanczos(lambda v: A @ v, 8, v0=v0, n=20)
    op = MatvecOperator(lambda v: A @ v, 20, F64, symmetric=True)
    by_op = lanczos(op, 8, v0=v0)
    for r in (by_fn, by_op):
        torch.testing.assert_close(r.alpha, ref.alpha)
        torch.testing.assert_close(r.beta, ref.beta)
    assert op.n_matvecs == 8
    torch.testing.assert_close(ref.Q[:, 0], v0 / v0.norm())
    # callable without v0: default dtype on the generator's device
    r = lanczos(lambda v: A.to(v.dtype) @ v, 5, n=20, generator=gen(10))
    assert r.alpha.dtype == torch.get_default_dtype()

    A32 = A.float()
    res = lanczos(A32, 20, generator=gen(11))
    assert res.alpha.dtype == torch.float32 and res.Q.dtype == torch.float32
    torch.testing.assert_close(res.Q.T @ res.Q, torch.eye(res.Q.shape[1]), rtol=0, atol=1e-5)
    torch.testing.assert_close(res.ritz()[0][[0, -1]], torch.tensor([-2.0, 3.0]), rtol=1e-4, atol=1e-4)


def test_errors() -> None:
    A = torch.eye(5, dtype=F64)
    with pytest.raises(ValueError, match="symmetric"):
        lanczos(MatvecOperator(lambda v: v, 5, F64), 3)
    with pytest.raises(ValueError, match="n="):
        lanczos(lambda v: v, 3)
    with pytest.raises(ValueError, match="k"):
        lanczos(A, 0)
    with pytest.raises(ValueError, match="reorth"):
        lanczos(A, 3, reorth="partial")
    with pytest.raises(ValueError, match="v0"):
        lanczos(A, 3, v0=torch.zeros(5, dtype=F64))
    with pytest.raises(ValueError, match="v0"):
        lanczos(A, 3, v0=torch.ones(4, dtype=F64))
    with pytest.raises(ValueError, match="square"):
        lanczos(torch.ones(3, 4, dtype=F64), 2)
