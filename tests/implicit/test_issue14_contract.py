# ruff: noqa: N802 - the papers' names T (fixed-point map) and F (optimality condition)
"""Issue 14, items 1–6: transforms, keyword data, batched cotangents, evaluation, small points, forward mode.

References are closed forms (√a, ridge regression), dense IFT formulas and float64 finite differences.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwad
from torch import nn

from implicit import OptimalityWarning, custom_fixed_point, custom_root, hypergradient, root_jvp, root_vjp

DT = torch.float64


def sqrt_solver():
    """y*(a) = √a as the root of y² − a: y' = 1/(2√a), y'' = −a^{-3/2}/4."""
    return custom_root(lambda y, a: y**2 - a)(lambda y0, a: torch.sqrt(a))


def ridge(n: int = 25, d: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    t = torch.randn(n, generator=g, dtype=DT)
    return X, t


def ridge_g(w, lam, X, t):
    return 0.5 * ((X @ w - t) ** 2).sum() + 0.5 * (lam * w**2).sum()


def ridge_closed(lam, X, t):
    return torch.linalg.solve(X.T @ X + torch.diag(lam * torch.ones(X.shape[1], dtype=DT)), X.T @ t)


RIDGE = custom_root(torch.func.grad(ridge_g))(lambda w0, lam, X, t: ridge_closed(lam, X, t))


# --------------------------------------------------------------------------- #
# item 1: second derivatives under every transform composition
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("route", ["hessian", "jacrev_jacfwd", "jacrev_jacrev", "double_backward"])
def test_second_derivative_of_sqrt_is_exact(route: str) -> None:
    sol = sqrt_solver()
    a = torch.tensor(2.0, dtype=DT)
    f = lambda a: sol(torch.zeros((), dtype=DT), a)  # noqa: E731
    if route == "hessian":
        d2 = torch.func.hessian(f)(a)
    elif route == "jacrev_jacfwd":
        d2 = torch.func.jacrev(torch.func.jacfwd(f))(a)
    elif route == "jacrev_jacrev":
        d2 = torch.func.jacrev(torch.func.jacrev(f))(a)
    else:
        ar = a.clone().requires_grad_()
        (d1,) = torch.autograd.grad(f(ar), ar, create_graph=True)
        (d2,) = torch.autograd.grad(d1, ar)
    torch.testing.assert_close(d2, torch.tensor(-0.25 * 2.0**-1.5, dtype=DT), rtol=1e-10, atol=0)


def test_ridge_hessian_through_custom_root_all_routes() -> None:
    X, t = ridge()
    lam = torch.tensor(0.7, dtype=DT)

    def loss(fn, lam):
        return (fn(torch.zeros(4, dtype=DT), lam, X, t) ** 3).sum() if fn is RIDGE else (fn(lam, X, t) ** 3).sum()

    ref = torch.func.hessian(lambda lam: (ridge_closed(lam, X, t) ** 3).sum())(lam)
    for H in (
        torch.func.hessian(lambda lam: loss(RIDGE, lam))(lam),
        torch.func.jacrev(torch.func.jacfwd(lambda lam: loss(RIDGE, lam)))(lam),
        torch.func.jacrev(torch.func.jacrev(lambda lam: loss(RIDGE, lam)))(lam),
    ):
        torch.testing.assert_close(H, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("route", ["jacfwd_jacfwd", "jvp_jvp"])
def test_forward_over_forward_raises_naming_the_exact_routes(route: str) -> None:
    sol = sqrt_solver()
    f = lambda a: sol(torch.zeros((), dtype=DT), a)  # noqa: E731
    a, one = torch.tensor(2.0, dtype=DT), torch.tensor(1.0, dtype=DT)
    with pytest.raises(NotImplementedError, match=r"jacrev\(jacfwd.*torch.func.hessian|hessian.*jacrev\(jacfwd"):
        if route == "jacfwd_jacfwd":
            torch.func.jacfwd(torch.func.jacfwd(f))(a)
        else:
            torch.func.jvp(lambda a: torch.func.jvp(f, (a,), (one,))[1], (a,), (one,))
    with pytest.raises(NotImplementedError, match="forward-over-forward"):
        torch.func.jacfwd(torch.func.jacfwd(lambda a: root_jvp(lambda y, a: y**2 - a, torch.sqrt(a), (a,), (one,))))(a)


# --------------------------------------------------------------------------- #
# item 2: keyword data named y
# --------------------------------------------------------------------------- #
def test_custom_fixed_point_with_data_passed_as_y_keyword() -> None:
    """jaxopt's test_custom_fixed_point: T(x, theta, X, y) called with X=X, y=y."""
    X, t = ridge(seed=1)
    lr = 1.0 / float(torch.linalg.eigvalsh(X.T @ X).max() + 2)

    def T(x, theta, X, y):  # a gradient step on the ridge objective
        return x - lr * (X.T @ (X @ x - y) + theta * x)

    @custom_fixed_point(T)
    def fp(x0, theta, X, y):
        x = x0
        for _ in range(3000):
            x = T(x, theta, X, y)
        return x

    theta = torch.tensor(1.5, dtype=DT, requires_grad=True)
    x = fp(torch.zeros(4, dtype=DT), theta, X=X, y=t)
    (g,) = torch.autograd.grad(x.sum(), theta)
    (g_ref,) = torch.autograd.grad(ridge_closed(theta, X, t).sum(), theta)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- #
# item 3: batched cotangents
# --------------------------------------------------------------------------- #
def test_is_grads_batched_and_vectorized_jacobian_through_the_block_solve() -> None:
    X, t = ridge(seed=2)
    lam = torch.rand(4, dtype=DT, generator=torch.Generator().manual_seed(3)) + 0.5
    J_ref = torch.func.jacrev(lambda lam: ridge_closed(lam, X, t))(lam)
    lr = lam.clone().requires_grad_()
    w = RIDGE(torch.zeros(4, dtype=DT), lr, X, t)
    (J,) = torch.autograd.grad(w, lr, torch.eye(4, dtype=DT), is_grads_batched=True)
    torch.testing.assert_close(J, J_ref, rtol=1e-9, atol=1e-12)
    J2 = torch.autograd.functional.jacobian(lambda lam: RIDGE(torch.zeros(4, dtype=DT), lam, X, t), lam, vectorize=True)
    torch.testing.assert_close(J2, J_ref, rtol=1e-9, atol=1e-12)
    H = torch.autograd.functional.hessian(
        lambda lam: (RIDGE(torch.zeros(4, dtype=DT), lam, X, t) ** 2).sum(), lam, vectorize=True
    )
    H_ref = torch.func.hessian(lambda lam: (ridge_closed(lam, X, t) ** 2).sum())(lam)
    torch.testing.assert_close(H, H_ref, rtol=1e-8, atol=1e-11)


# --------------------------------------------------------------------------- #
# item 4: evaluation
# --------------------------------------------------------------------------- #
def test_evaluation_of_floats_plain_tensors_and_frozen_modules() -> None:
    X, t = ridge()
    w = RIDGE(torch.zeros(4, dtype=DT), torch.tensor(0.3, dtype=DT), X, t)
    torch.testing.assert_close(w, ridge_closed(torch.tensor(0.3, dtype=DT), X, t))
    w2 = RIDGE(torch.zeros(4, dtype=DT), 0.3, X, t)
    torch.testing.assert_close(w2, w)
    lin = nn.Linear(4, 1, dtype=DT).requires_grad_(False)

    def g(w, m):
        return 0.5 * ((m(X).squeeze(1) * (X @ w) - t) ** 2).sum() + 0.5 * (w**2).sum()

    sol = custom_root(torch.func.grad(g))(lambda w0, m: _newton(g, w0, m))
    w3 = sol(torch.zeros(4, dtype=DT), lin)
    assert torch.linalg.vector_norm(torch.func.grad(g)(w3, lin)) < 1e-10


def _newton(g, w, *theta):
    for _ in range(30):
        w = w - torch.linalg.solve(torch.func.hessian(g)(w, *theta), torch.func.grad(g)(w, *theta))
    return w


def test_closure_over_a_tensor_that_requires_grad_is_still_refused() -> None:
    X, t = ridge()
    lam = torch.tensor(0.5, dtype=DT, requires_grad=True)
    sol = custom_root(lambda w, X, t: torch.func.grad(ridge_g)(w, lam, X, t))(
        lambda w0, X, t: ridge_closed(lam.detach(), X, t)
    )
    with pytest.raises(ValueError, match="closes over it"):
        sol(torch.zeros(4, dtype=DT), X, t)


# --------------------------------------------------------------------------- #
# item 5: the smaller points
# --------------------------------------------------------------------------- #
def test_root_vjp_of_a_float_hyperparameter_and_root_jvp_with_a_float_tangent() -> None:
    y = torch.tensor(2.0**0.5, dtype=DT)
    (a_bar,) = root_vjp(lambda y, a: y**2 - a, y, (2.0,), torch.tensor(1.0, dtype=DT))
    assert isinstance(a_bar, torch.Tensor)
    torch.testing.assert_close(a_bar, torch.tensor(0.5 / 2.0**0.5, dtype=DT))
    y_dot = root_jvp(lambda y, a: y**2 - a, y, (torch.tensor(2.0, dtype=DT),), (3.0,))
    torch.testing.assert_close(y_dot, torch.tensor(1.5 / 2.0**0.5, dtype=DT))


def test_has_aux_false_with_a_tensor_aux_is_named() -> None:
    X, t = ridge()

    @custom_root(torch.func.grad(ridge_g))
    def solver(w0, lam, X, t):
        return ridge_closed(lam, X, t), torch.tensor(12)  # (y*, iterations) without has_aux=True

    with pytest.raises(TypeError, match="has_aux=True"):
        solver(torch.zeros(4, dtype=DT), torch.tensor(0.5, dtype=DT, requires_grad=True), X, t)


def test_warning_when_the_solution_is_far_from_a_root() -> None:
    X, t = ridge()
    sloppy = custom_root(torch.func.grad(ridge_g))(lambda w0, lam, X, t: ridge_closed(lam, X, t) + 0.16)
    lam = torch.tensor(0.5, dtype=DT, requires_grad=True)
    with pytest.warns(OptimalityWarning, match="far from a root"):
        torch.autograd.grad(sloppy(torch.zeros(4, dtype=DT), lam, X, t).sum(), lam)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OptimalityWarning)
        torch.autograd.grad(RIDGE(torch.zeros(4, dtype=DT), lam, X, t).sum(), lam)


def test_hypergradient_with_swapped_arguments_warns_about_the_order() -> None:
    X, t = ridge()

    def inner(lam, w):
        return ridge_g(w, lam, X, t)

    def outer(lam, w):
        return (w**2).sum()

    lam = torch.full((4,), 0.8, dtype=DT)
    w = ridge_closed(lam, X, t)
    hg = hypergradient(outer, inner, lam, w)
    ref = torch.func.grad(lambda lam: outer(lam, ridge_closed(lam, X, t)))(lam)
    torch.testing.assert_close(hg, ref, rtol=1e-10, atol=1e-12)
    with pytest.warns(OptimalityWarning, match="argument order"):
        hypergradient(outer, inner, w, lam)  # sizes match, order wrong


def test_neumann_default_alpha_through_custom_root() -> None:
    X, t = ridge()
    sol = custom_root(torch.func.grad(ridge_g), solve="neumann", K=4000)(lambda w0, lam, X, t: ridge_closed(lam, X, t))
    lam = torch.tensor(3.0, dtype=DT, requires_grad=True)
    (g,) = torch.autograd.grad(sol(torch.zeros(4, dtype=DT), lam, X, t).sum(), lam)
    (g_ref,) = torch.autograd.grad(ridge_closed(lam, X, t).sum(), lam)
    torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-10)
    assert sol.last_solve.info["alpha_estimated"]


