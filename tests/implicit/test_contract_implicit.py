"""Acceptance tests of the public ``implicit`` API on fresh problems, with independent references.

Inner problem: pseudo-Huber regression with a smooth elastic-net-like penalty,
``g(w; θ) = Σ δ²(√(1 + (r/δ)²) − 1) + ½ Σ e^{ρ} w² + μ Σ √(w² + ε)``,
solved by a plain Newton loop (never differentiated). The reference Jacobian is
the dense IFT formula ``−[∂_w F]⁻¹ ∂_θ F`` with ``F = ∇_w g`` formed by
``torch.func.jacrev``, and central finite differences of the whole pipeline.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import implicit
from curvlab import linalg
from curvlab.linops import MFACInverse
from implicit import custom_fixed_point, custom_root, hypergradient, root_jvp, root_vjp

DT = torch.float64
DELTA, EPS = 0.7, 0.05


def _data(n: int = 25, d: int = 5, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    t = X @ torch.randn(d, generator=g, dtype=DT) + 0.5 * torch.randn(n, generator=g, dtype=DT)
    return X, t


X, T = _data()
D = X.shape[1]


def huber_g(w, rho, mu):
    r = X @ w - T
    fit = (DELTA**2 * (torch.sqrt(1 + (r / DELTA) ** 2) - 1)).sum()
    return fit + 0.5 * (torch.exp(rho) * w**2).sum() + mu * torch.sqrt(w**2 + EPS).sum()


F_huber = torch.func.grad(huber_g)  # F(w, rho, mu) = ∇_w g


def newton(fun, w0, *theta, iters: int = 50):
    """Newton's method on ``fun(w, *theta)``: an arbitrary inner solver, run without autograd."""
    w = w0.clone()
    for _ in range(iters):
        gr = torch.func.grad(fun)(w, *theta)
        H = torch.func.hessian(fun)(w, *theta)
        w = w - torch.linalg.solve(H, gr)
        if gr.norm() < 1e-14:
            break
    return w


def ref_jacobian(rho, mu):
    """Dense IFT Jacobians dw*/dρ (d×d) and dw*/dμ (d,) at the Newton solution."""
    w = newton(huber_g, torch.zeros(D, dtype=DT), rho, mu)
    A = torch.func.jacrev(F_huber, argnums=0)(w, rho, mu)
    B_rho, B_mu = torch.func.jacrev(F_huber, argnums=(1, 2))(w, rho, mu)
    return w, -torch.linalg.solve(A, B_rho), -torch.linalg.solve(A, B_mu)


RHO = torch.linspace(-0.5, 0.5, D, dtype=DT)
MU = torch.tensor(0.3, dtype=DT)


