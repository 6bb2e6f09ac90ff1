r"""The one lower-level solve of :mod:`bilevel`: :func:`solve_inner` and :func:`inner_step_size`.

Every bilevel solver needs :math:`y^*(x) = \arg\min_y g(x, y)` at some point: the composition
(IFT / AID) before each hypergradient, the single-loop methods (F2SA, BO-REP, LV-HBA) for the
honest :attr:`BilevelResult.y` at the returned ``x``, and :meth:`BilevelProblem.value` for
:math:`F(x) = f(x, y^*(x))`. They all call :func:`solve_inner`, which runs a :mod:`curvlab`
solver on the single-level problem ``curvlab.Minimize(y -> g(x, y, batch), y0)``:

* deterministic objective (``batch=ALL`` or one fixed batch), no ``y_set``: line-search
  Newton-CG (:class:`curvlab.solvers.NewtonCG`, Nocedal & Wright 2006, Alg. 7.1) — quadratic
  convergence, scale-free (no step size to tune), negative curvature handled as Steihaug;
* a ``y_set`` (or ``solver="gd"``): projected gradient steps
  :math:`y \leftarrow \Pi_Y(y - \eta \nabla_y g)` with :math:`\eta = 1/L` from
  :func:`inner_step_size` (an HVP power iteration), halved whenever ``g`` fails to decrease;
* any :class:`curvlab.solvers.Solver` instance given as ``solver`` (e.g. ``GradientDescent``,
  ``Adam`` for a stochastic-looking objective), run through its ``solve``.

Tolerance (dtype-aware and reachable). The test is :math:`\|\nabla_y g\| \le \tau` with

.. math::
    \tau = \max(\text{tol},\ \text{rtol}\cdot s,\ 10\,\varepsilon\, s),

``s`` the *scale*: the gradient norm at the start of the first solve (pass ``scale=`` from a
previous :class:`InnerResult` to keep one reference across warm-started outer steps; by default
the larger of the gradient norms at ``y0`` and at the problem's ``y0``, so a warm start near the
solution does not tighten the test). ``rtol`` defaults to :func:`default_inner_rtol`:
:math:`\varepsilon^{2/3}` in float64 (3.7e-11, as :func:`curvlab.linalg.default_tol`; Newton gets
there in a step or two) and :math:`\sqrt{\varepsilon}` in float32 and below (3.45e-4: a float32
gradient of a network cannot be resolved much further). Where the decrease of ``g`` falls under its
rounding noise, Newton-CG's line search accepts a step that lowers :math:`\|\nabla_y g\|` (Armijo's tie
rule), so the quadratic convergence of the last steps is not lost to the noise of ``g``; a Newton step
whose line search finds no resolvable decrease (:class:`curvlab.solvers.Armijo`'s precision limit) ends the solve; it
counts as converged only when :math:`\|\nabla_y g\| \le \sqrt{\varepsilon}\, s` (else
``status="stalled"``). Likewise a solve whose gradient norm is below that reachable level and has not
halved for :data:`STALL_WINDOW` (3) Newton iterations (60 steps of another solver) ends as converged: the
tolerance is under the rounding noise of :math:`\nabla_y g` at this point (e.g. far from the ``x`` of the
first solve, where :math:`\|y\|` and so the noise are larger); one above that level whose ``g`` has not
moved beyond its rounding noise meanwhile ends as ``"stalled"`` (not converged) instead of running to the cap.
A stalled, capped or line-search-failed default solve is retried once in Jacobi-scaled variables
:math:`z = \sqrt{|\mathrm{diag}\,\nabla^2_{yy} g|} \odot y` (see :func:`_jacobi_retry`): curvatures spread
over many orders (penalties :math:`e^{x_j}` up to 1e19 beside unregularised coordinates) spoil CG's
directions; in ``z`` the Hessian has a unit diagonal.

Cost. Up to :data:`NEWTON_DENSE_MAX` (64) variables each Newton step is exact: the Hessian formed by one
block product and factored (:attr:`curvlab.solvers.NewtonCG.dense_max`), so ill-conditioned small problems
(penalties :math:`e^{x_j}` spread over many orders) converge quadratically in a few steps. The iteration cap
scales with the problem: 100 Newton iterations (each with at most ``min(250, 2 dy + 10)`` CG products in
float64, ``min(100, 2 dy + 10)`` in float32: :func:`default_newton`), or
:math:`\min(20000, \max(1000, 100\, d_y))` gradient steps; ``deadline`` (a :func:`time.perf_counter`
value) stops the solve with ``status="time_limit"`` and what it has.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvlab import Minimize
from curvlab.checks import check_int, is_number
from curvlab.problems import ALL
from curvlab.solvers import NewtonCG, Solver
from curvlab.status import Status

from ._problem import BilevelProblem

__all__ = [
    "InnerResult",
    "InnerSolveWarning",
    "InnerSolveError",
    "solve_inner",
    "inner_step_size",
    "inner_lipschitz",
    "default_inner_rtol",
]


#: a diagonal spread ``max / median`` above which a stalled solve is retried in Jacobi-scaled variables
JACOBI_SPREAD = 1e6

#: the default Newton-CG takes exact (Cholesky) Newton directions up to this many variables
#: (:attr:`curvlab.solvers.NewtonCG.dense_max`); above it, truncated CG and the Jacobi-scaled retry
NEWTON_DENSE_MAX = 64

#: Newton iterations without halving ``‖∇_y g‖``, below the reachable level, after which a solve ends (noise)
STALL_WINDOW = 3


class InnerSolveWarning(UserWarning):
    """The lower-level solve did not reach its tolerance (see :class:`InnerResult`'s ``status``/``message``)."""


class InnerSolveError(RuntimeError):
    """The lower-level solve of :meth:`BilevelProblem.value` failed and ``on_failure="raise"`` was asked.

    Attributes:
        result: the :class:`InnerResult` of the failed solve.
    """

    def __init__(self, message: str, result: InnerResult | None = None) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class InnerResult:
    r"""What :func:`solve_inner` returns.

    Attributes:
        y: the lower-level iterate (flat, detached; never the caller's tensor).
        grad_norm: :math:`\|\nabla_y g(x, y)\|` at ``y`` (the projected-gradient mapping norm with a ``y_set``).
        converged: whether the tolerance ``tol`` was met (see the module docstring).
        n_iter: iterations of the inner solver (Newton or gradient steps).
        grads: gradient oracle calls (of ``g``) spent.
        hvps: Hessian-vector products spent.
        status: a :class:`curvlab.Status`: ``"converged"``, ``"max_iter"``, ``"time_limit"``,
            ``"nan"`` (``y`` is then the last finite iterate), ``"stalled"``, ``"callback"``, ...
        value: :math:`g(x, y)` at ``y``.
        tol: the absolute gradient-norm tolerance that was used.
        scale: the reference gradient norm ``s`` (pass it as ``scale=`` to the next warm-started solve).
        message: a sentence on why the solve stopped.
        values: extra objective evaluations (line-search trials).
    """

    y: Tensor
    grad_norm: float
    converged: bool
    n_iter: int
    grads: int
    hvps: int
    status: Status
    value: float = math.nan
    tol: float = math.nan
    scale: float = math.nan
    message: str = ""
    values: int = 0


def default_inner_rtol(dtype: torch.dtype) -> float:
    r"""Default relative tolerance of :func:`solve_inner`.

    :math:`\varepsilon^{2/3}` in float64 (3.7e-11), else :math:`\sqrt\varepsilon` (3.45e-4 in float32).
    """
    eps = torch.finfo(dtype).eps
    return eps ** (2.0 / 3.0) if eps < 1e-10 else math.sqrt(eps)


def _gnorm(problem: BilevelProblem, x: Tensor, y: Tensor, batch: Any) -> tuple[float, Tensor, Tensor]:
    v, _, gy = problem._value_grads("inner", x, y, batch, want_x=False)
    return float(torch.linalg.vector_norm(gy)), gy, v  # type: ignore[arg-type]


def inner_lipschitz(
    problem: BilevelProblem, x: Tensor, y: Tensor, batch: Any = ALL, *, iters: int = 20, seed: int = 0
) -> tuple[float, int]:
    r"""The largest eigenvalue (in magnitude) of :math:`\nabla^2_{yy} g(x, y)` by power iteration.

    The one power iteration of :mod:`bilevel`: ``iters`` products with
    :meth:`BilevelProblem.hvp_yy_operator` (one gradient graph, reused) from a seeded random
    start; the Rayleigh quotient of the last iterate, stopped early once it changes by less than
    1e-3 relatively. The estimate is a lower bound of :math:`\lambda_{\max}` (as every Krylov
    estimate); callers that step by ``1/L`` guard against the rest (a backtracking halving).

    Args:
        problem: the bilevel problem.
        x, y: flat points.
        batch: ``ALL`` or one inner batch.
        iters: maximum power iterations (>= 1).
        seed: seed of the random start vector (fixed: the estimate is reproducible).

    Returns:
        ``(L, n_hvps)`` with ``L > 0`` (floored at the smallest normal number of the dtype).

    Raises:
        ValueError: ``iters`` not an integer >= 1.
    """
    check_int(iters, "iters", minimum=1)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    v = torch.randn(problem.dy, generator=gen, dtype=problem.dtype).to(problem.device)
    v = v / torch.linalg.vector_norm(v)
    matvec = problem.hvp_yy_operator(x, y, batch)
    lam, n = 0.0, 0
    for _ in range(iters):
        hv = matvec(v)
        n += 1
        new = float(v @ hv)
        nrm = torch.linalg.vector_norm(hv)
        if not math.isfinite(new) or not torch.isfinite(nrm) or nrm == 0:
            break
        done = n > 3 and abs(abs(new) - abs(lam)) <= 1e-3 * abs(new)
        lam = new
        v = hv / nrm
        if done:
            break
    return max(abs(lam), torch.finfo(problem.dtype).tiny), n


def inner_step_size(problem: BilevelProblem, x: Tensor, y: Tensor, batch: Any = ALL) -> float:
    r"""The inner gradient step :math:`1/L`, :math:`L` the top eigenvalue of :math:`\nabla^2_{yy} g`.

    :math:`L` comes from :func:`inner_lipschitz` (the one power iteration).

    Args:
        problem: the bilevel problem.
        x, y: flat points.
        batch: ``ALL`` or one inner batch (refresh it over batches for a stochastic problem).

    Returns:
        ``1 / L`` (a float). The products spent are those of :func:`inner_lipschitz` (at most 20).
    """
    return 1.0 / inner_lipschitz(problem, x, y, batch)[0]


def _check_args(problem: Any, x: Any, y0: Any, tol: Any, rtol: Any, max_iter: Any, deadline: Any, scale: Any) -> None:
    if not isinstance(problem, BilevelProblem):
        raise TypeError(f"problem must be a bilevel.BilevelProblem, got {type(problem).__name__}")
    for t, name, n in ((x, "x", problem.dx), (y0, "y0", problem.dy)):
        if t is None and name == "y0":
            continue
        if not isinstance(t, Tensor) or t.shape != (n,):
            raise ValueError(
                f"{name} must be a flat tensor of shape ({n},), got {getattr(t, 'shape', type(t).__name__)}"
            )
    for v, name in ((tol, "tol"), (rtol, "rtol"), (scale, "scale")):
        if v is not None and not (is_number(v) and v >= 0 and not math.isnan(v)):
            raise ValueError(f"{name} must be a number >= 0 or None, got {v!r}")
    if max_iter is not None:
        check_int(max_iter, "max_iter", minimum=1)
    if deadline is not None and not is_number(deadline):
        raise ValueError(f"deadline must be a time.perf_counter() value or None, got {deadline!r}")


def solve_inner(
    problem: BilevelProblem,
    x: Tensor,
    y0: Tensor | None = None,
    *,
    batch: Any = ALL,
    tol: float | None = None,
    rtol: float | None = None,
    max_iter: int | None = None,
    solver: Solver | str | None = None,
    deadline: float | None = None,
    scale: float | None = None,
    callback: Any = None,
) -> InnerResult:
    r"""Minimise :math:`g(x, \cdot)` from the warm start ``y0`` (see the module docstring for the rules).

    Args:
        problem: the bilevel problem.
        x: flat upper-level point (not modified).
        y0: flat warm start (not modified); ``None``: ``problem.y0``.
        batch: ``ALL`` (the whole inner data, the default) or one inner batch.
        tol: absolute gradient-norm tolerance (``None``: only the relative one).
        rtol: tolerance relative to ``scale`` (``None``: :func:`default_inner_rtol`, unless ``tol`` is given).
        max_iter: iteration cap (``None``: scales with the problem, see the module docstring).
        solver: ``None`` / ``"newton"`` (Newton-CG; projected gradient steps with a ``y_set``),
            ``"gd"`` (projected gradient steps with step ``1/L``), or any :class:`curvlab.solvers.Solver`
            (not with a ``y_set``).
        deadline: a :func:`time.perf_counter` value after which the solve returns what it has
            (``status="time_limit"``).
        scale: reference gradient norm of the relative test (see the module docstring).
        callback: ``callback(state) -> bool | None`` after each inner iteration (a curvlab solver
            state); ``True`` stops with ``status="callback"``.

    Returns:
        An :class:`InnerResult`.

    Raises:
        TypeError: ``problem`` not a :class:`BilevelProblem`, ``solver`` of the wrong type.
        ValueError: wrong shapes of ``x`` / ``y0``, negative tolerances, a bad ``max_iter`` or
            ``deadline``, a curvlab ``solver`` with a ``y_set``.
    """
    _check_args(problem, x, y0, tol, rtol, max_iter, deadline, scale)
    if solver is not None and not isinstance(solver, (Solver, str)):
        raise TypeError(f"solver must be None, 'newton', 'gd' or a curvlab.solvers.Solver, got {type(solver).__name__}")
    if isinstance(solver, str) and solver not in ("newton", "gd"):
        raise ValueError(f"solver must be None, 'newton', 'gd' or a curvlab.solvers.Solver, got {solver!r}")
    if isinstance(solver, Solver) and problem.y_set is not None:
        raise ValueError("a curvlab solver cannot keep y in problem.y_set; use solver=None or 'gd' (projected steps)")
    xd = x.detach()
    y = (problem.y0 if y0 is None else y0).detach().clone()
    if problem.y_set is not None:
        y = problem.project_y(y)
    eps = torch.finfo(problem.dtype).eps
    grads = 0
    if scale is None:
        scale, _, _ = _gnorm(problem, xd, y, batch)
        grads += 1
        if y0 is not None and not torch.equal(y, problem.y0):
            s2, _, _ = _gnorm(problem, xd, problem.y0, batch)
            grads += 1
            if math.isfinite(s2):
                scale = max(scale, s2)
    scale = float(scale) if math.isfinite(scale) else 0.0
    if rtol is None and tol is None:
        rtol = default_inner_rtol(problem.dtype)
    atol = max(float(tol or 0.0), float(rtol or 0.0) * scale, 10.0 * eps * scale, torch.finfo(problem.dtype).tiny)
    reach = max(atol, math.sqrt(eps) * scale)
    gd = solver == "gd" or (solver in (None, "newton") and problem.y_set is not None)
    if gd:
        res = _projected_gd(problem, xd, y, batch, atol, reach, max_iter, deadline, callback)
    else:
        res = _with_solver(problem, xd, y, batch, atol, reach, max_iter, solver, deadline, callback)
    res.grads += grads
    res.tol, res.scale = atol, scale
    return res


def default_newton(dy: int, dtype: torch.dtype) -> NewtonCG:
    """The Newton-CG of the lower-level solves (:func:`solve_inner`, F2SA's and LV-HBA's penalty solves).

    Exact directions up to :data:`NEWTON_DENSE_MAX` variables; above, at most ``min(250, 2 dy + 10)`` CG
    products per Newton step in float64 and ``min(100, 2 dy + 10)`` in float32 and below (single-precision
    recurrences lose orthogonality within about a hundred steps, as in the adjoint solve).
    """
    cap = 250 if torch.finfo(dtype).eps < 1e-10 else 100
    return NewtonCG(cg_maxiter=min(cap, 2 * dy + 10), dense_max=NEWTON_DENSE_MAX)


def run_stalling(
    solver: Solver,
    inner: Minimize,
    cap: int,
    tol: float,
    reach: float,
    left: float | None,
    callback: Any,
    dtype: torch.dtype,
) -> tuple[Any, bool]:
    """``solver.solve`` with the stall rule of the module docstring; ``(result, stalled)``."""
    window = STALL_WINDOW if isinstance(solver, NewtonCG) else 20 * STALL_WINDOW
    eps = torch.finfo(dtype).eps
    watch = {"best": math.inf, "since": 0, "f": math.inf, "stalled": False}

    def stop(st: dict[str, Any]) -> bool:
        # a gradient norm that stops halving is rounding noise below the reachable level, or, anywhere, when
        # g has not moved beyond its own rounding noise meanwhile: stop there
        gn_, f_ = float(st["grad_norm"]), float(st["value"])
        if gn_ < 0.5 * watch["best"]:
            watch["best"], watch["since"], watch["f"] = gn_, 0, f_
        else:
            watch["since"] += 1
        if watch["since"] >= window:
            flat = abs(watch["f"] - f_) <= 16 * eps * abs(f_) * window
            if gn_ <= reach or flat:
                watch["stalled"] = True
                return True
        return bool(callback(st)) if callback is not None else False

    with warnings.catch_warnings():  # a tol under eps·‖g₀‖ is raised to it by solve(); our floors say the rest
        warnings.filterwarnings("ignore", message=r"tol=.* is below what", category=UserWarning)
        r = solver.solve(inner, max_iter=cap, tol=tol, time_limit=left, callback=stop)
    return r, bool(watch["stalled"])


def _with_solver(
    problem: BilevelProblem,
    x: Tensor,
    y: Tensor,
    batch: Any,
    atol: float,
    reach: float,
    max_iter: int | None,
    solver: Solver | str | None,
    deadline: float | None,
    callback: Any,
) -> InnerResult:
    dy = problem.dy
    default = not isinstance(solver, Solver)
    if not isinstance(solver, Solver):
        solver = default_newton(dy, problem.dtype)
        cap = 100
    else:
        cap = min(20000, max(1000, 100 * dy))
    cap = cap if max_iter is None else int(max_iter)
    left = None if deadline is None else deadline - time.perf_counter()
    if left is not None and left <= 0:
        gn, _, v = _gnorm(problem, x, y, batch)
        ok = gn <= atol
        st = Status.CONVERGED if ok else Status.TIME_LIMIT
        return InnerResult(y, gn, ok, 0, 1, 0, st, float(v), message="deadline passed before the inner solve")
    inner = Minimize(lambda yv: problem.g_diff(x, yv, batch), y)
    r, stalled = run_stalling(solver, inner, cap, atol, reach, left, callback, problem.dtype)
    res = _result(r, stalled, atol, reach, problem.dtype, int(r.n_iter) + 2)
    if (
        default
        and res.status in (Status.STALLED, Status.MAX_ITER, Status.LINE_SEARCH_FAILED)
        and (deadline is None or time.perf_counter() < deadline)
    ):
        res = _jacobi_retry(problem, x, res, batch, atol, reach, cap, solver, deadline, callback)
    return res


def _result(r: Any, stalled: bool, atol: float, reach: float, dtype: torch.dtype, grads: int) -> InnerResult:
    """An :class:`InnerResult` from a curvlab :class:`~curvlab.Result` (statuses per the module docstring)."""
    st_ = r.state or {}
    yk = r.flat.detach().reshape(-1).to(dtype)
    gn = float(st_.get("grad_norm", math.nan))
    status = Status.of(r.status)
    message = r.message
    converged = math.isfinite(gn) and gn <= atol
    if stalled and not converged:
        converged = math.isfinite(gn) and gn <= reach
        status = Status.CONVERGED if converged else Status.STALLED
        where = f"below the reachable {reach:.3g}" if converged else f"above the reachable {reach:.3g}, g flat"
        message = (
            f"‖∇_y g‖ = {gn:.3g} stopped halving for {STALL_WINDOW} iterations {where} "
            f"(tol {atol:.3g} is under the rounding noise here)"
        )
    elif status == Status.CONVERGED and not converged:
        if math.isfinite(gn) and gn <= reach:
            converged = True  # the limit of precision, within what the dtype can reach
        else:
            status = Status.STALLED
            message = f"{message}; ‖∇_y g‖ = {gn:.3g} is above the reachable {reach:.3g}"
    elif converged:
        status = Status.CONVERGED
    hvps = int(st_.get("matvecs", 0))
    return InnerResult(yk, gn, converged, int(r.n_iter), grads, hvps, status, float(r.value), message=message)


def _jacobi_retry(
    problem: BilevelProblem,
    x: Tensor,
    first: InnerResult,
    batch: Any,
    atol: float,
    reach: float,
    cap: int,
    solver: Solver,
    deadline: float | None,
    callback: Any,
) -> InnerResult:
    r"""Newton-CG again in Jacobi-scaled variables :math:`z = s \odot y`, :math:`s^2 = |\mathrm{diag}\,H|`.

    :math:`H = \nabla^2_{yy} g`. For curvatures spread over many orders (penalties :math:`e^{x_j}` from
    1e-30 to 1e19) CG's rounding spoils the Newton directions and the first solve stalls far above its
    tolerance; in ``z`` the Hessian has a unit diagonal. Only a diagonal spread over more than
    :data:`JACOBI_SPREAD` (``max / median`` > 1e6) is worth the second solve. The diagonal is exact for
    ``dy <= 256`` (``dy`` products), else an XDiag estimate from 200 (:func:`curvlab.spectrum.diag`).
    The scaled solve's test is the original one in ``z``'s units: ``tol`` times the ratio of
    :math:`\|\nabla_z g\| = \|\nabla_y g / s\|` to :math:`\|\nabla_y g\|` at the first solve's end
    point and at the problem's ``y0``. Its result is kept when it converges (else the first result,
    with the products spent added).
    """
    from curvlab.linops import MatvecOperator
    from curvlab.spectrum import diag

    y = first.y
    dy, eps = problem.dy, torch.finfo(problem.dtype).eps
    op = MatvecOperator(problem.hvp_yy_operator(x, y, batch), dy, problem.dtype, problem.device, symmetric=True)
    budget = dy if dy <= 256 else 200
    try:
        d = diag(op, budget=budget, seed=0).estimate.abs()
    except ValueError:  # non-finite products
        return first
    first.hvps += budget
    if not bool(torch.isfinite(d).all()) or float(d.max()) <= 0:
        return first
    if float(d.max()) <= JACOBI_SPREAD * float(d.median()):
        return first  # a diagonal within a few orders: the scaling would not change what CG can do
    floor = max(float(d.median()) * 1e-3, torch.finfo(problem.dtype).tiny / eps)
    sc = torch.sqrt(torch.clamp(d, min=floor))
    g1 = problem.grad_g_y(x, y, batch)
    g0 = problem.grad_g_y(x, problem.y0, batch)
    first.grads += 2
    zscale = max(float(torch.linalg.vector_norm(g1 / sc)), float(torch.linalg.vector_norm(g0 / sc)))
    yscale = max(float(torch.linalg.vector_norm(g1)), float(torch.linalg.vector_norm(g0)))
    if not (math.isfinite(zscale) and math.isfinite(yscale) and yscale > 0):
        return first
    ztol = max(atol * zscale / yscale, 10.0 * eps * zscale)  # the same test, in z's units
    zreach = max(ztol, reach * zscale / yscale)
    left = None if deadline is None else deadline - time.perf_counter()
    zinner = Minimize(lambda zv: problem.g_diff(x, zv / sc, batch), (y * sc).detach())
    r, stalled = run_stalling(solver, zinner, cap, ztol, zreach, left, callback, problem.dtype)
    zres = _result(r, stalled, ztol, zreach, problem.dtype, int(r.n_iter) + 2)
    first.grads += zres.grads
    first.hvps += zres.hvps
    if not zres.converged:
        return first
    yk = (zres.y / sc).detach()
    gn, _, v = _gnorm(problem, x, yk, batch)
    first.grads += 1
    msg = (
        f"converged in Jacobi-scaled variables (‖∇_z g‖ = {zres.grad_norm:.3g} <= {ztol:.3g}; ‖∇_y g‖ = {gn:.3g}) "
        f"after the unscaled solve: {first.message}"
    )
    return InnerResult(
        yk, gn, True, first.n_iter + zres.n_iter, first.grads, first.hvps, Status.CONVERGED, float(v), message=msg
    )


def _projected_gd(
    problem: BilevelProblem,
    x: Tensor,
    y: Tensor,
    batch: Any,
    atol: float,
    reach: float,
    max_iter: int | None,
    deadline: float | None,
    callback: Any,
) -> InnerResult:
    cap = min(20000, max(1000, 100 * problem.dy)) if max_iter is None else int(max_iter)
    L, hvps = inner_lipschitz(problem, x, y, batch)
    lr = lr0 = 1.0 / L
    eps = torch.finfo(problem.dtype).eps
    grads, values, it = 0, 0, 0
    v, _, gy = problem._value_grads("inner", x, y, batch, want_x=False)
    grads += 1
    status, message = Status.MAX_ITER, f"reached max_iter={cap}"
    gm = math.nan
    best: tuple[float, Tensor, Tensor, Tensor] = (math.inf, y, v, gy)
    while True:
        if not (torch.isfinite(v) and bool(torch.isfinite(gy).all())):
            status, message = Status.NAN, "non-finite inner value or gradient; returning the last finite y"
            break
        # the gradient mapping at the step 1/L (= ‖∇g‖ without a set; not at a backtracked step, where
        # y - t∇g may round to y)
        gm = float(torch.linalg.vector_norm(problem.project_y(y - lr0 * gy) - y)) / lr0
        if gm <= atol:
            status, message = Status.CONVERGED, f"gradient mapping norm {gm:.3g} <= tol {atol:.3g}"
            break
        if it >= cap:
            break
        if deadline is not None and time.perf_counter() >= deadline:
            status, message = Status.TIME_LIMIT, "deadline reached"
            break
        t = lr
        yn = problem.project_y(y - t * gy)
        for _ in range(40):  # sufficient decrease g(y+) <= g(y) - 1e-4 ‖y+ - y‖² / t, halving t (L is a lower bound)
            vn = problem.g(x, yn, batch)
            values += 1
            dec = 1e-4 * float(torch.linalg.vector_norm(yn - y)) ** 2 / t
            if torch.isfinite(vn) and float(vn) <= float(v) - dec:
                break
            if torch.isfinite(vn) and dec < 4 * eps * abs(float(v)):
                break  # the decrease is below the rounding noise of g: take the step, the gradient guard watches
            t *= 0.5
            yn = problem.project_y(y - t * gy)
        else:
            t = 0.0
        if t == 0.0 or torch.equal(yn, y):  # no decrease, or a step that rounds to no move
            ok = gm <= reach
            status = Status.CONVERGED if ok else Status.STALLED
            message = f"no decrease of g along the projected gradient (gradient mapping {gm:.3g})"
            break
        if gm < best[0]:
            best = (gm, y, v, gy)
        elif gm > 10 * best[0]:  # noisy steps made things worse: back to the best point with a smaller step
            gm, y, v, gy = best
            lr *= 0.5
            continue
        lr = t  # a step that needed halving: L was underestimated, keep the smaller step
        it += 1
        y = yn.detach()
        v, _, gy = problem._value_grads("inner", x, y, batch, want_x=False)
        grads += 1
        if callback is not None and callback({"x": y, "value": v, "grad": gy, "iter": it, "step_size": lr}):
            status, message = Status.CALLBACK, "the callback asked to stop"
            break
    if not math.isfinite(gm):
        gm = float(torch.linalg.vector_norm(gy))
    ok = status == Status.CONVERGED
    return InnerResult(y, gm, ok, it, grads, hvps, status, float(v), message=message, values=values)
