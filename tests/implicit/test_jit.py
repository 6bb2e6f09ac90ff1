"""``custom_root(..., jit=True)``: the dense IFT pieces traced once per signature and replayed.

Every derivative is checked against an independent dense reference (``torch.func.jacrev`` and
``torch.linalg.solve``) and against the same decorated solver without ``jit``; the fallbacks (untraceable
``F``, modules, higher order, Krylov sizes) are checked to give the eager results, and the ``jax.jit``
semantics (captured values frozen, non-tensor arguments part of the signature) are pinned down.
"""

from __future__ import annotations

import pytest
import torch

import implicit
from implicit._jit import FAILED

DT = torch.float64


def _ridge_data(seed: int = 0, n: int = 40, d: int = 6):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    t = torch.randn(n, generator=g, dtype=DT)
    return X, t


def _g(w, lam, X, t):  # ridge with one penalty per feature
    return 0.5 * ((X @ w - t) ** 2).mean() + 0.5 * (lam.exp() * w**2).sum()


def _ridge_solver(jit: bool, **kw):
    @implicit.custom_root(torch.func.grad(_g), jit=jit, nonconvergence="raise", **kw)
    def solver(w0, lam, X, t):
        H = X.T @ X / X.shape[0] + torch.diag(lam.exp())
        return torch.linalg.solve(H, X.T @ t / X.shape[0])

    return solver


def _exact_ridge_grad(lam, X, t, v):
    n = X.shape[0]
    H = X.T @ X / n + torch.diag(lam.exp())
    w = torch.linalg.solve(H, X.T @ t / n)
    u = torch.linalg.solve(H, v)  # H symmetric
    return -(lam.exp() * w) * u  # ∂F/∂λ = diag(e^λ w)


def test_jit_matches_closed_form_and_eager_over_many_calls() -> None:
    X, t = _ridge_data()
    fast, slow = _ridge_solver(True), _ridge_solver(False)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):  # new values, same signature: one trace, replayed
        lam = torch.randn(6, generator=g, dtype=DT).requires_grad_()
        v = torch.randn(6, generator=g, dtype=DT)
        (h_fast,) = torch.autograd.grad(fast(torch.zeros(6, dtype=DT), lam, X, t) @ v, lam)
        (h_slow,) = torch.autograd.grad(slow(torch.zeros(6, dtype=DT), lam, X, t) @ v, lam)
        exact = _exact_ridge_grad(lam.detach(), X, t, v)
        torch.testing.assert_close(h_fast, exact, rtol=1e-11, atol=1e-14)
        torch.testing.assert_close(h_fast, h_slow, rtol=1e-12, atol=1e-15)
    assert len(fast.traces) == 1 and list(fast.traces._graphs.values())[0] is not FAILED
    assert fast.last_solve is not None and fast.last_solve.converged
    assert fast.last_residual is not None and fast.last_residual < 1e-12


def test_jit_new_data_values_are_used_not_frozen() -> None:
    # data passed as arguments is an input of the graph: new values, new results
    X, t = _ridge_data(0)
    X2, t2 = _ridge_data(5)
    fast = _ridge_solver(True)
    lam = torch.full((6,), -1.0, dtype=DT, requires_grad=True)
    v = torch.ones(6, dtype=DT)
    for XX, tt in ((X, t), (X2, t2)):
        (h,) = torch.autograd.grad(fast(torch.zeros(6, dtype=DT), lam, XX, tt) @ v, lam)
        torch.testing.assert_close(h, _exact_ridge_grad(lam.detach(), XX, tt, v), rtol=1e-11, atol=1e-14)
    assert len(fast.traces) == 1


