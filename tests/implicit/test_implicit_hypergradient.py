"""Hypergradients against independent references: closed forms, a dense IFT formula in NumPy, finite differences.

The logistic-regression references never touch ``implicit``: the inner problem
is solved to ``‖∇g‖ <= 1e-12`` by ``scipy.optimize.minimize`` and the
hypergradient is the dense formula, or central finite differences of the full
pipeline θ -> scipy solve -> validation loss.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import scipy.optimize
import torch

from implicit import custom_root, hypergradient

DT = torch.float64


# --------------------------------------------------------------------------- #
# logistic regression with one L2 weight per feature (30 hyperparameters)
# --------------------------------------------------------------------------- #
@functools.lru_cache(maxsize=1)
def breast_cancer():
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(y))
    tr, va = idx[:300], idx[300:450]
    return X[tr], y[tr].astype(float), X[va], y[va].astype(float)


def np_inner(w, lam, X, y):
    z = X @ w
    return np.mean(np.logaddexp(0, z) - y * z) + 0.5 * np.sum(lam * w**2)


def np_inner_grad(w, lam, X, y):
    s = 1 / (1 + np.exp(-(X @ w)))
    return X.T @ (s - y) / len(y) + lam * w


def np_inner_hess(w, lam, X, y):
    s = 1 / (1 + np.exp(-(X @ w)))
    return (X.T * (s * (1 - s))) @ X / len(y) + np.diag(lam)


def scipy_inner_solve(lam, X, y, w0=None):
    w0 = np.zeros(X.shape[1]) if w0 is None else w0
    res = scipy.optimize.minimize(
        np_inner,
        w0,
        args=(lam, X, y),
        jac=np_inner_grad,
        hess=np_inner_hess,
        method="trust-exact",
        options={"gtol": 1e-13, "maxiter": 500},
    )
    w = res.x
    for _ in range(2):  # polish with Newton steps: trust-exact may stop a little above 1e-12
        w = w - np.linalg.solve(np_inner_hess(w, lam, X, y), np_inner_grad(w, lam, X, y))
    assert np.linalg.norm(np_inner_grad(w, lam, X, y)) <= 1e-12
    return w


def np_val_loss(w, X, y):
    z = X @ w
    return np.mean(np.logaddexp(0, z) - y * z)


def np_val_grad(w, X, y):
    s = 1 / (1 + np.exp(-(X @ w)))
    return X.T @ (s - y) / len(y)


def dense_ift_hypergradient(theta):
    """d val / d θ with λ = exp θ: -(λ ⊙ w*) ⊙ H⁻¹ ∇_w val (∂²g/∂θ∂w = diag(λ w))."""
    Xtr, ytr, Xva, yva = breast_cancer()
    lam = np.exp(theta)
    w = scipy_inner_solve(lam, Xtr, ytr)
    H = np_inner_hess(w, lam, Xtr, ytr)
    return -(lam * w) * np.linalg.solve(H, np_val_grad(w, Xva, yva))


def torch_inner(w, theta, X, y):
    z = X @ w
    return torch.nn.functional.softplus(z).mean() - (y * z).mean() + 0.5 * (theta.exp() * w**2).sum()


def torch_val(w, X, y):
    z = X @ w
    return torch.nn.functional.softplus(z).mean() - (y * z).mean()


@custom_root(torch.func.grad(torch_inner), solve="cg", tol=1e-12)
def scipy_solver(w0, theta, X, y):
    w = scipy_inner_solve(np.exp(theta.numpy()), X.numpy(), y.numpy(), w0.numpy())
    return torch.from_numpy(w)


def thetas():
    return np.random.default_rng(1).uniform(-5, -1, size=30)


def ift_pipeline_hypergradient(theta_np):
    Xtr, ytr, Xva, yva = (torch.from_numpy(a) for a in breast_cancer())
    theta = torch.tensor(theta_np, requires_grad=True)
    w = scipy_solver(torch.zeros(30, dtype=DT), theta, Xtr, ytr)
    (h,) = torch.autograd.grad(torch_val(w, Xva, yva), theta)
    return h.numpy()


def test_logistic_against_dense_ift_formula() -> None:
    theta = thetas()
    h = ift_pipeline_hypergradient(theta)
    ref = dense_ift_hypergradient(theta)
    np.testing.assert_allclose(h, ref, rtol=1e-8, atol=1e-12 * np.abs(ref).max())
    assert scipy_solver.last_solve.converged


def test_logistic_against_finite_differences() -> None:
    theta = thetas()
    Xtr, ytr, Xva, yva = breast_cancer()
    w_mid = scipy_inner_solve(np.exp(theta), Xtr, ytr)

    def val(th):
        return np_val_loss(scipy_inner_solve(np.exp(th), Xtr, ytr, w_mid), Xva, yva)

    h = ift_pipeline_hypergradient(theta)
    step = 1e-4
    fd = np.empty(30)
    for j in range(30):
        e = np.zeros(30)
        e[j] = step
        fd[j] = (val(theta + e) - val(theta - e)) / (2 * step)
    np.testing.assert_allclose(h, fd, rtol=1e-6, atol=1e-9 * np.abs(fd).max())


@pytest.mark.parametrize("solve,opts", [("cg", {"tol": 1e-12}), ("minres", {"tol": 1e-12}), ("dense", {})])
def test_hypergradient_function_logistic(solve, opts) -> None:
    theta_np = thetas()
    Xtr, ytr, Xva, yva = (torch.from_numpy(a) for a in breast_cancer())
    w = torch.from_numpy(scipy_inner_solve(np.exp(theta_np), *breast_cancer()[:2]))

    def inner(theta, w, X, y):
        return torch_inner(w, theta, X, y)

    def outer(theta, w, X, y):
        return torch_val(w, X, y)

    theta = torch.from_numpy(theta_np)
    # outer uses validation data, inner training data: bind them with args per function
    h, info = hypergradient(
        lambda th, w, Xtr, ytr, Xva, yva: outer(th, w, Xva, yva),
        lambda th, w, Xtr, ytr, Xva, yva: inner(th, w, Xtr, ytr),
        theta,
        w,
        solve,
        args=(Xtr, ytr, Xva, yva),
        full_output=True,
        nonconvergence="raise",
        **opts,
    )
    np.testing.assert_allclose(h.numpy(), dense_ift_hypergradient(theta_np), rtol=1e-8)
    assert info.converged and info.method == solve


# --------------------------------------------------------------------------- #
# ridge regression: closed-form hypergradient, every solve
# --------------------------------------------------------------------------- #
def ridge():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 6, generator=g, dtype=DT)
    t = torch.randn(40, generator=g, dtype=DT)
    Xv = torch.randn(20, 6, generator=g, dtype=DT)
    tv = torch.randn(20, generator=g, dtype=DT)
    lam = torch.rand(6, generator=g, dtype=DT) + 0.2
    return X, t, Xv, tv, lam


def ridge_inner(lam, w):
    X, t, _, _, _ = ridge()
    return 0.5 * ((X @ w - t) ** 2).sum() + 0.5 * (lam * w**2).sum()


def ridge_outer(lam, w):
    _, _, Xv, tv, _ = ridge()
    return 0.5 * ((Xv @ w - tv) ** 2).sum() + 0.01 * lam.sum()  # a direct term ∇_λ f as well


@pytest.mark.parametrize(
    "solve,opts",
    [("cg", {}), ("normal_cg", {}), ("minres", {}), ("gmres", {}), ("dense", {}), ("neumann", {"K": 40})],
)
def test_ridge_closed_form_hypergradient(solve, opts) -> None:
    X, t, Xv, tv, lam = ridge()
    H = X.T @ X + torch.diag(lam)
    w = torch.linalg.solve(H, X.T @ t)
    r = Xv.T @ (Xv @ w - tv)
    if solve == "neumann":
        alpha = 1.0 / float(torch.linalg.eigvalsh(H).max())
        opts = {**opts, "alpha": alpha}
        M = torch.eye(6, dtype=DT) - alpha * H
        Hinv_r = alpha * sum(torch.linalg.matrix_power(M, j) for j in range(opts["K"])) @ r
    else:
        Hinv_r = torch.linalg.solve(H, r)
    h = hypergradient(ridge_outer, ridge_inner, lam, w, solve, **opts)
    torch.testing.assert_close(h, 0.01 - w * Hinv_r, rtol=1e-10, atol=1e-12)


def test_hypergradient_pytree_hyperparameters() -> None:
    X, t, Xv, tv, lam = ridge()
    H = X.T @ X + torch.diag(lam)
    w = torch.linalg.solve(H, X.T @ t)
    hp = {"lam": lam, "scale": torch.tensor(1.0, dtype=DT)}

    def inner(hp, w):
        return hp["scale"] * 0.5 * ((X @ w - t) ** 2).sum() + 0.5 * (hp["lam"] * w**2).sum()

    def outer(hp, w):
        return 0.5 * ((Xv @ w - tv) ** 2).sum()

    h = hypergradient(outer, inner, hp, w)
    assert set(h) == {"lam", "scale"}
    exact = torch.func.grad(
        lambda hp: outer(hp, torch.linalg.solve(hp["scale"] * X.T @ X + torch.diag(hp["lam"]), hp["scale"] * X.T @ t))
    )(hp)
    torch.testing.assert_close(h["lam"], exact["lam"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h["scale"], exact["scale"], rtol=1e-10, atol=1e-12)


def test_hypergradient_errors() -> None:
    X, t, Xv, tv, lam = ridge()
    w = torch.zeros(6, dtype=DT)
    with pytest.raises(ValueError, match="outer"):
        hypergradient(lambda lam, w: Xv @ w, ridge_inner, lam, w)
    with pytest.raises(ValueError, match="inner"):
        hypergradient(ridge_outer, lambda lam, w: X @ w, lam, w)
    with pytest.raises(TypeError, match="nn.Module"):
        hypergradient(ridge_outer, ridge_inner, torch.nn.Linear(2, 2), w)
    with pytest.raises(TypeError, match="args must be a tuple"):
        hypergradient(ridge_outer, ridge_inner, lam, w, args=[X])
