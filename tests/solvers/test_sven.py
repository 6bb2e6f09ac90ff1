"""Sven (Bright-Thonney et al. 2026): the truncated pseudoinverse step against dense references, options, contract."""

from __future__ import annotations

import io
import os
import sys

import pytest
import torch

import curvlab as cl
from curvlab.solvers.sven import Sven, sven_direction, truncated_pinv

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests.conftest import make_mlp  # noqa: E402


def _low_rank(rows, cols, rank, seed=0, decay=None):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(rows, rank, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(cols, rank, generator=g, dtype=torch.float64)).Q
    s = torch.linspace(3.0, 1.0, rank, dtype=torch.float64) if decay is None else decay
    return U @ torch.diag(s) @ V.T, g


def _dense_truncated(M, R, k, rtol):
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    keep = (S > rtol * S[0]) & (torch.arange(S.numel()) < k)
    return Vh[keep].T @ ((U[:, keep].T @ R) / S[keep])


def test_step_is_minus_lr_pinv_on_least_squares():
    A, g = _low_rank(12, 20, 7)
    b = torch.randn(12, generator=g, dtype=torch.float64)
    x0 = torch.randn(20, generator=g, dtype=torch.float64)
    prob = cl.LeastSquares(lambda x: A @ x - b, x0)
    r = Sven(lr=0.3, k=12).solve(prob, max_iter=1, tol=0.0)
    torch.testing.assert_close(r.flat, x0 - 0.3 * torch.linalg.pinv(A) @ (A @ x0 - b), rtol=0, atol=1e-12)
    assert r.history["rank"] == [7]


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_step_is_minus_lr_pinv_of_loss_jacobian(loss):
    params, model, loss_fn, _, X, Y, spec = make_mlp(loss, n=10, c=3)
    prob = cl.SupervisedLoss(model, loss_fn, params, (X, Y))
    x0 = spec.flatten()
    R = loss_fn(model(params, X), Y).detach()
    M = torch.func.jacrev(lambda z: loss_fn(model(spec.unflatten(z), X), Y))(x0)
    ref = x0 - 0.1 * torch.linalg.pinv(M, rtol=1e-12) @ R
    for svd in ("exact", "gram"):
        r = Sven(lr=0.1, k=64, rtol=1e-12, svd=svd).solve(prob, max_iter=1, tol=0.0)
        torch.testing.assert_close(r.flat, ref, rtol=0, atol=1e-9)


def test_truncated_step_equals_dense_truncated_svd():
    A, g = _low_rank(15, 30, 10, decay=torch.logspace(0, -5, 10, dtype=torch.float64))
    R = torch.randn(15, generator=g, dtype=torch.float64)
    for k, rtol in ((3, 1e-3), (10, 1e-3), (10, 1e-2), (15, 1e-12)):
        U, S, V = truncated_pinv(A, k, rtol, backend="exact")
        torch.testing.assert_close(sven_direction(A, R, U, S, V), _dense_truncated(A, R, k, rtol), rtol=0, atol=1e-9)
        assert S.numel() == int(((torch.linalg.svdvals(A) > rtol * 1.0)[:k]).sum())


