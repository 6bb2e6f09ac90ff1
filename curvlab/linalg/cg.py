r"""Preconditioned conjugate gradients with negative-curvature detection.

CG (Hestenes & Stiefel, 1952) minimises the quadratic
:math:`q(x) = \tfrac12 x^\top A x - b^\top x` over growing Krylov spaces; for
symmetric positive definite ``A`` its minimiser is the solution of
:math:`A x = b`. With a symmetric positive definite preconditioner
:math:`M \approx A^{-1}` the recurrences are (Nocedal & Wright, *Numerical
Optimization*, 2nd ed., Algorithm 5.3)

.. math::

    r_0 = b - A x_0,\quad z_0 = M r_0,\quad p_0 = z_0, \\
    \alpha_i = \frac{r_i^\top z_i}{p_i^\top A p_i},\quad
    x_{i+1} = x_i + \alpha_i p_i,\quad r_{i+1} = r_i - \alpha_i A p_i, \\
    z_{i+1} = M r_{i+1},\quad \beta_i = \frac{r_{i+1}^\top z_{i+1}}{r_i^\top z_i},\quad
    p_{i+1} = z_{i+1} + \beta_i p_i .

When ``A`` is indefinite, some direction may have :math:`p_i^\top A p_i \le 0`.
As in the truncated Newton / Steihaug–Toint CG (Nocedal & Wright, Algorithms
7.1 and 7.2; Steihaug, 1983) the iteration then stops *before* taking that step
and reports :math:`p_i`, a direction of non-positive curvature a trust-region
or line-search Newton method can use.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._result import (
    KrylovResult,
    _apply,
    _check_positive_int,
    _colnorm,
    _Columns,
    _prepare_system,
    _Raw,
    _System,
    _verified,
)

__all__ = ["cg"]

#: Curvature test: ``pᵀAp <= _CURV_EPS_FACTOR · eps · ‖p‖ ‖Ap‖`` counts as non-positive.
_CURV_EPS_FACTOR = 10.0


def cg(
    A: Any,
    b: Tensor,
    *,
    x0: Tensor | None = None,
    tol: float | None = None,
    atol: float = 0.0,
    maxiter: int | None = None,
    M: Any = None,
    check_every: int = 1,
    callback: Callable[[Tensor], None] | None = None,
) -> KrylovResult:
    r"""Solve :math:`A x = b` for symmetric positive definite ``A`` by (preconditioned) CG.

    Hestenes–Stiefel CG, preconditioned as in Nocedal & Wright, Algorithm 5.3,
    with the negative-curvature exit of Steihaug's CG (Nocedal & Wright,
    Algorithm 7.2). ``b`` may hold ``k`` right-hand sides as columns; they are
    solved together with per-column :math:`\alpha, \beta`, one block product
    ``A.matmat(P)`` per iteration. A column stops when

    * it converged: :math:`\|r_j\| \le \max(\mathrm{tol}\,\|b_j\|, \mathrm{atol})`;
    * its direction has non-positive curvature,
      :math:`p^\top A p \le 10\,\varepsilon\,\|p\|\,\|A p\|` (``ε`` the dtype's
      machine epsilon; the scale-free form of :math:`p^\top A p \le 0`). The
      iterate *before* that step is kept and ``p`` is reported in
      ``direction``;
    * it broke down: a non-finite curvature or residual, or
      :math:`r^\top M r \le 0` for a nonzero residual (``M`` is not positive
      definite).

    Finished columns are frozen (masked updates) and, at the next stopping
    test, dropped from the block, so later products only involve the columns
    still running.

    Args:
        A: the ``(n, n)`` operator: a :class:`~curvlab.linops.LinearOperator`, a
            dense 2-D tensor, or a callable ``v -> A v`` (its size, dtype and
            device are taken from ``b``).
        b: right-hand side, ``(n,)`` or ``(n, k)``.
        x0: starting point shaped like ``b`` (default zeros).
        tol: relative tolerance on the residual norm (default
            :func:`~curvlab.linalg.default_tol` of ``b``'s dtype, ``ε^(2/3)``;
            values in ``(0, 10 ε)`` are raised to ``10 ε`` with a warning).
        atol: absolute tolerance on the residual norm.
        maxiter: iteration cap (default ``min(10 n, 10000)``).
        M: preconditioner approximating :math:`A^{-1}`, symmetric positive
            definite (operator, tensor or callable).
        check_every: evaluate the stopping test on the host (one device
            synchronisation) only every ``check_every`` iterations; in between,
            finished columns are frozen on the device. Larger values suit GPUs.
        callback: called as ``callback(x)`` after every iteration with the
            current iterate (shaped like ``b``; during a residual-replacement
            restart, with the restarted columns only).

    Returns:
        A :class:`~curvlab.linalg.KrylovResult`. ``residual_norm`` is the
        recurrence residual :math:`\|r_i\|`, replaced by the true residual
        :math:`\|b - A x\|` wherever rounding could have made them differ by a
        tenth of the tolerance (one extra product; see
        :func:`~curvlab.linalg._result._verified`: a column whose true residual
        misses the tolerance is restarted from its iterate, and reported
        ``"stalled"`` if that stops helping), so ``converged`` is true of the true
        residual. ``status`` is ``"converged"`` when every column converged,
        else ``"nan"``, ``"negative_curvature"`` if some column met non-positive
        curvature, else ``"breakdown"``, ``"stalled"`` or ``"max_iter"``. ``info``
        holds per-column flags ``converged_columns``,
        ``negative_curvature_columns``, ``breakdown_columns`` and
        ``stalled_columns``, and ``residual_checks`` (true-residual products).

    Raises:
        ValueError: ``A`` not square, ``b`` or ``x0`` of the wrong shape, dtype or
            device, ``tol < 0``, ``atol < 0``, ``maxiter < 1`` or
            ``check_every < 1``.
        TypeError: arguments of unsupported types.

    Example:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> res = cg(A, torch.tensor([1.0, 2.0], dtype=torch.float64), tol=1e-12)
        >>> res.converged, torch.allclose(A @ res.x, torch.tensor([1.0, 2.0], dtype=torch.float64))
        (True, True)
    """
    sys = _prepare_system(A, b, x0=x0, tol=tol, atol=atol, maxiter=maxiter, M=M, symmetric=True, what="cg")
    check_every = _check_positive_int(check_every, "check_every")
    curv_eps = _CURV_EPS_FACTOR * torch.finfo(sys.B.dtype).eps

    def core(s: _System) -> _Raw:
        if s.B.shape[1] == 1 and check_every == 1:
            return _cg_single(s, curv_eps, callback)
        return _cg_block(s, curv_eps, check_every, callback)

    return _verified(sys, core, "cg")


def _cg_block(sys: _System, curv_eps: float, check_every: int, callback: Callable[[Tensor], None] | None) -> _Raw:
    """Block CG over the ``k`` columns of ``sys.B`` (finished columns frozen, then dropped)."""
    op, Mop, B = sys.op, sys.M, sys.B
    k = B.shape[1]
    start = op.n_matvecs
    if sys.X0 is None:
        X = torch.zeros_like(B)
        R = B.clone()
    else:
        X = sys.X0.clone()
        R = B - op.matmat(X)
    thresh = torch.clamp(sys.tol * _colnorm(B), min=sys.atol)
    Z = _apply(Mop, R)
    rz = (R * Z).sum(0)
    rnorm = _colnorm(R)
    conv = rnorm <= thresh
    brk = ~conv & ~(torch.isfinite(rnorm) & (rz > 0))
    negc = torch.zeros_like(conv)
    cols = _Columns(
        k,
        B.device,
        X=X.clone(),
        rnorm=rnorm.clone(),
        conv=conv.clone(),
        negc=negc.clone(),
        brk=brk.clone(),
        D=torch.zeros_like(B),
    )
    state = {"X": X, "R": R, "P": Z.clone(), "rz": rz, "rnorm": rnorm, "thresh": thresh}
    flags = {"conv": conv, "negc": negc, "brk": brk}
    live = ~conv & ~brk
    state, flags, live = _compact(cols, live, state, flags)
    anorm = torch.zeros((), dtype=B.dtype, device=B.device)

    it = 0
    while cols.n_active > 0 and it < sys.maxiter:
        it += 1
        X, R, P, rz = state["X"], state["R"], state["P"], state["rz"]
        AP = op.matmat(P)
        pAp = (P * AP).sum(0)
        pnorm, apnorm = _colnorm(P), _colnorm(AP)
        anorm = torch.maximum(anorm, torch.nan_to_num(apnorm / torch.where(pnorm > 0, pnorm, 1.0)).max())
        neg = live & (pAp <= curv_eps * pnorm * apnorm)
        bad = live & ~torch.isfinite(pAp)
        step = live & ~neg & ~bad
        alpha = rz / torch.where(step, pAp, torch.ones_like(pAp))
        X = torch.where(step, X + alpha * P, X)
        R = torch.where(step, R - alpha * AP, R)
        rnorm = torch.where(step, _colnorm(R), state["rnorm"])
        Z = _apply(Mop, R)
        rz_new = (R * Z).sum(0)
        conv_now = step & (rnorm <= state["thresh"])
        brk_now = bad | (step & ~conv_now & ~(torch.isfinite(rnorm) & (rz_new > 0)))
        cont = step & ~conv_now & ~brk_now
        beta = rz_new / torch.where(cont, rz, torch.ones_like(rz))
        P = torch.where(cont, Z + beta * P, P)  # frozen columns keep their last p (the direction reported)
        rz = torch.where(cont, rz_new, rz)
        state = {"X": X, "R": R, "P": P, "rz": rz, "rnorm": rnorm, "thresh": state["thresh"]}
        flags = {"conv": flags["conv"] | conv_now, "negc": flags["negc"] | neg, "brk": flags["brk"] | brk_now}
        live = cont
        if callback is not None:
            callback(_shape_like_b(sys.vector, cols.full("X", X)))
        if it % check_every == 0 or it == sys.maxiter:
            state, flags, live = _compact(cols, live, state, flags)

    if cols.n_active > 0:
        _write(cols, state, flags)
    out = cols.out
    return _Raw(
        X=out["X"],
        rnorm=out["rnorm"],
        conv=out["conv"],
        flags={"negative_curvature": out["negc"], "breakdown": out["brk"]},
        direction=out["D"],
        n_iter=it,
        n_matvecs=op.n_matvecs - start,
        anorm=anorm,
    )


def _cg_single(sys: _System, curv_eps: float, callback: Callable[[Tensor], None] | None) -> _Raw:
    """The same iteration for one right-hand side, with host-side scalars.

    A single column needs none of the block path's masking and compaction; its
    per-iteration overhead is a handful of vector operations (one host sync per
    iteration, as the block path with ``check_every=1``).
    """
    op, Mop = sys.op, sys.M
    b = sys.B[:, 0]
    start = op.n_matvecs
    if sys.X0 is None:
        x = torch.zeros_like(b)
        r = b.clone()
    else:
        x = sys.X0[:, 0].clone()
        r = b - op.matvec(x)
    thresh = max(sys.tol * float(torch.linalg.vector_norm(b)), sys.atol)
    z = r if Mop is None else Mop.matvec(r)
    rz = float(torch.dot(r, z))
    rnorm = float(torch.linalg.vector_norm(r))
    conv = rnorm <= thresh
    brk = not conv and not (math.isfinite(rnorm) and rz > 0)
    negc = False
    p = z.clone()
    anorm = 0.0
    it = 0
    while not (conv or brk or negc) and it < sys.maxiter:
        it += 1
        Ap = op.matvec(p)
        pAp = float(torch.dot(p, Ap))
        pnorm, apnorm = float(torch.linalg.vector_norm(p)), float(torch.linalg.vector_norm(Ap))
        if pnorm > 0 and math.isfinite(apnorm):
            anorm = max(anorm, apnorm / pnorm)
        if not math.isfinite(pAp):
            brk = True
        elif pAp <= curv_eps * pnorm * apnorm:
            negc = True
        else:
            alpha = rz / pAp
            x = x + alpha * p
            r = r - alpha * Ap
            rnorm = float(torch.linalg.vector_norm(r))
            z = r if Mop is None else Mop.matvec(r)
            rz_new = float(torch.dot(r, z))
            if rnorm <= thresh:
                conv = True
            elif not (math.isfinite(rnorm) and rz_new > 0):
                brk = True
            else:
                p = z + (rz_new / rz) * p
                rz = rz_new
        if callback is not None:
            callback(x if sys.vector else x[:, None])

    def flag(v: bool) -> Tensor:
        return torch.tensor([v], device=b.device)

    return _Raw(
        X=x[:, None],
        rnorm=torch.tensor([rnorm], dtype=b.dtype, device=b.device),
        conv=flag(conv),
        flags={"negative_curvature": flag(negc), "breakdown": flag(brk)},
        direction=p[:, None] if negc else torch.zeros_like(x)[:, None],
        n_iter=it,
        n_matvecs=op.n_matvecs - start,
        anorm=torch.tensor(anorm, dtype=b.dtype, device=b.device),
    )


def _write(cols: _Columns, state: dict[str, Tensor], flags: dict[str, Tensor]) -> None:
    cols.write(
        X=state["X"],
        rnorm=state["rnorm"],
        conv=flags["conv"],
        negc=flags["negc"],
        brk=flags["brk"],
        D=torch.where(flags["negc"], state["P"], torch.zeros_like(state["P"])),
    )


def _compact(
    cols: _Columns, live: Tensor, state: dict[str, Tensor], flags: dict[str, Tensor]
) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
    """Host-side stopping test: write finished columns out and drop them (one sync)."""
    mask = live.tolist()
    if all(mask):
        return state, flags, live
    _write(cols, state, flags)
    merged = cols.keep(mask, {**state, **{"f_" + name: f for name, f in flags.items()}, "live": live})
    state = {name: merged[name] for name in state}
    flags = {name: merged["f_" + name] for name in flags}
    return state, flags, merged["live"]


def _shape_like_b(vector: bool, X: Tensor) -> Tensor:
    return X[:, 0] if vector else X