def test_jit_new_shapes_and_constants_are_new_signatures() -> None:
    X, t = _ridge_data(0, n=40)
    Xs, ts = _ridge_data(0, n=25)
    calls = []

    def F(w, lam, X, t, scale):  # noqa: N802 - a Python float argument is part of the signature
        calls.append(scale)
        return torch.func.grad(_g)(w, lam, X, t) * scale

    @implicit.custom_root(F, jit=True)
    def solver(w0, lam, X, t, scale):
        H = X.T @ X / X.shape[0] + torch.diag(lam.exp())
        return torch.linalg.solve(H, X.T @ t / X.shape[0])

    lam = torch.zeros(6, dtype=DT, requires_grad=True)
    v = torch.linspace(-1, 1, 6, dtype=DT)
    for XX, tt, scale in ((X, t, 1.0), (Xs, ts, 1.0), (X, t, 3.0), (X, t, 1.0)):
        (h,) = torch.autograd.grad(solver(None, lam, XX, tt, scale) @ v, lam)
        # the solution does not depend on the scale of F, nor does its derivative
        torch.testing.assert_close(h, _exact_ridge_grad(lam.detach(), XX, tt, v), rtol=1e-11, atol=1e-14)
    assert len(solver.traces) == 3  # (40, 1.0), (25, 1.0), (40, 3.0); the last call replays the first
    n_traced = len(calls)
    torch.autograd.grad(solver(None, lam, X, t, 1.0) @ v, lam)
    assert len(calls) == n_traced  # replayed: F (Python) is not called again


def test_jit_freezes_captured_tensors_like_jax_jit() -> None:
    # documented semantics: a tensor read by closure is frozen at the first trace... by reference, so an
    # in-place update is seen, a rebinding is not (as jax.jit bakes globals as constants)
    X, t = _ridge_data()
    holder = {"X": X.clone()}

    def F(w, lam, t):  # noqa: N802
        return torch.func.grad(_g)(w, lam, holder["X"], t)

    @implicit.custom_root(F, jit=True)
    def solver(w0, lam, t):
        XX = holder["X"]
        return torch.linalg.solve(XX.T @ XX / XX.shape[0] + torch.diag(lam.exp()), XX.T @ t / XX.shape[0])

    lam = torch.zeros(6, dtype=DT, requires_grad=True)
    v = torch.ones(6, dtype=DT)
    (h,) = torch.autograd.grad(solver(None, lam, t) @ v, lam)
    torch.testing.assert_close(h, _exact_ridge_grad(lam.detach(), X, t, v), rtol=1e-11, atol=1e-14)
    holder["X"].mul_(2.0)  # in place: the graph reads the same storage
    (h2,) = torch.autograd.grad(solver(None, lam, t) @ v, lam)
    torch.testing.assert_close(h2, _exact_ridge_grad(lam.detach(), 2 * X, t, v), rtol=1e-11, atol=1e-14)


def test_jit_untraceable_f_runs_eagerly() -> None:
    X, t = _ridge_data()

    def F(w, lam, X, t):  # noqa: N802 - data-dependent Python control flow cannot be traced
        grad = torch.func.grad(_g)(w, lam, X, t)
        if float(lam.sum()) > 100:  # never true here, but the trace cannot know
            return grad * 2
        return grad

    @implicit.custom_root(F, jit=True, nonconvergence="raise")
    def solver(w0, lam, X, t):
        return torch.linalg.solve(X.T @ X / X.shape[0] + torch.diag(lam.exp()), X.T @ t / X.shape[0])

    lam = torch.full((6,), -0.5, dtype=DT, requires_grad=True)
    v = torch.ones(6, dtype=DT)
    for _ in range(2):
        (h,) = torch.autograd.grad(solver(None, lam, X, t) @ v, lam)
        torch.testing.assert_close(h, _exact_ridge_grad(lam.detach(), X, t, v), rtol=1e-11, atol=1e-14)
    assert list(solver.traces._graphs.values()) == [FAILED]


def test_jit_closure_over_tensor_requiring_grad_is_refused() -> None:
    X, t = _ridge_data()
    lam_captured = torch.zeros(6, dtype=DT, requires_grad=True)

    def F(w, X, t):  # noqa: N802
        return torch.func.grad(_g)(w, lam_captured, X, t)

    @implicit.custom_root(F, jit=True)
    def solver(w0, X, t):
        return torch.zeros(6, dtype=DT)

    with pytest.raises(ValueError, match="closes over"):
        solver(None, X.requires_grad_(), t)


