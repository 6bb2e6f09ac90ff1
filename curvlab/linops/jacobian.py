r"""Jacobian operator :math:`J = \partial r / \partial x` and its Gram matrix :math:`J Jᵀ`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed as _dist
from ..data import Batch
from ..params import ModuleState
from ._autodiff import CurvatureBase, _grad, _independent
from ._base import LinearOperator

__all__ = ["JacobianOperator", "GramOperator", "jacobian", "gram"]


class JacobianOperator(CurvatureBase, LinearOperator):
    r"""The Jacobian :math:`J \in \mathbb{R}^{M \times P}` of a residual map at a point.

    Over several batches the residuals are stacked in batch order (``M`` is the
    total number of residual entries); data-parallel, the ranks' rows are stacked in
    rank order (``J v`` all-gathers, ``Jᵀ u`` takes this rank's rows of ``u`` and all-reduces).
    :math:`J v` is a double-vjp, :math:`Jᵀu` a
    vjp; both reuse graphs built once per batch. Build it with :func:`jacobian`.

    Attributes:
        residuals: the residual vector at the point (flattened, stacked over batches).
    """

    _what = "residual_fn"

    def __init__(
        self,
        residual_fn: Callable[..., Tensor],
        params: Any,
        args: tuple = (),
        data: Any = None,
        cache: bool | str = True,
        *,
        check_deterministic: bool = True,
        module: nn.Module | None = None,
        state: ModuleState | None = None,
        key: int | None = None,
    ) -> None:
        if not callable(residual_fn):
            raise TypeError(f"residual_fn must be callable, got {type(residual_fn).__name__}")
        self._setup(
            params,
            data,
            "sum",
            None,
            cache,
            state=state,
            key=key,
            module=module,
            check_deterministic=check_deterministic,
        )
        self.fn, self.args = residual_fn, tuple(args)
        sizes, res = [], []
        with torch.no_grad():
            for i, b, _ in self._batches():
                with self.state.scope(self._key_of(i)):
                    r = self._r(self.x, b)
                sizes.append(r.numel())
                res.append(r.reshape(-1))
                self._record(i, b, r.abs().sum())  # no cancellation: a robust fingerprint of the rows
        self._end_pass()
        self.sizes = sizes
        self.residuals = torch.cat(res) if res else self.x.new_zeros(0)
        m = sum(sizes)
        self._offset = 0
        if self.distributed:  # rows of all ranks stacked in rank order
            counts = _dist.all_gather_cat(torch.tensor([m], dtype=torch.int64, device=self.x.device)).tolist()
            self._offset = sum(counts[: _dist.rank()])
            self._local_rows = m
            m = sum(counts)
            self.residuals = _dist.all_gather_cat(self.residuals)
        LinearOperator.__init__(self, (m, self.spec.size), self.spec.dtype, self.spec.device)

    def _r(self, x: Tensor, batch: Batch) -> Tensor:
        p = self.spec.unflatten(x)
        r = self.fn(p, *self.args) if batch is None else self.fn(p, batch, *self.args)
        if not isinstance(r, Tensor):
            raise TypeError(f"residual_fn must return a tensor, got {type(r).__name__}")
        return r

    @property
    def _verifies(self) -> bool:  # the residual pass at creation is a second pass: cached pieces are checked once
        return self.check_deterministic and (not self.cache or self._cached is None)

    def _build(self, x: Tensor, batch: Batch, weight: float) -> dict[str, Any]:
        r = self._r(x, batch).reshape(-1)
        if r.numel() and not r.requires_grad:
            raise _independent("residual_fn")
        u0 = torch.zeros_like(r, requires_grad=True)
        jt = torch.autograd.grad(r, x, u0, create_graph=True, allow_unused=True)[0] if r.numel() else None
        if jt is None:
            if r.numel():
                raise _independent("residual_fn")
            jt = torch.zeros_like(x)
        return {"x": x, "r": r, "u0": u0, "jt": jt, "value": r.detach().abs().sum()}

    def _checked_pieces(self) -> list[dict[str, Any]]:
        """The pieces of one pass, verified against the residual pass of the constructor (no collective)."""
        if self.cache and self._cached is not None:
            return self._cached
        pieces = []
        for i, b, w in self._batches():
            p = self._build_at(i, b, w)
            self._record(i, b, p["value"])
            pieces.append(p)
        self._end_pass()
        if self.cache:
            self._cached = pieces
        pending, self._pending = self._pending, None
        if self.distributed and self.check_deterministic:
            flag = pending if pending is not None else self.x.new_zeros((), dtype=torch.float64)
            if float(_dist.all_reduce_sum(flag.reshape(1))[0]) > 0:  # type: ignore[index]
                self._pending = pending
                self._raise_nondeterministic(here=pending is not None and float(pending) > 0)
        elif pending is not None and float(pending) > 0:
            self._pending = pending
            self._raise_nondeterministic(here=True)
        return pieces

    def _fwd(self, V: Tensor, batched: bool) -> Tensor:
        outs = [_grad(p["jt"], p["u0"], V, batched, retain=self.cache) for p in self._checked_pieces()]
        out = torch.cat(outs, dim=-1) if outs else V.new_zeros((*V.shape[:-1], 0))
        return _dist.all_gather_cat(out, dim=-1) if self.distributed else out

    def _bwd(self, U: Tensor, batched: bool) -> Tensor:
        if self.distributed:  # this rank's rows of U; the products of all ranks' rows are summed
            U = U[..., self._offset : self._offset + self._local_rows]
        out = self._zeros(U.shape[0] if batched else None)
        for p, u in zip(self._checked_pieces(), torch.split(U, self.sizes, dim=-1)):
            out = out + _grad(p["r"], p["x"], u.contiguous(), batched, retain=self.cache)
        return _dist.all_reduce_sum(out) if self.distributed else out  # type: ignore[return-value]

    def _matvec(self, v: Tensor) -> Tensor:
        return self._fwd(v, False)

    def _matmat(self, V: Tensor) -> Tensor:
        return self._fwd(V.T.contiguous(), True).T

    def _rmatvec(self, u: Tensor) -> Tensor:
        return self._bwd(u, False)

    def _rmatmat(self, U: Tensor) -> Tensor:
        return self._bwd(U.T.contiguous(), True).T

    def to_dense(self) -> Tensor:
        """The dense ``(M, P)`` Jacobian, from whichever side takes fewer products."""
        m, n = self.shape
        if m <= n:
            return self.rmatmat(torch.eye(m, dtype=self.dtype, device=self.device)).T
        return self.matmat(torch.eye(n, dtype=self.dtype, device=self.device))


class GramOperator(LinearOperator):
    r"""The Gram matrix :math:`J Jᵀ` (``M × M``, positive semidefinite) of a Jacobian operator."""

    def __init__(self, J: LinearOperator) -> None:
        if not isinstance(J, LinearOperator):
            raise TypeError(f"J must be a LinearOperator (e.g. from curvlab.linops.jacobian), got {type(J).__name__}")
        super().__init__((J.shape[0], J.shape[0]), J.dtype, J.device, psd=True)
        self.J = J

    def _matvec(self, u: Tensor) -> Tensor:
        return self.J.matvec(self.J.rmatvec(u))

    def _matmat(self, U: Tensor) -> Tensor:
        return self.J.matmat(self.J.rmatmat(U))

    def to_dense(self) -> Tensor:
        """The dense ``M × M`` matrix :math:`J Jᵀ`, through the materialised Jacobian."""
        Jd = self.J.to_dense()
        return Jd @ Jd.T


def jacobian(
    residual_fn: Callable[..., Tensor],
    params: Any,
    *args: Any,
    data: Any = None,
    cache: bool | str = True,
    check_deterministic: bool = True,
    module: nn.Module | None = None,
    state: ModuleState | None = None,
    key: int | None = None,
) -> JacobianOperator:
    r"""Matrix-free Jacobian of a residual map at ``params``.

    .. math::
        J = \frac{\partial r(x)}{\partial x} \in \mathbb{R}^{M \times P}, \qquad
        J v \text{ by a double vjp},\quad Jᵀ u \text{ by a vjp}.

    Args:
        residual_fn: ``residual_fn(params, *args) -> tensor`` (or ``residual_fn(params, batch, *args)``
            when ``data`` is given); any shape, flattened to ``M`` entries.
        params: the point (tensor / tuple / list / dict / ``nn.Module``).
        *args: extra arguments to ``residual_fn``.
        data: ``None``, one batch, or an iterable of batches (residuals stacked in order).
        cache: keep the graphs between products (default ``True``).
        check_deterministic: compare the residuals of the constructor's pass with those of the
            first product's (and, without cache, of every product's) and raise
            :class:`~curvlab.linops.NondeterministicError` when the data or the function changed
            (see :func:`~curvlab.linops.hessian`); free.
        module: the module whose buffers ``residual_fn`` reads (a module ``params`` is its own):
            evaluated on a snapshot of them (:mod:`curvlab.params`).
        state: a :class:`~curvlab.params.ModuleState` to evaluate under (a problem passes its own).
        key: random-number key of a single batch (a problem passes a drawn batch's key).

    Returns:
        A :class:`JacobianOperator` of shape ``(M, P)`` (``.residuals`` holds :math:`r(x)`).

    Raises:
        TypeError: if ``residual_fn`` is not callable or returns no tensor.
        ValueError: the residuals do not depend on ``params`` (at the first product).

    Example:
        >>> import torch, curvlab as cl
        >>> J = cl.linops.jacobian(lambda x: torch.stack([x[0] * x[1], x[1]]), torch.tensor([2.0, 3.0]))
        >>> J.to_dense()
        tensor([[3., 2.],
                [0., 1.]])
    """
    return JacobianOperator(
        residual_fn,
        params,
        args,
        data,
        cache,
        check_deterministic=check_deterministic,
        module=module,
        state=state,
        key=key,
    )


def gram(J: LinearOperator) -> GramOperator:
    r"""The Gram matrix :math:`J Jᵀ` of a Jacobian operator (the batch-sized matrix EGN and Sven factor).

    Args:
        J: an ``(M, P)`` operator with ``rmatvec`` (e.g. from :func:`jacobian`).

    Returns:
        A PSD :class:`GramOperator` of shape ``(M, M)``; its ``to_dense()`` materialises
        ``J`` with ``M`` batched vjps and multiplies.

    Raises:
        TypeError: if ``J`` is not a LinearOperator.
    """
    return GramOperator(J)
