"""Diagonal estimators (Hutchinson, XDiag) against the dense diagonal."""

from __future__ import annotations

import pytest
import torch

import curvlab as cl
from curvlab.spectrum import DiagResult, diag
from tests.conftest import dense_hessian, make_mlp


def _rotated(ev: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(ev.numel(), ev.numel(), generator=g, dtype=torch.float64))
    A = Q @ torch.diag(ev) @ Q.T
    return 0.5 * (A + A.T)


def _decaying(n: int = 300) -> torch.Tensor:
    return _rotated(100.0 / torch.arange(1, n + 1, dtype=torch.float64) ** 1.5, 0)


def _indefinite(n: int = 200) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ev = torch.cat([torch.tensor([40.0, 25.0, 12.0, 8.0, 5.0]), 0.3 * torch.randn(n - 5, generator=g)]).double()
    return _rotated(ev, 1)


@pytest.mark.parametrize("method", ["hutchinson", "xdiag"])
def test_unbiased_over_seeds(method):
    A = _indefinite(120)
    exact = torch.diagonal(A)
    runs = torch.stack([diag(A, method, 30, seed=s).estimate for s in range(200)])
    mean, spread = runs.mean(0), runs.std(0)
    # every entry's mean over 200 runs within 5 standard errors (of the mean) of the truth
    assert bool(((mean - exact).abs() <= 5 * spread / 200**0.5 + 1e-12).all())


def test_xdiag_beats_hutchinson_on_decaying_spectrum():
    A = _decaying()
    exact = torch.diagonal(A)
    err = {}
    for method in ("hutchinson", "xdiag"):
        errs = [float(torch.linalg.vector_norm(diag(A, method, 60, seed=s).estimate - exact)) for s in range(30)]
        err[method] = sum(errs) / len(errs)
    assert err["xdiag"] < 0.25 * err["hutchinson"]


@pytest.mark.parametrize("method", ["hutchinson", "xdiag"])
def test_std_error_is_calibrated(method):
    A = _decaying(200)
    exact = torch.diagonal(A)
    res = [diag(A, method, 40, seed=s) for s in range(100)]
    observed = float(torch.stack([(r.estimate - exact) ** 2 for r in res]).mean().sqrt())
    reported = float(torch.stack([r.std_error**2 for r in res]).mean().sqrt())
    assert observed / 2.5 <= reported <= 2.5 * observed


def test_hessian_of_mlp_and_exact_budget():
    params, model, loss_fn, f, X, Y, spec = make_mlp("mse", n=20, d=4, h=6, c=3)
    H = cl.linops.hessian(f, params, data=(X, Y))
    exact = torch.diagonal(dense_hessian(f, spec, (X, Y)))
    res = diag(H, "xdiag", budget=20, seed=0)
    assert isinstance(res, DiagResult) and res.n_matvecs == 20 and res.estimate.shape == exact.shape
    z = (res.estimate - exact).abs() / (res.std_error + 1e-12)
    assert float(z.median()) < 3.0
    full = diag(H, budget=H.shape[0])
    assert full.method == "exact" and full.n_matvecs == H.shape[0]
    torch.testing.assert_close(full.estimate, exact, atol=1e-10, rtol=0)
    assert set(spec.unflatten(full.estimate)) == {"W1", "b1", "W2"}


def test_low_rank_is_exact():
    g = torch.Generator().manual_seed(0)
    U = torch.randn(100, 4, generator=g, dtype=torch.float64)
    A = U @ U.T
    res = diag(A, "xdiag", 20, seed=0)
    assert res.method == "exact"
    torch.testing.assert_close(res.estimate, torch.diagonal(A), atol=1e-10, rtol=0)


def test_errors():
    A = _indefinite(40)
    with pytest.raises(ValueError, match="method must be one of"):
        diag(A, "diag++")
    with pytest.raises(ValueError, match="budget too small"):
        diag(A, "xdiag", budget=3)
    with pytest.raises(ValueError, match="not symmetric"):
        diag(torch.triu(torch.ones(6, 6, dtype=torch.float64)))