@pytest.mark.parametrize("backend", ["randomized", "gram", "auto"])
def test_backends_agree_with_exact(backend):
    # exactly low rank: randomized with oversampling recovers it; gram squares the spectrum (≈ eps^(1/2) accuracy)
    A, g = _low_rank(40, 25, 6)
    R = torch.randn(40, generator=g, dtype=torch.float64)
    ref = sven_direction(A, R, *truncated_pinv(A, 6, backend="exact"))
    got = sven_direction(A, R, *truncated_pinv(A, 6, backend=backend, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-8)
    # decaying spectrum, k below the rank: the randomized sketch is an approximation (Halko et al. bounds)
    A, g = _low_rank(60, 200, 30, decay=torch.logspace(0, -3, 30, dtype=torch.float64))
    R = torch.randn(60, generator=g, dtype=torch.float64)
    ref = sven_direction(A, R, *truncated_pinv(A, 8, rtol=1e-3, backend="exact"))
    got = sven_direction(
        A, R, *truncated_pinv(A, 8, rtol=1e-3, backend=backend, generator=torch.Generator().manual_seed(0))
    )
    tol = 1e-8 if backend in ("gram", "auto") else 5e-2
    assert float((got - ref).norm() / ref.norm()) <= tol


def test_kappa_and_microbatch_conditions():
    s = Sven(kappa=1.0, microbatch=3)
    losses = torch.tensor([1.0, 4.0, 1.0, 0.0, 0.0, 0.0, 9.0], dtype=torch.float64)
    dl = torch.arange(14, dtype=torch.float64).reshape(7, 2)
    R, M = s.conditions(losses, dl)
    mean = torch.tensor([2.0, 0.0, 9.0], dtype=torch.float64)
    torch.testing.assert_close(R, mean.sqrt())
    dmean = torch.stack([dl[:3].mean(0), dl[3:6].mean(0), dl[6:].mean(0)])
    torch.testing.assert_close(M[[0, 2]], (0.5 / mean[[0, 2]].sqrt())[:, None] * dmean[[0, 2]])
    assert torch.equal(M[1], torch.zeros(2, dtype=torch.float64))  # condition already met: no direction
    R2, M2 = Sven().conditions(losses, dl)
    assert torch.equal(R2, losses) and torch.equal(M2, dl)


def test_param_fraction_moves_only_the_drawn_parameters_and_resumes_bit_identically():
    params, model, loss_fn, _, X, Y, spec = make_mlp("mse", n=24, c=2)
    batches = [(X[i : i + 8], Y[i : i + 8]) for i in range(0, 24, 8)]
    prob = cl.SupervisedLoss(model, loss_fn, params, batches)
    s = Sven(lr=0.2, param_fraction=0.3, svd="randomized", k=4, seed=7)
    one = s.solve(prob, max_iter=1, tol=0.0)
    moved = (one.flat != spec.flatten()).sum().item()
    assert 0 < moved <= int(0.3 * spec.size)
    blocks = Sven(lr=0.2, param_fraction=0.5, param_blocks=True).solve(prob, max_iter=1, tol=0.0)
    changed = [not torch.equal(a, b) for a, b in zip(spec.unflatten(blocks.flat).values(), params.values())]
    assert 0 < sum(changed) < len(changed)
    full = s.solve(prob, max_iter=9, tol=0.0)
    part = s.solve(prob, max_iter=4, tol=0.0)
    buf = io.BytesIO()
    torch.save(part.state, buf)
    buf.seek(0)
    rest = s.solve(prob, max_iter=9, tol=0.0, state=torch.load(buf, weights_only=False))
    assert torch.equal(rest.flat, full.flat) and rest.history["value"] == full.history["value"][4:]


@pytest.mark.parametrize("mode", ["pre", "post"])
def test_rmsprop_scaling(mode):
    params, model, loss_fn, _, X, Y, spec = make_mlp("mse", n=16, c=1)
    prob = cl.SupervisedLoss(model, loss_fn, params, (X, Y))
    lr = 0.2 if mode == "pre" else 0.01
    r = Sven(lr=lr, rmsprop=mode, rmsprop_momentum=0.5 if mode == "post" else 0.0).solve(prob, max_iter=30, tol=0.0)
    assert r.value < 0.5 * float(prob.value(prob.x0))
    assert r.state["v"].shape == (spec.size,) and bool((r.state["v"] > 0).any())
    if mode == "pre":  # the scaled step still solves the linearised conditions when they are consistent
        x0 = spec.flatten()
        M = torch.func.jacrev(lambda z: loss_fn(model(spec.unflatten(z), X), Y))(x0)
        R = loss_fn(model(params, X), Y).detach()
        one = Sven(lr=1.0, rmsprop="pre", k=16, rtol=1e-12).solve(prob, max_iter=1, tol=0.0)
        torch.testing.assert_close(M @ (x0 - one.flat), R, rtol=0, atol=1e-8)


def test_regression_training_and_history_columns():
    g = torch.Generator().manual_seed(0)
    X = torch.rand(256, 1, generator=g, dtype=torch.float64) * 2 - 1
    Y = torch.exp(-10 * X**2) * torch.sin(2 * X)
    net = torch.nn.Sequential(
        torch.nn.Linear(1, 16), torch.nn.GELU(), torch.nn.Linear(16, 16), torch.nn.GELU(), torch.nn.Linear(16, 1)
    ).double()
    batches = [(X[i : i + 64], Y[i : i + 64]) for i in range(0, 256, 64)]
    prob = cl.SupervisedLoss(net, lambda o, y: ((o - y) ** 2).sum(-1), None, batches)
    full = cl.SupervisedLoss(net, lambda o, y: ((o - y) ** 2).sum(-1), None, (X, Y))
    r = Sven(lr=0.1, k=32).solve(prob, max_iter=80, tol=0.0)
    assert float(full.value(r.flat)) < 0.2 * float(full.value(full.x0))
    assert set(r.history.keys()) >= {"rank", "sigma_max", "conditions", "update_norm", "step_size"}
    assert max(r.history["rank"]) <= 32 and r.history["conditions"][0] == 64


def test_non_finite_residuals_stop_with_nan():
    def res(x):  # NaN beyond x = 1
        r = torch.stack([x[0] - 0.9, 2 * (x[0] - 0.9)])
        return torch.where(x[0] > 1, torch.full_like(r, float("nan")), r)

    x0 = torch.tensor([0.0], dtype=torch.float64)
    r = Sven(lr=3.0).solve(cl.LeastSquares(res, x0), max_iter=10)
    assert r.status == "nan" and torch.equal(r.flat, x0)
    r = Sven(lr=1.0).solve(cl.LeastSquares(res, x0), max_iter=10, tol=1e-12)
    assert r.converged and abs(r.flat.item() - 0.9) < 1e-12
    # a singular Jacobian row (κ < 2 at a zero loss has an infinite derivative) is caught before the SVD
    params, model, loss_fn, _, X, Y, spec = make_mlp("mse", n=4, c=1)
    nan_loss = lambda o, y: (o - y).pow(2).sum(-1) * torch.where(y[:, 0] > 0, float("nan"), 1.0)  # noqa: E731
    prob = cl.SupervisedLoss(model, nan_loss, params, (X, Y))
    r = Sven().solve(prob, max_iter=3)
    assert r.status == "nan" and r.n_iter == 0


def test_options_are_checked():
    with pytest.raises(TypeError, match="unknown option"):
        Sven(rank=3)
    for bad in (
        {"k": 0},
        {"rtol": 0.0},
        {"svd": "lobpcg"},
        {"param_fraction": 1.5},
        {"rmsprop": "both"},
        {"microbatch": 0},
        {"kappa": -1.0},
    ):
        with pytest.raises(ValueError):
            Sven(**bad)
    with pytest.raises(ValueError, match="back-end"):
        truncated_pinv(torch.eye(3), 2, backend="qr")
