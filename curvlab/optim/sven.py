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
        lr, k, rtol, atol, kappa, svd, n_oversample, n_power, param_fraction, param_blocks,
        microbatch, rmsprop, rmsprop_alpha, rmsprop_eps, rmsprop_momentum, seed,
        chunk_size: as :class:`curvlab.solvers.Sven`.
        distributed: in a data-parallel run, all-gather the per-sample losses and Jacobian rows, so
            every rank takes the step of one process on the union of the ranks' batches; ``None``
            (default): whether a process group of several ranks is active at creation (see
            :mod:`curvlab.optim`).

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

    def __init__(
        self,
        params: Any,
        lr: float = 0.1,
        k: int | None = None,
        rtol: float = 1e-3,
        atol: float = 1e-10,
        kappa: float = 2.0,
        svd: str = "auto",
        n_oversample: int = 5,
        n_power: int = 1,
        param_fraction: float = 1.0,
        param_blocks: bool = False,
        microbatch: int = 1,
        rmsprop: str | None = None,
        rmsprop_alpha: float = 0.99,
        rmsprop_eps: float = 1e-8,
        rmsprop_momentum: float = 0.0,
        seed: int = 0,
        chunk_size: int | None = None,
        distributed: bool | None = None,
    ) -> None:
        opts = dict(
            lr=lr,
            k=k,
            rtol=rtol,
            atol=atol,
            kappa=kappa,
            svd=svd,
            n_oversample=n_oversample,
            n_power=n_power,
            param_fraction=param_fraction,
            param_blocks=param_blocks,
            microbatch=microbatch,
            rmsprop=rmsprop,
            rmsprop_alpha=rmsprop_alpha,
            rmsprop_eps=rmsprop_eps,
            rmsprop_momentum=rmsprop_momentum,
            seed=seed,
            chunk_size=chunk_size,
        )
        _sven.Sven(**opts)  # validates
        super().__init__(params, opts, distributed)

    def step(self, closure: Callable[[], Any] | None = None) -> Tensor:  # type: ignore[override]
        """One Sven update; ``closure() -> per_sample_losses``. Returns the mean loss before the step."""
        solver = _sven.Sven(**self.options)
        out = self._call(closure, "Sven")
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