def test_jit_falls_back_for_higher_order_and_krylov_sizes() -> None:
    X, t = _ridge_data()
    lam = torch.full((6,), -0.3, dtype=DT, requires_grad=True)
    v = torch.linspace(0.5, 1.5, 6, dtype=DT)
    fast, slow = _ridge_solver(True), _ridge_solver(False)
    # second derivatives (create_graph): the eager differentiable route
    hs = []
    for s in (fast, slow):
        (h,) = torch.autograd.grad(s(None, lam, X, t) @ v, lam, create_graph=True)
        (hh,) = torch.autograd.grad(h.sum(), lam)
        hs.append((h.detach(), hh))
    torch.testing.assert_close(hs[0][0], hs[1][0], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(hs[0][1], hs[1][1], rtol=1e-10, atol=1e-13)
    # torch.func.jacrev: eager route, same Jacobian as the dense reference
    J = torch.func.jacrev(lambda lam: fast(None, lam, X, t))(lam.detach())
    Jref = torch.stack([_exact_ridge_grad(lam.detach(), X, t, e) for e in torch.eye(6, dtype=DT)])
    torch.testing.assert_close(J, Jref, rtol=1e-10, atol=1e-13)
    # beyond dense_max: CG on products, nothing traced
    krylov = _ridge_solver(True, dense_max=3)
    (h,) = torch.autograd.grad(krylov(None, lam, X, t) @ v, lam)
    torch.testing.assert_close(h, _exact_ridge_grad(lam.detach(), X, t, v), rtol=1e-8, atol=1e-11)
    assert len(krylov.traces) == 0


def test_jit_module_argument_runs_eagerly() -> None:
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1).double()
    x = torch.randn(8, 3, dtype=DT)

    def F(y, net):  # noqa: N802 - y = net(x).mean() is the root
        return y - net(x).mean().reshape(1)

    @implicit.custom_root(F, jit=True)
    def solver(y0, net):
        return net(x).mean().detach().reshape(1)

    y = solver(torch.zeros(1, dtype=DT), net)
    y.sum().backward()
    torch.testing.assert_close(net.bias.grad, torch.ones(1, dtype=DT))
    torch.testing.assert_close(net.weight.grad, x.mean(0, keepdim=True))
    assert len(solver.traces) == 0


def test_jit_pytree_solution_and_several_theta() -> None:
    g = torch.Generator().manual_seed(3)
    M = torch.randn(5, 5, generator=g, dtype=DT) + 5 * torch.eye(5, dtype=DT)  # not symmetric

    def F(y, a, b, c):  # noqa: N802 - y = {"u": (2,), "w": (3,)}; theta: (5,), (2, 2), an int tensor
        flat = torch.cat([y["u"], y["w"]])
        r = M @ flat + 0.1 * torch.tanh(flat) - a - torch.cat([b.reshape(-1), b[0, :1]]) * c
        return {"u": r[:2], "w": r[2:]}

    def solve_flat(a, b, c):
        flat = torch.zeros(5, dtype=DT)
        for _ in range(50):
            y = {"u": flat[:2], "w": flat[2:]}
            r = torch.cat(list(F(y, a, b, c).values()))
            J = M + torch.diag(0.1 * (1 - torch.tanh(flat) ** 2))
            flat = flat - torch.linalg.solve(J, r)
        return flat

    for jit in (True, False):

        @implicit.custom_root(F, jit=jit, nonconvergence="raise")
        def solver(y0, a, b, c):
            flat = solve_flat(a, b, c)
            return {"u": flat[:2], "w": flat[2:]}

        a = torch.randn(5, generator=g, dtype=DT).requires_grad_()
        b = torch.randn(2, 2, generator=g, dtype=DT).requires_grad_()
        c = torch.tensor(2, dtype=torch.int64)
        out = solver(None, a, b, c)
        v = torch.randn(5, generator=g, dtype=DT)
        ga, gb = torch.autograd.grad(torch.cat([out["u"], out["w"]]) @ v, (a, b))
        ref_a, ref_b = torch.func.jacrev(solve_flat, argnums=(0, 1))(a.detach(), b.detach(), c)
        torch.testing.assert_close(ga, v @ ref_a, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gb, torch.einsum("i,ijk->jk", v, ref_b), rtol=1e-10, atol=1e-12)
        if jit:
            assert len(solver.traces) == 1 and list(solver.traces._graphs.values())[0] is not FAILED


