"""Loss landscapes against direct loss evaluations; the user's model (state_dict) untouched; figures rendered."""

from __future__ import annotations

import matplotlib
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.func import functional_call

import curvlab as cl
from curvlab.spectrum import Landscape, eigsh, filter_normalized, landscape

matplotlib.use("Agg")
D64 = torch.float64


def _quadratic(n: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D64))
    ev = torch.linspace(-1.0, 3.0, n, dtype=D64)
    A = (Q * ev) @ Q.T
    A = 0.5 * (A + A.T)
    b = torch.randn(n, generator=g, dtype=D64)
    x0 = torch.randn(n, generator=g, dtype=D64)
    return A, b, x0, Q[:, -1]


def test_quadratic_along_the_top_eigenvector_is_the_closed_form():
    A, b, x0, u1 = _quadratic()

    def f(x):
        return 0.5 * x @ A @ x + b @ x

    L = landscape(f, x0, n_points=9, span=2.0, seed=0)
    assert isinstance(L, Landscape) and L.ndim == 1 and L.kind == "eigen" and L.n_evals == 10
    d = L.directions[:, 0]
    assert abs(float(d @ u1)) == pytest.approx(1.0, abs=1e-8)
    assert float(L.eigenvalues[0]) == pytest.approx(3.0, abs=1e-9)
    g = A @ x0 + b
    closed = f(x0) + L.alphas * (g @ d) + 0.5 * 3.0 * L.alphas**2
    torch.testing.assert_close(L.values, closed, atol=1e-10, rtol=0)
    torch.testing.assert_close(L.alphas, torch.linspace(-2, 2, 9, dtype=D64))
    assert L.center == pytest.approx(float(f(x0)))
    # 2-D along the top two eigenvectors: the quadratic form of the 2x2 projection
    L2 = landscape(f, x0, dim=2, n_points=5, span=(-1.0, 2.0), seed=0)
    assert L2.values.shape == (5, 5) and L2.betas is not None
    D = L2.directions
    for i, a in enumerate(L2.alphas.tolist()):
        for j, bb in enumerate(L2.betas.tolist()):
            assert float(L2.values[i, j]) == pytest.approx(float(f(x0 + a * D[:, 0] + bb * D[:, 1])), abs=1e-10)
    torch.testing.assert_close(L2.eigenvalues, torch.tensor([3.0, 3.0 - 4.0 / 11], dtype=D64), atol=1e-9, rtol=0)


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.bn = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


def _bn_setup():
    torch.manual_seed(0)
    net = BNNet().double().train()  # train mode: BatchNorm would update its running statistics
    with torch.no_grad():  # some non-trivial running statistics to protect
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2.0)
    X, y = torch.randn(30, 4, dtype=D64), torch.randint(0, 3, (30,))
    return net, X, y


def _direct(net, X, y, x):
    spec = cl.params.ParamSpec(net)
    p = spec.unflatten(x)
    bufs = {k: b.clone() for k, b in net.named_buffers()}
    with torch.no_grad():
        return float(F.cross_entropy(functional_call(net, {**p, **bufs}, (X,)), y))


@pytest.mark.parametrize("directions", ["eigen", "filter", "random"])
def test_module_form_matches_direct_evaluation_and_leaves_the_model_alone(directions):
    net, X, y = _bn_setup()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    L = landscape(
        net,
        nn.CrossEntropyLoss(),
        data=[(X[:20], y[:20]), (X[20:], y[20:])],
        directions=directions,
        dim=2,
        n_points=5,
        span=0.5,
        seed=1,
    )
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the landscape changed the model's state_dict"
    assert net.training
    x0 = cl.params.ParamSpec(net).flatten()
    D = L.directions
    # two batches of a train-mode BatchNorm net: the loss is the sample-weighted sum of the batch losses
    for i, j in ((0, 0), (2, 2), (4, 1), (1, 3)):
        x = x0 + float(L.alphas[i]) * D[:, 0] + float(L.betas[j]) * D[:, 1]
        ref = (20 * _direct(net, X[:20], y[:20], x) + 10 * _direct(net, X[20:], y[20:], x)) / 30
        assert float(L.values[i, j]) == pytest.approx(ref, abs=1e-12)
    assert float(L.values[2, 2]) == pytest.approx(L.center, abs=1e-14)
    if directions == "random":
        torch.testing.assert_close(torch.linalg.vector_norm(D, dim=0), torch.ones(2, dtype=D64))


def test_function_form_over_a_train_mode_module_restores_its_buffers():
    net, X, y = _bn_setup()
    before = {k: v.clone() for k, v in net.state_dict().items()}

    def f(p, batch):  # the PyHessian habit: the module runs in train mode and updates its statistics
        return F.cross_entropy(functional_call(net, p, (batch[0],)), batch[1])

    L = landscape(f, net, data=(X, y), n_points=7, span=0.3, seed=0)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    x0 = cl.params.ParamSpec(net).flatten()
    for i in (0, 3, 6):
        x = x0 + float(L.alphas[i]) * L.directions[:, 0]
        assert float(L.values[i]) == pytest.approx(_direct(net, X, y, x), abs=1e-12)


