r"""The ``solve`` argument of :mod:`implicit`: a method of :func:`curvlab.linalg.solve` or a callable.

Implicit differentiation (Blondel et al. 2021, eqs. (2)–(4)) needs one linear
solve with :math:`A = \partial_y F(y^*, \theta)` per derivative. The solve
itself is :func:`curvlab.linalg.solve` — the one linear-solve registry — and
this module only adds what is implicit's own: the ``nonconvergence`` policy
(warn / raise / ignore) and the record of the latest solve.

The old names ``SOLVES``, ``LinearSolveInfo`` and ``solve_cg`` … ``solve_dense``
remain as deprecated aliases of :func:`curvlab.linalg.solve` /
:class:`curvlab.linalg.KrylovResult`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from curvlab import linalg
from curvlab.linalg import KrylovResult
from curvlab.linops import LinearOperator
from curvlab.status import Status

__all__ = ["LinearSolveError", "LinearSolveWarning", "LinearSolver"]

#: Options every built-in method takes (besides its own, :data:`curvlab.linalg.METHODS`).
_COMMON = ("x0", "tol", "atol", "maxiter", "M", "damping")
#: Methods whose products include ``Aᵀ``.
_NEEDS_TRANSPOSE = {"normal_cg"}
#: ``curvlab.linalg.solve(method="auto")``'s default ``dense_max`` (tests/implicit check that they agree).
_AUTO_DENSE_MAX = 256
#: Methods that treat ``A`` as symmetric (the operator is tagged so on the caller's word).
_SYMMETRIC = {"cg", "minres"}


class LinearSolveError(RuntimeError):
    """The linear solve of an implicit derivative did not converge.

    Attributes:
        info: the :class:`~curvlab.linalg.KrylovResult` of the failed solve.
    """

    def __init__(self, message: str, info: KrylovResult) -> None:
        super().__init__(message)
        self.info = info


class LinearSolveWarning(RuntimeWarning):
    """Warning category for linear solves that did not converge."""


class LinearSolver:
    """A resolved ``solve`` argument: a :func:`curvlab.linalg.solve` method with options, or a user callable.

    Args:
        solve: a method name of :func:`curvlab.linalg.solve` or a callable ``solve(matvec, b, **options) -> x``.
        options: its options (checked against the method's: ``tol``, ``maxiter``, ``alpha``, ...).
            ``ridge`` is a deprecated alias of ``damping``.
        nonconvergence: ``"warn"``, ``"raise"`` or ``"ignore"``.
        symmetric: what is known of ``A``'s symmetry (``True`` for ``F = ∇_y g``); passed to
            ``"auto"`` as its ``symmetric`` option unless the options set one.

    Attributes:
        last: the :class:`~curvlab.linalg.KrylovResult` of the latest solve (``None`` before any).

    Raises:
        ValueError: unknown name or ``nonconvergence`` value.
        TypeError: ``solve`` neither a name nor callable, or an unknown option.
    """

    def __init__(
        self,
        solve: str | Callable[..., Any],
        options: dict[str, Any],
        nonconvergence: str = "warn",
        symmetric: bool | None = None,
    ) -> None:
        if nonconvergence not in ("warn", "raise", "ignore"):
            raise ValueError(f"nonconvergence must be 'warn', 'raise' or 'ignore', got {nonconvergence!r}")
        self.nonconvergence = nonconvergence
        self.options = dict(options)
        if "ridge" in self.options:
            warnings.warn(
                "the solve option 'ridge' is deprecated; use 'damping' (the same λ: A + λI)",
                DeprecationWarning,
                stacklevel=3,
            )
            self.options.setdefault("damping", self.options.pop("ridge"))
            self.options.pop("ridge", None)
        self.last: KrylovResult | None = None
        if isinstance(solve, str):
            if solve not in linalg.METHODS:
                raise ValueError(f"unknown solve {solve!r}; choose one of {sorted(linalg.METHODS)} or pass a callable")
            allowed = [*_COMMON, *linalg.METHODS[solve]]
            for k in self.options:
                if k not in allowed:
                    raise TypeError(f"solve={solve!r} has no option {k!r}; its options are {allowed}")
            self.name = solve
            self.user = False
        elif callable(solve):
            self.name = getattr(solve, "__name__", type(solve).__name__)
            self.user = True
        else:
            raise TypeError(
                f"solve must be a name in {sorted(linalg.METHODS)} or a callable solve(matvec, b), got {solve!r}"
            )
        self.method = solve
        if symmetric is not None and not self.user and "symmetric" in linalg.METHODS[self.name]:
            self.options.setdefault("symmetric", symmetric)

    @property
    def needs_transpose(self) -> bool:
        """The method takes products with ``Aᵀ`` as well as with ``A``."""
        return (not self.user) and self.name in _NEEDS_TRANSPOSE

    @property
    def symmetric(self) -> bool:
        """The operator may be tagged symmetric: a symmetric method was chosen, or symmetry is known."""
        return (not self.user) and (self.name in _SYMMETRIC or self.options.get("symmetric") is True)

    def __call__(self, op: LinearOperator, b: Tensor) -> Tensor:
        """Solve ``op x = b`` (``b`` of shape ``(n,)`` or ``(n, k)``), record and check the outcome."""
        res = linalg.solve(op, b, self.method, **self.options)
        self.last = res
        self.check(res)
        return res.x

    def factors(self, n: int) -> bool:
        """This solver factors an ``n``-by-``n`` system densely (``"dense"``, or ``"auto"`` with a small ``n``).

        The callers then form ``A`` (with ``B``) in one batched pass themselves and hand
        :func:`curvlab.linalg.solve` the matrix: the same method, one backward pass fewer.
        """
        if self.user or self.options.get("M") is not None:
            return False
        if self.name == "dense":
            return True
        if self.name != "auto":
            return False
        limit = self.options.get("dense_max", _AUTO_DENSE_MAX)
        return isinstance(limit, int) and not isinstance(limit, bool) and n <= limit

    def solve_matrix(self, A: Tensor, b: Tensor, symmetric: bool) -> Tensor:
        """Solve with the dense matrix ``A`` (formed by the caller with ``n`` products), record and check."""
        options = self.options
        if options.get("symmetric") is None:  # symmetric only when known: Cholesky, else LU (no numerical test)
            options = {**options, "symmetric": bool(symmetric)}
        res = linalg.solve(A, b, self.method, **options)
        res.n_matvecs = A.shape[0]  # the n products of the batched pass that formed A
        self.last = res
        self.check(res)
        return res.x

    # --------------------------------------------------------------- jit=True
    def traced_damping(self, dtype: torch.dtype) -> float | None:
        """The damping a traced dense solve adds (``0.0`` for none); ``None`` if a traced solve cannot stand
        in for :meth:`solve_matrix` (options it does not model: a tolerance below what ``dtype`` resolves)."""
        tol = self.options.get("tol")
        if tol is not None and (not isinstance(tol, (int, float)) or 0 < tol < linalg.min_tol(dtype)):
            return None
        damping = self.options.get("damping", 0.0)
        return float(damping) if isinstance(damping, (int, float)) and damping >= 0 else None

    def traced_accepts(self, info: float, rnorm: Sequence[float], bnorm: Sequence[float], dtype: torch.dtype) -> bool:
        """A traced LU solve succeeded: the factorisation did not fail and every column meets the tolerance."""
        tol = self.options.get("tol")
        tol = linalg.default_tol(dtype) if tol is None else float(tol)
        atol = float(self.options.get("atol", 0.0))
        return info == 0 and all(math.isfinite(r) and r <= max(tol * b, atol) for r, b in zip(rnorm, bnorm))

    def record_traced(self, x: Tensor, rnorm: Tensor, bnorm: Tensor, ndim: int, anorm: float) -> None:
        """Record (and check) a traced dense solve that :meth:`traced_accepts`, as :meth:`solve_matrix` would."""
        vec = ndim == 1
        res = KrylovResult(
            x=x,
            converged=True,
            residual_norm=rnorm[0] if vec else rnorm,
            n_iter=0,
            n_matvecs=x.shape[0],
            status=Status.CONVERGED,
            info={
                "factorization": "lu",
                "refinement_steps": 1,
                "anorm": anorm,
                "traced": True,
                "converged_columns": torch.ones((), dtype=torch.bool)
                if vec
                else torch.ones(len(rnorm), dtype=torch.bool),
            },
            method="dense",
            rhs_norm=bnorm[0] if vec else bnorm,
        )
        self.last = res
        self.check(res)

    def check(self, res: KrylovResult) -> None:
        """Apply the ``nonconvergence`` policy to ``res``.

        Raises:
            LinearSolveError: ``res`` did not converge and the policy is ``"raise"``.
        """
        if res.converged or self.nonconvergence == "ignore":
            return
        msg = (
            f"implicit differentiation: the linear solve (solve={self.name!r}, method {res.method!r}) did not "
            f"converge: status {res.status.value!r}, residual {res.max_residual:.3e} (relative "
            f"{res.max_relative_residual:.3e}) after {res.n_iter} iterations / {res.n_matvecs} products."
        )
        if res.status == Status.NEGATIVE_CURVATURE:
            msg += (
                " A = ∂F/∂y is not positive definite: 'cg' needs a symmetric positive definite system "
                "(F = ∇_y g at a strict minimum); use solve='minres' (symmetric indefinite), 'gmres', "
                "'normal_cg' (general) or 'auto'."
            )
        elif res.status == Status.STALLED:
            msg += (
                f" The residual stopped decreasing at the limit of {res.x.dtype} for this system: the derivative is "
                "as accurate as this precision allows (loosen tol, or compute in float64)."
            )
        elif res.status == Status.DIVERGED:
            msg += " The Neumann series diverged: |alpha| is too large for this A (try a smaller alpha)."
        else:
            msg += " Raise maxiter, loosen tol, or try another solve."
        if self.nonconvergence == "raise":
            raise LinearSolveError(msg, res)
        warnings.warn(msg, LinearSolveWarning, stacklevel=3)


# --------------------------------------------------------------------------- #
# deprecated aliases
# --------------------------------------------------------------------------- #
def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"implicit.{old} is deprecated; use {new}", DeprecationWarning, stacklevel=3)


def _alias(name: str) -> Callable[..., Tensor]:
    def fn(matvec: Any, b: Tensor, **options: Any) -> Tensor:
        _deprecated(f"solve_{name}", f"curvlab.linalg.solve(A, b, method={name!r})")
        if "ridge" in options:
            options["damping"] = options.pop("ridge")
        return linalg.solve(matvec, b, name, **options).x

    fn.__name__ = fn.__qualname__ = f"solve_{name}"
    fn.__doc__ = (
        f"Deprecated: ``curvlab.linalg.solve(matvec, b, method={name!r}, **options).x`` "
        "(``ridge`` is read as ``damping``)."
    )
    return fn


solve_cg = _alias("cg")
solve_normal_cg = _alias("normal_cg")
solve_minres = _alias("minres")
solve_gmres = _alias("gmres")
solve_neumann = _alias("neumann")
solve_dense = _alias("dense")


class _Solves(Mapping):
    """Deprecated ``SOLVES[name](op, b, **options) -> (x, KrylovResult)``: :func:`curvlab.linalg.solve`."""

    _names = ("auto", "cg", "normal_cg", "minres", "gmres", "neumann", "dense")

    def __getitem__(self, name: str) -> Callable[..., tuple[Tensor, KrylovResult]]:
        if name not in self._names:
            raise KeyError(name)
        _deprecated("SOLVES", "curvlab.linalg.solve(A, b, method=name) (the result has .x)")

        def fn(op: Any, b: Tensor, **options: Any) -> tuple[Tensor, KrylovResult]:
            if "ridge" in options:
                options["damping"] = options.pop("ridge")
            res = linalg.solve(op, b, name, **options)
            return res.x, res

        return fn

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


_SOLVES = _Solves()


def __getattr__(name: str) -> Any:
    if name == "SOLVES":
        return _SOLVES
    if name == "LinearSolveInfo":
        _deprecated("LinearSolveInfo", "curvlab.linalg.KrylovResult")
        return KrylovResult
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
