"""Adam, wrapping ``torch.optim.Adam`` so the numbers are exactly PyTorch's."""

from __future__ import annotations

from typing import Any

import torch

from ..checks import positive_fields
from ..problems import Problem
from ._base import Solver, options
from ._common import batch_for, fresh_state, point

__all__ = ["Adam"]


@options
class Adam(Solver):
    r"""Adam (Kingma & Ba 2015, Alg. 1) on the solve loop, by ``torch.optim.Adam``.

    Each step rebuilds a ``torch.optim.Adam`` over the flat parameter vector from the
    moments kept in the state, so results equal a plain ``torch.optim.Adam`` loop and the
    state stays a plain container of tensors. On an iterable of batches each step draws
    the next batch.

    Args:
        lr: step size (paper default 1e-3).
        betas: moment decay rates (paper default (0.9, 0.999)).
        eps: denominator term (paper default 1e-8).
        weight_decay: L2 penalty added to the gradient (as ``torch.optim.Adam``).
        amsgrad: use the AMSGrad variant.
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False

    def __post_init__(self) -> None:
        positive_fields(self, "lr", "eps")
        positive_fields(self, "weight_decay", allow_zero=True)
        if not (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)):
            raise ValueError(f"Adam.betas must be two numbers in [0, 1), got {self.betas!r}")

    def init(self, problem: Problem) -> dict[str, Any]:
        return fresh_state(problem, adam=None)

    def step(self, problem: Problem, state: dict[str, Any]) -> dict[str, Any]:
        p = state["x"].detach().clone().requires_grad_(True)
        opt = torch.optim.Adam(
            [p], lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay, amsgrad=self.amsgrad
        )
        if state["adam"] is not None:
            opt.load_state_dict(state["adam"])
        p.grad = state["grad"].clone()
        opt.step()
        sd = opt.state_dict()
        sd = {
            "state": {k: {n: t.clone() for n, t in v.items()} for k, v in sd["state"].items()},
            "param_groups": sd["param_groups"],
        }
        batch, draws = batch_for(problem, state["draws"])
        new = point(problem, p.detach(), batch)
        return {**state, **new, "adam": sd, "iter": state["iter"] + 1, "step_size": self.lr, "draws": draws}