def test_filter_normalised_directions():
    net, X, y = _bn_setup()
    spec = cl.params.ParamSpec(net)
    x0 = spec.flatten()
    d = filter_normalized(torch.randn(spec.size, dtype=D64), spec, x0)
    for (name, p), part in zip(net.named_parameters(), torch.split(d, spec.numels)):
        part = part.reshape(p.shape)
        if p.ndim == 1:
            assert float(part.abs().max()) == 0.0, name  # biases and BatchNorm parameters ignored (Li et al.)
        else:
            torch.testing.assert_close(part.norm(dim=1), p.detach().norm(dim=1))
    L = landscape(net, nn.CrossEntropyLoss(), data=(X, y), directions="filter", n_points=3, seed=4)
    torch.testing.assert_close(
        torch.split(L.directions[:, 0], spec.numels)[0].reshape(8, 4).norm(dim=1), net.fc1.weight.detach().norm(dim=1)
    )
    parts = L.as_params(0)
    assert list(parts) == [k for k, _ in net.named_parameters()]


def test_operator_form_and_explicit_directions():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    X, y = torch.randn(25, 3, dtype=D64), torch.randint(0, 2, (25,))
    G = cl.linops.ggn(net, lambda o, t: F.cross_entropy(o, t, reduction="none"), None, (X, y))
    L = landscape(G, n_points=5, span=0.4, seed=0)
    top = eigsh(G, k=1, seed=0)
    assert float(L.eigenvalues[0]) == pytest.approx(float(top.eigenvalues[0]), rel=1e-8)
    x0 = G.x
    for i in range(5):
        x = x0 + float(L.alphas[i]) * L.directions[:, 0]
        assert float(L.values[i]) == pytest.approx(_direct_seq(net, X, y, x), abs=1e-12)
    # a Hessian operator of a function
    spec = cl.params.ParamSpec(net)

    def f(p, batch):
        return F.cross_entropy(functional_call(net, p, (batch[0],)), batch[1])

    H = cl.linops.hessian(f, net, data=(X, y))
    res = eigsh(H, k=2, seed=0)
    L2 = landscape(H, directions=res, n_points=3)
    assert L2.kind == "given" and L2.ndim == 2 and torch.equal(L2.directions, res.eigenvectors)
    Ls = landscape(H, directions=res.as_params(0), n_points=3)  # a structure like the parameters
    torch.testing.assert_close(Ls.directions[:, 0], res.eigenvectors[:, 0])
    Ll = landscape(H, directions=[res.eigenvectors[:, 1], res.as_params(0)], n_points=3)
    assert Ll.ndim == 2
    torch.testing.assert_close(Ll.values.T, L2.values)  # swapped directions transpose the grid
    with pytest.raises(ValueError, match="directions must"):
        landscape(H, directions=torch.ones(3))
    with pytest.raises(ValueError, match="1 or 2 directions"):
        landscape(H, directions=res.eigenvectors.repeat(1, 2))
    with pytest.raises(ValueError, match="directions must be one of"):
        landscape(H, directions="hessian")
    with pytest.raises(ValueError, match="dim must be"):
        landscape(H, dim=3)
    with pytest.raises(ValueError, match="span"):
        landscape(H, span=(1.0, -1.0))
    with pytest.raises(ValueError, match="needs data"):
        landscape(net, nn.CrossEntropyLoss())
    with pytest.raises(TypeError, match="loss function"):
        landscape(net, 3, data=(X, y))
    assert spec.size == H.shape[0]


def _direct_seq(net, X, y, x):
    p = cl.params.ParamSpec(net).unflatten(x)
    with torch.no_grad():
        return float(F.cross_entropy(functional_call(net, p, (X,)), y))


def test_plots_and_save(tmp_path):
    from matplotlib.figure import Figure

    A, b, x0, _ = _quadratic()

    def f(x):
        return 0.5 * x @ A @ x + b @ x + 10.0

    L1 = landscape(f, x0, n_points=11, span=1.5, seed=0)
    ax = Figure().add_subplot(1, 1, 1)
    L1.plot(ax=ax, title="1-D")
    assert ax.get_xlim() == pytest.approx((-1.5, 1.5)) and ax.get_title() == "1-D"
    line = ax.lines[0]
    torch.testing.assert_close(torch.as_tensor(line.get_ydata()), L1.values)
    assert "eigenvector" in ax.get_xlabel() and ax.get_ylabel() == "loss"
    L2 = landscape(f, x0, dim=2, n_points=7, span=1.0, seed=0)
    fig = Figure()
    ax2 = fig.add_subplot(1, 1, 1)
    L2.plot(ax=ax2)
    assert len(fig.axes) == 2  # the contour plot and its colour bar
    assert ax2.get_xlim() == pytest.approx((-1.0, 1.0)) and ax2.get_ylim() == pytest.approx((-1.0, 1.0))
    for path, kw in (
        (tmp_path / "l1.png", {}),
        (tmp_path / "l2.png", {"log": True}),
        (tmp_path / "s.png", {"surface": True}),
    ):
        (L1 if path.name == "l1.png" else L2).save(str(path), title="t", **kw)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = repr(L2)
    assert "tensor" not in r and "2-D" in r and "7x7" in r
