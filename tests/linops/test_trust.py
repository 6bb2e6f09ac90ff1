"""Operators that can be trusted: determinism check, independence errors, the supervised Hessian form,
reduced losses in GGN / Fisher, the Monte-Carlo Fisher, attention models, empty batches, batched vjps.

Every numerical claim is checked against an independent dense reference (torch.func / autograd on a
small model, finite differences of gradients in float64).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvlab as cl
from curvlab.linops import NondeterministicError, batched_vjp

D64 = torch.float64


def _mlp(seed=0, d=3, h=5, c=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, c)).to(D64)


def _data(n=20, d=3, c=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=D64), torch.randint(0, c, (n,), generator=g)


def _flat_loss(net, spec, fn):
    def f(flat):
        return fn(torch.func.functional_call(net, spec.unflatten(flat), ()))

    return f


def _dense_hessian(net, X, y, loss=F.cross_entropy):
    spec = cl.params.ParamSpec(net)

    def f(flat):
        return loss(torch.func.functional_call(net, spec.unflatten(flat), (X,)), y)

    return torch.func.hessian(f)(spec.flatten())


# --------------------------------------------------------------------------- determinism check
def test_shuffling_loader_is_caught_at_the_second_product():
    net = _mlp()
    X, y = _data(n=32)
    loader = DataLoader(TensorDataset(X, y), batch_size=8, shuffle=True)
    v = torch.randn(sum(p.numel() for p in net.parameters()), dtype=D64)
    for make in (
        lambda **kw: cl.linops.hessian(net, F.cross_entropy, data=loader, **kw),
        lambda **kw: cl.linops.ggn(net, F.cross_entropy, None, loader, **kw),
        lambda **kw: cl.linops.fisher(net, F.cross_entropy, None, loader, **kw),
        lambda **kw: cl.linops.hessian(net, F.cross_entropy, data=loader, mode="forward", **kw),
    ):
        torch.manual_seed(0)
        op = make()
        op @ v  # the first product is the reference
        with pytest.raises(NondeterministicError, match="shuffle=True"):
            op @ v
        torch.manual_seed(0)
        make(check_deterministic=False) @ v  # accepted when asked
    # the Jacobian compares its construction pass with the first product's
    J = cl.linops.jacobian(lambda p, b: torch.func.functional_call(net, p, (b[0],)).reshape(-1), net, data=loader)
    with pytest.raises(NondeterministicError, match="data changed"):
        J @ v
    # a fixed loader is never flagged, and the products sum the data exactly
    fixed = DataLoader(TensorDataset(X, y), batch_size=8)
    H = cl.linops.hessian(net, F.cross_entropy, data=fixed)
    torch.testing.assert_close(H @ v, H @ v, rtol=0, atol=0)
    torch.testing.assert_close(H @ v, _dense_hessian(net, X, y) @ v, rtol=1e-10, atol=1e-12)


def test_randomness_outside_torch_is_caught_and_named():
    net = _mlp()
    X, y = _data()
    rng = np.random.default_rng(0)

    def f(p, b):
        noise = float(rng.normal())  # numpy randomness: curvlab cannot fix it
        return F.cross_entropy(torch.func.functional_call(net, p, (b[0],)), b[1]) * (1 + 0.1 * noise)

    H = cl.linops.hessian(f, net, data=[(X[:10], y[:10]), (X[10:], y[10:])])
    v = torch.ones(H.shape[0], dtype=D64)
    H @ v
    with pytest.raises(NondeterministicError, match="different values on batch 0"):
        H @ v


def test_dropout_in_train_mode_is_deterministic_and_warned():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).to(D64)
    X, y = _data(n=32)
    loader = DataLoader(TensorDataset(X, y), batch_size=8)
    with pytest.warns(UserWarning, match="dropout"):
        G = cl.linops.ggn(net, F.cross_entropy, None, loader)
    v = torch.randn(G.shape[0], dtype=D64)
    a, b = G @ v, G @ v
    assert torch.equal(a, b)  # masks fixed per batch: one matrix
    eig = cl.spectrum.eigsh(G, k=2, seed=0)
    assert eig.converged
    with pytest.warns(UserWarning, match="dropout"):
        cl.linops.hessian(net, F.cross_entropy, data=(X, y))


def test_cached_operators_do_no_extra_work():
    """A single batch is cached: products replay one graph and are not checked (no fingerprint, no sync)."""
    net = _mlp()
    X, y = _data()
    H = cl.linops.hessian(net, F.cross_entropy, data=(X, y))
    v = torch.ones(H.shape[0], dtype=D64)
    H @ v
    H @ v
    assert H._reference is None and not H._verifies


# --------------------------------------------------------------------------- loss that ignores params
def test_loss_that_ignores_params_is_a_clear_error():
    net = _mlp()
    X, y = _data()
    crit = nn.CrossEntropyLoss()
    v = torch.ones(sum(p.numel() for p in net.parameters()), dtype=D64)
    with pytest.raises(ValueError, match="does not depend on params.*functional_call"):
        cl.linops.hessian(lambda p, b: crit(net(b[0]), b[1]), net, data=(X, y)) @ v
    with pytest.raises(ValueError, match="does not depend on params"):
        cl.linops.ggn(lambda p, x: net(x), crit, dict(net.named_parameters()), (X, y)) @ v
    with pytest.raises(ValueError, match="does not depend on params"):
        cl.linops.jacobian(lambda p, b: net(b[0]).reshape(-1), net, data=(X, y)) @ v
    with pytest.raises(ValueError, match="does not depend on params"):
        cl.Minimize(lambda p, b: crit(net(b[0]), b[1]), net, data=(X, y))
    with pytest.raises(ValueError, match="does not depend on params"):
        cl.SupervisedLoss(lambda p, x: net(x), crit, dict(net.named_parameters()), (X, y))
    with pytest.raises(ValueError, match="does not depend on params"):
        cl.LeastSquares(lambda p: torch.ones(3), torch.zeros(2))


# --------------------------------------------------------------------------- hessian(model, loss_fn, data)
def test_supervised_hessian_form_equals_functional_and_dense():
    net = _mlp()
    X, y = _data()
    ref = _dense_hessian(net, X, y)
    v = torch.randn(ref.shape[0], dtype=D64)
    batches = [(X[:7], y[:7]), (X[7:], y[7:])]
    for loss in (F.cross_entropy, nn.CrossEntropyLoss(), lambda o, t: F.cross_entropy(o, t, reduction="none")):
        for data in ((X, y), batches):
            H = cl.linops.hessian(net, loss, data=data)
            torch.testing.assert_close(H @ v, ref @ v, rtol=1e-10, atol=1e-12)
    # a functional model with explicit parameters
    p = {k: t.detach().clone() for k, t in net.named_parameters()}
    Hf = cl.linops.hessian(lambda q, x: torch.func.functional_call(net, q, (x,)), F.cross_entropy, p, data=(X, y))
    torch.testing.assert_close(Hf @ v, ref @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(Hf.gradient, torch.func.grad(lambda z: 0.0 + _loss_at(net, Hf, z, X, y))(Hf.x))
    with pytest.raises(ValueError, match="data"):
        cl.linops.hessian(net, F.cross_entropy)
    with pytest.raises(ValueError, match="parameters of a functional model"):
        cl.linops.hessian(lambda q, x: x, F.cross_entropy, data=(X, y))


def _loss_at(net, op, z, X, y):
    return F.cross_entropy(torch.func.functional_call(net, op.spec.unflatten(z), (X,)), y)


# --------------------------------------------------------------------------- reduced losses in ggn / fisher
def test_ggn_of_reduced_losses_is_the_output_space_hvp():
    net = _mlp()
    X, y = _data(n=12)
    spec = cl.params.ParamSpec(net)
    x = spec.flatten()
    J = torch.func.jacrev(lambda z: torch.func.functional_call(net, spec.unflatten(z), (X,)))(x).reshape(-1, x.numel())
    o = net(X).detach()

    def ref(L):  # J^T (d²L/do²) J with the full output-space Hessian of the scalar L
        Q = torch.func.hessian(lambda oo: L(oo.reshape(o.shape), y))(o.reshape(-1))
        return J.T @ Q @ J

    per_sample = cl.linops.ggn(net, lambda oo, t: F.cross_entropy(oo, t, reduction="none"), None, (X, y)).to_dense()
    for L in (F.cross_entropy, nn.CrossEntropyLoss()):
        G = cl.linops.ggn(net, L, None, (X, y)).to_dense()
        torch.testing.assert_close(G, ref(L), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(G, per_sample, rtol=1e-10, atol=1e-12)

    def coupled(oo, t):  # a loss that couples the samples: its output Hessian is not block diagonal
        return torch.logsumexp(oo.reshape(-1), 0) + F.cross_entropy(oo, t)

    torch.testing.assert_close(
        cl.linops.ggn(net, coupled, None, (X, y)).to_dense(), ref(coupled), rtol=1e-10, atol=1e-12
    )
    # over several batches a reduced batch mean is weighted n_b / N, like per-sample losses
    batches = [(X[:5], y[:5]), (X[5:], y[5:])]
    torch.testing.assert_close(
        cl.linops.ggn(net, F.cross_entropy, None, batches).to_dense(), per_sample, rtol=1e-10, atol=1e-12
    )


def test_empirical_fisher_of_a_reduced_loss_uses_one_sample_losses():
    net = _mlp()
    X, y = _data(n=9)
    spec = cl.params.ParamSpec(net)
    x = spec.flatten()
    Jl = torch.func.jacrev(
        lambda z: F.cross_entropy(torch.func.functional_call(net, spec.unflatten(z), (X,)), y, reduction="none")
    )(x)
    ref = Jl.T @ Jl / len(y)
    for L in (F.cross_entropy, nn.CrossEntropyLoss(), lambda o, t: F.cross_entropy(o, t, reduction="none")):
        torch.testing.assert_close(cl.linops.fisher(net, L, None, (X, y)).to_dense(), ref, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- Monte-Carlo Fisher
@pytest.mark.parametrize(
    "likelihood,loss,target",
    [
        ("categorical", F.cross_entropy, "labels"),
        ("categorical", lambda o, t: F.cross_entropy(o, t, reduction="none"), "probs"),
        ("gaussian", nn.MSELoss(), "values"),
        ("gaussian", lambda o, t: 0.5 * ((o - t) ** 2).sum(-1), "values"),
        ("bernoulli", nn.BCEWithLogitsLoss(), "binary"),
    ],
)
def test_mc_fisher_is_an_unbiased_estimate_of_the_ggn(likelihood, loss, target):
    """E[F_MC] = GGN for negative log-likelihoods of exponential families (natural parameters)."""
    net = _mlp()
    X, lab = _data(n=6)
    y = {
        "labels": lab,
        "probs": torch.softmax(torch.randn(6, 3, dtype=D64), 1),
        "values": torch.randn(6, 3, dtype=D64),
        "binary": (torch.rand(6, 3, dtype=D64) > 0.5).to(D64),
    }[target]
    kw = {} if not isinstance(loss, nn.Module) else {}
    if not isinstance(loss, nn.Module):
        kw["likelihood"] = likelihood
    G = cl.linops.ggn(net, loss, None, (X, y)).to_dense()
    Fmc = cl.linops.fisher(net, loss, None, (X, y), kind="mc", mc_samples=20000, seed=3, **kw)
    D = Fmc.to_dense()
    assert float((D - G).norm() / G.norm()) < 0.04  # Monte-Carlo error ~ 1/sqrt(S)
    v = torch.randn(D.shape[0], dtype=D64)
    assert torch.equal(Fmc @ v, Fmc @ v)  # labels drawn once: one fixed matrix
    few = cl.linops.fisher(net, loss, None, (X, y), kind="mc", mc_samples=1, seed=3, **kw).to_dense()
    assert float(torch.linalg.matrix_rank(few)) <= 6  # one sampled gradient per sample: rank <= n
    torch.testing.assert_close(few, few.T)


def test_mc_fisher_errors():
    net = _mlp()
    X, y = _data(n=6)
    with pytest.raises(ValueError, match="likelihood"):
        cl.linops.fisher(net, lambda o, t: F.cross_entropy(o, t), None, (X, y), kind="mc")
    with pytest.raises(ValueError, match="likelihood"):
        cl.linops.fisher(net, F.cross_entropy, None, (X, y), kind="mc", likelihood="poisson")
    with pytest.raises(ValueError, match="kind"):
        cl.linops.fisher(net, F.cross_entropy, None, (X, y), kind="true")
    with pytest.raises(ValueError, match="mc_samples"):
        cl.linops.fisher(net, F.cross_entropy, None, (X, y), kind="mc", mc_samples=0)


# --------------------------------------------------------------------------- attention
class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.enc(x).mean(1))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_attention_model_curvature_against_finite_differences(mode):
    """torch's fused CPU attention kernel has no double backward; the products select the math kernel."""
    torch.manual_seed(0)
    net = getattr(_Attn().to(D64), mode)()
    X = torch.randn(4, 5, 8, dtype=D64)
    y = torch.randint(0, 3, (4,))
    H = cl.linops.hessian(net, F.cross_entropy, data=(X, y))
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(1), dtype=D64)
    spec = H.spec

    def grad(z):  # an independent reference: plain autograd gradients (one backward) at z
        p = {k: t.detach().requires_grad_(True) for k, t in spec.unflatten(z.clone()).items()}
        loss = F.cross_entropy(torch.func.functional_call(net, p, (X,)), y)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(p.values()))])

    eps = 1e-6
    fd = (grad(H.x + eps * v) - grad(H.x - eps * v)) / (2 * eps)
    torch.testing.assert_close(H @ v, fd, rtol=1e-6, atol=1e-8)
    G = cl.linops.ggn(net, F.cross_entropy, None, (X, y))
    assert float(v @ (G @ v)) > 0
    # and a solve on an attention model runs (its Hessian products inside NewtonCG)
    r = cl.solvers.NewtonCG().solve(cl.SupervisedLoss(net, F.cross_entropy, data=(X, y)), max_iter=2)
    with torch.no_grad():
        assert r.value < float(F.cross_entropy(net(X), y))


