"""``torch.optim`` adapter of :class:`curvlab.solvers.SaddleFreeNewton` for hand-written training loops."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..linops import MatvecOperator
from ..solvers.saddle_free_newton import SaddleFreeNewton as _Solver
from ._base import ClosureOptimizer

__all__ = ["SaddleFreeNewton"]


class SaddleFreeNewton(ClosureOptimizer):
    r"""Saddle-free Newton (Dauphin et al. 2014) as a ``torch.optim.Optimizer``.

    The same update as :class:`curvlab.solvers.SaddleFreeNewton` (see there for the Krylov
    variant of the paper's Algorithm 1, the low-rank Woodbury variant, the damping search,
    the Armijo globalisation and the defaults), driven by a closure: ``closure()`` evaluates
    the model on the current mini-batch and returns the scalar loss *without* calling
    ``backward``. The gradient is taken with ``create_graph=True`` once per step and every
    Hessian-vector product is one more backward pass through that graph (reverse-over-reverse).
    The line searches call the closure again (under ``no_grad``) at trial points, from the
    random-number state of the step's first call (the same dropout masks). ``step``
    returns the loss before the step. Non-finite losses or gradients skip the step with a
    warning (the parameters are left unchanged).

    Args:
        params: parameters or param groups (all groups share the hyperparameters).
        options: the fields of :class:`curvlab.solvers.SaddleFreeNewton` (listed below).
        distributed: in a data-parallel run, average losses, gradients and Hessian-vector products
            over the ranks (as DDP averages gradients), so every rank takes the same step; ``None``
            (default): whether a process group of several ranks is active at creation (see
            :mod:`curvlab.optim`).
        module: the module the closure evaluates; its buffers (BatchNorm statistics) are then kept
            out of the searches' trial calls (see :mod:`curvlab.optim._base`).

    Example:
        >>> import torch, curvlab
        >>> net = torch.nn.Linear(3, 1)
        >>> X, y = torch.randn(16, 3), torch.randn(16, 1)
        >>> opt = curvlab.optim.SaddleFreeNewton(net.parameters(), k=4)
        >>> closure = lambda: torch.nn.functional.mse_loss(net(X), y)
        >>> loss0 = opt.step(closure)
        >>> bool(opt.step(closure) < loss0)
        True
    """

    solver_class = _Solver
    excluded = {"hessian_mode": "Hessian-vector products go through the closure's gradient graph"}
    second_order = True

    def _loss_grad(self, closure: Callable[[], Any], trial: bool = False) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        loss = self._trial(closure, grad=True) if trial else self._start(closure, "SaddleFreeNewton")
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise TypeError(
                f"the SaddleFreeNewton closure must return the scalar loss, got {getattr(loss, 'shape', type(loss))}"
            )
        with torch.enable_grad():
            grads = torch.autograd.grad(loss.reshape(()), self._params, create_graph=True, allow_unused=True)
        grads = tuple(torch.zeros_like(p) if gi is None else gi for p, gi in zip(self._params, grads))
        return loss.detach().reshape(()), self._spec.flatten_tree(list(grads)), grads

    def _averaged(self, f: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """Loss and gradient averaged over the ranks in one collective (unchanged when not data-parallel)."""
        if not self.distributed:
            return f, g
        both = self._average(torch.cat([g.detach().reshape(-1), f.reshape(1).to(g.dtype)]))
        return both[-1].to(f.dtype), both[:-1]

    def step(self, closure: Callable[[], Any] | None = None) -> Tensor:  # type: ignore[override]
        """One saddle-free Newton update; ``closure() -> scalar loss``. Returns the loss before the step."""
        solver = self.solver()
        f0, g_graph, _ = self._loss_grad(closure)  # type: ignore[arg-type]
        f0, g = self._averaged(f0, g_graph.detach())
        st = self.global_state
        if not st:
            st.update(step=0, U=None, eigvals=None, since_refresh=0, n_refresh=0)
        if not (bool(torch.isfinite(f0)) and bool(torch.isfinite(g).all())):
            warnings.warn(
                "SaddleFreeNewton: non-finite loss or gradient; the step is skipped", RuntimeWarning, stacklevel=2
            )
            return f0
        params = self._params

        def hvp(v: Tensor) -> Tensor:
            with torch.enable_grad():
                hv = torch.autograd.grad(g_graph, params, grad_outputs=v, retain_graph=True, allow_unused=True)
            out = torch.cat([(torch.zeros_like(p) if h is None else h).reshape(-1) for p, h in zip(params, hv)])
            return self._average(out)

        H = MatvecOperator(hvp, g.shape[0], g.dtype, g.device, symmetric=True)
        x = self._flat()
        value_at = self._value_at(closure, lambda o: o)  # type: ignore[arg-type]

        def grad_at(z: Tensor) -> tuple[Tensor, Tensor]:
            self._write(z)
            f, gz, _ = self._loss_grad(closure, trial=True)  # type: ignore[arg-type]
            return self._averaged(f, gz.detach())

        vars_ = {k: st[k] for k in ("U", "eigvals", "since_refresh", "n_refresh")}
        x_new, _, _, vars_, log, _ = solver.update(x, f0, g, H, value_at, grad_at, vars_)
        self._write(x_new)
        st.update(vars_)
        st["step"] += 1
        st["log"] = {k: float(v) for k, v in log.items()}
        return f0
