r"""Pluggable linear solves for implicit differentiation.

Implicit differentiation (Blondel et al. 2021, "Efficient and Modular Implicit
Differentiation", NeurIPS 2022, eqs. (2)–(4)) turns the derivative of a root
:math:`y^*(\theta)` of :math:`F(y, \theta) = 0` into one linear system with
:math:`A = \partial_y F(y^*, \theta)`: :math:`A^\top u = \bar v` in reverse
mode, :math:`A \dot y = -B\dot\theta` in forward mode. The matrix is never
formed: every solver here sees it only through products ``matvec(v)``.

Each solver has the signature ``solve(matvec, b, **options) -> x`` (as in
jaxopt), where ``matvec`` is a :class:`~curvlab.linops.LinearOperator`, a dense
2-D tensor or a callable ``v -> A v`` on flat vectors, and ``b`` is ``(n,)`` or
an ``(n, k)`` block. Any callable with that signature can be handed to
:func:`~implicit.custom_root` — e.g. an M-FAC inverse or a user's own
preconditioned CG.

The Krylov methods are :mod:`curvlab.linalg`'s; this module only adds the
normal-equation variant, Lorraine et al.'s truncated Neumann series and a
dense direct solve, and the bookkeeping of whether a solve converged.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvlab import linalg
from curvlab.linops import LinearOperator, MatvecOperator, aslinearoperator

__all__ = [
    "LinearSolveError",
    "LinearSolveInfo",
    "LinearSolveWarning",
    "SOLVES",
    "solve_cg",
    "solve_dense",
    "solve_gmres",
    "solve_minres",
    "solve_neumann",
    "solve_normal_cg",
]


class LinearSolveError(RuntimeError):
    """The linear solve of an implicit derivative did not converge.

    Attributes:
        info: the :class:`LinearSolveInfo` of the failed solve.
    """

    def __init__(self, message: str, info: LinearSolveInfo) -> None:
        super().__init__(message)
        self.info = info


class LinearSolveWarning(RuntimeWarning):
    """Warning category for linear solves that did not converge."""


@dataclass
class LinearSolveInfo:
    """What one linear solve did.

    Attributes:
        method: the solver's name (``"cg"``, ..., or the callable's name).
        converged: the solver reported convergence (for ``"neumann"``, ``"dense"``
            and user callables without a report: the solution is finite).
        residual_norm: :math:`\\max_j \\|b_j - A x_j\\|` over the right-hand sides
            (``nan`` where the solver does not report one).
        rhs_norm: :math:`\\max_j \\|b_j\\|`.
        n_iter: iterations (0 where not applicable).
        n_matvecs: products with ``A`` (counting ``Aᵀ`` products too).
        status: the solver's status string.
    """

    method: str
    converged: bool
    residual_norm: float
    rhs_norm: float
    n_iter: int
    n_matvecs: int
    status: str

    @property
    def relative_residual(self) -> float:
        """``residual_norm / rhs_norm`` (``0`` for a zero right-hand side)."""
        return self.residual_norm / self.rhs_norm if self.rhs_norm > 0 else 0.0


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _default_tol(dtype: torch.dtype) -> float:
    """Relative tolerance when the user gives none: 1e-10 in float64, 1e-5 in lower precision."""
    return 1e-10 if dtype == torch.float64 else 1e-5


def _as_operator(matvec: Any, b: Tensor) -> LinearOperator:
    """``matvec`` as a square operator sized from ``b``."""
    if not isinstance(b, Tensor) or b.ndim not in (1, 2):
        raise ValueError(f"b must be a tensor of shape (n,) or (n, k), got {getattr(b, 'shape', type(b).__name__)}")
    op = aslinearoperator(matvec, shape=b.shape[0], dtype=b.dtype, device=b.device, name="matvec")
    if op.shape != (b.shape[0], b.shape[0]):
        raise ValueError(f"matvec must be a square ({b.shape[0]}, {b.shape[0]}) operator to match b, got {op.shape}")
    return op


def _colnorm_max(X: Tensor) -> float:
    if X.ndim == 1:
        return float(torch.linalg.vector_norm(X))
    return float(torch.linalg.vector_norm(X, dim=0).max()) if X.shape[1] else 0.0


def _ridged(op: LinearOperator, ridge: float) -> LinearOperator:
    return op if ridge == 0 else op.damped(ridge)


def _transpose_of(op: LinearOperator) -> LinearOperator:
    """``Aᵀ`` of a square operator: its own transpose, or the vjp of a matvec callable that has no ``rmatvec``."""
    if op.is_symmetric:
        return op
    if isinstance(op, MatvecOperator) and op._rmv is None:

        def rmv(u: Tensor) -> Tensor:
            _, vjp_fn = torch.func.vjp(op.matvec, torch.zeros_like(u))  # the map is linear: any point will do
            return vjp_fn(u)[0]

        return MatvecOperator(rmv, op.shape[0], op.dtype, op.device)
    return op.T


def _krylov_info(method: str, res: Any, b: Tensor) -> LinearSolveInfo:
    return LinearSolveInfo(
        method=method,
        converged=bool(res.converged),
        residual_norm=float(res.residual_norm.max()) if res.residual_norm.numel() else 0.0,
        rhs_norm=_colnorm_max(b),
        n_iter=int(res.n_iter),
        n_matvecs=int(res.n_matvecs),
        status=str(res.status),
    )


# --------------------------------------------------------------------------- #
# the solvers: (op, b, **options) -> (x, info)
# --------------------------------------------------------------------------- #
def _cg(
    op: LinearOperator,
    b: Tensor,
    *,
    x0: Tensor | None = None,
    tol: float | None = None,
    atol: float = 0.0,
    maxiter: int | None = None,
    M: Any = None,
    ridge: float = 0.0,
    check_every: int = 1,
) -> tuple[Tensor, LinearSolveInfo]:
    tol = _default_tol(b.dtype) if tol is None else tol
    A = _ridged(op, ridge)
    res = linalg.cg(A, b, x0=x0, tol=tol, atol=atol, maxiter=maxiter, M=M, check_every=check_every)
    return res.x, _krylov_info("cg", res, b)


def _normal_cg(
    op: LinearOperator,
    b: Tensor,
    *,
    x0: Tensor | None = None,
    tol: float | None = None,
    atol: float = 0.0,
    maxiter: int | None = None,
    ridge: float = 0.0,
    check_every: int = 1,
) -> tuple[Tensor, LinearSolveInfo]:
    tol = _default_tol(b.dtype) if tol is None else tol
    At = _transpose_of(op)
    start = op.n_matvecs  # products with Aᵀ are counted on A as well
    gram = _ridged(At @ op, ridge)  # AᵀA (+ ridge I): symmetric positive (semi)definite
    rhs = At @ b
    res = linalg.cg(gram, rhs, x0=x0, tol=tol, atol=atol, maxiter=maxiter, check_every=check_every)
    # report the residual of the original system A x = b
    r = b - op @ res.x
    info = LinearSolveInfo(
        method="normal_cg",
        converged=bool(res.converged),
        residual_norm=_colnorm_max(r),
        rhs_norm=_colnorm_max(b),
        n_iter=int(res.n_iter),
        n_matvecs=op.n_matvecs - start,
        status=str(res.status),
    )
    return res.x, info


def _minres(
    op: LinearOperator,
    b: Tensor,
    *,
    x0: Tensor | None = None,
    tol: float | None = None,
    atol: float = 0.0,
    maxiter: int | None = None,
    M: Any = None,
    ridge: float = 0.0,
) -> tuple[Tensor, LinearSolveInfo]:
    tol = _default_tol(b.dtype) if tol is None else tol
    res = linalg.minres(op, b, x0=x0, shift=-float(ridge), tol=tol, atol=atol, maxiter=maxiter, M=M)
    return res.x, _krylov_info("minres", res, b)


def _gmres(
    op: LinearOperator,
    b: Tensor,
    *,
    x0: Tensor | None = None,
    tol: float | None = None,
    atol: float = 0.0,
    restart: int = 30,
    maxiter: int | None = None,
    M: Any = None,
    ridge: float = 0.0,
) -> tuple[Tensor, LinearSolveInfo]:
    tol = _default_tol(b.dtype) if tol is None else tol
    res = linalg.gmres(_ridged(op, ridge), b, x0=x0, tol=tol, atol=atol, restart=restart, maxiter=maxiter, M=M)
    return res.x, _krylov_info("gmres", res, b)


def _neumann(
    op: LinearOperator, b: Tensor, *, alpha: float | None = None, K: int = 20
) -> tuple[Tensor, LinearSolveInfo]:
    if alpha is None:
        raise ValueError(
            "solve='neumann' needs alpha (Lorraine et al. 2020 use the inner learning rate); the series "
            "converges when the spectral radius of I - alpha*A is below 1, e.g. 0 < alpha < 2/λ_max for SPD A"
        )
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ValueError(f"K (the number of Neumann terms) must be an int >= 1, got {K!r}")
    alpha_f = float(alpha)
    if not math.isfinite(alpha_f) or alpha_f == 0:
        raise ValueError(f"alpha must be a finite nonzero number, got {alpha!r}")
    start = op.n_matvecs
    v = b
    p = b
    for _ in range(K - 1):
        v = v - alpha_f * (op @ v)
        p = p + v
    x = alpha_f * p
    finite = bool(torch.isfinite(x).all())
    info = LinearSolveInfo(
        method="neumann",
        converged=finite,
        residual_norm=math.nan,
        rhs_norm=_colnorm_max(b),
        n_iter=K - 1,
        n_matvecs=op.n_matvecs - start,
        status="truncated" if finite else "nan",
    )
    return x, info


def _dense(op: LinearOperator, b: Tensor, *, ridge: float = 0.0) -> tuple[Tensor, LinearSolveInfo]:
    start = op.n_matvecs
    A = op.to_dense()
    if ridge:
        A = A + ridge * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    x = torch.linalg.solve(A, b)
    finite = bool(torch.isfinite(x).all())
    info = LinearSolveInfo(
        method="dense",
        converged=finite,
        residual_norm=_colnorm_max(b - A @ x),
        rhs_norm=_colnorm_max(b),
        n_iter=0,
        n_matvecs=op.n_matvecs - start,
        status="converged" if finite else "nan",
    )
    return x, info


#: Built-in solvers by name: ``(op, b, **options) -> (x, LinearSolveInfo)``.
SOLVES: dict[str, Callable[..., tuple[Tensor, LinearSolveInfo]]] = {
    "cg": _cg,
    "normal_cg": _normal_cg,
    "minres": _minres,
    "gmres": _gmres,
    "neumann": _neumann,
    "dense": _dense,
}

#: Solvers that need ``Aᵀ`` products besides ``A`` products.
_NEEDS_TRANSPOSE = {"normal_cg"}


# --------------------------------------------------------------------------- #
# resolving the ``solve`` argument
# --------------------------------------------------------------------------- #
class LinearSolver:
    """A resolved ``solve`` argument: a built-in name with options, or a user callable.

    Args:
        solve: a name in :data:`SOLVES` or a callable ``solve(matvec, b) -> x``.
        options: keyword options for the solver (checked against its signature).
        nonconvergence: ``"warn"``, ``"raise"`` or ``"ignore"``.

    Attributes:
        last: the :class:`LinearSolveInfo` of the latest solve (``None`` before any).

    Raises:
        ValueError: unknown name or ``nonconvergence`` value.
        TypeError: ``solve`` neither a name nor callable, or an unknown option.
    """

    def __init__(self, solve: str | Callable[..., Any], options: dict[str, Any], nonconvergence: str = "warn") -> None:
        if nonconvergence not in ("warn", "raise", "ignore"):
            raise ValueError(f"nonconvergence must be 'warn', 'raise' or 'ignore', got {nonconvergence!r}")
        self.nonconvergence = nonconvergence
        self.options = dict(options)
        self.last: LinearSolveInfo | None = None
        if isinstance(solve, str):
            if solve not in SOLVES:
                raise ValueError(f"unknown solve {solve!r}; choose one of {sorted(SOLVES)} or pass a callable")
            self.name = solve
            self.fn = SOLVES[solve]
            allowed = [p for p in inspect.signature(self.fn).parameters if p not in ("op", "b")]
            for k in self.options:
                if k not in allowed:
                    raise TypeError(f"solve={solve!r} has no option {k!r}; its options are {allowed}")
            self.user = False
        elif callable(solve):
            self.name = getattr(solve, "__name__", type(solve).__name__)
            self.fn = solve
            self.user = True
        else:
            raise TypeError(f"solve must be a name in {sorted(SOLVES)} or a callable solve(matvec, b), got {solve!r}")

    @property
    def needs_transpose(self) -> bool:
        """The solver takes products with ``Aᵀ`` as well as with ``A``."""
        return (not self.user) and self.name in _NEEDS_TRANSPOSE

    def __call__(self, op: LinearOperator, b: Tensor) -> Tensor:
        """Solve ``op x = b`` (``b`` of shape ``(n,)`` or ``(n, k)``), record and check the outcome."""
        if self.user:
            x, info = self._call_user(op, b)
        else:
            x, info = self.fn(op, b, **self.options)
        self.last = info
        if not info.converged and self.nonconvergence != "ignore":
            msg = (
                f"implicit differentiation: the linear solve (solve={self.name!r}) did not converge: "
                f"status {info.status!r}, residual {info.residual_norm:.3e} (relative {info.relative_residual:.3e}) "
                f"after {info.n_iter} iterations / {info.n_matvecs} products."
            )
            if info.status == "negative_curvature":
                msg += (
                    " A = ∂F/∂y is not positive definite: 'cg' needs a symmetric positive definite system "
                    "(F = ∇_y g at a strict minimum); use solve='minres' (symmetric indefinite), 'gmres' or "
                    "'normal_cg' (general)."
                )
            else:
                msg += " Raise maxiter, loosen tol, or try another solve."
            if self.nonconvergence == "raise":
                raise LinearSolveError(msg, info)
            warnings.warn(msg, LinearSolveWarning, stacklevel=2)
        return x

    def _call_user(self, op: LinearOperator, b: Tensor) -> tuple[Tensor, LinearSolveInfo]:
        start = op.n_matvecs
        cols = [b] if b.ndim == 1 else [b[:, j] for j in range(b.shape[1])]
        xs, reports = [], []
        for col in cols:
            out = self.fn(op, col, **self.options)
            if isinstance(out, Tensor):
                x, report = out, None
            elif hasattr(out, "x"):
                x, report = out.x, out
            else:
                raise TypeError(
                    f"the solve callable {self.name!r} must return a tensor x (or an object with .x), "
                    f"got {type(out).__name__}"
                )
            if not isinstance(x, Tensor) or x.shape != col.shape:
                raise ValueError(
                    f"the solve callable {self.name!r} returned x of shape {tuple(getattr(x, 'shape', ()))}; "
                    f"expected {tuple(col.shape)} like b"
                )
            xs.append(x.to(col.dtype))
            reports.append(report)
        x = xs[0] if b.ndim == 1 else torch.stack(xs, dim=1)
        finite = bool(torch.isfinite(x).all())
        conv = finite and all(bool(getattr(r, "converged", True)) for r in reports)
        res = [getattr(r, "residual_norm", None) for r in reports]
        rnorm = max((float(torch.as_tensor(r).max()) for r in res if r is not None), default=math.nan)
        info = LinearSolveInfo(
            method=self.name,
            converged=conv,
            residual_norm=rnorm,
            rhs_norm=_colnorm_max(b),
            n_iter=max((int(getattr(r, "n_iter", 0)) for r in reports if r is not None), default=0),
            n_matvecs=op.n_matvecs - start,
            status="converged" if conv else ("nan" if not finite else str(getattr(reports[0], "status", "failed"))),
        )
        return x, info


# --------------------------------------------------------------------------- #
# public functional forms
# --------------------------------------------------------------------------- #
def _public(name: str, matvec: Any, b: Tensor, options: dict[str, Any]) -> Tensor:
    op = _as_operator(matvec, b)
    x, _ = SOLVES[name](op, b, **options)
    return x


def solve_cg(
    matvec: Any,
    b: Tensor,
    *,
    x0: Tensor | None = None,
    tol: float | None = None,
    atol: float = 0.0,
    maxiter: int | None = None,
    M: Any = None,
    ridge: float = 0.0,
) -> Tensor:
    r"""Solve :math:`(A + \text{ridge}\, I) x = b` for symmetric positive definite ``A`` by CG.

    The right choice when :math:`F = \nabla_y g` and ``g`` is strongly convex in
    ``y``, so that :math:`A = \nabla^2_{yy} g` (Blondel et al. 2021, §2.1).
    Uses :func:`curvlab.linalg.cg`.

    Args:
        matvec: ``A`` — a :class:`~curvlab.linops.LinearOperator`, a 2-D tensor
            or a callable ``v -> A v``.
        b: right-hand side, ``(n,)`` or ``(n, k)``.
        x0: starting point (default zeros).
        tol: relative residual tolerance (default ``1e-10`` in float64, ``1e-5`` otherwise).
        atol: absolute residual tolerance.
        maxiter: iteration cap (default ``min(10 n, 10000)``).
        M: symmetric positive definite preconditioner approximating :math:`A^{-1}`.
        ridge: Tikhonov term added to ``A``.

    Returns:
        ``x`` shaped like ``b``.

    Raises:
        ValueError: shapes that do not match.

    Example:
        >>> A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> solve_cg(lambda v: A @ v, torch.tensor([1.0, 0.0], dtype=torch.float64))
        tensor([ 0.4000, -0.2000], dtype=torch.float64)
    """
    return _public("cg", matvec, b, dict(x0=x0, tol=tol, atol=atol, maxiter=maxiter, M=M, ridge=ridge))


def solve_normal_cg(
    matvec: Any,
    b: Tensor,
    *,
    x0: Tensor | None = None,
    tol: float | None = None,
    atol: float = 0.0,
    maxiter: int | None = None,
    ridge: float = 0.0,
) -> Tensor:
    r"""Solve :math:`A x = b` for any invertible ``A`` by CG on :math:`(A^\top A + \text{ridge}\,I) x = A^\top b`.

    The safe default for a general optimality condition (jaxopt's
    ``solve_normal_cg``; Blondel et al. 2021, §2.2): works for non-symmetric and
    indefinite ``A`` at the price of squaring its condition number. ``Aᵀ``
    products come from the operator's ``rmatvec`` when it has one, else from a
    vector-Jacobian product of the (linear) ``matvec``.

    Args:
        matvec: ``A`` (operator, 2-D tensor or callable).
        b: right-hand side, ``(n,)`` or ``(n, k)``.
        x0: starting point for the normal equations.
        tol: relative tolerance on the normal-equation residual (default ``1e-10`` / ``1e-5``).
        atol: absolute tolerance.
        maxiter: iteration cap.
        ridge: Tikhonov term added to ``AᵀA``.

    Returns:
        ``x`` shaped like ``b``.

    Raises:
        ValueError: shapes that do not match.

    Example:
        >>> A = torch.tensor([[0.0, 1.0], [-2.0, 0.5]], dtype=torch.float64)
        >>> solve_normal_cg(A, torch.tensor([1.0, 1.0], dtype=torch.float64))
        tensor([-0.2500,  1.0000], dtype=torch.float64)
    """
    return _public("normal_cg", matvec, b, dict(x0=x0, tol=tol, atol=atol, maxiter=maxiter, ridge=ridge))


def solve_minres(
    matvec: Any,
    b: Tensor,
    *,
    x0: Tensor | None = None,
    tol: float | None = None,
    atol: float = 0.0,
    maxiter: int | None = None,
    M: Any = None,
    ridge: float = 0.0,
) -> Tensor:
    r"""Solve :math:`(A + \text{ridge}\,I) x = b` for symmetric, possibly indefinite ``A`` by MINRES.

    For optimality conditions at saddle points or of (e.g. gradient-step)
    fixed points, where ``A`` is symmetric but not positive definite. Uses
    :func:`curvlab.linalg.minres` (Paige & Saunders 1975).

    Args:
        matvec: symmetric ``A`` (operator, 2-D tensor or callable).
        b: right-hand side, ``(n,)`` or ``(n, k)``.
        x0: starting point.
        tol: relative tolerance (default ``1e-10`` / ``1e-5``).
        atol: absolute tolerance.
        maxiter: iteration cap.
        M: symmetric positive definite preconditioner.
        ridge: Tikhonov term added to ``A``.

    Returns:
        ``x`` shaped like ``b``.

    Raises:
        ValueError: shapes that do not match.
    """
    return _public("minres", matvec, b, dict(x0=x0, tol=tol, atol=atol, maxiter=maxiter, M=M, ridge=ridge))


def solve_gmres(
    matvec: Any,
    b: Tensor,
    *,
    x0: Tensor | None = None,
    tol: float | None = None,
    atol: float = 0.0,
    restart: int = 30,
    maxiter: int | None = None,
    M: Any = None,
    ridge: float = 0.0,
) -> Tensor:
    r"""Solve :math:`(A + \text{ridge}\,I) x = b` for general square ``A`` by restarted GMRES.

    Uses :func:`curvlab.linalg.gmres` (Saad & Schultz 1986); no ``Aᵀ`` products.

    Args:
        matvec: ``A`` (operator, 2-D tensor or callable).
        b: right-hand side, ``(n,)`` or ``(n, k)``.
        x0: starting point.
        tol: relative tolerance (default ``1e-10`` / ``1e-5``).
        atol: absolute tolerance.
        restart: Krylov subspace size between restarts.
        maxiter: cap on restart cycles / iterations (see :func:`curvlab.linalg.gmres`).
        M: preconditioner.
        ridge: Tikhonov term added to ``A``.

    Returns:
        ``x`` shaped like ``b``.

    Raises:
        ValueError: shapes that do not match.
    """
    opts = dict(x0=x0, tol=tol, atol=atol, restart=restart, maxiter=maxiter, M=M, ridge=ridge)
    return _public("gmres", matvec, b, opts)


def solve_neumann(matvec: Any, b: Tensor, *, alpha: float, K: int = 20) -> Tensor:
    r"""Truncated Neumann series :math:`x = \alpha \sum_{j<K} (I - \alpha A)^j b \approx A^{-1} b`.

    Lorraine, Vicol & Duvenaud 2020 ("Optimizing Millions of Hyperparameters
    by Implicit Differentiation", Algorithm 3): ``p = v``; repeat
    ``v ← v − α A v``, ``p ← p + v``; return ``α p``. Here ``K`` counts the
    terms of the series, so ``K - 1`` products with ``A`` are taken; their
    ``i`` iterations are ``K = i + 1``. The series converges when the spectral
    radius of :math:`I - \alpha A` is below one (for symmetric positive
    definite ``A``: :math:`0 < \alpha < 2/\lambda_{\max}`), with error
    :math:`(I-\alpha A)^K A^{-1} b`. A negative ``alpha`` handles negative
    definite systems: for a fixed point :math:`F = T(y) - y`, ``alpha = -1``
    is the fixed-point iteration :math:`u \leftarrow J_T^\top u + \bar v`.

    Args:
        matvec: ``A`` (operator, 2-D tensor or callable).
        b: right-hand side, ``(n,)`` or ``(n, k)``.
        alpha: step size α (the inner learning rate in Lorraine et al.).
        K: number of terms (``K >= 1``).

    Returns:
        ``x`` shaped like ``b``.

    Raises:
        ValueError: ``alpha`` zero or not finite, ``K < 1``, shapes that do not match.

    Example:
        >>> A = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> solve_neumann(A, torch.tensor([1.0, 1.0], dtype=torch.float64), alpha=0.5, K=60)
        tensor([0.5000, 1.0000], dtype=torch.float64)
    """
    return _public("neumann", matvec, b, dict(alpha=alpha, K=K))


def solve_dense(matvec: Any, b: Tensor, *, ridge: float = 0.0) -> Tensor:
    r"""Form ``A`` from ``n`` products with the identity and solve with :func:`torch.linalg.solve`.

    For small systems and as a reference. The ``n`` products are batched
    (``vmap``) where the operator allows.

    Args:
        matvec: ``A`` (operator, 2-D tensor or callable).
        b: right-hand side, ``(n,)`` or ``(n, k)``.
        ridge: Tikhonov term added to ``A``.

    Returns:
        ``x`` shaped like ``b``.

    Raises:
        ValueError: shapes that do not match.
        torch.linalg.LinAlgError: ``A`` singular.
    """
    return _public("dense", matvec, b, dict(ridge=ridge))
