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

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from . import distributed as _dist
from .checks import check_choice
from .data import EMPTY, Batch, Data, Stream
from .linops import hessian as _hessian
from .linops._autodiff import _independent, call_model, loss_value, per_sample_losses, split_supervised_batch
from .linops.ggn import GGNOperator, ggn
from .linops.jacobian import JacobianOperator, jacobian
from .params import ParamSpec, batch_key

__all__ = ["Problem", "Minimize", "LeastSquares", "SupervisedLoss", "ALL", "MatrixSensing", "matrix_sensing"]


class _All:
    def __repr__(self) -> str:
        return "ALL"


ALL: Any = _All()
"""Sentinel: evaluate on the whole dataset (every batch, weighted) rather than one batch."""

_BUFFER_POLICIES = ("keep", "update")
_DRAWS_KEPT = 16


class Problem:
    """Common machinery of the problem types.

    Module state (the contract of :mod:`curvlab.params`): every evaluation of the user's
    function runs inside the problem's :class:`~curvlab.params.ModuleState` scope. The module's
    buffers are a snapshot taken at creation — no evaluation, trial point or curvature product
    writes into the user's module (a train-mode BatchNorm normalises with each batch's own
    statistics; its running statistics are neither used nor updated). Random numbers are keyed
    by the batch: a drawn mini-batch by its draw number, batch ``i`` of a pass over the data by
    :func:`~curvlab.params.batch_key` ``(i)``; so the starting point of a step, its trial points
    and its curvature products see the same dropout masks, the next mini-batch new ones, and a
    deterministic solve a fixed objective. The returned module (``Result.params``) carries the
    user's own buffers (``buffers="keep"``) or, with ``buffers="update"``, buffers recomputed at
    the final parameters by one pass over the data (BatchNorm statistics of the whole data as a
    cumulative average, as :func:`torch.optim.swa_utils.update_bn`; averaged over the ranks when
    data-parallel).

    Args:
        params: the starting point (see :class:`~curvlab.params.ParamSpec`).
        data: ``None``, one batch, or an iterable of batches (empty batches are skipped).
        batch_size_fn: number of samples in a batch (default: leading dimension).
        module: the module whose buffers the function reads, when ``params`` are tensors taken
            from it (a module ``params`` is its own).
        buffers: ``"keep"`` (default) or ``"update"`` (see above; needs a module ``params``).

    Attributes:
        spec: the :class:`~curvlab.params.ParamSpec` of the parameters.
        state: the :class:`~curvlab.params.ModuleState` every evaluation runs under.
        x0: the starting point as a flat vector (a copy; the user's tensors are never modified).
        data: the :class:`~curvlab.data.Data` view of ``data``.
    """

    def __init__(
        self,
        params: Any,
        data: Any,
        batch_size_fn: Callable[[Batch], int] | None = None,
        *,
        module: nn.Module | None = None,
        buffers: str = "keep",
    ) -> None:
        check_choice(buffers, "buffers", _BUFFER_POLICIES)
        self.spec = ParamSpec(params, "params", module=module)
        self.state = self.spec.state
        self.x0 = self.spec.flatten()
        self.data = Data(data, "mean", batch_size_fn)
        self._stream = Stream(self.data)
        self._drawn: OrderedDict[int, tuple[Batch, int]] = OrderedDict()
        self.buffers = buffers
        if buffers == "update":
            if self.spec.kind != "module":
                raise ValueError("buffers='update' needs params to be an nn.Module (the module that comes back)")
            self.spec.buffer_update = self._recompute_buffers

    # ------------------------------------------------------------ to override
    def batch_value(self, x: Tensor, batch: Batch) -> Tensor:
        """The objective on one batch (a differentiable scalar); called inside :meth:`scope`."""
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
        as long as iterating over ``data`` is deterministic. Empty batches are skipped; a
        data-parallel rank with an empty shard draws :data:`~curvlab.data.EMPTY`. The batch's
        random-number key is its position (:meth:`key`).
        """
        batch = self._stream.draw(position)
        self._drawn.pop(id(batch), None)
        self._drawn[id(batch)] = (batch, int(position))
        while len(self._drawn) > _DRAWS_KEPT:
            self._drawn.popitem(last=False)
        return batch

    def key(self, batch: Batch) -> int:
        """Random-number key of one batch: its draw number when it was drawn, else that of batch 0."""
        hit = self._drawn.get(id(batch))
        if hit is not None and hit[0] is batch:
            return hit[1]
        return batch_key(0)

    def scope(self, batch: Batch, *, math_attention: bool = False) -> Any:
        """The :class:`~curvlab.params.ModuleState` scope user functions on one ``batch`` (not ``ALL``) run in."""
        return self.state.scope(self.key(batch), math_attention=math_attention)

    def _pairs(self, batch: Batch) -> Iterator[tuple[Batch, float, int]]:
        """``(batch, weight, key)``: every (non-empty) batch of the data for ``ALL``, else ``batch`` itself."""
        if batch is ALL:
            for i, (b, w) in enumerate(self.data.weighted_batches()):
                yield b, w, batch_key(i)
        elif batch is None or not self.data.is_empty(batch):
            yield batch, 1.0, self.key(batch)

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
        union of the ranks' batches — the global mini-batch. A rank with an empty batch
        contributes nothing (``n_r = 0``) and still takes part.
        """
        if batch is ALL:
            return _dist.all_reduce_sum(parts)  # type: ignore[return-value]
        n = float(self.data.local_size(batch))
        tot = _dist.all_reduce_sum(torch.cat([parts * n, parts.new_full((1,), n)]))
        return tot[:-1] / tot[-1]  # type: ignore[index]

    def _zero(self) -> Tensor:
        return torch.zeros((), dtype=self.spec.dtype, device=self.spec.device)

    def value(self, x: Tensor, batch: Batch = ALL) -> Tensor:
        """Objective at flat ``x``, on one batch or (``ALL``) the whole data; no graph kept."""
        with torch.no_grad():
            v: Tensor | None = None
            scope = self.state.scope
            for b, w, k in self._pairs(batch):
                with scope(k):
                    t = self._scalar(self.batch_value(x, b))
                t = t if w == 1.0 else t * w
                v = t if v is None else v + t
            if v is None:  # no (non-empty) batch on this rank
                v = self._zero()
            if self.distributed:
                v = self._reduce(v.reshape(1), batch).reshape(())
            return v

    def value_and_grad(self, x: Tensor, batch: Batch = ALL) -> tuple[Tensor, Tensor]:
        """Objective and its gradient (flat) at ``x`` (all-reduced in one collective when data-parallel)."""
        val, grad = self._local_value_and_grad(x, self._pairs(batch))
        if self.distributed:
            both = self._reduce(torch.cat([grad.reshape(-1), val.reshape(1).to(grad.dtype)]), batch)
            return both[-1].to(val.dtype), both[:-1]
        return val, grad

    def _local_value_and_grad(self, x: Tensor, pairs: Any) -> tuple[Tensor, Tensor]:
        val: Tensor | None = None
        grad: Tensor | None = None
        scope = self.state.scope
        for b, w, k in pairs:
            with torch.enable_grad(), scope(k):
                xl = x.detach().requires_grad_(True)
                v = self._scalar(self.batch_value(xl, b))
                if w != 1.0:
                    v = v * w
                (g,) = torch.autograd.grad(v, xl, allow_unused=True) if v.requires_grad else (None,)
            v = v.detach()
            val = v if val is None else val + v
            if g is not None:
                grad = g if grad is None else grad + g
        return (self._zero() if val is None else val), (torch.zeros_like(x) if grad is None else grad)

    def hessian(self, x: Tensor, batch: Batch = ALL, **kw: Any) -> Any:
        """The Hessian operator of the objective at ``x`` (on a batch or the whole data).

        The returned :class:`~curvlab.linops.HessianOperator` also carries ``.value`` and
        ``.gradient`` at ``x``; it evaluates under the problem's module state with the batch's
        random-number key, so its products see the masks of :meth:`value_and_grad` on ``batch``.
        """
        kw.setdefault("state", self.state)
        if batch is ALL:
            return _hessian(self._flat_f, x, data=self.data, **kw)
        data = EMPTY if batch is not None and self.data.is_empty(batch) else batch
        return _hessian(self._flat_f, x, data=data, key=self.key(batch), **kw)

    def _flat_f(self, z: Tensor, batch: Batch = None) -> Tensor:
        return self.batch_value(z, batch)

    def _recompute_buffers(self, x: Tensor) -> dict[str, Tensor]:
        """The module's buffers at ``x`` after one pass over the data (``buffers="update"``)."""

        def run() -> None:
            for i, (b, _) in enumerate(self.data.weighted_batches()):
                with self.state.scope(batch_key(i), buffers=False):
                    self.batch_value(x, b)

        new = self.state.recompute(run)
        if self.distributed:
            new = {k: (_dist.all_reduce_mean(v) if v.is_floating_point() else v) for k, v in new.items()}
        return new  # type: ignore[return-value]

    def _check(self) -> None:
        """Evaluate the objective once (with its gradient) on the first batch to turn misuse into clear errors.

        Data-parallel, the verdict is shared (one collective): a failure on one rank raises on
        every rank instead of leaving the others waiting in the next collective.
        """
        if self.distributed and self.data.kind != "none":
            self.data.n_total()  # collective: data without a sample on any rank raises on every rank
        err: BaseException | None = None
        try:
            first = next(iter(self.data.batches()), EMPTY)
            if first is not EMPTY:
                self._check_batch(first)
        except (ValueError, TypeError) as e:
            err = e
        if self.distributed:
            failed = _dist.all_reduce_sum(0.0 if err is None else 1.0)
            if failed and err is None:
                raise ValueError("the objective failed its first evaluation on another rank (see that rank's error)")
        if err is not None:
            raise err

    def _check_batch(self, batch: Batch) -> None:
        with torch.enable_grad(), self.state.scope(batch_key(0)):
            xl = self.x0.clone().requires_grad_(True)
            try:
                v = self._scalar(self.batch_value(xl, batch))
            except (RuntimeError, IndexError) as e:
                raise ValueError(
                    f"evaluating the objective at params on the first batch of data failed: {e}. "
                    "Check that the data batches fit the parameters' shapes"
                ) from e
            g = torch.autograd.grad(v, xl, allow_unused=True)[0] if v.requires_grad else None
        if g is None:
            raise _independent(f"the {self._objective_name}")

    _objective_name = "loss"


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
        module: the module whose buffers ``loss`` reads when ``params`` are tensors taken from it
            (e.g. ``dict(model.named_parameters())``); a module ``params`` is its own.
        buffers: ``"keep"`` (the returned module carries the user's buffers, the default) or
            ``"update"`` (buffers recomputed at the solution, see :class:`Problem`).

    Raises:
        TypeError: if ``loss`` is not callable or ``params`` has an unsupported type.
        ValueError: if the loss does not return a scalar, does not depend on ``params`` (the
            habit ``crit(model(x), y)`` of a loss that closes over the module), or the data does not fit.

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
        *,
        module: nn.Module | None = None,
        buffers: str = "keep",
    ) -> None:
        if not callable(loss):
            raise TypeError(f"loss must be callable, got {type(loss).__name__}")
        super().__init__(params, data, batch_size_fn, module=module, buffers=buffers)
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
        module: the module whose buffers ``residuals`` reads when ``params`` are tensors taken from it
            (e.g. ``dict(model.named_parameters())``); a module ``params`` is its own.
        buffers: ``"keep"`` (the returned module carries the user's buffers, the default) or
            ``"update"`` (buffers recomputed at the solution, see :class:`Problem`).

    Raises:
        TypeError: if ``residuals`` is not callable or does not return a tensor.
        ValueError: if the data does not fit or the residuals do not depend on ``params``.
    """

    _objective_name = "residuals"

    def __init__(
        self,
        residuals: Callable[..., Tensor],
        params: Any,
        data: Any = None,
        batch_size_fn: Callable[[Batch], int] | None = None,
        *,
        module: nn.Module | None = None,
        buffers: str = "keep",
    ) -> None:
        if not callable(residuals):
            raise TypeError(f"residuals must be callable, got {type(residuals).__name__}")
        super().__init__(params, data, batch_size_fn, module=module, buffers=buffers)
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

    def _residual_list(self, x: Tensor, batch: Batch) -> list[Tensor]:
        out = []
        for b, _, k in self._pairs(batch):
            with self.state.scope(k):
                out.append(self.batch_residuals(x, b).reshape(-1))
        return out

    def residuals(self, x: Tensor, batch: Batch = ALL) -> Tensor:
        """The residual vector (flattened; stacked over batches for ``ALL``)."""
        with torch.no_grad():
            rs = self._residual_list(x, batch)
            r = torch.cat(rs) if rs else x.new_zeros(0)
            return _dist.all_gather_cat(r) if self.distributed else r

    def n_rows(self, batch: Batch = ALL) -> int:
        """Number of residual rows ``n`` in the objective's ``1/(2n)`` scaling (over all ranks when data-parallel)."""
        total = 0
        with torch.no_grad():
            for b, _, k in self._pairs(batch):
                with self.state.scope(k):
                    r = self.batch_residuals(self.x0, b)
                total += r.shape[0] if r.ndim > 0 else 1
        return int(_dist.all_reduce_sum(total)) if self.distributed else total

    def jacobian(self, x: Tensor, batch: Batch = ALL) -> JacobianOperator:
        """The Jacobian operator of the (flattened) residuals at ``x`` (evaluated under the problem's module state)."""

        def fn(z: Tensor, b: Batch = None) -> Tensor:
            return self.batch_residuals(z, b)

        if batch is ALL:
            return jacobian(fn, x, data=self.data, state=self.state)
        data = EMPTY if batch is not None and self.data.is_empty(batch) else batch
        return jacobian(fn, x, data=data, state=self.state, key=self.key(batch))


class SupervisedLoss(Problem):
    r"""Supervised learning: minimize the mean of per-sample losses :math:`\frac1N\sum_n \ell(f(x_n;\theta), y_n)`.

    Args:
        model: ``model(params, inputs) -> outputs`` or an ``nn.Module`` (called through
            :func:`torch.func.functional_call`).
        loss: ``loss(outputs, targets)``: per-sample losses of shape ``(batch,)``
            (e.g. ``lambda o, y: F.cross_entropy(o, y, reduction="none")``) or their batch mean
            (``F.cross_entropy``, ``nn.CrossEntropyLoss()``; per-sample losses — for EGN and
            Sven — are then those of one-sample batches).
        params: starting point; ``None`` takes the parameters of ``model`` when it is a module.
        data: one ``(inputs, targets)`` batch or an iterable of them.
        batch_size_fn: number of samples in a batch (default: leading dimension).
        buffers: ``"keep"`` (the returned module carries the user's buffers, the default) or
            ``"update"`` (buffers recomputed at the solution, see :class:`Problem`).

    Raises:
        TypeError: if ``model`` or ``loss`` is not callable.
        ValueError: if ``data`` is missing, batches are not ``(inputs, targets)`` pairs,
            ``loss`` returns neither per-sample losses nor their mean (e.g. a sum, or a
            class-weighted mean: pass ``reduction="none"``), the outputs do not depend on
            ``params``, or the data does not fit the model.
    """

    _objective_name = "model output"

    def __init__(
        self,
        model: Any,
        loss: Callable[[Tensor, Tensor], Tensor],
        params: Any = None,
        data: Any = None,
        batch_size_fn: Callable[[Batch], int] | None = None,
        *,
        buffers: str = "keep",
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
        super().__init__(
            params,
            data,
            batch_size_fn,
            module=model if isinstance(model, nn.Module) and model is not params else None,
            buffers=buffers,
        )
        self.model, self.loss = model, loss
        self._check()

    def outputs(self, x: Tensor, inputs: Any) -> Tensor:
        """Model outputs at flat parameters ``x``."""
        return call_model(self.model, self.spec, x, inputs)

    def batch_losses(self, x: Tensor, batch: Batch) -> Tensor:
        """Per-sample losses on one batch."""
        inputs, y = split_supervised_batch(batch)
        return per_sample_losses(self.loss, self.outputs(x, inputs), y)

    def batch_value(self, x: Tensor, batch: Batch) -> Tensor:
        inputs, y = split_supervised_batch(batch)
        losses, per_sample = loss_value(self.loss, self.outputs(x, inputs), y)
        return losses.mean() if per_sample else losses

    def _check_batch(self, batch: Batch) -> None:
        split_supervised_batch(batch)
        super()._check_batch(batch)
        inputs, y = split_supervised_batch(batch)
        with torch.no_grad(), self.state.scope(batch_key(0)):
            out = self.outputs(self.x0, inputs)
            losses, per_sample = loss_value(self.loss, out, y)
            if not per_sample:
                mean = per_sample_losses(self.loss, out, y).mean()
                if not torch.allclose(losses, mean, rtol=1e-4, atol=1e-6 * (1 + float(mean.abs()))):
                    raise ValueError(
                        f"loss returned a scalar ({float(losses):.6g}) that is not the batch mean of its per-sample "
                        f"losses ({float(mean):.6g}: the losses of one-sample batches); SupervisedLoss needs "
                        "per-sample losses (reduction='none') or their mean — not a sum or a class-weighted mean"
                    )

    def ggn(self, x: Tensor, batch: Batch = ALL, **kw: Any) -> GGNOperator:
        """The generalized Gauss-Newton operator at ``x`` (mean over the batch or the data), in the problem's state."""
        kw.setdefault("state", self.state)
        if batch is ALL:
            return ggn(self.model, self.loss, self.spec.unflatten(x), self.data, **kw)
        data = EMPTY if self.data.is_empty(batch) else batch
        return ggn(self.model, self.loss, self.spec.unflatten(x), data, key=self.key(batch), **kw)


from ._matrix_sensing import MatrixSensing, matrix_sensing  # noqa: E402
