"""Small pieces shared by the single-loop solvers F2SA, BO-REP and LV-HBA.

* :func:`draw` — the next outer / inner batch, counting draws in the state;
* :func:`poly_decay` — the polynomial schedules :math:`s_0 ((k + k_0) / k_0)^{-a}` of the papers;
* :func:`project_nonneg_ball` — projection onto :math:`\\{\\lambda \\ge 0, \\|\\lambda\\| \\le r\\}`;
* :func:`check_choice`, :func:`check_int` — option validation with clear messages.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from curvlab.data import Batch

from ._problem import BilevelProblem

__all__ = [
    "draw",
    "estimate_smoothness_fd",
    "poly_decay",
    "project_nonneg_ball",
    "check_choice",
    "check_int",
    "check_unit",
]


def draw(problem: BilevelProblem, state: dict[str, Any], which: str) -> Batch:
    """The next batch of the ``"outer"`` or ``"inner"`` data; increments ``state["draws_<which>"]`` in place.

    A deterministic problem (``None`` or one batch) returns the same batch every time
    (``None`` without data), so every solver runs unchanged in both regimes.
    """
    key = f"draws_{which}"
    pos = int(state.get(key, 0))
    state[key] = pos + 1
    return problem.draw_outer(pos) if which == "outer" else problem.draw_inner(pos)


def estimate_smoothness_fd(
    grad_y: Any, y: Tensor, iters: int = 10, seed: int = 0, rel_eps: float | None = None
) -> tuple[float, int]:
    r"""Largest curvature of a function in ``y`` from gradients only (power iteration on finite differences).

    :math:`H v \approx (\nabla(y + \epsilon v) - \nabla(y)) / \epsilon` keeps a first-order method first
    order; ``iters`` power iterations give :math:`L \approx \|Hv\|` (an underestimate of
    :math:`\lambda_{\max}` at worst by the power method's convergence; the callers halve the step for margin).

    Args:
        grad_y: ``y -> gradient`` (flat).
        y: the point.
        iters: power iterations (each one gradient).
        seed: seed of the start vector.
        rel_eps: difference step relative to ``max(1, ‖y‖)`` (default ``sqrt(eps)`` of the dtype).

    Returns:
        ``(L, n_gradients)``.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(y.numel(), generator=gen, dtype=y.dtype).to(y.device)
    v = v / torch.linalg.vector_norm(v)
    eps = (math.sqrt(torch.finfo(y.dtype).eps) if rel_eps is None else rel_eps) * max(1.0, float(y.norm()))
    g0 = grad_y(y)
    L = 0.0
    for _ in range(iters):
        hv = (grad_y(y + eps * v) - g0) / eps
        n = float(torch.linalg.vector_norm(hv))
        if not math.isfinite(n) or n == 0.0:
            break
        L, v = n, hv / n
    return max(L, 1e-12), iters + 1


def poly_decay(s0: float, k: int, exponent: float, k0: float = 1.0) -> float:
    """:math:`s_0 \\big((k + k_0)/k_0\\big)^{-\\text{exponent}}` — equal to ``s0`` at ``k = 0``."""
    return s0 * ((k + k0) / k0) ** (-exponent)


def project_nonneg_ball(v: Tensor, radius: float) -> Tensor:
    """Projection onto :math:`\\{v \\ge 0, \\|v\\|_2 \\le r\\}` (clamp, then scale: exact for a ball at 0)."""
    v = v.clamp_min(0)
    if math.isinf(radius) or v.numel() == 0:
        return v
    n = torch.linalg.vector_norm(v)
    return v * torch.clamp(radius / n.clamp_min(torch.finfo(v.dtype).tiny), max=1.0)


def check_choice(obj: Any, name: str, choices: tuple[Any, ...]) -> None:
    """Raise ``ValueError`` unless ``getattr(obj, name)`` is one of ``choices``."""
    v = getattr(obj, name)
    if v not in choices:
        raise ValueError(f"{type(obj).__name__}.{name} must be one of {list(choices)}, got {v!r}")


def check_int(obj: Any, *names: str, minimum: int = 1) -> None:
    """Raise ``ValueError`` unless each option is an ``int`` (not bool) ``>= minimum``."""
    for n in names:
        v = getattr(obj, n)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ValueError(f"{type(obj).__name__}.{n} must be an integer >= {minimum}, got {v!r}")


def check_unit(obj: Any, name: str, closed_right: bool = False) -> None:
    """Raise ``ValueError`` unless the option lies in ``[0, 1)`` (or ``[0, 1]``)."""
    v = getattr(obj, name)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v and (v <= 1 if closed_right else v < 1)
    if not ok:
        raise ValueError(f"{type(obj).__name__}.{name} must be in [0, 1{']' if closed_right else ')'}, got {v!r}")
