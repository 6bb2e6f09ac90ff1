"""LinearOperator algebra, conversions and counters against dense matrices."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch

from curvlab.linops import DenseOperator, IdentityOperator, LinearOperator, MatvecOperator, aslinearoperator


def _mats():
    g = torch.Generator().manual_seed(3)
    A = torch.randn(5, 5, generator=g, dtype=torch.float64)
    S = A @ A.T
    B = torch.randn(5, 5, generator=g, dtype=torch.float64)
    R = torch.randn(3, 5, generator=g, dtype=torch.float64)
    return S, B, R


def test_algebra_matches_dense():
    S, B, R = _mats()
    s, b, r = DenseOperator(S, psd=True), DenseOperator(B), DenseOperator(R)
    v = torch.randn(5, dtype=torch.float64)
    V = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close((s + b) @ v, (S + B) @ v)
    torch.testing.assert_close((s - b) @ V, (S - B) @ V)
    torch.testing.assert_close((2.5 * s) @ v, 2.5 * S @ v)
    torch.testing.assert_close((s * 2.0) @ v, 2.0 * S @ v)
    torch.testing.assert_close((s / 4) @ v, S @ v / 4)
    torch.testing.assert_close((-b) @ v, -B @ v)
    torch.testing.assert_close(s.damped(0.3) @ v, (S + 0.3 * torch.eye(5, dtype=torch.float64)) @ v)
    torch.testing.assert_close((r @ s).to_dense(), R @ S)
    torch.testing.assert_close(r.T.to_dense(), R.T)
    torch.testing.assert_close(r.T.T.to_dense(), R)
    torch.testing.assert_close(v[:3] @ r, v[:3] @ R)
    torch.testing.assert_close((b @ b).T @ v, (B @ B).T @ v)


def test_tags():
    S, B, R = _mats()
    s, b = DenseOperator(S, psd=True), DenseOperator(B)
    assert s.is_psd and s.is_symmetric
    assert DenseOperator(S).is_symmetric and not DenseOperator(B).is_symmetric
    assert s.damped(1.0).is_psd and not s.damped(-1.0).is_psd
    assert (s + s).is_psd and not (s - s).is_psd and (s - s).is_symmetric
    assert not (s + b).is_symmetric
    assert s.T is s
    with pytest.raises(ValueError, match="square"):
        DenseOperator(R).damped(1.0)
    with pytest.raises(ValueError, match="shapes"):
        DenseOperator(S) + DenseOperator(R)


def test_counter_and_matmat_counts_columns():
    S, _, _ = _mats()
    s = DenseOperator(S)
    s @ torch.ones(5, dtype=torch.float64)
    s @ torch.ones(5, 4, dtype=torch.float64)
    assert s.n_matvecs == 5
    s.reset_counter()
    assert s.n_matvecs == 0


def test_to_scipy_roundtrip():
    S, B, R = _mats()
    for M in (S, B, R):
        op = aslinearoperator(M).to_scipy()
        x = np.random.default_rng(0).standard_normal(M.shape[1])
        np.testing.assert_allclose(op @ x, M.numpy() @ x, atol=1e-12)
        y = np.random.default_rng(1).standard_normal(M.shape[0])
        np.testing.assert_allclose(op.rmatvec(y), M.numpy().T @ y, atol=1e-12)
    ev = spla.eigsh(aslinearoperator(S, psd=True).to_scipy(), k=2, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(ev), torch.linalg.eigvalsh(S)[-2:].numpy(), rtol=1e-10)


def test_matvec_operator_and_errors():
    S, _, _ = _mats()
    op = aslinearoperator(lambda v: S @ v, shape=5, dtype=torch.float64, symmetric=True)
    assert isinstance(op, MatvecOperator) and op.is_symmetric
    torch.testing.assert_close(op.to_dense(), S)
    torch.testing.assert_close(op.T @ torch.ones(5, dtype=torch.float64), S @ torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        aslinearoperator(lambda v: v)
    with pytest.raises(TypeError, match="LinearOperator"):
        aslinearoperator("nope")
    with pytest.raises(ValueError, match="matvec"):
        op @ torch.ones(4, dtype=torch.float64)
    nonsym = aslinearoperator(lambda v: v, shape=(3, 3))
    with pytest.raises(NotImplementedError):
        nonsym.rmatvec(torch.ones(3))
    assert isinstance(IdentityOperator(3, torch.float32, "cpu", 2.0), LinearOperator)
    assert "psd" in repr(DenseOperator(S, psd=True))
