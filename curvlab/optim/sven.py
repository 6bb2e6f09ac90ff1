"""``torch.optim`` adapter of :class:`curvlab.solvers.Sven` for hand-written training loops."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..solvers import sven as _sven
from ._base import ClosureOptimizer

__all__ = ["Sven"]


class Sven(ClosureOptimizer):
    r"""Sven (Bright-Thonney, Harvey, Lukas & Thaler 2026) as a ``torch.optim.Optimizer``.

    The same update as :class:`curvlab.solvers.Sven` (see there for the formulas and the
    paper's defaults), driven by a closure: ``closure()`` evaluates the model on the
    current mini-batch and returns the per-sample losses ``(b,)`` (or a tuple whose first
    item they are) *without* calling ``backward``. The Jacobian
    :math:`\partial \ell_i/\partial\theta` is taken by batched vjps through the closure's
    graph (``chunk_size`` rows at a time); with ``param_fraction < 1`` its columns are
    subsampled after the fact (the memory saving of the functional solver path needs
    :class:`curvlab.solvers.Sven`). ``step`` returns the mean loss before the step.
    Non-finite losses or Jacobians skip the step with a warning.

    Args:
        params: parameters or param groups (all groups share the hyperparameters).
        options: the fields of :class:`curvlab.solvers.Sven` (listed below). ``jacobian``: the
            closure's graph gives the Jacobian by batched vjps (``"auto"`` and ``"rows"``);
            ``"per_sample"`` needs the model, not a closure, and is refused.
        distributed: in a data-parallel run, all-gather the per-sample losses and Jacobian rows, so
            every rank takes the step of one process on the union of the ranks' batches; ``None``
            (default): whether a process group of several ranks is active at creation (see
            :mod:`curvlab.optim`).
        module: accepted for uniformity (Sven calls the closure once per step).

    Example:
        >>> import torch, curvlab
        >>> net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> X = torch.linspace(-1, 1, 32)[:, None]
        >>> opt = curvlab.optim.Sven(net.parameters(), lr=0.5, k=16)
        >>> closure = lambda: ((net(X) - X.sin()) ** 2).sum(-1)
        >>> loss0 = opt.step(closure)
        >>> bool(opt.step(closure) < loss0)
        True
    """

    solver_class = _sven.Sven

    def _validate(self, opts: dict[str, Any]) -> None:
        if opts["jacobian"] == "per_sample":
            raise ValueError(
                "curvlab.optim.Sven differentiates the closure's graph (batched vjps): jacobian='per_sample' "
                "needs the model itself — use curvlab.solvers.Sven on a SupervisedLoss, or jacobian='auto'"
            )

    def step(self, closure: Callable[[], Any] | None = None) -> Tensor:  # type: ignore[override]
        """One Sven update; ``closure() -> per_sample_losses``. Returns the mean loss before the step."""
        solver = self.solver()
        out = self._start(closure, "Sven")
        losses = out[0] if isinstance(out, (tuple, list)) else out
        if not isinstance(losses, Tensor) or losses.ndim != 1:
            raise ValueError(
                "the Sven closure must return per-sample losses of shape (batch,), got "
                f"{getattr(losses, 'shape', type(losses).__name__)}; use reduction='none'"
            )
        f0 = self._mean(losses)
        st = self.global_state
        if not st:
            st.update(step=0, v=None, buf=None)
        x = self._flat()
        gen = solver.generator(st["step"], x.device)
        index = solver.subset(self._spec.numels, gen, x.device)
        J = self._jacobian(losses, solver.chunk_size)
        if index is not None:
            J = J[:, index]
        losses, J = self._gather(losses.detach(), J)  # data-parallel: the global mini-batch's rows
        R, M = solver.conditions(losses.detach(), J)
        if not (bool(torch.isfinite(R).all()) and bool(torch.isfinite(M).all())):
            warnings.warn("Sven: non-finite losses or Jacobian; the step is skipped", RuntimeWarning, stacklevel=2)
            return f0
        vars_ = {"v": st["v"], "buf": st["buf"], "size": x.numel()}
        delta, new_vars, log = solver.direction(M, R, index, vars_, gen)
        x_new = x - solver.lr * delta if index is None else x.index_add(0, index, -solver.lr * delta)
        self._write(x_new)
        st.update(new_vars)
        st["step"] += 1
        st["log"] = {k: float(v) for k, v in log.items()}
        return f0
