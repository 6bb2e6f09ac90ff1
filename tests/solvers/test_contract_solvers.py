"""Acceptance tests of the solvers of issues 4 and 5 through the public API, with independent references.

Everything here goes through ``curvlab.solve`` / ``solver.solve`` / ``solver.init`` + ``solver.step`` the
way a user would, on problems written for these tests (not the ones the solvers were developed on).
References: ``scipy.optimize.least_squares(method="lm")`` (MINPACK), dense ``torch.func`` Jacobians /
Hessians with ``torch.linalg`` (pinv, svd, eigh, solve).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.optimize
import torch
from torch import nn
from torch.nn.functional import cross_entropy
from torch.utils.data import DataLoader, TensorDataset

import curvlab as cl
from curvlab.linops import MFACInverse
from curvlab.solvers import (
    EGN,
    MFAC,
    Adam,
    GaussNewton,
    GradientDescent,
    NewtonCG,
    SaddleFreeNewton,
    ScaledGD,
    Sven,
)

D64 = torch.float64


# --------------------------------------------------------------------------- problems
def _exp_data(n=40, dtype=D64, seed=3):
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 4, n, dtype=dtype)
    y = 2.5 * torch.exp(-1.3 * t) + 0.4 + 0.01 * torch.randn(n, generator=g, dtype=dtype)
    return t, y


def _exp_model(p, t):
    """y = a·exp(-b t) + c for params given as a tensor, tuple, dict or a module's {name: tensor} dict."""
    if isinstance(p, torch.Tensor):
        a, b, c = p[0], p[1], p[2]
    elif isinstance(p, dict) and "a" in p:
        a, b, c = p["a"], p["b"], p["c"]
    elif isinstance(p, dict):  # nn.Module: functional_call-style dict
        w = p["w"]
        a, b, c = w[0], w[1], w[2]
    else:
        a, b, c = p
    return a * torch.exp(-b * t) + c


class _Exp(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w)


def _start(kind, dtype):
    v = torch.tensor([1.0, 0.5, 0.0], dtype=dtype)
    if kind == "tensor":
        return v.clone()
    if kind == "tuple":
        return tuple(t.clone() for t in v)
    if kind == "dict":
        return {"a": v[0].clone(), "b": v[1].clone(), "c": v[2].clone()}
    return _Exp(v.clone())


def _exp_ls(kind="tensor", dtype=D64, data="batch"):
    t, y = _exp_data(dtype=dtype)

    def res(p, batch):
        tb, yb = batch
        return _exp_model(p, tb) - yb

    if data == "batch":
        d = (t, y)
    elif data == "list":
        d = [(t[i : i + 9], y[i : i + 9]) for i in range(0, len(t), 9)]  # 9 does not divide 40
    else:
        d = DataLoader(TensorDataset(t, y), batch_size=9, shuffle=False)
    return cl.LeastSquares(res, _start(kind, dtype), d)


def _exp_min(kind="tensor", dtype=D64, data="batch"):
    t, y = _exp_data(dtype=dtype)

    def loss(p, batch):
        tb, yb = batch
        return 0.5 * ((_exp_model(p, tb) - yb) ** 2).mean()

    d = (t, y) if data == "batch" else [(t[i : i + 9], y[i : i + 9]) for i in range(0, len(t), 9)]
    return cl.Minimize(loss, _start(kind, dtype), d)


def _net(dtype=D64, c=5, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, c)).to(dtype)


def _cls_data(n=23, c=5, dtype=D64, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4, generator=g, dtype=dtype)
    y = torch.randint(0, c, (n,), generator=g)
    return X, y


def _ce(o, y):
    return cross_entropy(o, y, reduction="none")


def _supervised(dtype=D64, data="batch", bs=7):
    X, y = _cls_data(dtype=dtype)
    if data == "batch":
        d = (X, y)
    elif data == "list":
        d = [(X[i : i + bs], y[i : i + bs]) for i in range(0, len(X), bs)]
    else:
        d = DataLoader(TensorDataset(X, y), batch_size=bs, shuffle=False)
    return cl.SupervisedLoss(_net(dtype), _ce, data=d)


def _check_structure(kind, params, dtype):
    if kind == "tensor":
        assert isinstance(params, torch.Tensor) and params.shape == (3,) and params.dtype == dtype
    elif kind == "tuple":
        assert isinstance(params, tuple) and len(params) == 3
        assert all(t.shape == () and t.dtype == dtype for t in params)
    elif kind == "dict":
        assert isinstance(params, dict) and list(params) == ["a", "b", "c"]
        assert all(t.dtype == dtype for t in params.values())
    else:
        assert isinstance(params, nn.Module) and params.w.dtype == dtype


def _vec(kind, params):
    if kind == "tensor":
        return params.detach()
    if kind == "tuple":
        return torch.stack(params).detach()
    if kind == "dict":
        return torch.stack([params[k] for k in "abc"]).detach()
    return params.w.detach()


