"""``torch.optim`` adapter of :class:`curvlab.solvers.MFAC` (Frantar, Kurtic & Alistarh 2021)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..solvers import mfac as _mfac
from ._base import ClosureOptimizer

__all__ = ["MFAC"]


class MFAC(ClosureOptimizer):
    r"""M-FAC as a ``torch.optim.Optimizer``, with the signature of the paper's reference optimizer.

    The same update as :class:`curvlab.solvers.MFAC` (see there for the formulas and defaults):
    the flattened gradient of all parameters plus ``weight_decay`` times the parameters is pushed
    into a sliding window of the last ``ngrads`` gradients, preconditioned by the inverse of the
    damped empirical Fisher over the window (:class:`curvlab.linops.MFACInverse`, the dynamic
    algorithm), averaged by momentum, and applied with step ``lr``.

    Unlike curvlab's other adapters it follows the plain ``torch.optim`` convention: ``step()``
    uses the gradients already in ``p.grad`` (a missing ``.grad`` counts as zero);
    ``step(closure)`` first calls ``closure()`` — which zeroes the gradients, runs the model,
    calls ``backward()`` and returns the loss — and returns that loss. A non-finite gradient
    skips the step with a warning and leaves parameters and window unchanged. The window,
    its Gram matrix (kept in ``small_dtype``), the momentum buffer and the step count are in
    ``state_dict()``; ``load_state_dict`` restores them exactly. The window is updated in place.

    Args:
        params: parameters or param groups (all groups share the hyperparameters; ``lr`` is read
            from the first group at every step, so learning-rate schedulers work).
        options: the fields of :class:`curvlab.solvers.MFAC` (listed below; paper defaults ``lr=1e-3``,
            ``ngrads=1024``, ``damping=1e-5``). ``damp=`` is the deprecated spelling of ``damping=``.
        distributed: in a data-parallel run, average the gradients over the ranks (as DDP does), so
            every rank takes the same step; ``None`` (default): whether a process group of several
            ranks is active at creation (see :mod:`curvlab.optim`).
        module: accepted for uniformity (M-FAC calls the closure once per step).

    Example:
        >>> import torch, curvlab
        >>> net = torch.nn.Linear(3, 2)
        >>> X, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
        >>> opt = curvlab.optim.MFAC(net.parameters(), lr=1e-2, ngrads=8, damping=1e-2)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.cross_entropy(net(X), y)
        ...     loss.backward()
        ...     return loss
        >>> losses = [opt.step(closure).item() for _ in range(20)]
        >>> losses[-1] < losses[0]
        True
    """

    solver_class = _mfac.MFAC
    fixed = {"copy_window": False}
    aliases = {"damp": "damping"}

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One M-FAC update from ``p.grad``; returns ``closure()``'s loss (``None`` without a closure)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        solver = self.solver()
        x = self._flat()
        grad = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(x.dtype) for p in self._params]
        )
        grad = self._average(grad)
        st = self.global_state
        if not st:
            st.update(step=0, mfac=solver.new_window(x), buf=None)
        out = solver.update(x, grad, st["mfac"], st["buf"])
        if out is None:
            warnings.warn("MFAC: non-finite gradient or direction; the step is skipped", RuntimeWarning, stacklevel=2)
            return loss
        x_new, st["mfac"], buf = out
        st["buf"] = buf if solver.momentum > 0 else None
        st["step"] += 1
        self._write(x_new)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, keeping the Gram matrix in its own (``small_dtype``) dtype.

        State dicts saved with the deprecated ``damp`` option load too.
        """
        saved = state_dict.get("state", {}).get(0, {}).get("mfac")
        gram: Tensor | None = saved["gram"] if isinstance(saved, dict) and "gram" in saved else None
        super().load_state_dict(state_dict)
        if gram is not None:
            self.global_state["mfac"]["gram"] = gram.to(device=self._params[0].device).clone()
