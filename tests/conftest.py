"""Shared fixtures: small float64 models with dense references."""

from __future__ import annotations

import pytest
import torch

from curvlab.params import ParamSpec

# Two threads on a shared 2-core box make small ops far slower; tests are small.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def make_mlp(loss: str, n: int = 12, d: int = 3, h: int = 5, c: int = 4, seed: int = 0):
    """A tanh MLP with MSE or cross-entropy loss, in float64, and its data."""
    g = torch.Generator().manual_seed(seed)
    params = {
        "W1": torch.randn(h, d, generator=g, dtype=torch.float64),
        "b1": torch.randn(h, generator=g, dtype=torch.float64),
        "W2": torch.randn(c, h, generator=g, dtype=torch.float64),
    }
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    if loss == "mse":
        Y = torch.randn(n, c, generator=g, dtype=torch.float64)

        def loss_fn(o, y):
            return 0.5 * ((o - y) ** 2).sum(-1)
    else:
        Y = torch.randint(0, c, (n,), generator=g)

        def loss_fn(o, y):
            return torch.nn.functional.cross_entropy(o, y, reduction="none")

    def model(p, x):
        return torch.tanh(x @ p["W1"].T + p["b1"]) @ p["W2"].T

    def f(p, batch):
        x, y = batch
        return loss_fn(model(p, x), y).mean()

    spec = ParamSpec(params)
    return params, model, loss_fn, f, X, Y, spec


def dense_hessian(f, spec, batch):
    x0 = spec.flatten()
    return torch.func.hessian(lambda x: f(spec.unflatten(x), batch))(x0)