HISTORY_COLUMNS = {"iter", "value", "grad_norm", "step_size", "time", "matvecs"}

LS_SOLVERS = {
    "GaussNewton": lambda: GaussNewton(),
    "EGN": lambda: EGN(damping=1e-4),
    "Sven": lambda: Sven(lr=1.0, k=3),
}
ANY_SOLVERS = {
    "GradientDescent": lambda: GradientDescent(lr=0.5),
    "Adam": lambda: Adam(lr=0.05),
    "NewtonCG": lambda: NewtonCG(),
    "SaddleFreeNewton": lambda: SaddleFreeNewton(k=3),
    "SaddleFreeNewton_lowrank": lambda: SaddleFreeNewton(method="lowrank", k=3, damping=1e-3),
    "MFAC": lambda: MFAC(lr=0.1, ngrads=4, damping=1e-2),
}


# --------------------------------------------------------------------------- contract: structures, dtypes
@pytest.mark.parametrize("kind", ["tensor", "tuple", "dict", "module"])
@pytest.mark.parametrize("dtype", [torch.float32, D64])
@pytest.mark.parametrize("name", list(LS_SOLVERS) + list(ANY_SOLVERS))
def test_param_structures_and_dtypes(name, kind, dtype):
    solver = {**LS_SOLVERS, **ANY_SOLVERS}[name]()
    prob = _exp_ls(kind, dtype) if name in LS_SOLVERS else _exp_min(kind, dtype)
    f0 = float(prob.value(prob.x0))
    res = cl.solve(prob, solver, max_iter=8, tol=1e-30)
    _check_structure(kind, res.params, dtype)
    assert res.flat.dtype == dtype
    assert math.isfinite(res.value) and res.value < f0
    assert res.n_iter == len(res.history) >= 1
    assert res.status in ("max_iter", "converged") and res.converged == (res.status == "converged")
    assert HISTORY_COLUMNS <= set(res.history.keys())
    assert res.history["value"][-1] == pytest.approx(res.value)
    # the returned structure carries the final flat vector, and the value is the objective there
    assert torch.equal(_vec(kind, res.params).reshape(-1), res.flat)
    assert float(prob.value(res.flat)) == pytest.approx(res.value, rel=1e-4 if dtype == torch.float32 else 1e-10)
    # the user's start is untouched
    assert float(prob.value(prob.x0)) == f0


def test_solve_and_method_agree():
    a = cl.solve(_exp_ls(), GaussNewton(), max_iter=20, tol=1e-12)
    b = GaussNewton().solve(_exp_ls(), max_iter=20, tol=1e-12)
    assert torch.equal(a.flat, b.flat) and a.n_iter == b.n_iter and a.status == b.status


# --------------------------------------------------------------------------- contract: data forms
@pytest.mark.parametrize("data", ["list", "loader"])
def test_gauss_newton_sums_over_all_batches(data):
    """Gauss-Newton is deterministic over the whole data: batches give the same fit as one batch."""
    one = GaussNewton().solve(_exp_ls(data="batch"), max_iter=100, tol=1e-12)
    many = GaussNewton().solve(_exp_ls(data=data), max_iter=100, tol=1e-12)
    assert one.status == many.status == "converged"
    torch.testing.assert_close(many.flat, one.flat, rtol=1e-9, atol=1e-10)
    assert many.value == pytest.approx(one.value, rel=1e-9)


@pytest.mark.parametrize("data", ["batch", "list", "loader"])
@pytest.mark.parametrize("name", ["EGN", "Sven", "MFAC", "Adam"])
def test_supervised_data_forms(name, data):
    solver = {
        "EGN": EGN(damping=0.3, line_search=True),
        "Sven": Sven(lr=0.5, k=5),
        "MFAC": MFAC(lr=0.05, ngrads=4, damping=1e-1),
        "Adam": Adam(lr=0.02),
    }[name]
    prob = _supervised(data=data)
    f0 = float(prob.value(prob.x0))
    res = solver.solve(prob, max_iter=12, tol=0.0)
    assert isinstance(res.params, nn.Module)
    assert res.status == "max_iter" and res.n_iter == 12
    assert float(prob.value(res.flat)) < f0


