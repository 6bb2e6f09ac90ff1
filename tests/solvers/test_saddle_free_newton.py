"""Saddle-free Newton: dense references, escaping a saddle, low-rank Woodbury, torch.optim adapter."""

from __future__ import annotations

import pytest
import torch

import curvlab as cl
from curvlab.solvers.saddle_free_newton import abs_solve, woodbury_abs_solve

D = torch.float64


def _quartic(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=D)
    A = A + A.T  # indefinite
    b = torch.randn(n, generator=g, dtype=D)
    x0 = torch.randn(n, generator=g, dtype=D)
    return (lambda z: 0.5 * z @ A @ z + b @ z + (z**4).sum() / 10), x0


def _dense_sfn(f, x, lam):
    H, g = torch.func.hessian(f)(x), torch.func.grad(f)(x)
    w, Q = torch.linalg.eigh(H)
    assert bool((w < 0).any())  # the test point is not convex
    return -Q @ ((Q.T @ g) / (w.abs() + lam))


@pytest.mark.parametrize("lam", [0.0, 0.1])
def test_krylov_step_with_k_equal_n_is_dense(lam):
    f, x0 = _quartic()
    p = cl.Minimize(f, x0)
    s = cl.solvers.SaddleFreeNewton(k=6, damping=lam, line_search=False)
    st = s.step(p, s.init(p))
    torch.testing.assert_close(st["x"] - x0, _dense_sfn(f, x0, lam), rtol=1e-9, atol=1e-11)


def test_krylov_damping_search_picks_lowest_loss():
    f, x0 = _quartic(seed=1)
    grid = (1e-3, 1e-1, 1.0, 10.0)
    p = cl.Minimize(f, x0)
    st = cl.solvers.SaddleFreeNewton(k=6, damping=grid, line_search=False).step(
        p, cl.solvers.SaddleFreeNewton().init(p)
    )
    vals = [float(f(x0 + _dense_sfn(f, x0, lam))) for lam in grid]
    assert st["log"]["damping"] == grid[vals.index(min(vals))]
    torch.testing.assert_close(st["value"], torch.tensor(min(vals), dtype=D))


def test_lowrank_woodbury_equals_dense():
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(9, 4, generator=g, dtype=D))[0]
    lam = torch.tensor([3.0, -2.0, 0.5, -1e-3], dtype=D)
    v = torch.randn(9, generator=g, dtype=D)
    dense = U @ torch.diag(lam.abs()) @ U.T + 0.01 * torch.eye(9, dtype=D)
    torch.testing.assert_close(woodbury_abs_solve(U, lam, v, 0.01), torch.linalg.solve(dense, v))
    # and the subspace solve with a full orthogonal basis
    H = U @ torch.diag(lam) @ U.T
    w, Q = torch.linalg.eigh(H)
    V = torch.linalg.qr(torch.randn(9, 9, generator=g, dtype=D))[0]
    th, S = torch.linalg.eigh(V.T @ H @ V)
    torch.testing.assert_close(abs_solve(V, th, S, v, 0.5), Q @ ((Q.T @ v) / (w.abs() + 0.5)))


def test_lowrank_step_full_rank_is_dense():
    f, x0 = _quartic()
    p = cl.Minimize(f, x0)
    s = cl.solvers.SaddleFreeNewton(method="lowrank", k=6, damping=0.05, line_search=False)
    st = s.step(p, s.init(p))
    torch.testing.assert_close(st["x"] - x0, _dense_sfn(f, x0, 0.05), rtol=1e-8, atol=1e-10)


def _saddle_fn(z):
    return z[0] ** 2 - z[1] ** 2 + z[1] ** 4 / 4  # strict saddle at 0; minima (0, ±√2), f = -1


@pytest.mark.parametrize("method", ["krylov", "lowrank"])
def test_escapes_saddle_where_newton_converges_to_it(method):
    x0 = torch.tensor([1.0, 1e-4], dtype=D)
    # Newton's method: x ← x − H⁻¹g (dense) goes to the saddle
    x = x0.clone()
    for _ in range(30):
        x = x - torch.linalg.solve(torch.func.hessian(_saddle_fn)(x), torch.func.grad(_saddle_fn)(x))
    assert float(x.norm()) < 1e-10
    res = cl.solvers.SaddleFreeNewton(method=method, k=2).solve(cl.Minimize(_saddle_fn, x0), max_iter=100, tol=1e-10)
    assert res.converged
    torch.testing.assert_close(res.params.abs(), torch.tensor([0.0, 2**0.5], dtype=D), atol=1e-8, rtol=0)
    assert res.value < -1 + 1e-12


