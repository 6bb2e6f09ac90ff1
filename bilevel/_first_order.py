r"""Pieces shared by the single-loop solvers F2SA, BO-REP and LV-HBA.

* :func:`draw` — the next outer / inner batch, counting draws in the state;
* :func:`poly_decay` — the polynomial schedules :math:`s_0 ((k + k_0) / k_0)^{-a}` of the papers;
* :func:`project_nonneg_ball` — projection onto :math:`\{\lambda \ge 0, \|\lambda\| \le r\}`;
* :func:`inner_lr` — the inner step :math:`1/L_g` from :func:`bilevel.inner_step_size`'s power
  iteration (the one curvature estimate of :mod:`bilevel`), with its products counted;
* :func:`penalty_solve` — :math:`\arg\min_y f + \lambda g` by the same Newton-CG as :func:`bilevel.solve_inner`;
* :func:`penalty_cap` — the largest useful penalty weight of a dtype (finite-difference reasoning);
* :func:`bb_step` — the safeguarded Barzilai–Borwein outer step of the deterministic defaults.

Option checks are those of :mod:`curvlab.checks`.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor

from curvlab import Minimize
from curvlab.data import Batch

from ._inner import default_inner_rtol, default_newton, inner_lipschitz, run_stalling
from ._problem import BilevelProblem

__all__ = [
    "draw",
    "poly_decay",
    "project_nonneg_ball",
    "inner_lr",
    "penalty_cap",
    "penalty_solve",
    "bb_step",
    "norm",
]


def norm(v: Tensor) -> float:
    """The Euclidean norm of a flat tensor as a float."""
    return float(torch.linalg.vector_norm(v))


def draw(problem: BilevelProblem, state: dict[str, Any], which: str) -> Batch:
    """The next batch of the ``"outer"`` or ``"inner"`` data; increments ``state["draws_<which>"]`` in place.

    A deterministic problem (``None`` or one batch) returns the same batch every time
    (``None`` without data), so every solver runs unchanged in both regimes.
    """
    key = f"draws_{which}"
    pos = int(state.get(key, 0))
    state[key] = pos + 1
    return problem.draw_outer(pos) if which == "outer" else problem.draw_inner(pos)


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


def inner_lr(problem: BilevelProblem, state: dict[str, Any], x: Tensor, y: Tensor, batch: Any) -> float:
    r""":math:`1/L_g`, :math:`L_g` the top eigenvalue of :math:`\nabla^2_{yy} g(x, y)` on ``batch``.

    :func:`bilevel.inner_lipschitz` (the one HVP power iteration, the estimate behind
    :func:`bilevel.inner_step_size`); its products are added to ``state["hvps"]``.
    """
    L, n = inner_lipschitz(problem, x, y, batch)
    state["hvps"] = int(state.get("hvps", 0)) + int(n)
    return 1.0 / L


def penalty_solve(
    problem: BilevelProblem,
    x: Tensor,
    y0: Tensor,
    lam: float,
    rtol: float,
    deadline: float | None = None,
    max_iter: int = 20,
    inner_scale: float | None = None,
) -> tuple[Tensor, int, int, float]:
    r"""Minimise the penalty objective :math:`f(x, \cdot) + \lambda g(x, \cdot)` from ``y0`` (whole data).

    The Newton-CG of :func:`bilevel.solve_inner` (:func:`~bilevel._inner.default_newton`, with its stall
    rule) applied to the penalty objective of F2SA / LV-HBA instead of ``g``, to the gradient test
    :math:`\|\nabla_y f + \lambda\nabla_y g\| \le` ``rtol`` :math:`\cdot\|\nabla_y f(x, y_0)\|`
    (the error of :math:`\lambda(y - y^*)` relative to its size). That test can lie under the rounding
    noise of :math:`\lambda\nabla_y g` (in float32 at once): a gradient norm that stops halving below
    :math:`\sqrt\varepsilon(\|\nabla_y f\| + \lambda s)` (``s`` = ``inner_scale``, the reference gradient
    norm of ``g``) ends the solve there instead of at ``max_iter`` (measured on the digits MLP in float32:
    every penalty solve ran to its 20-iteration cap, 0.7 s each). A run that ends at the limit of precision
    keeps its last iterate.

    Returns:
        ``(y, gradient evaluations, Hessian-vector products, ‖∇_y f + λ∇_y g‖)``.
    """
    xd = x.detach()
    fy = problem.grad_f_y(xd, y0)
    tol = float(rtol) * max(norm(fy), torch.finfo(problem.dtype).tiny)
    if not math.isfinite(tol):  # non-finite ∇_y f: nothing to solve, the caller's estimate turns non-finite
        return y0, 1, 0, math.nan
    scale = norm(fy) + lam * (float(inner_scale) if inner_scale is not None and math.isfinite(inner_scale) else 0.0)
    reach = max(tol, math.sqrt(torch.finfo(problem.dtype).eps) * scale)
    left = None if deadline is None else max(deadline - time.perf_counter(), 1e-3)
    prob = Minimize(lambda v: problem.f_diff(xd, v) + lam * problem.g_diff(xd, v), y0.detach().clone())
    r, _ = run_stalling(
        default_newton(problem.dy, problem.dtype), prob, max_iter, tol, reach, left, None, problem.dtype
    )
    st = r.state or {}
    y = r.flat.detach().reshape(-1).to(problem.dtype)
    if not bool(torch.isfinite(y).all()):
        y = y0
    return y, int(r.n_iter) + 2, int(st.get("matvecs", 0)), float(st.get("grad_norm", math.nan))


def penalty_cap(dtype: torch.dtype) -> float:
    r"""The largest penalty weight worth reaching in ``dtype``: :math:`\tau^{-1/2}` with :math:`\tau` the inner
    solves' relative accuracy :func:`~bilevel.default_inner_rtol` (:math:`\varepsilon^{-1/3}` = 1.65e5 in
    float64, :math:`\varepsilon^{-1/4}` = 54 in float32).

    A penalty estimate :math:`\lambda(\nabla_x g(x, y_\lambda) - \nabla_x g(x, z))` is a forward
    difference with step :math:`1/\lambda` (:math:`y_\lambda - z = O(1/\lambda)`): its bias is
    :math:`O(1/\lambda)`, and the errors of the two inner solves it differences (relative size
    :math:`\tau`) enter multiplied by :math:`\lambda`; the two balance at :math:`\lambda \approx \tau^{-1/2}`
    (the textbook step of a forward difference with a noisy function, Nocedal & Wright 2006, eq. (8.6),
    with the solves' accuracy in place of :math:`\varepsilon`). Beyond it the estimate is dominated by the
    amplified solve errors (measured: at :math:`\varepsilon^{-1/2}` the estimate on a condition-100
    quadratic scattered over 0.03–90 around a true 0.06).
    """
    return 1.0 / math.sqrt(default_inner_rtol(dtype))


#: the largest factor by which the Barzilai–Borwein step may grow from one accepted point to the next
BB_GROWTH = 10.0


def bb_step(state: dict[str, Any], new: dict[str, Any], x: Tensor, h: Tensor, fval: float, probe: float) -> Tensor:
    r"""The deterministic outer update: a nonmonotone Barzilai–Borwein gradient step on the estimate ``h``.

    The global Barzilai–Borwein method (Raydan 1997, Algorithm 1 "GBB"; the spectral step of
    Barzilai & Borwein 1988, eq. (5)) with the estimate ``h`` of :math:`\nabla F(x)` and the estimate
    ``fval`` of :math:`F(x)` the caller computed at ``x`` (after its inner loops):

    * ``x`` is accepted when ``fval`` :math:`\le \max_{j < M} F_{k-j} - 10^{-4}\,\eta\,\|h_a\|^2`
      (Grippo–Lampariello–Lucidi, :math:`M = 10`, :math:`\eta` the step that led to ``x`` from the
      last accepted point ``x_a``) or when that decrease is below the rounding noise of ``F``
      (:math:`\sqrt\varepsilon |F|`), or after three rejections in a row when it does not exceed that
      reference (the estimates carry errors of their own: the run moves on rather than stalling, but never
      to a point worse than the last ``M`` accepted ones); the next step from it is
      :math:`\eta = s^\top s / s^\top u` (:math:`s = x - x_a`, :math:`u = h - h_a`: the inverse of the curvature of
      :math:`F` along the last step, from two hypergradient estimates, so the step follows the
      problem's scale, e.g. :math:`O(n)` for per-example hyperparameters with :math:`O(1/n)`
      hypergradients), kept within :math:`[10^{-3}, 10]\times` the previous step (:data:`BB_GROWTH`: a step
      that grew 233-fold at once threw the 64 per-feature penalties of the digits logistic regression onto
      the plateau :math:`e^{x_j} \gg 1` where their hypergradients vanish, at 10 times AID's validation loss);
      :math:`s^\top u \le 0` (no positive curvature seen) keeps the previous step (doubling it, on the float32
      digits MLP, walked the weight decays to e^-7 at 0.1262 > the 0.1096 reached, through growing inner solves);
    * otherwise ``x`` is rejected and the step from ``x_a`` is retried at a quarter of its length
      (Raydan's backtracking), ``h_a`` reused;
    * the first step (no accepted point yet) moves by ``probe`` :math:`\cdot\max(1, \|x\|)`.

    Reads and writes ``bb_x``, ``bb_h`` (last accepted point and estimate), ``bb_eta`` (step taken
    from it), ``bb_f`` (recent accepted values) in ``state`` / ``new``.

    Returns:
        The next point (before the caller's projection onto ``x_set``).
    """
    xa, ha, eta = state.get("bb_x"), state.get("bb_h"), state.get("bb_eta")
    hist = list(state.get("bb_f") or [])
    tiny = torch.finfo(h.dtype).tiny
    if xa is None or ha is None or eta is None:
        eta = probe * max(1.0, norm(x)) / max(norm(h), tiny)
        new.update(bb_x=x, bb_h=h, bb_eta=eta, bb_f=[fval], bb_rejects=0)
        return x - eta * h
    eta = float(eta)
    ref = max(hist) if hist else math.inf
    noise = math.sqrt(torch.finfo(h.dtype).eps) * max(abs(fval), abs(ref) if math.isfinite(ref) else 0.0)
    need = 1e-4 * eta * float(ha @ ha)
    rejects = int(state.get("bb_rejects", 0))
    ok = fval <= ref - need or (fval <= ref + noise and need <= noise) or (rejects >= 3 and fval <= ref + noise)
    if math.isfinite(fval) and ok:
        s, u = x - xa, h - ha
        su, ss = float(s @ u), float(s @ s)
        step = ss / su if su > 0 else eta
        step = min(max(step, 1e-3 * eta), BB_GROWTH * eta)
        if not math.isfinite(step) or step <= 0:
            step = eta
        new.update(bb_x=x, bb_h=h, bb_eta=step, bb_f=(hist + [fval])[-10:], bb_rejects=0)
        return x - step * h
    eta *= 0.25
    new.update(bb_eta=eta, bb_rejects=rejects + 1)
    return xa - eta * ha
