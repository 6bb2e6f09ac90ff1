"""Restricted (per-layer / per-block) operators equal the dense sub-blocks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab as cl
from curvlab.linops.restrict import RestrictedOperator, blocks, restrict
from curvlab.spectrum import eigsh
from tests.conftest import dense_hessian, make_mlp

TOL = 1e-10


@pytest.fixture(scope="module")
def mlp():
    params, model, loss_fn, f, X, Y, spec = make_mlp("ce", n=20, d=4, h=6, c=3)
    H = cl.linops.hessian(f, params, data=(X, Y))
    Hd = dense_hessian(f, spec, (X, Y))
    offs = {"W1": slice(0, 24), "b1": slice(24, 30), "W2": slice(30, 48)}
    return H, Hd, offs, (params, model, loss_fn, X, Y)


def _sub(Hd, idx):
    idx = torch.as_tensor(idx)
    return Hd[idx][:, idx]


@pytest.mark.parametrize(
    "select",
    ["W1", "b1", "W2", ["W1", "b1"], ["W2", "W1"]],
)
def test_by_name_equals_dense_block(mlp, select):
    H, Hd, offs, _ = mlp
    names = [select] if isinstance(select, str) else select
    order = [k for k in ("W1", "b1", "W2") if k in names]  # the block follows the parameters' order
    idx = torch.cat([torch.arange(offs[k].start, offs[k].stop) for k in order])
    R = restrict(H, select)
    assert isinstance(R, RestrictedOperator) and R.is_symmetric and R.names == order
    assert R.shape == (idx.numel(), idx.numel())
    torch.testing.assert_close(R.to_dense(), _sub(Hd, idx), atol=TOL, rtol=0)
    v = torch.randn(idx.numel(), dtype=torch.float64)
    torch.testing.assert_close(R @ v, _sub(Hd, idx) @ v, atol=TOL, rtol=0)
    parts = R.spec.unflatten(v)
    assert list(parts) == order and parts[order[0]].shape == H.spec.shapes[["W1", "b1", "W2"].index(order[0])]


@pytest.mark.parametrize(
    "select",
    [
        [3, 0, 17, 40],
        slice(10, 30),
        range(5, 45, 3),
        torch.tensor([47, 1, 2]),
        torch.arange(48) % 3 == 0,
    ],
)
def test_by_index_equals_dense_block(mlp, select):
    H, Hd, _, _ = mlp
    if isinstance(select, slice):
        idx = torch.arange(48)[select]
    elif isinstance(select, torch.Tensor) and select.dtype == torch.bool:
        idx = torch.nonzero(select).reshape(-1)
    else:
        idx = torch.as_tensor(list(select))
    R = restrict(H, select)
    torch.testing.assert_close(R.to_dense(), _sub(Hd, idx), atol=TOL, rtol=0)
    assert R.names is None and R.spec is None


def test_blocks_of_a_module_and_per_layer_spectra():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(4, 5))
    model.add_module("act", nn.Tanh())
    model.add_module("fc2", nn.Linear(5, 3))
    model = model.double()
    X = torch.randn(16, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))

    def f(p, batch):
        xb, yb = batch
        return nn.functional.cross_entropy(torch.func.functional_call(model, p, (xb,)), yb)

    H = cl.linops.hessian(f, model, data=(X, y))
    Hd = H.to_dense()
    per_module = blocks(H)
    assert list(per_module) == ["fc1", "fc2"]
    assert per_module["fc1"].names == ["fc1.weight", "fc1.bias"]
    torch.testing.assert_close(per_module["fc1"].to_dense(), Hd[:25, :25], atol=TOL, rtol=0)
    torch.testing.assert_close(per_module["fc2"].to_dense(), Hd[25:, 25:], atol=TOL, rtol=0)
    per_param = blocks(H, by="param")
    assert list(per_param) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    torch.testing.assert_close(per_param["fc2.bias"].to_dense(), Hd[40:, 40:], atol=TOL, rtol=0)
    # per-layer spectrum (PyHessian issues #9/#10): eigsh on a block = eigvalsh of the dense sub-block
    top = eigsh(restrict(H, "fc1"), k=3, seed=0).eigenvalues
    torch.testing.assert_close(top, torch.linalg.eigvalsh(Hd[:25, :25]).flip(0)[:3], atol=1e-9, rtol=0)
    # module prefix selects the module's parameters; an exact name selects one tensor
    torch.testing.assert_close(restrict(H, "fc2.weight").to_dense(), Hd[25:40, 25:40], atol=TOL, rtol=0)


def test_damped_ggn_keeps_spec_and_psd(mlp):
    H, Hd, offs, (params, model, loss_fn, X, Y) = mlp
    G = cl.linops.ggn(model, loss_fn, params, (X, Y))
    Gd = G.to_dense()
    R = restrict(G.damped(0.3), "W2")
    assert R.is_psd and R.is_symmetric
    torch.testing.assert_close(R.to_dense(), Gd[30:, 30:] + 0.3 * torch.eye(18, dtype=torch.float64), atol=TOL, rtol=0)
    R2 = restrict(2.0 * H, ["b1"])
    torch.testing.assert_close(R2.to_dense(), 2.0 * Hd[24:30, 24:30], atol=TOL, rtol=0)


def test_matvec_counting_and_matmat(mlp):
    H, Hd, _, _ = mlp
    R = restrict(H, "W1")
    h0, r0 = H.n_matvecs, R.n_matvecs
    V = torch.randn(24, 3, dtype=torch.float64)
    torch.testing.assert_close(R @ V, Hd[:24, :24] @ V, atol=TOL, rtol=0)
    # the block operator takes the products: none with the full Hessian
    assert R.block is not None and R.n_matvecs - r0 == 3 and H.n_matvecs == h0
    E = restrict(H, "W1", block=False)  # embedding: one full product per block product
    assert E.block is None
    torch.testing.assert_close(E @ V, Hd[:24, :24] @ V, atol=TOL, rtol=0)
    assert E.n_matvecs == 3 and H.n_matvecs - h0 == 3


def test_non_symmetric_parent():
    A = torch.arange(25.0, dtype=torch.float64).reshape(5, 5)
    R = restrict(cl.linops.DenseOperator(A), [4, 1])
    torch.testing.assert_close(R.to_dense(), A[[4, 1]][:, [4, 1]])
    u = torch.tensor([1.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(R.rmatvec(u), A[[4, 1]][:, [4, 1]].T @ u)
    assert not R.is_symmetric


def test_errors(mlp):
    H, _, _, _ = mlp
    with pytest.raises(ValueError, match="no parameter named 'W3'"):
        restrict(H, "W3")
    with pytest.raises(ValueError, match="carries no parameter spec"):
        restrict(cl.linops.DenseOperator(torch.eye(3)), "W1")
    with pytest.raises(ValueError, match="empty"):
        restrict(H, [])
    with pytest.raises(ValueError, match="must lie in"):
        restrict(H, [0, 48])
    with pytest.raises(ValueError, match="must not repeat"):
        restrict(H, [1, 1])
    with pytest.raises(ValueError, match="boolean mask"):
        restrict(H, torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="select must be"):
        restrict(H, 3.5)
    with pytest.raises(ValueError, match="square"):
        restrict(cl.linops.DenseOperator(torch.ones(2, 3)), [0])
    with pytest.raises(TypeError, match="LinearOperator"):
        restrict(torch.eye(3), [0])
    with pytest.raises(ValueError, match="by must be"):
        blocks(H, by="layer")