def test_loader_and_list_give_identical_runs():
    """A DataLoader and the equivalent list of batches are drawn in the same order (cycled over epochs)."""
    a = EGN(damping=1e-2).solve(_supervised(data="list"), max_iter=7, tol=0.0)
    b = EGN(damping=1e-2).solve(_supervised(data="loader"), max_iter=7, tol=0.0)
    torch.testing.assert_close(a.flat, b.flat, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- contract: save / resume
RESUME_CASES = {
    "GaussNewton": (lambda: GaussNewton(), lambda: _exp_ls()),
    "EGN_stochastic": (
        lambda: EGN(damping=1e-2, line_search=True, adaptive_damping=True, momentum=0.3),
        lambda: _supervised(data="loader"),
    ),
    "Sven_list": (lambda: Sven(lr=0.5, k=4, rmsprop="post", param_fraction=0.5), lambda: _supervised(data="list")),
    "ScaledGD": (lambda: ScaledGD(lr=0.3, damping=1e-3), lambda: _factor_problem()[0]),
    "SaddleFreeNewton_lowrank": (
        lambda: SaddleFreeNewton(method="lowrank", k=4, refresh=2, damping=1e-2),
        lambda: _exp_min(),
    ),
    "MFAC": (lambda: MFAC(lr=0.05, ngrads=3, damping=1e-1, momentum=0.5), lambda: _supervised(data="list")),
    "Adam": (lambda: Adam(lr=0.05), lambda: _exp_min(data="list")),
}


@pytest.mark.parametrize("name", list(RESUME_CASES))
def test_save_resume_through_a_file(name, tmp_path):
    make_solver, make_problem = RESUME_CASES[name]
    full = make_solver().solve(make_problem(), max_iter=6, tol=0.0)
    first = make_solver().solve(make_problem(), max_iter=3, tol=0.0)
    path = tmp_path / "state.pt"
    torch.save(first.state, path)
    state = torch.load(path)
    rest = cl.solve(make_problem(), make_solver(), max_iter=6, tol=0.0, state=state)
    assert rest.n_iter == full.n_iter == 6
    assert len(rest.history) == 3 and rest.history["iter"] == [4, 5, 6]
    torch.testing.assert_close(rest.flat, full.flat, rtol=1e-10, atol=1e-12)
    assert rest.value == pytest.approx(full.value, rel=1e-10)


def test_step_does_not_modify_state():
    prob = _supervised(data="list")
    solver = EGN(damping=1e-2, momentum=0.5)
    s0 = solver.init(prob)
    s1 = solver.step(prob, s0)
    x0 = s0["x"].clone()
    s2 = solver.step(prob, s1)
    assert torch.equal(s0["x"], x0) and s0["iter"] == 0 and s1["iter"] == 1 and s2["iter"] == 2


def test_progress_bar(capsys):
    res = GaussNewton().solve(_exp_ls(), max_iter=5, tol=0.0, progress=True)
    assert res.n_iter >= 1
    err = capsys.readouterr().err
    assert "GaussNewton" in err


def test_callback_stops():
    res = EGN(damping=1e-2).solve(_supervised(), max_iter=50, callback=lambda s: s["iter"] >= 2)
    assert res.status == "callback" and res.n_iter == 2


# --------------------------------------------------------------------------- contract: errors
@pytest.mark.parametrize("cls", [GaussNewton, EGN, Sven])
def test_jacobian_solvers_reject_minimize(cls):
    with pytest.raises(TypeError, match="LeastSquares"):
        cl.solve(_exp_min(), cls(), max_iter=2)


def test_scaled_gd_rejects_non_factor_params():
    with pytest.raises((TypeError, ValueError), match="factor"):
        ScaledGD().solve(_exp_min(), max_iter=2)
    # a pair whose column counts differ is not a factorisation either
    p = cl.Minimize(lambda f: (f[0].sum() * f[1].sum()) ** 2, (torch.ones(3, 2), torch.ones(4, 3)))
    with pytest.raises((TypeError, ValueError), match="factor"):
        ScaledGD().solve(p, max_iter=2)


def test_solve_rejects_non_solver():
    with pytest.raises(TypeError, match="solver"):
        cl.solve(_exp_ls(), torch.optim.SGD)


ALL_CLASSES = [GaussNewton, EGN, Sven, ScaledGD, SaddleFreeNewton, MFAC, GradientDescent, Adam, NewtonCG]


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_unknown_option_is_named(cls):
    with pytest.raises(TypeError, match="learning_rate"):
        cls(learning_rate=0.1)


INVALID = [
    (GaussNewton, "damping", -1.0),
    (GaussNewton, "damping", float("nan")),
    (EGN, "lr", -1.0),
    (EGN, "damping", -1e-3),
    (EGN, "lr", True),
    (Sven, "lr", -0.1),
    (Sven, "k", 0),
    (Sven, "k", 2.5),
    (ScaledGD, "lr", 0.0),
    (ScaledGD, "damping", -0.1),
    (SaddleFreeNewton, "k", 0),
    (SaddleFreeNewton, "lr", -1.0),
    (SaddleFreeNewton, "damping", -1.0),
    (MFAC, "lr", -1.0),
    (MFAC, "damping", -1.0),
    (MFAC, "damping", 0.0),
    (MFAC, "momentum", -0.5),
    (GradientDescent, "lr", -1.0),
    (GradientDescent, "momentum", 1.5),
    (Adam, "lr", float("inf")),
]


@pytest.mark.parametrize(("cls", "name", "value"), INVALID)
def test_invalid_values_name_the_option(cls, name, value):
    with pytest.raises(ValueError, match=name):
        cls(**{name: value})


def test_bad_solve_arguments():
    with pytest.raises(ValueError, match="max_iter"):
        GaussNewton().solve(_exp_ls(), max_iter=0)
    with pytest.raises(ValueError, match="tol"):
        GaussNewton().solve(_exp_ls(), tol=-1.0)


# --------------------------------------------------------------------------- contract: non-finite values
def _poisoned_ls(after):
    """Exponential fit whose residuals turn NaN from the ``after``-th evaluation after construction on."""
    t, y = _exp_data()
    calls = {"n": -(10**9)}

    def res(p, batch):
        calls["n"] += 1
        r = _exp_model(p, batch[0]) - batch[1]
        return r * float("nan") if calls["n"] > after else r

    prob = cl.LeastSquares(res, _start("tensor", D64), (t, y))
    calls["n"] = 0
    return prob


def _poisoned_supervised(after):
    X, y = _cls_data()
    net = _net()
    calls = {"n": -(10**9)}

    def loss(o, t):
        calls["n"] += 1
        v = _ce(o, t)
        return v * float("nan") if calls["n"] > after else v

    prob = cl.SupervisedLoss(net, loss, data=(X, y))
    calls["n"] = 0
    return prob


@pytest.mark.parametrize("name", list(LS_SOLVERS) + list(ANY_SOLVERS))
def test_nan_residuals_stop_with_last_finite_params(name):
    solver = {**LS_SOLVERS, **ANY_SOLVERS}[name]()
    clean = solver.solve(_poisoned_ls(10**9), max_iter=200, tol=0.0)
    assert clean.status != "nan"
    res = solver.solve(_poisoned_ls(12), max_iter=200, tol=0.0)
    assert res.status == "nan" and not res.converged
    assert torch.isfinite(res.flat).all() and math.isfinite(res.value)
    # the returned parameters are a point the (clean) run really visited: the last finite iterate
    t, y = _exp_data()
    expect = 0.5 * float(((_exp_model(res.flat, t) - y) ** 2).mean())
    assert res.value == pytest.approx(expect, rel=1e-12)
    with pytest.raises(FloatingPointError):
        solver.solve(_poisoned_ls(12), max_iter=200, tol=0.0, raise_on_nan=True)


@pytest.mark.parametrize("solver", [EGN(damping=1e-2), Sven(lr=0.5, k=5), MFAC(lr=0.05, ngrads=3, damping=0.1)])
def test_nan_losses_stop_supervised(solver):
    res = solver.solve(_poisoned_supervised(6), max_iter=100, tol=0.0)
    assert res.status == "nan"
    assert torch.isfinite(res.flat).all() and math.isfinite(res.value)


def test_nan_at_start():
    res = EGN().solve(_poisoned_ls(0), max_iter=5)
    assert res.status == "nan" and res.n_iter == 0


# --------------------------------------------------------------------------- numerics: Gauss-Newton vs MINPACK
_OSBORNE1_Y = np.array(
    [0.844, 0.908, 0.932, 0.936, 0.925, 0.908, 0.881, 0.850, 0.818, 0.784, 0.751, 0.718, 0.685, 0.658, 0.628,
     0.603, 0.580, 0.558, 0.538, 0.522, 0.506, 0.490, 0.478, 0.467, 0.457, 0.448, 0.438, 0.431, 0.424, 0.420,
     0.414, 0.411, 0.406]
)  # fmt: skip
_KOWALIK_Y = np.array([0.1957, 0.1947, 0.1735, 0.1600, 0.0844, 0.0627, 0.0456, 0.0342, 0.0323, 0.0235, 0.0246])
_KOWALIK_U = np.array([4.0, 2.0, 1.0, 0.5, 0.25, 0.167, 0.125, 0.1, 0.0833, 0.0714, 0.0625])


def _osborne1(x, lib):
    t = 10.0 * lib.arange(33)
    t = t if lib is np else t.to(x.dtype)
    y = _OSBORNE1_Y if lib is np else torch.tensor(_OSBORNE1_Y, dtype=x.dtype)
    return y - (x[0] + x[1] * lib.exp(-t * x[3]) + x[2] * lib.exp(-t * x[4]))


def _kowalik(x, lib):
    u = _KOWALIK_U if lib is np else torch.tensor(_KOWALIK_U, dtype=x.dtype)
    y = _KOWALIK_Y if lib is np else torch.tensor(_KOWALIK_Y, dtype=x.dtype)
    return y - x[0] * (u**2 + u * x[1]) / (u**2 + u * x[2] + x[3])


def _noisy_exp2(x, lib):
    """A fresh two-exponential fit with noise (nonzero residual at the optimum)."""
    rng = np.random.default_rng(7)
    t = np.linspace(0, 6, 50)
    y = 3.0 * np.exp(-0.7 * t) - 1.5 * np.exp(-2.2 * t) + 0.02 * rng.standard_normal(50)
    if lib is not np:
        t, y = torch.tensor(t, dtype=x.dtype), torch.tensor(y, dtype=x.dtype)
    return x[0] * lib.exp(-x[1] * t) + x[2] * lib.exp(-x[3] * t) - y


@pytest.mark.parametrize(
    ("fn", "x0"),
    [
        (_osborne1, [0.5, 1.5, -1.0, 0.01, 0.02]),
        (_kowalik, [0.25, 0.39, 0.415, 0.39]),
        (_noisy_exp2, [1.0, 0.5, -1.0, 3.0]),
    ],
)
@pytest.mark.parametrize("method", ["dense", "cg"])
def test_gauss_newton_matches_minpack(fn, x0, method):
    ref = scipy.optimize.least_squares(
        lambda x: fn(x, np), np.array(x0), method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15, max_nfev=20000
    )
    prob = cl.LeastSquares(lambda x: fn(x, torch), torch.tensor(x0, dtype=D64))
    tight = dict(ftol=1e-15, xtol=1e-15, gtol=1e-15)  # the same tolerances as MINPACK's run
    solver = (
        GaussNewton(method=method, cg_tol=1e-12, cg_maxiter=100, **tight) if method != "dense" else GaussNewton(**tight)
    )
    res = solver.solve(prob, max_iter=500, tol=1e-14)
    assert res.status == "converged", res.message
    # MINPACK itself stops ~1e-8 relative short on the ill-conditioned fits (its xtol / ftol tests), so the
    # parameters agree to 1e-6, and curvlab's first-order optimality must be at least as good as MINPACK's
    np.testing.assert_allclose(res.flat.numpy(), ref.x, rtol=1e-6, atol=1e-6 * np.abs(ref.x).max())
    assert res.value == pytest.approx(0.5 * np.sum(ref.fun**2) / ref.fun.size, rel=1e-10)

    def grad_norm(x):
        x = torch.as_tensor(x, dtype=D64)
        return float((torch.func.jacrev(lambda z: fn(z, torch))(x).T @ fn(x, torch)).norm())

    assert grad_norm(res.flat) <= max(2 * grad_norm(ref.x), 1e-10)


def test_gauss_newton_gram_equals_dense_when_underdetermined():
    """Fewer residuals than parameters: the Duncan-Guttman (Gram) form takes the same LM steps as the dense one."""
    g = torch.Generator().manual_seed(21)
    A = torch.randn(6, 15, generator=g, dtype=D64)
    b = torch.randn(6, generator=g, dtype=D64)

    def res(x):
        return torch.tanh(A @ x) * 2.0 - b.clamp(-1.5, 1.5) + 0.1 * (A @ x) ** 2

    x0 = 0.1 * torch.randn(15, generator=g, dtype=D64)
    dense = GaussNewton(method="dense", scale=False).solve(cl.LeastSquares(res, x0.clone()), max_iter=8, tol=0.0)
    gram = GaussNewton(method="gram").solve(cl.LeastSquares(res, x0.clone()), max_iter=8, tol=0.0)
    assert dense.n_iter == gram.n_iter
    torch.testing.assert_close(torch.tensor(gram.history["value"]), torch.tensor(dense.history["value"]),
                               rtol=1e-8, atol=1e-14)  # fmt: skip
    torch.testing.assert_close(gram.flat, dense.flat, rtol=1e-6, atol=1e-8)


def test_gauss_newton_float32_stays_float32():
    prob = cl.LeastSquares(lambda x: _kowalik(x, torch), torch.tensor([0.25, 0.39, 0.415, 0.39]))
    res = GaussNewton().solve(prob, max_iter=200, tol=1e-12)
    assert res.flat.dtype == torch.float32 and res.status in ("converged", "max_iter")
    ref = scipy.optimize.least_squares(lambda x: _kowalik(x, np), np.array([0.25, 0.39, 0.415, 0.39]), method="lm")
    np.testing.assert_allclose(res.flat.numpy(), ref.x, rtol=2e-3)


# --------------------------------------------------------------------------- numerics: EGN direction
def _dense_egn_step(net, X, y, lam):
    names = [k for k, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    x = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def unflat(z):
        parts = torch.split(z, [math.prod(s) for s in shapes])
        return {k: p.view(s) for k, p, s in zip(names, parts, shapes)}

    def out(z):
        return torch.func.functional_call(net, unflat(z), (X,))

    J = torch.func.jacrev(lambda z: out(z).reshape(-1))(x)
    o = out(x).detach()
    b, c = o.shape
    # cross-entropy loss of one sample as a function of its logits: gradient softmax - onehot,
    # Hessian diag(p) - ppᵀ (written out, not autodiff)
    p = torch.softmax(o, dim=1)
    g = (p - torch.nn.functional.one_hot(y, c).to(o.dtype)).reshape(-1)
    Q = torch.block_diag(*[torch.diag(pi) - torch.outer(pi, pi) for pi in p])
    return -torch.linalg.solve(J.T @ Q @ J + b * lam * torch.eye(x.numel(), dtype=x.dtype), J.T @ g)


def test_egn_steps_equal_dense_formula_on_loader_batches():
    """5 classes, batch size 7 over 23 samples (last batch 2 < classes), epochs wrap."""
    X, y = _cls_data()
    lam = 0.05
    prob = _supervised(data="loader", bs=7)
    net = _net()  # same init as the problem's module
    solver = EGN(damping=lam, lr=1.0)
    state = solver.init(prob)
    batches = [(X[i : i + 7], y[i : i + 7]) for i in range(0, 23, 7)]
    for it in range(6):
        Xb, yb = batches[it % 4]
        torch.nn.utils.vector_to_parameters(state["x"], net.parameters())
        d = _dense_egn_step(net, Xb, yb, lam)
        new = solver.step(prob, state)
        torch.testing.assert_close(new["x"] - state["x"], d, rtol=1e-9, atol=1e-11)
        state = new


def test_egn_least_squares_multi_output_direction():
    """LeastSquares with (n, 2) residual rows: d = -Jᵀ(JJᵀ + nλI)⁻¹ r."""
    t = torch.linspace(0, 1, 11, dtype=D64)

    def res(w):
        return torch.stack([w[0] * torch.exp(w[1] * t) - t, torch.sin(w[2] * t) - w[0] * t], dim=1)

    w0 = torch.tensor([1.0, -0.5, 2.0], dtype=D64)
    prob = cl.LeastSquares(res, w0)
    lam = 0.3
    s1 = EGN(damping=lam).step(prob, EGN(damping=lam).init(prob))
    J = torch.func.jacrev(lambda w: res(w).reshape(-1))(w0)
    r = res(w0).reshape(-1)
    n = 11
    d = -torch.linalg.solve(J.T @ J / n + lam * torch.eye(3, dtype=D64), J.T @ r / n)
    torch.testing.assert_close(s1["x"] - w0, d, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- numerics: Sven step
def _sven_reference(net, X, y, k, rtol, kappa=2.0):
    x = torch.nn.utils.parameters_to_vector(net.parameters()).detach()
    names = [k_ for k_, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]

    def conditions(z):
        parts = torch.split(z, [math.prod(s) for s in shapes])
        o = torch.func.functional_call(net, {n: p.view(s) for n, p, s in zip(names, parts, shapes)}, (X,))
        return ((o - y) ** 2).sum(-1) ** (kappa / 2)

    M = torch.func.jacrev(conditions)(x)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    keep = min(k, int((S > rtol * S[0]).sum()))
    trunc = Vh[:keep].T @ torch.diag(1 / S[:keep]) @ U[:, :keep].T
    return conditions(x).detach(), M, trunc


@pytest.mark.parametrize("svd", ["auto", "exact", "gram"])
@pytest.mark.parametrize("kappa", [2.0, 1.0])
def test_sven_step_equals_truncated_pinv(svd, kappa):
    g = torch.Generator().manual_seed(5)
    X = torch.randn(13, 3, generator=g, dtype=D64)
    y = torch.randn(13, 2, generator=g, dtype=D64)
    net = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2)).to(D64)
    mse = lambda o, t: ((o - t) ** 2).sum(-1)  # noqa: E731
    lr = 0.3
    x0 = torch.nn.utils.parameters_to_vector(net.parameters()).detach()
    for k in (50, 4):  # k >= rank (full pinv) and a truncated step
        prob = cl.SupervisedLoss(net, mse, data=(X, y))
        solver = Sven(lr=lr, k=k, svd=svd, kappa=kappa)
        s1 = solver.step(prob, solver.init(prob))
        R, M, trunc = _sven_reference(net, X, y, k, 1e-3, kappa)
        if k == 50:
            torch.testing.assert_close(trunc, torch.linalg.pinv(M, rtol=1e-3), rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(s1["x"] - x0, -lr * trunc @ R, rtol=1e-7, atol=1e-10)


# --------------------------------------------------------------------------- numerics: ScaledGD step
def _factor_problem(dtype=D64, as_dict=False):
    """A fresh asymmetric objective f(L, R) = ½‖A vec(LRᵀ) - b‖²/m + 10⁻³·‖L‖⁴ (not matrix sensing)."""
    g = torch.Generator().manual_seed(11)
    L0 = torch.randn(7, 3, generator=g, dtype=dtype)
    R0 = torch.randn(4, 3, generator=g, dtype=dtype)
    A = torch.randn(40, 28, generator=g, dtype=dtype)
    b = torch.randn(40, generator=g, dtype=dtype)

    def f(p):
        L, R = (p["L"], p["R"]) if isinstance(p, dict) else p
        return 0.5 * ((A @ (L @ R.T).reshape(-1) - b) ** 2).mean() + 1e-3 * (L**2).sum() ** 2

    params = {"L": L0.clone(), "R": R0.clone()} if as_dict else (L0.clone(), R0.clone())
    return cl.Minimize(f, params), f, L0, R0


@pytest.mark.parametrize("lam", [0.0, 0.2])
@pytest.mark.parametrize("as_dict", [False, True])
def test_scaled_gd_asymmetric_step(lam, as_dict):
    prob, f, L0, R0 = _factor_problem(as_dict=as_dict)
    lr = 0.4
    solver = ScaledGD(lr=lr, damping=lam)
    s1 = solver.step(prob, solver.init(prob))
    gL, gR = torch.func.grad(lambda L, R: f((L, R)), argnums=(0, 1))(L0, R0)
    eye = torch.eye(3, dtype=D64)
    L1 = L0 - lr * gL @ torch.linalg.inv(R0.T @ R0 + lam * eye)
    R1 = R0 - lr * gR @ torch.linalg.inv(L0.T @ L0 + lam * eye)
    torch.testing.assert_close(s1["x"], torch.cat([L1.reshape(-1), R1.reshape(-1)]), rtol=1e-10, atol=1e-12)
    res = solver.solve(prob, max_iter=3, tol=0.0)
    assert isinstance(res.params, dict if as_dict else tuple)
    assert res.params["L" if as_dict else 0].shape == (7, 3) and res.params["R" if as_dict else 1].shape == (4, 3)


def test_scaled_gd_symmetric_overparameterized_step():
    g = torch.Generator().manual_seed(2)
    X0 = 1e-2 * torch.randn(6, 4, generator=g, dtype=D64)
    Mt = torch.randn(6, 2, generator=g, dtype=D64)
    Mt = Mt @ Mt.T

    def f(X):
        return 0.25 * ((X @ X.T - Mt) ** 2).sum()

    lam, lr = 0.05, 0.3
    s1 = ScaledGD(lr=lr, damping=lam).step(cl.Minimize(f, X0.clone()), ScaledGD(damping=lam).init(cl.Minimize(f, X0)))
    X1 = X0 - lr * torch.func.grad(f)(X0) @ torch.linalg.inv(X0.T @ X0 + lam * torch.eye(4, dtype=D64))
    torch.testing.assert_close(s1["x"], X1.reshape(-1), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- numerics: matrix sensing instances
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("init", ["small_random", "spectral"])
@pytest.mark.parametrize("dtype", [torch.float32, D64])
def test_matrix_sensing_instances(symmetric, init, dtype):
    n = 9 if symmetric else (9, 6)
    inst = cl.problems.matrix_sensing(n, 3, kappa=25.0, m=300, symmetric=symmetric, r_model=4, init=init,
                                      seed=4, dtype=dtype)  # fmt: skip
    n1, n2 = (9, 9) if symmetric else (9, 6)
    assert inst.M_star.shape == (n1, n2) and inst.M_star.dtype == dtype
    s = torch.linalg.svdvals(inst.M_star.to(D64))
    assert int((s > 1e-5 * s[0]).sum()) == 3
    assert float(s[0] / s[2]) == pytest.approx(25.0, rel=1e-4)
    assert float(s[0]) == pytest.approx(1.0, rel=1e-4) and inst.sigma_min == pytest.approx(1 / 25, rel=1e-4)
    if symmetric:
        torch.testing.assert_close(inst.M_star, inst.M_star.T)
        assert float(torch.linalg.eigvalsh(inst.M_star.to(D64)).min()) > -1e-6
    # measurements are A(M*) (noise 0): zero loss at the ground truth
    assert float(inst.loss(inst.factors_star)) < (1e-10 if dtype == D64 else 1e-5)
    x0 = inst.x0
    shapes = [tuple(x0.shape)] if symmetric else [tuple(t.shape) for t in x0]
    assert shapes == ([(9, 4)] if symmetric else [(9, 4), (6, 4)])
    prob = inst.problem()
    assert prob.spec.dtype == dtype
    err0 = inst.relative_error(x0)
    if init == "spectral":
        assert err0 < 0.9
    else:
        assert err0 == pytest.approx(1.0, abs=1e-3)
    res = ScaledGD(lr=0.5, damping=0.05 * inst.sigma_min).solve(prob, max_iter=60, tol=0.0)
    assert inst.relative_error(res.params) < err0


def test_matrix_sensing_rejects_bad_arguments():
    with pytest.raises(ValueError, match="kappa"):
        cl.problems.matrix_sensing(5, 2, kappa=0.5)
    with pytest.raises(ValueError, match="r"):
        cl.problems.matrix_sensing(5, 6, kappa=2.0)


# --------------------------------------------------------------------------- numerics: saddle-free Newton
def _sfn_problem():
    g = torch.Generator().manual_seed(9)
    A = torch.randn(6, 6, generator=g, dtype=D64)
    c = torch.randn(6, generator=g, dtype=D64)

    def f(x):  # indefinite, non-quadratic
        return 0.5 * x @ ((A + A.T) @ x) / 2 + 0.1 * (x**4).sum() + c @ x

    x0 = torch.randn(6, generator=g, dtype=D64)
    return f, x0


@pytest.mark.parametrize("method", ["krylov", "lowrank"])
@pytest.mark.parametrize("lam", [1e-3, 0.5])
def test_saddle_free_newton_full_rank_step(method, lam):
    f, x0 = _sfn_problem()
    H = torch.func.hessian(f)(x0)
    gr = torch.func.grad(f)(x0)
    w, V = torch.linalg.eigh(H)
    assert w.min() < 0 < w.max()  # a genuinely indefinite point
    absH = V @ torch.diag(w.abs()) @ V.T
    expect = -torch.linalg.solve(absH + lam * torch.eye(6, dtype=D64), gr)
    kw = {"eig": "lanczos"} if method == "lowrank" else {}
    solver = SaddleFreeNewton(method=method, k=6, damping=lam, lr=1.0, line_search=False, **kw)
    prob = cl.Minimize(f, x0.clone())
    s1 = solver.step(prob, solver.init(prob))
    torch.testing.assert_close(s1["x"] - x0, expect, rtol=1e-8, atol=1e-10)


def test_saddle_free_newton_escapes_saddle():
    f = lambda x: x[0] ** 2 - x[1] ** 2 + 0.25 * x[1] ** 4  # noqa: E731  saddle at 0, minima at (0, ±√2)
    prob = cl.Minimize(f, torch.tensor([0.3, 1e-3], dtype=D64))
    res = SaddleFreeNewton(k=2).solve(prob, max_iter=50, tol=1e-10)
    assert res.converged and abs(res.params[1].item()) == pytest.approx(math.sqrt(2), rel=1e-6)


# --------------------------------------------------------------------------- numerics: M-FAC inverse
@pytest.mark.parametrize("dtype", [torch.float32, D64])
def test_mfac_inverse_products_track_the_window(dtype):
    g = torch.Generator().manual_seed(13)
    d, m, lam = 17, 4, 0.07
    op = MFACInverse(torch.empty(0, d, dtype=dtype), lam, ngrads=m)
    window: list[torch.Tensor] = []
    X = torch.randn(d, 3, generator=g, dtype=D64)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == D64 else dict(rtol=1e-4, atol=1e-4)
    for t in range(10):  # fills, then wraps around the ring buffer twice
        gt = torch.randn(d, generator=g, dtype=D64) * (1 + t)
        if t % 3 == 0:
            p = op.update_matvec(gt.to(dtype))
        else:
            op.update(gt.to(dtype))
            p = None
        window = (window + [gt])[-m:]
        G = torch.stack(window)
        F = lam * torch.eye(d, dtype=D64) + G.T @ G / len(window)
        if p is not None:
            torch.testing.assert_close(p.to(D64), torch.linalg.solve(F, gt), **tol)
        assert op.dtype == dtype and op.shape == (d, d)
        torch.testing.assert_close((op @ X[:, 0].to(dtype)).to(D64), torch.linalg.solve(F, X[:, 0]), **tol)
        torch.testing.assert_close((op @ X.to(dtype)).to(D64), torch.linalg.solve(F, X), **tol)
        if dtype == D64 and t in (2, 9):
            torch.testing.assert_close(op.to_dense(), torch.linalg.inv(F), rtol=1e-9, atol=1e-9)


def test_mfac_inverse_state_round_trip(tmp_path):
    g = torch.Generator().manual_seed(1)
    op = MFACInverse(torch.randn(3, 8, generator=g, dtype=D64), 0.1, ngrads=5)
    for _ in range(4):
        op.update(torch.randn(8, generator=g, dtype=D64))
    torch.save(op.state(), tmp_path / "w.pt")
    op2 = MFACInverse.from_state(torch.load(tmp_path / "w.pt"))
    v = torch.randn(8, generator=g, dtype=D64)
    torch.testing.assert_close(op2 @ v, op @ v, rtol=1e-12, atol=1e-12)
    nxt = torch.randn(8, generator=g, dtype=D64)
    torch.testing.assert_close(op2.update(nxt) @ v, op.update(nxt) @ v, rtol=1e-12, atol=1e-12)


def test_mfac_solver_first_steps_match_dense():
    """Window of 3 over a deterministic problem: x ← x - lr·(λI + GᵀG/m)⁻¹ g with the window incl. g."""
    f, x0 = _sfn_problem()
    lr, lam = 0.05, 0.5
    solver = MFAC(lr=lr, ngrads=3, damping=lam)
    prob = cl.Minimize(f, x0.clone())
    state = solver.init(prob)
    x, window = x0.clone(), []
    for _ in range(5):
        gx = torch.func.grad(f)(x)
        window = (window + [gx])[-3:]
        G = torch.stack(window)
        x = x - lr * torch.linalg.solve(lam * torch.eye(6, dtype=D64) + G.T @ G / len(window), gx)
        state = solver.step(prob, state)
        torch.testing.assert_close(state["x"], x, rtol=1e-9, atol=1e-11)
