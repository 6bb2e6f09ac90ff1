"""Result container of the Krylov solvers and the input handling the routines share.

:class:`KrylovResult` is what :func:`~curvlab.linalg.solve`, :func:`~curvlab.linalg.cg`,
:func:`~curvlab.linalg.minres` and :func:`~curvlab.linalg.gmres` return. The
helpers below turn the user's ``A``, ``b``, ``x0`` and ``M`` into operators and
``(n, k)`` blocks once, with one set of error messages (also used by
:func:`~curvlab.linalg.lanczos` and the randomized routines): the one
operator-input check (:func:`check_operator`), the one default tolerance
(:func:`default_tol`) and its floor (:func:`min_tol`), and the per-column
bookkeeping of block solves (columns that finish are written out and dropped
from the working set).
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from curvlab.linops._base import DenseOperator, LinearOperator, aslinearoperator
from curvlab.status import Status

__all__ = ["KrylovResult", "ToleranceWarning", "check_operator", "default_tol", "min_tol"]

#: Upper bound of the default iteration cap (``min(10 n, _MAXITER_CAP)``).
_MAXITER_CAP = 10_000


def default_tol(dtype: torch.dtype) -> float:
    r"""The default relative residual tolerance of every linear solve: :math:`\varepsilon^{2/3}` of ``dtype``.

    ``3.7e-11`` in float64, ``2.4e-5`` in float32, ``9.8e-3`` in float16 (the same
    rule as ARPACK's default accuracy and :mod:`curvlab.spectrum`): tight enough that
    an implicit derivative computed from the solution is accurate to about
    ``1e-10`` in float64, loose enough to be reachable in single precision.

    Args:
        dtype: a floating-point dtype.

    Returns:
        The tolerance.

    Example:
        >>> default_tol(torch.float64) < 1e-10 < default_tol(torch.float32)
        True
    """
    return float(torch.finfo(dtype).eps) ** (2.0 / 3.0)


def min_tol(dtype: torch.dtype) -> float:
    r"""The smallest relative tolerance a solve accepts: :math:`10\,\varepsilon` of ``dtype``.

    Below it the residual of a computed solution is dominated by rounding (of the
    order of :math:`\varepsilon\,\|A\|\,\|x\|`); smaller requests are raised to
    this value with a :class:`ToleranceWarning`.
    """
    return 10.0 * float(torch.finfo(dtype).eps)


class ToleranceWarning(RuntimeWarning):
    """A requested tolerance lies below what the dtype can resolve and was raised to :func:`min_tol`."""


def _resolve_tol(tol: Any, dtype: torch.dtype, name: str = "tol") -> float:
    """``tol`` checked; ``None`` gives :func:`default_tol`; values in ``(0, min_tol)`` are clipped with a warning."""
    if tol is None:
        return default_tol(dtype)
    t = _check_nonneg(tol, name)
    floor = min_tol(dtype)
    if 0 < t < floor:  # tol = 0 asks for the absolute test alone (or a fixed number of iterations)
        warnings.warn(
            f"{name}={t:g} is below what {dtype} can resolve (relative residuals under about 10·eps "
            f"are rounding noise); using {name}={floor:.3g}",
            ToleranceWarning,
            stacklevel=4,
        )
        t = floor
    return t


@dataclass
class KrylovResult:
    """Outcome of a linear solve of ``A x = b`` (every method of :func:`~curvlab.linalg.solve`).

    Attributes:
        x: the solution, shaped like ``b`` (``(n,)`` or ``(n, k)``).
        converged: every column reached its tolerance. For the iterative methods
            this holds of the *true* residual ``‖b - A x‖`` (the recurrence
            residual is checked against a product with ``A`` whenever rounding
            could make them differ by a tenth of the tolerance).
        residual_norm: ``‖b - A x‖`` per column: shape ``()`` for a 1-D ``b``,
            ``(k,)`` for a matrix ``b``. Each solver documents whether this is
            the true residual or the one its recurrence carries.
        n_iter: iterations taken (the most any column took).
        n_matvecs: products with ``A`` used (a ``k``-column block product counts
            ``k``; products with ``Aᵀ`` count too; preconditioner applications are
            not counted).
        status: a :class:`~curvlab.Status`: ``"converged"``, ``"max_iter"``,
            ``"negative_curvature"``, ``"breakdown"``, ``"stalled"`` (the residual
            stopped decreasing at the limit of precision), ``"nan"`` (non-finite
            values) or ``"failed"``.
        negative_curvature: (CG) some column met ``pᵀ A p <= 0``.
        direction: (CG) the direction ``p`` with ``pᵀ A p <= 0``, shaped like
            ``b`` with zeros in the columns that did not meet one; ``None`` when
            no column did.
        info: solver-specific extras (per-column flags, restart counts, ...).
        method: the method that produced the result (``"cg"``, ``"dense"``, ...,
            or a user callable's name).
        rhs_norm: ``‖b‖`` per column, shaped like ``residual_norm``.
    """

    x: Tensor
    converged: bool
    residual_norm: Tensor
    n_iter: int
    n_matvecs: int
    status: Status
    negative_curvature: bool = False
    direction: Tensor | None = None
    info: dict = field(default_factory=dict)
    method: str = ""
    rhs_norm: Tensor | None = None

    def __post_init__(self) -> None:
        self.status = Status.of(self.status)

    @property
    def relative_residual(self) -> Tensor:
        """``residual_norm / rhs_norm`` per column (``0`` for a zero right-hand side)."""
        r = self.residual_norm
        if self.rhs_norm is None:
            return torch.full_like(r, math.nan)
        safe = torch.where(self.rhs_norm > 0, self.rhs_norm, torch.ones_like(self.rhs_norm))
        return torch.where(self.rhs_norm > 0, r / safe, torch.zeros_like(r))

    @property
    def max_residual(self) -> float:
        """The largest residual norm over the columns, as a float (``nan`` where unknown)."""
        r = self.residual_norm
        return float(r.max()) if r.numel() else 0.0

    @property
    def max_relative_residual(self) -> float:
        """The largest relative residual over the columns, as a float."""
        r = self.relative_residual
        return float(r.max()) if r.numel() else 0.0


# --------------------------------------------------------------------------- #
# Input handling shared by the solvers
# --------------------------------------------------------------------------- #
@dataclass
class _System:
    """A validated linear system: ``op`` is ``(n, n)``, ``B`` and ``X0`` are ``(n, k)``."""

    op: LinearOperator
    B: Tensor
    X0: Tensor | None
    M: LinearOperator | None
    vector: bool  # b was 1-D
    n: int
    maxiter: int
    tol: float
    atol: float


def _check_nonneg(value: Any, name: str) -> float:
    if not isinstance(value, numbers.Real) and not (isinstance(value, Tensor) and value.ndim == 0):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not (v >= 0) or math.isinf(v):  # catches NaN too
        raise ValueError(f"{name} must be a finite number >= 0, got {v}")
    return v


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if int(value) < 1:
        raise ValueError(f"{name} must be >= 1, got {int(value)}")
    return int(value)


def _asymmetry(A: Tensor) -> float:
    """``max|A - Aᵀ| / max|A|`` of a square matrix (``0`` for a zero matrix)."""
    scale = float(A.abs().max()) if A.numel() else 0.0
    return float((A - A.T).abs().max()) / scale if scale > 0 else 0.0


def check_operator(
    A: Any,
    *,
    n: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    symmetric: bool = False,
    what: str = "solve",
    name: str = "A",
) -> LinearOperator:
    r"""The one input check for the operator of a linear solve or a Lanczos-type routine.

    ``A`` becomes a square :class:`~curvlab.linops.LinearOperator`:

    * a dense 2-D tensor must be square; when the method needs symmetry
      (``symmetric=True``: CG, MINRES, Lanczos, ...) it must be symmetric up to
      rounding, :math:`\max|A - A^\top| \le \sqrt{\varepsilon}\,\max|A|` (the
      test :func:`curvlab.spectrum.eigsh` applies), else a ``ValueError`` names the
      argument and suggests a method that does not need symmetry;
    * a :class:`~curvlab.linops.LinearOperator` must be square and, when symmetry
      is needed, tagged symmetric (an untagged dense operator is tested
      numerically as a tensor is);
    * a callable ``v -> A v`` gets its size from ``n`` and its dtype and device
      from ``dtype`` / ``device``; it carries no tag, so it is taken on the
      caller's word: as symmetric when the caller chose a method that needs
      symmetry, as general otherwise (:func:`~curvlab.linalg.solve` with
      ``method="auto"`` picks CG for a callable only with ``symmetric=True``).

    Args:
        A: the operator, a 2-D tensor or a matvec callable.
        n: the size of a callable.
        dtype: dtype of a callable's vectors.
        device: device of a callable's vectors.
        symmetric: the method needs a symmetric operator.
        what: the routine's name, for error messages.
        name: the argument's name, for error messages.

    Returns:
        The operator (tagged symmetric when ``symmetric`` and the checks passed).

    Raises:
        TypeError: ``A`` is neither an operator, a tensor nor callable.
        ValueError: not square, not symmetric where needed, a callable without a size.
    """
    if isinstance(A, Tensor):
        if A.ndim != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"{what}: {name} must be a square operator, got shape {tuple(A.shape)}")
        if not A.is_floating_point():
            raise ValueError(f"{what}: {name} must be a floating-point matrix, got dtype {A.dtype}")
        if symmetric:
            _require_symmetric(A, what, name)
        return DenseOperator(A, symmetric=True if symmetric else None)
    if isinstance(A, LinearOperator):
        if A.shape[0] != A.shape[1]:
            raise ValueError(f"{what}: {name} must be a square operator, got shape {A.shape}")
        if symmetric and not A.is_symmetric:
            if isinstance(A, DenseOperator):
                _require_symmetric(A.A, what, name)
                return DenseOperator(A.A, symmetric=True, psd=A.is_psd)
            raise ValueError(
                f"{what} needs a symmetric operator, but {name} ({type(A).__name__}, shape {A.shape}) is not tagged "
                "symmetric; build it with symmetric=True if it is, or use a method for general operators "
                "(curvlab.linalg.solve(A, b, method='gmres' or 'auto'))"
            )
        return A
    if callable(A):
        if n is None:
            raise ValueError(
                f"{what}: {name} is a matvec callable: its size must be known (pass n=, or a b of shape (n,))"
            )
        return aslinearoperator(A, shape=n, dtype=dtype, device=device, symmetric=symmetric, name=name)
    raise TypeError(
        f"{what}: {name} must be a LinearOperator, a 2-D tensor or a matvec callable, got {type(A).__name__}"
    )


def _require_symmetric(A: Tensor, what: str, name: str) -> None:
    rel = _asymmetry(A)
    if rel > float(torch.finfo(A.dtype).eps) ** 0.5:
        raise ValueError(
            f"{what} needs a symmetric matrix, but the tensor {name} is not symmetric (max|{name} - {name}ᵀ| = "
            f"{rel:.2e}·max|{name}|); use a method for general matrices (curvlab.linalg.gmres, or "
            f"curvlab.linalg.solve({name}, b, method='auto'))"
        )


def _square_operator(
    A: Any, n: int | None, dtype: torch.dtype, device: torch.device, symmetric: bool, what: str = "solve"
) -> LinearOperator:
    """``A`` as a square operator (:func:`check_operator`); a callable's size, dtype and device are given."""
    return check_operator(A, n=n, dtype=dtype, device=device, symmetric=symmetric, what=what)


def _as_preconditioner(M: Any, n: int, dtype: torch.dtype, device: torch.device) -> LinearOperator | None:
    if M is None:
        return None
    Mop = aslinearoperator(M, shape=n, dtype=dtype, device=device, symmetric=True, name="M")
    if Mop.shape != (n, n):
        raise ValueError(f"M must be an ({n}, {n}) operator like A, got shape {Mop.shape}")
    if Mop.dtype != dtype or Mop.device != device:
        raise ValueError(f"M must have A's dtype {dtype} and device {device}, got {Mop.dtype} on {Mop.device}")
    return Mop


def _prepare_system(
    A: Any,
    b: Any,
    *,
    x0: Any,
    tol: Any,
    atol: Any,
    maxiter: Any,
    M: Any,
    symmetric: bool,
    what: str = "solve",
) -> _System:
    """Validate the arguments every Krylov solver shares.

    A callable ``A`` gets its size, dtype and device from ``b``. ``tol=None`` is
    :func:`default_tol` of ``b``'s dtype; a ``tol`` below :func:`min_tol` is raised
    to it with a :class:`ToleranceWarning`.

    Raises:
        TypeError: ``b`` / ``x0`` not tensors, ``A`` / ``M`` of an unsupported type.
        ValueError: non-square ``A``, ``b`` or ``x0`` of the wrong shape, dtype or
            device, negative ``tol`` / ``atol``, ``maxiter < 1``.
    """
    if not isinstance(b, Tensor):
        raise TypeError(f"b must be a torch.Tensor, got {type(b).__name__}")
    if b.ndim not in (1, 2):
        raise ValueError(f"b must have shape (n,) or (n, k), got {tuple(b.shape)}")
    if not b.is_floating_point():
        raise ValueError(f"b must be a floating-point tensor, got dtype {b.dtype}")
    op = _square_operator(A, b.shape[0], b.dtype, b.device, symmetric, what)
    n = op.shape[0]
    if b.shape[0] != n:
        want = f"({n},) or ({n}, k)"
        raise ValueError(f"b must have shape {want} to match A of shape {op.shape}, got {tuple(b.shape)}")
    if b.dtype != op.dtype or b.device != op.device:
        raise ValueError(f"b must have A's dtype {op.dtype} and device {op.device}, got dtype {b.dtype} on {b.device}")
    tol_f = _resolve_tol(tol, b.dtype)
    atol_f = _check_nonneg(atol, "atol")
    if maxiter is None:
        maxiter_i = max(1, min(10 * n, _MAXITER_CAP))
    else:
        maxiter_i = _check_positive_int(maxiter, "maxiter")
    B = b if b.ndim == 2 else b.unsqueeze(1)
    X0 = None
    if x0 is not None:
        if not isinstance(x0, Tensor):
            raise TypeError(f"x0 must be a torch.Tensor, got {type(x0).__name__}")
        if x0.shape != b.shape:
            raise ValueError(f"x0 must have the shape of b, {tuple(b.shape)}, got {tuple(x0.shape)}")
        if x0.dtype != op.dtype or x0.device != op.device:
            raise ValueError(f"x0 must have A's dtype {op.dtype} and device {op.device}, got {x0.dtype} on {x0.device}")
        X0 = x0 if x0.ndim == 2 else x0.unsqueeze(1)
    Mop = _as_preconditioner(M, n, op.dtype, op.device)
    return _System(op, B, X0, Mop, b.ndim == 1, n, maxiter_i, tol_f, atol_f)


def _symmetric_operator(
    A: Any, n: int | None, dtype: torch.dtype | None, device: torch.device | str | None, what: str
) -> LinearOperator:
    """``A`` as a square symmetric operator (:func:`check_operator`); callables need ``n`` (checked by the caller)."""
    return check_operator(A, n=n, dtype=dtype, device=device, symmetric=True, what=what)


def _default_dtype_device(v0: Tensor | None, generator: torch.Generator | None) -> tuple[torch.dtype, torch.device]:
    if v0 is not None:
        return v0.dtype, v0.device
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.get_default_dtype(), device


def _check_n(A: Any, n: Any) -> int | None:
    if isinstance(A, (LinearOperator, Tensor)):
        return None
    if n is None:
        raise ValueError("A is a matvec callable: pass its size as n=")
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or int(n) < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    return int(n)


def _apply(M: LinearOperator | None, R: Tensor) -> Tensor:
    """``M R`` for an ``(n, k)`` block (``R`` itself without a preconditioner)."""
    return R if M is None else M.matmat(R)


def _colnorm(X: Tensor) -> Tensor:
    return torch.linalg.vector_norm(X, dim=0)


class _Columns:
    """Per-column bookkeeping for block solves that drop finished columns.

    ``out`` holds full-width buffers (last dimension ``k``); the solver keeps its
    working state compacted to the still-active columns, whose original indices
    are ``idx``. :meth:`write` scatters working values into the buffers and
    :meth:`keep` shrinks ``idx`` and the working state to the columns in a mask.
    """

    def __init__(self, k: int, device: torch.device, **buffers: Tensor) -> None:
        self.idx = torch.arange(k, device=device)
        self.k = k
        self.n_active = k
        self.out = buffers

    def write(self, **values: Tensor) -> None:
        for name, v in values.items():
            buf = self.out[name]
            if self.n_active == self.k:
                buf.copy_(v)
            else:
                buf[..., self.idx] = v

    def keep(self, mask: list[bool], state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Keep the columns where ``mask`` (a host list over active columns) is true."""
        if all(mask):
            return state
        sel = torch.tensor([i for i, m in enumerate(mask) if m], dtype=torch.long, device=self.idx.device)
        self.idx = self.idx[sel]
        self.n_active = len(sel)
        return {name: t[..., sel] for name, t in state.items()}

    def full(self, name: str, value: Tensor) -> Tensor:
        """The buffer ``name`` with the active columns replaced by ``value`` (a fresh tensor)."""
        buf = self.out[name].clone()
        buf[..., self.idx] = value
        return buf


@dataclass
class _Raw:
    """What a Krylov core returns for ``(n, k)`` blocks, before verification and packaging."""

    X: Tensor
    rnorm: Tensor
    conv: Tensor
    flags: dict[str, Tensor]
    n_iter: int
    n_matvecs: int
    anorm: Tensor  # a lower estimate of ‖A‖ (max ‖A p‖ / ‖p‖ seen), 0 when unknown
    direction: Tensor | None = None
    info: dict = field(default_factory=dict)
    exclude: Tensor | None = None  # converged columns not judged by their residual (least-squares solutions)


#: Residual-replacement restarts a solve may take when its recurrence residual drifted from the true one.
_MAX_RESTARTS = 3


def _verified(sys: _System, core: Any, method: str, restarts: int = _MAX_RESTARTS) -> KrylovResult:
    r"""Run ``core(sys)`` and make ``converged`` true of the true residual :math:`\|b - A x\|`.

    A Krylov recurrence carries its residual; in floating point it drifts from the
    true one by up to about :math:`\varepsilon\, k\, (\|A\|\|x\| + \|b\|)` after
    ``k`` steps (Greenbaum 1997, "Estimating the attainable accuracy of recursively
    computed residual methods", SIAM J. Matrix Anal. Appl. 18(3)). Where that
    bound, with the norm estimate the iteration saw, exceeds a tenth of a
    converged column's threshold, the true residual is formed with one block
    product (counted in ``n_matvecs``; ``info["residual_checks"]`` counts them)
    and reported. A column that fails is restarted from its iterate with the true
    residual (residual replacement; up to ``restarts`` times, within ``maxiter``);
    one whose true residual stops halving, or runs out of restarts, is reported
    not converged with status ``"stalled"``.
    """
    raw = core(sys)
    op = sys.op
    n_iter, n_matvecs = raw.n_iter, raw.n_matvecs
    X, rnorm, conv = raw.X.clone(), raw.rnorm.clone(), raw.conv.clone()
    flags = {k: v.clone() for k, v in raw.flags.items()}
    direction = raw.direction.clone() if raw.direction is not None else None
    stalled = torch.zeros_like(conv)
    eps = float(torch.finfo(sys.B.dtype).eps)
    bnorm = _colnorm(sys.B)
    thresh = torch.clamp(sys.tol * bnorm, min=sys.atol)
    candidates = conv if raw.exclude is None else conv & ~raw.exclude
    prev_true = torch.full_like(rnorm, math.inf)
    it_last, anorm = raw.n_iter, raw.anorm
    checks = n_restarts = 0
    while it_last > 0:
        # the bound with k = n (not the iteration count, which check_every rounds up): deterministic
        drift = eps * sys.n * (anorm * _colnorm(X) + bnorm)
        idx = torch.nonzero(candidates & (drift > 0.1 * thresh)).flatten()
        if idx.numel() == 0:
            break
        start = op.n_matvecs
        true = _colnorm(sys.B[:, idx] - op.matmat(X[:, idx]))
        n_matvecs += op.n_matvecs - start
        checks += 1
        rnorm[idx] = true
        failed = true > thresh[idx]
        no_progress = failed & (true > 0.5 * prev_true[idx])
        prev_true[idx] = true
        give_up = no_progress | failed & (n_restarts >= restarts or n_iter >= sys.maxiter)
        conv[idx[failed]] = False
        stalled[idx[give_up]] = True
        bad = idx[failed & ~give_up]
        if bad.numel() == 0:
            break
        n_restarts += 1
        sub = _System(op, sys.B[:, bad], X[:, bad], sys.M, sys.vector, sys.n, sys.maxiter - n_iter, sys.tol, sys.atol)
        r2 = core(sub)
        n_iter += r2.n_iter
        n_matvecs += r2.n_matvecs
        X[:, bad], rnorm[bad], conv[bad] = r2.X, r2.rnorm, r2.conv
        for name, f in r2.flags.items():
            flags[name][bad] = f
        if direction is not None and r2.direction is not None:
            direction[:, bad] = r2.direction
        candidates = torch.zeros_like(conv)
        candidates[bad] = r2.conv if r2.exclude is None else r2.conv & ~r2.exclude
        it_last, anorm = r2.n_iter, torch.maximum(anorm, r2.anorm)
    info = dict(raw.info)
    info["residual_checks"] = checks
    info["restarts_for_residual"] = n_restarts
    info["anorm"] = float(anorm)  # the largest ‖A p‖ / ‖p‖ seen: a lower estimate of ‖A‖₂
    return _finish(
        sys,
        X,
        rnorm,
        conv,
        n_iter=n_iter,
        n_matvecs=n_matvecs,
        status_flags={**flags, "stalled": stalled},
        info=info,
        direction=direction,
        method=method,
    )


def _finish(
    sys: _System,
    X: Tensor,
    rnorm: Tensor,
    converged: Tensor,
    *,
    n_iter: int,
    n_matvecs: int,
    status_flags: dict[str, Tensor],
    info: dict | None = None,
    direction: Tensor | None = None,
    method: str = "",
) -> KrylovResult:
    """Assemble a :class:`KrylovResult` from ``(n, k)`` / ``(k,)`` tensors (one host sync)."""
    all_conv = bool(converged.all())
    negc = status_flags.get("negative_curvature")
    brk = status_flags.get("breakdown")
    stl = status_flags.get("stalled")
    any_negc = bool(negc.any()) if negc is not None else False
    if all_conv:
        status = Status.CONVERGED
    elif not bool(torch.isfinite(X).all()) or not bool(torch.isfinite(rnorm).all()):
        status = Status.NAN
    elif any_negc:
        status = Status.NEGATIVE_CURVATURE
    elif brk is not None and bool(brk.any()):
        status = Status.BREAKDOWN
    elif stl is not None and bool(stl.any()):
        status = Status.STALLED
    else:
        status = Status.MAX_ITER
    info = dict(info or {})

    def shape(t: Tensor) -> Tensor:
        return t[..., 0] if sys.vector else t

    info["converged_columns"] = shape(converged)
    for name, flags in status_flags.items():
        info[f"{name}_columns"] = shape(flags)
    return KrylovResult(
        x=shape(X),
        converged=all_conv,
        residual_norm=shape(rnorm),
        n_iter=int(n_iter),
        n_matvecs=int(n_matvecs),
        status=status,
        negative_curvature=any_negc,
        direction=shape(direction) if (direction is not None and any_negc) else None,
        info=info,
        method=method,
        rhs_norm=shape(_colnorm(sys.B)),
    )
