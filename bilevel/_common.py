r"""Pieces shared by the bilevel solvers: inner gradient steps, the implicit hypergradient,
step-size estimation and the outer SGD/Adam update. Everything works on flat vectors and
never forms a ``dx × dy`` or ``dy × dy`` matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from curvlab.linops import MatvecOperator
from implicit._linear_solve import SOLVES, LinearSolveInfo

from ._base import _count
from ._problem import BilevelProblem

__all__ = [
    "inverse_hvp",
    "implicit_hypergradient",
    "inner_gd",
    "estimate_inner_lipschitz",
    "outer_update",
    "check_solve",
]


def check_solve(obj: Any, name: str = "solve") -> None:
    """Validate a ``solve`` option: a name in :data:`implicit.SOLVES` or a callable ``solve(matvec, b, **opts)``."""
    s = getattr(obj, name)
    if not (callable(s) or (isinstance(s, str) and s in SOLVES)):
        raise ValueError(
            f"{type(obj).__name__}.{name} must be one of {sorted(SOLVES)} or a callable solve(matvec, b, **options), "
            f"got {s!r}"
        )


def inverse_hvp(
    problem: BilevelProblem,
    x: Tensor,
    y: Tensor,
    rhs: Tensor,
    batch: Any,
    solve: str | Callable[..., Any] = "cg",
    **options: Any,
) -> tuple[Tensor, int, LinearSolveInfo | None]:
    r"""Solve :math:`\nabla^2_{yy} g(x, y)\, w = \text{rhs}` matrix-free.

    Args:
        solve: a name of :data:`implicit.SOLVES` (``"cg"``, ``"neumann"``, ``"minres"``, ...)
            or a callable ``solve(matvec, b, **options) -> w``.
        **options: options of the solve (``tol``, ``maxiter``, ``x0``; ``alpha``, ``K`` for Neumann).

    Returns:
        ``(w, n_hvps, info)`` (``info`` is ``None`` for a user callable).
    """
    op = MatvecOperator(
        problem.hvp_yy_operator(x, y, batch), rhs.shape[0], rhs.dtype, rhs.device, symmetric=True, psd=True
    )
    if callable(solve):
        w = solve(op, rhs, **options)
        return w, op.n_matvecs, None
    options = {k: v for k, v in options.items() if v is not None}
    w, info = SOLVES[solve](op, rhs, **options)
    return w.detach(), op.n_matvecs, info


def implicit_hypergradient(
    problem: BilevelProblem,
    x: Tensor,
    y: Tensor,
    outer_batch: Any,
    inner_batch: Any,
    solve: str | Callable[..., Any] = "cg",
    state: dict[str, Any] | None = None,
    **options: Any,
) -> tuple[Tensor, Tensor, Tensor, LinearSolveInfo | None]:
    r"""The implicit (IFT) hypergradient at ``(x, y)``:

    .. math::
        \hat\nabla F = \nabla_x f - \nabla^2_{xy} g\, w, \qquad \nabla^2_{yy} g\, w = \nabla_y f

    (Lorraine et al. 2020, eq. (3) / Algorithm 2; Ghadimi & Wang 2018's AID).
    Adds its oracle calls to ``state`` (1 gradient, the solve's HVPs + 1 mixed product).

    Returns:
        ``(hypergradient, w, f(x, y) on outer_batch, info)``.
    """
    val, gx, gy = problem.f_and_grad(x, y, outer_batch)
    w, n, info = inverse_hvp(problem, x, y, gy, inner_batch, solve, **options)
    jx = problem.jvp_xy_g(x, y, w, inner_batch)
    if state is not None:
        _count(state, grads=1, hvps=n + 1)
    return gx - jx, w, val, info


def inner_gd(
    problem: BilevelProblem,
    x: Tensor,
    y: Tensor,
    lr: float,
    steps: int,
    state: dict[str, Any],
    tol: float = 0.0,
) -> tuple[Tensor, float]:
    r"""Up to ``steps`` projected gradient steps :math:`y \leftarrow \Pi_Y(y - \text{lr}\,\nabla_y g(x, y))`.

    Each step draws the next inner batch (``state["draws_inner"]``) and counts one gradient.
    Stops early when :math:`\|\nabla_y g\| \le` ``tol`` (checked before stepping). On deterministic
    data, a gradient norm growing tenfold (the step exceeds :math:`2/L` after ``x`` moved) halves the
    step, stores it in ``state["inner_lr"]`` and restarts the loop from the given ``y``.

    Returns:
        The new ``y`` and the last gradient norm seen.
    """
    res = math.nan
    first = math.nan
    y_start = y
    for _ in range(steps):
        batch = problem.draw_inner(state["draws_inner"])
        state["draws_inner"] += 1
        gy = problem.grad_g_y(x, y, batch)
        _count(state, grads=1)
        res = float(torch.linalg.vector_norm(gy))
        if math.isnan(first):
            first = res
        elif not problem.stochastic and (not math.isfinite(res) or res > 10 * first):
            # deterministic GD diverging (the step exceeds 2/L since x moved): halve the step and restart
            lr = 0.5 * lr
            state["inner_lr"] = lr
            y, first = y_start, math.nan
            continue
        if tol > 0 and res <= tol:
            break
        y = problem.project_y(y - lr * gy)
    return y, res


def estimate_inner_lipschitz(
    problem: BilevelProblem, x: Tensor, y: Tensor, batch: Any, iters: int = 20, seed: int = 0
) -> tuple[float, int]:
    r"""Largest eigenvalue of :math:`\nabla^2_{yy} g(x, y)` by ``iters`` power iterations.

    Returns:
        ``(L, n_hvps)``.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(problem.dy, generator=gen, dtype=problem.dtype).to(problem.device)
    v = v / torch.linalg.vector_norm(v)
    matvec = problem.hvp_yy_operator(x, y, batch)
    lam = 0.0
    for _ in range(iters):
        hv = matvec(v)
        lam = float(v @ hv)
        n = torch.linalg.vector_norm(hv)
        if not torch.isfinite(n) or n == 0:
            break
        v = hv / n
    return max(abs(lam), 1e-12), iters


def outer_update(
    x: Tensor,
    hg: Tensor,
    state: dict[str, Any],
    new: dict[str, Any],
    lr: float,
    optimizer: str,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> Tensor:
    r"""One outer step on the hypergradient ``hg``: SGD :math:`x - \eta\,h`, or Adam (Kingma & Ba 2015, Alg. 1).

    Adam's moments live in ``state["adam_m"]``, ``state["adam_v"]``, ``state["adam_t"]`` (copied into ``new``).
    """
    if optimizer == "sgd":
        return x - lr * hg
    t = int(state.get("adam_t", 0)) + 1
    m = state.get("adam_m")
    v = state.get("adam_v")
    m = (1 - betas[0]) * hg if m is None else betas[0] * m + (1 - betas[0]) * hg
    v = (1 - betas[1]) * hg * hg if v is None else betas[1] * v + (1 - betas[1]) * hg * hg
    new["adam_m"], new["adam_v"], new["adam_t"] = m, v, t
    mhat = m / (1 - betas[0] ** t)
    vhat = v / (1 - betas[1] ** t)
    return x - lr * mhat / (vhat.sqrt() + eps)
