"""Every curvature operator against dense torch.func references (float64, 1e-10)."""

from __future__ import annotations

import pytest
import torch

import curvlab as cl
from tests.conftest import dense_hessian, make_mlp

TOL = 1e-10


def _batches(X, Y, sizes=(5, 4, 3)):
    out, i = [], 0
    for s in sizes:
        out.append((X[i : i + s], Y[i : i + s]))
        i += s
    return out


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("mode", ["reverse", "forward"])
@pytest.mark.parametrize("multi", [False, True])
def test_hessian_dense(loss, mode, multi):
    params, model, loss_fn, f, X, Y, spec = make_mlp(loss)
    data = _batches(X, Y) if multi else (X, Y)
    H = cl.linops.hessian(f, params, data=data, mode=mode)
    Hd = dense_hessian(f, spec, (X, Y))
    assert H.shape == Hd.shape and H.is_symmetric
    torch.testing.assert_close(H.to_dense(), Hd, atol=TOL, rtol=0)
    v = torch.randn(H.shape[0], dtype=torch.float64)
    torch.testing.assert_close(H @ v, Hd @ v, atol=TOL, rtol=0)
    g = torch.func.grad(lambda x: f(spec.unflatten(x), (X, Y)))(spec.flatten())
    torch.testing.assert_close(H.gradient, g, atol=TOL, rtol=0)
    torch.testing.assert_close(H.value, f(params, (X, Y)), atol=TOL, rtol=0)


def test_hessian_sum_reduction_and_args():
    A = torch.randn(4, 4, dtype=torch.float64)
    A = A @ A.T

    def f(x, batch, scale):
        return scale * 0.5 * x @ A @ x + batch.sum() * x.sum()

    batches = [torch.ones(2), torch.ones(3)]
    H = cl.linops.hessian(f, torch.zeros(4, dtype=torch.float64), 3.0, data=batches, reduction="sum")
    torch.testing.assert_close(H.to_dense(), 2 * 3.0 * A, atol=TOL, rtol=0)


def test_hessian_no_cache_equals_cache():
    params, model, loss_fn, f, X, Y, spec = make_mlp("ce")
    data = _batches(X, Y)
    V = torch.randn(spec.size, 3, dtype=torch.float64)
    a = cl.linops.hessian(f, params, data=data, cache=True) @ V
    b = cl.linops.hessian(f, params, data=data, cache=False) @ V
    torch.testing.assert_close(a, b, atol=TOL, rtol=0)


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("multi", [False, True])
def test_ggn_dense(loss, multi):
    params, model, loss_fn, f, X, Y, spec = make_mlp(loss)
    x0 = spec.flatten()
    data = _batches(X, Y) if multi else (X, Y)
    G = cl.linops.ggn(model, loss_fn, params, data)
    J = torch.func.jacrev(lambda x: model(spec.unflatten(x), X))(x0)  # (N, C, P)
    out = model(params, X)
    Q = torch.stack([torch.func.hessian(lambda o, y=y: loss_fn(o[None], y[None]).sum())(o) for o, y in zip(out, Y)])
    Gd = torch.einsum("ncp,ncd,ndq->pq", J, Q, J) / X.shape[0]
    assert G.is_psd
    torch.testing.assert_close(G.to_dense(), Gd, atol=TOL, rtol=0)
    torch.testing.assert_close(
        G.gradient, torch.func.grad(lambda x: f(spec.unflatten(x), (X, Y)))(x0), atol=TOL, rtol=0
    )


def test_ggn_of_mse_is_jtj_and_cross_entropy_block():
    params, model, loss_fn, f, X, Y, spec = make_mlp("ce", n=6)
    x0 = spec.flatten()
    J = torch.func.jacrev(lambda x: model(spec.unflatten(x), X))(x0)
    p = torch.softmax(model(params, X), -1)
    Q = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # closed-form softmax Hessian
    Gd = torch.einsum("ncp,ncd,ndq->pq", J, Q, J) / 6
    G = cl.linops.ggn(model, loss_fn, params, (X, Y))
    torch.testing.assert_close(G.to_dense(), Gd, atol=TOL, rtol=0)


@pytest.mark.parametrize("multi", [False, True])
def test_fisher_dense(multi):
    params, model, loss_fn, f, X, Y, spec = make_mlp("ce")
    x0 = spec.flatten()
    data = _batches(X, Y) if multi else (X, Y)
    F = cl.linops.fisher(model, loss_fn, params, data)
    G = torch.func.vmap(
        lambda x1, y1: torch.func.grad(lambda x: loss_fn(model(spec.unflatten(x), x1[None]), y1[None]).sum())(x0)
    )(X, Y)
    torch.testing.assert_close(F.to_dense(), G.T @ G / X.shape[0], atol=TOL, rtol=0)
    Fs = cl.linops.fisher(model, loss_fn, params, data, reduction="sum")
    torch.testing.assert_close(Fs.to_dense(), G.T @ G, atol=TOL, rtol=0)


