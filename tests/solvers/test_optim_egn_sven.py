"""torch.optim adapters curvlab.optim.EGN / curvlab.optim.Sven: same numbers as the solvers, state_dict round trip."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch.nn.functional import cross_entropy

import curvlab as cl
import curvlab.optim
from curvlab.solvers import egn, sven


def _net_and_data(seed=0, classes=3):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, classes)).double()
    X = torch.randn(20, 4, dtype=torch.float64)
    y = torch.randint(0, classes, (20,))
    return net, X, y


def _ce(o, t):
    return cross_entropy(o, t, reduction="none")


@pytest.mark.parametrize(
    "opts",
    [  # the adapter is for mini-batches (the paper's defaults); the solver's deterministic defaults differ
        {"damping": 0.3, "adaptive_damping": False},
        {"damping": 0.3, "line_search": True, "adaptive_damping": True, "momentum": 0.4, "lr": 2.0}
        | {"damping_increase": 1.01, "damping_decrease": 0.99},
    ],
)
def test_egn_adapter_matches_solver(opts):
    net, X, y = _net_and_data()
    prob = cl.SupervisedLoss(copy.deepcopy(net), _ce, None, (X, y))
    ref = egn.EGN(**opts).solve(prob, max_iter=4, tol=0.0)
    opt = curvlab.optim.EGN(net.parameters(), **opts)

    def closure():
        out = net(X)
        return _ce(out, y), out

    losses = [float(opt.step(closure)) for _ in range(4)]
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    torch.testing.assert_close(flat, ref.flat, rtol=0, atol=1e-10)
    assert losses[1:] == pytest.approx(ref.history["value"][:3], abs=1e-12)
    assert opt.global_state["damping"] == pytest.approx(ref.state["damping"])


@pytest.mark.parametrize(
    "opts",
    [
        {"svd": "exact", "k": 8},
        {"svd": "gram", "rmsprop": "pre", "microbatch": 2},
        {"lr": 0.01, "rmsprop": "post", "rmsprop_momentum": 0.5, "kappa": 1.0},
    ],
)
def test_sven_adapter_matches_solver(opts):
    net, X, y = _net_and_data()
    prob = cl.SupervisedLoss(copy.deepcopy(net), _ce, None, (X, y))
    ref = sven.Sven(**opts).solve(prob, max_iter=3, tol=0.0)
    opt = curvlab.optim.Sven(net.parameters(), **opts)
    for _ in range(3):
        opt.step(lambda: _ce(net(X), y))
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    torch.testing.assert_close(flat, ref.flat, rtol=0, atol=1e-9)
    assert opt.global_state["log"]["rank"] == ref.history["rank"][-1]


@pytest.mark.parametrize("kind", ["egn", "sven"])
def test_state_dict_round_trip(kind):
    net, X, y = _net_and_data(1)
    batches = [(X[:10], y[:10]), (X[10:], y[10:])]

    def make(model):
        if kind == "egn":
            return curvlab.optim.EGN(
                model.parameters(), damping=0.2, line_search=True, adaptive_damping=True, momentum=0.5
            )
        return curvlab.optim.Sven(
            model.parameters(), lr=0.05, rmsprop="post", rmsprop_momentum=0.5, param_fraction=0.5, svd="randomized", k=3
        )

    def closure_for(model, b):
        def closure():
            out = model(b[0])
            return (_ce(out, b[1]), out) if kind == "egn" else _ce(out, b[1])

        return closure

    opt = make(net)
    for i in range(3):
        opt.step(closure_for(net, batches[i % 2]))
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    net2 = copy.deepcopy(net)
    net2.load_state_dict(saved["model"])
    opt2 = make(net2)
    opt2.load_state_dict(saved["opt"])
    for i in range(3, 6):
        opt.step(closure_for(net, batches[i % 2]))
        opt2.step(closure_for(net2, batches[i % 2]))
    for p, q in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p, q)
    assert opt2.global_state["step"] == 6


def test_closure_errors_and_param_groups():
    net, X, y = _net_and_data()
    opt = curvlab.optim.EGN(net.parameters())
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    with pytest.raises(TypeError, match="per_sample_losses, outputs"):
        opt.step(lambda: _ce(net(X), y))
    with pytest.raises(ValueError, match="per-sample losses"):
        opt.step(lambda: (_ce(net(X), y).mean(), net(X)))
    with pytest.raises(ValueError, match="per-sample losses"):
        curvlab.optim.Sven(net.parameters()).step(lambda: _ce(net(X), y).mean())
    groups = [{"params": list(net[0].parameters()), "lr": 0.5}, {"params": list(net[2].parameters())}]
    with pytest.raises(ValueError, match="param groups"):
        curvlab.optim.Sven(groups)
    opt = curvlab.optim.Sven([{"params": list(net[0].parameters())}, {"params": list(net[2].parameters())}], k=4)
    before = [p.detach().clone() for p in net.parameters()]
    opt.step(lambda: _ce(net(X), y))
    assert all(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    with pytest.raises(ValueError):
        curvlab.optim.EGN(net.parameters(), momentum=1.0)


def test_non_finite_skips_the_step():
    net, X, y = _net_and_data()
    opt = curvlab.optim.Sven(net.parameters())
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step(lambda: _ce(net(X), y) * float("nan"))
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_float32_training_loop_reduces_the_loss():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    X = torch.linspace(-1, 1, 64)[:, None]
    Y = torch.exp(-10 * X**2) * torch.sin(2 * X)
    opt = curvlab.optim.Sven(net.parameters(), lr=0.1, k=32)
    first = float(opt.step(lambda: ((net(X) - Y) ** 2).sum(-1)))
    for _ in range(40):
        last = float(opt.step(lambda: ((net(X) - Y) ** 2).sum(-1)))
    assert last < 0.3 * first and net[0].weight.dtype == torch.float32