def test_jit_float32_and_batched_cotangents() -> None:
    X, t = _ridge_data()
    X32, t32 = X.float(), t.float()
    fast = _ridge_solver(True)
    lam = torch.full((6,), -1.0, requires_grad=True)
    w = fast(None, lam, X32, t32)
    assert w.dtype == torch.float32
    (h,) = torch.autograd.grad(w.sum(), lam)
    exact = _exact_ridge_grad(lam.detach().double(), X, t, torch.ones(6, dtype=DT))
    torch.testing.assert_close(h.double(), exact, rtol=1e-4, atol=1e-6)
    # a block of cotangents (is_grads_batched) through the traced graph
    lam64 = torch.full((6,), -1.0, dtype=DT, requires_grad=True)
    w = fast(None, lam64, X, t)
    eye = torch.eye(6, dtype=DT)
    (J,) = torch.autograd.grad(w, lam64, eye, is_grads_batched=True)
    Jref = torch.stack([_exact_ridge_grad(lam64.detach(), X, t, e) for e in eye])
    torch.testing.assert_close(J, Jref, rtol=1e-10, atol=1e-13)


def test_jit_optimality_warning_and_lazy_residual() -> None:
    X, t = _ridge_data()
    fast = _ridge_solver(True)

    @implicit.custom_root(torch.func.grad(_g), jit=True)
    def sloppy(w0, lam, X, t):  # far from the root
        return torch.ones(6, dtype=DT)

    lam = torch.zeros(6, dtype=DT, requires_grad=True)
    w = sloppy(None, lam, X, t)
    assert sloppy.last_residual is not None and sloppy.last_residual > 0.1  # evaluated on demand
    with pytest.warns(implicit.OptimalityWarning):
        w.sum().backward()
    w = fast(None, lam, X, t)
    assert fast.last_residual < 1e-12


def test_jit_argument_checked() -> None:
    with pytest.raises(TypeError, match="jit"):
        implicit.custom_root(torch.func.grad(_g), jit="yes")(lambda w0, lam: w0)


def test_jit_reports_the_traced_solve_and_honours_damping() -> None:
    X, t = _ridge_data()
    lam = torch.full((6,), -0.7, dtype=DT, requires_grad=True)
    v = torch.linspace(-1, 2, 6, dtype=DT)
    out = []
    for jit in (True, False):
        s = _ridge_solver(jit, damping=0.25)
        (h,) = torch.autograd.grad(s(None, lam, X, t) @ v, lam)
        out.append((h, s.last_solve))
    (h_jit, res_jit), (h_eager, res_eager) = out
    # damping changes the system: (A + 0.25 I)ᵀ u = v
    n = X.shape[0]
    H = X.T @ X / n + torch.diag(lam.detach().exp())
    w = torch.linalg.solve(H, X.T @ t / n)
    u = torch.linalg.solve(H + 0.25 * torch.eye(6, dtype=DT), v)
    torch.testing.assert_close(h_jit, -(lam.detach().exp() * w) * u, rtol=1e-11, atol=1e-14)
    torch.testing.assert_close(h_jit, h_eager, rtol=1e-12, atol=1e-15)
    assert res_jit.info.get("traced") and res_jit.method == "dense" and res_jit.converged
    assert res_jit.n_matvecs == res_eager.n_matvecs == 6
    torch.testing.assert_close(torch.as_tensor(res_jit.info["anorm"]), torch.as_tensor(res_eager.info["anorm"]))
    assert float(res_jit.residual_norm) <= 1e-12 * float(res_jit.rhs_norm)


