r"""The L-BFGS two-loop recursion (Nocedal & Wright 2006, *Numerical Optimization*, Alg. 7.4 and eq. (7.20)).

:func:`lbfgs_direction` returns :math:`-H_k g` for the inverse-Hessian approximation built from the
stored pairs :math:`s_i = x_{i+1} - x_i`, :math:`y_i = \nabla f_{i+1} - \nabla f_i` with the initial
matrix :math:`H_k^0 = \gamma_k I`, :math:`\gamma_k = s^\top y / y^\top y` of the newest pair
(eq. (7.20)). :func:`lbfgs_update` keeps the memory: a pair is stored only when the curvature
condition :math:`s^\top y > 0` holds with a margin (so :math:`H_k` stays positive definite), and
the oldest pair is dropped beyond ``memory``. Used by :mod:`bilevel`'s outer update (and by any
solver that wants quasi-Newton directions); nothing here evaluates a function.

Example:
    >>> import torch
    >>> A = torch.diag(torch.tensor([1.0, 10.0], dtype=torch.float64))
    >>> S, Y = [], []
    >>> for s in (torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)):
    ...     S, Y = lbfgs_update(S, Y, s, A @ s, memory=5)
    >>> g = torch.tensor([1.0, 1.0], dtype=torch.float64)
    >>> torch.allclose(lbfgs_direction(g, S, Y), -torch.linalg.solve(A, g))
    True
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..checks import check_int

__all__ = ["lbfgs_direction", "lbfgs_update"]


def lbfgs_direction(g: Tensor, S: list[Tensor], Y: list[Tensor]) -> Tensor:
    r"""The L-BFGS direction :math:`-H_k g` by the two-loop recursion (Nocedal & Wright 2006, Alg. 7.4).

    Args:
        g: the current gradient (flat).
        S, Y: the stored pairs, oldest first (equal lengths; every :math:`s_i^\top y_i > 0`).

    Returns:
        :math:`-H_k g` with :math:`H_k^0 = (s^\top y / y^\top y) I` from the newest pair; ``-g`` without pairs.

    Raises:
        ValueError: ``S`` and ``Y`` of different lengths.
    """
    if len(S) != len(Y):
        raise ValueError(f"S and Y must hold the same number of pairs, got {len(S)} and {len(Y)}")
    if not S:
        return -g
    q = g.clone()
    rhos = [1.0 / (s @ yv) for s, yv in zip(S, Y)]
    alphas = []
    for s, yv, rho in zip(reversed(S), reversed(Y), reversed(rhos)):
        a = rho * (s @ q)
        alphas.append(a)
        q = q - a * yv
    q = q * ((S[-1] @ Y[-1]) / (Y[-1] @ Y[-1]))
    for s, yv, rho, a in zip(S, Y, rhos, reversed(alphas)):
        b = rho * (yv @ q)
        q = q + (a - b) * s
    return -q


def lbfgs_update(
    S: list[Tensor], Y: list[Tensor], s: Tensor, y: Tensor, memory: int = 10, eps: float = 1e-10
) -> tuple[list[Tensor], list[Tensor]]:
    r"""New pair lists with ``(s, y)`` appended when :math:`s^\top y > \text{eps}\,\|s\|\|y\|`, at most ``memory`` kept.

    The input lists are not modified (states holding them stay valid for resuming).

    Args:
        S, Y: the stored pairs, oldest first.
        s, y: the new step and gradient change.
        memory: pairs kept (``>= 1``).
        eps: relative curvature margin (a pair failing it is skipped, Nocedal & Wright 2006, §7.2).

    Returns:
        ``(S, Y)`` as new lists.

    Raises:
        ValueError: ``memory`` not an integer ``>= 1``.
    """
    check_int(memory, "memory")
    sy = float(s @ y)
    if not sy > eps * float(torch.linalg.vector_norm(s) * torch.linalg.vector_norm(y)):
        return list(S), list(Y)
    return (list(S) + [s])[-memory:], (list(Y) + [y])[-memory:]
