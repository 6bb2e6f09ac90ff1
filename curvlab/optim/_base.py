"""A small base for closure-driven ``torch.optim.Optimizer`` adapters of curvlab solvers.

The adapters treat all parameters as one flat vector (curvlab's
:class:`~curvlab.params.ParamSpec` over the tensors of every param group, in order), keep
their per-run state as tensors and numbers in ``self.state`` under the first parameter
(as ``torch.optim.LBFGS`` does), so ``state_dict()`` / ``load_state_dict()`` round-trip it,
and get everything they need from a closure that evaluates the model *without* calling
``backward`` (they differentiate its outputs themselves).

Data-parallel (:mod:`curvlab.distributed`): with ``distributed=True`` — the default ``None``
means :func:`curvlab.distributed.is_distributed` when the optimizer is created — each rank's
closure evaluates the model on its own part of the global mini-batch and the optimizers
combine the ranks' information so that every rank takes the same step, the one a single
process takes on the union of the batches: M-FAC and saddle-free Newton average gradients,
Hessian-vector products and losses over the ranks (equal weights, as DDP does: give the
ranks equal batch sizes); EGN and Sven all-gather the per-sample rows of their batch-sized
systems (losses, Jacobian rows, output derivatives) in rank order. Every step is then a
collective: all ranks must call it in the same order. The parameters must start equal on
every rank (e.g. broadcast from rank 0, as DDP does at construction).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from .. import distributed as _dist
from ..params import ParamSpec
from ..solvers._jacobians import rows_jacobian

__all__ = ["ClosureOptimizer"]


class ClosureOptimizer(torch.optim.Optimizer):
    """Base class of curvlab's closure-driven optimizers.

    Subclasses pass their hyperparameters as ``defaults`` and implement :meth:`step`. All
    param groups must share the hyperparameters (the update couples every parameter, so
    per-group settings have no meaning); the parameters must share dtype and device.

    Args:
        params: an iterable of tensors or of param-group dicts (``torch.optim`` convention).
        defaults: the hyperparameters.
        distributed: combine the ranks' gradients / rows in a data-parallel run (see the module
            docstring); ``None`` (default) means :func:`curvlab.distributed.is_distributed` at
            creation. Without a process group of several ranks it has no effect.

    Raises:
        ValueError: if param groups set different hyperparameters, or the parameters
            mix dtypes or devices.
        TypeError: if a parameter is not a floating-point tensor.
    """

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], distributed: bool | None = None) -> None:
        if distributed is not None and not isinstance(distributed, bool):
            raise TypeError(f"distributed must be True, False or None, got {distributed!r}")
        #: whether steps combine the ranks' information (fixed at creation; False without a group)
        self.distributed = _dist.is_distributed() if distributed is None else distributed and _dist.is_distributed()
        self._option_names = list(defaults)
        super().__init__(params, defaults)
        for g in self.param_groups[1:]:
            diff = sorted(k for k in defaults if g[k] != self.param_groups[0][k])
            if diff:
                raise ValueError(
                    f"{type(self).__name__} updates all parameters jointly; param groups may not set different {diff}"
                )
        self._params: list[Tensor] = [p for g in self.param_groups for p in g["params"]]
        self._spec = ParamSpec(list(self._params), "params")

    # ------------------------------------------------------------------ flat view
    @property
    def options(self) -> dict[str, Any]:
        """The hyperparameters (of the first param group, which all groups share)."""
        return {k: self.param_groups[0][k] for k in self._option_names}

    @property
    def global_state(self) -> dict[str, Any]:
        """The optimizer's per-run state (kept under the first parameter, saved by ``state_dict``)."""
        return self.state[self._params[0]]

    def _flat(self) -> Tensor:
        """The parameters as one detached flat vector."""
        return self._spec.flatten(list(self._params))

    def _write(self, x: Tensor) -> None:
        """Copy the flat vector ``x`` into the parameters in place."""
        self._spec.write_(x, list(self._params))

    def _jacobian(self, out: Tensor, chunk_size: int | None = None) -> Tensor:
        """Dense Jacobian ``(out.numel(), P)`` of a closure output w.r.t. the parameters (batched vjps)."""
        return rows_jacobian(out, self._params, chunk_size)

    def _value_at(self, closure: Callable[[], Any], pick: Callable[[Any], Tensor]) -> Callable[[Tensor], Tensor]:
        """``z -> mean loss at flat parameters z`` (writes ``z`` into the parameters, no graph; over all ranks)."""

        def f(z: Tensor) -> Tensor:
            self._write(z)
            with torch.no_grad():
                return self._mean(pick(closure()))

        return f

    def _mean(self, t: Tensor) -> Tensor:
        """Mean of the entries of ``t`` (per-sample losses or a scalar loss), over every rank's entries when
        data-parallel (gathered in rank order, so the mean is exactly the one-process mean)."""
        t = t.detach().reshape(-1)
        return (_dist.all_gather_cat(t) if self.distributed else t).mean()

    def _gather(self, *tensors: Tensor | None) -> tuple[Any, ...]:
        """The tensors' rows of every rank concatenated in rank order (unchanged when not data-parallel)."""
        if not self.distributed:
            return tensors
        return tuple(None if t is None else _dist.all_gather_cat(t.detach(), 0) for t in tensors)

    def _average(self, t: Tensor) -> Tensor:
        """Mean of ``t`` over the ranks, as DDP averages gradients (``t`` itself when not data-parallel)."""
        return _dist.all_reduce_mean(t) if self.distributed else t  # type: ignore[return-value]

    @staticmethod
    def _call(closure: Callable[[], Any] | None, name: str) -> Any:
        if closure is None:
            raise ValueError(f"{name}.step needs a closure that evaluates the model (it must not call backward)")
        with torch.enable_grad():
            return closure()
