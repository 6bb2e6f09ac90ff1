"""Acceptance tests of the torch.optim adapters (curvlab.optim.EGN / Sven / MFAC / SaddleFreeNewton).

Used the way a user keeps their own training loop: a small nn.Module, mini-batches, param groups,
``state_dict`` saved with ``torch.save`` to a file and loaded into a fresh model and optimizer.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.functional import cross_entropy

import curvlab

D64 = torch.float64


def _data(n=30, seed=0, dtype=D64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=g, dtype=dtype)
    y = (X[:, 0] - 0.5 * X[:, 1] > 0).long() + (X[:, 2] > 0.8).long()  # 3 classes
    return X, y


def _net(dtype=D64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def _closure(kind, opt, net, Xb, yb):
    """The closure each adapter documents."""
    kind = kind.split("_")[0]
    if kind == "EGN":

        def closure():
            out = net(Xb)
            return cross_entropy(out, yb, reduction="none"), out

    elif kind == "Sven":

        def closure():
            return cross_entropy(net(Xb), yb, reduction="none")

    elif kind == "SaddleFreeNewton":

        def closure():
            return cross_entropy(net(Xb), yb)

    else:  # MFAC: the plain torch.optim convention

        def closure():
            opt.zero_grad()
            loss = cross_entropy(net(Xb), yb)
            loss.backward()
            return loss

    return closure


OPTS = {
    "EGN": lambda p: curvlab.optim.EGN(p, damping=0.3, line_search=True, adaptive_damping=True, momentum=0.2),
    "Sven": lambda p: curvlab.optim.Sven(p, lr=0.3, k=6),
    "Sven_rmsprop": lambda p: curvlab.optim.Sven(p, lr=0.05, k=6, rmsprop="post", param_fraction=0.7),
    "MFAC": lambda p: curvlab.optim.MFAC(p, lr=0.05, ngrads=4, damping=0.1, momentum=0.5, weight_decay=1e-4),
    "SaddleFreeNewton": lambda p: curvlab.optim.SaddleFreeNewton(p, method="lowrank", k=5, refresh=2, damping=0.1),
}


def _full_loss(net, X, y):
    with torch.no_grad():
        return float(cross_entropy(net(X), y))


def _run(kind, net, opt, X, y, steps, start=0, bs=8):
    for i in range(start, start + steps):
        j = (i * bs) % (len(X) - bs + 1)
        opt.step(_closure(kind, opt, net, X[j : j + bs], y[j : j + bs]))


@pytest.mark.parametrize("kind", list(OPTS))
def test_trains_a_module_in_a_standard_loop(kind):
    X, y = _data()
    net = _net()
    opt = OPTS[kind](net.parameters())
    assert isinstance(opt, torch.optim.Optimizer)
    before = _full_loss(net, X, y)
    _run(kind, net, opt, X, y, 25)
    after = _full_loss(net, X, y)
    assert after < 0.8 * before
    assert all(torch.isfinite(p).all() for p in net.parameters())


@pytest.mark.parametrize("kind", list(OPTS))
def test_param_groups_equal_one_group(kind):
    X, y = _data()
    a, b = _net(), _net()
    opt_a = OPTS[kind](a.parameters())
    opt_b = OPTS[kind]([{"params": b[0].parameters()}, {"params": b[2].parameters()}])
    _run(kind, a, opt_a, X, y, 5)
    _run(kind, b, opt_b, X, y, 5)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", list(OPTS))
def test_state_dict_round_trip_through_a_file(kind, tmp_path):
    X, y = _data()
    net = _net()
    opt = OPTS[kind](net.parameters())
    _run(kind, net, opt, X, y, 4)
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    ref_net = copy.deepcopy(net)
    ref_opt = OPTS[kind](ref_net.parameters())
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    _run(kind, net, opt, X, y, 5, start=4)  # uninterrupted

    ckpt = torch.load(tmp_path / "ckpt.pt")  # default weights_only=True must work
    net2 = _net(seed=123)
    net2.load_state_dict(ckpt["model"])
    opt2 = OPTS[kind](net2.parameters())
    opt2.load_state_dict(ckpt["opt"])
    _run(kind, net2, opt2, X, y, 5, start=4)
    for p, q in zip(net.parameters(), net2.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", list(OPTS))
def test_float32_module(kind):
    if kind == "Sven_rmsprop":
        pytest.skip("RMSProp-scaled steps (no bias correction) are not monotone; covered in float64")
    X, y = _data(dtype=torch.float32)
    net = _net(torch.float32)
    opt = OPTS[kind](net.parameters())
    before = _full_loss(net, X, y)
    _run(kind, net, opt, X, y, 10)
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert _full_loss(net, X, y) < before


@pytest.mark.parametrize("kind", list(OPTS))
def test_unknown_option_and_invalid_values(kind):
    kind = kind.split("_")[0]
    cls = getattr(curvlab.optim, kind)
    net = _net()
    with pytest.raises(TypeError, match="learning_rate"):
        cls(net.parameters(), learning_rate=0.1)
    with pytest.raises(ValueError, match="lr"):
        cls(net.parameters(), lr=-1.0)
    if kind != "Sven":
        with pytest.raises(ValueError, match="damp"):
            cls(net.parameters(), damping=-1.0)
    if kind in ("Sven", "SaddleFreeNewton"):
        with pytest.raises(ValueError, match="k"):
            cls(net.parameters(), k=0)


@pytest.mark.parametrize("kind", list(OPTS))
def test_param_groups_with_different_hyperparameters_are_rejected(kind):
    net = _net()
    cls = getattr(curvlab.optim, kind.split("_")[0])
    with pytest.raises(ValueError, match="lr"):
        cls([{"params": net[0].parameters(), "lr": 0.5}, {"params": net[2].parameters()}], lr=0.1)


def test_egn_adapter_step_equals_dense_formula():
    """One EGN adapter step with lr=1: -(JᵀQJ + bλI)⁻¹Jᵀ∇_fℓ with Q the exact softmax Hessian blocks."""
    X, y = _data(n=7)
    net = _net()
    lam = 0.2
    x0 = torch.nn.utils.parameters_to_vector(net.parameters()).detach()
    names = [k for k, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]

    def out(z):
        parts = torch.split(z, [s.numel() for s in shapes])
        return torch.func.functional_call(net, {n: p.view(s) for n, p, s in zip(names, parts, shapes)}, (X,))

    J = torch.func.jacrev(lambda z: out(z).reshape(-1))(x0)
    p = torch.softmax(out(x0).detach(), 1)
    g = (p - torch.nn.functional.one_hot(y, 3).to(D64)).reshape(-1)
    Q = torch.block_diag(*[torch.diag(pi) - torch.outer(pi, pi) for pi in p])
    d = -torch.linalg.solve(J.T @ Q @ J + 7 * lam * torch.eye(x0.numel(), dtype=D64), J.T @ g)
    opt = curvlab.optim.EGN(net.parameters(), lr=1.0, damping=lam)
    opt.step(_closure("EGN", opt, net, X, y))
    torch.testing.assert_close(torch.nn.utils.parameters_to_vector(net.parameters()).detach() - x0, d,
                               rtol=1e-9, atol=1e-11)  # fmt: skip


def test_mfac_adapter_equals_solver_on_same_gradients():
    """The adapter and curvlab.solvers.MFAC take the same steps on a deterministic problem."""
    X, y = _data(n=12)
    net = _net()
    prob = curvlab.SupervisedLoss(copy.deepcopy(net), lambda o, t: cross_entropy(o, t, reduction="none"), data=(X, y))
    res = curvlab.solvers.MFAC(lr=0.05, ngrads=3, damping=0.1, momentum=0.5).solve(prob, max_iter=6, tol=0.0)
    opt = curvlab.optim.MFAC(net.parameters(), lr=0.05, ngrads=3, damping=0.1, momentum=0.5)
    for _ in range(6):
        opt.step(_closure("MFAC", opt, net, X, y))
    torch.testing.assert_close(torch.nn.utils.parameters_to_vector(net.parameters()).detach(), res.flat,
                               rtol=1e-9, atol=1e-11)  # fmt: skip


# --------------------------------------------------------------------------- options = solver fields
@pytest.mark.parametrize("kind", ["EGN", "Sven", "MFAC", "SaddleFreeNewton"])
def test_adapter_options_are_the_solver_fields(kind):
    """The adapter's options are generated from its solver's dataclass fields: names, order, defaults."""
    import dataclasses
    import inspect

    from curvlab.optim._base import adapter_options

    cls = getattr(curvlab.optim, kind)
    solver = getattr(curvlab.solvers, kind)
    skip = set(cls.excluded) | set(cls.fixed)
    fields = [(f.name, f.default) for f in dataclasses.fields(solver) if f.name not in skip]
    assert adapter_options(cls) == fields
    sig = inspect.signature(cls)
    assert [n for n in sig.parameters][1 : 1 + len(fields)] == [n for n, _ in fields]
    assert {"distributed", "module"} <= set(sig.parameters)
    opt = cls(_net().parameters())
    assert opt.options == dict(fields)
    for name, _ in fields:  # every field is documented in the adapter's docstring
        assert f"``{name}=" in cls.__doc__


def test_egn_and_sven_take_the_jacobian_option():
    net = _net()
    assert curvlab.optim.EGN(net.parameters(), jacobian="rows").options["jacobian"] == "rows"
    for cls in (curvlab.optim.EGN, curvlab.optim.Sven):
        with pytest.raises(ValueError, match="per_sample"):
            cls(net.parameters(), jacobian="per_sample")
        with pytest.raises(ValueError, match="jacobian"):
            cls(net.parameters(), jacobian="sideways")


def test_mfac_damp_is_a_deprecated_alias(tmp_path):
    X, y = _data()
    a, b = _net(), _net()
    with pytest.warns(DeprecationWarning, match="damp"):
        old = curvlab.optim.MFAC(a.parameters(), lr=0.05, ngrads=4, damp=0.1)
    new = curvlab.optim.MFAC(b.parameters(), lr=0.05, ngrads=4, damping=0.1)
    assert old.options == new.options and old.options["damping"] == 0.1
    _run("MFAC", a, old, X, y, 3)
    _run("MFAC", b, new, X, y, 3)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(TypeError, match="both"), pytest.warns(DeprecationWarning):
        curvlab.optim.MFAC(a.parameters(), damp=0.1, damping=0.1)
    # a state dict saved by the old adapter (param groups carrying "damp") loads into the new one
    sd = old.state_dict()
    sd["param_groups"][0]["damp"] = sd["param_groups"][0].pop("damping")
    fresh = curvlab.optim.MFAC(_net().parameters(), lr=0.05, ngrads=4, damping=0.5)
    fresh.load_state_dict(sd)
    assert fresh.options["damping"] == 0.1


# --------------------------------------------------------------------------- trial points: RNG and buffers
def _bn_dropout_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 3)).to(D64)


@pytest.mark.parametrize("kind", ["EGN", "SaddleFreeNewton"])
def test_trial_points_see_the_steps_masks_and_buffers(kind):
    """Line-search trials replay the first call's dropout masks; with module= they leave BatchNorm alone."""
    X, y = _data(n=24)
    net = _bn_dropout_net()
    make = {
        "EGN": lambda p, **kw: curvlab.optim.EGN(p, damping=0.3, line_search=True, **kw),
        "SaddleFreeNewton": lambda p, **kw: curvlab.optim.SaddleFreeNewton(p, k=4, **kw),
    }[kind]
    opt = make(net.parameters(), module=net)
    masks = []
    hook = net[3].register_forward_hook(lambda m, i, o: masks.append((o == 0) & (i[0] != 0)))
    calls = []

    def closure():
        calls.append(int(net[1].num_batches_tracked))
        out = net(X)
        if kind == "EGN":
            return cross_entropy(out, y, reduction="none"), out
        return cross_entropy(out, y)

    torch.manual_seed(7)
    opt.step(closure)
    hook.remove()
    assert len(masks) >= 2  # the first call and at least one trial
    assert all(torch.equal(m, masks[0]) for m in masks)  # the same dropout masks at every trial point
    assert int(net[1].num_batches_tracked) == 1  # BatchNorm updated once: by the step's first call
    assert calls == [0] * len(calls)  # every trial saw the buffers of the step's start
    # the user's random stream advanced as by one forward pass; without module= the trials still
    # share the masks but update BatchNorm (documented)
    net2 = _bn_dropout_net()
    ref = copy.deepcopy(net2)
    opt2 = make(net2.parameters())

    def closure2():
        out = net2(X)
        return (cross_entropy(out, y, reduction="none"), out) if kind == "EGN" else cross_entropy(out, y)

    torch.manual_seed(7)
    ref(X)
    after_one = torch.rand(3)
    torch.manual_seed(7)
    opt2.step(closure2)
    assert torch.equal(torch.rand(3), after_one)
    assert int(net2[1].num_batches_tracked) >= 2


def test_adapter_state_dict_round_trip_with_module_option(tmp_path):
    X, y = _data()
    net = _bn_dropout_net()
    opt = curvlab.optim.EGN(net.parameters(), damping=0.3, line_search=True, module=net)
    _run("EGN", net, opt, X, y, 3)
    ref_net = copy.deepcopy(net)
    ref_opt = curvlab.optim.EGN(ref_net.parameters(), damping=0.3, line_search=True, module=ref_net)
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    torch.manual_seed(3)
    _run("EGN", net, opt, X, y, 3, start=3)
    torch.manual_seed(3)
    _run("EGN", ref_net, ref_opt, X, y, 3, start=3)
    for p, q in zip(net.state_dict().values(), ref_net.state_dict().values()):
        assert torch.equal(p, q)
