"""custom_root under torch.func transforms: vmap equals the loop, jacrev/jacfwd/hessian equal closed forms."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwad

from implicit import custom_root, hypergradient

DT = torch.float64
N, D = 30, 5


def data(seed: int = 0, tasks: int | None = None):
    g = torch.Generator().manual_seed(seed)
    shape = (N, D) if tasks is None else (tasks, N, D)
    X = torch.randn(*shape, generator=g, dtype=DT)
    t = torch.randn(*shape[:-1], generator=g, dtype=DT)
    return X, t


def g_ridge(w, lam, X, t):
    return 0.5 * ((X @ w - t) ** 2).sum() + 0.5 * (lam * w**2).sum()


def closed(lam, X, t):
    return torch.linalg.solve(X.T @ X + torch.diag(lam * torch.ones(D, dtype=DT)), X.T @ t)


def gd_solver(w0, lam, X, t):
    """A solver with data-dependent stopping (``.item()``): not vmap-able itself."""
    H = X.T @ X + torch.diag(lam * torch.ones(D, dtype=DT))
    w = w0.clone()
    step = 1.0 / float(torch.linalg.eigvalsh(H).max())
    for _ in range(100_000):
        r = H @ w - X.T @ t
        if r.norm().item() < 1e-13:
            break
        w = w - step * r
    # polish with one exact step so the comparison is to machine precision
    return w - torch.linalg.solve(H, H @ w - X.T @ t)


SOL = custom_root(torch.func.grad(g_ridge), solve="cg", tol=1e-13)(gd_solver)


def via_ift(lam, X, t):
    return SOL(torch.zeros(D, dtype=DT), lam, X, t)


def lams(b: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, D, generator=g, dtype=DT) + 0.5


def test_vmap_over_theta_equals_loop() -> None:
    X, t = data()
    L = lams()
    batched = torch.func.vmap(via_ift, in_dims=(0, None, None))(L, X, t)
    with torch.no_grad():  # outside transforms, y* alone is asked for under no_grad
        loop = torch.stack([via_ift(lam, X, t) for lam in L])
    torch.testing.assert_close(batched, loop, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(batched, torch.stack([closed(lam, X, t) for lam in L]), rtol=1e-10, atol=1e-10)


def test_vmap_of_grad_equals_loop() -> None:
    """Per-task hypergradients (meta-learning): vmap over hyperparameters and data."""
    Xs, ts = data(tasks=3)
    L = lams(3)

    def val_loss(lam, X, t):
        return (via_ift(lam, X, t) ** 2).sum()

    def val_exact(lam, X, t):
        return (closed(lam, X, t) ** 2).sum()

    batched = torch.func.vmap(torch.func.grad(val_loss))(L, Xs, ts)
    loop = torch.stack([torch.func.grad(val_loss)(L[i], Xs[i], ts[i]) for i in range(3)])
    exact = torch.stack([torch.func.grad(val_exact)(L[i], Xs[i], ts[i]) for i in range(3)])
    torch.testing.assert_close(batched, loop, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(batched, exact, rtol=1e-9, atol=1e-10)


def test_grad_of_vmap() -> None:
    X, t = data()
    L = lams()

    def total(L):
        return (torch.func.vmap(via_ift, in_dims=(0, None, None))(L, X, t) ** 2).sum()

    def total_exact(L):
        return (torch.func.vmap(closed, in_dims=(0, None, None))(L, X, t) ** 2).sum()

    torch.testing.assert_close(torch.func.grad(total)(L), torch.func.grad(total_exact)(L), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("jac", ["jacrev", "jacfwd"])
def test_jacobians(jac: str) -> None:
    X, t = data()
    lam = lams(1)[0]
    J = getattr(torch.func, jac)(via_ift)(lam, X, t)
    torch.testing.assert_close(J, torch.func.jacrev(closed)(lam, X, t), rtol=1e-9, atol=1e-10)


def test_hessian_through_custom_root() -> None:
    X, t = data()
    lam = lams(1)[0]

    def f(lam):
        return (via_ift(lam, X, t) ** 3).sum()

    def f_exact(lam):
        return (closed(lam, X, t) ** 3).sum()

    torch.testing.assert_close(torch.func.hessian(f)(lam), torch.func.hessian(f_exact)(lam), rtol=1e-8, atol=1e-9)


def test_jacobian_wrt_data() -> None:
    X, t = data()
    lam = lams(1)[0]
    J = torch.func.jacrev(via_ift, argnums=2)(lam, X, t)
    torch.testing.assert_close(J, torch.func.jacrev(closed, argnums=2)(lam, X, t), rtol=1e-9, atol=1e-10)


def test_forward_ad_dual_tensors() -> None:
    X, t = data()
    lam = lams(1)[0]
    d = torch.randn(D, dtype=DT)
    with fwad.dual_level():
        out = via_ift(fwad.make_dual(lam, d), X, t)
        tangent = fwad.unpack_dual(out).tangent
    expected = torch.func.jvp(lambda lam: closed(lam, X, t), (lam,), (d,))[1]
    torch.testing.assert_close(tangent, expected, rtol=1e-9, atol=1e-10)


def test_vmap_has_aux() -> None:
    X, t = data()

    def solver(w0, lam, X, t):
        w = closed(lam, X, t)
        return w, (w.norm(), "tag")

    sol = custom_root(torch.func.grad(g_ridge), has_aux=True)(solver)
    tags = []

    def run(lam):
        w, (nrm, tag) = sol(torch.zeros(D, dtype=DT), lam, X, t)
        tags.append(tag)
        return w, nrm

    w, nrm = torch.func.vmap(run)(lams())
    assert w.shape == (4, D) and nrm.shape == (4,) and tags == ["tag"]
    torch.testing.assert_close(nrm, w.norm(dim=1))


def test_vmap_closure_is_a_clear_error() -> None:
    Xs, ts = data(tasks=2)

    def per_task(lam, X, t):  # captures the batched data by closure instead of passing it
        sol = custom_root(lambda w, lam: torch.func.grad(g_ridge)(w, lam, X, t))(lambda w0, lam: closed(lam, X, t))
        return sol(torch.zeros(D, dtype=DT), lam)

    with pytest.raises(RuntimeError, match="by closure"):
        torch.func.vmap(per_task)(lams(2), Xs, ts)


def test_hypergradient_vmap_over_tasks() -> None:
    Xs, ts = data(tasks=3)
    L = lams(3)

    def inner(lam, w, X, t):
        return g_ridge(w, lam, X, t)

    def outer(lam, w, X, t):
        return 0.5 * ((X @ w - t) ** 2).sum() + 0.1 * (w**2).sum()

    def hg(lam, X, t):
        return hypergradient(outer, inner, lam, closed(lam, X, t), args=(X, t), tol=1e-13)

    def exact(lam, X, t):
        return torch.func.grad(lambda lam: outer(lam, closed(lam, X, t), X, t))(lam)

    batched = torch.func.vmap(hg)(L, Xs, ts)
    torch.testing.assert_close(
        batched, torch.stack([exact(L[i], Xs[i], ts[i]) for i in range(3)]), rtol=1e-9, atol=1e-10
    )