@pytest.mark.parametrize("multi", [False, True])
def test_jacobian_and_gram_dense(multi):
    params, model, loss_fn, f, X, Y, spec = make_mlp("mse")
    x0 = spec.flatten()
    data = _batches(X, Y) if multi else (X, Y)

    def res(p, batch):
        return model(p, batch[0]) - batch[1]

    J = cl.linops.jacobian(res, params, data=data)
    Jd = torch.func.jacrev(lambda x: (model(spec.unflatten(x), X) - Y).reshape(-1))(x0)
    assert J.shape == Jd.shape
    torch.testing.assert_close(J.to_dense(), Jd, atol=TOL, rtol=0)
    v, u = torch.randn(J.shape[1], dtype=torch.float64), torch.randn(J.shape[0], dtype=torch.float64)
    torch.testing.assert_close(J @ v, Jd @ v, atol=TOL, rtol=0)
    torch.testing.assert_close(J.rmatvec(u), Jd.T @ u, atol=TOL, rtol=0)
    torch.testing.assert_close(J.T @ u, Jd.T @ u, atol=TOL, rtol=0)
    torch.testing.assert_close(J.residuals, (model(params, X) - Y).reshape(-1), atol=TOL, rtol=0)
    K = cl.linops.gram(J)
    torch.testing.assert_close(K.to_dense(), Jd @ Jd.T, atol=TOL, rtol=0)
    torch.testing.assert_close(K @ u, Jd @ (Jd.T @ u), atol=TOL, rtol=0)


def test_module_params_and_matmat_equals_loop():
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    X, Y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)

    def loss_fn(o, y):
        return ((o - y) ** 2).sum(-1)

    G = cl.linops.ggn(net, loss_fn, None, (X, Y))
    assert G.spec.keys == ["0.weight", "0.bias", "2.weight", "2.bias"]
    V = torch.randn(G.shape[0], 4, dtype=torch.float64)
    loop = torch.stack([G @ V[:, j] for j in range(4)], 1)
    torch.testing.assert_close(G @ V, loop, atol=TOL, rtol=0)

    def f(p, batch):
        return loss_fn(torch.func.functional_call(net, p, (batch[0],)), batch[1]).mean()

    H = cl.linops.hessian(f, net, data=(X, Y))
    spec = H.spec
    Hd = torch.func.hessian(lambda x: f(spec.unflatten(x), (X, Y)))(spec.flatten())
    torch.testing.assert_close(H @ V, Hd @ V, atol=TOL, rtol=0)


def test_float32_stays_float32():
    params, model, loss_fn, f, X, Y, spec = make_mlp("mse")
    p32 = {k: v.float() for k, v in params.items()}
    H = cl.linops.hessian(f, p32, data=(X.float(), Y.float()))
    out = H @ torch.randn(H.shape[0])
    assert out.dtype == torch.float32 and H.dtype == torch.float32


def test_errors():
    with pytest.raises(ValueError, match="scalar"):
        cl.linops.hessian(lambda x: x * 2, torch.zeros(3)).matvec(torch.ones(3))
    with pytest.raises(TypeError, match="callable"):
        cl.linops.hessian(3, torch.zeros(3))
    with pytest.raises(ValueError, match="mode"):
        cl.linops.hessian(lambda x: x.sum(), torch.zeros(3), mode="sideways")
    with pytest.raises(TypeError, match="floating"):
        cl.linops.hessian(lambda x: x.sum(), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="dtype"):
        cl.linops.hessian(lambda p: p[0].sum(), (torch.zeros(2), torch.zeros(2, dtype=torch.float64)))
    with pytest.raises(ValueError, match="shape"):
        cl.linops.hessian(lambda x: (x**2).sum(), torch.zeros(3)).matvec(torch.ones(4))
    params, model, loss_fn, f, X, Y, spec = make_mlp("mse")
    with pytest.raises(ValueError, match="per-sample"):  # elementwise (b, c) losses: neither per-sample nor scalar
        cl.linops.ggn(model, lambda o, y: (o - y) ** 2, params, (X, Y)).matvec(
            torch.ones(spec.size, dtype=torch.float64)
        )
    with pytest.raises(ValueError, match="data"):
        cl.linops.ggn(model, loss_fn, params, None)


def test_dataloader_data_sums_exactly():
    params, model, loss_fn, f, X, Y, spec = make_mlp("ce", n=20)
    ds = torch.utils.data.TensorDataset(X, Y)
    loader = torch.utils.data.DataLoader(ds, batch_size=6, shuffle=False)  # last batch has 2 samples
    H = cl.linops.hessian(f, params, data=loader)
    torch.testing.assert_close(H.to_dense(), dense_hessian(f, spec, (X, Y)), atol=TOL, rtol=0)
    G = cl.linops.ggn(model, loss_fn, params, loader)
    G1 = cl.linops.ggn(model, loss_fn, params, (X, Y))
    v = torch.randn(spec.size, dtype=torch.float64)
    torch.testing.assert_close(G @ v, G1 @ v, atol=TOL, rtol=0)


def test_params_on_different_devices_rejected():
    with pytest.raises(ValueError, match="device"):
        cl.linops.hessian(lambda p: p[0].sum(), (torch.zeros(2), torch.zeros(2, device="meta")))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_operators_stay_on_the_parameters_device(device):
    params, model, loss_fn, f, X, Y, spec = make_mlp("ce")
    p = {k: v.to(device) for k, v in params.items()}
    data = (X.to(device), Y.to(device))
    for op in (
        cl.linops.hessian(f, p, data=data),
        cl.linops.ggn(model, loss_fn, p, data),
        cl.linops.fisher(model, loss_fn, p, data),
    ):
        out = op @ torch.ones(op.shape[0], dtype=torch.float64, device=device)
        assert out.device.type == device and op.device.type == device
    Hd = dense_hessian(f, spec, (X, Y))
    torch.testing.assert_close(cl.linops.hessian(f, p, data=data).to_dense().cpu(), Hd, atol=1e-9, rtol=0)
