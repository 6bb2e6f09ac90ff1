"""``custom_root(torch.func.grad(g))`` knows that ``A = ∇²_yy g`` is symmetric: no symmetry probe.

Checked against dense references; an optimality function that is not literally ``torch.func.grad(g)``
in ``y`` keeps the probe, and an indefinite Hessian still gets the right answer (CG → MINRES).
"""

from __future__ import annotations

import torch

import implicit
from implicit._root import is_gradient_in_y

DT = torch.float64


def _g(y, M, b):
    return 0.5 * y @ (M @ y) - b @ y + 0.05 * torch.cos(y).sum()


def _system(n: int, definite: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    eig = torch.linspace(1.0, 10.0, n, dtype=DT)
    if not definite:
        eig[: n // 3] = -eig[: n // 3]
    M = (Q * eig) @ Q.T
    b = torch.randn(n, generator=g, dtype=DT)
    y = torch.zeros(n, dtype=DT)
    for _ in range(50):  # Newton on ∇g = 0
        H = torch.func.hessian(_g)(y, M, b)
        y = y - torch.linalg.solve(H, torch.func.grad(_g)(y, M, b))
    return M, b, y


def test_detection() -> None:
    def f(y, a):
        return (y * a).sum() ** 2

    assert is_gradient_in_y(torch.func.grad(f))
    assert not is_gradient_in_y(torch.func.grad(f, argnums=1))
    assert not is_gradient_in_y(torch.func.grad(f, has_aux=True))
    assert not is_gradient_in_y(lambda y, a: torch.func.grad(f)(y, a))
    assert not is_gradient_in_y(f)


def test_gradient_optimality_skips_the_probe_and_is_exact() -> None:
    for definite in (True, False):
        M, b, y_star = _system(300, definite)  # beyond dense_max: Krylov
        H = torch.func.hessian(_g)(y_star, M, b)
        v = torch.linspace(-1, 1, 300, dtype=DT)
        exact = torch.linalg.solve(H, v)  # ∂F/∂b = -I, so d(v·y*)/db = H⁻¹ v (H symmetric)
        for F, probed in ((torch.func.grad(_g), False), (lambda y, M, b: torch.func.grad(_g)(y, M, b), True)):

            @implicit.custom_root(F, nonconvergence="raise")
            def solver(y0, M, b, y_star=y_star):
                return y_star

            bb = b.clone().requires_grad_()
            (gb,) = torch.autograd.grad(solver(None, M, bb) @ v, bb)
            torch.testing.assert_close(gb, exact, rtol=1e-8, atol=1e-10)
            res = solver.last_solve
            assert (res.info.get("symmetry_probe_products", 0) > 0) == probed
            assert res.method in (("cg",) if definite else ("minres",)) or probed
