# ruff: noqa: N802 - the papers' names T (fixed-point map) and F (optimality condition)
"""Cross-check against jaxopt's ``custom_root`` / ``root_vjp`` on the same problems and data.

Skipped cleanly when jax or jaxopt is not installed (they are in the ``bench``
extra). jax runs on CPU in float64 here.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from implicit import custom_fixed_point, custom_root, root_jvp, root_vjp

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


# --------------------------------------------------------------------------- #
# jaxopt's own test problems, run in both libraries (issue 14)
# --------------------------------------------------------------------------- #
def _np(x):
    return np.asarray(x, dtype=float)


def test_ridge_jacobian_matches_jaxopt_custom_root() -> None:
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(30, 5)), rng.normal(size=30)

    def j_obj(w, lam):
        return 0.5 * jnp.mean((X @ w - y) ** 2) + 0.5 * lam * jnp.sum(w**2)

    @jid.custom_root(jax.grad(j_obj), solve=functools.partial(jls.solve_cg, tol=1e-13))  # jaxopt's default: 1e-5
    def j_ridge(w0, lam):
        return jnp.linalg.solve(X.T @ X / 30 + lam * jnp.eye(5), X.T @ y / 30)

    J_jax = _np(jax.jacrev(lambda lam: j_ridge(jnp.zeros(5), lam))(5.0))
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)

    def t_obj(w, lam):
        return 0.5 * ((Xt @ w - yt) ** 2).mean() + 0.5 * lam * (w**2).sum()

    t_ridge = custom_root(torch.func.grad(t_obj))(
        lambda w0, lam: torch.linalg.solve(Xt.T @ Xt / 30 + lam * torch.eye(5, dtype=DT), Xt.T @ yt / 30)
    )
    J = torch.func.jacrev(lambda lam: t_ridge(torch.zeros(5, dtype=DT), lam))(torch.tensor(5.0, dtype=DT))
    np.testing.assert_allclose(J.numpy(), J_jax, rtol=1e-10, atol=1e-14)


@pytest.mark.slow  # jaxopt's eager jacobian; the same problem is checked against its closed form in test_ported_cases
def test_lasso_fixed_point_matches_jaxopt_prox() -> None:
    from jaxopt import prox

    rng = np.random.default_rng(1)
    X = rng.normal(size=(40, 8))
    y = X @ np.array([2.0, -1.5, 0, 0, 1.0, 0, 0, 0]) + 0.1 * rng.normal(size=40)
    eta = 1.0 / np.linalg.eigvalsh(X.T @ X).max()

    def j_T(w, lam):
        return prox.prox_lasso(w - eta * X.T @ (X @ w - y), lam, scaling=eta)

    w = np.zeros(8)  # the proximal-gradient iteration, in NumPy (shared by both libraries)
    for _ in range(20000):
        z = w - eta * X.T @ (X @ w - y)
        w_new = np.sign(z) * np.maximum(np.abs(z) - eta * 3.0, 0)
        if np.linalg.norm(w_new - w) < 1e-15:
            break
        w = w_new

    @jid.custom_fixed_point(j_T, solve=functools.partial(jls.solve_gmres, tol=1e-12))
    def j_fp(w0, lam):
        return jnp.asarray(w)

    J_jax = _np(jax.jacobian(lambda lam: j_fp(jnp.zeros(8), lam))(3.0))
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)

    def t_T(w, lam):
        z = w - eta * (Xt.T @ (Xt @ w - yt))
        return torch.sign(z) * torch.relu(z.abs() - eta * lam)

    t_fp = custom_fixed_point(t_T)(lambda w0, lam: torch.from_numpy(w))
    J = torch.func.jacrev(lambda lam: t_fp(torch.zeros(8, dtype=DT), lam))(torch.tensor(3.0, dtype=DT))
    np.testing.assert_allclose(J.numpy(), J_jax, rtol=1e-8, atol=1e-12)


@pytest.mark.slow  # jaxopt's eager jacobian; finite differences check the same problem in test_ported_cases
def test_svm_dual_on_the_simplex_matches_jaxopt_projection() -> None:
    from jaxopt import projection

    rng = np.random.default_rng(2)
    X = rng.normal(size=(12, 4))
    Y = np.eye(3)[np.arange(12) % 3]
    L = np.linalg.eigvalsh(X @ X.T).max()

    def j_T(beta, lam):
        g = -(X @ (X.T @ (Y - beta) / lam)) + Y
        return jax.vmap(projection.projection_simplex)(beta - lam / L * g)

    from tests.implicit.test_ported_cases import proj_simplex

    Xt, Yt = torch.from_numpy(X), torch.from_numpy(Y)

    def t_T(beta, lam):
        g = -(Xt @ (Xt.T @ (Yt - beta) / lam)) + Yt
        return proj_simplex(beta - lam / L * g)

    beta = torch.full((12, 3), 1 / 3, dtype=DT)  # projected gradient in torch (shared by both libraries)
    for _ in range(20000):
        nb = t_T(beta, 2.0)
        if float(torch.linalg.norm(nb - beta)) < 1e-15:
            break
        beta = nb
    beta_np = beta.numpy()

    @jid.custom_fixed_point(j_T, solve=functools.partial(jls.solve_gmres, tol=1e-12))
    def j_fp(b0, lam):
        return jnp.asarray(beta_np)

    J_jax = _np(jax.jacobian(lambda lam: j_fp(jnp.zeros((12, 3)), lam))(2.0))
    t_fp = custom_fixed_point(t_T)(lambda b0, lam: torch.from_numpy(beta_np))
    J = torch.func.jacrev(lambda lam: t_fp(torch.zeros(12, 3, dtype=DT), lam))(torch.tensor(2.0, dtype=DT))
    np.testing.assert_allclose(J.numpy(), J_jax, rtol=1e-8, atol=1e-12)


def test_bisection_second_derivative_matches_jaxopt_bisection() -> None:
    """jaxopt #141: second derivatives of a bisection root."""
    from jaxopt import Bisection

    def j_F(y, th):
        return y + y**3 - th

    def j_root(th):
        return Bisection(j_F, lower=-10.0, upper=10.0, maxiter=200, tol=1e-14, jit=False).run(th=th).params

    d2_jax = float(jax.grad(jax.grad(j_root))(1.3))
    from tests.implicit.test_ported_cases import bisection

    def t_F(y, th):
        return y + y**3 - th

    sol = custom_root(t_F)(lambda y0, th: bisection(t_F, -10.0, 10.0, th))
    d2 = torch.func.grad(torch.func.grad(lambda th: sol(torch.zeros((), dtype=DT), th)))(torch.tensor(1.3, dtype=DT))
    np.testing.assert_allclose(float(d2), d2_jax, rtol=1e-8)