def test_inner_steps_and_lanczos_eig_run():
    f, x0 = _quartic(n=8, seed=2)
    for s in (
        cl.solvers.SaddleFreeNewton(k=4, inner_steps=3),
        cl.solvers.SaddleFreeNewton(method="lowrank", k=4, eig="lanczos", refresh=2),
    ):
        res = s.solve(cl.Minimize(f, x0), max_iter=30, tol=1e-8)
        assert res.value < float(f(x0))
        assert all(b["value"] <= a["value"] + 1e-12 for a, b in zip(res.history, list(res.history)[1:]))


def test_state_save_resume(tmp_path):
    f, x0 = _quartic(n=8, seed=3)
    for s in (cl.solvers.SaddleFreeNewton(k=4), cl.solvers.SaddleFreeNewton(method="lowrank", k=3, refresh=3)):
        full = s.solve(cl.Minimize(f, x0), max_iter=6, tol=0.0)
        half = s.solve(cl.Minimize(f, x0), max_iter=3, tol=0.0)
        torch.save(half.state, tmp_path / "s.pt")
        resumed = s.solve(
            cl.Minimize(f, x0), max_iter=6, tol=0.0, state=torch.load(tmp_path / "s.pt", weights_only=False)
        )
        torch.testing.assert_close(resumed.flat, full.flat)


def test_bad_inputs():
    with pytest.raises(ValueError, match="method"):
        cl.solvers.SaddleFreeNewton(method="newton")
    with pytest.raises(ValueError, match="k must"):
        cl.solvers.SaddleFreeNewton(k=0)
    with pytest.raises(ValueError, match="damping"):
        cl.solvers.SaddleFreeNewton(damping=-1.0)
    with pytest.raises(ValueError, match="lowrank"):
        cl.solvers.SaddleFreeNewton(method="lowrank", damping=(0.1, 1.0))
    with pytest.raises(ValueError, match="eig"):
        cl.solvers.SaddleFreeNewton(eig="svd")
    with pytest.raises(TypeError, match="unknown option"):
        cl.solvers.SaddleFreeNewton(rank=3)
    with pytest.raises(ValueError, match="closure"):
        cl.optim.SaddleFreeNewton([torch.zeros(2, requires_grad=True)]).step()
    w = torch.zeros(2, requires_grad=True)
    with pytest.raises(TypeError, match="scalar loss"):
        cl.optim.SaddleFreeNewton([w]).step(lambda: w * 2)


def _net_closure(seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    X, Y = torch.randn(20, 3, generator=g, dtype=D), torch.randn(20, 2, generator=g, dtype=D)
    return net, X, Y, (lambda: torch.nn.functional.mse_loss(net(X), Y))


@pytest.mark.parametrize("method", ["krylov", "lowrank"])
def test_optim_matches_solver(method):
    net, X, Y, closure = _net_closure()
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    prob = cl.Minimize(lambda p: torch.nn.functional.mse_loss(torch.func.functional_call(net, p, (X,)), Y), params)
    opt = cl.optim.SaddleFreeNewton(net.parameters(), method=method, k=5)
    s = cl.solvers.SaddleFreeNewton(method=method, k=5)
    st = s.init(prob)
    for _ in range(3):
        loss = opt.step(closure)
        torch.testing.assert_close(loss, st["value"])
        st = s.step(prob, st)
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    torch.testing.assert_close(flat, st["x"], rtol=1e-8, atol=1e-10)


def test_optim_state_dict_round_trip():
    net, _, _, closure = _net_closure(1)
    opt = cl.optim.SaddleFreeNewton(net.parameters(), method="lowrank", k=4, refresh=3)
    for _ in range(2):
        opt.step(closure)
    sd = opt.state_dict()
    net2, _, _, closure2 = _net_closure(1)
    net2.load_state_dict(net.state_dict())
    opt2 = cl.optim.SaddleFreeNewton(net2.parameters(), method="lowrank", k=4, refresh=3)
    opt2.load_state_dict(sd)
    st1, st2 = opt.global_state, opt2.global_state
    assert st2["step"] == 2 and st2["since_refresh"] == st1["since_refresh"]
    torch.testing.assert_close(st2["U"], st1["U"])
    for _ in range(3):
        opt.step(closure)
        opt2.step(closure2)
    for a, b in zip(net.parameters(), net2.parameters()):
        torch.testing.assert_close(a, b)
    assert opt.options == opt2.options