# --------------------------------------------------------------------------- #
# item 6: forward mode on the recorded graph
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("solve", ["auto", "gmres", "normal_cg", "dense"])
def test_forward_mode_matches_reverse_mode(solve: str) -> None:
    """⟨J θ̇, v⟩ = ⟨θ̇, Jᵀ v⟩ for root_jvp / root_vjp, forward AD and jvp through custom_root."""

    def F(y, a, M):  # a non-symmetric root: M y + y³ = a
        return M @ y + y**3 - a

    g = torch.Generator().manual_seed(4)
    M = torch.randn(5, 5, generator=g, dtype=DT) * 0.3 + 2 * torch.eye(5, dtype=DT)
    a = torch.randn(5, generator=g, dtype=DT)
    y = torch.zeros(5, dtype=DT)
    for _ in range(60):
        y = y - torch.linalg.solve(M + torch.diag(3 * y**2), F(y, a, M))
    J = -torch.linalg.solve(M + torch.diag(3 * y**2), -torch.eye(5, dtype=DT))  # dy/da
    d, v = torch.randn(5, generator=g, dtype=DT), torch.randn(5, generator=g, dtype=DT)
    opts = {} if solve == "auto" else {"tol": 1e-12}
    torch.testing.assert_close(root_jvp(F, y, (a, M), (d, None), solve=solve, **opts), J @ d, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(root_vjp(F, y, (a, M), v, solve=solve, **opts)[0], J.T @ v, rtol=1e-9, atol=1e-11)
    sol = custom_root(F, solve=solve, **opts)(lambda y0, a, M: y)
    with fwad.dual_level():
        tangent = fwad.unpack_dual(sol(torch.zeros(5, dtype=DT), fwad.make_dual(a, d), M)).tangent
    torch.testing.assert_close(tangent, J @ d, rtol=1e-9, atol=1e-11)
    _, tan2 = torch.func.jvp(lambda a: sol(torch.zeros(5, dtype=DT), a, M), (a,), (d,))
    torch.testing.assert_close(tan2, J @ d, rtol=1e-9, atol=1e-11)


def test_vmap_then_plain_backward_uses_each_elements_own_solution() -> None:
    """vmap over the decorated solver, then .backward() outside the transform: per-element records."""
    X, t = ridge(seed=5)
    lams = torch.tensor([0.5, 1.0, 3.0], dtype=DT, requires_grad=True)
    ys = torch.func.vmap(lambda lam: RIDGE(torch.zeros(4, dtype=DT), lam, X, t))(lams)
    (g,) = torch.autograd.grad((ys**2).sum(), lams)
    ref = torch.stack([torch.func.grad(lambda lam: (ridge_closed(lam, X, t) ** 2).sum())(lam) for lam in lams.detach()])
    torch.testing.assert_close(g, ref, rtol=1e-9, atol=1e-12)
