"""The torch-native matrix-free :class:`LinearOperator` and its algebra."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "LinearOperator",
    "MatvecOperator",
    "DenseOperator",
    "IdentityOperator",
    "aslinearoperator",
]


class LinearOperator:
    r"""A linear map :math:`A \in \mathbb{R}^{m \times n}` known only through products.

    Subclasses implement :meth:`_matvec` (and, where they can do better than a
    loop, :meth:`_matmat`; for non-symmetric operators :meth:`_rmatvec`).
    Everything else — validation, counting, the algebra (``@``, ``+``, ``-``,
    scalar ``*``, ``.T``, :meth:`damped`), :meth:`to_dense`, :meth:`to_scipy` —
    is shared.

    Args:
        shape: ``(m, n)``.
        dtype: dtype of the vectors the operator acts on.
        device: device of those vectors.
        symmetric: the operator is symmetric (``A = Aᵀ``; implies ``m == n``).
        psd: the operator is symmetric positive semidefinite.

    Attributes:
        n_matvecs: number of vector products taken so far (a matmat with ``k``
            columns counts ``k``; transposed products count too).
    """

    def __init__(
        self,
        shape: tuple[int, int],
        dtype: torch.dtype,
        device: torch.device | str,
        *,
        symmetric: bool = False,
        psd: bool = False,
    ) -> None:
        m, n = (int(s) for s in shape)
        if (symmetric or psd) and m != n:
            raise ValueError(f"a symmetric operator must be square, got shape {(m, n)}")
        self.shape = (m, n)
        self.dtype = dtype
        self.device = torch.device(device)
        self.is_symmetric = bool(symmetric or psd)
        self.is_psd = bool(psd)
        self.n_matvecs = 0

    @property
    def distributed(self) -> bool:
        """Whether products are collectives over a data-parallel process group (:mod:`curvlab.distributed`).

        True for an operator over a dataset created under a process group, and for any
        operator built from one (sums, scalings, products, transposes, restrictions):
        routines that draw random vectors then draw the same ones on every rank.
        """
        return any(_is_distributed_op(v) for v in vars(self).values())

    # ---------------------------------------------------------------- hooks
    def _matvec(self, v: Tensor) -> Tensor:
        raise NotImplementedError

    def _matmat(self, V: Tensor) -> Tensor:
        return torch.stack([self._matvec(V[:, j]) for j in range(V.shape[1])], dim=1)

    def _rmatvec(self, u: Tensor) -> Tensor:
        if self.is_symmetric:
            return self._matvec(u)
        raise NotImplementedError(f"{type(self).__name__} does not implement transposed products")

    def _rmatmat(self, U: Tensor) -> Tensor:
        if self.is_symmetric:
            return self._matmat(U)
        return torch.stack([self._rmatvec(U[:, j]) for j in range(U.shape[1])], dim=1)

    # ------------------------------------------------------------- products
    def _check(self, v: Tensor, n: int, what: str, ndim: int) -> None:
        if not isinstance(v, Tensor):
            raise TypeError(f"{what} expects a torch.Tensor, got {type(v).__name__}")
        if v.ndim != ndim or v.shape[0] != n:
            want = f"({n},)" if ndim == 1 else f"({n}, k)"
            raise ValueError(f"{what}: expected a tensor of shape {want}, got {tuple(v.shape)}")

    def matvec(self, v: Tensor) -> Tensor:
        """``A @ v`` for a vector ``v`` of shape ``(n,)``."""
        self._check(v, self.shape[1], "matvec", 1)
        self.n_matvecs += 1
        return self._matvec(v.to(self.dtype))

    def matmat(self, V: Tensor) -> Tensor:
        """``A @ V`` for ``V`` of shape ``(n, k)`` (batched over the columns)."""
        self._check(V, self.shape[1], "matmat", 2)
        self.n_matvecs += V.shape[1]
        if V.shape[1] == 0:
            return V.new_zeros(self.shape[0], 0)
        return self._matmat(V.to(self.dtype))

    def rmatvec(self, u: Tensor) -> Tensor:
        """``Aᵀ @ u`` for ``u`` of shape ``(m,)``."""
        self._check(u, self.shape[0], "rmatvec", 1)
        self.n_matvecs += 1
        return self._rmatvec(u.to(self.dtype))

    def rmatmat(self, U: Tensor) -> Tensor:
        """``Aᵀ @ U`` for ``U`` of shape ``(m, k)``."""
        self._check(U, self.shape[0], "rmatmat", 2)
        self.n_matvecs += U.shape[1]
        return self._rmatmat(U.to(self.dtype))

    def reset_counter(self) -> None:
        """Set :attr:`n_matvecs` back to zero."""
        self.n_matvecs = 0

    def __matmul__(self, other: Any) -> Any:
        if isinstance(other, LinearOperator):
            return _ProductOperator(self, other)
        if isinstance(other, Tensor):
            return self.matvec(other) if other.ndim == 1 else self.matmat(other)
        return NotImplemented

    def __rmatmul__(self, other: Any) -> Any:
        if isinstance(other, Tensor):  # u @ A = (Aᵀ u)ᵀ
            if other.ndim == 1:
                return self.rmatvec(other)
            return self.rmatmat(other.T).T
        return NotImplemented

    __call__ = matvec

    # --------------------------------------------------------------- algebra
    def __add__(self, other: Any) -> LinearOperator:
        if isinstance(other, LinearOperator):
            return _SumOperator([self, other])
        return NotImplemented

    def __sub__(self, other: Any) -> LinearOperator:
        if isinstance(other, LinearOperator):
            return _SumOperator([self, _ScaledOperator(other, -1.0)])
        return NotImplemented

    def __mul__(self, alpha: Any) -> LinearOperator:
        if isinstance(alpha, numbers.Real) or (isinstance(alpha, Tensor) and alpha.ndim == 0):
            return _ScaledOperator(self, alpha)
        return NotImplemented

    __rmul__ = __mul__

    def __truediv__(self, alpha: Any) -> LinearOperator:
        if isinstance(alpha, numbers.Real) or (isinstance(alpha, Tensor) and alpha.ndim == 0):
            return _ScaledOperator(self, 1.0 / alpha)
        return NotImplemented

    def __neg__(self) -> LinearOperator:
        return _ScaledOperator(self, -1.0)

    @property
    def T(self) -> LinearOperator:  # noqa: N802 - matches torch / numpy
        """The transposed operator (the operator itself when symmetric)."""
        if self.is_symmetric:
            return self
        return _TransposedOperator(self)

    def damped(self, lam: float | Tensor) -> LinearOperator:
        """``A + lam·I`` (square operators only); stays PSD when ``A`` is PSD and ``lam >= 0``."""
        if self.shape[0] != self.shape[1]:
            raise ValueError(f"damped() needs a square operator, got shape {self.shape}")
        lam_f = float(lam)
        if not np.isfinite(lam_f):
            raise ValueError(f"lam must be finite, got {lam_f}")
        return _SumOperator([self, IdentityOperator(self.shape[0], self.dtype, self.device, scale=lam)])

    # ----------------------------------------------------------- conversion
    def to_dense(self) -> Tensor:
        """The dense ``(m, n)`` matrix, by products with the identity (small operators only)."""
        eye = torch.eye(self.shape[1], dtype=self.dtype, device=self.device)
        return self.matmat(eye)

    def to_scipy(self) -> Any:
        """A :class:`scipy.sparse.linalg.LinearOperator` acting on NumPy arrays (CPU interop).

        Vectors go to the operator's device and dtype and come back as NumPy
        arrays; scipy routines such as ``eigsh`` and ``cg`` accept it directly.
        """
        from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator

        np_dtype = torch.empty((), dtype=self.dtype).numpy().dtype

        def _to_t(x: np.ndarray) -> Tensor:
            return torch.as_tensor(np.ascontiguousarray(x), device=self.device).to(self.dtype)

        def mv(x: np.ndarray) -> np.ndarray:
            return self.matvec(_to_t(x).reshape(-1)).detach().cpu().numpy()

        def rmv(x: np.ndarray) -> np.ndarray:
            return self.rmatvec(_to_t(x).reshape(-1)).detach().cpu().numpy()

        def mm(X: np.ndarray) -> np.ndarray:
            return self.matmat(_to_t(X)).detach().cpu().numpy()

        def rmm(X: np.ndarray) -> np.ndarray:
            return self.rmatmat(_to_t(X)).detach().cpu().numpy()

        return ScipyLinearOperator(self.shape, matvec=mv, rmatvec=rmv, matmat=mm, rmatmat=rmm, dtype=np_dtype)

    def __repr__(self) -> str:
        tags = [t for t, on in (("symmetric", self.is_symmetric), ("psd", self.is_psd)) if on]
        return (
            f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, device={self.device}"
            + (f", {', '.join(tags)}" if tags else "")
            + ")"
        )


# --------------------------------------------------------------------------- #
# Generic concrete operators
# --------------------------------------------------------------------------- #
def _is_distributed_op(v: Any) -> bool:
    if isinstance(v, LinearOperator):
        return v.distributed
    if isinstance(v, (list, tuple)):
        return any(isinstance(o, LinearOperator) and o.distributed for o in v)
    return False


class MatvecOperator(LinearOperator):
    """An operator from user callables ``matvec(v)`` (and optionally ``rmatvec``, ``matmat``).

    Args:
        matvec: ``v -> A v`` on tensors of shape ``(n,)``.
        shape: ``(m, n)``; an ``int`` means square.
        dtype, device: of the vectors (default float32 / CPU).
        rmatvec: ``u -> Aᵀ u`` (optional).
        matmat: ``V -> A V`` for ``(n, k)`` inputs (optional; default loops).
        symmetric, psd: tags.
    """

    def __init__(
        self,
        matvec: Callable[[Tensor], Tensor],
        shape: int | tuple[int, int],
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        *,
        rmatvec: Callable[[Tensor], Tensor] | None = None,
        matmat: Callable[[Tensor], Tensor] | None = None,
        symmetric: bool = False,
        psd: bool = False,
    ) -> None:
        if not callable(matvec):
            raise TypeError(f"matvec must be callable, got {type(matvec).__name__}")
        if isinstance(shape, numbers.Integral):
            shape = (int(shape), int(shape))
        super().__init__(shape, dtype or torch.get_default_dtype(), device or "cpu", symmetric=symmetric, psd=psd)
        self._mv, self._rmv, self._mm = matvec, rmatvec, matmat

    def _matvec(self, v: Tensor) -> Tensor:
        return self._mv(v)

    def _matmat(self, V: Tensor) -> Tensor:
        return self._mm(V) if self._mm is not None else super()._matmat(V)

    def _rmatvec(self, u: Tensor) -> Tensor:
        if self._rmv is not None:
            return self._rmv(u)
        return super()._rmatvec(u)


class DenseOperator(LinearOperator):
    """Wraps a dense matrix (for tests, small problems and user-supplied matrices).

    Args:
        A: a 2-D tensor.
        symmetric, psd: tags; ``symmetric=None`` checks symmetry numerically.
    """

    def __init__(self, A: Tensor, *, symmetric: bool | None = None, psd: bool = False) -> None:
        if not isinstance(A, Tensor) or A.ndim != 2:
            raise ValueError(f"A must be a 2-D tensor, got {getattr(A, 'shape', type(A).__name__)}")
        if symmetric is None:
            symmetric = A.shape[0] == A.shape[1] and _numerically_symmetric(A)
        super().__init__(tuple(A.shape), A.dtype, A.device, symmetric=symmetric, psd=psd)
        self.A = A

    def _matvec(self, v: Tensor) -> Tensor:
        return self.A @ v

    def _matmat(self, V: Tensor) -> Tensor:
        return self.A @ V

    def _rmatvec(self, u: Tensor) -> Tensor:
        return self.A.T @ u

    def _rmatmat(self, U: Tensor) -> Tensor:
        return self.A.T @ U

    def to_dense(self) -> Tensor:
        return self.A


def _numerically_symmetric(A: Tensor) -> bool:
    """``A == Aᵀ`` up to the rounding of forming it: ``max|A - Aᵀ| <= 10 n eps max|A|``.

    A purely elementwise relative test rejects matrices such as ``Q @ diag(d) @ Q.T``,
    whose near-zero entries carry rounding errors of the size of the whole matrix.
    """
    if not A.is_floating_point():
        return bool(torch.equal(A, A.T))
    eps = torch.finfo(A.dtype).eps
    scale = float(A.abs().max()) if A.numel() else 0.0
    return bool((A - A.T).abs().max() <= 10 * A.shape[0] * eps * scale) if A.numel() else True


class IdentityOperator(LinearOperator):
    """``scale · I`` of size ``n``."""

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device | str, scale: float | Tensor = 1.0) -> None:
        super().__init__((n, n), dtype, device, symmetric=True, psd=bool(float(scale) >= 0))
        self.scale = scale

    def _matvec(self, v: Tensor) -> Tensor:
        return self.scale * v

    def _matmat(self, V: Tensor) -> Tensor:
        return self.scale * V


# --------------------------------------------------------------------------- #
# Algebra nodes
# --------------------------------------------------------------------------- #
def _join_dtype(ops: list[LinearOperator]) -> torch.dtype:
    dt = ops[0].dtype
    for o in ops[1:]:
        if o.dtype != dt:
            raise ValueError(f"cannot combine operators of dtypes {dt} and {o.dtype}")
        if o.device != ops[0].device:
            raise ValueError(f"cannot combine operators on devices {ops[0].device} and {o.device}")
    return dt


class _SumOperator(LinearOperator):
    def __init__(self, ops: list[LinearOperator]) -> None:
        flat: list[LinearOperator] = []
        for o in ops:
            flat.extend(o.ops if isinstance(o, _SumOperator) else [o])
        shapes = {o.shape for o in flat}
        if len(shapes) != 1:
            raise ValueError(f"cannot add operators of shapes {sorted(shapes)}")
        super().__init__(
            flat[0].shape,
            _join_dtype(flat),
            flat[0].device,
            symmetric=all(o.is_symmetric for o in flat),
            psd=all(o.is_psd for o in flat),
        )
        self.ops = flat

    def _matvec(self, v: Tensor) -> Tensor:
        out = self.ops[0].matvec(v)
        for o in self.ops[1:]:
            out = out + o.matvec(v)
        return out

    def _matmat(self, V: Tensor) -> Tensor:
        out = self.ops[0].matmat(V)
        for o in self.ops[1:]:
            out = out + o.matmat(V)
        return out

    def _rmatvec(self, u: Tensor) -> Tensor:
        out = self.ops[0].rmatvec(u)
        for o in self.ops[1:]:
            out = out + o.rmatvec(u)
        return out

    def _rmatmat(self, U: Tensor) -> Tensor:
        out = self.ops[0].rmatmat(U)
        for o in self.ops[1:]:
            out = out + o.rmatmat(U)
        return out


class _ScaledOperator(LinearOperator):
    def __init__(self, op: LinearOperator, alpha: float | Tensor) -> None:
        a = float(alpha)
        super().__init__(op.shape, op.dtype, op.device, symmetric=op.is_symmetric, psd=op.is_psd and a >= 0)
        self.op, self.alpha = op, alpha

    def _matvec(self, v: Tensor) -> Tensor:
        return self.alpha * self.op.matvec(v)

    def _matmat(self, V: Tensor) -> Tensor:
        return self.alpha * self.op.matmat(V)

    def _rmatvec(self, u: Tensor) -> Tensor:
        return self.alpha * self.op.rmatvec(u)

    def _rmatmat(self, U: Tensor) -> Tensor:
        return self.alpha * self.op.rmatmat(U)


class _ProductOperator(LinearOperator):
    def __init__(self, a: LinearOperator, b: LinearOperator) -> None:
        if a.shape[1] != b.shape[0]:
            raise ValueError(f"cannot multiply operators of shapes {a.shape} and {b.shape}")
        _join_dtype([a, b])
        super().__init__((a.shape[0], b.shape[1]), a.dtype, a.device)
        self.a, self.b = a, b

    def _matvec(self, v: Tensor) -> Tensor:
        return self.a.matvec(self.b.matvec(v))

    def _matmat(self, V: Tensor) -> Tensor:
        return self.a.matmat(self.b.matmat(V))

    def _rmatvec(self, u: Tensor) -> Tensor:
        return self.b.rmatvec(self.a.rmatvec(u))

    def _rmatmat(self, U: Tensor) -> Tensor:
        return self.b.rmatmat(self.a.rmatmat(U))


class _TransposedOperator(LinearOperator):
    def __init__(self, op: LinearOperator) -> None:
        super().__init__((op.shape[1], op.shape[0]), op.dtype, op.device)
        self.op = op

    def _matvec(self, v: Tensor) -> Tensor:
        return self.op.rmatvec(v)

    def _matmat(self, V: Tensor) -> Tensor:
        return self.op.rmatmat(V)

    def _rmatvec(self, u: Tensor) -> Tensor:
        return self.op.matvec(u)

    def _rmatmat(self, U: Tensor) -> Tensor:
        return self.op.matmat(U)

    @property
    def T(self) -> LinearOperator:  # noqa: N802
        return self.op


def aslinearoperator(
    A: Any,
    shape: int | tuple[int, int] | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    symmetric: bool | None = None,
    psd: bool = False,
    name: str = "A",
) -> LinearOperator:
    """Turn ``A`` into a :class:`LinearOperator`.

    Args:
        A: a :class:`LinearOperator` (returned as is), a 2-D tensor, or a
            callable ``matvec(v)``; a callable needs ``shape``.
        shape: size for a callable (``int`` for square).
        dtype, device: for a callable (default: float32 / CPU).
        symmetric: tag for a callable or a tensor (``None``: tensors are
            checked numerically, callables are taken as general).
        psd: positive-semidefinite tag for a callable or a tensor.
        name: the argument's name for error messages.

    Returns:
        The operator.

    Raises:
        TypeError: if ``A`` is none of the above.
        ValueError: if a callable comes without ``shape``.
    """
    if isinstance(A, LinearOperator):
        return A
    if isinstance(A, Tensor):
        if A.ndim != 2:
            raise ValueError(f"{name} must be a 2-D tensor (a matrix), got shape {tuple(A.shape)}")
        return DenseOperator(A, symmetric=symmetric, psd=psd)
    if callable(A):
        if shape is None:
            raise ValueError(f"{name} is a matvec callable: pass its size as shape=n or shape=(m, n)")
        return MatvecOperator(A, shape, dtype, device, symmetric=bool(symmetric), psd=psd)
    raise TypeError(f"{name} must be a LinearOperator, a 2-D tensor or a matvec callable, got {type(A).__name__}")
