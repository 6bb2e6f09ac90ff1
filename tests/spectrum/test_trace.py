"""Trace estimators: unbiased, calibrated standard errors, Hutch++/XTrace beat Hutchinson on decaying spectra."""

from __future__ import annotations

import math

import pytest
import torch

import curvlab as cl
from curvlab.spectrum import TraceResult, trace
from tests.conftest import dense_hessian, make_mlp


def _decaying(n: int = 300, seed: int = 0, power: float = 1.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    ev = 100.0 / torch.arange(1, n + 1, dtype=torch.float64) ** power
    A = Q @ torch.diag(ev) @ Q.T
    return 0.5 * (A + A.T)


def _indefinite(n: int = 200, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    ev = torch.cat([torch.tensor([40.0, 25.0, 12.0, 8.0, 5.0]), 0.3 * torch.randn(n - 5, generator=g)]).double()
    A = Q @ torch.diag(ev) @ Q.T
    return 0.5 * (A + A.T)


def _runs(A, method, budget, seeds=range(200)):
    res = [trace(A, method, budget, seed=s) for s in seeds]
    est = torch.tensor([float(r) for r in res], dtype=torch.float64)
    se = torch.tensor([float(r.std_error) for r in res], dtype=torch.float64)
    return est, se


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace"])
@pytest.mark.parametrize("matrix", ["decaying", "indefinite"])
def test_unbiased_over_seeds_and_calibrated(method, matrix):
    A = _decaying() if matrix == "decaying" else _indefinite()
    exact = float(torch.trace(A))
    est, se = _runs(A, method, budget=48)
    spread = float(est.std())
    # unbiased: the mean over 200 independent runs is within 4 standard errors of the mean
    assert abs(float(est.mean()) - exact) <= 4 * spread / math.sqrt(est.numel())
    # the reported standard error is of the right size (within a factor of 2.5 of the observed spread)
    assert spread / 2.5 <= float(se.mean()) <= 2.5 * spread


def test_hutchpp_and_xtrace_beat_hutchinson_on_decaying_spectrum():
    A = _decaying()
    exact = float(torch.trace(A))
    rmse = {}
    for method in ("hutchinson", "hutch++", "xtrace"):
        est, _ = _runs(A, method, budget=60, seeds=range(100))
        rmse[method] = float(((est - exact) ** 2).mean().sqrt())
    assert rmse["hutch++"] < 0.25 * rmse["hutchinson"]
    assert rmse["xtrace"] < 0.25 * rmse["hutchinson"]


def test_hessian_of_mlp():
    params, model, loss_fn, f, X, Y, spec = make_mlp("ce", n=30, d=6, h=10, c=5)
    H = cl.linops.hessian(f, params, data=(X, Y))
    exact = float(torch.trace(dense_hessian(f, spec, (X, Y))))
    for method in ("hutchinson", "hutch++", "xtrace"):
        before = H.n_matvecs
        res = trace(H, method, budget=40, seed=0)
        assert isinstance(res, TraceResult) and res.method == method
        assert res.n_matvecs == H.n_matvecs - before == 40
        assert res.estimate.dtype == torch.float64 and res.estimate.ndim == 0
        assert abs(float(res) - exact) <= 5 * float(res.std_error) + 1e-10
        lo, hi = res.confidence_interval(5.0)
        assert lo <= float(res) <= hi
    full = trace(H, "hutch++", budget=H.shape[0], seed=0)  # budget >= n: exact
    assert full.method == "exact" and float(full.std_error) == 0.0 and full.n_matvecs == H.shape[0]
    assert float(full) == pytest.approx(exact, abs=1e-10)


def test_low_rank_is_exact():
    g = torch.Generator().manual_seed(0)
    U = torch.randn(200, 5, generator=g, dtype=torch.float64)
    A = U @ U.T
    res = trace(A, "xtrace", budget=20, seed=0)
    assert res.method == "exact" and float(res) == pytest.approx(float(torch.trace(A)), rel=1e-10)
    res = trace(A, "hutch++", budget=21, seed=0)
    assert float(res) == pytest.approx(float(torch.trace(A)), rel=1e-10)


def test_reproducible():
    A = _indefinite()
    assert float(trace(A, seed=5)) == float(trace(A, seed=5))
    assert float(trace(A, seed=5)) != float(trace(A, seed=6))
    a = trace(A, "xtrace", generator=torch.Generator().manual_seed(2))
    b = trace(A, "xtrace", generator=torch.Generator().manual_seed(2))
    assert float(a) == float(b)


def test_block_size_does_not_change_the_estimate():
    A = _indefinite()
    a = trace(A, "hutch++", 30, seed=0, block_size=64)
    b = trace(A, "hutch++", 30, seed=0, block_size=4)
    assert float(a) == pytest.approx(float(b), rel=1e-12)


def test_errors():
    A = _indefinite(50)
    with pytest.raises(ValueError, match="method must be one of"):
        trace(A, "girard")
    with pytest.raises(ValueError, match="budget too small"):
        trace(A, "hutch++", budget=3)
    with pytest.raises(ValueError, match="budget too small"):
        trace(A, "hutchinson", budget=1)
    with pytest.raises(ValueError, match="budget must be an integer"):
        trace(A, budget=10.0)
    with pytest.raises(ValueError, match="not symmetric"):
        trace(torch.triu(torch.ones(6, 6, dtype=torch.float64)))
    with pytest.raises(ValueError, match="either generator= or seed="):
        trace(A, seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="symmetric"):
        trace(cl.linops.MatvecOperator(lambda v: v, 5, torch.float64))
