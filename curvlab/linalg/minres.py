r"""MINRES for symmetric, possibly indefinite or singular, systems.

MINRES (Paige & Saunders, 1975, "Solution of sparse indefinite systems of
linear equations", SIAM J. Numer. Anal. 12(4)) runs the Lanczos process on
:math:`\bar A = A - \sigma I` and, at step :math:`k`, picks
:math:`x_k \in x_0 + \mathcal K_k(\bar A, r_0)` minimising
:math:`\|b - \bar A x_k\|`. With :math:`V_k` the Lanczos basis and
:math:`\bar A V_k = V_{k+1} \underline{T}_k` (``T`` tridiagonal plus one row)
this is the small least-squares problem
:math:`\min_y \|\beta_1 e_1 - \underline{T}_k y\|`, solved by a QR
factorisation of :math:`\underline{T}_k` updated with one Givens rotation per
step, so that :math:`x_k` is updated by short recurrences and
:math:`\|r_k\| = \bar\phi_k` comes for free. A symmetric positive definite
preconditioner ``M`` turns the Lanczos process into one in the ``M⁻¹`` inner
product; the residual is then minimised in the ``M``-norm. This follows the
reference implementation of Paige & Saunders (as in SciPy's ``minres``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from curvlab.linops._base import IdentityOperator

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

__all__ = ["minres"]


def minres(
    A: Any,
    b: Tensor,
    *,
    x0: Tensor | None = None,
    shift: float = 0.0,
    tol: float | None = None,
    atol: float = 0.0,
    maxiter: int | None = None,
    M: Any = None,
    check_every: int = 1,
) -> KrylovResult:
    r"""Solve :math:`(A - \sigma I) x = b` for symmetric ``A`` by MINRES (Paige & Saunders, 1975).

    The iterate minimises :math:`\|b - (A - \sigma I) x\|_{M}` over the Krylov
    space (the 2-norm without preconditioner). ``A - σI`` may be indefinite or
    singular; for an incompatible singular system the iteration converges to
    a least-squares solution. The ``k`` columns of a matrix ``b`` are
    iterated together (one block product per iteration, per-column scalars).
    A column stops when

    * its residual is small: :math:`\bar\phi \le \max(\mathrm{tol}\,\|b\|_M,
      \mathrm{atol})` (``converged``);
    * it is a least-squares solution: :math:`\|\bar A r\| \le \mathrm{tol}\,
      \|\bar A\|\,\|r\|` with Paige–Saunders' estimates (also counted as
      ``converged``, flagged in ``info["least_squares_columns"]``);
    * the estimated condition of :math:`\bar A` exceeds :math:`0.1/\varepsilon`,
      or the preconditioner is not positive definite (``breakdown``).

    Args:
        A: symmetric ``(n, n)`` operator: a
            :class:`~curvlab.linops.LinearOperator`, a dense 2-D tensor, or a
            callable ``v -> A v`` (size, dtype and device from ``b``).
        b: right-hand side, ``(n,)`` or ``(n, k)``.
        x0: starting point shaped like ``b`` (default zeros).
        shift: :math:`\sigma`; the system solved is :math:`(A - \sigma I) x = b`.
        tol: relative tolerance on the residual norm (default
            :func:`~curvlab.linalg.default_tol` of ``b``'s dtype, ``ε^(2/3)``;
            values in ``(0, 10 ε)`` are raised to ``10 ε`` with a warning).
        atol: absolute tolerance on the residual norm.
        maxiter: iteration cap (default ``min(10 n, 10000)``).
        M: symmetric positive definite preconditioner approximating
            :math:`(A - \sigma I)^{-1}` in magnitude (operator, tensor or callable).
        check_every: evaluate the stopping test on the host (one device
            synchronisation) only every ``check_every`` iterations; in between,
            finished columns are frozen on the device (masked updates), so the
            result is the same as with ``check_every=1``. Larger values suit GPUs.

    Returns:
        A :class:`~curvlab.linalg.KrylovResult`. Without ``M``,
        ``residual_norm`` is the recurrence estimate :math:`\bar\phi` of
        :math:`\|b - \bar A x\|_2`; with ``M`` it is the true 2-norm residual,
        computed at exit with one extra block product (counted in
        ``n_matvecs``). ``status`` is ``"converged"``, ``"breakdown"`` or
        ``"max_iter"``.

    Raises:
        ValueError: ``A`` not square, ``b`` / ``x0`` of the wrong shape, dtype or
            device, ``tol < 0``, ``atol < 0``, ``maxiter < 1``, ``check_every < 1``.
        TypeError: arguments of unsupported types.

    Example:
        >>> A = torch.tensor([[2.0, 1.0], [1.0, -3.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 1.0], dtype=torch.float64)
        >>> res = minres(A, b, tol=1e-12)
        >>> res.converged, torch.allclose(A @ res.x, b)
        (True, True)
    """
    sys = _prepare_system(A, b, x0=x0, tol=tol, atol=atol, maxiter=maxiter, M=M, symmetric=True, what="minres")
    check_every = _check_positive_int(check_every, "check_every")
    shift_f = float(shift)
    if not math.isfinite(shift_f):
        raise ValueError(f"shift must be a finite number, got {shift!r}")
    if shift_f != 0.0:  # the verified residual is that of (A - σI) x = b
        sys.op = sys.op - IdentityOperator(sys.n, sys.B.dtype, sys.B.device, scale=shift_f)
    return _verified(sys, lambda s: _minres_core(s, check_every), "minres")


def _minres_core(sys: _System, check_every: int) -> _Raw:
    """MINRES on the ``k`` columns of ``sys.B`` (shift already folded into ``sys.op``)."""
    op, Mop, B = sys.op, sys.M, sys.B
    shift_f = 0.0
    k = B.shape[1]
    start = op.n_matvecs
    dtype = B.dtype
    eps = torch.finfo(dtype).eps

    def apply_abar(V: Tensor) -> Tensor:
        AV = op.matmat(V)
        return AV - shift_f * V if shift_f != 0.0 else AV

    if sys.X0 is None:
        X = torch.zeros_like(B)
        R1 = B.clone()
    else:
        X = sys.X0.clone()
        R1 = B - apply_abar(X)
    Y = _apply(Mop, R1)
    beta1_sq = (R1 * Y).sum(0)
    beta1 = torch.sqrt(torch.clamp(beta1_sq, min=0))
    if Mop is None:
        bnorm = _colnorm(B)
    else:
        bnorm = torch.sqrt(torch.clamp((B * Mop.matmat(B)).sum(0), min=0))
    thresh = torch.clamp(sys.tol * bnorm, min=sys.atol)
    zeros = torch.zeros_like(beta1)
    conv = beta1 <= thresh
    brk = ~conv & ~(torch.isfinite(beta1) & (beta1_sq > 0))
    lsq = torch.zeros_like(conv)
    cols = _Columns(k, B.device, X=X.clone(), rnorm=beta1.clone(), conv=conv.clone(), brk=brk.clone(), lsq=lsq.clone())
    state = {
        "X": X,
        "R1": R1,
        "R2": R1,
        "Y": Y,
        "W": torch.zeros_like(B),
        "W2": torch.zeros_like(B),
        "beta": beta1,
        "oldb": zeros,
        "dbar": zeros,
        "epsln": zeros,
        "phibar": beta1,
        "cs": -torch.ones_like(beta1),
        "sn": zeros,
        "tnorm2": zeros,
        "gmax": zeros,
        "gmin": torch.full_like(beta1, torch.finfo(dtype).max),
        "thresh": thresh,
        "conv": conv,
        "brk": brk,
        "lsq": lsq,
        "done": torch.zeros_like(conv),  # finished since the last host check (frozen)
    }
    live = (~conv & ~brk).tolist()
    if not all(live):
        cols.write(X=X, rnorm=beta1, conv=conv, brk=brk, lsq=lsq)
        state = cols.keep(live, state)

    anorm_est = torch.zeros((), dtype=dtype, device=B.device)  # max |gamma| <= ‖A‖: a lower estimate
    it = 0
    while cols.n_active > 0 and it < sys.maxiter:
        it += 1
        s = state
        beta, oldb = s["beta"], s["oldb"]
        V = s["Y"] / beta
        Yn = apply_abar(V)
        if it >= 2:
            Yn = Yn - (beta / oldb) * s["R1"]
        alfa = (V * Yn).sum(0)
        Yn = Yn - (alfa / beta) * s["R2"]
        R1, R2 = s["R2"], Yn
        Yn = _apply(Mop, R2)
        oldb = beta
        beta_sq = (R2 * Yn).sum(0)
        bad_m = beta_sq < 0  # M (or A) not symmetric / definite as assumed
        beta = torch.sqrt(torch.clamp(beta_sq, min=0))
        tnorm2 = s["tnorm2"] + alfa**2 + oldb**2 + beta**2

        # previous rotation Q_{k-1}, then the new one Q_k
        cs, sn, dbar = s["cs"], s["sn"], s["dbar"]
        oldeps = s["epsln"]
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        root = torch.hypot(gbar, dbar)
        gamma = torch.clamp(torch.hypot(gbar, beta), min=eps)
        cs = gbar / gamma
        sn = beta / gamma
        phi = cs * s["phibar"]
        phibar = sn * s["phibar"]

        W1, W2 = s["W2"], s["W"]
        W = (V - oldeps * W1 - delta * W2) / gamma
        X = s["X"] + phi * W

        gmax = torch.maximum(s["gmax"], gamma)
        gmin = torch.minimum(s["gmin"], gamma)
        anorm = torch.sqrt(tnorm2)
        conv_now = phibar <= s["thresh"]
        lsq_now = ~conv_now & (anorm > 0) & (root <= sys.tol * anorm)
        brk_now = ~conv_now & ~lsq_now & (bad_m | (gmax >= (0.1 / eps) * gmin) | ~torch.isfinite(phibar))
        done = conv_now | lsq_now | brk_now
        state = {
            "X": X,
            "R1": R1,
            "R2": R2,
            "Y": Yn,
            "W": W,
            "W2": W2,
            "beta": torch.where(done, torch.ones_like(beta), beta),  # keeps the next division finite
            "oldb": oldb,
            "dbar": dbar,
            "epsln": epsln,
            "phibar": phibar,
            "cs": cs,
            "sn": sn,
            "tnorm2": tnorm2,
            "gmax": gmax,
            "gmin": gmin,
            "thresh": s["thresh"],
            "conv": conv_now | lsq_now,
            "brk": brk_now,
            "lsq": lsq_now,
            "done": done,
        }
        if check_every > 1:  # columns finished before keep their values until the next host check
            frozen = s["done"]
            state = {name: torch.where(frozen, s[name], t) for name, t in state.items()}
            state["done"] = frozen | done
        anorm_est = torch.maximum(anorm_est, torch.nan_to_num(state["gmax"].max()))
        if it % check_every and it != sys.maxiter:
            continue
        live = (~state["done"]).tolist()
        if not all(live) or it == sys.maxiter:
            cols.write(X=state["X"], rnorm=state["phibar"], conv=state["conv"], brk=state["brk"], lsq=state["lsq"])
            state = cols.keep(live, state)

    out = cols.out
    rnorm = out["rnorm"]
    if Mop is not None:
        rnorm = _colnorm(B - apply_abar(out["X"]))
    return _Raw(
        X=out["X"],
        rnorm=rnorm,
        conv=out["conv"],
        flags={"breakdown": out["brk"], "least_squares": out["lsq"]},
        n_iter=it,
        n_matvecs=op.n_matvecs - start,
        anorm=anorm_est,
        # with M the test is on the M-norm (the true 2-norm residual is reported as is)
        exclude=out["lsq"] if Mop is None else torch.ones_like(out["lsq"]),
    )
