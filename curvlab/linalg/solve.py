r"""The one linear-solve registry: :func:`solve` ``(A, b, method=...) -> KrylovResult``.

Every package that solves :math:`(A + \lambda I)\,x = b` — implicit
differentiation (:mod:`implicit`), bilevel hypergradients (:mod:`bilevel`) —
calls this function with a method name or a callable, so defaults (one
tolerance, :func:`~curvlab.linalg.default_tol`), input checks (one operator
check, :func:`~curvlab.linalg._result.check_operator`) and reports (one
:class:`~curvlab.linalg.KrylovResult` with a :class:`~curvlab.Status`) are the
same everywhere.

Methods:

* ``"cg"`` — conjugate gradients (Hestenes & Stiefel 1952), symmetric positive
  definite ``A`` (:func:`~curvlab.linalg.cg`).
* ``"minres"`` — symmetric indefinite ``A`` (Paige & Saunders 1975,
  :func:`~curvlab.linalg.minres`).
* ``"gmres"`` — general square ``A`` (Saad & Schultz 1986, :func:`~curvlab.linalg.gmres`).
* ``"normal_cg"`` — CG on :math:`A^\top A x = A^\top b` for any invertible ``A``
  (jaxopt's ``solve_normal_cg``; Blondel et al. 2021, §2.2).
* ``"neumann"`` — Lorraine, Vicol & Duvenaud 2020's truncated Neumann series
  :math:`x = \alpha\sum_{j<K}(I - \alpha A)^j b` (their Algorithm 3).
* ``"dense"`` — materialise ``A`` with one block product with the identity and
  factor it (Cholesky for symmetric positive definite ``A``, else LU).
* ``"auto"`` — ``"dense"`` when ``n`` is small (``n <= dense_max``, or a dense
  tensor with ``n <= 2048``); otherwise CG for a symmetric operator (tagged, a
  symmetric tensor, ``symmetric=True``, or — for an untagged callable — found
  symmetric by one two-column probe :math:`u^\top A v = v^\top A u`), falling
  back to MINRES on negative curvature, and GMRES otherwise.
* a callable ``method(A, b, **options) -> x`` (or an object with ``.x``, e.g. a
  :class:`KrylovResult`), called once per column of ``b`` with ``A`` as a
  :class:`~curvlab.linops.LinearOperator`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from curvlab.linops._base import DenseOperator, LinearOperator, MatvecOperator
from curvlab.status import Status

from ._result import (
    KrylovResult,
    _check_nonneg,
    _check_positive_int,
    _colnorm,
    _resolve_tol,
    check_operator,
)
from .cg import cg
from .gmres import gmres
from .minres import minres

__all__ = ["METHODS", "estimate_alpha", "solve"]

#: The built-in methods and the options each takes besides ``x0, tol, atol, maxiter, M, damping``.
METHODS: dict[str, tuple[str, ...]] = {
    "auto": ("symmetric", "dense_max", "check_every", "restart"),
    "cg": ("symmetric", "check_every", "callback"),
    "minres": ("symmetric", "check_every"),
    "gmres": ("symmetric", "restart"),
    "normal_cg": ("symmetric", "check_every"),
    "neumann": ("symmetric", "alpha", "K", "power_iters"),
    "dense": ("symmetric",),
}

_SYMMETRIC_METHODS = {"cg", "minres"}
#: ``"auto"`` factors a materialised dense tensor up to this size.
_DENSE_TENSOR_MAX = 2048
#: ``"auto"``: default size up to which a matrix-free operator is materialised and factored.
_DENSE_MAX = 256
#: Default number of power iterations for Neumann's ``alpha``.
_POWER_ITERS = 20


def solve(
    A: Any,
    b: Tensor,
    method: str | Callable[..., Any] = "auto",
    *,
    x0: Tensor | None = None,
    tol: float | None = None,
    atol: float = 0.0,
    maxiter: int | None = None,
    M: Any = None,
    damping: float = 0.0,
    **options: Any,
) -> KrylovResult:
    r"""Solve :math:`(A + \text{damping}\cdot I)\,x = b` with the chosen method.

    Every method reports in one :class:`~curvlab.linalg.KrylovResult`:
    ``converged`` means :math:`\|b - (A + \lambda I)x\| \le \max(\mathrm{tol}\,\|b\|,
    \mathrm{atol})` per column, for the true residual (Krylov methods check
    their recurrence residual where rounding could matter, see
    :func:`~curvlab.linalg.cg`; ``dense``, ``normal_cg`` and user callables form
    it; ``neumann`` carries it exactly in its recurrence).

    Args:
        A: the ``(n, n)`` operator: a :class:`~curvlab.linops.LinearOperator`, a
            dense 2-D tensor, or a callable ``v -> A v`` (size, dtype and device
            from ``b``). Methods that need symmetry (``"cg"``, ``"minres"``)
            reject a dense non-symmetric tensor and an operator not tagged
            symmetric; a callable is taken on the caller's word.
        b: right-hand side, ``(n,)`` or ``(n, k)``.
        method: ``"auto"`` (default), ``"cg"``, ``"minres"``, ``"gmres"``,
            ``"normal_cg"``, ``"neumann"``, ``"dense"``, or a callable
            ``method(A, b, **options)`` returning ``x`` (or an object with ``.x``,
            and optionally ``.converged`` / ``.residual_norm``).
        x0: starting point shaped like ``b`` (Krylov methods; ignored by
            ``"dense"``, and by ``"auto"`` when it factors).
        tol: relative residual tolerance (default :func:`~curvlab.linalg.default_tol`
            of ``b``'s dtype; values in ``(0, 10ε)`` are raised with a warning).
        atol: absolute residual tolerance.
        maxiter: iteration cap (Krylov methods; for ``"neumann"`` use ``K``).
        M: preconditioner approximating :math:`(A + \lambda I)^{-1}` (``"cg"``,
            ``"minres"``, ``"gmres"``; ``"auto"`` passes it to the Krylov method
            it picks and never factors when one is given).
        damping: :math:`\lambda \ge 0`, added to the diagonal (``ridge``, ``shift``
            elsewhere: one name here).
        **options: method options —
            ``symmetric`` (``True``/``False``: the symmetry of a callable, untagged
            operator or dense tensor — taken on the caller's word, no numerical
            test — for ``"auto"``'s choice and for ``"dense"``'s factorisation);
            ``check_every`` (cg, minres, normal_cg: host syncs);
            ``callback`` (cg); ``restart`` (gmres);
            ``dense_max`` (auto: largest ``n`` materialised, default 256);
            ``alpha``, ``K``, ``power_iters`` (neumann: step, number of terms
            (default 20), power iterations for the default ``alpha``);
            anything else for a callable ``method``.

    Returns:
        A :class:`~curvlab.linalg.KrylovResult` (``method`` says which method ran;
        for ``"auto"`` the one it picked).

    Raises:
        ValueError: unknown method, a bad shape, a non-symmetric tensor for
            ``"cg"``/``"minres"``, a negative ``damping``, a bad option value.
        TypeError: an option the method does not take, ``method`` of the wrong type.

    Example:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> res = solve(A, b)                  # small: factored densely
        >>> res.method, res.converged, bool(torch.allclose(A @ res.x, b))
        ('dense', True, True)
        >>> solve(lambda v: A @ v, b, "cg").status
        <Status.CONVERGED: 'converged'>
    """
    if not isinstance(b, Tensor):
        raise TypeError(f"b must be a torch.Tensor, got {type(b).__name__}")
    if b.ndim not in (1, 2) or not b.is_floating_point():
        raise ValueError(f"b must be a floating-point tensor of shape (n,) or (n, k), got {tuple(b.shape)} {b.dtype}")
    lam = _check_nonneg(damping, "damping")
    if callable(method) and not isinstance(method, str):
        op = _operator(A, b, options.pop("symmetric", None), False, "solve(method=<callable>)")
        return _user(method, _damped(op, lam), b, tol=tol, atol=atol, x0=x0, maxiter=maxiter, M=M, options=options)
    if not isinstance(method, str):
        raise TypeError(f"method must be a name in {sorted(METHODS)} or a callable, got {type(method).__name__}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)} or pass a callable")
    unknown = sorted(set(options) - set(METHODS[method]))
    if unknown:
        raise TypeError(
            f"solve(method={method!r}) has no option {unknown[0]!r}; its options are "
            f"{['x0', 'tol', 'atol', 'maxiter', 'M', 'damping', *METHODS[method]]}"
        )
    symmetric = options.pop("symmetric", None)
    if symmetric is not None and not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be True, False or None, got {symmetric!r}")
    what = f"solve(method={method!r})"
    op = _operator(A, b, symmetric, method in _SYMMETRIC_METHODS, what)
    krylov = dict(x0=x0, tol=tol, atol=atol, maxiter=maxiter, M=M)
    if method == "cg":
        return _named(cg(_damped(op, lam), b, **krylov, **options), "cg")
    if method == "minres":
        return _named(minres(op, b, shift=-lam, **krylov, **options), "minres")
    if method == "gmres":
        return _named(gmres(_damped(op, lam), b, **krylov, **options), "gmres")
    if method == "normal_cg":
        _no(M, "M", method)
        return _normal_cg(_damped(op, lam), b, x0=x0, tol=tol, atol=atol, maxiter=maxiter, **options)
    if method == "neumann":
        _no(M, "M", method)
        _no(x0, "x0", method)
        _no(maxiter, "maxiter", method)
        return _neumann(_damped(op, lam), b, tol=tol, atol=atol, **options)
    if method == "dense":
        return _dense(op, b, lam, tol=tol, atol=atol, symmetric=symmetric)
    return _auto(A, op, b, lam, symmetric, krylov, **options)


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _operator(A: Any, b: Tensor, symmetric: bool | None, needs_symmetry: bool, what: str) -> LinearOperator:
    n = b.shape[0]
    if callable(A) and not isinstance(A, (LinearOperator, Tensor)):
        op = check_operator(
            A, n=n, dtype=b.dtype, device=b.device, symmetric=bool(symmetric or needs_symmetry), what=what
        )
    elif isinstance(A, Tensor) and symmetric is not None and not needs_symmetry:
        if A.ndim != 2 or A.shape[0] != A.shape[1] or not A.is_floating_point():
            op = check_operator(A, what=what)  # raises the one operator check's error
        op = DenseOperator(A, symmetric=symmetric)  # on the caller's word, as for a callable (no numerical test)
    else:
        op = check_operator(A, symmetric=needs_symmetry, what=what)
    if op.shape[0] != n:
        raise ValueError(
            f"{what}: b must have shape ({op.shape[0]},) or ({op.shape[0]}, k) to match A, got {tuple(b.shape)}"
        )
    if op.dtype != b.dtype or op.device != b.device:
        raise ValueError(
            f"{what}: b must have A's dtype {op.dtype} and device {op.device}, got {b.dtype} on {b.device}"
        )
    return op


def _damped(op: LinearOperator, lam: float) -> LinearOperator:
    return op if lam == 0 else op.damped(lam)


def _no(value: Any, name: str, method: str) -> None:
    if value is not None:
        raise TypeError(f"solve(method={method!r}) takes no {name}")


def _named(res: KrylovResult, method: str) -> KrylovResult:
    res.method = method
    return res


def _thresh(b2: Tensor, tol: float, atol: float) -> Tensor:
    return torch.clamp(tol * _colnorm(b2), min=atol)


def _result(
    x: Tensor,
    b: Tensor,
    rnorm: Tensor,
    conv: Tensor,
    *,
    method: str,
    n_iter: int,
    n_matvecs: int,
    status: Status | None = None,
    info: dict | None = None,
    all_conv: bool | None = None,
    bnorm: Tensor | None = None,
) -> KrylovResult:
    """A :class:`KrylovResult` from ``(n, k)`` / ``(k,)`` pieces, shaped like ``b``.

    ``all_conv`` (``conv.all()``) and ``bnorm`` (the column norms of ``b``) may be passed when known.
    """
    vec = b.ndim == 1
    if all_conv is None:
        all_conv = bool(conv.all())
    if status is None:
        if all_conv:
            status = Status.CONVERGED
        elif not bool(torch.isfinite(x).all()) or not bool(torch.isfinite(rnorm).all()):
            status = Status.NAN
        else:
            status = Status.MAX_ITER
    elif all_conv:
        status = Status.CONVERGED
    if bnorm is None:
        bnorm = _colnorm(b[:, None] if vec else b)
    info = dict(info) if info else {}
    info["converged_columns"] = conv[0] if vec else conv
    return KrylovResult(
        x=x[:, 0] if vec else x,
        converged=all_conv,
        residual_norm=rnorm[0] if vec else rnorm,
        n_iter=int(n_iter),
        n_matvecs=int(n_matvecs),
        status=status,
        info=info,
        method=method,
        rhs_norm=bnorm[0] if vec else bnorm,
    )


def _block(b: Tensor) -> Tensor:
    return b[:, None] if b.ndim == 1 else b


# --------------------------------------------------------------------------- #
# dense
# --------------------------------------------------------------------------- #
def _dense(
    op: LinearOperator, b: Tensor, lam: float, *, tol: Any, atol: Any, symmetric: bool | None, what: str = "dense"
) -> KrylovResult:
    """Materialise ``A`` (one block product with the identity), factor, one step of iterative refinement if needed."""
    tol_f, atol_f = _resolve_tol(tol, b.dtype), _check_nonneg(atol, "atol")
    start = op.n_matvecs
    Ad = op.to_dense()
    if lam:
        Ad = Ad + lam * torch.eye(Ad.shape[0], dtype=Ad.dtype, device=Ad.device)
    n_matvecs = op.n_matvecs - start
    B = _block(b)
    sym = op.is_symmetric or (symmetric is True)
    factor: Callable[[Tensor], Tensor] | None = None
    kind = "lu"
    if sym:
        L, info = torch.linalg.cholesky_ex(Ad)
        if int(info) == 0:
            kind = "cholesky"

            def factor(R: Tensor, L: Tensor = L) -> Tensor:
                return torch.cholesky_solve(R, L)

    if factor is None:
        LU, piv, info = torch.linalg.lu_factor_ex(Ad)
        if int(info) == 0:

            def factor(R: Tensor, LU: Tensor = LU, piv: Tensor = piv) -> Tensor:
                return torch.linalg.lu_solve(LU, piv, R)

    bnorm = _colnorm(B)
    thresh = torch.clamp(tol_f * bnorm, min=atol_f)
    if factor is None:  # exactly singular: the least-squares solution (pseudo-inverse)
        kind = "lstsq"
        X = torch.linalg.lstsq(Ad, B, driver="gelsd" if Ad.device.type == "cpu" else None).solution
        refine = 0
        rnorm = _colnorm(B - Ad @ X)
    else:
        X = factor(B)
        refine = 0
        rnorm = _colnorm(torch.addmm(B, Ad, X, alpha=-1))
        if not bool((rnorm <= thresh).all()) and bool(torch.isfinite(rnorm).all()):
            X = X + factor(torch.addmm(B, Ad, X, alpha=-1))  # one step of fixed-precision iterative refinement
            refine = 1
            rnorm = _colnorm(torch.addmm(B, Ad, X, alpha=-1))
    conv = rnorm <= thresh
    all_conv = bool(conv.all())
    status = None
    if not all_conv and bool(torch.isfinite(X).all()):
        status = Status.BREAKDOWN if kind == "lstsq" else Status.STALLED  # at the dtype's limit for this matrix
    return _result(
        X,
        b,
        rnorm,
        conv,
        method=what,
        n_iter=0,
        n_matvecs=n_matvecs,
        status=status,
        info={"factorization": kind, "refinement_steps": refine, "anorm": float(torch.linalg.matrix_norm(Ad))},
        all_conv=all_conv,
        bnorm=bnorm,
    )


# --------------------------------------------------------------------------- #
# normal equations
# --------------------------------------------------------------------------- #
def _transpose(op: LinearOperator) -> LinearOperator:
    """``Aᵀ``: the operator's own, or the vjp of a matvec callable that has no ``rmatvec``."""
    if op.is_symmetric:
        return op
    if isinstance(op, MatvecOperator) and op._rmv is None:

        def rmv(u: Tensor) -> Tensor:
            _, vjp_fn = torch.func.vjp(op.matvec, torch.zeros_like(u))  # the map is linear: any point will do
            return vjp_fn(u)[0]

        return MatvecOperator(rmv, op.shape[0], op.dtype, op.device)
    return op.T


def _normal_cg(
    op: LinearOperator,
    b: Tensor,
    *,
    x0: Tensor | None,
    tol: Any,
    atol: Any,
    maxiter: int | None,
    check_every: int = 1,
    refinements: int = 3,
) -> KrylovResult:
    r"""CG on :math:`A^\top A x = A^\top b`; converged when the residual of :math:`A x = b` itself meets ``tol``.

    The normal-equation residual :math:`\|A^\top r\|` may be small while
    :math:`\|r\|` is not (the condition number is squared), so after CG the true
    residual is formed; a column that misses the tolerance is rerun from its
    iterate with a 100× tighter normal-equation tolerance (at most ``refinements``
    times, within ``maxiter``).
    """
    tol_f, atol_f = _resolve_tol(tol, b.dtype), _check_nonneg(atol, "atol")
    At = _transpose(op)
    start = op.n_matvecs  # products with Aᵀ are counted on A as well (rmatvec, or the vjp of its matvec)
    prod = At @ op
    gram = MatvecOperator(prod.matvec, op.shape[0], op.dtype, op.device, matmat=prod.matmat, symmetric=True)
    B = _block(b)
    thresh = _thresh(B, tol_f, atol_f)
    X = None if x0 is None else _block(x0)
    inner_tol = tol_f
    n_iter = 0
    cap = maxiter
    attempt = 0
    for attempt in range(refinements + 1):  # noqa: B007 - reported in info
        inner = max(inner_tol, 10 * float(torch.finfo(b.dtype).eps))
        res = cg(gram, At.matmat(B), x0=X, tol=inner, maxiter=cap, check_every=check_every)
        n_iter += res.n_iter
        X = res.x
        rnorm = _colnorm(B - op.matmat(X))
        conv = rnorm <= thresh
        if bool(conv.all()) or not bool(torch.isfinite(rnorm).all()) or res.status != Status.CONVERGED:
            break
        if cap is not None:
            cap = cap - res.n_iter
            if cap < 1:
                break
        inner_tol = inner_tol / 100
    n_matvecs = op.n_matvecs - start
    status = None if res.status == Status.CONVERGED else res.status
    if status is None and not bool(conv.all()):
        status = Status.STALLED
    return _result(
        X,
        b,
        rnorm,
        conv,
        method="normal_cg",
        n_iter=n_iter,
        n_matvecs=n_matvecs,
        status=status,
        info={"refinements": attempt},
    )


# --------------------------------------------------------------------------- #
# Neumann series
# --------------------------------------------------------------------------- #
def estimate_alpha(op: LinearOperator, iters: int = _POWER_ITERS) -> float:
    r"""Neumann's default step :math:`\alpha = \pm 1/|\lambda|_{\max}`, by ``iters`` power iterations on ``A``.

    The estimate :math:`\|A v\| / \|v\|` from a fixed-seed Gaussian start is a
    lower bound on the spectral radius that, after a few iterations, exceeds half
    of it, so :math:`(I - \alpha A)` has spectral radius below one for
    symmetric positive (or negative) definite ``A``; the sign is that of the
    Rayleigh quotient :math:`v^\top A v` (negative for a fixed-point system
    :math:`A = \partial T - I`).
    """
    gen = torch.Generator(device=op.device).manual_seed(0)
    v = torch.randn(op.shape[0], generator=gen, dtype=op.dtype, device=op.device)
    v = v / torch.linalg.vector_norm(v)
    lam = 0.0
    rq = 0.0
    for _ in range(iters):
        w = op.matvec(v)
        nrm = float(torch.linalg.vector_norm(w))
        if not math.isfinite(nrm) or nrm == 0.0:
            break
        lam, rq = nrm, float(torch.dot(v, w))
        v = w / nrm
    if lam == 0.0 or not math.isfinite(lam):
        raise ValueError(
            "solve(method='neumann'): could not estimate alpha (A v is zero or not finite); pass alpha explicitly"
        )
    return (1.0 if rq >= 0 else -1.0) / lam


def _neumann(
    op: LinearOperator,
    b: Tensor,
    *,
    tol: Any,
    atol: Any,
    alpha: float | None = None,
    K: int = 20,
    power_iters: int = _POWER_ITERS,
) -> KrylovResult:
    r"""Lorraine, Vicol & Duvenaud 2020, Algorithm 3: :math:`x = \alpha\sum_{j<K}(I-\alpha A)^j b`.

    ``p = v = b``; repeat ``K - 1`` times: ``v ← v − α A v``, ``p ← p + v``;
    return ``α p`` (``K - 1`` products for ``K`` terms, as in the paper; always
    ``K`` terms, the paper's fixed truncation, unless a value turns non-finite).
    The recurrence carries the residual: after ``j`` terms
    :math:`b - A x_j = (I - \alpha A)^j b`. The reported residual is :math:`\|(I-\alpha A)^{K-1} b\|`, an upper bound
    of the ``K``-term residual for a symmetric ``A`` on which the series converges
    (:math:`\|I - \alpha A\|_2 = \rho(I - \alpha A) < 1`); for a non-symmetric ``A``
    the true residual is formed with one more product.
    """
    K = _check_positive_int(K, "K")
    power_iters = _check_positive_int(power_iters, "power_iters")
    tol_f, atol_f = _resolve_tol(tol, b.dtype), _check_nonneg(atol, "atol")
    start = op.n_matvecs
    if alpha is None:
        alpha_f = estimate_alpha(op, power_iters)
        estimated = True
    else:
        if isinstance(alpha, bool) or not (
            isinstance(alpha, (int, float)) or (isinstance(alpha, Tensor) and alpha.ndim == 0)
        ):
            raise TypeError(f"alpha must be a number, got {type(alpha).__name__}")
        alpha_f = float(alpha)
        if not math.isfinite(alpha_f) or alpha_f == 0:
            raise ValueError(f"alpha must be a finite nonzero number, got {alpha!r}")
        estimated = False
    B = _block(b)
    thresh = _thresh(B, tol_f, atol_f)
    v = B
    p = B
    terms, exact = 1, False
    rnorm = _colnorm(B)
    for _ in range(K - 1):
        v = v - alpha_f * op.matmat(v)  # the residual of the `terms`-term sum
        rnorm = _colnorm(v)
        if not bool(torch.isfinite(rnorm).all()):
            exact = True
            break
        p = p + v
        terms += 1
    if not exact and not op.is_symmetric:  # else ‖(I - αA)^{K-1} b‖ bounds the K-term residual
        rnorm = _colnorm(v - alpha_f * op.matmat(v))
    x = alpha_f * p
    conv = rnorm <= thresh
    status = None
    if not bool(conv.all()) and bool(torch.isfinite(rnorm).all()) and bool((rnorm > _colnorm(B)).any()):
        status = Status.DIVERGED  # the spectral radius of I - αA exceeds one
    return _result(
        x,
        b,
        rnorm,
        conv,
        method="neumann",
        n_iter=terms - 1,
        n_matvecs=op.n_matvecs - start,
        status=status,
        info={"alpha": alpha_f, "alpha_estimated": estimated, "terms": terms},
    )


# --------------------------------------------------------------------------- #
# auto
# --------------------------------------------------------------------------- #
def _probe_symmetric(op: LinearOperator) -> bool:
    r"""Symmetry probe by one two-column product.

    Symmetric when :math:`|u^\top A v - v^\top A u| \le \sqrt\varepsilon\,\max\|A w\|\,\max\|w\|` for
    ``w`` in ``{u, v}``, fixed-seed Gaussian vectors.
    """
    gen = torch.Generator(device=op.device).manual_seed(1)
    UV = torch.randn(op.shape[0], 2, generator=gen, dtype=op.dtype, device=op.device)
    AUV = op.matmat(UV)
    a, c = float(UV[:, 0] @ AUV[:, 1]), float(UV[:, 1] @ AUV[:, 0])
    scale = float(_colnorm(AUV).max()) * float(_colnorm(UV).max())
    return math.isfinite(a) and math.isfinite(c) and abs(a - c) <= float(torch.finfo(op.dtype).eps) ** 0.5 * scale


def _auto(
    A: Any,
    op: LinearOperator,
    b: Tensor,
    lam: float,
    symmetric: bool | None,
    krylov: dict[str, Any],
    *,
    dense_max: int = _DENSE_MAX,
    check_every: int = 1,
    restart: int = 30,
) -> KrylovResult:
    n = op.shape[0]
    if isinstance(dense_max, bool) or not isinstance(dense_max, int) or dense_max < 0:
        raise ValueError(f"dense_max must be an int >= 0 (0: never factor), got {dense_max!r}")
    is_tensor = isinstance(A, Tensor) or isinstance(op, DenseOperator)
    limit = max(dense_max, _DENSE_TENSOR_MAX) if is_tensor else dense_max
    if krylov["M"] is None and n <= limit:
        return _dense(op, b, lam, tol=krylov["tol"], atol=krylov["atol"], symmetric=symmetric)
    extra = 0
    if op.is_symmetric or symmetric is True:
        sym = True
    elif symmetric is False:
        sym = False
    elif isinstance(op, DenseOperator):
        sym = bool(_asym_ok(op.A))
    else:
        start = op.n_matvecs
        sym = _probe_symmetric(op)
        extra = op.n_matvecs - start
    if sym:
        sop = (
            op
            if op.is_symmetric
            else MatvecOperator(op.matvec, n, op.dtype, op.device, matmat=op.matmat, symmetric=True)
        )
        res = cg(_damped(sop, lam), b, check_every=check_every, **krylov)
        res.method = "cg"
        if res.status in (Status.NEGATIVE_CURVATURE, Status.BREAKDOWN):
            first = res.n_matvecs
            res = minres(sop, b, shift=-lam, check_every=check_every, **krylov)
            res.method = "minres"
            res.n_matvecs += first
            res.info["fallback_from"] = "cg"
    else:
        res = gmres(_damped(op, lam), b, restart=restart, **krylov)
        res.method = "gmres"
    res.n_matvecs += extra
    res.info["symmetry_probe_products"] = extra
    return res


def _asym_ok(A: Tensor) -> bool:
    scale = float(A.abs().max()) if A.numel() else 0.0
    return scale == 0.0 or float((A - A.T).abs().max()) <= float(torch.finfo(A.dtype).eps) ** 0.5 * scale


# --------------------------------------------------------------------------- #
# user callables
# --------------------------------------------------------------------------- #
def _user(
    fn: Callable[..., Any],
    op: LinearOperator,
    b: Tensor,
    *,
    tol: Any,
    atol: Any,
    x0: Any,
    maxiter: Any,
    M: Any,
    options: dict[str, Any],
) -> KrylovResult:
    """Call ``fn(op, b_j, **options)`` per column; converged when the true residual meets the tolerance."""
    name = getattr(fn, "__name__", type(fn).__name__)
    for key, val in (("x0", x0), ("maxiter", maxiter), ("M", M)):
        if val is not None:
            options = {**options, key: val}
    tol_f, atol_f = _resolve_tol(tol, b.dtype), _check_nonneg(atol, "atol")
    start = op.n_matvecs
    B = _block(b)
    xs, iters = [], 0
    for j in range(B.shape[1]):
        col = B[:, j] if b.ndim == 2 else b
        kw = dict(options)
        if "x0" in kw and isinstance(kw["x0"], Tensor) and kw["x0"].ndim == 2:
            kw["x0"] = kw["x0"][:, j]
        out = fn(op, col, **kw)
        x = out if isinstance(out, Tensor) else getattr(out, "x", None)
        if not isinstance(x, Tensor):
            raise TypeError(
                f"the solve callable {name!r} must return a tensor x (or an object with .x), got {type(out).__name__}"
            )
        if x.shape != col.shape:
            raise ValueError(
                f"the solve callable {name!r} returned x of shape {tuple(x.shape)}; expected {tuple(col.shape)} like b"
            )
        iters = max(iters, int(getattr(out, "n_iter", 0)))
        xs.append(x.to(col.dtype))
    X = torch.stack(xs, dim=1)
    rnorm = _colnorm(B - op.matmat(X))
    conv = rnorm <= _thresh(B, tol_f, atol_f)
    status = None
    if not bool(conv.all()) and bool(torch.isfinite(rnorm).all()):
        status = Status.FAILED
    return _result(X, b, rnorm, conv, method=name, n_iter=iters, n_matvecs=op.n_matvecs - start, status=status)
