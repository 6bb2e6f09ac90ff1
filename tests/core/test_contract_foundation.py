"""Acceptance tests of the issue-2 contract, written as a user would call the public API.

Every number is checked against an independent reference (dense ``torch.func.hessian`` /
``jacrev``, ``torch.linalg``, scipy) on problems and data shapes the implementation's own
tests do not use.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.func import functional_call, hessian, jacrev
from torch.utils.data import DataLoader, TensorDataset

import curvlab as cl
from curvlab import linalg, linops

D64 = torch.float64


# --------------------------------------------------------------------------- helpers
class Net(nn.Module):
    """Nested modules, a buffer and a frozen parameter."""

    def __init__(self, dtype=D64):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
        self.head = nn.Linear(4, 2)
        self.register_buffer("scale", torch.tensor(1.5, dtype=dtype))
        self.frozen = nn.Parameter(torch.tensor([0.3], dtype=dtype), requires_grad=False)
        self.to(dtype)

    def forward(self, x):
        return self.head(self.enc(x) * self.scale) + self.frozen


def dense_hessian_flat(fun, spec, x):
    """Dense Hessian of ``fun(unflatten(x))`` w.r.t. the flat vector ``x``."""
    return hessian(lambda z: fun(spec.unflatten(z)))(x)


def module_loss_flat(net, X, Y):
    names = [k for k, p in net.named_parameters() if p.requires_grad]
    shapes = [p.shape for k, p in net.named_parameters() if p.requires_grad]
    numels = [math.prod(s) for s in shapes]

    def fun(z):
        parts = dict(zip(names, (t.view(s) for t, s in zip(torch.split(z, numels), shapes))))
        return 0.5 * ((functional_call(net, parts, (X,)) - Y) ** 2).sum(-1).mean()

    x = torch.cat([p.detach().reshape(-1) for k, p in net.named_parameters() if p.requires_grad])
    return fun, x


# --------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("dtype", [torch.float32, D64])
@pytest.mark.parametrize("kind", ["tensor", "tuple", "list", "dict", "scalar"])
def test_hessian_param_structures(kind, dtype):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, generator=g, dtype=dtype)
    B = torch.randn(2, 2, generator=g, dtype=dtype)
    if kind == "tensor":
        params = torch.randn(2, 3, generator=g, dtype=dtype)

        def f(p):
            return (torch.sin(p) ** 2).sum() + (p @ a).pow(2).sum()
    elif kind == "scalar":
        params = torch.tensor(0.7, dtype=dtype)

        def f(p):
            return torch.cos(p) * p**3
    else:
        t = [torch.randn(3, generator=g, dtype=dtype), torch.randn(2, 2, generator=g, dtype=dtype)]
        params = {"u": t[0], "M": t[1]} if kind == "dict" else (tuple(t) if kind == "tuple" else list(t))

        def f(p):
            u, M = (p["u"], p["M"]) if isinstance(p, dict) else p
            assert isinstance(p, {"dict": dict, "tuple": tuple, "list": list}[kind])
            return (u * a).sum() ** 2 * torch.tanh(M @ B).sum() + (u**4).sum()

    H = linops.hessian(f, params)
    spec = H.spec
    assert H.dtype == dtype and H.shape == (spec.size, spec.size)
    ref = dense_hessian_flat(f, spec, spec.flatten().to(D64).to(dtype))
    tol = 1e-10 if dtype == D64 else 1e-4
    torch.testing.assert_close(H.to_dense(), ref, rtol=tol, atol=tol)
    v = torch.randn(spec.size, dtype=dtype, generator=g)
    torch.testing.assert_close(H @ v, ref @ v, rtol=tol, atol=tol)
    # structure round trip: unflatten gives the user's structure back
    back = spec.unflatten(spec.flatten())
    if kind == "dict":
        assert list(back) == ["u", "M"] and back["M"].shape == (2, 2)
    elif kind in ("tuple", "list"):
        assert type(back) is type(params)
    else:
        assert back.shape == params.shape


def test_hessian_module_with_buffers_and_frozen_params():
    torch.manual_seed(0)
    net = Net()
    X, Y = torch.randn(7, 3, dtype=D64), torch.randn(7, 2, dtype=D64)

    def f(p, batch):
        x, y = batch
        return 0.5 * ((functional_call(net, p, (x,)) - y) ** 2).sum(-1).mean()

    H = linops.hessian(f, net, data=(X, Y))
    fun, x = module_loss_flat(net, X, Y)
    assert H.shape[0] == x.numel()  # the frozen parameter and the buffer are not variables
    assert set(H.spec.keys) == {"enc.0.weight", "enc.0.bias", "head.weight", "head.bias"}
    torch.testing.assert_close(H.to_dense(), hessian(fun)(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(H.gradient, torch.func.grad(fun)(x), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(H.value, fun(x))


def test_hessian_extra_positional_args():
    A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=D64)
    c = torch.tensor(2.0, dtype=D64)

    def f(x, A, c):
        return 0.5 * x @ A @ x * c + x.pow(4).sum()

    x0 = torch.tensor([0.5, -1.0], dtype=D64)
    H = linops.hessian(f, x0, A, c)
    torch.testing.assert_close(H.to_dense(), hessian(f)(x0, A, c))
    # with data the batch comes first, then the extra args
    batches = [torch.ones(3, dtype=D64), 2 * torch.ones(5, dtype=D64)]
    Hd = linops.hessian(lambda x, b, A, c: f(x, A, c) * b.mean(), x0, A, c, data=batches)
    w = (3 * 1.0 + 5 * 2.0) / 8
    torch.testing.assert_close(Hd.to_dense(), w * hessian(f)(x0, A, c))


def test_params_rejected_with_named_argument():
    with pytest.raises(TypeError, match="params"):
        linops.hessian(lambda p: p.sum(), torch.arange(3))
    with pytest.raises(TypeError, match="params"):
        cl.Minimize(lambda p: p.float().sum(), {"a": torch.zeros(2, dtype=torch.int64)})
    with pytest.raises(ValueError, match="params.*dtype"):
        cl.Minimize(lambda p: p[0].sum() + p[1].sum(), (torch.zeros(2), torch.zeros(2, dtype=D64)))
    with pytest.raises(ValueError, match="params"):
        cl.Minimize(lambda p: 0.0, [])
    with pytest.raises(TypeError, match="params"):
        cl.Minimize(lambda p: p, "not params")
    with pytest.raises(ValueError, match="scalar"):
        cl.Minimize(lambda p: p * 2, torch.zeros(3))
    with pytest.raises(ValueError, match="scalar"):
        linops.hessian(lambda p: p * 2, torch.zeros(3)).matvec(torch.ones(3))


def test_meta_device_params_rejected():
    # a real second device is not available; the meta device exercises the same check
    with pytest.raises(ValueError, match="device"):
        cl.Minimize(lambda p: p[0].sum(), (torch.zeros(2), torch.zeros(2, device="meta")))


# --------------------------------------------------------------------------- data forms
def _mlp_problem(n=13, seed=0, dtype=D64):
    g = torch.Generator().manual_seed(seed)
    params = {
        "W": torch.randn(4, 3, generator=g, dtype=dtype),
        "b": torch.randn(4, generator=g, dtype=dtype),
        "V": torch.randn(2, 4, generator=g, dtype=dtype),
    }
    X = torch.randn(n, 3, generator=g, dtype=dtype)
    Y = torch.randn(n, 2, generator=g, dtype=dtype)

    def model(p, x):
        return torch.tanh(x @ p["W"].T + p["b"]) @ p["V"].T

    return params, model, X, Y


def _full_loss(model, spec, X, Y):
    return lambda z: 0.5 * ((model(spec.unflatten(z), X) - Y) ** 2).sum(-1).mean()


class Reiterable:
    """A re-iterable collection that is not a list (each pass makes a generator)."""

    def __init__(self, X, Y, bs):
        self.X, self.Y, self.bs = X, Y, bs

    def __iter__(self):
        for i in range(0, len(self.X), self.bs):
            yield self.X[i : i + self.bs], self.Y[i : i + self.bs]


@pytest.mark.parametrize("form", ["tuple", "dict", "list", "dataloader", "reiterable"])
def test_hessian_ggn_fisher_over_data_forms(form):
    params, model, X, Y = _mlp_problem()
    if form == "tuple":
        data = (X, Y)
    elif form == "dict":
        data = {"x": X, "y": Y}
    elif form == "list":
        data = [(X[:5], Y[:5]), (X[5:], Y[5:])]
    elif form == "dataloader":
        data = DataLoader(TensorDataset(X, Y), batch_size=5, shuffle=False)  # 5, 5, 3
    else:
        data = Reiterable(X, Y, 4)

    def loss_fn(o, y):
        return 0.5 * ((o - y) ** 2).sum(-1)

    def f(p, batch):
        x, y = (batch["x"], batch["y"]) if isinstance(batch, dict) else batch
        return loss_fn(model(p, x), y).mean()

    H = linops.hessian(f, params, data=data)
    spec = H.spec
    x0 = spec.flatten()
    fun = _full_loss(model, spec, X, Y)
    torch.testing.assert_close(H.to_dense(), hessian(fun)(x0), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(H.gradient, torch.func.grad(fun)(x0), rtol=1e-10, atol=1e-12)

    G = linops.ggn(model, loss_fn, params, data)
    J = jacrev(lambda z: model(spec.unflatten(z), X))(x0).reshape(-1, spec.size)  # (n*2, P)
    torch.testing.assert_close(G.to_dense(), J.T @ J / X.shape[0], rtol=1e-10, atol=1e-12)

    Fi = linops.fisher(model, loss_fn, params, data)
    Jl = jacrev(lambda z: loss_fn(model(spec.unflatten(z), X), Y))(x0)  # (n, P)
    torch.testing.assert_close(Fi.to_dense(), Jl.T @ Jl / X.shape[0], rtol=1e-10, atol=1e-12)


def test_one_shot_generator_is_rejected_clearly():
    params, model, X, Y = _mlp_problem()
    gen = ((X[i : i + 4], Y[i : i + 4]) for i in range(0, 13, 4))
    with pytest.raises(ValueError, match="iterator"):
        linops.hessian(lambda p, b: model(p, b[0]).sum(), params, data=gen)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("target", ["int", "prob"])
def test_ggn_fisher_cross_entropy(reduction, target):
    g = torch.Generator().manual_seed(3)
    params = (torch.randn(5, 3, generator=g, dtype=D64), torch.randn(5, generator=g, dtype=D64))
    X = torch.randn(11, 3, generator=g, dtype=D64)
    if target == "int":
        Y = torch.randint(0, 5, (11,), generator=g)
    else:
        Y = torch.softmax(torch.randn(11, 5, generator=g, dtype=D64), -1)

    def model(p, x):
        return torch.tanh(x @ p[0].T + p[1])

    def loss_fn(o, y):
        return F.cross_entropy(o, y, reduction="none")

    data = [(X[:6], Y[:6]), (X[6:], Y[6:])]
    G = linops.ggn(model, loss_fn, params, data, reduction=reduction)
    spec = G.spec
    x0 = spec.flatten()
    scale = 1.0 / 11 if reduction == "mean" else 1.0
    out = model(spec.unflatten(x0), X)
    J = jacrev(lambda z: model(spec.unflatten(z), X))(x0)  # (n, C, P)
    Gref = torch.zeros(spec.size, spec.size, dtype=D64)
    for i in range(11):
        Q = hessian(lambda o, i=i: loss_fn(o[None], Y[i : i + 1]).sum())(out[i])
        Gref += J[i].T @ Q @ J[i]
    torch.testing.assert_close(G.to_dense(), scale * Gref, rtol=1e-10, atol=1e-12)
    assert G.is_psd and G.is_symmetric
    total = lambda z: loss_fn(model(spec.unflatten(z), X), Y).sum() * scale  # noqa: E731
    torch.testing.assert_close(G.value, total(x0))
    torch.testing.assert_close(G.gradient, torch.func.grad(total)(x0), rtol=1e-10, atol=1e-12)

    Fi = linops.fisher(model, loss_fn, params, data, reduction=reduction)
    Jl = jacrev(lambda z: loss_fn(model(spec.unflatten(z), X), Y))(x0)
    torch.testing.assert_close(Fi.to_dense(), scale * Jl.T @ Jl, rtol=1e-10, atol=1e-12)


def test_ggn_with_module_params_none():
    torch.manual_seed(0)
    net = Net()
    X, Y = torch.randn(6, 3, dtype=D64), torch.randn(6, 2, dtype=D64)
    G = linops.ggn(net, lambda o, y: 0.5 * ((o - y) ** 2).sum(-1), None, (X, Y))
    fun, x = module_loss_flat(net, X, Y)
    names = [k for k, p in net.named_parameters() if p.requires_grad]
    shapes = [p.shape for k, p in net.named_parameters() if p.requires_grad]
    numels = [math.prod(s) for s in shapes]

    def out(z):
        parts = dict(zip(names, (t.view(s) for t, s in zip(torch.split(z, numels), shapes))))
        return functional_call(net, parts, (X,)).reshape(-1)

    J = jacrev(out)(x)
    torch.testing.assert_close(G.to_dense(), J.T @ J / 6, rtol=1e-10, atol=1e-12)


def test_ggn_bad_loss_shape_is_clear():
    params, model, X, Y = _mlp_problem()
    with pytest.raises(ValueError, match="per-sample"):  # elementwise losses: neither (batch,) nor a scalar
        linops.ggn(model, lambda o, y: (o - y) ** 2, params, (X, Y)).matvec(torch.ones(24, dtype=D64))
    # a reduced scalar is accepted: its output-space Hessian 2/(b c) I for the mean squared error
    G = linops.ggn(model, lambda o, y: ((o - y) ** 2).mean(), params, (X, Y))
    Gs = linops.ggn(model, lambda o, y: ((o - y) ** 2).sum(-1), params, (X, Y))  # per-sample sums: 2/b I
    torch.testing.assert_close(G.to_dense() * Y.shape[1], Gs.to_dense(), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- jacobian / gram
def test_jacobian_and_gram_non_square():
    g = torch.Generator().manual_seed(4)
    A = torch.randn(7, 3, generator=g, dtype=D64)
    t = torch.linspace(0, 1, 7, dtype=D64)

    def r(p, t, A):
        return torch.sin(A @ p["w"]) * t + p["s"] ** 2

    p0 = {"w": torch.randn(3, generator=g, dtype=D64), "s": torch.tensor(0.4, dtype=D64)}
    J = linops.jacobian(r, p0, t, A)
    spec = J.spec
    x0 = spec.flatten()
    Jref = jacrev(lambda z: r(spec.unflatten(z), t, A))(x0)
    assert J.shape == (7, 4)
    torch.testing.assert_close(J.to_dense(), Jref)
    v, u = torch.randn(4, dtype=D64, generator=g), torch.randn(7, dtype=D64, generator=g)
    torch.testing.assert_close(J @ v, Jref @ v)
    torch.testing.assert_close(J.T @ u, Jref.T @ u)
    torch.testing.assert_close(u @ J, u @ Jref)
    U = torch.randn(7, 2, dtype=D64, generator=g)
    torch.testing.assert_close(J.T @ U, Jref.T @ U)
    torch.testing.assert_close(J.rmatmat(U), Jref.T @ U)
    Gm = linops.gram(J)
    assert Gm.shape == (7, 7) and Gm.is_psd
    torch.testing.assert_close(Gm.to_dense(), Jref @ Jref.T)
    torch.testing.assert_close(Gm @ U, Jref @ Jref.T @ U)
    # J^T J through operator algebra, and J J^T via a product node
    torch.testing.assert_close((J.T @ J).to_dense(), Jref.T @ Jref)
    torch.testing.assert_close((J @ J.T).to_dense(), Jref @ Jref.T)
    torch.testing.assert_close(J.residuals, r(p0, t, A))


def test_jacobian_over_batches_stacks_rows():
    g = torch.Generator().manual_seed(5)
    X = torch.randn(9, 2, generator=g, dtype=D64)
    w0 = torch.randn(2, generator=g, dtype=D64)
    data = DataLoader(TensorDataset(X), batch_size=4)  # batches are 1-tuples... lists in fact
    J = linops.jacobian(lambda w, b: torch.exp(b[0] @ w), w0, data=data)
    Jref = jacrev(lambda w: torch.exp(X @ w))(w0)
    torch.testing.assert_close(J.to_dense(), Jref)


# --------------------------------------------------------------------------- operator algebra
def test_operator_algebra_and_scipy_interop():
    g = torch.Generator().manual_seed(6)
    M = torch.randn(6, 6, generator=g, dtype=D64)
    S = M @ M.T + torch.eye(6, dtype=D64)
    K = torch.randn(6, 6, generator=g, dtype=D64)
    K = K + K.T
    x0 = torch.randn(6, generator=g, dtype=D64)
    A = linops.hessian(lambda x: 0.5 * x @ S @ x + torch.cos(x).sum() * 0.0, x0)
    B = linops.aslinearoperator(K)
    assert B.is_symmetric
    torch.testing.assert_close((A + B).to_dense(), S + K)
    torch.testing.assert_close((2 * A).to_dense(), 2 * S)
    torch.testing.assert_close((A * 0.5).to_dense(), 0.5 * S)
    torch.testing.assert_close((A - B).to_dense(), S - K)
    torch.testing.assert_close((-A).to_dense(), -S)
    torch.testing.assert_close((A / 4).to_dense(), S / 4)
    torch.testing.assert_close((A @ B).to_dense(), S @ K)
    torch.testing.assert_close((A @ B).T.to_dense(), (S @ K).T)
    torch.testing.assert_close(A.T.to_dense(), S)
    torch.testing.assert_close(A.damped(0.3).to_dense(), S + 0.3 * torch.eye(6, dtype=D64))
    torch.testing.assert_close(A.damped(torch.tensor(0.3, dtype=D64)).to_dense(), S + 0.3 * torch.eye(6, dtype=D64))
    assert A.damped(0.3).is_symmetric and (2 * A).is_symmetric and not (-A).is_psd
    V = torch.randn(6, 3, generator=g, dtype=D64)
    torch.testing.assert_close(A.matmat(V), S @ V)
    n0 = A.n_matvecs
    A.matmat(V)
    assert A.n_matvecs - n0 == 3

    sp = A.damped(0.1).to_scipy()
    Sd = (S + 0.1 * torch.eye(6, dtype=D64)).numpy()
    assert sp.shape == (6, 6) and sp.dtype == np.float64
    vals = spla.eigsh(sp, k=2, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(vals), np.linalg.eigvalsh(Sd)[-2:], rtol=1e-10)
    b = np.arange(6.0)
    x, info = spla.cg(sp, b, rtol=1e-12, atol=0.0)
    assert info == 0
    np.testing.assert_allclose(x, np.linalg.solve(Sd, b), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(sp @ np.eye(6), Sd, rtol=1e-12, atol=1e-12)
    # float32 operator converts float64 numpy input
    A32 = linops.aslinearoperator(S.float())
    out = A32.to_scipy().matvec(np.ones(6))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, (S.float() @ torch.ones(6)).numpy(), rtol=1e-6)


def test_operator_shape_errors():
    A = linops.aslinearoperator(torch.eye(3, dtype=D64))
    with pytest.raises(ValueError, match="shape"):
        A @ torch.ones(4, dtype=D64)
    with pytest.raises(ValueError):
        A + linops.aslinearoperator(torch.eye(4, dtype=D64))
    with pytest.raises(ValueError, match="dtype"):
        A + linops.aslinearoperator(torch.eye(3, dtype=torch.float32))
    J = linops.aslinearoperator(torch.ones(2, 3, dtype=D64))
    with pytest.raises(ValueError, match="square"):
        J.damped(1.0)


# --------------------------------------------------------------------------- Krylov
def _spd(n, seed, dtype=D64, cond=100.0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=dtype))
    ev = torch.logspace(0, math.log10(cond), n, dtype=dtype)
    return (Q * ev) @ Q.T, g


@pytest.mark.parametrize("dtype", [torch.float32, D64])
def test_cg_matrix_rhs_and_preconditioner(dtype):
    A, g = _spd(30, 0, dtype)
    B = torch.randn(30, 4, generator=g, dtype=dtype)
    tol = 1e-10 if dtype == D64 else 1e-5
    res = linalg.cg(A, B, tol=tol)
    assert res.converged and res.status == "converged" and res.x.shape == (30, 4)
    ref = torch.linalg.solve(A.double(), B.double())
    assert torch.linalg.norm(A @ res.x - B, dim=0).max() <= 10 * tol * torch.linalg.norm(B, dim=0).max()
    assert res.residual_norm.shape == (4,)
    torch.testing.assert_close(res.x.double(), ref, rtol=1e-3 if dtype != D64 else 1e-7, atol=1e-4)
    # Jacobi preconditioner as a callable and as an operator; fewer or equal iterations with exact inverse
    Minv = torch.linalg.inv(A)
    resM = linalg.cg(A, B, tol=tol, M=Minv)
    assert resM.converged and resM.n_iter <= 3
    resM2 = linalg.cg(A, B[:, 0], tol=tol, M=lambda r: r / torch.diagonal(A))
    assert resM2.converged and resM2.x.shape == (30,)
    # operator and callable forms
    op = linops.aslinearoperator(A)
    r2 = linalg.cg(op, B[:, 1], tol=tol)
    r3 = linalg.cg(lambda v: A @ v, B[:, 1], tol=tol)
    torch.testing.assert_close(r2.x, r3.x)
    assert r2.n_matvecs >= r2.n_iter


def test_cg_negative_curvature_report():
    A = torch.diag(torch.tensor([3.0, 2.0, -1.0, 1.0], dtype=D64))
    b = torch.ones(4, dtype=D64)
    res = linalg.cg(A, b, tol=1e-12)
    assert not res.converged and res.negative_curvature and res.status == "negative_curvature"
    d = res.direction
    assert d is not None and float(d @ A @ d) <= 0
    # block form: one column SPD-solvable, one with negative curvature
    B = torch.stack([torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=D64), b], 1)
    resB = linalg.cg(A, B, tol=1e-12)
    assert resB.status == "negative_curvature"
    conv = resB.info["converged_columns"]
    assert bool(conv[0]) and not bool(conv[1])
    torch.testing.assert_close(A @ resB.x[:, 0], B[:, 0])


def test_cg_input_errors():
    A, _ = _spd(5, 1)
    with pytest.raises(ValueError, match="square"):
        linalg.cg(torch.ones(5, 4, dtype=D64), torch.ones(5, dtype=D64))
    with pytest.raises(ValueError, match="square"):
        linalg.cg(linops.aslinearoperator(torch.ones(5, 4, dtype=D64)), torch.ones(5, dtype=D64))
    with pytest.raises(ValueError, match="maxiter"):
        linalg.cg(A, torch.ones(5, dtype=D64), maxiter=0)
    with pytest.raises(ValueError, match="b "):
        linalg.cg(A, torch.ones(4, dtype=D64))
    with pytest.raises(ValueError, match="dtype"):
        linalg.cg(A, torch.ones(5, dtype=torch.float32))
    with pytest.raises(ValueError, match="tol"):
        linalg.cg(A, torch.ones(5, dtype=D64), tol=-1.0)
    with pytest.raises(ValueError, match="maxiter"):
        linalg.minres(A, torch.ones(5, dtype=D64), maxiter=0)
    with pytest.raises(ValueError, match="k"):
        linalg.lanczos(A, 0)


def test_minres_indefinite_and_shift():
    g = torch.Generator().manual_seed(7)
    Q, _ = torch.linalg.qr(torch.randn(25, 25, generator=g, dtype=D64))
    ev = torch.cat([-torch.logspace(0, 2, 10, dtype=D64), torch.logspace(-1, 1, 15, dtype=D64)])
    A = (Q * ev) @ Q.T
    B = torch.randn(25, 3, generator=g, dtype=D64)
    res = linalg.minres(A, B, tol=1e-11)
    assert res.converged
    torch.testing.assert_close(res.x, torch.linalg.solve(A, B), rtol=1e-7, atol=1e-8)
    res2 = linalg.minres(linops.aslinearoperator(A), B[:, 0], shift=0.5, tol=1e-11)
    torch.testing.assert_close(
        res2.x, torch.linalg.solve(A - 0.5 * torch.eye(25, dtype=D64), B[:, 0]), rtol=1e-7, atol=1e-8
    )
    # CG on the same indefinite system reports negative curvature instead of garbage
    assert linalg.cg(A, B[:, 0]).status in ("negative_curvature", "breakdown")


def test_lanczos_against_eigvalsh():
    A, g = _spd(40, 8)
    res = linalg.lanczos(A, 40, generator=g)
    T = res.tridiagonal()
    torch.testing.assert_close(torch.linalg.eigvalsh(T), torch.linalg.eigvalsh(A), rtol=1e-9, atol=1e-9)
    Qb = res.Q if hasattr(res, "Q") else res.basis
    torch.testing.assert_close(Qb.T @ Qb, torch.eye(Qb.shape[1], dtype=D64), atol=1e-10, rtol=0)
    res10 = linalg.lanczos(linops.aslinearoperator(A), 12, generator=torch.Generator().manual_seed(0))
    theta, _ = res10.ritz()
    assert abs(float(theta[-1]) - float(torch.linalg.eigvalsh(A)[-1])) < 1e-3 * 100


def test_randomized_routines():
    g = torch.Generator().manual_seed(9)
    U, _ = torch.linalg.qr(torch.randn(50, 50, generator=g, dtype=D64))
    ev = torch.cat(
        [torch.tensor([100.0, 50.0, 20.0, 10.0, 5.0], dtype=D64), 1e-6 * torch.rand(45, generator=g, dtype=D64)]
    )
    A = (U * ev) @ U.T
    vals, vecs = linalg.randomized_eigh(A, 5, generator=g)
    torch.testing.assert_close(torch.sort(vals, descending=True).values, ev[:5], rtol=1e-6, atol=1e-6)
    Un, lam = linalg.nystrom(linops.aslinearoperator(A, psd=True), 5, generator=g)
    torch.testing.assert_close((Un * lam) @ Un.T, A, rtol=0, atol=1e-5)
    R = torch.randn(30, 8, generator=g, dtype=D64) @ torch.randn(8, 20, generator=g, dtype=D64)
    Us, S, V = linalg.randomized_svd(R, 8, generator=g)
    torch.testing.assert_close(S, torch.linalg.svdvals(R)[:8], rtol=1e-8, atol=1e-8)
    Vm = V if V.shape == (20, 8) else V.T
    torch.testing.assert_close((Us * S) @ Vm.T, R, rtol=1e-8, atol=1e-8)
    Q = linalg.randomized_range_finder(R, 8, generator=g)
    torch.testing.assert_close(Q @ (Q.T @ R), R, rtol=1e-8, atol=1e-8)


# --------------------------------------------------------------------------- problems and solve
def _rosen(x):
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def test_newton_cg_solve_scipy_agreement_and_structure():
    from scipy.optimize import minimize, rosen, rosen_der, rosen_hess

    x0 = {"a": torch.full((3,), -1.0, dtype=D64), "b": torch.tensor(0.5, dtype=D64)}
    prob = cl.Minimize(lambda p: _rosen(torch.cat([p["a"], p["b"].reshape(1)])), x0)
    res = cl.solve(prob, cl.solvers.NewtonCG(), max_iter=200, tol=1e-10)
    assert res.converged and res.status == "converged"
    assert isinstance(res.params, dict) and res.params["b"].shape == ()
    ref = minimize(
        rosen,
        np.array([-1.0, -1, -1, 0.5]),
        method="trust-exact",
        jac=rosen_der,
        hess=rosen_hess,
        options={"gtol": 1e-12},
    )
    got = torch.cat([res.params["a"], res.params["b"].reshape(1)]).numpy()
    np.testing.assert_allclose(got, ref.x, atol=1e-8)
    np.testing.assert_allclose(got, np.ones(4), atol=1e-8)
    assert x0["a"][0] == -1.0  # the user's tensors are untouched
    h = res.history
    assert len(h) == res.n_iter and set(["value", "grad_norm", "step_size", "time", "matvecs"]) <= set(h.keys())
    assert h["value"][-1] == h[-1]["value"]


def test_supervised_module_solve_returns_new_module():
    torch.manual_seed(0)
    net = Net()
    X, Y = torch.randn(20, 3, dtype=D64), torch.randn(20, 2, dtype=D64)
    loader = DataLoader(TensorDataset(X, Y), batch_size=7)
    prob = cl.SupervisedLoss(net, lambda o, y: 0.5 * ((o - y) ** 2).sum(-1), data=loader)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    v0 = float(prob.value(prob.x0))
    fun, x = module_loss_flat(net, X, Y)
    assert abs(v0 - float(fun(x))) < 1e-12  # sample-weighted mean over unequal batches
    res = cl.solve(prob, cl.solvers.NewtonCG(), max_iter=5)
    assert isinstance(res.params, Net) and res.params is not net
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    assert res.value < v0
    assert torch.equal(res.params.scale, net.scale)


@pytest.mark.parametrize(
    "make",
    [lambda: cl.solvers.GradientDescent(lr=0.05), lambda: cl.solvers.Adam(lr=0.05), lambda: cl.solvers.NewtonCG()],
)
def test_save_resume_bit_identical(tmp_path, make):
    g = torch.Generator().manual_seed(11)
    X = torch.randn(24, 3, generator=g, dtype=D64)
    y = (X @ torch.tensor([1.0, -2.0, 0.5], dtype=D64)).sin()
    data = [(X[i : i + 8], y[i : i + 8]) for i in range(0, 24, 8)]
    w0 = torch.zeros(3, dtype=D64)

    def loss(w, b):
        return ((torch.tanh(b[0] @ w) - b[1]) ** 2).mean() + 1e-3 * (w**2).sum()

    prob = cl.Minimize(loss, w0, data)
    full = make().solve(prob, max_iter=8, tol=0.0)
    prob2 = cl.Minimize(loss, w0, data)
    part = make().solve(prob2, max_iter=3, tol=0.0)
    path = tmp_path / "state.pt"
    torch.save(part.state, path)
    state = torch.load(path, weights_only=False)
    prob3 = cl.Minimize(loss, w0, data)
    rest = cl.solve(prob3, make(), max_iter=8, tol=0.0, state=state)
    assert rest.n_iter == full.n_iter == 8
    assert torch.equal(rest.params, full.params)
    assert rest.value == full.value


def test_progress_bar_and_callback(capsys):
    prob = cl.Minimize(lambda x: ((x - 1.0) ** 2).sum(), torch.zeros(3))
    seen = []
    res = cl.solve(
        prob,
        cl.solvers.GradientDescent(lr=0.1),
        max_iter=50,
        tol=0.0,
        progress=True,
        callback=lambda st: seen.append(int(st["iter"])) or len(seen) >= 4,
    )
    assert res.status == "callback" and res.n_iter == 4 and seen == [1, 2, 3, 4]
    err = capsys.readouterr().err
    assert "GradientDescent" in err or "value" in err


def test_solve_bad_arguments():
    prob = cl.Minimize(lambda x: (x**2).sum(), torch.ones(2))
    with pytest.raises(ValueError, match="max_iter"):
        cl.solve(prob, cl.solvers.NewtonCG(), max_iter=0)
    with pytest.raises(TypeError, match="lrr"):
        cl.solvers.GradientDescent(lrr=0.1)
    with pytest.raises(TypeError, match="solver"):
        cl.solve(prob, "newton")
    with pytest.raises(TypeError, match="loss"):
        cl.Minimize(3.0, torch.ones(2))


def test_data_batch_mismatch_is_value_error():
    W = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="data"):
        cl.Minimize(lambda w, b: (b @ w).sum(), W, torch.ones(5, 4))
    with pytest.raises(ValueError):
        cl.SupervisedLoss(
            lambda p, x: x @ p,
            lambda o, y: ((o - y) ** 2).sum(-1),
            torch.zeros(3, 2),
            (torch.ones(5, 4), torch.ones(5, 2)),
        )


def test_nonfinite_stops_with_nan_and_keeps_last_finite():
    calls = {"n": 0}

    def loss(x):
        calls["n"] += 1
        v = ((x - 2.0) ** 2).sum()
        return v if float(x[0].detach()) < 0.5 else v * float("nan")

    x0 = torch.zeros(2, dtype=D64)
    res = cl.solve(cl.Minimize(loss, x0), cl.solvers.GradientDescent(lr=0.1), max_iter=50)
    assert res.status == "nan" and not res.converged
    assert torch.isfinite(res.params).all() and float(res.params[0]) < 0.5
    assert math.isfinite(res.value)
    assert torch.equal(x0, torch.zeros(2, dtype=D64))
    with pytest.raises(FloatingPointError):
        cl.solve(cl.Minimize(loss, x0), cl.solvers.GradientDescent(lr=0.1), max_iter=50, raise_on_nan=True)
    # non-finite from the start: nothing is taken, parameters come back as they went in
    res0 = cl.solve(cl.Minimize(lambda x: x.sum() * float("inf"), x0), cl.solvers.NewtonCG(), max_iter=5)
    assert res0.status == "nan" and torch.equal(res0.params, x0)


@pytest.mark.parametrize("dtype", [torch.float32, D64])
def test_dtype_preserved_through_solve(dtype):
    x0 = (torch.zeros(2, dtype=dtype), torch.ones(1, dtype=dtype))
    prob = cl.Minimize(lambda p: ((p[0] - 1) ** 2).sum() + (p[1] ** 2).sum(), x0)
    res = cl.solve(prob, cl.solvers.NewtonCG(), max_iter=20, tol=1e-5)
    assert isinstance(res.params, tuple) and all(t.dtype == dtype for t in res.params)
    assert res.converged
    torch.testing.assert_close(res.params[0], torch.ones(2, dtype=dtype))
