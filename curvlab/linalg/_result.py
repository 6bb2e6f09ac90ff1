"""Result container of the Krylov solvers and the input handling the routines share.

:class:`KrylovResult` is what :func:`~curvlab.linalg.cg`,
:func:`~curvlab.linalg.minres` and :func:`~curvlab.linalg.gmres` return. The
private helpers below turn the user's ``A``, ``b``, ``x0`` and ``M`` into
operators and ``(n, k)`` blocks once, with one set of error messages (also
used by :func:`~curvlab.linalg.lanczos` and the randomized routines), and keep
the per-column bookkeeping of block solves (columns that finish are written
out and dropped from the working set) in one place.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from curvlab.linops._base import LinearOperator, aslinearoperator

__all__ = ["KrylovResult"]

#: Upper bound of the default iteration cap (``min(10 n, _MAXITER_CAP)``).
_MAXITER_CAP = 10_000


@dataclass
class KrylovResult:
    """Outcome of a Krylov solve of ``A x = b``.

    Attributes:
        x: the solution, shaped like ``b`` (``(n,)`` or ``(n, k)``).
        converged: every column reached its tolerance.
        residual_norm: ``‖b - A x‖`` per column: shape ``()`` for a 1-D ``b``,
            ``(k,)`` for a matrix ``b``. Each solver documents whether this is
            the true residual or the one its recurrence carries.
        n_iter: iterations taken (the most any column took).
        n_matvecs: products with ``A`` used (a ``k``-column block product counts
            ``k``; preconditioner applications are not counted).
        status: ``"converged"``, ``"maxiter"``, ``"negative_curvature"`` or
            ``"breakdown"``.
        negative_curvature: (CG) some column met ``pᵀ A p <= 0``.
        direction: (CG) the direction ``p`` with ``pᵀ A p <= 0``, shaped like
            ``b`` with zeros in the columns that did not meet one; ``None`` when
            no column did.
        info: solver-specific extras (per-column flags, restart counts, ...).
    """

    x: Tensor
    converged: bool
    residual_norm: Tensor
    n_iter: int
    n_matvecs: int
    status: str
    negative_curvature: bool = False
    direction: Tensor | None = None
    info: dict = field(default_factory=dict)


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


def _check_square_tensor(A: Any) -> None:
    """Reject a non-square matrix before it is wrapped (with a symmetric tag, say)."""
    if isinstance(A, Tensor) and A.ndim == 2 and A.shape[0] != A.shape[1]:
        raise ValueError(f"A must be a square operator, got shape {tuple(A.shape)}")


def _square_operator(
    A: Any, n: int | None, dtype: torch.dtype, device: torch.device, symmetric: bool
) -> LinearOperator:
    """``A`` as a square operator; for a callable ``n``, ``dtype`` and ``device`` give its size and vectors."""
    _check_square_tensor(A)
    op = aslinearoperator(A, shape=n, dtype=dtype, device=device, symmetric=symmetric, name="A")
    if op.shape[0] != op.shape[1]:
        raise ValueError(f"A must be a square operator, got shape {op.shape}")
    return op


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
) -> _System:
    """Validate the arguments every Krylov solver shares.

    A callable ``A`` gets its size, dtype and device from ``b``.

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
    op = _square_operator(A, b.shape[0], b.dtype, b.device, symmetric)
    n = op.shape[0]
    if b.shape[0] != n:
        want = f"({n},) or ({n}, k)"
        raise ValueError(f"b must have shape {want} to match A of shape {op.shape}, got {tuple(b.shape)}")
    if b.dtype != op.dtype or b.device != op.device:
        raise ValueError(f"b must have A's dtype {op.dtype} and device {op.device}, got dtype {b.dtype} on {b.device}")
    tol_f = _check_nonneg(tol, "tol")
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
    """``A`` as a square symmetric operator; callables need ``n`` (checked by the caller)."""
    if isinstance(A, LinearOperator) and not A.is_symmetric:
        raise ValueError(
            f"{what} needs a symmetric operator, but A (shape {A.shape}) is not tagged symmetric; "
            "build it with symmetric=True if it is"
        )
    _check_square_tensor(A)
    op = aslinearoperator(A, shape=n, dtype=dtype, device=device, symmetric=True, name="A")
    if op.shape[0] != op.shape[1]:
        raise ValueError(f"A must be a square operator, got shape {op.shape}")
    return op


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
) -> KrylovResult:
    """Assemble a :class:`KrylovResult` from ``(n, k)`` / ``(k,)`` tensors (one host sync)."""
    all_conv = bool(converged.all())
    negc = status_flags.get("negative_curvature")
    brk = status_flags.get("breakdown")
    any_negc = bool(negc.any()) if negc is not None else False
    if all_conv:
        status = "converged"
    elif any_negc:
        status = "negative_curvature"
    elif brk is not None and bool(brk.any()):
        status = "breakdown"
    else:
        status = "maxiter"
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
    )
