r"""Hypergradient estimators of the composition: implicit differentiation and truncated unrolling.

* :func:`implicit_hypergradient` — the implicit-function-theorem hypergradient at an (approximate)
  inner solution :math:`y \approx y^*(x)`,

  .. math::
      \hat\nabla F = \nabla_x f - \nabla^2_{xy} g\, w, \qquad \nabla^2_{yy} g\, w = \nabla_y f

  (Lorraine et al. 2020, eq. (3); Ghadimi & Wang 2018, eq. (2.3); Pedregosa 2016, eq. (4);
  Grazzi et al. 2020, AID), computed by :func:`implicit.hypergradient` (the public API of
  :mod:`implicit`: :math:`\nabla_y g` recorded once, every Hessian product one backward pass)
  with any :func:`curvlab.linalg.solve` method, a warm-started adjoint (``w0``), a relative
  adjoint tolerance that the dtype can reach (:func:`curvlab.linalg.default_tol`:
  :math:`\varepsilon^{2/3}`), an iteration cap and a ``deadline`` checked before every product.
  It also returns the first-order corrected value :math:`\tilde F = f - w^\top \nabla_y g`
  (the Lagrangian of the IFT), whose error is :math:`O(\|y - y^*\|^2)` where ``f``'s is
  :math:`O(\|y - y^*\|)`: the value the outer line search compares.
* :func:`unrolled_hypergradient` — reverse-mode differentiation through ``K`` projected gradient
  steps :math:`y_{k+1} = \Pi_Y(y_k - \beta \nabla_y g(x, y_k))` from a constant start
  (Maclaurin et al. 2015; Franceschi et al. 2017, Alg. 1 "reverse-HG"; Grazzi et al. 2020, ITD).
  It is the exact gradient of :math:`x \mapsto f(x, y_K(x))`, and it measures its own truncation:
  the gradient reaching the start, :math:`\|\partial f / \partial y_0\|`, relative to
  :math:`\|\nabla_y f(x, y_K)\|`, is the factor :math:`\|\prod_k (I - \beta \nabla^2_{yy} g)\|` by
  which the dropped tail of the series is bounded (Grazzi et al. 2020, Thm. 2.1's
  :math:`(1 - \beta\mu)^K` at a fixed point).

Both work on flat vectors of a :class:`~bilevel.BilevelProblem` and count their oracle calls.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import implicit
from curvlab import linalg
from curvlab.linops import MatvecOperator
from curvlab.problems import ALL
from curvlab.status import Status

from ._problem import BilevelProblem

__all__ = ["Hypergradient", "DeadlineReached", "implicit_hypergradient", "unrolled_hypergradient", "SOLVE_METHODS"]

#: linear-solve methods whose iterations can start from a previous adjoint (``x0``)
_WARM = ("auto", "cg", "minres", "gmres", "normal_cg")
#: the :func:`curvlab.linalg.solve` method names accepted as ``solve`` (or pass a callable)
SOLVE_METHODS = tuple(sorted(linalg.METHODS))


class DeadlineReached(RuntimeError):  # noqa: N818 - a signal, not an error
    """Raised inside a hypergradient computation when its ``deadline`` has passed (caught by the solvers)."""


@dataclass
class Hypergradient:
    r"""What a hypergradient estimator returns.

    Attributes:
        grad: the hypergradient estimate (flat, ``dx``).
        value: :math:`f(x, y)` at the ``y`` used (0-d).
        corrected: :math:`\tilde F = f - w^\top \nabla_y g` (implicit) or ``value`` (unrolled).
        y: the lower-level point used (the input ``y``; :math:`y_K` when unrolled).
        w: the adjoint :math:`w \approx [\nabla^2_{yy} g]^{-1} \nabla_y f` (implicit; ``None`` unrolled).
        grads, hvps: oracle calls spent (gradients of ``f``/``g``; Hessian / mixed products).
        status: of the linear solve (``"converged"``, ``"max_iter"``, ``"stalled"``, ...), or of the
            truncation test when unrolled (``"converged"`` when ``bias <= bias_tol``, else ``"max_iter"``).
        n_iter: iterations of the linear solve / unrolled steps.
        residual: relative residual of the linear solve (``nan`` unrolled).
        inner_grad_norm: :math:`\|\nabla_y g(x, y)\|` at the ``y`` used (:math:`y_{K-1}` when unrolled).
        bias: unrolled only: :math:`\|\partial f/\partial y_0\| / \|\nabla_y f(x, y_K)\|` (``nan`` otherwise).
        method: the linear-solve method that ran (``"auto"`` resolved) or ``"unroll"``.
    """

    grad: Tensor
    value: Tensor
    corrected: Tensor
    y: Tensor
    w: Tensor | None
    grads: int
    hvps: int
    status: Status
    n_iter: int
    residual: float = math.nan
    inner_grad_norm: float = math.nan
    bias: float = math.nan
    method: str = ""


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.perf_counter() >= deadline:
        raise DeadlineReached("the deadline passed during the hypergradient computation")


def implicit_hypergradient(
    problem: BilevelProblem,
    x: Tensor,
    y: Tensor,
    *,
    outer_batch: Any = ALL,
    inner_batch: Any = ALL,
    solve: str | Callable[..., Any] = "auto",
    tol: float | None = None,
    maxiter: int | None = None,
    w0: Tensor | None = None,
    deadline: float | None = None,
    solve_options: dict[str, Any] | None = None,
    corrected: bool = True,
) -> Hypergradient:
    r"""The implicit hypergradient at ``(x, y)`` through :func:`implicit.hypergradient`.

    Args:
        problem: the bilevel problem.
        x, y: flat points (``y`` an approximate inner solution; not modified).
        outer_batch, inner_batch: batches of ``f`` and ``g`` (``ALL``: all the data).
        solve: a :func:`curvlab.linalg.solve` method (``"auto"``: dense factorisation up to
            ``n = 256``, CG above, MINRES on negative curvature; ``"cg"``, ``"minres"``,
            ``"gmres"``, ``"normal_cg"``, ``"neumann"``, ``"dense"``) or a callable
            ``solve(matvec, b, **options) -> w``.
        tol: relative residual tolerance of the adjoint solve (``None``:
            :func:`curvlab.linalg.default_tol` of the dtype, reachable there).
        maxiter: iteration cap of iterative methods (``None``: the method's default).
        w0: warm start of the adjoint (methods in ``auto/cg/minres/gmres/normal_cg``).
        deadline: a :func:`time.perf_counter` value; :class:`DeadlineReached` is raised at the
            first product after it.
        solve_options: further method options (``alpha``, ``K`` for ``"neumann"``, ...).
        corrected: also compute :math:`\tilde F` (one more gradient of ``g``); else ``corrected`` is ``f``.

    Returns:
        A :class:`Hypergradient` (``hvps`` counts the solve's products, the residual check and
        the mixed product; ``grads`` the gradients of ``f``, of ``g`` and the ``∇_y g`` of ``corrected``).

    Raises:
        DeadlineReached: the deadline passed.
        ValueError, TypeError: a bad ``solve`` or option (from :mod:`implicit` / :mod:`curvlab.linalg`).
    """
    opts = dict(solve_options or {})
    rec: dict[str, Any] = {"hvps": 0, "res": None}
    user = callable(solve) and not isinstance(solve, str)
    if not user and solve not in linalg.METHODS:
        raise ValueError(f"solve must be one of {list(SOLVE_METHODS)} or a callable solve(matvec, b), got {solve!r}")

    def counted(A: Any) -> MatvecOperator:
        def mv(v: Tensor) -> Tensor:
            _check_deadline(deadline)
            rec["hvps"] += 1
            return A.matvec(v)

        def mm(V: Tensor) -> Tensor:
            _check_deadline(deadline)
            rec["hvps"] += V.shape[1]
            return A.matmat(V)

        return MatvecOperator(mv, A.shape, A.dtype, A.device, matmat=mm, symmetric=True, psd=False)

    def adjoint(A: Any, b: Tensor, **kw: Any) -> Any:
        op = counted(A)
        if user:
            return solve(op, b, **{**opts, **kw})  # type: ignore[operator]
        local = dict(opts)
        local.setdefault("tol", tol if tol is not None else linalg.default_tol(b.dtype))
        if maxiter is not None and solve not in ("neumann", "dense"):
            local.setdefault("maxiter", maxiter)
        if w0 is not None and solve in _WARM and "x0" not in local:
            local["x0"] = w0.detach().to(b.dtype)
        res = linalg.solve(op, b, solve, **local)
        rec["res"] = res
        return res

    adjoint.__name__ = str(solve if not user else getattr(solve, "__name__", "solve"))
    xd, yd = x.detach(), y.detach()
    with warnings.catch_warnings():  # convergence is reported in the result, not warned per outer step
        warnings.simplefilter("ignore", implicit.OptimalityWarning)
        warnings.simplefilter("ignore", implicit.LinearSolveWarning)
        hg, info = implicit.hypergradient(
            lambda xx, yy: problem.f_diff(xx, yy, outer_batch),
            lambda xx, yy: problem.g_diff(xx, yy, inner_batch),
            xd,
            yd,
            adjoint,
            full_output=True,
            nonconvergence="ignore",
        )
    res = rec["res"]
    w = (res.x if res is not None else info.x).detach()
    fval = problem.f(xd, yd, outer_batch)
    if corrected:
        gy = problem.grad_g_y(xd, yd, inner_batch)
        ftilde = fval - (w.to(gy.dtype) @ gy).to(fval.dtype)
        gnorm = float(torch.linalg.vector_norm(gy))
    else:
        ftilde, gnorm = fval, math.nan
    status = Status.of(res.status if res is not None else info.status)
    if info is not None and not info.converged and status == Status.CONVERGED:
        status = Status.of(info.status)
    return Hypergradient(
        grad=hg.detach(),
        value=fval,
        corrected=ftilde,
        y=yd,
        w=w,
        grads=3 if corrected else 2,
        hvps=rec["hvps"] + 1,
        status=status,
        n_iter=int(res.n_iter if res is not None else info.n_iter),
        residual=float(info.max_relative_residual) if info is not None else math.nan,
        inner_grad_norm=gnorm,
        method=str(res.method if res is not None else adjoint.__name__),
    )


def unrolled_hypergradient(
    problem: BilevelProblem,
    x: Tensor,
    y0: Tensor,
    K: int,
    lr: float,
    *,
    outer_batch: Any = ALL,
    inner_batches: list[Any] | None = None,
    bias_tol: float = 0.0,
    deadline: float | None = None,
) -> Hypergradient:
    r"""The ITD hypergradient :math:`\frac{d}{dx} f(x, y_K(x))` by reverse mode through ``K`` gradient steps.

    Args:
        problem: the bilevel problem.
        x: flat upper-level point.
        y0: the start :math:`y_0` (a constant of the unroll; not modified).
        K: unrolled steps (``>= 1``).
        lr: the inner step :math:`\beta` (``1/L`` keeps the unrolled map contractive).
        outer_batch: batch of ``f``.
        inner_batches: ``K`` inner batches (``None``: ``ALL`` for every step).
        bias_tol: the truncation test of ``status`` (see :class:`Hypergradient`).
        deadline: a :func:`time.perf_counter` value checked before every step.

    Returns:
        A :class:`Hypergradient` (``grads = K + 1``, ``hvps = K``: one product per step on the way back).

    Raises:
        DeadlineReached: the deadline passed.
    """
    batches = [ALL] * K if inner_batches is None else list(inner_batches)
    res = math.nan
    with torch.enable_grad():
        xl = x.detach().requires_grad_(True)
        start = y0.detach().clone().requires_grad_(True)
        yk = start
        for b in batches:
            _check_deadline(deadline)
            g = problem.g_diff(xl, yk, b)
            (gy,) = torch.autograd.grad(g, yk, create_graph=True)
            res = float(torch.linalg.vector_norm(gy.detach()))
            yk = problem.project_y(yk - lr * gy)
        val = problem.f_diff(xl, yk, outer_batch)
        hx, h0, hK = torch.autograd.grad(val, (xl, start, yk), allow_unused=True)
    hx = torch.zeros_like(x) if hx is None else hx
    n0 = 0.0 if h0 is None else float(torch.linalg.vector_norm(h0))
    nK = 0.0 if hK is None else float(torch.linalg.vector_norm(hK))
    bias = n0 / nK if nK > 0 else 0.0
    val = val.detach()
    return Hypergradient(
        grad=hx.detach(),
        value=val,
        corrected=val,
        y=yk.detach(),
        w=None,
        grads=K + 1,
        hvps=K,
        status=Status.CONVERGED if bias <= bias_tol else Status.MAX_ITER,
        n_iter=K,
        inner_grad_norm=res,
        bias=bias,
        method="unroll",
    )
