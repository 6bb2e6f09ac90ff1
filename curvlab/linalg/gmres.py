r"""Restarted GMRES for general (non-symmetric) square systems.

GMRES (Saad & Schultz, 1986, "GMRES: a generalized minimal residual algorithm
for solving nonsymmetric linear systems", SIAM J. Sci. Stat. Comput. 7(3))
builds an orthonormal basis :math:`V_{j+1}` of the Krylov space by the Arnoldi
process, :math:`A M V_j = V_{j+1} \bar H_j` (``H̄`` upper Hessenberg), and
picks :math:`x_j = x_0 + M V_j y_j` with

.. math::  y_j = \arg\min_y \|\beta e_1 - \bar H_j y\|, \qquad \beta = \|r_0\|,

which minimises the true residual :math:`\|b - A x_j\|` over the (right
preconditioned) Krylov space. The Hessenberg matrix is reduced to triangular
form by one Givens rotation per step, so :math:`|g_{j+1}|` (the last entry of
the rotated right-hand side) is the residual norm without forming ``x``.
After ``restart`` steps the basis is discarded and the method restarts from
the current iterate (GMRES(m)).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._result import KrylovResult, _apply, _check_positive_int, _colnorm, _Columns, _finish, _prepare_system

__all__ = ["gmres"]


def gmres(
    A: Any,
    b: Tensor,
    *,
    x0: Tensor | None = None,
    tol: float | None = None,
    atol: float = 0.0,
    restart: int = 30,
    maxiter: int | None = None,
    M: Any = None,
) -> KrylovResult:
    r"""Solve :math:`A x = b` for general square ``A`` by restarted GMRES (Saad & Schultz, 1986).

    Arnoldi with classical Gram–Schmidt applied twice, Givens rotations on the
    Hessenberg matrix, right preconditioning (:math:`A M u = b`, :math:`x = M
    u`, so the residual minimised and tested is the true one). The ``k``
    columns of a matrix ``b`` run together (one block product per Arnoldi
    step); a column whose residual estimate
    :math:`|g_{j+1}| \le \max(\mathrm{tol}\,\|b\|, \mathrm{atol})` is frozen
    for the rest of the cycle. At the end of each cycle the true residual
    :math:`b - A x` is formed (it seeds the restart) and decides convergence.

    Args:
        A: the ``(n, n)`` operator: a :class:`~curvlab.linops.LinearOperator`,
            a dense 2-D tensor, or a callable ``v -> A v`` (size, dtype and
            device from ``b``).
        b: right-hand side, ``(n,)`` or ``(n, k)``.
        x0: starting point shaped like ``b`` (default zeros).
        tol: relative tolerance on the residual norm (default
            :func:`~curvlab.linalg.default_tol` of ``b``'s dtype, ``ε^(2/3)``;
            values in ``(0, 10 ε)`` are raised to ``10 ε`` with a warning).
        atol: absolute tolerance on the residual norm.
        restart: Krylov dimension per cycle (capped at ``n``).
        maxiter: cap on the total number of Arnoldi steps over all cycles
            (default ``min(10 n, 10000)``). (SciPy counts cycles instead.)
        M: right preconditioner approximating :math:`A^{-1}`.

    Returns:
        A :class:`~curvlab.linalg.KrylovResult` whose ``residual_norm`` is the
        true residual :math:`\|b - A x\|` formed at the end of the last cycle,
        ``n_iter`` the total number of Arnoldi steps and ``n_matvecs`` includes
        the residual products at restarts. ``status`` is ``"converged"``,
        ``"breakdown"`` (the Krylov space became invariant without reaching
        the tolerance, e.g. for singular ``A``) or ``"max_iter"``.
        ``info["restarts"]`` counts the cycles run.

    Raises:
        ValueError: ``A`` not square, ``b`` / ``x0`` of the wrong shape, dtype or
            device, ``tol < 0``, ``atol < 0``, ``maxiter < 1`` or ``restart < 1``.
        TypeError: arguments of unsupported types.

    Example:
        >>> A = torch.tensor([[2.0, 1.0], [-1.0, 3.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 0.0], dtype=torch.float64)
        >>> res = gmres(A, b, tol=1e-12)
        >>> res.converged, torch.allclose(A @ res.x, b)
        (True, True)
    """
    sys = _prepare_system(A, b, x0=x0, tol=tol, atol=atol, maxiter=maxiter, M=M, symmetric=False, what="gmres")
    restart = min(_check_positive_int(restart, "restart"), sys.n)
    op, Mop, B = sys.op, sys.M, sys.B
    k = B.shape[1]
    start = op.n_matvecs
    eps = torch.finfo(B.dtype).eps

    if sys.X0 is None:
        X = torch.zeros_like(B)
        R = B.clone()
    else:
        X = sys.X0.clone()
        R = B - op.matmat(X)
    thresh = torch.clamp(sys.tol * _colnorm(B), min=sys.atol)
    rnorm = _colnorm(R)
    conv = rnorm <= thresh
    brk = ~conv & ~torch.isfinite(rnorm)
    cols = _Columns(k, B.device, X=X.clone(), rnorm=rnorm.clone(), conv=conv.clone(), brk=brk.clone())
    state = {"X": X, "R": R, "rnorm": rnorm, "thresh": thresh}
    live = (~conv & ~brk).tolist()
    if not all(live):
        state = cols.keep(live, state)

    total = 0
    cycles = 0
    anorm = 0.0  # the largest ‖A M v‖ over unit Arnoldi vectors v: a lower estimate of ‖A M‖₂
    while cols.n_active > 0 and total < sys.maxiter:
        cycles += 1
        m = min(restart, sys.maxiter - total)
        dX, cycle_brk, steps, wmax = _cycle(op, Mop, state["R"], state["rnorm"], state["thresh"], m, eps)
        anorm = max(anorm, wmax)
        total += steps
        X = state["X"] + _apply(Mop, dX)
        R = B[:, cols.idx] - op.matmat(X) if cols.n_active < k else B - op.matmat(X)
        rnorm = _colnorm(R)
        conv = rnorm <= state["thresh"]
        brk = ~conv & (cycle_brk | ~torch.isfinite(rnorm))
        state = {"X": X, "R": R, "rnorm": rnorm, "thresh": state["thresh"]}
        cols.write(X=X, rnorm=rnorm, conv=conv, brk=brk)
        state = cols.keep((~conv & ~brk).tolist(), state)

    out = cols.out
    return _finish(
        sys,
        out["X"],
        out["rnorm"],
        out["conv"],
        n_iter=total,
        n_matvecs=op.n_matvecs - start,
        status_flags={"breakdown": out["brk"]},
        info={"restarts": cycles, "anorm": anorm},
        method="gmres",
    )


def _cycle(
    op: Any, Mop: Any, R: Tensor, rnorm: Tensor, thresh: Tensor, m: int, eps: float
) -> tuple[Tensor, Tensor, int, float]:
    """One GMRES(m) cycle from residual ``R`` (``(n, k)``); returns ``V y`` (before ``M``), breakdown flags, steps,
    and the largest ``‖A M v_j‖`` seen."""
    n, k = R.shape
    dtype, device = R.dtype, R.device
    V = R.new_zeros(m + 1, n, k)
    V[0] = R / rnorm
    H = R.new_zeros(k, m + 1, m)  # rotated to upper triangular as we go
    cs = R.new_zeros(k, m)
    sn = R.new_zeros(k, m)
    g = R.new_zeros(k, m + 1)
    g[:, 0] = rnorm
    size = torch.full((k,), m, dtype=torch.long, device=device)  # least-squares size per column
    live = torch.ones(k, dtype=torch.bool, device=device)
    brk = torch.zeros(k, dtype=torch.bool, device=device)
    steps = 0
    wmax = torch.zeros((), dtype=dtype, device=device)
    for j in range(m):
        steps = j + 1
        W = op.matmat(_apply(Mop, V[j]))
        wnorm = _colnorm(W)
        wmax = torch.maximum(wmax, torch.nan_to_num(wnorm).max())
        Vj = V[: j + 1]
        h = torch.einsum("ink,nk->ik", Vj, W)
        W = W - torch.einsum("ink,ik->nk", Vj, h)
        h2 = torch.einsum("ink,nk->ik", Vj, W)  # second Gram-Schmidt pass
        W = W - torch.einsum("ink,ik->nk", Vj, h2)
        h = h + h2
        hnext = _colnorm(W)
        happy = hnext <= 10 * eps * wnorm  # invariant Krylov space
        V[j + 1] = torch.where(happy, torch.zeros_like(W), W / torch.where(happy, torch.ones_like(hnext), hnext))
        col = torch.cat([h, hnext[None]], 0).T.clone()  # (k, j + 2)
        for i in range(j):
            c, s = cs[:, i], sn[:, i]
            t = c * col[:, i] + s * col[:, i + 1]
            col[:, i + 1] = -s * col[:, i] + c * col[:, i + 1]
            col[:, i] = t
        denom = torch.hypot(col[:, j], col[:, j + 1])
        degenerate = denom <= 10 * eps * wnorm  # A M v_j adds nothing: the triangular factor is singular
        safe = torch.where(degenerate, torch.ones_like(denom), denom)
        c = torch.where(degenerate, torch.ones_like(denom), col[:, j] / safe)
        s = torch.where(degenerate, torch.zeros_like(denom), col[:, j + 1] / safe)
        cs[:, j], sn[:, j] = c, s
        col[:, j] = torch.where(degenerate, torch.ones_like(denom), denom)
        col[:, j + 1] = 0
        H[:, : j + 2, j] = col
        g[:, j + 1] = -s * g[:, j]
        g[:, j] = c * g[:, j]
        conv_now = live & ~degenerate & (g[:, j + 1].abs() <= thresh)
        brk_now = live & ~conv_now & (degenerate | happy)
        size = torch.where(conv_now | (brk_now & ~degenerate), j + 1, size)
        size = torch.where(brk_now & degenerate, j, size)
        brk = brk | brk_now
        live = live & ~conv_now & ~brk_now
        if not bool(live.any()):
            break
    size = torch.where(live, steps, size)
    # least squares per column: rows/cols beyond its size become identity, so y is zero there
    ar = torch.arange(steps, device=device)
    keep = ar[None, :] < size[:, None]  # (k, steps)
    Rm = H[:, :steps, :steps]
    Rm = torch.where(keep[:, :, None] & keep[:, None, :], Rm, torch.zeros_like(Rm))
    Rm = Rm + torch.diag_embed((~keep).to(dtype))
    rhs = torch.where(keep, g[:, :steps], torch.zeros_like(g[:, :steps]))
    y = torch.linalg.solve_triangular(Rm, rhs.unsqueeze(-1), upper=True).squeeze(-1)  # (k, steps)
    dX = torch.einsum("ink,ki->nk", V[:steps], y)
    return dX, brk, steps, float(wmax)
