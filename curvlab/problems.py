"""Problem definitions: :class:`Minimize`, :class:`LeastSquares`, :class:`SupervisedLoss`.

A problem bundles an objective, the starting parameters and the data. Solvers
work on a flat parameter vector ``x`` (see :class:`curvlab.params.ParamSpec`)
and ask the problem for values, gradients and curvature operators at ``x``,
either on one batch or on the whole dataset (``batch=ALL``).

Data-parallel (:mod:`curvlab.distributed`): a problem created under a process group holds
this rank's shard. Over the data (``ALL``) values and gradients are sums of globally
weighted batch terms, all-reduced; on one batch each rank evaluates its own batch and the
results are averaged weighted by the batches' sample counts (the global mini-batch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from . import distributed as _dist
from .data import Batch, Data, Stream
from .linops import hessian as _hessian
from .linops._autodiff import call_model, per_sample_losses, split_supervised_batch
from .linops.ggn import GGNOperator, ggn
from .linops.jacobian import JacobianOperator, jacobian
from .params import ParamSpec

__all__ = ["Problem", "Minimize", "LeastSquares", "SupervisedLoss", "ALL", "MatrixSensing", "matrix_sensing"]


class _All:
    def __repr__(self) -> str:
        return "ALL"


ALL: Any = _All()
"""Sentinel: evaluate on the whole dataset (every batch, weighted) rather than one batch."""


class Problem:
    """Common machinery of the problem types.

    Attributes:
        spec: the :class:`~curvlab.params.ParamSpec` of the parameters.
        x0: the starting point as a flat vector (a copy; the user's tensors are never modified).
        data: the :class:`~curvlab.data.Data` view of ``data``.
    """

    def __init__(self, params: Any, data: Any, batch_size_fn: Callable[[Batch], int] | None = None) -> None:
        self.spec = ParamSpec(params, "params")
        self.x0 = self.spec.flatten()
        self.data = Data(data, "mean", batch_size_fn)
        self._stream = Stream(self.data)

    # ------------------------------------------------------------ to override
    def batch_value(self, x: Tensor, batch: Batch) -> Tensor:
        """The objective on one batch (a differentiable scalar)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ data
    @property
    def stochastic(self) -> bool:
        """Whether ``data`` is an iterable of several batches (stochastic solvers draw from it)."""
        return self.data.multi

    def draw(self, position: int) -> Batch:
        """The batch at draw number ``position`` of the endless epoch-after-epoch stream.

        Positions are counted from the start of the run, so a resumed solver (its
        state stores the count) sees the same batches as an uninterrupted one,
        as long as iterating over ``data`` is deterministic.
        """
        return self._stream.draw(position)

    # --------------------------------------------------------------- values
    def _scalar(self, v: Any) -> Tensor:
        if not isinstance(v, Tensor) or v.numel() != 1:
            raise ValueError(f"the objective must return a scalar tensor, got {getattr(v, 'shape', type(v).__name__)}")
        return v.reshape(())

    @property
    def distributed(self) -> bool:
        """Whether this problem is one rank's part of a data-parallel run (fixed at creation)."""
        return self.data.distributed

    def _reduce(self, parts: Tensor, batch: Batch) -> Tensor:
        r"""All-reduce this rank's ``parts`` (a flat tensor) into the global objective's.

        Over the data (``ALL``) the parts already carry global batch weights and are summed.
        On one batch each rank's parts are weighted by its batch's sample count ``n_r`` and
        the sum divided by :math:`\sum_r n_r` (one collective), giving the objective on the
        union of the ranks' batches — the global mini-batch.
        """
        if batch is ALL:
            return _dist.all_reduce_sum(parts)  # type: ignore[return-value]
        n = float(self.data.local_size(batch))
        tot = _dist.all_reduce_sum(torch.cat([parts * n, parts.new_full((1,), n)]))
        return tot[:-1] / tot[-1]  # type: ignore[index]

    def value(self, x: Tensor, batch: Batch = ALL) -> Tensor:
        """Objective at flat ``x``, on one batch or (``ALL``) the whole data; no graph kept."""
        with torch.no_grad():
            if batch is ALL:
                v = sum(self.batch_value(x, b) * w for b, w in self.data.weighted_batches())
            else:
                v = self.batch_value(x, batch)
            if self.distributed:
                v = self._reduce(v.reshape(1), batch).reshape(())  # type: ignore[union-attr]
            return v  # type: ignore[return-value]

    def value_and_grad(self, x: Tensor, batch: Batch = ALL) -> tuple[Tensor, Tensor]:
        """Objective and its gradient (flat) at ``x`` (all-reduced in one collective when data-parallel)."""
        pairs = self.data.weighted_batches() if batch is ALL else [(batch, 1.0)]
        val, grad = self._local_value_and_grad(x, pairs)
        if self.distributed:
            both = self._reduce(torch.cat([grad.reshape(-1), val.reshape(1).to(grad.dtype)]), batch)
            return both[-1].to(val.dtype), both[:-1]
        return val, grad

    def _local_value_and_grad(self, x: Tensor, pairs: Any) -> tuple[Tensor, Tensor]:
        val, grad = None, None
        for b, w in pairs:
            with torch.enable_grad():
                xl = x.detach().requires_grad_(True)
                v = self.batch_value(xl, b) * w
                (g,) = torch.autograd.grad(v, xl, allow_unused=True)
            g = torch.zeros_like(x) if g is None else g
            val = v.detach() if val is None else val + v.detach()
            grad = g if grad is None else grad + g
        assert val is not None and grad is not None
        return val, grad

    def hessian(self, x: Tensor, batch: Batch = ALL, **kw: Any) -> Any:
        """The Hessian operator of the objective at ``x`` (on a batch or the whole data).

        The returned :class:`~curvlab.linops.HessianOperator` also carries ``.value`` and
        ``.gradient`` at ``x``.
        """
        f = self._flat_f(batch)
        if batch is ALL and self.data.kind == "iterable":
            return _hessian(lambda z, b: self.batch_value(z, b), x, data=self.data, **kw)
        if self.distributed:  # weight this rank's batch by its samples, not 1/world_size
            if batch is ALL and self.data.kind == "batch":
                return _hessian(lambda z, b: self.batch_value(z, b), x, data=self.data, **kw)
            if batch is not ALL and batch is not None:
                return _hessian(lambda z, b: self.batch_value(z, b), x, data=batch, **kw)
        return _hessian(f, x, **kw)

    def _flat_f(self, batch: Batch) -> Callable[[Tensor], Tensor]:
        if batch is ALL:
            b = None if self.data.kind == "none" else self.data.raw
        else:
            b = batch
        return lambda z: self.batch_value(z, b)

    def _check(self) -> None:
        """Evaluate the objective once on the first batch to turn misuse into clear errors."""
        batch = next(iter(self.data.batches()))
        try:
            v = self.batch_value(self.x0, batch)
        except (RuntimeError, IndexError) as e:
            raise ValueError(
                f"evaluating the objective at params on the first batch of data failed: {e}. "
                "Check that the data batches fit the parameters' shapes"
            ) from e
        self._scalar(v)


def _call(fn: Callable[..., Any], p: Any, batch: Batch) -> Any:
    return fn(p) if batch is None else fn(p, batch)


class Minimize(Problem):
    """Minimize a scalar objective: ``loss(params, batch) -> scalar``.

    Over an iterable of batches the objective is the sample-weighted mean of the
    batch losses (each batch's loss is taken to be a batch mean).

    Args:
        loss: ``loss(params, batch) -> scalar tensor``; called as ``loss(params)``
            when ``data`` is ``None`` (the loss closes over its data).
        params: starting point: a tensor, a tuple/list/dict of tensors or an ``nn.Module``
            (the loss then receives a ``{name: tensor}`` dict; use
            :func:`torch.func.functional_call`).
        data: ``None``, one batch, or an iterable of batches.
        batch_size_fn: number of samples in a batch (default: leading dimension).

    Raises:
        TypeError: if ``loss`` is not callable or ``params`` has an unsupported type.
        ValueError: if the loss does not return a scalar, or the data does not fit.

    Example:
        >>> import torch, curvlab as cl
        >>> p = cl.Minimize(lambda x: ((x - 3.0) ** 2).sum(), torch.zeros(2))
        >>> round(cl.solve(p, cl.solvers.NewtonCG()).params[0].item(), 6)
        3.0
    """

    def __init__(
        self,
        loss: Callable[..., Tensor],
        params: Any,
        data: Any = None,
        batch_size_fn: Callable[[Batch], int] | None = None,
    ) -> None:
        if not callable(loss):
            raise TypeError(f"loss must be callable, got {type(loss).__name__}")
        super().__init__(params, data, batch_size_fn)
        self.loss = loss
        self._check()

    def batch_value(self, x: Tensor, batch: Batch) -> Tensor:
        return self._scalar(_call(self.loss, self.spec.unflatten(x), batch))


class LeastSquares(Problem):
    r"""Nonlinear least squares: minimize :math:`\tfrac{1}{2n}\|r(\theta)\|^2`.

    ``n`` is the number of residual rows (the leading dimension of ``r``; over
    several batches, of all of them together), so the objective is a mean over
    samples like the other problem types. Solvers that exploit the structure
    (Gauss-Newton, EGN) ask for :meth:`residuals` and :meth:`jacobian`.

    Args:
        residuals: ``residuals(params, batch) -> tensor r`` (``residuals(params)`` when ``data`` is ``None``).
        params: starting point (tensor / tuple / list / dict / ``nn.Module``).
        data: ``None``, one batch, or an iterable of batches.
        batch_size_fn: number of samples in a batch (default: leading dimension).

    Raises:
        TypeError: if ``residuals`` is not callable or does not return a tensor.
        ValueError: if the data does not fit.
    """

    def __init__(
        self,
        residuals: Callable[..., Tensor],
        params: Any,
        data: Any = None,
        batch_size_fn: Callable[[Batch], int] | None = None,
    ) -> None:
        if not callable(residuals):
            raise TypeError(f"residuals must be callable, got {type(residuals).__name__}")
        super().__init__(params, data, batch_size_fn)
        self.residual_fn = residuals
        self._check()

    def batch_residuals(self, x: Tensor, batch: Batch) -> Tensor:
        r = _call(self.residual_fn, self.spec.unflatten(x), batch)
        if not isinstance(r, Tensor):
            raise TypeError(f"residuals must return a tensor, got {type(r).__name__}")
        return r

    def batch_value(self, x: Tensor, batch: Batch) -> Tensor:
        r = self.batch_residuals(x, batch)
        n = r.shape[0] if r.ndim > 0 else 1
        return 0.5 * (r * r).sum() / n

    def residuals(self, x: Tensor, batch: Batch = ALL) -> Tensor:
        """The residual vector (flattened; stacked over batches for ``ALL``)."""
        with torch.no_grad():
            if batch is ALL:
                r = torch.cat([self.batch_residuals(x, b).reshape(-1) for b in self.data.batches()])
            else:
                r = self.batch_residuals(x, batch).reshape(-1)
            return _dist.all_gather_cat(r) if self.distributed else r

    def n_rows(self, batch: Batch = ALL) -> int:
        """Number of residual rows ``n`` in the objective's ``1/(2n)`` scaling (over all ranks when data-parallel)."""
        bs = self.data.batches() if batch is ALL else [batch]
        total = 0
        for b in bs:
            r = self.batch_residuals(self.x0, b)
            total += r.shape[0] if r.ndim > 0 else 1
        return int(_dist.all_reduce_sum(total)) if self.distributed else total

    def jacobian(self, x: Tensor, batch: Batch = ALL) -> JacobianOperator:
        """The Jacobian operator of the (flattened) residuals at ``x``."""
        fn = lambda p, *b: _call(self.residual_fn, p, b[0] if b else None)  # noqa: E731
        if batch is ALL:
            if self.data.kind == "none":
                return jacobian(lambda p: self.residual_fn(p), self.spec.unflatten(x))
            return jacobian(fn, self.spec.unflatten(x), data=self.data.raw)
        if batch is None:
            return jacobian(lambda p: self.residual_fn(p), self.spec.unflatten(x))
        return jacobian(fn, self.spec.unflatten(x), data=batch)


class SupervisedLoss(Problem):
    r"""Supervised learning: minimize the mean of per-sample losses :math:`\frac1N\sum_n \ell(f(x_n;\theta), y_n)`.

    Args:
        model: ``model(params, inputs) -> outputs`` or an ``nn.Module`` (called through
            :func:`torch.func.functional_call`).
        loss: ``loss(outputs, targets) -> per-sample losses`` of shape ``(batch,)``
            (e.g. ``lambda o, y: F.cross_entropy(o, y, reduction="none")``).
        params: starting point; ``None`` takes the parameters of ``model`` when it is a module.
        data: one ``(inputs, targets)`` batch or an iterable of them.
        batch_size_fn: number of samples in a batch (default: leading dimension).

    Raises:
        TypeError: if ``model`` or ``loss`` is not callable.
        ValueError: if ``data`` is missing, batches are not ``(inputs, targets)`` pairs,
            ``loss`` does not return per-sample losses, or the data does not fit the model.
    """

    def __init__(
        self,
        model: Any,
        loss: Callable[[Tensor, Tensor], Tensor],
        params: Any = None,
        data: Any = None,
        batch_size_fn: Callable[[Batch], int] | None = None,
    ) -> None:
        if not callable(model):
            raise TypeError(f"model must be callable or an nn.Module, got {type(model).__name__}")
        if not callable(loss):
            raise TypeError(f"loss must be callable, got {type(loss).__name__}")
        if params is None:
            if not isinstance(model, nn.Module):
                raise ValueError("params is None: pass the parameters, or an nn.Module as model")
            params = model
        if data is None:
            raise ValueError("data must hold (inputs, targets) batches: one batch or an iterable of batches")
        super().__init__(params, data, batch_size_fn)
        self.model, self.loss = model, loss
        for b in [next(iter(self.data.batches()))]:
            split_supervised_batch(b)
        self._check()

    def outputs(self, x: Tensor, inputs: Any) -> Tensor:
        """Model outputs at flat parameters ``x``."""
        return call_model(self.model, self.spec, x, inputs)

    def batch_losses(self, x: Tensor, batch: Batch) -> Tensor:
        """Per-sample losses on one batch."""
        inputs, y = split_supervised_batch(batch)
        return per_sample_losses(self.loss, self.outputs(x, inputs), y)

    def batch_value(self, x: Tensor, batch: Batch) -> Tensor:
        return self.batch_losses(x, batch).mean()

    def ggn(self, x: Tensor, batch: Batch = ALL, **kw: Any) -> GGNOperator:
        """The generalized Gauss-Newton operator at ``x`` (mean over the batch or the data)."""
        data = self.data if batch is ALL else batch
        return ggn(self.model, self.loss, self.spec.unflatten(x), data, **kw)


from ._matrix_sensing import MatrixSensing, matrix_sensing  # noqa: E402