# --------------------------------------------------------------------------- #
# theta structures
# --------------------------------------------------------------------------- #
def test_tensor_theta_matches_dense_ift_and_finite_differences() -> None:
    @custom_root(F_huber, solve="cg")
    def solver(w0, rho, mu):
        return newton(huber_g, w0, rho, mu)

    rho, mu = RHO.clone().requires_grad_(), MU.clone().requires_grad_()
    w = solver(torch.zeros(D, dtype=DT), rho, mu)
    w_ref, J_rho, J_mu = ref_jacobian(RHO, MU)
    torch.testing.assert_close(w.detach(), w_ref, rtol=0, atol=1e-12)
    v = torch.arange(1.0, D + 1, dtype=DT)
    g_rho, g_mu = torch.autograd.grad(w @ v, (rho, mu))
    torch.testing.assert_close(g_rho, J_rho.T @ v, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(g_mu, J_mu @ v, rtol=1e-8, atol=1e-10)
    # central finite differences of the whole pipeline in μ
    h = 1e-6
    wp = newton(huber_g, torch.zeros(D, dtype=DT), RHO, MU + h)
    wm = newton(huber_g, torch.zeros(D, dtype=DT), RHO, MU - h)
    torch.testing.assert_close(g_mu, ((wp - wm) / (2 * h)) @ v, rtol=1e-6, atol=1e-7)
    assert solver.last_residual is not None and solver.last_residual < 1e-10
    assert solver.last_solve is not None and solver.last_solve.converged


def test_dict_tuple_kwargs_and_module_theta_agree() -> None:
    _, J_rho, J_mu = ref_jacobian(RHO, MU)
    v = torch.linspace(1.0, 2.0, D, dtype=DT)

    # dict theta
    def g_dict(w, hp):
        return huber_g(w, hp["rho"], hp["mu"])

    @custom_root(torch.func.grad(g_dict))
    def solve_dict(w0, hp):
        return newton(g_dict, w0, hp)

    hp = {"rho": RHO.clone().requires_grad_(), "mu": MU.clone().requires_grad_()}
    w = solve_dict(torch.zeros(D, dtype=DT), hp)
    gr, gm = torch.autograd.grad(w @ v, (hp["rho"], hp["mu"]))
    torch.testing.assert_close(gr, J_rho.T @ v, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(gm, J_mu @ v, rtol=1e-8, atol=1e-10)

    # tuple theta
    def g_tuple(w, hp):
        return huber_g(w, *hp)

    @custom_root(torch.func.grad(g_tuple), solve="gmres")
    def solve_tuple(w0, hp):
        return newton(g_tuple, w0, hp)

    hp_t = (RHO.clone().requires_grad_(), MU.clone().requires_grad_())
    w = solve_tuple(torch.zeros(D, dtype=DT), hp_t)
    gr, gm = torch.autograd.grad(w @ v, hp_t)
    torch.testing.assert_close(gr, J_rho.T @ v, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(gm, J_mu @ v, rtol=1e-8, atol=1e-10)

    # keyword theta (only mu is differentiated; rho is a constant tensor without grad)
    def g_kw(w, rho, *, mu):
        return huber_g(w, rho, mu)

    @custom_root(torch.func.grad(g_kw), solve="minres")
    def solve_kw(w0, rho, *, mu):
        return newton(lambda ww, r: g_kw(ww, r, mu=mu), w0, rho)

    mu = MU.clone().requires_grad_()
    w = solve_kw(torch.zeros(D, dtype=DT), RHO, mu=mu)
    (gm,) = torch.autograd.grad(w @ v, mu)
    torch.testing.assert_close(gm, J_mu @ v, rtol=1e-8, atol=1e-10)

    # nn.Module theta: its parameters are the hyperparameters
    class HP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rho = nn.Parameter(RHO.clone())
            self.mu = nn.Parameter(MU.clone())

    def g_mod(w, m):
        return huber_g(w, m.rho, m.mu)

    def opt_mod(w, m):
        return torch.func.grad(g_mod)(w, m)

    @custom_root(opt_mod, solve="normal_cg")
    def solve_mod(w0, m):
        return newton(g_mod, w0, m)

    m = HP()
    w = solve_mod(torch.zeros(D, dtype=DT), m)
    (w @ v).backward()
    torch.testing.assert_close(m.rho.grad, J_rho.T @ v, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(m.mu.grad, J_mu @ v, rtol=1e-7, atol=1e-9)


def test_structured_solution_dict_y() -> None:
    """y* as a dict {"w": ..., "b": ...} (a regression with an intercept)."""

    def g(y, rho):
        r = X @ y["w"] + y["b"] - T
        return 0.5 * (r**2).sum() + 0.5 * (torch.exp(rho) * y["w"] ** 2).sum() + 0.5 * y["b"] ** 2

    def closed(rho):
        Xa = torch.cat([X, torch.ones(X.shape[0], 1, dtype=DT)], 1)
        H = Xa.T @ Xa + torch.diag(torch.cat([torch.exp(rho), torch.ones(1, dtype=DT)]))
        sol = torch.linalg.solve(H, Xa.T @ T)
        return sol

    @custom_root(torch.func.grad(g))
    def solver(y0, rho):
        s = closed(rho)
        return {"w": s[:D], "b": s[D]}

    rho = RHO.clone().requires_grad_()
    y = solver({"w": torch.zeros(D, dtype=DT), "b": torch.zeros((), dtype=DT)}, rho)
    assert set(y) == {"w", "b"} and y["b"].shape == ()
    loss = (y["w"] ** 2).sum() + 3 * y["b"]
    (g_ift,) = torch.autograd.grad(loss, rho)
    g_ref = torch.func.grad(lambda r: (closed(r)[:D] ** 2).sum() + 3 * closed(r)[D])(RHO)
    torch.testing.assert_close(g_ift, g_ref, rtol=1e-8, atol=1e-10)


# --------------------------------------------------------------------------- #
# every solve choice, a user callable, M-FAC's inverse
# --------------------------------------------------------------------------- #
def _mfac_problem(seed: int = 0):
    """g(y, b) = ½ yᵀ A y − bᵀ y with A = λI + GᵀG/m exactly M-FAC's damped Fisher: y* = A⁻¹ b."""
    gen = torch.Generator().manual_seed(seed)
    m, d, lam = 4, 9, 0.5
    G = torch.randn(m, d, generator=gen, dtype=DT)
    A = lam * torch.eye(d, dtype=DT) + G.T @ G / m
    b = torch.randn(d, generator=gen, dtype=DT)
    return G, lam, A, b


@pytest.mark.parametrize(
    "solve,opts",
    [
        ("cg", {}),
        ("normal_cg", {}),
        ("minres", {}),
        ("gmres", {"restart": 5}),
        ("dense", {}),
        ("neumann", {"alpha": 0.3, "K": 400}),
        ("user", {}),
        ("mfac_solve", {}),
        ("mfac_precond", {}),
    ],
)
def test_every_solve_on_quadratic(solve, opts) -> None:
    G, lam, A, b0 = _mfac_problem()
    d = A.shape[0]
    minv = MFACInverse(G, damping=lam)

    def fopt(y, b):
        return A @ y - b

    if solve == "user":

        def my_solve(matvec, rhs):  # a user's own (unpreconditioned) CG
            x = torch.zeros_like(rhs)
            r = rhs - matvec(x)
            p = r.clone()
            for _ in range(100):
                Ap = matvec(p)
                a = (r @ r) / (p @ Ap)
                x = x + a * p
                r_new = r - a * Ap
                if r_new.norm() < 1e-13:
                    break
                p = r_new + (r_new @ r_new) / (r @ r) * p
                r = r_new
            return x

        solve_arg, opts = my_solve, {}
    elif solve == "mfac_solve":
        solve_arg = lambda matvec, rhs: minv @ rhs  # noqa: E731
    elif solve == "mfac_precond":
        solve_arg, opts = "cg", {"M": minv}
    else:
        solve_arg = solve

    @custom_root(fopt, solve=solve_arg, **opts)
    def solver(y0, b):
        return torch.linalg.solve(A, b)

    b = b0.clone().requires_grad_()
    y = solver(torch.zeros(d, dtype=DT), b)
    v = torch.randn(d, dtype=DT)
    (gb,) = torch.autograd.grad(y @ v, b)
    torch.testing.assert_close(gb, torch.linalg.solve(A.T, v), rtol=1e-7, atol=1e-9)
    if solve == "mfac_precond":  # an exact preconditioner: CG is done in one or two iterations
        assert solver.last_solve.n_iter <= 2
    # the functional forms agree with the decorator
    if isinstance(solve_arg, str):

        def fn(matvec, rhs, **o):
            return linalg.solve(matvec, rhs, solve_arg, **o).x

        x = fn(lambda u: A @ u, v, **opts)
        torch.testing.assert_close(x, torch.linalg.solve(A, v), rtol=1e-7, atol=1e-9)
        x2 = fn(A, torch.stack([v, 2 * v], 1), **opts)  # dense matrix, block right-hand side
        torch.testing.assert_close(x2[:, 1], 2 * torch.linalg.solve(A, v), rtol=1e-7, atol=1e-9)


def test_solve_functions_accept_linear_operators() -> None:
    G, lam, A, b = _mfac_problem(1)
    fisher_inv = MFACInverse(G, damping=lam)
    # MFACInverse is itself an operator: solving with it as the matrix inverts the inverse
    for method in ("cg", "minres", "gmres", "dense", "auto"):
        x = linalg.solve(fisher_inv, b, method).x
        torch.testing.assert_close(x, A @ b, rtol=1e-7, atol=1e-8)


# --------------------------------------------------------------------------- #
# fixed points
# --------------------------------------------------------------------------- #
def _contraction(seed: int = 0, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, n, generator=g, dtype=DT)
    W = 0.6 * W / torch.linalg.matrix_norm(W, 2)
    c = torch.randn(n, generator=g, dtype=DT)
    return W, c


def t_map(y, W, c):
    return torch.tanh(W @ y + c)


def iterate(y0, W, c, n: int = 200):
    y = y0
    for _ in range(n):
        y = t_map(y, W, c)
    return y


@pytest.mark.parametrize("solve,opts", [("normal_cg", {}), ("gmres", {}), ("neumann", {"alpha": -1.0, "K": 200})])
def test_fixed_point_gradcheck(solve, opts) -> None:
    W, c = _contraction()

    @custom_fixed_point(t_map, solve=solve, **opts)
    def fp(y0, W, c):
        return iterate(y0, W, c)

    y0 = torch.zeros(4, dtype=DT)
    Wr, cr = W.clone().requires_grad_(), c.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda W_, c_: fp(y0, W_, c_), (Wr, cr), eps=1e-6, atol=1e-6)
    # reference: differentiate straight through many unrolled iterations
    y_unrolled = iterate(y0, Wr, cr)
    gW_ref, gc_ref = torch.autograd.grad(y_unrolled.sum(), (Wr, cr))
    gW, gc = torch.autograd.grad(fp(y0, Wr, cr).sum(), (Wr, cr))
    torch.testing.assert_close(gW, gW_ref, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(gc, gc_ref, rtol=1e-7, atol=1e-9)


def test_custom_root_gradcheck_and_gradgradcheck() -> None:
    @custom_root(F_huber, solve="cg", tol=1e-13)
    def solver(w0, rho, mu):
        return newton(huber_g, w0, rho, mu)

    w0 = torch.zeros(D, dtype=DT)
    rho, mu = RHO.clone().requires_grad_(), MU.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda r, m: solver(w0, r, m), (rho, mu), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradgradcheck(lambda r, m: solver(w0, r, m), (rho, mu), eps=1e-6, atol=1e-5)


def test_second_derivative_of_scalar_root_closed_form() -> None:
    """y*(θ) solves y + y³ = θ: y' = 1/(1+3y²), y'' = −6y·y'³ (higher order through custom_root)."""

    def fopt(y, th):
        return y + y**3 - th

    @custom_root(fopt, solve="dense")
    def cubic(y0, th):
        y = y0.clone()
        for _ in range(60):
            y = y - (y + y**3 - th) / (1 + 3 * y**2)
        return y

    th = torch.tensor(1.7, dtype=DT)
    y0 = torch.zeros((), dtype=DT)
    d1 = torch.func.grad(lambda t: cubic(y0, t))(th)
    d2 = torch.func.grad(torch.func.grad(lambda t: cubic(y0, t)))(th)
    y = cubic(y0, th.clone().requires_grad_()).detach()
    yp = 1 / (1 + 3 * y**2)
    torch.testing.assert_close(d1, yp, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(d2, -6 * y * yp**3, rtol=1e-8, atol=1e-10)
    # scalar theta does not silently give a zero gradient (torchopt #222)
    assert abs(float(d1)) > 0.05


# --------------------------------------------------------------------------- #
# torch.func transforms
# --------------------------------------------------------------------------- #
@custom_root(F_huber, solve="cg")
def huber_solver(w0, rho, mu):
    return newton(huber_g, w0, rho, mu)


def test_torch_func_grad_jacrev_jacfwd_vmap_equal_loops() -> None:
    w0 = torch.zeros(D, dtype=DT)
    _, J_rho, J_mu = ref_jacobian(RHO, MU)
    Jr = torch.func.jacrev(lambda r: huber_solver(w0, r, MU))(RHO)
    Jf = torch.func.jacfwd(lambda r: huber_solver(w0, r, MU))(RHO)
    torch.testing.assert_close(Jr, J_rho, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(Jf, J_rho, rtol=1e-8, atol=1e-10)
    gm = torch.func.grad(lambda m: huber_solver(w0, RHO, m).sum())(MU)
    torch.testing.assert_close(gm, J_mu.sum(), rtol=1e-8, atol=1e-10)

    # vmap over a batch of hyperparameters == a Python loop
    mus = torch.tensor([0.1, 0.3, 0.8], dtype=DT)

    def loss_grad(m):
        return torch.func.grad(lambda mm: (huber_solver(w0, RHO, mm) ** 2).sum())(m)

    batched = torch.func.vmap(loss_grad)(mus)
    looped = torch.stack([loss_grad(m) for m in mus])
    torch.testing.assert_close(batched, looped, rtol=1e-10, atol=1e-12)
    for m, gb in zip(mus, batched):
        _, _, Jm = ref_jacobian(RHO, m)
        w = newton(huber_g, w0, RHO, m)
        torch.testing.assert_close(gb, 2 * w @ Jm, rtol=1e-8, atol=1e-10)
    # vmap over rho rows, values and Jacobians
    rhos = torch.stack([RHO, RHO + 0.2])
    ws = torch.func.vmap(lambda r: huber_solver(w0, r, MU))(rhos)
    torch.testing.assert_close(ws[1], newton(huber_g, w0, RHO + 0.2, MU), rtol=0, atol=1e-12)


def test_root_vjp_and_root_jvp_against_dense() -> None:
    w = newton(huber_g, torch.zeros(D, dtype=DT), RHO, MU)
    _, J_rho, J_mu = ref_jacobian(RHO, MU)
    v = torch.randn(D, dtype=DT)
    g_rho, g_mu = root_vjp(F_huber, w, (RHO, MU), v)
    torch.testing.assert_close(g_rho, J_rho.T @ v, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(g_mu, J_mu @ v, rtol=1e-8, atol=1e-10)
    dr = torch.randn(D, dtype=DT)
    y_dot = root_jvp(F_huber, w, (RHO, MU), (dr, None))
    torch.testing.assert_close(y_dot, J_rho @ dr, rtol=1e-8, atol=1e-10)
    y_dot2 = root_jvp(F_huber, w, (RHO, MU), (None, torch.tensor(2.0, dtype=DT)), solve="dense")
    torch.testing.assert_close(y_dot2, 2 * J_mu, rtol=1e-8, atol=1e-10)


# --------------------------------------------------------------------------- #
# errors
# --------------------------------------------------------------------------- #
def test_signature_mismatch_is_named() -> None:
    def fopt(y, a, b):
        return y - a * b

    @custom_root(fopt)
    def solver(y0, a):
        return a.clone()

    with pytest.raises(TypeError, match="signature"):
        solver(torch.zeros(2, dtype=DT), torch.ones(2, dtype=DT, requires_grad=True))


def test_theta_without_grad_just_computes() -> None:
    w_ref = newton(huber_g, torch.zeros(D, dtype=DT), RHO, MU)
    torch.testing.assert_close(huber_solver(torch.zeros(D, dtype=DT), RHO, MU), w_ref)
    w_f = huber_solver(torch.zeros(D, dtype=DT), RHO, 0.3)  # a Python float hyperparameter
    torch.testing.assert_close(w_f, newton(huber_g, torch.zeros(D, dtype=DT), RHO, torch.tensor(0.3, dtype=DT)))
    with torch.no_grad():
        w = huber_solver(torch.zeros(D, dtype=DT), RHO, MU)
    assert w.shape == (D,)


def test_nonconvergence_warns_or_raises_with_residual() -> None:
    rho, mu = RHO.clone().requires_grad_(), MU.clone().requires_grad_()

    @custom_root(F_huber, solve="cg", maxiter=1)
    def warn_solver(w0, rho, mu):
        return newton(huber_g, w0, rho, mu)

    w = warn_solver(torch.zeros(D, dtype=DT), rho, mu)
    with pytest.warns(implicit.LinearSolveWarning, match="residual"):
        torch.autograd.grad(w.sum(), rho)
    assert not warn_solver.last_solve.converged

    @custom_root(F_huber, solve="cg", maxiter=1, nonconvergence="raise")
    def raise_solver(w0, rho, mu):
        return newton(huber_g, w0, rho, mu)

    w = raise_solver(torch.zeros(D, dtype=DT), rho, mu)
    with pytest.raises(implicit.LinearSolveError, match="did not converge") as ei:
        torch.autograd.grad(w.sum(), rho)
    assert ei.value.info.residual_norm > 0

    @custom_root(F_huber, solve="cg", maxiter=1, nonconvergence="ignore")
    def quiet_solver(w0, rho, mu):
        return newton(huber_g, w0, rho, mu)

    w = quiet_solver(torch.zeros(D, dtype=DT), rho, mu)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.autograd.grad(w.sum(), rho)


def test_non_square_system_and_bad_options() -> None:
    def fopt(y, a):
        return torch.cat([y - a, y.sum().reshape(1)])

    @custom_root(fopt)
    def solver(y0, a):
        return a.clone()

    with pytest.raises(ValueError, match="square"):
        solver(torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT, requires_grad=True))
    with pytest.raises(ValueError, match="unknown solve"):
        custom_root(fopt, solve="bicgstab")
    with pytest.raises(TypeError, match="tolerance|no option 'tolerance'"):
        custom_root(fopt, solve="cg", tolerance=1e-3)
    with pytest.raises(ValueError, match="nonconvergence"):
        custom_root(fopt, nonconvergence="panic")
    with pytest.raises(ValueError, match="alpha"):
        linalg.solve(torch.eye(2, dtype=DT), torch.ones(2, dtype=DT), "neumann", alpha=0.0)


def test_has_aux_passes_aux_through() -> None:
    @custom_root(F_huber, has_aux=True)
    def solver(w0, rho, mu):
        return newton(huber_g, w0, rho, mu), {"iters": 7, "gnorm": torch.tensor(0.0)}

    rho = RHO.clone().requires_grad_()
    w, aux = solver(torch.zeros(D, dtype=DT), rho, MU)
    assert aux["iters"] == 7 and not aux["gnorm"].requires_grad
    (g,) = torch.autograd.grad(w.sum(), rho)
    _, J_rho, _ = ref_jacobian(RHO, MU)
    torch.testing.assert_close(g, J_rho.sum(0), rtol=1e-8, atol=1e-10)


# --------------------------------------------------------------------------- #
# hypergradient with structured x and y
# --------------------------------------------------------------------------- #
def test_hypergradient_structured_x_y_against_torch_func() -> None:
    gen = torch.Generator().manual_seed(5)
    Xv = torch.randn(15, D, generator=gen, dtype=DT)
    tv = torch.randn(15, generator=gen, dtype=DT)

    def inner(x, y):  # x = {"rho": (d,), "s": ()}, y = (w, b)
        w, b = y
        r = X @ w + b - T
        return 0.5 * (r**2).sum() + 0.5 * (torch.exp(x["rho"]) * w**2).sum() + 0.5 * torch.exp(x["s"]) * b**2

    def outer(x, y):
        w, b = y
        return 0.5 * ((Xv @ w + b - tv) ** 2).sum() + 0.01 * (x["rho"] ** 2).sum()

    def y_star(x):
        Xa = torch.cat([X, torch.ones(X.shape[0], 1, dtype=DT)], 1)
        reg = torch.cat([torch.exp(x["rho"]), torch.exp(x["s"]).reshape(1)])
        s = torch.linalg.solve(Xa.T @ Xa + torch.diag(reg), Xa.T @ T)
        return (s[:D], s[D])

    x = {"rho": RHO.clone(), "s": torch.tensor(-0.2, dtype=DT)}
    exact = torch.func.grad(lambda xx: outer(xx, y_star(xx)))(x)
    ys = y_star(x)
    for solve, opts in (("cg", {}), ("dense", {}), ("minres", {})):
        hg = hypergradient(outer, inner, x, ys, solve=solve, **opts)
        assert set(hg) == {"rho", "s"} and hg["s"].shape == ()
        torch.testing.assert_close(hg["rho"], exact["rho"], rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(hg["s"], exact["s"], rtol=1e-8, atol=1e-10)
    hg, info = hypergradient(outer, inner, x, ys, full_output=True)
    assert info.converged and info.n_matvecs > 0
    with pytest.raises(ValueError, match="scalar"):
        hypergradient(lambda x, y: y[0], inner, x, ys)


def test_hypergradient_vmapped_over_tasks_equals_loop() -> None:
    """Per-task hypergradients (meta-learning): vmap over task data passed through args=."""
    gen = torch.Generator().manual_seed(9)
    Xs = torch.randn(3, 12, D, generator=gen, dtype=DT)
    ts = torch.randn(3, 12, generator=gen, dtype=DT)

    def inner(x, w, Xt, tt):
        return 0.5 * ((Xt @ w - tt) ** 2).sum() + 0.5 * (torch.exp(x) * w**2).sum()

    def outer(x, w, Xt, tt):
        return 0.5 * ((Xt @ w - 2 * tt) ** 2).sum()

    def y_star(x, Xt, tt):
        return torch.linalg.solve(Xt.T @ Xt + torch.diag(torch.exp(x)), Xt.T @ tt)

    def hg(x, Xt, tt):
        return hypergradient(outer, inner, x, y_star(x, Xt, tt), args=(Xt, tt))

    x = RHO.clone()
    batched = torch.func.vmap(hg, in_dims=(None, 0, 0))(x, Xs, ts)
    for k in range(3):
        exact = torch.func.grad(lambda xx, Xt=Xs[k], tt=ts[k]: outer(xx, y_star(xx, Xt, tt), Xt, tt))(x)
        torch.testing.assert_close(batched[k], exact, rtol=1e-8, atol=1e-10)


def test_float32_theta_keeps_dtype() -> None:
    A32 = torch.tensor([[3.0, 1.0], [1.0, 2.0]])

    @custom_root(lambda y, b: A32 @ y - b)
    def solver(y0, b):
        return torch.linalg.solve(A32, b)

    b = torch.tensor([1.0, -1.0], requires_grad=True)
    y = solver(torch.zeros(2), b)
    (g,) = torch.autograd.grad(y.sum(), b)
    assert y.dtype == torch.float32 and g.dtype == torch.float32
    torch.testing.assert_close(g, torch.linalg.solve(A32.T, torch.ones(2)), rtol=1e-5, atol=1e-6)
