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

from curvlab.linalg import cg
from curvlab.linops import MatvecOperator
from curvlab.problems import ALL
from implicit._linear_solve import SOLVES, LinearSolveInfo

from ._base import _count
from ._graph import InnerGraph
from ._problem import BilevelProblem

__all__ = [
    "inverse_hvp",
    "implicit_hypergradient",
    "graph_solve",
    "inner_gd",
    "inner_newton",
    "inner_with_solver",
    "estimate_inner_lipschitz",
    "outer_update",
    "lbfgs_direction",
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


def graph_solve(
    graph: InnerGraph, rhs: Tensor, solve: str | Callable[..., Any] = "cg", **options: Any
) -> tuple[Tensor, LinearSolveInfo | None]:
    r"""Solve :math:`\nabla^2_{yy} g\, w = \text{rhs}` with the products of one :class:`InnerGraph`.

    ``solve="dense"`` factors the dense Hessian (:meth:`InnerGraph.solve_dense`, small ``dy``); any other
    name of :data:`implicit.SOLVES` or a callable ``solve(matvec, b, **options)`` runs matrix-free.
    """
    if solve == "dense":
        return graph.solve_dense(rhs), None
    op = graph.matvec_operator()
    if callable(solve):
        return solve(op, rhs, **options), None
    options = {k: v for k, v in options.items() if v is not None}
    w, info = SOLVES[solve](op, rhs, **options)
    return w.detach(), info


def implicit_hypergradient(
    problem: BilevelProblem,
    x: Tensor,
    y: Tensor,
    outer_batch: Any,
    inner_batch: Any,
    solve: str | Callable[..., Any] = "cg",
    state: dict[str, Any] | None = None,
    graph: InnerGraph | None = None,
    **options: Any,
) -> tuple[Tensor, Tensor, Tensor, LinearSolveInfo | None]:
    r"""The implicit (IFT) hypergradient at ``(x, y)``:

    .. math::
        \hat\nabla F = \nabla_x f - \nabla^2_{xy} g\, w, \qquad \nabla^2_{yy} g\, w = \nabla_y f

    (Lorraine et al. 2020, eq. (3) / Algorithm 2; Ghadimi & Wang 2018's AID).
    The solve's products and the mixed product go through one :class:`InnerGraph` at ``(x, y)``
    (pass ``graph`` to reuse one built already, e.g. by a Newton inner solve).
    Adds its oracle calls to ``state`` (1 gradient, the solve's HVPs + 1 mixed product).

    Returns:
        ``(hypergradient, w, f(x, y) on outer_batch, info)``.
    """
    val, gx, gy = problem.f_and_grad(x, y, outer_batch)
    G = InnerGraph(problem, x, y, inner_batch) if graph is None else graph
    n0 = G.n_products
    w, info = graph_solve(G, gy, solve, **options)
    jx = G.jxy(w)
    if state is not None:
        _count(state, grads=1, hvps=G.n_products - n0)
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


def _forcing(gnorm: float, tol: float) -> float:
    r"""Relative CG tolerance of a Newton step: quadratic forcing :math:`\min(1/2, \|g\|)`, never tighter
    than needed to land within ``tol`` (Nocedal & Wright 2006, Thm. 7.2 and eq. (7.3))."""
    return min(0.5, max(min(0.5, gnorm), 0.1 * tol / max(gnorm, 1e-300)))


def inner_newton(
    problem: BilevelProblem,
    x: Tensor,
    y: Tensor,
    tol: float,
    max_iter: int,
    state: dict[str, Any],
    method: str = "newton_cg",
    cg_maxiter: int | None = None,
    c1: float = 1e-4,
) -> tuple[Tensor, InnerGraph, float, int]:
    r"""Newton's method on :math:`g(x, \cdot)` (whole inner data) from ``y`` until :math:`\|\nabla_y g\| \le` ``tol``.

    Each iteration builds one :class:`InnerGraph` at the current ``y`` (one gradient), solves
    :math:`\nabla^2_{yy} g\, d = -\nabla_y g` — by CG to the forcing tolerance of :func:`_forcing`
    (``method="newton_cg"``, Nocedal & Wright 2006, Alg. 7.1) or by a Cholesky factorisation of the dense
    Hessian (``method="newton"``, small ``dy``) — and takes the Armijo step from :math:`t = 1` (halving).
    The loop ends with a graph *at the returned point*, so its products serve the adjoint solve and the
    mixed product of the hypergradient without another forward pass.

    Returns:
        ``(y, graph at y, ‖∇_y g(x, y)‖, Newton iterations)``.
    """
    it = 0
    while True:
        G = InnerGraph(problem, x, y, ALL)
        _count(state, grads=1)
        gnorm = float(torch.linalg.vector_norm(G.gy))
        if gnorm <= tol or it >= max_iter or not math.isfinite(gnorm):
            return y, G, gnorm, it
        it += 1
        n0 = G.n_products
        if method == "newton":
            d = -G.solve_dense(G.gy)
        else:
            res = cg(G.matvec_operator(), -G.gy, tol=_forcing(gnorm, tol), maxiter=cg_maxiter)
            d = res.x
            if not bool(d.abs().sum() > 0):  # negative curvature on the first CG step
                d = -G.gy
        _count(state, hvps=G.n_products - n0)
        slope = float(G.gy @ d)
        if not slope < 0:
            d, slope = -G.gy, -gnorm * gnorm
        g0, t = float(G.value), 1.0
        for _ in range(30):
            gt = float(problem.g(x, y + t * d))
            if math.isfinite(gt) and gt <= g0 + c1 * t * slope:
                break
            t *= 0.5
        else:
            return y, G, gnorm, it  # no decrease at the limit of precision: keep the current point
        y = (y + t * d).detach()


def inner_with_solver(
    problem: BilevelProblem, x: Tensor, y: Tensor, solver: Any, tol: float, max_iter: int, state: dict[str, Any]
) -> tuple[Tensor, InnerGraph, float, int]:
    r"""Minimise :math:`g(x, \cdot)` (whole inner data) with any :mod:`curvlab` solver, warm-started at ``y``.

    The solver runs on ``curvlab.Minimize`` of the flat ``y`` until its gradient-norm test ``tol`` or
    ``max_iter``; its gradient and curvature products are added to ``state``.

    Returns:
        ``(y, graph at y, ‖∇_y g(x, y)‖, solver iterations)``.
    """
    import curvlab as cl

    xd = x.detach()
    prob = cl.Minimize(lambda yv, *b: problem.g_diff(xd, yv, ALL), y.detach().clone())
    res = solver.solve(prob, max_iter=max_iter, tol=tol)
    st = res.state or {}
    _count(state, grads=int(res.n_iter) + 1, hvps=int(st.get("matvecs", 0)))
    y = res.params.detach().reshape(-1).to(y.dtype)
    G = InnerGraph(problem, x, y, ALL)
    _count(state, grads=1)
    return y, G, float(torch.linalg.vector_norm(G.gy)), int(res.n_iter)


def lbfgs_direction(g: Tensor, S: list[Tensor], Y: list[Tensor]) -> Tensor:
    r"""The L-BFGS direction :math:`-H_k g` by the two-loop recursion (Nocedal & Wright 2006, Alg. 7.4)
    with :math:`H_k^0 = \frac{s^\top y}{y^\top y} I` from the newest pair; ``-g`` without pairs."""
    if not S:
        return -g
    q = g.clone()
    rhos = [1.0 / float(s @ yv) for s, yv in zip(S, Y)]
    alphas = []
    for s, yv, rho in zip(reversed(S), reversed(Y), reversed(rhos)):
        a = rho * float(s @ q)
        alphas.append(a)
        q = q - a * yv
    q = q * (float(S[-1] @ Y[-1]) / float(Y[-1] @ Y[-1]))
    for s, yv, rho, a in zip(S, Y, rhos, reversed(alphas)):
        b = rho * float(yv @ q)
        q = q + (a - b) * s
    return -q


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


def set_inner_lr(problem: BilevelProblem, state: dict[str, Any], inner_lr: float | None) -> None:
    """``state["inner_lr"]``: ``inner_lr``, or ``1/L`` with ``L`` from :func:`estimate_inner_lipschitz` (counted)."""
    if inner_lr is None:
        L, n = estimate_inner_lipschitz(problem, state["x"], state["y"], problem.draw_inner(0))
        _count(state, hvps=n)
        state["inner_lr"] = 1.0 / L
    else:
        state["inner_lr"] = float(inner_lr)


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