# --------------------------------------------------------------------------- empty batches
def test_empty_batches_are_skipped():
    net = _mlp()
    X, y = _data()
    empty = (X[:0], y[:0])
    with_empty = [(X[:10], y[:10]), empty, (X[10:], y[10:]), empty]
    without = [(X[:10], y[:10]), (X[10:], y[10:])]
    v = torch.randn(sum(p.numel() for p in net.parameters()), dtype=D64)
    torch.testing.assert_close(
        cl.linops.hessian(net, F.cross_entropy, data=with_empty) @ v,
        _dense_hessian(net, X, y) @ v,
        rtol=1e-10,
        atol=1e-12,
    )
    torch.testing.assert_close(
        cl.linops.ggn(net, F.cross_entropy, None, with_empty) @ v,
        cl.linops.ggn(net, F.cross_entropy, None, without) @ v,
        rtol=1e-12,
        atol=1e-14,
    )
    p = cl.SupervisedLoss(net, F.cross_entropy, data=with_empty)
    assert torch.isfinite(p.value(p.x0))
    torch.testing.assert_close(p.value(p.x0), F.cross_entropy(net(X), y))
    assert all(p.draw(k)[0].shape[0] > 0 for k in range(6))  # the stream never draws an empty batch
    r = cl.solvers.GradientDescent().solve(p, max_iter=3)
    assert r.status != "nan" and r.n_iter == 3
    loader = DataLoader(TensorDataset(X, y), batch_size=10)
    r = cl.solvers.Adam(lr=1e-2).solve(cl.SupervisedLoss(net, F.cross_entropy, data=list(loader) + [empty]), max_iter=4)
    assert r.status != "nan"
    with pytest.raises(ValueError, match="no sample"):
        cl.SupervisedLoss(net, F.cross_entropy, data=[empty, empty])
    with pytest.raises(ValueError, match="no sample"):
        cl.linops.hessian(net, F.cross_entropy, data=empty) @ v


# --------------------------------------------------------------------------- the one vjp helper
@pytest.mark.parametrize("size", [(3, 4), (64, 256)])
def test_batched_vjp_matches_autograd_on_both_cpu_paths(size):
    """Small inputs take the vmapped backward, big ones (>= 32,768 entries) the loop: same numbers."""
    d, h = size
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, 4))
    X = torch.randn(512 if h > 100 else 8, d)
    ps = list(net.parameters())
    out = net(X)
    U = torch.randn(5, *out.shape)
    got = batched_vjp(out, ps, U, batched=True)
    for j in range(5):
        ref = torch.autograd.grad(out, ps, U[j], retain_graph=True)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a[j], b, rtol=1e-5, atol=1e-6)
    one = batched_vjp(out, ps[0], U[0])
    torch.testing.assert_close(one, torch.autograd.grad(out, ps[0], U[0], retain_graph=True)[0])
    unused = torch.zeros(3, requires_grad=True)
    z = batched_vjp(out, [ps[0], unused], U, batched=True)
    assert z[1].shape == (5, 3) and not z[1].any()
