r"""Outer updates of the composition: how ``x`` moves given a hypergradient.

* Deterministic problems (one batch, or ``ALL``): a quasi-Newton direction
  (:func:`curvlab.solvers.lbfgs_direction`, Nocedal & Wright 2006, Alg. 7.4; steepest descent with an
  ``x_set``, projected) and the one Armijo backtracking search (:class:`curvlab.solvers.Armijo`,
  Nocedal & Wright 2006, Alg. 3.1) on the outer value the estimator returns (:math:`\tilde F`).
  The line search makes the step follow the problem's scale: per-example hyperparameters, whose
  hypergradient entries are :math:`O(1/n)`, get steps that do not vanish with ``n`` (the first
  trial moves ``x`` by a unit length, :math:`t_0 = 1/\|\hat\nabla F\|`, and the quasi-Newton
  scaling :math:`s^\top y / y^\top y` takes over from the second iteration).
* Stochastic problems: Adam (Kingma & Ba 2015, Alg. 1: per-coordinate scale-free steps),
  the normalized step :math:`x - \eta\, h / \|h\|` (scale-free in the size of ``h``) or plain SGD.

The functions are pure: they take and return tensors and plain lists, so solver states holding
their memories can be saved and resumed bit-identically.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from curvlab.solvers import lbfgs_direction

__all__ = ["OUTER_OPTIMIZERS", "quasi_newton_direction", "first_trial", "stochastic_update"]

#: outer optimizers: ``"lbfgs"`` / ``"gd"`` (with the Armijo search), ``"adam"``, ``"normalized"``, ``"sgd"``
OUTER_OPTIMIZERS = ("auto", "lbfgs", "gd", "adam", "normalized", "sgd")


def quasi_newton_direction(hg: Tensor, S: list[Tensor], Y: list[Tensor]) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    r"""The L-BFGS direction :math:`-H_k \hat\nabla F`; ``-hg`` (and a cleared memory) if it is not a descent direction.

    Returns:
        ``(d, S, Y)`` with the memory to keep.
    """
    d = lbfgs_direction(hg, S, Y)
    if S and not float(hg @ d) < 0:
        return -hg, [], []
    return d, list(S), list(Y)


def first_trial(
    hg_norm: float, d: Tensor, has_memory: bool, lr: float | None, t_prev: float | None, longest: float | None
) -> float:
    r"""The first trial step of the outer line search.

    A quasi-Newton direction starts at ``1`` (the unit quasi-Newton step); steepest descent at
    ``lr`` when given, else :math:`2 t_{\text{prev}}` after a first search and :math:`1/\|\hat\nabla F\|`
    (a unit move of ``x``) before. Safeguard: never more than 10 times the longest accepted move.
    """
    if has_memory:
        t = 1.0
    elif lr is not None:
        t = float(lr)
    elif t_prev is not None and t_prev > 0:
        t = 2.0 * float(t_prev)
    else:
        t = 1.0 / max(hg_norm, 1e-300)
    if longest is not None and longest > 0:
        t = min(t, 10.0 * float(longest) / max(float(torch.linalg.vector_norm(d)), 1e-300))
    return t


def stochastic_update(
    x: Tensor,
    hg: Tensor,
    memory: dict[str, Any],
    method: str,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> tuple[Tensor, dict[str, Any]]:
    r"""One fixed-step outer update: ``"adam"`` (Kingma & Ba 2015, Alg. 1), ``"normalized"`` or ``"sgd"``.

    Args:
        x: flat current point; hg: hypergradient estimate.
        memory: ``{"adam_m", "adam_v", "adam_t"}`` (Adam's moments; not modified).
        method: ``"adam"``, ``"normalized"`` (:math:`x - \text{lr}\, h/\|h\|`) or ``"sgd"`` (:math:`x - \text{lr}\, h`).
        lr: the step size.

    Returns:
        ``(x_new, new_memory)``.
    """
    if method == "sgd":
        return x - lr * hg, dict(memory)
    if method == "normalized":
        n = torch.linalg.vector_norm(hg)
        return (x if float(n) == 0 else x - lr * hg / n), dict(memory)
    t = int(memory.get("adam_t", 0)) + 1
    m, v = memory.get("adam_m"), memory.get("adam_v")
    m = (1 - betas[0]) * hg if m is None else betas[0] * m + (1 - betas[0]) * hg
    v = (1 - betas[1]) * hg * hg if v is None else betas[1] * v + (1 - betas[1]) * hg * hg
    mhat = m / (1 - betas[0] ** t)
    vhat = v / (1 - betas[1] ** t)
    return x - lr * mhat / (vhat.sqrt() + eps), {"adam_m": m, "adam_v": v, "adam_t": t}
