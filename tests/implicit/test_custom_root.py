"""custom_root / custom_fixed_point / root_vjp / root_jvp against closed forms and finite differences."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import implicit
from implicit import custom_fixed_point, custom_root, root_jvp, root_vjp

DT = torch.float64


# --------------------------------------------------------------------------- #
# ridge regression: w*(λ) = (XᵀX + diag λ)⁻¹ Xᵀ t, everything in closed form
# --------------------------------------------------------------------------- #
def ridge_data(n: int = 30, d: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    t = X @ torch.randn(d, generator=g, dtype=DT) + 0.3 * torch.randn(n, generator=g, dtype=DT)
    Xv = torch.randn(n, d, generator=g, dtype=DT)
    tv = Xv @ torch.randn(d, generator=g, dtype=DT)
    lam = torch.rand(d, generator=g, dtype=DT) + 0.5
    return X, t, Xv, tv, lam


def ridge_objective(w, lam, X, t):
    return 0.5 * ((X @ w - t) ** 2).sum() + 0.5 * (lam * w**2).sum()


def ridge_closed_form(lam, X, t):
    return torch.linalg.solve(X.T @ X + torch.diag(lam), X.T @ t)


def ridge_solver(w0, lam, X, t):  # "any solver": a closed form here, never differentiated
    return ridge_closed_form(lam, X, t)


def truncated_neumann(A, b, alpha, K):
    M = torch.eye(A.shape[0], dtype=A.dtype) - alpha * A
    return alpha * sum(torch.linalg.matrix_power(M, j) for j in range(K)) @ b


ALL_SOLVES = [
    ("cg", {}),
    ("normal_cg", {}),
    ("minres", {}),
    ("gmres", {}),
    ("dense", {}),
]


@pytest.mark.parametrize("solve,opts", ALL_SOLVES + [("user", {})])
def test_ridge_jacobian_and_hypergradient_closed_form(solve, opts) -> None:
    X, t, Xv, tv, lam0 = ridge_data()
    H = X.T @ X + torch.diag(lam0)
    if solve == "user":
        solve = lambda matvec, b: torch.linalg.solve(H, b)  # noqa: E731 - e.g. a known inverse
    sol = custom_root(torch.func.grad(ridge_objective), solve=solve, nonconvergence="raise", **opts)(ridge_solver)
    lam = lam0.clone().requires_grad_()
    w = sol(torch.zeros(6, dtype=DT), lam, X, t)
    w_star = ridge_closed_form(lam0, X, t)
    torch.testing.assert_close(w.detach(), w_star, rtol=1e-12, atol=1e-12)
    # dw*/dλ = -H⁻¹ diag(w*), row by row (reverse mode)
    J = torch.stack([torch.autograd.grad(w[i], lam, retain_graph=True)[0] for i in range(6)])
    J_exact = -torch.linalg.solve(H, torch.diag(w_star))
    torch.testing.assert_close(J, J_exact, rtol=1e-10, atol=1e-10)
    # hypergradient of the validation loss: -w* ⊙ H⁻¹ Xvᵀ(Xv w* - tv)
    val = 0.5 * ((Xv @ w - tv) ** 2).sum()
    (h,) = torch.autograd.grad(val, lam)
    h_exact = -w_star * torch.linalg.solve(H, Xv.T @ (Xv @ w_star - tv))
    torch.testing.assert_close(h, h_exact, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("K", [1, 3, 20])
def test_ridge_neumann_matches_its_truncation(K: int) -> None:
    X, t, Xv, tv, lam0 = ridge_data()
    H = X.T @ X + torch.diag(lam0)
    alpha = 1.0 / float(torch.linalg.eigvalsh(H).max())
    sol = custom_root(torch.func.grad(ridge_objective), solve="neumann", alpha=alpha, K=K)(ridge_solver)
    lam = lam0.clone().requires_grad_()
    w = sol(torch.zeros(6, dtype=DT), lam, X, t)
    (h,) = torch.autograd.grad(0.5 * ((Xv @ w - tv) ** 2).sum(), lam)
    w_star = w.detach()
    h_trunc = -w_star * truncated_neumann(H, Xv.T @ (Xv @ w_star - tv), alpha, K)
    torch.testing.assert_close(h, h_trunc, rtol=1e-10, atol=1e-12)


def test_ridge_neumann_converges_to_exact() -> None:
    X, t, Xv, tv, lam0 = ridge_data()
    H = X.T @ X + torch.diag(lam0)
    ev = torch.linalg.eigvalsh(H)
    alpha = 2.0 / float(ev.max() + ev.min())
    sol = custom_root(torch.func.grad(ridge_objective), solve="neumann", alpha=alpha, K=3000)(ridge_solver)
    lam = lam0.clone().requires_grad_()
    w = sol(torch.zeros(6, dtype=DT), lam, X, t)
    (h,) = torch.autograd.grad(0.5 * ((Xv @ w - tv) ** 2).sum(), lam)
    w_star = w.detach()
    h_exact = -w_star * torch.linalg.solve(H, Xv.T @ (Xv @ w_star - tv))
    torch.testing.assert_close(h, h_exact, rtol=1e-9, atol=1e-10)


def test_forward_mode_matches_closed_form() -> None:
    X, t, _, _, lam0 = ridge_data()
    H = X.T @ X + torch.diag(lam0)
    sol = custom_root(torch.func.grad(ridge_objective), solve="gmres")(ridge_solver)
    d = torch.randn(6, dtype=DT)
    w, w_dot = torch.func.jvp(lambda lam: sol(torch.zeros(6, dtype=DT), lam, X, t), (lam0,), (d,))
    torch.testing.assert_close(w_dot, -torch.linalg.solve(H, w * d), rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- #
# gradcheck on smooth nonlinear problems
# --------------------------------------------------------------------------- #
def cubic_residual(y, a, M):
    """F = M y + y³ - a: a nonsymmetric Jacobian M + 3 diag(y²)."""
    return M @ y + y**3 - a


def newton_solver(y0, a, M):
    y = y0.clone()
    for _ in range(60):
        J = M + torch.diag(3 * y**2)
        y = y - torch.linalg.solve(J, cubic_residual(y, a, M))
    return y


@pytest.mark.parametrize("solve", ["normal_cg", "gmres", "dense"])
def test_gradcheck_nonsymmetric_root(solve: str) -> None:
    g = torch.Generator().manual_seed(3)
    M = (torch.randn(4, 4, generator=g, dtype=DT) * 0.3 + 2 * torch.eye(4, dtype=DT)).requires_grad_()
    a = torch.randn(4, generator=g, dtype=DT, requires_grad=True)
    sol = custom_root(cubic_residual, solve=solve, **({} if solve == "dense" else {"tol": 1e-13}))(newton_solver)
    y0 = torch.zeros(4, dtype=DT)
    assert torch.autograd.gradcheck(lambda a, M: sol(y0, a, M), (a, M), atol=1e-7)
    assert torch.autograd.gradgradcheck(lambda a, M: sol(y0, a, M), (a, M), atol=1e-6)


def test_gradcheck_and_gradgradcheck_logistic_regression() -> None:
    g = torch.Generator().manual_seed(4)
    X = torch.randn(25, 3, generator=g, dtype=DT)
    lab = (torch.rand(25, generator=g, dtype=DT) > 0.5).to(DT)

    def inner(w, log_lam, X, lab):
        z = X @ w
        return torch.nn.functional.softplus(z).mean() - (lab * z).mean() + 0.5 * (log_lam.exp() * w**2).sum()

    def newton(w0, log_lam, X, lab):
        w = w0.clone()
        for _ in range(30):
            w = w - torch.linalg.solve(
                torch.func.hessian(inner)(w, log_lam, X, lab), torch.func.grad(inner)(w, log_lam, X, lab)
            )
        return w

    sol = custom_root(torch.func.grad(inner), solve="cg", tol=1e-13)(newton)
    log_lam = torch.randn(3, generator=g, dtype=DT).requires_grad_()
    w0 = torch.zeros(3, dtype=DT)
    assert torch.autograd.gradcheck(lambda ll: sol(w0, ll, X, lab), (log_lam,))
    assert torch.autograd.gradgradcheck(lambda ll: sol(w0, ll, X, lab), (log_lam,), atol=1e-6)


def contraction(y, a, W):
    return torch.tanh(W @ y + a)


def iterate(y0, a, W):
    y = y0
    for _ in range(200):
        y = contraction(y, a, W)
    return y


@pytest.mark.parametrize("solve,opts", [("normal_cg", {}), ("gmres", {}), ("neumann", {"alpha": -1.0, "K": 200})])
def test_gradcheck_fixed_point(solve, opts) -> None:
    g = torch.Generator().manual_seed(5)
    W = (0.4 * torch.randn(4, 4, generator=g, dtype=DT) / 2).requires_grad_()
    a = torch.randn(4, generator=g, dtype=DT, requires_grad=True)
    fp = custom_fixed_point(contraction, solve=solve, **opts)(iterate)
    y0 = torch.zeros(4, dtype=DT)
    assert torch.autograd.gradcheck(lambda a, W: fp(y0, a, W), (a, W), atol=1e-7)
    if solve != "neumann":
        assert torch.autograd.gradgradcheck(lambda a, W: fp(y0, a, W), (a, W), atol=1e-6)


def test_second_derivative_is_exact_not_first_order_only() -> None:
    """jaxopt #141: the Hessian of an outer loss through custom_root must equal the closed form's."""
    X, t, Xv, tv, lam0 = ridge_data()
    sol = custom_root(torch.func.grad(ridge_objective), tol=1e-13)(ridge_solver)

    def outer_ift(lam):
        return 0.5 * ((Xv @ sol(torch.zeros(6, dtype=DT), lam, X, t) - tv) ** 2).sum()

    def outer_exact(lam):
        return 0.5 * ((Xv @ ridge_closed_form(lam, X, t) - tv) ** 2).sum()

    H_exact = torch.func.hessian(outer_exact)(lam0)
    torch.testing.assert_close(torch.func.hessian(outer_ift)(lam0), H_exact, rtol=1e-9, atol=1e-9)
    lam = lam0.clone().requires_grad_()
    (g,) = torch.autograd.grad(outer_ift(lam), lam, create_graph=True)
    H = torch.stack([torch.autograd.grad(g[i], lam, retain_graph=True)[0] for i in range(6)])
    torch.testing.assert_close(H, H_exact, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------- #
# structures: pytrees, kwargs, modules, aux, scalars
# --------------------------------------------------------------------------- #
def test_pytree_solution_and_keyword_theta() -> None:
    X, t, Xv, tv, lam0 = ridge_data()

    def g(y, lam, *, data):
        X, t = data
        return 0.5 * ((X @ y["w"] + y["b"] - t) ** 2).sum() + 0.5 * (lam * y["w"] ** 2).sum() + 0.5 * y["b"] ** 2

    Xa = torch.cat([X, torch.ones(30, 1, dtype=DT)], 1)

    def solver(y0, lam, *, data):
        sol = torch.linalg.solve(Xa.T @ Xa + torch.diag(torch.cat([lam, torch.ones(1, dtype=DT)])), Xa.T @ t)
        return {"w": sol[:6], "b": sol[6]}

    sol = custom_root(torch.func.grad(g))(solver)
    lam = lam0.clone().requires_grad_()
    y = sol({"w": torch.zeros(6, dtype=DT), "b": torch.zeros((), dtype=DT)}, lam, data=(X, t))
    assert set(y) == {"w", "b"} and y["b"].shape == ()
    (h,) = torch.autograd.grad(y["w"].sum() + 2 * y["b"], lam)
    H = Xa.T @ Xa + torch.diag(torch.cat([lam0, torch.ones(1, dtype=DT)]))
    ys = torch.cat([y["w"], y["b"].reshape(1)]).detach()
    v = torch.cat([torch.ones(6, dtype=DT), torch.full((1,), 2.0, dtype=DT)])
    torch.testing.assert_close(h, -(ys * torch.linalg.solve(H, v))[:6], rtol=1e-10, atol=1e-10)


def test_scalar_hyperparameter_gets_a_nonzero_gradient() -> None:
    """torchopt #222: 0-d tensor hyperparameters silently got zero gradients."""
    X, t, Xv, tv, _ = ridge_data()

    def g(w, lam, X, t):
        return 0.5 * ((X @ w - t) ** 2).sum() + 0.5 * lam * (w**2).sum()

    def solver(w0, lam, X, t):
        return torch.linalg.solve(X.T @ X + lam * torch.eye(6, dtype=DT), X.T @ t)

    lam = torch.tensor(0.8, dtype=DT, requires_grad=True)
    w = custom_root(torch.func.grad(g))(solver)(torch.zeros(6, dtype=DT), lam, X, t)
    (h,) = torch.autograd.grad(w.sum(), lam)
    H = X.T @ X + 0.8 * torch.eye(6, dtype=DT)
    exact = -torch.linalg.solve(H, w.detach()).sum()
    assert h.shape == () and abs(float(h)) > 1e-3
    torch.testing.assert_close(h, exact, rtol=1e-10, atol=1e-12)


def test_module_hyperparameters() -> None:
    """An nn.Module argument: its parameters are differentiated (as in an implicit layer)."""
    X, t, _, _, _ = ridge_data()
    shift = nn.Linear(6, 1, bias=False).double()  # a learned linear shift of the ridge target

    def g(w, model, lam):
        target = t + model(X).squeeze(-1)
        return 0.5 * ((X @ w - target) ** 2).sum() + 0.5 * lam * (w**2).sum()

    def solver(w0, model, lam):
        return torch.linalg.solve(X.T @ X + lam * torch.eye(6, dtype=DT), X.T @ (t + model(X).squeeze(-1)))

    sol = custom_root(torch.func.grad(g))(solver)
    lam = torch.tensor(0.5, dtype=DT, requires_grad=True)
    w = sol(torch.zeros(6, dtype=DT), shift, lam)
    w.sum().backward()
    # w* = H⁻¹Xᵀ(t + X a): dw/da = H⁻¹XᵀX
    H = X.T @ X + 0.5 * torch.eye(6, dtype=DT)
    expected = (torch.linalg.solve(H, X.T @ X)).sum(0)
    torch.testing.assert_close(shift.weight.grad.squeeze(0), expected, rtol=1e-10, atol=1e-10)
    assert lam.grad is not None


def test_has_aux() -> None:
    X, t, _, _, lam0 = ridge_data()

    def solver(w0, lam, X, t):
        w = ridge_closed_form(lam, X, t)
        return w, {"n_iter": 7, "grad_norm": torch.func.grad(ridge_objective)(w, lam, X, t).norm()}

    sol = custom_root(torch.func.grad(ridge_objective), has_aux=True)(solver)
    lam = lam0.clone().requires_grad_()
    w, aux = sol(torch.zeros(6, dtype=DT), lam, X, t)
    assert aux["n_iter"] == 7 and not aux["grad_norm"].requires_grad and float(aux["grad_norm"]) < 1e-10
    assert w.requires_grad
    assert sol.last_residual is not None and sol.last_residual < 1e-10


def test_solver_is_not_differentiated_and_theta_untouched() -> None:
    X, t, _, _, lam0 = ridge_data()
    seen = {}

    def solver(w0, lam, X, t):
        seen["requires_grad"] = lam.requires_grad
        w = w0.clone().requires_grad_()
        with torch.enable_grad():  # a solver may use autograd itself
            opt = torch.optim.LBFGS([w], max_iter=200, tolerance_grad=1e-14, tolerance_change=0)

            def closure():
                opt.zero_grad()
                loss = ridge_objective(w, lam, X, t)
                loss.backward()
                return loss

            opt.step(closure)
        return w

    sol = custom_root(torch.func.grad(ridge_objective))(solver)
    lam = lam0.clone().requires_grad_()
    w = sol(torch.zeros(6, dtype=DT), lam, X, t)
    assert seen["requires_grad"] is False and lam.grad is None
    w.sum().backward()
    H = X.T @ X + torch.diag(lam0)
    torch.testing.assert_close(
        lam.grad, -w.detach() * torch.linalg.solve(H, torch.ones(6, dtype=DT)), rtol=1e-6, atol=1e-8
    )


def test_init_may_be_none_or_hold_constants() -> None:
    X, t, _, _, lam0 = ridge_data()
    sol = custom_root(torch.func.grad(ridge_objective))(lambda init, lam, X, t: ridge_closed_form(lam, X, t))
    for init in (None, {"w": torch.zeros(6, dtype=DT), "steps": 10, "note": None}):
        lam = lam0.clone().requires_grad_()
        sol(init, lam, X, t).sum().backward()
        assert lam.grad is not None and torch.isfinite(lam.grad).all()


def test_float32_stays_float32() -> None:
    X, t, _, _, lam0 = ridge_data()
    X, t, lam0 = X.float(), t.float(), lam0.float()
    sol = custom_root(torch.func.grad(ridge_objective))(ridge_solver)
    lam = lam0.clone().requires_grad_()
    w = sol(torch.zeros(6), lam, X, t)
    w.sum().backward()
    assert w.dtype == torch.float32 and lam.grad.dtype == torch.float32
    H = X.T @ X + torch.diag(lam0)
    torch.testing.assert_close(lam.grad, -w.detach() * torch.linalg.solve(H, torch.ones(6)), rtol=1e-3, atol=1e-4)


def test_last_solve_info() -> None:
    X, t, _, _, lam0 = ridge_data()
    sol = custom_root(torch.func.grad(ridge_objective), solve="cg", tol=1e-12)(ridge_solver)
    assert sol.last_solve is None
    lam = lam0.clone().requires_grad_()
    sol(torch.zeros(6, dtype=DT), lam, X, t).sum().backward()
    info = sol.last_solve
    assert info.method == "cg" and info.converged and 0 < info.n_matvecs <= 7
    assert "cg" in repr(sol)


# --------------------------------------------------------------------------- #
# errors that name the problem
# --------------------------------------------------------------------------- #
def _lam():
    return ridge_data()[4].clone().requires_grad_()


def test_error_signature_mismatch() -> None:
    """jaxopt #360."""
    X, t, _, _, _ = ridge_data()

    def opt_fn(w, lam):  # forgot the data arguments
        return w

    with pytest.raises(TypeError, match=r"signature of optimality_fn 'opt_fn'.*does not match the solver"):
        custom_root(opt_fn)(ridge_solver)(torch.zeros(6, dtype=DT), _lam(), X, t)
    with pytest.raises(TypeError, match=r"cannot be called as solver\(init, \*theta\)"):
        custom_root(torch.func.grad(ridge_objective))(ridge_solver)(torch.zeros(6, dtype=DT), _lam())


def test_evaluation_without_anything_requiring_grad_just_computes() -> None:
    """Issue 14 item 4 (torchopt #222 / #144): plain tensors, Python floats, frozen modules: return y*."""
    X, t, _, _, lam0 = ridge_data()
    sol = custom_root(torch.func.grad(ridge_objective))(ridge_solver)
    w = sol(torch.zeros(6, dtype=DT), lam0, X, t)  # grad mode on, nothing requires grad
    torch.testing.assert_close(w, ridge_closed_form(lam0, X, t))
    assert not w.requires_grad and sol.last_residual < 1e-10

    def g(w, lam):
        return 0.5 * ((w - 1) ** 2).sum() * lam

    y = custom_root(torch.func.grad(g))(lambda w0, lam: torch.ones_like(w0))(torch.zeros(2, dtype=DT), 0.5)
    torch.testing.assert_close(y, torch.ones(2, dtype=DT))

    class Frozen(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lam = nn.Parameter(lam0.clone(), requires_grad=False)

    m = Frozen()
    solm = custom_root(lambda w, m, X, t: torch.func.grad(ridge_objective)(w, m.lam, X, t))(
        lambda w0, m, X, t: ridge_closed_form(m.lam, X, t)
    )
    torch.testing.assert_close(solm(torch.zeros(6, dtype=DT), m, X, t), ridge_closed_form(lam0, X, t))
    with torch.no_grad():  # only y* wanted: fine
        w = sol(torch.zeros(6, dtype=DT), lam0.clone().requires_grad_(), X, t)
    torch.testing.assert_close(w, ridge_closed_form(lam0, X, t))


def test_error_closure_over_hyperparameter() -> None:
    """jaxopt #31: a hyperparameter captured by closure would get no gradient."""
    X, t, _, _, _ = ridge_data()
    lam = _lam()

    def opt_fn(w, unused, X, t):
        return torch.func.grad(ridge_objective)(w, lam, X, t)

    with pytest.raises(ValueError, match="closes over it"):
        custom_root(opt_fn)(lambda w0, u, X, t: ridge_closed_form(lam.detach(), X, t))(
            torch.zeros(6, dtype=DT), torch.ones(1, dtype=DT, requires_grad=True), X, t
        )


def test_error_shapes_of_f_and_y_differ() -> None:
    X, t, _, _, _ = ridge_data()

    def opt_fn(w, lam, X, t):
        return torch.func.grad(ridge_objective)(w, lam, X, t)[:4]

    with pytest.raises(ValueError, match="square system"):
        custom_root(opt_fn)(ridge_solver)(torch.zeros(6, dtype=DT), _lam(), X, t)


def test_error_has_aux_misuse() -> None:
    X, t, _, _, _ = ridge_data()

    def with_aux(w0, lam, X, t):
        return ridge_closed_form(lam, X, t), 3

    with pytest.raises(TypeError, match="has_aux=True"):
        custom_root(torch.func.grad(ridge_objective))(with_aux)(torch.zeros(6, dtype=DT), _lam(), X, t)
    with pytest.raises(TypeError, match="must return a pair"):
        custom_root(torch.func.grad(ridge_objective), has_aux=True)(ridge_solver)(
            torch.zeros(6, dtype=DT), _lam(), X, t
        )


def test_error_autograd_grad_inside_optimality_fn() -> None:
    X, t, _, _, _ = ridge_data()

    def opt_fn(w, lam, X, t):
        return torch.autograd.grad(ridge_objective(w, lam, X, t), w, create_graph=True)[0]

    sol = custom_root(opt_fn)(ridge_solver)
    # plain autograd records F with y and theta as leaves, so such an F is differentiated correctly ...
    lam = _lam()
    (g,) = torch.autograd.grad(sol(torch.zeros(6, dtype=DT), lam, X, t).sum(), lam)
    (g_ref,) = torch.autograd.grad(ridge_closed_form(lam, X, t).sum(), lam)
    torch.testing.assert_close(g, g_ref)
    # ... but torch.func transforms and a no_grad evaluation of F cannot run it: the message names the cause
    with pytest.raises(RuntimeError, match="torch.autograd.grad.*torch.func.grad"):
        torch.func.grad(lambda lam: sol(torch.zeros(6, dtype=DT), lam, X, t).sum())(_lam().detach())
    with torch.no_grad():  # evaluation alone does not need F (it is deferred to last_residual)
        w = sol(torch.zeros(6, dtype=DT), _lam(), X, t)
        torch.testing.assert_close(w, ridge_closed_form(_lam().detach(), X, t))
        with pytest.raises(RuntimeError, match="torch.autograd.grad.*torch.func.grad"):
            sol.last_residual  # noqa: B018 - the property evaluates F


def test_error_linear_solve_did_not_converge() -> None:
    X, t, _, _, _ = ridge_data()
    sol = custom_root(torch.func.grad(ridge_objective), "cg", maxiter=1, nonconvergence="raise")(ridge_solver)
    w = sol(torch.zeros(6, dtype=DT), _lam(), X, t)
    with pytest.raises(implicit.LinearSolveError, match=r"residual .* \(relative"):
        w.sum().backward()
    sol = custom_root(torch.func.grad(ridge_objective), "cg", maxiter=1)(ridge_solver)
    with pytest.warns(implicit.LinearSolveWarning, match="did not converge"):
        sol(torch.zeros(6, dtype=DT), _lam(), X, t).sum().backward()


def test_error_bad_decorator_arguments() -> None:
    with pytest.raises(TypeError, match="optimality_fn must be callable"):
        custom_root(3)
    with pytest.raises(ValueError, match="unknown solve"):
        custom_root(torch.func.grad(ridge_objective), solve="qr")
    with pytest.raises(TypeError, match="no option 'alpha'"):
        custom_root(torch.func.grad(ridge_objective), solve="cg", alpha=0.1)
    with pytest.raises(TypeError, match="T must be callable"):
        custom_fixed_point(None)


# --------------------------------------------------------------------------- #
# root_vjp / root_jvp
# --------------------------------------------------------------------------- #
def test_root_vjp_and_jvp_against_dense_ift() -> None:
    g = torch.Generator().manual_seed(6)
    M = torch.randn(5, 5, generator=g, dtype=DT) * 0.3 + 2 * torch.eye(5, dtype=DT)
    a = torch.randn(5, generator=g, dtype=DT)
    y = newton_solver(torch.zeros(5, dtype=DT), a, M)
    A = M + torch.diag(3 * y**2)  # ∂F/∂y
    v = torch.randn(5, generator=g, dtype=DT)
    # F = M y + y³ - a: ∂F/∂a = -I, ∂F/∂M[i, j] = δ_ik y_j
    a_bar, M_bar = root_vjp(cubic_residual, y, (a, M), v, solve="gmres")
    u = torch.linalg.solve(A.T, v)
    torch.testing.assert_close(a_bar, u, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(M_bar, -torch.outer(u, y), rtol=1e-10, atol=1e-10)
    a_dot = torch.randn(5, generator=g, dtype=DT)
    M_dot = torch.randn(5, 5, generator=g, dtype=DT)
    y_dot = root_jvp(cubic_residual, y, (a, M), (a_dot, M_dot), solve="normal_cg")
    torch.testing.assert_close(y_dot, -torch.linalg.solve(A, M_dot @ y - a_dot), rtol=1e-9, atol=1e-10)
    y_dot_a = root_jvp(cubic_residual, y, (a, M), (a_dot, None), solve="dense")
    torch.testing.assert_close(y_dot_a, torch.linalg.solve(A, a_dot), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="cotangent"):
        root_vjp(cubic_residual, y, (a, M), v[:3])
    with pytest.raises(TypeError, match="theta must be a tuple"):
        root_vjp(cubic_residual, y, [a, M], v)
    with pytest.raises(ValueError, match="tangents"):
        root_jvp(cubic_residual, y, (a, M), (a_dot,))


def test_root_vjp_is_differentiable() -> None:
    X, t, _, _, lam0 = ridge_data()
    w = ridge_closed_form(lam0, X, t)

    def vjp_of(lam):
        return root_vjp(
            torch.func.grad(ridge_objective),
            ridge_closed_form(lam, X, t),
            (lam, X, t),
            torch.ones(6, dtype=DT),
            tol=1e-13,
        )[0]

    def exact(lam):
        return torch.func.vjp(lambda lam: ridge_closed_form(lam, X, t), lam)[1](torch.ones(6, dtype=DT))[0]

    torch.testing.assert_close(vjp_of(lam0), exact(lam0), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.func.jacrev(vjp_of)(lam0), torch.func.jacrev(exact)(lam0), rtol=1e-8, atol=1e-9)
    assert w.shape == (6,)


def test_fixed_point_example_and_structure_check() -> None:
    def t_bad(y, a):
        return (y, y)

    fp = custom_fixed_point(t_bad)(lambda y0, a: y0)
    with pytest.raises(ValueError, match="structure of y"):
        fp(torch.zeros(2, dtype=DT), torch.ones(2, dtype=DT, requires_grad=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = torch.tensor([0.3, -0.2], dtype=DT, requires_grad=True)
        fp = custom_fixed_point(lambda y, a: 0.5 * torch.cos(y) + a)(lambda y0, a: iterate_cos(y0, a))
        y = fp(torch.zeros(2, dtype=DT), a)
        (g,) = torch.autograd.grad(y.sum(), a)
        torch.testing.assert_close(g, 1 / (1 + 0.5 * torch.sin(y.detach())), rtol=1e-10, atol=1e-10)


def iterate_cos(y0, a):
    y = y0
    for _ in range(100):
        y = 0.5 * torch.cos(y) + a
    return y