def test_jit_singular_system_falls_back_to_the_full_dense_solve() -> None:
    # A = ∂F/∂y is exactly singular: the traced LU reports failure, the eager dense solve takes the
    # least-squares solution and reports it, exactly as without jit
    P = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=DT)

    def F(y, a):  # noqa: N802
        return P @ y - P @ a

    results = []
    for jit in (True, False):

        @implicit.custom_root(F, jit=jit, nonconvergence="ignore")
        def solver(y0, a):
            return P @ a

        a = torch.tensor([1.0, 2.0, 3.0], dtype=DT, requires_grad=True)
        (g,) = torch.autograd.grad(solver(None, a) @ torch.tensor([1.0, 1.0, 1.0], dtype=DT), a)
        results.append((g, solver.last_solve))
    (g_jit, r_jit), (g_eager, r_eager) = results
    torch.testing.assert_close(g_jit, g_eager)
    assert r_jit.info["factorization"] == r_eager.info["factorization"] == "lstsq"
    assert not r_jit.info.get("traced")


def test_jit_tolerance_below_precision_runs_eagerly() -> None:
    from curvlab.linalg import ToleranceWarning

    X, t = _ridge_data()
    s = _ridge_solver(True, tol=1e-20)
    lam = torch.zeros(6, dtype=DT, requires_grad=True)
    with pytest.warns(ToleranceWarning):
        (h,) = torch.autograd.grad(s(None, lam, X, t).sum(), lam)
    torch.testing.assert_close(h, _exact_ridge_grad(lam.detach(), X, t, torch.ones(6, dtype=DT)))
    assert len(s.traces) == 0


def test_evaluation_without_grad_defers_f_to_last_residual() -> None:
    X, t = _ridge_data()
    calls = []

    def F(w, lam, X, t):  # noqa: N802
        calls.append(1)
        return torch.func.grad(_g)(w, lam, X, t)

    @implicit.custom_root(F)
    def solver(w0, lam, X, t):
        return torch.zeros(6, dtype=DT)  # not the root: ‖F‖ = ‖Xᵀt‖/n

    with torch.no_grad():
        solver(None, torch.zeros(6, dtype=DT), X, t)
    assert not calls
    torch.testing.assert_close(torch.tensor(solver.last_residual, dtype=DT), (X.T @ t / X.shape[0]).norm())
    assert len(calls) == 1


