# ruff: noqa: N802 - the papers' names T (fixed-point map) and F (optimality condition)
"""Cases ported from jaxopt's and torchopt's test suites and examples (issue 14).

ridge regression (jaxopt ``implicit_diff_test``), kernel ridge, lasso and elastic net by the proximal-gradient
fixed point, the multiclass SVM dual on the simplex, dataset distillation (jaxopt examples), iMAML with an
``nn.Module`` and with dict meta-parameters (torchopt examples), a DEQ solved by Anderson acceleration, third
derivatives, ``vmap`` of Hessians and jaxopt #141's bisection root. References: closed forms, dense IFT
formulas and float64 central finite differences; ``tests/implicit/test_jaxopt_crosscheck.py`` compares the same
problems with jaxopt itself.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from implicit import custom_fixed_point, custom_root, hypergradient, root_jvp, root_vjp

DT = torch.float64
SOLVES = [("auto", {}), ("cg", {"tol": 1e-12}), ("minres", {"tol": 1e-12}), ("gmres", {"tol": 1e-12}),
          ("normal_cg", {"tol": 1e-12}), ("dense", {}), ("neumann", {"K": 80})]  # fmt: skip
GENERAL = [s for s in SOLVES if s[0] in ("auto", "gmres", "normal_cg", "dense")]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def fd(f, x: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    """Central finite-difference Jacobian of ``f`` at ``x`` (columns: the entries of ``x``)."""
    cols = []
    for i in range(x.numel()):
        e = torch.zeros_like(x).reshape(-1)
        e[i] = h
        e = e.reshape(x.shape)
        cols.append((f(x + e) - f(x - e)).reshape(-1) / (2 * h))
    return torch.stack(cols, -1)


# --------------------------------------------------------------------------- #
# ridge regression (jaxopt implicit_diff_test: test_root_vjp, test_root_jvp, test_custom_root)
# --------------------------------------------------------------------------- #
X_R = torch.randn(30, 5, generator=gen(0), dtype=DT)
Y_R = torch.randn(30, generator=gen(1), dtype=DT)


def ridge_obj(w, lam):
    return 0.5 * ((X_R @ w - Y_R) ** 2).mean() + 0.5 * lam * (w**2).sum()


def ridge_closed(lam):
    n = X_R.shape[0]
    return torch.linalg.solve(X_R.T @ X_R / n + lam * torch.eye(5, dtype=DT), X_R.T @ Y_R / n)


LAM_R = torch.tensor(5.0, dtype=DT)
J_R = torch.func.jacrev(ridge_closed)(LAM_R)


@pytest.mark.parametrize("solve,opts", SOLVES)
@pytest.mark.parametrize("mode", ["jacrev", "jacfwd", "root_vjp", "root_jvp"])
def test_ridge(solve, opts, mode) -> None:
    F = torch.func.grad(ridge_obj)
    if mode in ("root_vjp", "root_jvp"):
        w = ridge_closed(LAM_R)
        if mode == "root_vjp":
            v = torch.ones(5, dtype=DT)
            (g,) = root_vjp(F, w, (LAM_R,), v, solve=solve, **opts)
            torch.testing.assert_close(g, J_R @ v, rtol=1e-8, atol=1e-12)
        else:
            dw = root_jvp(F, w, (LAM_R,), (torch.tensor(1.0, dtype=DT),), solve=solve, **opts)
            torch.testing.assert_close(dw, J_R, rtol=1e-8, atol=1e-12)
        return
    sol = custom_root(F, solve=solve, **opts)(lambda w0, lam: ridge_closed(lam))
    J = getattr(torch.func, mode)(lambda lam: sol(torch.zeros(5, dtype=DT), lam))(LAM_R)
    torch.testing.assert_close(J, J_R, rtol=1e-8, atol=1e-12)


def test_ridge_has_aux_and_gradcheck() -> None:
    sol = custom_root(torch.func.grad(ridge_obj), has_aux=True)(lambda w0, lam: (ridge_closed(lam), {"it": 3}))
    lam = LAM_R.clone().requires_grad_()
    w, aux = sol(torch.zeros(5, dtype=DT), lam)
    assert aux == {"it": 3}
    (g,) = torch.autograd.grad(w.sum(), lam)
    torch.testing.assert_close(g, J_R.sum(), rtol=1e-10, atol=1e-13)
    assert torch.autograd.gradcheck(lambda lam: sol(torch.zeros(5, dtype=DT), lam)[0], (lam,))


# --------------------------------------------------------------------------- #
# kernel ridge: α*(λ) = (K + λI)⁻¹ y, dα/dλ = −(K + λI)⁻¹ α
# --------------------------------------------------------------------------- #
Z_K = torch.randn(20, 3, generator=gen(2), dtype=DT)
K_K = torch.exp(-0.5 * torch.cdist(Z_K, Z_K) ** 2)
Y_K = torch.randn(20, generator=gen(3), dtype=DT)


@pytest.mark.parametrize("solve,opts", SOLVES[:-1])  # Neumann needs ~1e4 terms at this conditioning
def test_kernel_ridge(solve, opts) -> None:
    def F(alpha, lam):
        return K_K @ alpha + lam * alpha - Y_K  # gradient of ½αᵀ(K+λI)α − yᵀα

    sol = custom_root(F, solve=solve, **opts)(
        lambda a0, lam: torch.linalg.solve(K_K + lam * torch.eye(20, dtype=DT), Y_K)
    )
    lam = torch.tensor(0.3, dtype=DT, requires_grad=True)
    alpha = sol(torch.zeros(20, dtype=DT), lam)
    (g,) = torch.autograd.grad(alpha @ Y_K, lam)
    ref = -Y_K @ torch.linalg.solve(K_K + 0.3 * torch.eye(20, dtype=DT), alpha.detach())
    torch.testing.assert_close(g, ref, rtol=1e-8, atol=1e-12)


# --------------------------------------------------------------------------- #
# lasso and elastic net by the proximal-gradient fixed point (jaxopt test_custom_fixed_point / prox)
# --------------------------------------------------------------------------- #
X_L = torch.randn(40, 8, generator=gen(4), dtype=DT)
Y_L = X_L @ torch.tensor([2.0, -1.5, 0, 0, 1.0, 0, 0, 0], dtype=DT) + 0.1 * torch.randn(40, generator=gen(5), dtype=DT)
ETA = 1.0 / float(torch.linalg.eigvalsh(X_L.T @ X_L).max())


def soft(x, t):
    return torch.sign(x) * torch.relu(x.abs() - t)


def prox_step(w, lam1, lam2):
    """One proximal-gradient step of ½‖Xw − y‖² + λ₁‖w‖₁ + ½λ₂‖w‖²."""
    z = w - ETA * (X_L.T @ (X_L @ w - Y_L))
    return soft(z, ETA * lam1) / (1 + ETA * lam2)


def prox_solve(w0, lam1, lam2, iters: int = 20000):
    w = w0
    for _ in range(iters):
        w_new = prox_step(w, lam1, lam2)
        if torch.linalg.vector_norm(w_new - w) < 1e-15:
            return w_new
        w = w_new
    return w


def enet_closed_jacobian(w, lam2):
    """On the support S: (X_Sᵀ X_S + λ₂ I) w_S = X_Sᵀ y − λ₁ sign(w_S): dw_S/dλ₁ = −(…)⁻¹ sign(w_S)."""
    S = w.abs() > 1e-10
    XS = X_L[:, S]
    A = XS.T @ XS + lam2 * torch.eye(int(S.sum()), dtype=DT)
    d1 = torch.zeros(8, dtype=DT)
    d1[S] = -torch.linalg.solve(A, torch.sign(w[S]))
    d2 = torch.zeros(8, dtype=DT)
    d2[S] = -torch.linalg.solve(A, w[S])
    return d1, d2


W_LASSO = {lam2: prox_solve(torch.zeros(8, dtype=DT), torch.tensor(3.0, dtype=DT), lam2) for lam2 in (0.0, 0.5)}


@pytest.mark.parametrize("solve,opts", GENERAL)
@pytest.mark.parametrize("lam2", [0.0, 0.5])
def test_lasso_and_elastic_net_fixed_point(solve, opts, lam2) -> None:
    fp = custom_fixed_point(prox_step, solve=solve, **opts)(lambda w0, lam1, lam2: W_LASSO[float(lam2)])
    lam1, l2 = torch.tensor(3.0, dtype=DT), torch.tensor(lam2, dtype=DT)
    w = fp(torch.zeros(8, dtype=DT), lam1, l2)
    assert 0 < int((w.abs() > 1e-10).sum()) < 8  # a sparse solution
    g1, g2 = torch.func.jacrev(lambda a, b: fp(torch.zeros(8, dtype=DT), a, b), argnums=(0, 1))(lam1, l2)
    d1, d2 = enet_closed_jacobian(w.detach(), lam2)
    torch.testing.assert_close(g1, d1, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(g2, d2, rtol=1e-7, atol=1e-9)


# --------------------------------------------------------------------------- #
# multiclass SVM dual on the simplex (jaxopt example multiclass_svm)
# --------------------------------------------------------------------------- #
def proj_simplex(v):
    """Row-wise Euclidean projection onto the probability simplex (sort-based, Held et al.)."""
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = torch.cumsum(u, -1) - 1
    k = torch.arange(1, v.shape[-1] + 1, dtype=v.dtype)
    cond = (u - css / k) > 0
    rho = cond.sum(-1, keepdim=True)
    tau = torch.gather(css, -1, rho - 1) / rho
    return torch.relu(v - tau)


X_S = torch.randn(12, 4, generator=gen(6), dtype=DT)
Y_S = torch.nn.functional.one_hot(torch.tensor([0, 1, 2] * 4), 3).to(DT)


def svm_dual_grad(beta, lam):
    """∇ of ½/λ ‖Xᵀ(Y − β)‖² + ⟨β, Y⟩ (the multiclass SVM dual, per-sample simplex constraints)."""
    W = X_S.T @ (Y_S - beta) / lam
    return -(X_S @ W) + Y_S


L_S = float(torch.linalg.eigvalsh(X_S @ X_S.T).max())


def svm_T(beta, lam):
    return proj_simplex(beta - lam / L_S * svm_dual_grad(beta, lam))


def svm_solve(beta0, lam):
    beta = beta0
    for _ in range(20000):
        nb = svm_T(beta, lam)
        if torch.linalg.vector_norm(nb - beta) < 1e-15:
            return nb
        beta = nb
    return beta


@pytest.mark.parametrize("solve,opts", [s for s in GENERAL if s[0] != "normal_cg"])
def test_multiclass_svm_dual_on_the_simplex(solve, opts) -> None:
    fp = custom_fixed_point(svm_T, solve=solve, **opts)(svm_solve)
    lam = torch.tensor(2.0, dtype=DT)
    beta0 = torch.full((12, 3), 1 / 3, dtype=DT)
    J = torch.func.jacrev(lambda lam: fp(beta0, lam))(lam)
    ref = fd(lambda lam: svm_solve(beta0, lam), lam, h=1e-5).reshape(12, 3)
    torch.testing.assert_close(J, ref, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- #
# dataset distillation (jaxopt example): hypergradient w.r.t. the distilled inputs
# --------------------------------------------------------------------------- #
def test_dataset_distillation_hypergradient() -> None:
    g = gen(7)
    X_real = torch.randn(60, 3, generator=g, dtype=DT)
    y_real = (X_real @ torch.tensor([1.0, -2.0, 0.5], dtype=DT) > 0).to(DT)
    Xd0 = torch.randn(4, 3, generator=g, dtype=DT)
    yd = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=DT)

    def inner(Xd, w):  # logistic regression trained on the distilled set
        z = Xd @ w
        return torch.nn.functional.softplus(z).sum() - (yd * z).sum() + 0.5 * (w**2).sum()

    def outer(Xd, w):
        z = X_real @ w
        return (torch.nn.functional.softplus(z) - y_real * z).mean()

    def train(Xd):  # Newton's method with the closed-form logistic Hessian
        w = torch.zeros(3, dtype=DT)
        for _ in range(30):
            s = torch.sigmoid(Xd @ w)
            g = Xd.T @ (s - yd) + w
            if float(g.norm()) < 1e-15:
                break
            w = w - torch.linalg.solve((Xd.T * (s * (1 - s))) @ Xd + torch.eye(3, dtype=DT), g)
        return w

    hg = hypergradient(outer, inner, Xd0, train(Xd0))
    ref = fd(lambda Xd: outer(Xd, train(Xd)), Xd0).reshape(4, 3)
    torch.testing.assert_close(hg, ref, rtol=1e-6, atol=1e-9)
    sol = custom_root(lambda w, Xd: torch.func.grad(inner, 1)(Xd, w))(lambda w0, Xd: train(Xd))
    Xd = Xd0.clone().requires_grad_()
    (hg2,) = torch.autograd.grad(outer(Xd, sol(torch.zeros(3, dtype=DT), Xd)), Xd)
    torch.testing.assert_close(hg2, ref, rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------------- #
# iMAML (torchopt examples): φ*(θ) = argmin_φ L_task(φ) + ½λ‖φ − θ‖², meta-gradient through φ*
# --------------------------------------------------------------------------- #
X_M = torch.randn(15, 3, generator=gen(8), dtype=DT)
Y_M = torch.randn(15, generator=gen(9), dtype=DT)
X_MV = torch.randn(10, 3, generator=gen(10), dtype=DT)
Y_MV = torch.randn(10, generator=gen(11), dtype=DT)
LAM_M = 2.0


def imaml_closed(theta_w, theta_b):
    """Linear model y = Xw + b: φ* solves (AᵀA/n + λI) φ = Aᵀy/n + λθ with A = [X, 1]."""
    A = torch.cat([X_M, torch.ones(15, 1, dtype=DT)], 1)
    th = torch.cat([theta_w.reshape(-1), theta_b.reshape(-1)])
    phi = torch.linalg.solve(A.T @ A / 15 + LAM_M * torch.eye(4, dtype=DT), A.T @ Y_M / 15 + LAM_M * th)
    return phi[:3], phi[3:]


def meta_loss(w, b):
    return ((X_MV @ w.reshape(-1) + b - Y_MV) ** 2).mean()


@pytest.mark.parametrize("kind", ["module", "dict"])
@pytest.mark.parametrize("solve", ["auto", "cg"])
def test_imaml_meta_gradient(kind, solve) -> None:
    def task_loss(phi, meta):
        w, b = phi["w"], phi["b"]
        mw, mb = (meta.weight, meta.bias) if isinstance(meta, nn.Module) else (meta["w"], meta["b"])
        fit = ((X_M @ w.reshape(-1) + b - Y_M) ** 2).mean() / 2
        return fit + 0.5 * LAM_M * (((w - mw) ** 2).sum() + ((b - mb) ** 2).sum())

    def adapt(phi0, meta):  # inner SGD from θ, polished by one exact step (never differentiated)
        phi = {k: v.clone() for k, v in phi0.items()}
        for _ in range(20):
            g = torch.func.grad(task_loss)(phi, meta)
            phi = {k: phi[k] - 0.2 * g[k] for k in phi}
        mw, mb = (meta.weight, meta.bias) if isinstance(meta, nn.Module) else (meta["w"], meta["b"])
        w, b = imaml_closed(mw.detach(), mb.detach())
        return {"w": w.reshape(1, 3), "b": b}

    sol = custom_root(torch.func.grad(task_loss), solve=solve, **({"tol": 1e-12} if solve == "cg" else {}))(adapt)
    if kind == "module":
        meta = nn.Linear(3, 1, dtype=DT)
        with torch.no_grad():
            meta.weight.copy_(torch.tensor([[0.3, -0.2, 0.1]], dtype=DT))
            meta.bias.fill_(0.05)
        params = [meta.weight, meta.bias]
    else:
        meta = {
            "w": torch.tensor([[0.3, -0.2, 0.1]], dtype=DT, requires_grad=True),
            "b": torch.tensor([0.05], dtype=DT, requires_grad=True),
        }
        params = [meta["w"], meta["b"]]
    phi0 = {"w": torch.zeros(1, 3, dtype=DT), "b": torch.zeros(1, dtype=DT)}
    phi = sol(phi0, meta)
    gw, gb = torch.autograd.grad(meta_loss(phi["w"], phi["b"]), params)
    tw, tb = params[0].detach().clone().requires_grad_(), params[1].detach().clone().requires_grad_()
    rw, rb = torch.autograd.grad(meta_loss(*imaml_closed(tw, tb)), (tw, tb))
    torch.testing.assert_close(gw, rw, rtol=1e-8, atol=1e-11)
    torch.testing.assert_close(gb, rb, rtol=1e-8, atol=1e-11)


# --------------------------------------------------------------------------- #
# a DEQ layer z* = tanh(W z + U x + b), solved by Anderson acceleration
# --------------------------------------------------------------------------- #
def anderson(f, z0, m: int = 5, iters: int = 200, lam: float = 1e-10, tol: float = 1e-14):
    """Anderson acceleration (type II) for z = f(z) (Walker & Ni 2011)."""
    zs, fs = [z0], [f(z0)]
    z = fs[0]
    for _ in range(iters):
        zs.append(z)
        fs.append(f(z))
        G = torch.stack([fi - zi for fi, zi in zip(fs[-m:], zs[-m:])], 1)
        if torch.linalg.vector_norm(G[:, -1]) < tol:
            return fs[-1]
        H = G.T @ G + lam * torch.eye(G.shape[1], dtype=G.dtype)
        a = torch.linalg.solve(H, torch.ones(G.shape[1], dtype=G.dtype))
        a = a / a.sum()
        z = torch.stack(fs[-m:], 1) @ a
    return z


G_D = gen(12)
W_D = 0.5 * torch.randn(6, 6, generator=G_D, dtype=DT) / 6**0.5
U_D = torch.randn(6, 3, generator=G_D, dtype=DT)
B_D = torch.randn(6, generator=G_D, dtype=DT)
XIN = torch.randn(3, generator=G_D, dtype=DT)


def deq_T(z, W, U, b):
    return torch.tanh(W @ z + U @ XIN + b)


@pytest.mark.parametrize("solve,opts", GENERAL + [("neumann", {"alpha": -1.0, "K": 400})])
def test_deq_with_anderson(solve, opts) -> None:
    layer = custom_fixed_point(deq_T, solve=solve, **opts)(
        lambda z0, W, U, b: anderson(lambda z: deq_T(z, W, U, b), z0)
    )
    W, U, b = (t.clone().requires_grad_() for t in (W_D, U_D, B_D))
    z = layer(torch.zeros(6, dtype=DT), W, U, b)
    v = torch.linspace(-1, 1, 6, dtype=DT)
    gW, gU, gb = torch.autograd.grad(z @ v, (W, U, b))
    z_unrolled = torch.zeros(6, dtype=DT)
    W2, U2, b2 = (t.clone().requires_grad_() for t in (W_D, U_D, B_D))
    for _ in range(300):  # reference: differentiate straight through the plain iteration
        z_unrolled = deq_T(z_unrolled, W2, U2, b2)
    rW, rU, rb = torch.autograd.grad(z_unrolled @ v, (W2, U2, b2))
    for a, r in ((gW, rW), (gU, rU), (gb, rb)):
        torch.testing.assert_close(a, r, rtol=1e-8, atol=1e-11)


# --------------------------------------------------------------------------- #
# higher order: third derivatives, vmap of Hessians
# --------------------------------------------------------------------------- #
def cubic_solver():
    """y*(θ) solves y + y³ = θ: y' = 1/(1+3y²), y'' = −6y y'³, y''' = −6y'⁴ − 18 y y'² y''."""

    def newton(y0, th):
        y = y0.clone()
        for _ in range(60):
            y = y - (y + y**3 - th) / (1 + 3 * y**2)
        return y

    return custom_root(lambda y, th: y + y**3 - th)(newton)


def cubic_derivatives(th: float):
    y = torch.tensor(0.0, dtype=DT)
    for _ in range(60):
        y = y - (y + y**3 - th) / (1 + 3 * y**2)
    d1 = 1 / (1 + 3 * y**2)
    d2 = -6 * y * d1**3
    d3 = -6 * d1**4 - 18 * y * d1**2 * d2
    return d1, d2, d3


@pytest.mark.parametrize("route", ["jacrev3", "fwd_rev_rev", "rev_fwd_rev", "backward3"])
def test_third_derivative(route) -> None:
    sol = cubic_solver()
    f = lambda th: sol(torch.zeros((), dtype=DT), th)  # noqa: E731
    th = torch.tensor(1.3, dtype=DT)
    jr, jf = torch.func.jacrev, torch.func.jacfwd
    if route == "jacrev3":
        d3 = jr(jr(jr(f)))(th)
    elif route == "fwd_rev_rev":
        d3 = jf(jr(jr(f)))(th)
    elif route == "rev_fwd_rev":
        d3 = jr(jf(jr(f)))(th)
    else:
        t = th.clone().requires_grad_()
        (g1,) = torch.autograd.grad(f(t), t, create_graph=True)
        (g2,) = torch.autograd.grad(g1, t, create_graph=True)
        (d3,) = torch.autograd.grad(g2, t)
    torch.testing.assert_close(d3, cubic_derivatives(1.3)[2], rtol=1e-8, atol=1e-12)


def test_vmap_of_hessians_equals_loop_and_closed_form() -> None:
    def loss(lam):
        sol = custom_root(torch.func.grad(ridge_obj))(lambda w0, lam: ridge_closed(lam))
        return (sol(torch.zeros(5, dtype=DT), lam) ** 3).sum()

    lams = torch.tensor([0.5, 1.0, 2.0], dtype=DT)
    batched = torch.func.vmap(torch.func.hessian(loss))(lams)
    looped = torch.stack([torch.func.hessian(loss)(lam) for lam in lams])
    ref = torch.stack([torch.func.hessian(lambda lam: (ridge_closed(lam) ** 3).sum())(lam) for lam in lams])
    torch.testing.assert_close(batched, looped, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(batched, ref, rtol=1e-8, atol=1e-12)


# --------------------------------------------------------------------------- #
# jaxopt #141: a root found by bisection (no derivative of the solver at all), derivatives of every order
# --------------------------------------------------------------------------- #
def bisection(F, lo: float, hi: float, *theta, iters: int = 200):
    lo_t, hi_t = torch.tensor(lo, dtype=DT), torch.tensor(hi, dtype=DT)
    for _ in range(iters):
        mid = 0.5 * (lo_t + hi_t)
        if bool(F(mid, *theta) > 0):
            hi_t = mid
        else:
            lo_t = mid
    return 0.5 * (lo_t + hi_t)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_bisection_root_derivatives(order) -> None:
    def F(y, th):
        return y + y**3 - th

    sol = custom_root(F)(lambda y0, th: bisection(F, -10.0, 10.0, th))
    th = torch.tensor(1.3, dtype=DT)
    f = lambda th: sol(torch.zeros((), dtype=DT), th)  # noqa: E731
    for _ in range(order):
        f = torch.func.grad(f)
    torch.testing.assert_close(f(th), cubic_derivatives(1.3)[order - 1], rtol=1e-8, atol=1e-12)
