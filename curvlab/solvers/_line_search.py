"""Backtracking line searches shared by the solvers."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LineSearchResult", "armijo"]


@dataclass
class LineSearchResult:
    """Outcome of a line search: accepted step ``t``, the value there, evaluations used, success."""

    t: float
    value: Tensor | None
    n_evals: int
    success: bool


def armijo(
    phi: Callable[[float], Tensor],
    f0: Tensor | float,
    slope: Tensor | float,
    t0: float = 1.0,
    c1: float = 1e-4,
    shrink: float = 0.5,
    max_iter: int = 30,
) -> LineSearchResult:
    r"""Armijo backtracking (Nocedal & Wright 2006, Alg. 3.1).

    Tries :math:`t = t_0, \rho t_0, \rho^2 t_0, \dots` and accepts the first with
    :math:`\varphi(t) \le f_0 + c_1 t\, \varphi'(0)`; a non-finite :math:`\varphi(t)` counts
    as a failure of the test (the step shrinks), so a line search never accepts NaN.

    Args:
        phi: ``t -> f(x + t d)`` (a scalar tensor).
        f0: ``f(x)``.
        slope: the directional derivative ``∇f(x)ᵀd`` (must be negative).
        t0: first trial step.
        c1: sufficient-decrease constant in (0, 1).
        shrink: backtracking factor in (0, 1).
        max_iter: maximum number of trials.

    Returns:
        A :class:`LineSearchResult`; ``success=False`` if no trial passed (``t`` is then the
        last trial and ``value`` its value) or ``slope >= 0``.
    """
    f0f, s = float(f0), float(slope)
    if not (s < 0 and math.isfinite(s)):
        return LineSearchResult(0.0, None, 0, False)
    t, val = t0, None
    for i in range(1, max_iter + 1):
        val = phi(t)
        fv = float(val)
        if math.isfinite(fv) and fv <= f0f + c1 * t * s:
            return LineSearchResult(t, val, i, True)
        t *= shrink
    return LineSearchResult(t / shrink, val if val is not None and bool(torch.isfinite(val)) else None, max_iter, False)
