"""Tests for the randomized range finder, SVD, eigh and Nyström against ``torch.linalg``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlab.linalg import nystrom, randomized_eigh, randomized_range_finder, randomized_svd
from curvlab.linops._base import MatvecOperator

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def orth(n: int, r: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, r, generator=gen(seed), dtype=F64)).Q


def with_singular_values(m: int, n: int, s: torch.Tensor, seed: int) -> torch.Tensor:
    r = s.shape[0]
    return (orth(m, r, seed) * s) @ orth(n, r, seed + 1).T


def sym_with_eigs(n: int, eig: torch.Tensor, seed: int) -> torch.Tensor:
    V = orth(n, eig.shape[0], seed)
    return (V * eig) @ V.T


@settings(max_examples=10, deadline=None)
@given(m=st.integers(5, 40), n=st.integers(5, 40), r=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_exact_for_exactly_low_rank(m: int, n: int, r: int, seed: int) -> None:
    s = torch.logspace(0, -2, r, dtype=F64) * 10
    A = with_singular_values(m, n, s, seed)
    Q = randomized_range_finder(A, r, n_oversample=2, generator=gen(seed + 2))
    ell = min(r + 2, m, n)
    assert Q.shape == (m, ell)
    torch.testing.assert_close(Q.T @ Q, torch.eye(ell, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(Q @ (Q.T @ A), A, rtol=0, atol=1e-10)
    U, S, Vh = randomized_svd(A, r, n_oversample=2, generator=gen(seed + 3))
    assert U.shape == (m, r) and S.shape == (r,) and Vh.shape == (r, n)
    torch.testing.assert_close(S, torch.linalg.svdvals(A)[:r], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, A, rtol=0, atol=1e-10)
    torch.testing.assert_close(U.T @ U, torch.eye(r, dtype=F64), rtol=0, atol=1e-12)


def test_svd_close_for_decaying_spectrum() -> None:
    m, n, k = 120, 80, 6
    s = 0.5 ** torch.arange(80, dtype=F64)
    A = with_singular_values(m, n, s, seed=1)
    U, S, Vh = randomized_svd(A, k, n_oversample=10, n_power=2, generator=gen(2))
    U_ref, S_ref, Vh_ref = torch.linalg.svd(A)
    torch.testing.assert_close(S, S_ref[:k], rtol=1e-6, atol=0)
    assert torch.all(S[:-1] >= S[1:])
    # singular vectors up to sign
    torch.testing.assert_close((U.T @ U_ref[:, :k]).abs().diagonal(), torch.ones(k, dtype=F64), rtol=0, atol=1e-5)
    err = torch.linalg.matrix_norm(A - U @ torch.diag(S) @ Vh, ord=2)
    assert err <= 1.01 * S_ref[k]  # near the optimal rank-k error σ_{k+1}


def test_power_iterations_help_on_flat_spectrum() -> None:
    s = torch.cat([torch.tensor([10.0, 9.0, 8.0]), torch.full((57,), 1.0)]).to(F64)
    A = with_singular_values(60, 60, s, seed=3)
    err = []
    for q in (0, 3):
        U, S, Vh = randomized_svd(A, 3, n_oversample=2, n_power=q, generator=gen(4))
        err.append(float(torch.linalg.matrix_norm(A - U @ torch.diag(S) @ Vh, ord=2)))
    assert err[1] < err[0] and err[1] < 1.05


def test_eigh_low_rank_indefinite_all_modes() -> None:
    n = 50
    eig = torch.tensor([6.0, -5.0, 3.0, -2.0], dtype=F64)
    A = sym_with_eigs(n, eig, seed=5)
    w, U = randomized_eigh(A, 2, n_oversample=3, generator=gen(6))
    torch.testing.assert_close(w, torch.tensor([6.0, -5.0], dtype=F64))  # largest magnitude, descending
    torch.testing.assert_close(A @ U, U * w, rtol=0, atol=1e-10)
    w, U = randomized_eigh(A, 2, which="LA", n_oversample=3, generator=gen(7))
    torch.testing.assert_close(w, torch.tensor([6.0, 3.0], dtype=F64))
    torch.testing.assert_close(A @ U, U * w, rtol=0, atol=1e-9)
    w, U = randomized_eigh(A, 2, which="SA", n_oversample=3, generator=gen(8))
    torch.testing.assert_close(w, torch.tensor([-2.0, -5.0], dtype=F64))
    torch.testing.assert_close(A @ U, U * w, rtol=0, atol=1e-9)


def test_eigh_decaying_spectrum_vs_eigh() -> None:
    n, k = 100, 5
    eig = 0.6 ** torch.arange(n, dtype=F64) * torch.where(torch.arange(n) % 3 == 1, -1.0, 1.0).to(F64)
    A = sym_with_eigs(n, eig, seed=9)
    w, U = randomized_eigh(A, k, n_oversample=10, n_power=2, generator=gen(10))
    ref = torch.linalg.eigvalsh(A)
    top = ref[torch.argsort(ref.abs(), descending=True)[:k]]
    torch.testing.assert_close(w, top.sort(descending=True).values, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(U.T @ U, torch.eye(k, dtype=F64), rtol=0, atol=1e-10)


def test_eigh_algebraic_ends_of_indefinite_decaying_spectrum() -> None:
    n = 100
    signs = torch.where(torch.rand(n, generator=gen(20)) < 0.5, -1.0, 1.0).to(F64)
    A = sym_with_eigs(n, 0.7 ** torch.arange(n, dtype=F64) * signs, seed=21)
    ref = torch.linalg.eigvalsh(A)
    w, U = randomized_eigh(A, 3, which="LA", n_oversample=10, n_power=2, generator=gen(22))
    torch.testing.assert_close(w, ref[-3:].flip(0), rtol=1e-6, atol=1e-8)
    w, U = randomized_eigh(A, 3, which="SA", n_oversample=10, n_power=2, generator=gen(23))
    torch.testing.assert_close(w, ref[:3].flip(0), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(A @ U, U * w, rtol=0, atol=1e-6)


def test_nystrom_exact_low_rank_and_close_for_decay() -> None:
    n = 60
    G = torch.randn(n, 4, generator=gen(11), dtype=F64)
    A = G @ G.T
    U, lam = nystrom(A, 4, n_oversample=2, generator=gen(12))
    assert U.shape == (n, 4) and lam.shape == (4,)
    torch.testing.assert_close(lam, torch.linalg.eigvalsh(A).flip(0)[:4], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(U @ torch.diag(lam) @ U.T, A, rtol=0, atol=1e-9)
    torch.testing.assert_close(U.T @ U, torch.eye(4, dtype=F64), rtol=0, atol=1e-12)

    eig = 0.5 ** torch.arange(n, dtype=F64)
    A = sym_with_eigs(n, eig, seed=13)
    U, lam = nystrom(A, 6, n_oversample=10, generator=gen(14))
    assert torch.all(lam >= 0) and torch.all(lam[:-1] >= lam[1:])
    torch.testing.assert_close(lam, eig[:6], rtol=1e-3, atol=0)
    err = torch.linalg.matrix_norm(A - U @ torch.diag(lam) @ U.T, ord=2)
    assert err <= 2 * eig[6]


def test_operator_and_callable_inputs_float32() -> None:
    n = 40
    G = torch.randn(n, 3, generator=gen(15), dtype=torch.float32)
    A = G @ G.T
    op = MatvecOperator(lambda v: A @ v, n, torch.float32, matmat=lambda V: A @ V, psd=True)
    w_op, _ = randomized_eigh(op, 3, generator=gen(16))
    w_fn, _ = randomized_eigh(lambda v: A @ v, 3, n=n, generator=gen(16))
    ref = torch.linalg.eigvalsh(A.double()).flip(0)[:3]
    for w in (w_op, w_fn):
        assert w.dtype == torch.float32
        torch.testing.assert_close(w.double(), ref, rtol=1e-4, atol=1e-4)
    assert op.n_matvecs > 0
    U, lam = nystrom(op, 3, generator=gen(17))
    assert lam.dtype == torch.float32 and torch.all(lam >= 0)
    torch.testing.assert_close(lam.double(), ref, rtol=1e-4, atol=1e-4)
    U, S, Vh = randomized_svd(G @ G[:10].T, 3, generator=gen(18))  # (40, 10), float32
    assert U.dtype == torch.float32
    torch.testing.assert_close(S.double(), torch.linalg.svdvals((G @ G[:10].T).double())[:3], rtol=1e-4, atol=1e-4)
    Q = randomized_range_finder(lambda v: A @ v, 3, n=n, n_power=0, generator=gen(19))
    torch.testing.assert_close(Q @ (Q.T @ A), A, rtol=0, atol=1e-3)


def test_errors() -> None:
    A = torch.eye(6, dtype=F64)
    with pytest.raises(ValueError, match="k"):
        randomized_svd(A, 7)
    with pytest.raises(ValueError, match="k"):
        randomized_range_finder(A, 0)
    with pytest.raises(ValueError, match="n_oversample"):
        randomized_svd(A, 2, n_oversample=-1)
    with pytest.raises(ValueError, match="n_power"):
        randomized_range_finder(A, 2, n_power=-1)
    with pytest.raises(ValueError, match="which"):
        randomized_eigh(A, 2, which="BE")
    with pytest.raises(ValueError, match="symmetric"):
        randomized_eigh(MatvecOperator(lambda v: v, 6, F64), 2)
    with pytest.raises(ValueError, match="symmetric"):
        nystrom(MatvecOperator(lambda v: v, 6, F64), 2)
    with pytest.raises(ValueError, match="n="):
        nystrom(lambda v: v, 2)
    with pytest.raises(NotImplementedError):
        randomized_svd(MatvecOperator(lambda v: v, 6, F64), 2)
