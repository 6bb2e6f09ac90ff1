"""The module-state contract (curvlab.params): no public entry point writes into the user's module.

A train-mode model with BatchNorm, Dropout and a frozen layer goes through every operator, every
solver's ``solve``, the spectrum routines and the optim adapters; its ``state_dict()`` (buffers
included) and mode flags must come out bit-identical. The policy's numbers are checked too: the
train-mode curvature is that of the batch-statistics function (dense reference), dropout masks are
fixed per batch (Hessian products = finite differences of gradients on the same batch), and
``buffers="update"`` returns the data's BatchNorm statistics at the solution.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

import curvlab as cl
from curvlab.params import ModuleState, batch_key, rng_snapshot

D64 = torch.float64


def _net(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.25), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)
    ).to(D64)
    for p in net[0].parameters():  # a frozen layer
        p.requires_grad_(False)
    with torch.no_grad():  # buffers that differ from the defaults, so a reset would show
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
        net[1].num_batches_tracked.fill_(7)
    return net.train()


def _data(n=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4, generator=g, dtype=D64)
    y = torch.randint(0, 3, (n,), generator=g)
    return X, y


def _snapshot(net):
    return {k: v.clone() for k, v in net.state_dict().items()}, [m.training for m in net.modules()]


def _assert_untouched(net, snap):
    sd, modes = snap
    now = net.state_dict()
    assert set(now) == set(sd)
    for k, v in sd.items():
        assert torch.equal(now[k], v), k
    assert [m.training for m in net.modules()] == modes


# --------------------------------------------------------------------------- operators and spectra
def _operators(net, X, y):
    batches = [(X[:12], y[:12]), (X[12:], y[12:])]

    def f(p, b):
        return F.cross_entropy(torch.func.functional_call(net, p, (b[0],)), b[1])

    def res(p, b):
        return (torch.func.functional_call(net, p, (b[0],)) - F.one_hot(b[1], 3)).reshape(-1)

    return {
        "hessian_supervised": lambda: cl.linops.hessian(net, F.cross_entropy, data=(X, y)),
        "hessian_functional": lambda: cl.linops.hessian(f, net, data=batches),
        "hessian_forward": lambda: cl.linops.hessian(f, net, data=(X, y), mode="forward"),
        "hessian_nocache": lambda: cl.linops.hessian(f, net, data=(X, y), cache=False),
        "ggn": lambda: cl.linops.ggn(net, nn.CrossEntropyLoss(), None, batches),
        "fisher": lambda: cl.linops.fisher(net, F.cross_entropy, None, (X, y)),
        "fisher_mc": lambda: cl.linops.fisher(net, F.cross_entropy, None, batches, kind="mc"),
        "jacobian": lambda: cl.linops.jacobian(res, net, data=batches),
        "gram": lambda: cl.linops.gram(cl.linops.jacobian(res, net, data=(X, y))),
    }


OPERATORS = ["hessian_supervised", "hessian_functional", "hessian_forward", "hessian_nocache", "ggn", "fisher",
             "fisher_mc", "jacobian", "gram"]  # fmt: skip


@pytest.mark.filterwarnings("ignore:.*dropout")
@pytest.mark.parametrize("name", OPERATORS)
def test_operators_and_spectra_leave_the_module_and_rng_alone(name):
    net = _net()
    X, y = _data()
    snap = _snapshot(net)
    rng = torch.get_rng_state()
    op = _operators(net, X, y)[name]()
    n = op.shape[1]
    v = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=D64)
    a = op @ v
    b = op @ torch.stack([v, 2 * v], 1)
    torch.testing.assert_close(b[:, 0], a, rtol=1e-9, atol=1e-12)  # deterministic between products
    if name in ("hessian_supervised", "ggn", "hessian_nocache"):  # spectra go through the operators' products
        cl.spectrum.eigsh(op, k=2, seed=0)
        cl.spectrum.trace(op, budget=6, seed=0)
        cl.spectrum.diag(op, budget=6, seed=0)
        cl.spectrum.density(op, n_probes=1, n_lanczos=8, seed=0)
        cl.spectrum.summary(op, trace_budget=6, n_probes=1, n_lanczos=8, seed=0)
    elif op.shape[0] == op.shape[1]:
        cl.spectrum.eigsh(op, k=1, seed=0, maxiter=20)
    assert torch.equal(torch.get_rng_state(), rng)  # curvlab consumed none of the user's random stream
    _assert_untouched(net, snap)


# --------------------------------------------------------------------------- every solver's solve
def _solvers():
    S = cl.solvers
    return {
        "GradientDescent": (S.GradientDescent(), "supervised"),
        "Adam": (S.Adam(lr=1e-2), "stochastic"),
        "NewtonCG": (S.NewtonCG(), "supervised"),
        "SaddleFreeNewton": (S.SaddleFreeNewton(k=4), "supervised"),
        "MFAC": (S.MFAC(lr=1e-2, ngrads=4), "stochastic"),
        "EGN": (S.EGN(damping=0.1), "stochastic"),
        "Sven": (S.Sven(k=4), "stochastic"),
        "GaussNewton": (S.GaussNewton(), "least_squares"),
        "EGN_lsq": (S.EGN(damping=0.1), "least_squares"),
        "ScaledGD": (S.ScaledGD(lr=0.1), "minimize"),
    }


def _problem(kind, net, X, y):
    if kind == "supervised":
        return cl.SupervisedLoss(net, F.cross_entropy, data=(X, y))
    if kind == "stochastic":
        return cl.SupervisedLoss(
            net, lambda o, t: F.cross_entropy(o, t, reduction="none"), data=[(X[:12], y[:12]), (X[12:], y[12:])]
        )
    if kind == "least_squares":
        return cl.LeastSquares(
            lambda p, b: (torch.func.functional_call(net, p, (b[0],)) - F.one_hot(b[1], 3)).reshape(-1), net, (X, y)
        )

    def loss(p, b):
        return F.cross_entropy(torch.func.functional_call(net, p, (b[0],)), b[1])

    return cl.Minimize(loss, {"4.weight": net[4].weight}, data=(X, y), module=net)  # one factor for ScaledGD


@pytest.mark.parametrize("name", list(_solvers()))
def test_every_solve_leaves_the_module_alone_and_returns_its_buffers(name):
    net = _net()
    X, y = _data()
    snap = _snapshot(net)
    solver, kind = _solvers()[name]
    problem = _problem(kind, net, X, y)
    result = solver.solve(problem, max_iter=3)
    _assert_untouched(net, snap)
    if isinstance(result.params, nn.Module):
        out = result.params
        assert out is not net
        for k, v in snap[0].items():
            if "running" in k or "num_batches" in k or k.startswith("0."):  # buffers and the frozen layer
                assert torch.equal(out.state_dict()[k], v), k


def test_optim_adapters_with_module_update_buffers_once_per_step():
    """With module=, a step changes the buffers exactly as one forward pass at its start does."""
    X, y = _data()
    for make in (
        lambda p, m: cl.optim.EGN(p, damping=0.3, line_search=True, module=m),
        lambda p, m: cl.optim.SaddleFreeNewton(p, k=4, module=m),
        lambda p, m: cl.optim.Sven(p, k=4, module=m),
    ):
        net = _net()
        ref = copy.deepcopy(net)
        opt = make([p for p in net.parameters() if p.requires_grad], net)

        def closure(net=net, opt=opt):
            out = net(X)
            if isinstance(opt, cl.optim.EGN):
                return F.cross_entropy(out, y, reduction="none"), out
            if isinstance(opt, cl.optim.Sven):
                return F.cross_entropy(out, y, reduction="none")
            return F.cross_entropy(out, y)

        torch.manual_seed(3)
        opt.step(closure)
        torch.manual_seed(3)
        ref(X)
        for k, v in ref.state_dict().items():
            if "running" in k or "num_batches" in k or k.startswith("0."):
                assert torch.equal(net.state_dict()[k], v), (type(opt).__name__, k)


# --------------------------------------------------------------------------- the policy's numbers
def test_train_mode_batchnorm_curvature_is_that_of_batch_statistics():
    """Dense reference: the Hessian of the train-mode function (BatchNorm on batch statistics)."""
    net = _net()
    net[3].p = 0.0  # no dropout: a deterministic reference
    X, y = _data(n=10)
    H = cl.linops.hessian(net, F.cross_entropy, data=(X, y))
    names = [k for k, p in net.named_parameters() if p.requires_grad]
    bufs = {k: b.clone() for k, b in net.named_buffers()}

    def f(flat):
        p = H.spec.unflatten(flat)
        return F.cross_entropy(
            torch.func.functional_call(net, {**p, **{k: v.clone() for k, v in bufs.items()}}, (X,)), y
        )

    dense = torch.func.hessian(f)(H.x)
    torch.testing.assert_close(H.to_dense(), dense, rtol=1e-9, atol=1e-11)
    assert names == list(H.spec.keys)
    # eval mode: the running statistics of the snapshot, as constants
    net.eval()
    He = cl.linops.hessian(net, F.cross_entropy, data=(X, y))
    torch.testing.assert_close(He.to_dense(), torch.func.hessian(f)(He.x), rtol=1e-9, atol=1e-11)
    assert not torch.allclose(He.to_dense(), H.to_dense())


def test_dropout_masks_are_fixed_per_batch_and_match_the_gradients():
    """Problem.hessian on a drawn batch = finite differences of Problem.value_and_grad on that batch."""
    net = _net()
    X, y = _data()
    p = cl.SupervisedLoss(net, F.cross_entropy, data=[(X[:12], y[:12]), (X[12:], y[12:])])
    b = p.draw(5)
    x = p.x0
    v = torch.randn(x.numel(), generator=torch.Generator().manual_seed(2), dtype=D64)
    g1, g2 = p.value_and_grad(x, b)[1], p.value_and_grad(x, b)[1]
    assert torch.equal(g1, g2)
    eps = 1e-5
    fd = (p.value_and_grad(x + eps * v, b)[1] - p.value_and_grad(x - eps * v, b)[1]) / (2 * eps)
    torch.testing.assert_close(p.hessian(x, b) @ v, fd, rtol=1e-6, atol=1e-8)
    # the next draw has new masks: different gradient on the same samples (draw 7 is batch 1 again)
    assert p.draw(7) is b and not torch.equal(p.value_and_grad(x, p.draw(7))[1], g1)


def test_buffers_update_returns_the_data_statistics_at_the_solution():
    net = _net()
    net[3].p = 0.0
    X, y = _data()
    batches = [(X[:12], y[:12]), (X[12:], y[12:])]
    snap = _snapshot(net)
    r = cl.solvers.NewtonCG().solve(cl.SupervisedLoss(net, F.cross_entropy, data=batches, buffers="update"), max_iter=2)
    _assert_untouched(net, snap)
    out = r.params
    with torch.no_grad():
        h = [out[0](xb) for xb, _ in batches]  # pre-BatchNorm activations at the solution
    mean = torch.stack([t.mean(0) for t in h]).mean(0)
    var = torch.stack([t.var(0, unbiased=True) for t in h]).mean(0)
    torch.testing.assert_close(out[1].running_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[1].running_var, var, rtol=1e-12, atol=1e-12)
    assert int(out[1].num_batches_tracked) == 2
    with pytest.raises(ValueError, match="buffers"):
        cl.SupervisedLoss(net, F.cross_entropy, data=batches, buffers="refresh")
    with pytest.raises(ValueError, match="nn.Module"):
        cl.Minimize(lambda w: (w**2).sum(), torch.ones(2), buffers="update")


# --------------------------------------------------------------------------- ModuleState itself
def test_module_state_scope_rng_and_tied_buffers():
    bn = nn.BatchNorm1d(3).to(D64)
    holder = nn.Module()
    holder.a, holder.b = bn, bn  # a shared submodule: one buffer under two names
    st = ModuleState(holder)
    before = _snapshot(holder)
    x = torch.randn(5, 3, dtype=D64)
    with st.scope(key=1):
        holder.a(x)
        holder.b(x)
        r1 = torch.rand(2)
    with st.scope(key=1):
        r2 = torch.rand(2)
    with st.scope(key=batch_key(0)):
        r3 = torch.rand(2)
    _assert_untouched(holder, before)
    assert torch.equal(r1, r2) and not torch.equal(r1, r3)
    snap = rng_snapshot()
    a = torch.rand(3)
    with st.scope(rng=snap):
        b = torch.rand(3)
    assert torch.equal(a, b) and not torch.equal(torch.rand(3), a)
    with pytest.raises(TypeError, match="module"):
        ModuleState(3)
    with pytest.raises(TypeError, match="seed"):
        ModuleState(None, seed=1.5)
    assert ModuleState(None, seed=4).seed == 4