def test_hypergradient_jit_matches_eager_and_closed_form() -> None:
    X, t = _ridge_data(0)
    Xv, tv = _ridge_data(7)

    def inner(x, w, X, t):  # x = {"log_lam": (6,), "shift": ()}
        return _g(w, x["log_lam"], X, t) + x["shift"] * w.sum()

    def outer(x, w, X, t):
        return 0.5 * ((Xv @ w - tv) ** 2).mean() + 0.1 * (x["log_lam"] ** 2).sum()

    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        x = {"log_lam": torch.randn(6, generator=g, dtype=DT), "shift": torch.randn((), generator=g, dtype=DT)}
        n = X.shape[0]
        H = X.T @ X / n + torch.diag(x["log_lam"].exp())
        w = torch.linalg.solve(H, X.T @ t / n - x["shift"])
        h_jit, info = implicit.hypergradient(outer, inner, x, w, args=(X, t), jit=True, full_output=True)
        h_eager = implicit.hypergradient(outer, inner, x, w, args=(X, t))
        # closed form: dw/dlog_lam_j = -H^{-1} e_j e^{λ_j} w_j, dw/dshift = -H^{-1} 1
        gw = Xv.T @ (Xv @ w - tv) / Xv.shape[0]
        u = torch.linalg.solve(H, gw)
        ref_lam = -(x["log_lam"].exp() * w) * u + 0.2 * x["log_lam"]
        ref_shift = -u.sum()
        torch.testing.assert_close(h_jit["log_lam"], ref_lam, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(h_jit["shift"], ref_shift, rtol=1e-10, atol=1e-13)
        for k in h_jit:
            torch.testing.assert_close(h_jit[k], h_eager[k], rtol=1e-12, atol=1e-14)
        assert info.info.get("traced") and info.converged
    from implicit._hypergradient import _JIT_ROOTS

    (root, _) = next(v for k, v in _JIT_ROOTS.items() if k[0] is inner)
    assert len(root.traces) == 1 and list(root.traces._graphs.values())[0] is not FAILED


def test_hypergradient_jit_refuses_outer_closure_and_falls_back_under_transforms() -> None:
    X, t = _ridge_data()
    captured = torch.ones(6, dtype=DT, requires_grad=True)

    def inner(lam, w):
        return _g(w, lam, X, t)

    def outer_bad(lam, w):
        return (captured * w).sum()

    lam = torch.zeros(6, dtype=DT)
    n = X.shape[0]
    w = torch.linalg.solve(X.T @ X / n + torch.eye(6, dtype=DT), X.T @ t / n)
    with pytest.raises(ValueError, match="closes"):
        implicit.hypergradient(outer_bad, inner, lam, w, jit=True)

    def outer(lam, w):
        return (w**2).sum()

    # under torch.func.grad the transformed (differentiable) route runs; same value as the eager one
    def value(lam):
        return implicit.hypergradient(outer, inner, lam, w, jit=True).sum()

    ref = torch.func.grad(lambda lam: implicit.hypergradient(outer, inner, lam, w).sum())(lam)
    torch.testing.assert_close(torch.func.grad(value)(lam), ref)
    with pytest.raises(TypeError, match="jit"):
        implicit.hypergradient(outer, inner, lam, w, jit=1)


def test_simplify_removes_identities_and_keeps_values() -> None:
    from torch.fx.experimental.proxy_tensor import make_fx

    from implicit._jit import simplify

    def f(a, b):
        x = a * 1
        y = (b / 1.0) ** 1
        z = torch.mm(a, torch.eye(a.shape[1], dtype=a.dtype).T)
        w = torch.mm(torch.eye(a.shape[0], dtype=a.dtype), a)
        return x + z + w, y.t().t(), (a * 2.0) ** 2

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 3, generator=g, dtype=DT), torch.randn(3, 5, generator=g, dtype=DT)
    gm = make_fx(f)(a, b)
    ref = gm(a, b)
    n_before = len(gm.graph.nodes)
    removed = simplify(gm)
    assert removed >= 6 and len(gm.graph.nodes) < n_before
    for got, want in zip(gm(a, b), ref):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    a2 = torch.randn(4, 3, generator=g, dtype=DT)
    for got, want in zip(gm(a2, b), f(a2, b)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_jit_fixed_point_keywords_and_aux() -> None:
    # custom_fixed_point with theta by keyword and an aux output, against the eager route and the closed form
    g = torch.Generator().manual_seed(4)
    W = 0.3 * torch.randn(4, 4, generator=g, dtype=DT)

    def T(y, a, scale=None):  # noqa: N802 - a contraction: y = tanh(W y) * scale + a
        return torch.tanh(W @ y) * scale + a

    a0 = torch.randn(4, generator=g, dtype=DT)
    results = []
    for jit in (True, False):

        @implicit.custom_fixed_point(T, jit=jit, has_aux=True, nonconvergence="raise")
        def solver(y0, a, scale=None):
            y = y0
            for _ in range(200):
                y = T(y, a, scale=scale)
            return y, {"iters": 200, "last": y.clone()}

        a = a0.clone().requires_grad_()
        scale = torch.tensor(0.7, dtype=DT, requires_grad=True)
        y, aux = solver(torch.zeros(4, dtype=DT), a, scale=scale)
        assert aux["iters"] == 200
        v = torch.linspace(1, 2, 4, dtype=DT)
        ga, gs = torch.autograd.grad(y @ v, (a, scale))
        # closed form: (I - J)ᵀ u = v with J = ∂T/∂y; d/da = u, d/dscale = u · tanh(W y)
        yd = y.detach()
        J = (1 - torch.tanh(W @ yd) ** 2)[:, None] * W * 0.7
        u = torch.linalg.solve((torch.eye(4, dtype=DT) - J).T, v)
        torch.testing.assert_close(ga, u, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gs, u @ torch.tanh(W @ yd), rtol=1e-10, atol=1e-12)
        results.append((ga, gs))
        if jit:
            assert len(solver.traces) == 1 and list(solver.traces._graphs.values())[0] is not FAILED
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-14)


