r"""Jacobian operator :math:`J = \partial r / \partial x` and its Gram matrix :math:`J Jᵀ`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .. import distributed as _dist
from ..data import Batch
from ._autodiff import CurvatureBase, _grad
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

    def __init__(
        self,
        residual_fn: Callable[..., Tensor],
        params: Any,
        args: tuple = (),
        data: Any = None,
        cache: bool | str = True,
    ) -> None:
        if not callable(residual_fn):
            raise TypeError(f"residual_fn must be callable, got {type(residual_fn).__name__}")
        self._setup(params, data, "sum", None, cache)
        self.fn, self.args = residual_fn, tuple(args)
        sizes, res = [], []
        with torch.no_grad():
            for b in self.data.batches():
                r = self._r(self.x, b)
                sizes.append(r.numel())
                res.append(r.reshape(-1))
        self.sizes = sizes
        self.residuals = torch.cat(res)
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

    def _build(self, x: Tensor, batch: Batch, weight: float) -> dict[str, Any]:
        r = self._r(x, batch).reshape(-1)
        u0 = torch.zeros_like(r, requires_grad=True)
        (jt,) = torch.autograd.grad(r, x, u0, create_graph=True, allow_unused=True)
        if jt is None:
            jt = torch.zeros_like(x)
        return {"x": x, "r": r, "u0": u0, "jt": jt}

    def _fwd(self, V: Tensor, batched: bool) -> Tensor:
        outs = [_grad(p["jt"], p["u0"], V, batched, retain=self.cache) for p in self._pieces()]
        out = torch.cat(outs, dim=-1)
        return _dist.all_gather_cat(out, dim=-1) if self.distributed else out

    def _bwd(self, U: Tensor, batched: bool) -> Tensor:
        if self.distributed:  # this rank's rows of U; the products of all ranks' rows are summed
            U = U[..., self._offset : self._offset + self._local_rows]
        out = None
        for p, u in zip(self._pieces(), torch.split(U, self.sizes, dim=-1)):
            r = _grad(p["r"], p["x"], u.contiguous(), batched, retain=self.cache)
            out = r if out is None else out + r
        assert out is not None
        return self._sum_ranks(out)

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

    Returns:
        A :class:`JacobianOperator` of shape ``(M, P)`` (``.residuals`` holds :math:`r(x)`).

    Raises:
        TypeError: if ``residual_fn`` is not callable or returns no tensor.

    Example:
        >>> import torch, curvlab as cl
        >>> J = cl.linops.jacobian(lambda x: torch.stack([x[0] * x[1], x[1]]), torch.tensor([2.0, 3.0]))
        >>> J.to_dense()
        tensor([[3., 2.],
                [0., 1.]])
    """
    return JacobianOperator(residual_fn, params, args, data, cache)


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
