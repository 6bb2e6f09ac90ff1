r"""The M-FAC optimizer (Frantar, Kurtic & Alistarh 2021) on the solve loop."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..checks import check_unit, int_fields, positive_fields
from ..linops.mfac import MFACInverse
from ..problems import Problem
from ._base import Solver, options
from ._common import batch_for, fresh_state, point

__all__ = ["MFAC"]


@options
class MFAC(Solver):
    r"""M-FAC: (stochastic) descent preconditioned by a sliding-window inverse empirical Fisher.

    Frantar, Kurtic & Alistarh, "M-FAC: Efficient Matrix-Free Approximations of Second-Order
    Information", NeurIPS 2021, Section 3.2 (dynamic algorithm) and their reference optimizer.
    Each step pushes the current (mini-batch) gradient, with weight decay added,
    :math:`\tilde g_k = \nabla f(x_k) + \omega x_k`, into a ring buffer of the last ``ngrads``
    gradients and steps along the preconditioned direction

    .. math::
        p_k = F_k^{-1}\tilde g_k,\quad F_k = \lambda I + \tfrac1m \textstyle\sum_{i} g_i g_i^\top, \qquad
        b_k = \mu b_{k-1} + (1-\mu) p_k \ (b_{-1} = 0), \qquad x_{k+1} = x_k - \eta\, b_k,

    (:math:`b_k = p_k` without momentum) with :math:`F_k^{-1}\tilde g_k` from
    :class:`curvlab.linops.MFACInverse` in :math:`O(dm + m^3)` — no :math:`d \times d` matrix.
    The window and its Gram matrix live in the solver state (``state["mfac"]``, a dict of
    tensors), so ``torch.save`` / resume continues the same run. Before the window is full
    :math:`m` is the number of gradients pushed so far.

    Far from a stationary point (:math:`\|g\|^2/m \gg \lambda`) the step is nearly
    scale-free, close to one it is gradient descent with step :math:`\eta/\lambda`;
    choose ``lr`` and ``damping`` together.

    Args:
        lr: step size :math:`\eta` (paper: 1e-3; 1e-4 for BERT).
        ngrads: window size :math:`m` (paper: 1024; 512 in several experiments).
        damping: :math:`\lambda` (paper: 1e-5; 1e-6 for BERT).
        momentum: :math:`\mu \in [0, 1)` (exponential moving average, as the reference code; default 0).
        weight_decay: :math:`\omega \ge 0`, added to the gradient before preconditioning (default 0).
        small_dtype: dtype of the ``ngrads × ngrads`` matrices (the window keeps the parameters' dtype).
        copy_window: copy the window each step so that :meth:`step` never modifies the state it is
            given (the solver contract). ``False`` updates it in place, saving one ``ngrads × d``
            copy per step; earlier states then share (and see changes to) the window.
    """

    lr: float = 1e-3
    ngrads: int = 1024
    damping: float = 1e-5
    momentum: float = 0.0
    weight_decay: float = 0.0
    small_dtype: torch.dtype = torch.float64
    copy_window: bool = True

    def __post_init__(self) -> None:
        positive_fields(self, "lr", "damping")
        positive_fields(self, "weight_decay", allow_zero=True)
        check_unit(self.momentum, "MFAC.momentum")
        int_fields(self, "ngrads")
        if not (isinstance(self.small_dtype, torch.dtype) and self.small_dtype.is_floating_point):
            raise ValueError(f"MFAC.small_dtype must be a floating-point torch.dtype, got {self.small_dtype!r}")

    def new_window(self, x: Tensor) -> dict[str, Any]:
        """An empty window for parameters like ``x`` (the ``state["mfac"]`` of a fresh run)."""
        empty = torch.empty(0, x.numel(), dtype=x.dtype, device=x.device)
        return MFACInverse(empty, self.damping, ngrads=self.ngrads, small_dtype=self.small_dtype).state()

    def update(
        self, x: Tensor, grad: Tensor, window: dict[str, Any], buf: Tensor | None, copy: bool | None = None
    ) -> tuple[Tensor, dict[str, Any], Tensor] | None:
        """One M-FAC update of flat ``x`` given its gradient: ``(x_new, window, buf)``, or ``None`` if not finite.

        Shared by this solver and :class:`curvlab.optim.MFAC`. A non-finite gradient or
        direction returns ``None`` and leaves ``window`` unchanged when ``copy`` is true.
        """
        g = grad + self.weight_decay * x if self.weight_decay else grad
        if not bool(torch.isfinite(g).all()):
            return None
        op = MFACInverse.from_state(window, copy=self.copy_window if copy is None else copy)
        if op.ngrads != self.ngrads or op.damping != float(self.damping):
            raise ValueError(
                f"the window in the state has ngrads={op.ngrads}, damping={op.damping}; "
                f"this MFAC has ngrads={self.ngrads}, damping={self.damping}"
            )
        try:
            p = op.update_matvec(g)
        except FloatingPointError:
            return None
        if not bool(torch.isfinite(p).all()):
            return None
        if self.momentum > 0:
            prev = torch.zeros_like(p) if buf is None else buf
            p = self.momentum * prev + (1 - self.momentum) * p
        return x - self.lr * p, op.state(), p

    def init(self, problem: Problem) -> dict[str, Any]:
        state = fresh_state(problem, buf=None)
        state["mfac"] = self.new_window(state["x"])
        return state

    def step(self, problem: Problem, state: dict[str, Any]) -> dict[str, Any]:
        out = self.update(state["x"], state["grad"], state["mfac"], state["buf"])
        if out is None:
            return {
                **state,
                "status": "nan",
                "message": f"non-finite gradient or M-FAC direction at iteration {int(state['iter'])}",
            }
        x_new, window, buf = out
        batch, draws = batch_for(problem, state["draws"])
        new = point(problem, x_new, batch)
        return {
            **state,
            **new,
            "mfac": window,
            "buf": buf if self.momentum > 0 else None,
            "iter": state["iter"] + 1,
            "matvecs": state["matvecs"] + 1,
            "step_size": self.lr,
            "draws": draws,
            "log": {"window": window["count"]},
        }