def test_jit_warns_once_when_signatures_keep_changing(monkeypatch: pytest.MonkeyPatch) -> None:
    import implicit._jit as jit_module

    monkeypatch.setattr(jit_module, "MAX_SIGNATURES", 2)
    X, t = _ridge_data()

    def F(w, lam, X, t, c):  # noqa: N802 - c: a Python float, part of the signature
        return torch.func.grad(_g)(w, lam, X, t) * c

    @implicit.custom_root(F, jit=True)
    def solver(w0, lam, X, t, c):
        return torch.linalg.solve(X.T @ X / X.shape[0] + torch.diag(lam.exp()), X.T @ t / X.shape[0])

    lam = torch.zeros(6, dtype=DT, requires_grad=True)
    v = torch.ones(6, dtype=DT)
    import warnings as _w

    with _w.catch_warnings(record=True) as caught:
        _w.simplefilter("always")
        for c in (1.0, 2.0, 3.0, 4.0):
            (h,) = torch.autograd.grad(solver(None, lam, X, t, c) @ v, lam)
            torch.testing.assert_close(h, _exact_ridge_grad(lam.detach(), X, t, v), rtol=1e-11, atol=1e-14)
    msgs = [str(w.message) for w in caught if "input signatures traced" in str(w.message)]
    assert len(msgs) == 1 and len(solver.traces) == 2


def test_fold_constants_precomputes_input_independent_chains_only() -> None:
    from torch.fx.experimental.proxy_tensor import make_fx

    from implicit._jit import fold_constants

    captured = torch.arange(3.0, dtype=DT)

    def f(x):
        ones = torch.ones_like(x) * 0.5  # constant chain
        eye = torch.eye(3, dtype=DT) * 2.0  # constant chain
        noise = torch.rand_like(x)  # random: never folded
        return x * ones + eye @ x + captured * x**0, noise * x

    x = torch.randn(3, dtype=DT)
    gm = make_fx(f)(x)
    n_before = len(gm.graph.nodes)
    assert fold_constants(gm) >= 2 and len(gm.graph.nodes) < n_before
    assert any(n.target is torch.ops.aten.rand_like.default for n in gm.graph.nodes if n.op == "call_function")
    x2 = torch.randn(3, dtype=DT)
    torch.testing.assert_close(gm(x2)[0], f(x2)[0], rtol=0, atol=1e-15)
    assert not torch.equal(gm(x2)[1], gm(x2)[1])  # still random on every call
    captured.mul_(3.0)  # a tensor read by closure stays live (not folded)
    torch.testing.assert_close(gm(x2)[0], f(x2)[0], rtol=0, atol=1e-15)

    def g(x):  # an in-place operation anywhere: nothing is folded
        y = torch.ones_like(x)
        y.add_(x)
        return y * 2

    gm = make_fx(g)(x)
    assert fold_constants(gm) == 0
    torch.testing.assert_close(gm(x2), g(x2))


def test_hypergradient_jit_cache_is_bounded() -> None:
    from implicit import _hypergradient as hg

    X, t = _ridge_data()
    lam = torch.zeros(6, dtype=DT)
    n = X.shape[0]
    w = torch.linalg.solve(X.T @ X / n + torch.eye(6, dtype=DT), X.T @ t / n)
    for k in range(hg._JIT_ROOTS_MAX + 4):  # a fresh inner each time: retraced, and old entries dropped

        def inner(lam, w, k=k):
            return _g(w, lam, X, t) + 0.0 * k

        h = implicit.hypergradient(lambda lam, w: (w**2).sum(), inner, lam, w, jit=True)
        torch.testing.assert_close(h, _exact_ridge_grad(lam, X, t, 2 * w))
    assert len(hg._JIT_ROOTS) <= hg._JIT_ROOTS_MAX
