"""``torch.optim`` adapter of :class:`curvlab.solvers.EGN` for hand-written training loops."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..solvers import egn as _egn
from ..solvers._jacobians import output_derivatives
from ..solvers.egn import Linearization
from ._base import ClosureOptimizer

__all__ = ["EGN"]


class EGN(ClosureOptimizer):
    r"""Exact Gauss-Newton (Korbit, Adeoye, Bemporad & Zanon 2024) as a ``torch.optim.Optimizer``.

    The same update as :class:`curvlab.solvers.EGN` (see there for the formulas, the
    paper's line search, adaptive damping and momentum, and their defaults), driven by a
    closure: ``closure()`` evaluates the model on the current mini-batch and returns
    ``(per_sample_losses, outputs)`` — losses of shape ``(b,)`` computed from the outputs
    ``(b, ...)`` — *without* calling ``backward``. The output Jacobian is taken by batched
    vjps through the closure's graph, the exact loss-Hessian blocks by double backward.
    With ``line_search=True`` the closure is called again (under ``no_grad``) at the trial
    points. ``step`` returns the mean loss before the step. Non-finite derivatives skip
    the step with a warning (the parameters are left unchanged).

    Args:
        params: parameters or param groups (all groups share the hyperparameters).
        lr, damping, line_search, c, shrink, grow, max_backtracks, adaptive_damping,
        rho_low, rho_high, damping_increase, damping_decrease, min_damping, momentum,
        chunk_size: as :class:`curvlab.solvers.EGN`.
        distributed: in a data-parallel run, all-gather the per-sample losses, output Jacobian rows
            and loss derivatives, so every rank takes the step of one process on the union of the
            ranks' batches; ``None`` (default): whether a process group of several ranks is active
            at creation (see :mod:`curvlab.optim`).

    Example:
        >>> import torch, curvlab
        >>> net = torch.nn.Linear(3, 2)
        >>> X, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
        >>> opt = curvlab.optim.EGN(net.parameters(), damping=0.1)
        >>> def closure():
        ...     out = net(X)
        ...     return torch.nn.functional.cross_entropy(out, y, reduction="none"), out
        >>> loss0 = opt.step(closure)
        >>> bool(opt.step(closure) < loss0)
        True
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1.0,
        damping: float = 1.0,
        line_search: bool = False,
        c: float = 0.1,
        shrink: float = 0.8,
        grow: float = 1.5,
        max_backtracks: int = 15,
        adaptive_damping: bool = False,
        rho_low: float = 0.25,
        rho_high: float = 0.75,
        damping_increase: float = 1.01,
        damping_decrease: float = 0.99,
        min_damping: float | None = None,
        momentum: float = 0.0,
        chunk_size: int | None = None,
        distributed: bool | None = None,
    ) -> None:
        opts = dict(
            lr=lr,
            damping=damping,
            line_search=line_search,
            c1=c,
            shrink=shrink,
            grow=grow,
            max_backtracks=max_backtracks,
            adaptive_damping=adaptive_damping,
            rho_low=rho_low,
            rho_high=rho_high,
            damping_increase=damping_increase,
            damping_decrease=damping_decrease,
            min_damping=min_damping,
            momentum=momentum,
            chunk_size=chunk_size,
        )
        _egn.EGN(**opts)  # validates
        super().__init__(params, opts, distributed)

    def step(self, closure: Callable[[], Any] | None = None) -> Tensor:  # type: ignore[override]
        """One EGN update; ``closure() -> (per_sample_losses, outputs)``. Returns the mean loss before the step."""
        solver = _egn.EGN(**self.options)
        out = self._call(closure, "EGN")
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, Tensor) for t in out)):
            raise TypeError("the EGN closure must return (per_sample_losses, outputs), two tensors")
        losses, outputs = out
        b = outputs.shape[0] if outputs.ndim else 0
        if losses.ndim != 1 or losses.shape[0] != b:
            raise ValueError(
                f"the closure must return per-sample losses of shape (batch,) = ({b},) matching the outputs' "
                f"leading dimension, got {tuple(losses.shape)}"
            )
        f0 = self._mean(losses)
        g, Q = output_derivatives(losses, outputs)
        J = self._jacobian(outputs, solver.chunk_size)
        if self.distributed:  # the global mini-batch's rows, in rank order
            g, Q, J = self._gather(g, Q, J)
            b = g.shape[0]
        st = self.global_state
        if not st:
            st.update(step=0, damping=float(solver.damping), alpha=float(solver.lr), buf=None)
        if not all(bool(torch.isfinite(t).all()) for t in (f0, g, J) + (() if Q is None else (Q,))):
            warnings.warn("EGN: non-finite loss or derivatives; the step is skipped", RuntimeWarning, stacklevel=2)
            return f0
        lin = Linearization(J, g, Q, b)
        grad = J.T @ g.reshape(-1) / b
        x = self._flat()
        vars_ = {"damping": st["damping"], "alpha": st["alpha"], "buf": st["buf"]}
        value_at = self._value_at(closure, lambda o: o[0])  # type: ignore[arg-type]
        x_new, vars_, log, _ = solver.update(x, f0, grad, lin, value_at, vars_, stochastic=True)
        self._write(x_new)
        st.update(vars_)
        st["step"] += 1
        st["log"] = {k: float(v) for k, v in log.items()}
        return f0
