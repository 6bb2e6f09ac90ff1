"""Cross-check against jaxopt's ``custom_root`` / ``root_vjp`` on the same problems and data.

Skipped cleanly when jax or jaxopt is not installed (they are in the ``bench``
extra). jax runs on CPU in float64 here.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from implicit import custom_root, root_jvp, root_vjp

jax = pytest.importorskip("jax")
jaxopt = pytest.importorskip("jaxopt")
jnp = pytest.importorskip("jax.numpy")
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_platforms", "cpu")
from jaxopt import implicit_diff as jid  # noqa: E402
from jaxopt import linear_solve as jls  # noqa: E402

DT = torch.float64


@functools.lru_cache(maxsize=1)
def problem():
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    idx = np.random.default_rng(0).permutation(len(y))
    tr, va = idx[:300], idx[300:450]
    theta = np.random.default_rng(2).uniform(-5, -1, size=30)
    Xtr, ytr = X[tr], y[tr].astype(float)
    # inner solution by Newton's method in NumPy (shared by both libraries)
    w = np.zeros(30)
    lam = np.exp(theta)
    for _ in range(40):
        s = 1 / (1 + np.exp(-(Xtr @ w)))
        g = Xtr.T @ (s - ytr) / len(ytr) + lam * w
        H = (Xtr.T * (s * (1 - s))) @ Xtr / len(ytr) + np.diag(lam)
        w = w - np.linalg.solve(H, g)
    return Xtr, ytr, X[va], y[va].astype(float), theta, w


def test_logistic_hypergradient_matches_jaxopt() -> None:
    Xtr, ytr, Xva, yva, theta, w_star = problem()

    # jaxopt
    def j_inner(w, theta, X, y):
        z = X @ w
        return jnp.mean(jnp.logaddexp(0.0, z) - y * z) + 0.5 * jnp.sum(jnp.exp(theta) * w**2)

    def j_outer(w, X, y):
        z = X @ w
        return jnp.mean(jnp.logaddexp(0.0, z) - y * z)

    @jid.custom_root(jax.grad(j_inner), solve=functools.partial(jls.solve_cg, tol=1e-12, maxiter=500))
    def j_solver(w0, theta, X, y):
        return jnp.asarray(w_star)

    h_jax = np.asarray(jax.grad(lambda th: j_outer(j_solver(jnp.zeros(30), th, Xtr, ytr), Xva, yva))(theta))

    # implicit
    def t_inner(w, theta, X, y):
        z = X @ w
        return torch.nn.functional.softplus(z).mean() - (y * z).mean() + 0.5 * (theta.exp() * w**2).sum()

    @custom_root(torch.func.grad(t_inner), solve="cg", tol=1e-12)
    def t_solver(w0, theta, X, y):
        return torch.from_numpy(w_star)

    th = torch.tensor(theta, requires_grad=True)
    w = t_solver(torch.zeros(30, dtype=DT), th, torch.from_numpy(Xtr), torch.from_numpy(ytr))
    z = torch.from_numpy(Xva) @ w
    val = torch.nn.functional.softplus(z).mean() - (torch.from_numpy(yva) * z).mean()
    (h_torch,) = torch.autograd.grad(val, th)
    np.testing.assert_allclose(h_torch.numpy(), h_jax, rtol=1e-8, atol=1e-14)


def test_root_vjp_and_jvp_match_jaxopt_on_a_nonsymmetric_root() -> None:
    rng = np.random.default_rng(3)
    M = rng.normal(size=(5, 5)) * 0.3 + 2 * np.eye(5)
    a = rng.normal(size=5)
    y = np.zeros(5)
    for _ in range(60):
        y = y - np.linalg.solve(M + np.diag(3 * y**2), M @ y + y**3 - a)
    v = rng.normal(size=5)

    def j_residual(y, a, M):
        return M @ y + y**3 - a

    j_bar = jid.root_vjp(
        j_residual,
        jnp.asarray(y),
        (jnp.asarray(a), jnp.asarray(M)),
        jnp.asarray(v),
        solve=functools.partial(jls.solve_normal_cg, tol=1e-12),
    )
    j_dot = jid.root_jvp(
        j_residual,
        jnp.asarray(y),
        (jnp.asarray(a), jnp.asarray(M)),
        (jnp.asarray(v), jnp.zeros((5, 5))),
        solve=functools.partial(jls.solve_normal_cg, tol=1e-12),
    )

    def t_residual(y, a, M):
        return M @ y + y**3 - a

    t_y, t_a, t_M = (torch.from_numpy(x) for x in (y, a, M))
    a_bar, M_bar = root_vjp(t_residual, t_y, (t_a, t_M), torch.from_numpy(v), solve="normal_cg", tol=1e-12)
    np.testing.assert_allclose(a_bar.numpy(), np.asarray(j_bar[0]), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(M_bar.numpy(), np.asarray(j_bar[1]), rtol=1e-9, atol=1e-12)
    y_dot = root_jvp(t_residual, t_y, (t_a, t_M), (torch.from_numpy(v), None), solve="gmres", tol=1e-12)
    np.testing.assert_allclose(y_dot.numpy(), np.asarray(j_dot), rtol=1e-9, atol=1e-12)
