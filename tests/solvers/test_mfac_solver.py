"""M-FAC on the solve loop (curvlab.solvers.MFAC) and as a torch.optim optimizer (curvlab.optim.MFAC)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch.nn.functional import cross_entropy

import curvlab as cl
import curvlab.optim
from curvlab.solvers import MFAC

F64 = torch.float64


def _ce(o, t):
    return cross_entropy(o, t, reduction="none")


def _net_and_batches(seed=0, n=60, nb=4):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    X = torch.randn(n, 5, generator=g, dtype=F64)
    y = (X[:, 0] + X[:, 1] > 0).long() + (X[:, 2] > 1).long()
    batches = [(X[i::nb], y[i::nb]) for i in range(nb)]
    return net, X, y, batches


def _dense_inv(rows, lam):
    G = torch.stack(rows)
    d = G.shape[1]
    return torch.linalg.inv(lam * torch.eye(d, dtype=G.dtype) + G.T @ G / G.shape[0])


def test_mfac_step_formula_with_momentum_and_weight_decay():
    A = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]], dtype=F64)
    b = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    prob = cl.Minimize(lambda x: 0.5 * x @ A @ x - b @ x, torch.tensor([1.0, 1.0, -1.0], dtype=F64))
    lr, lam, mu, wd = 0.1, 0.3, 0.6, 0.05
    res = MFAC(lr=lr, damping=lam, momentum=mu, weight_decay=wd, ngrads=2).solve(prob, max_iter=3, tol=0.0)
    x, rows, buf = prob.x0.clone(), [], torch.zeros(3, dtype=F64)
    for _ in range(3):
        gt = A @ x - b + wd * x
        rows = (rows + [gt])[-2:]
        buf = mu * buf + (1 - mu) * _dense_inv(rows, lam) @ gt
        x = x - lr * buf
    torch.testing.assert_close(res.flat, x, rtol=0, atol=1e-12)
    assert res.state["matvecs"] == 3 and res.state["mfac"]["count"] == 2


def test_mfac_converges_on_quadratic():
    torch.manual_seed(1)
    Q = torch.linalg.qr(torch.randn(6, 6, dtype=F64))[0]
    A = Q @ torch.diag(torch.linspace(1.0, 10.0, 6, dtype=F64)) @ Q.T
    b = torch.randn(6, dtype=F64)
    prob = cl.Minimize(lambda x: 0.5 * x @ A @ x - b @ x, torch.zeros(6, dtype=F64))
    res = MFAC(lr=1.0, damping=10.0, ngrads=4).solve(prob, max_iter=1000, tol=1e-9)
    assert res.converged, res.message
    torch.testing.assert_close(res.flat, torch.linalg.solve(A, b), rtol=0, atol=1e-8)


def test_mfac_decreases_minibatch_loss():
    net, X, y, batches = _net_and_batches()
    prob = cl.SupervisedLoss(net, _ce, None, batches)
    f0 = float(prob.value(prob.x0))
    res = MFAC(lr=0.05, damping=1e-2, ngrads=16, momentum=0.5).solve(prob, max_iter=60, tol=0.0)
    assert res.status == "max_iter"
    assert float(prob.value(res.flat)) < 0.6 * f0
    assert res.history["window"][-1] == 16
    assert res.state["draws"] == 61


@pytest.mark.parametrize("copy_window", [True, False])
def test_mfac_save_resume_identical(copy_window):
    net, X, y, batches = _net_and_batches()
    prob = cl.SupervisedLoss(net, _ce, None, batches)
    solver = MFAC(lr=0.05, damping=1e-2, ngrads=5, momentum=0.3, weight_decay=1e-3, copy_window=copy_window)
    full = solver.solve(prob, max_iter=10, tol=0.0)
    half = solver.solve(prob, max_iter=4, tol=0.0)
    buf = io.BytesIO()
    torch.save(half.state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=False)
    resumed = solver.solve(prob, max_iter=10, tol=0.0, state=state)
    torch.testing.assert_close(resumed.flat, full.flat, rtol=0, atol=0)
    torch.testing.assert_close(resumed.state["mfac"]["grads"], full.state["mfac"]["grads"], rtol=0, atol=0)


def test_mfac_step_does_not_modify_state():
    net, X, y, batches = _net_and_batches()
    prob = cl.SupervisedLoss(net, _ce, None, batches)
    solver = MFAC(lr=0.05, damping=1e-2, ngrads=3)
    s0 = solver.init(prob)
    s1 = solver.step(prob, s0)
    G0 = s1["mfac"]["grads"].clone()
    solver.step(prob, s1)
    assert s0["mfac"]["count"] == 0 and bool((s0["mfac"]["grads"] == 0).all())
    torch.testing.assert_close(s1["mfac"]["grads"], G0, rtol=0, atol=0)


def test_mfac_nonfinite_stops_with_last_finite_params():
    net, X, y, batches = _net_and_batches()
    bad = (batches[2][0].clone(), batches[2][1])
    bad[0][0, 0] = float("nan")
    prob = cl.SupervisedLoss(net, _ce, None, [batches[0], batches[1], bad, batches[3]])
    res = MFAC(lr=0.05, damping=1e-2, ngrads=4).solve(prob, max_iter=10, tol=0.0)
    assert res.status == "nan" and res.n_iter == 1
    assert bool(torch.isfinite(res.flat).all())
    with pytest.raises(FloatingPointError):
        MFAC(lr=0.05, damping=1e-2, ngrads=4).solve(prob, max_iter=10, tol=0.0, raise_on_nan=True)
    # a state holding a non-finite gradient: step reports "nan" and keeps x and the window
    solver = MFAC(lr=0.05, damping=1e-2, ngrads=4)
    s = solver.init(cl.SupervisedLoss(net, _ce, None, batches))
    s_bad = {**s, "grad": torch.full_like(s["grad"], float("nan"))}
    out = solver.step(prob, s_bad)
    assert out["status"] == "nan" and out["x"] is s["x"] and out["mfac"]["count"] == 0


def test_mfac_bad_options():
    with pytest.raises(ValueError, match="lr"):
        MFAC(lr=0.0)
    with pytest.raises(ValueError, match="damping"):
        MFAC(damping=-1e-5)
    with pytest.raises(ValueError, match="ngrads"):
        MFAC(ngrads=0)
    with pytest.raises(ValueError, match="momentum"):
        MFAC(momentum=1.0)
    with pytest.raises(TypeError, match="unknown option"):
        MFAC(damp=1e-5)
    with pytest.raises(ValueError, match="ngrads"):
        curvlab.optim.MFAC(torch.nn.Linear(2, 2).parameters(), ngrads=-3)
    net, X, y, batches = _net_and_batches()
    prob = cl.SupervisedLoss(net, _ce, None, batches)
    st = MFAC(ngrads=4).init(prob)
    with pytest.raises(ValueError, match="ngrads=4"):
        MFAC(ngrads=8).step(prob, st)


# ---------------------------------------------------------------------- torch.optim adapter
def _closure(net, opt, X, y):
    def closure():
        opt.zero_grad()
        loss = _ce(net(X), y).mean()
        loss.backward()
        return loss

    return closure


def test_optim_matches_solver():
    net, X, y, _ = _net_and_batches()
    opts = dict(lr=0.05, ngrads=3, momentum=0.4, weight_decay=1e-2)
    prob = cl.SupervisedLoss(copy.deepcopy(net), _ce, None, (X, y))
    ref = MFAC(damping=1e-2, **opts).solve(prob, max_iter=5, tol=0.0)
    opt = curvlab.optim.MFAC(net.parameters(), damp=1e-2, **opts)
    closure = _closure(net, opt, X, y)
    losses = [float(opt.step(closure).detach()) for _ in range(5)]
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    torch.testing.assert_close(flat, ref.flat, rtol=0, atol=1e-10)
    assert losses[1:] == pytest.approx(ref.history["value"][:4], abs=1e-12)
    assert opt.global_state["step"] == 5


def test_optim_uses_p_grad_without_closure():
    net, X, y, _ = _net_and_batches()
    net2 = copy.deepcopy(net)
    opt = curvlab.optim.MFAC(net.parameters(), lr=0.05, ngrads=4, damp=1e-2)
    opt2 = curvlab.optim.MFAC(net2.parameters(), lr=0.05, ngrads=4, damp=1e-2)
    c2 = _closure(net2, opt2, X, y)
    for _ in range(3):
        opt.zero_grad()
        _ce(net(X), y).mean().backward()
        assert opt.step() is None
        opt2.step(c2)
    for p, q in zip(net.parameters(), net2.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_optim_state_dict_round_trip(dtype):
    net, X, y, _ = _net_and_batches()
    net = net.to(dtype)
    X = X.to(dtype)
    net_b = copy.deepcopy(net)
    opts = dict(lr=0.05, ngrads=4, damp=1e-2, momentum=0.5, weight_decay=1e-3)
    opt = curvlab.optim.MFAC(net.parameters(), **opts)
    for _ in range(6):
        opt.step(_closure(net, opt, X, y))
    opt_b = curvlab.optim.MFAC(net_b.parameters(), **opts)
    for _ in range(3):
        opt_b.step(_closure(net_b, opt_b, X, y))
    buf = io.BytesIO()
    torch.save({"model": net_b.state_dict(), "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    net_c = copy.deepcopy(net_b)
    net_c.load_state_dict(saved["model"])
    opt_c = curvlab.optim.MFAC(net_c.parameters(), **opts)
    opt_c.load_state_dict(saved["opt"])
    assert opt_c.global_state["mfac"]["gram"].dtype == F64
    assert opt_c.global_state["mfac"]["grads"].dtype == dtype
    for _ in range(3):
        opt_c.step(_closure(net_c, opt_c, X, y))
    for p, q in zip(net.parameters(), net_c.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_optim_nonfinite_grad_skips_step():
    net, X, y, _ = _net_and_batches()
    opt = curvlab.optim.MFAC(net.parameters(), lr=0.05, ngrads=4, damp=1e-2)
    opt.step(_closure(net, opt, X, y))
    before = [p.detach().clone() for p in net.parameters()]
    for p in net.parameters():
        p.grad = torch.full_like(p, float("nan"))
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    for p, q in zip(net.parameters(), before):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=0)
    assert opt.global_state["mfac"]["count"] == 1 and opt.global_state["step"] == 1
