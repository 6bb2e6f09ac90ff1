r"""The composition: a bilevel solver = inner solver + hypergradient estimator + outer update.

Per outer iteration (deterministic problems, the default path):

1. **inner solve** — :func:`bilevel._inner.solve_inner` at the trial ``x``, warm-started from the
   previous ``y`` (Newton-CG by default; any :mod:`curvlab` solver), to a tolerance the dtype
   can reach, with an iteration cap and the run's deadline;
2. **hypergradient** — :func:`~bilevel._hypergradient.implicit_hypergradient` (implicit
   differentiation through :func:`implicit.hypergradient`, any :func:`curvlab.linalg.solve`
   method, warm-started adjoint) or :func:`~bilevel._hypergradient.unrolled_hypergradient`
   (reverse mode through ``K`` gradient steps);
3. **outer update** — an L-BFGS direction and the Armijo search of :mod:`curvlab.solvers` on
   :math:`\tilde F = f - w^\top \nabla_y g` (implicit) or on :math:`f(x, y_K(x))` (unrolled),
   accepting a trial only when its inner solve converged; on minibatch data (or with a fixed
   ``lr`` and ``optimizer="sgd"/"adam"/"normalized"``) a fixed-step update instead.

Stopping is :meth:`bilevel.BilevelSolver.solve`'s rule. The steps report convergence themselves when
the line search finds no decrease at the limit of precision (the predicted decrease is below the
rounding noise of :math:`\tilde F`, or the hypergradient has fallen below
:data:`LINE_SEARCH_CONVERGED` of its first value): a run at a stationary point ends at once as
``"converged"`` instead of spending full inner solves on line-search trials every further iteration.

:class:`Composite` exposes the pieces as options; :class:`~bilevel.IFT`, :class:`~bilevel.AID` and
:class:`~bilevel.ITD` are presets of it (their own documented options map onto the pieces).

Recorded per iteration (``history``): ``outer_value`` is :math:`F(x) \approx f(x, y)` at the inner
solution of the accepted ``x`` (deterministic; on minibatches ``f`` on the last outer batch),
``hypergrad_norm``, ``inner_residual`` (:math:`\|\nabla_y g\|` at that ``y``), ``grads``/``hvps``
and, in ``log``, ``step_size``, ``ls_trials``, ``inner_iters``, ``solve_iters``, ``K`` (unrolled).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from curvlab.checks import check_choice, check_int, check_positive
from curvlab.problems import ALL
from curvlab.solvers import Armijo, Solver, lbfgs_update
from curvlab.solvers.line_search import NOISE_EPS
from curvlab.status import Status

from ._base import BilevelSolver, _count, base_state, options
from ._hypergradient import DeadlineReached, Hypergradient, implicit_hypergradient, unrolled_hypergradient
from ._inner import inner_step_size, solve_inner
from ._outer import OUTER_OPTIMIZERS, first_trial, quasi_newton_direction, stochastic_update
from ._problem import BilevelProblem

__all__ = ["Composite", "CompositeSolver", "Config", "LINE_SEARCH_CONVERGED"]

#: a line search that fails where the hypergradient norm is below this fraction of its first value
#: ends the run as converged (the inner/adjoint precision, not the direction, limits the decrease)
LINE_SEARCH_CONVERGED = 1e-3


class _StopRunError(Exception):
    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Config:
    """The resolved pieces of a composite solver on one problem (see :class:`Composite` for the meanings).

    Build it with :meth:`on`, which fills what follows from the problem; a preset passes only what it sets.
    """

    estimator: str  # "implicit" | "unroll"
    optimizer: str  # "lbfgs" | "gd" | "adam" | "normalized" | "sgd"
    line_search: bool
    inner: Any = None  # solve_inner's solver: None | "newton" | "gd" | a curvlab Solver
    inner_steps: int | None = None  # cap of inner iterations per solve (None: solve_inner's default)
    inner_tol: float | None = None
    inner_rtol: float | None = None
    sgd_steps: int | None = (
        None  # fixed gradient steps per outer iteration instead of solve_inner (IFT's T, minibatches)
    )
    inner_lr: float | None = None
    solve: Any = "auto"
    solve_tol: float | None = None  # None: adjoint_tol(problem)
    solve_maxiter: int | None = None  # None: adjoint_maxiter(problem)
    solve_options: dict[str, Any] = field(default_factory=dict)
    warm_start: bool = True
    K: int | None = None  # unrolled steps (None: adaptive)
    K_max: int = 0  # set by on(): k_max(problem)
    bias_tol: float = 0.0  # set by on(): default_bias_tol(problem)
    lr: float | None = None
    fixed_lr: float = 1e-2  # the fixed step of the stochastic updates: lr, else the preset's default
    memory: int = 10
    c1: float = 1e-4
    max_backtracks: int = 10
    betas: tuple[float, float] = (0.9, 0.999)

    @classmethod
    def on(cls, problem: BilevelProblem, *, default_lr: float = 1e-2, **fields: Any) -> Config:
        """The config on ``problem``: unset adjoint tolerance and cap, ``K_max`` and ``bias_tol`` from the problem,
        ``fixed_lr`` = ``lr`` or ``default_lr``."""
        cfg = cls(**fields)
        if cfg.solve_tol is None:
            cfg.solve_tol = adjoint_tol(problem)
        if cfg.solve_maxiter is None:
            cfg.solve_maxiter = adjoint_maxiter(problem)
        cfg.K_max, cfg.bias_tol = k_max(problem), default_bias_tol(problem)
        cfg.fixed_lr = cfg.lr if cfg.lr is not None else default_lr
        return cfg


class CompositeSolver(BilevelSolver):
    """The machinery shared by :class:`Composite` and the presets: subclasses provide :meth:`config`."""

    def config(self, problem: BilevelProblem) -> Config:
        """The resolved pieces on ``problem``."""
        raise NotImplementedError

    def _check_config(self, problem: BilevelProblem, cfg: Config) -> None:
        name = type(self).__name__
        if cfg.line_search and problem.stochastic:
            raise ValueError(
                f"{name}: the line search (optimizer 'lbfgs'/'gd' or line_search=True) needs deterministic data "
                "(one batch); use optimizer='adam', 'normalized' or 'sgd' on minibatches"
            )
        if cfg.optimizer == "lbfgs" and problem.x_set is not None:
            raise ValueError(f"{name}: optimizer='lbfgs' does not handle x_set; use optimizer='gd' (projected steps)")
        if isinstance(cfg.inner, Solver) and problem.y_set is not None:
            raise ValueError(f"{name}: a curvlab inner solver does not handle y_set; use inner='gd' (projected steps)")

    # ------------------------------------------------------------------ contract
    def init(self, problem: BilevelProblem) -> dict[str, Any]:
        self.check_problem(problem)
        cfg = self.config(problem)
        self._check_config(problem, cfg)
        state = base_state(
            problem,
            w=None,
            hg=None,
            fcorr=None,
            lbfgs_s=[],
            lbfgs_y=[],
            ls_step=None,
            ls_length=None,
            adam_m=None,
            adam_v=None,
            adam_t=0,
            inner_scale=None,
            inner_lr=float("nan"),
            K=cfg.K if cfg.K is not None else 20,
        )
        if cfg.estimator == "unroll" or cfg.sgd_steps is not None:
            if cfg.inner_lr is not None:
                state["inner_lr"] = float(cfg.inner_lr)
            else:
                state["inner_lr"] = inner_step_size(problem, state["x"], state["y"], problem.draw_inner(0))
                _count(state, hvps=20)
        if cfg.line_search:  # the line search needs F̃ and the hypergradient at x0: evaluate there now
            try:
                ev = self._evaluate(problem, cfg, state["x"], state, state)
            except _StopRunError as s:  # a deadline in init: leave the evaluation to the first step
                state["log"] = {"init": s.message}
                return state
            self._adopt(state, ev)
            state["hypergrad_norm"] = float(torch.linalg.vector_norm(ev["hg"].grad))
        else:
            state["outer_value"] = problem.f(state["x"], state["y"], problem.draw_outer(0))
        return state

    def step(self, problem: BilevelProblem, state: dict[str, Any]) -> dict[str, Any]:
        cfg = self.config(problem)
        new = dict(state)
        try:
            if cfg.line_search:
                return self._line_search_step(problem, cfg, state, new)
            return self._fixed_step(problem, cfg, state, new)
        except _StopRunError as s:
            out = dict(state)
            out["grads"], out["hvps"] = new["grads"], new["hvps"]
            out["status"], out["message"] = s.status, s.message
            return out

    # ------------------------------------------------------------------ pieces
    def _interrupt(self, state: dict[str, Any], phase: str) -> None:
        stop = self.interrupted(state, phase)
        if stop is not None:
            raise _StopRunError(*stop)

    def _inner(self, problem: BilevelProblem, cfg: Config, x: Tensor, y: Tensor, state: dict, new: dict) -> Any:
        """Inner solve at ``x`` from ``y`` (counted into ``new``); raises :class:`_StopRunError` on the deadline."""
        res = solve_inner(
            problem,
            x,
            y,
            tol=cfg.inner_tol,
            rtol=cfg.inner_rtol,
            max_iter=cfg.inner_steps,
            solver=cfg.inner,
            deadline=self.deadline(state),
            scale=state.get("inner_scale"),
        )
        _count(new, grads=res.grads, hvps=res.hvps)
        if new.get("inner_scale") is None and math.isfinite(res.scale) and res.scale > 0:
            new["inner_scale"] = res.scale
        if res.status == Status.TIME_LIMIT:
            raise _StopRunError(Status.TIME_LIMIT.value, "time_limit reached inside the inner solve")
        return res

    def _sgd_inner(self, problem: BilevelProblem, cfg: Config, x: Tensor, y: Tensor, new: dict) -> tuple[Tensor, float]:
        """``sgd_steps`` projected gradient steps with the fixed ``inner_lr``, each on the next inner batch."""
        lr, res = float(new["inner_lr"]), math.nan
        for _ in range(int(cfg.sgd_steps or 0)):
            batch = problem.draw_inner(new["draws_inner"])
            new["draws_inner"] += 1
            gy = problem.grad_g_y(x, y, batch)
            _count(new, grads=1)
            res = float(torch.linalg.vector_norm(gy))
            y = problem.project_y(y - lr * gy).detach()
        return y, res

    def _hypergradient(
        self,
        problem: BilevelProblem,
        cfg: Config,
        x: Tensor,
        y: Tensor,
        w: Tensor | None,
        state: dict,
        ob: Any,
        ib: Any,
        corrected: bool = True,
    ) -> Hypergradient:
        solve_options = dict(cfg.solve_options)
        if (
            cfg.solve == "neumann"
            and "alpha" not in solve_options
            and math.isfinite(float(state.get("inner_lr", math.nan)))
        ):
            solve_options["alpha"] = float(state["inner_lr"])  # Lorraine et al.: the inner learning rate
        try:
            return implicit_hypergradient(
                problem,
                x,
                y,
                outer_batch=ob,
                inner_batch=ib,
                solve=cfg.solve,
                tol=cfg.solve_tol,
                maxiter=cfg.solve_maxiter,
                w0=w if cfg.warm_start else None,
                deadline=self.deadline(state),
                solve_options=solve_options,
                corrected=corrected,
            )
        except DeadlineReached as e:
            raise _StopRunError(Status.TIME_LIMIT.value, "time_limit reached inside the adjoint solve") from e

    def _evaluate(
        self, problem: BilevelProblem, cfg: Config, x: Tensor, state: dict, new: dict, lazy: bool = False
    ) -> dict[str, Any]:
        """Deterministic evaluation at ``x``: inner solve (or unroll) and hypergradient, counted into ``new``.

        ``lazy`` (implicit estimator, a line-search trial): the adjoint solve is left to :meth:`_complete`, and
        the trial's value is :math:`\tilde F` with the current adjoint ``w`` instead of :math:`w^*(x)`: the two
        differ by :math:`(w^* - w)^\top\nabla_y g`, second order in the inner solve's residual. A trial the
        search rejects then costs no adjoint solve (on the float32 MLP a search that fails at the limit of
        precision spent 10–14 trials of an inner *and* a 100-product adjoint solve).
        """
        if cfg.estimator == "unroll":
            y0 = state["y"] if cfg.warm_start else problem.project_y(problem.y0.clone())
            K = int(new.get("K") or state.get("K") or 20)
            try:
                hg = unrolled_hypergradient(
                    problem, x, y0, K, float(state["inner_lr"]), bias_tol=cfg.bias_tol, deadline=self.deadline(state)
                )
            except DeadlineReached as e:
                raise _StopRunError(Status.TIME_LIMIT.value, "time_limit reached inside the unrolled steps") from e
            _count(new, grads=hg.grads, hvps=hg.hvps)
            return {"hg": hg, "y": hg.y, "ok": True, "inner_res": hg.inner_grad_norm, "inner_iters": K}
        if cfg.sgd_steps is not None:
            y, res = self._sgd_inner(problem, cfg, x, state["y"], new)
            ok, iters = True, cfg.sgd_steps
        else:
            ires = self._inner(problem, cfg, x, state["y"], state, new)
            y, res, iters = ires.y, ires.grad_norm, ires.n_iter
            ok = bool(ires.converged) or inner_reached(problem, ires)
        ev = {"y": y, "ok": ok, "inner_res": res, "inner_iters": iters, "x": x}
        w = state.get("w")
        if lazy and w is not None:
            fval, _, _ = problem.f_and_grad(x, y)
            gy = problem.grad_g_y(x, y)
            _count(new, grads=2)
            ev["value"] = fval - w @ gy
            return ev
        self._interrupt(state, "adjoint")
        ev["hg"] = self._hypergradient(problem, cfg, x, y, w, state, ALL, ALL)
        _count(new, grads=ev["hg"].grads, hvps=ev["hg"].hvps)
        return ev

    def _complete(self, problem: BilevelProblem, cfg: Config, ev: dict, state: dict, new: dict) -> Tensor:
        """The hypergradient of a lazily evaluated trial (its adjoint solve, once); returns it."""
        if "hg" not in ev:
            self._interrupt(state, "adjoint")
            ev["hg"] = self._hypergradient(problem, cfg, ev["x"], ev["y"], state.get("w"), state, ALL, ALL)
            _count(new, grads=ev["hg"].grads, hvps=ev["hg"].hvps)
        return ev["hg"].grad

    @staticmethod
    def _adopt(state: dict[str, Any], ev: dict[str, Any]) -> None:
        hg: Hypergradient = ev["hg"]
        state.update(
            y=ev["y"],
            w=hg.w,
            hg=hg.grad,
            fcorr=hg.corrected,
            outer_value=hg.value,
            inner_residual=float(ev["inner_res"]),
        )

    # ------------------------------------------------------------------ outer updates
    def _line_search_step(self, problem: BilevelProblem, cfg: Config, state: dict, new: dict) -> dict[str, Any]:
        if state.get("hg") is None or (cfg.estimator == "unroll" and cfg.warm_start):
            # evaluate at x first: init was interrupted, or the unroll starts from the newest y_K (the
            # searched function x -> f(x, y_K(x)) must be the one whose gradient gives the direction)
            ev = self._evaluate(problem, cfg, state["x"], state, new)
            state = dict(state)
            if cfg.estimator == "unroll":  # the trials unroll from the same start state["y"]
                state.update(hg=ev["hg"].grad, fcorr=ev["hg"].corrected)
            else:
                self._adopt(state, ev)
                self._adopt(new, ev)
        x, hg = state["x"], state["hg"]
        hg_norm = float(torch.linalg.vector_norm(hg))
        if cfg.optimizer == "lbfgs":
            d, S, Y = quasi_newton_direction(hg, state["lbfgs_s"], state["lbfgs_y"])
        else:
            d, S, Y = -hg, [], []
        f0 = state["fcorr"]
        cur: dict[str, Any] = {}

        lazy = cfg.estimator == "implicit" and cfg.sgd_steps is None

        def phi(t: float) -> tuple[Tensor, dict[str, Any]]:
            self._interrupt(state, "line_search")
            x_t = problem.project_x(x + t * cur["d"]).detach()
            ev = self._evaluate(problem, cfg, x_t, state, new, lazy=lazy)
            ev["x"] = x_t
            val = ev["value"] if "value" in ev else ev["hg"].corrected
            if problem.x_set is not None:  # projected Armijo: f(x_t) <= f0 + c1 ∇Fᵀ(x_t − x) (Bertsekas 1976)
                val = val - cfg.c1 * (float(hg @ (x_t - x)) - t * cur["slope"])
            if "hg" in ev and not bool(torch.isfinite(ev["hg"].grad).all()):
                val = val * float("nan")
            return val, ev

        def tie(t: float, v: Any, ev: dict[str, Any]) -> bool:
            g = self._complete(problem, cfg, ev, state, new)
            return bool(torch.isfinite(g).all()) and float(torch.linalg.vector_norm(g)) < hg_norm

        noise = NOISE_EPS * torch.finfo(problem.dtype).eps * abs(float(f0))
        for attempt in range(2):  # a failed quasi-Newton search is retried once along -hg (memory cleared)
            t0 = first_trial(hg_norm, d, bool(S), cfg.lr, state.get("ls_step"), state.get("ls_length"))
            cur.update(d=d, slope=float(hg @ d))
            # at the precision limit only the tie rule (a smaller hypergradient) can accept: one trial, not a search
            limit = 0 > cur["slope"] and t0 * abs(cur["slope"]) <= noise
            trials = 1 if limit else (cfg.max_backtracks if attempt == 0 else max(1, cfg.max_backtracks // 2))
            ls = Armijo(c1=cfg.c1, max_trials=trials).search(
                phi,
                f0,
                cur["slope"],
                t0,
                accept=lambda t, v, ev: bool(ev["ok"]),
                tie=tie,
            )
            if ls.success or not S or ls.precision_limit or limit:  # a failed or non-finite L-BFGS search: -hg
                break
            d, S, Y = -hg, [], []
        if not ls.success:
            if ls.status == Status.NAN:
                new.update(status="nan", message=f"{ls.message}; returning the last finite state")
                return new
            scale = state.get("hg_scale")
            small = scale is not None and hg_norm <= LINE_SEARCH_CONVERGED * float(scale)
            if problem.x_set is not None:  # a vanishing projected step: stationary on the set
                moved = float(torch.linalg.vector_norm(problem.project_x(x + t0 * d) - x))
                eps = torch.finfo(problem.dtype).eps
                small = small or moved <= math.sqrt(eps) * (1.0 + float(torch.linalg.vector_norm(x)))
            out = dict(state)
            out["grads"], out["hvps"] = new["grads"], new["hvps"]
            if ls.precision_limit or small:
                why = (
                    "at the limit of precision"
                    if ls.precision_limit
                    else (
                        f"where the hypergradient is {hg_norm / float(scale):.2g} of its first value "
                        "(the inner/adjoint precision limits the decrease)"
                    )
                )
                out.update(status="converged", message=f"the line search found no decrease {why}")
            else:
                out.update(status="line_search_failed", message=ls.message)
            return out
        ev = ls.aux
        x_t = ev["x"]
        if not bool(torch.isfinite(self._complete(problem, cfg, ev, state, new)).all()):
            new.update(status="nan", message="the hypergradient at the accepted trial is not finite")
            return new
        hgt: Hypergradient = ev["hg"]
        if cfg.optimizer == "lbfgs":
            S, Y = lbfgs_update(S, Y, x_t - x, hgt.grad - hg, memory=cfg.memory)
        self._adopt(new, ev)
        K = int(state.get("K") or 20)
        if cfg.estimator == "unroll" and cfg.K is None and hgt.bias > cfg.bias_tol:
            K = min(2 * K, cfg.K_max)  # the truncation shows in the gradient reaching y0: unroll further
        new.update(
            x=x_t,
            lbfgs_s=S,
            lbfgs_y=Y,
            ls_step=ls.t,
            ls_length=max(float(torch.linalg.vector_norm(x_t - x)), float(state.get("ls_length") or 0.0)),
            iter=state["iter"] + 1,
            hypergrad_norm=float(torch.linalg.vector_norm(hgt.grad)),
            K=K,
            log={
                "step_size": ls.t,
                "ls_trials": ls.n_evals,
                "solve_iters": hgt.n_iter,
                "inner_iters": ev["inner_iters"],
                **({"K": int(state.get("K") or 0), "bias": hgt.bias} if cfg.estimator == "unroll" else {}),
            },
        )
        return new

    def _fixed_step(self, problem: BilevelProblem, cfg: Config, state: dict, new: dict) -> dict[str, Any]:
        x = state["x"]
        if cfg.estimator == "unroll":
            K = int(state.get("K") or cfg.K or 20)
            batches = [problem.draw_inner(state["draws_inner"] + k) for k in range(K)]
            ob = problem.draw_outer(state["draws_outer"])
            new["draws_inner"] = state["draws_inner"] + K
            new["draws_outer"] = state["draws_outer"] + 1
            y0 = state["y"] if cfg.warm_start else problem.project_y(problem.y0.clone())
            try:
                hgr = unrolled_hypergradient(
                    problem,
                    x,
                    y0,
                    K,
                    float(state["inner_lr"]),
                    outer_batch=ob,
                    inner_batches=batches,
                    bias_tol=cfg.bias_tol,
                    deadline=self.deadline(state),
                )
            except DeadlineReached as e:
                raise _StopRunError(Status.TIME_LIMIT.value, "time_limit reached inside the unrolled steps") from e
            _count(new, grads=hgr.grads, hvps=hgr.hvps)
            y, res, log = hgr.y, hgr.inner_grad_norm, {"K": K, "bias": hgr.bias}
        else:
            if cfg.sgd_steps is not None or problem.stochastic:
                y, res = self._sgd_inner(problem, cfg, x, state["y"], new)
                iters: Any = cfg.sgd_steps
            else:
                ires = self._inner(problem, cfg, x, state["y"], state, new)
                y, res, iters = ires.y, ires.grad_norm, ires.n_iter
            self._interrupt(state, "adjoint")
            ob = problem.draw_outer(new["draws_outer"])
            ib = problem.draw_inner(new["draws_inner"])
            new["draws_outer"] += 1
            new["draws_inner"] += 1
            hgr = self._hypergradient(problem, cfg, x, y, state.get("w"), state, ob, ib, corrected=False)
            _count(new, grads=hgr.grads, hvps=hgr.hvps)
            new["w"] = hgr.w
            log = {"solve_iters": hgr.n_iter, "inner_iters": iters}
        memory = {k: state.get(k) for k in ("adam_m", "adam_v", "adam_t")}
        x_new, memory = stochastic_update(x, hgr.grad, memory, cfg.optimizer, cfg.fixed_lr, cfg.betas)
        x_new = problem.project_x(x_new).detach()
        new.update(memory)
        new.update(
            x=x_new,
            y=y.detach(),
            iter=state["iter"] + 1,
            outer_value=problem.f(x_new, y, ob),
            hypergrad_norm=float(torch.linalg.vector_norm(hgr.grad)),
            inner_residual=res,
            log=log,
        )
        return new


def inner_reached(problem: BilevelProblem, res: Any) -> bool:
    r"""Whether an inner solve that missed its tolerance still reached :math:`\sqrt\varepsilon` of its scale.

    That precision is enough for the line search on :math:`\tilde F`, whose error is
    :math:`O(\|\nabla_y g\|^2)`; a solve that got there but stalled or hit its cap at the tighter
    default tolerance (the limit of precision of ``g``) does not make the trial step "too long".
    """
    gn, scale = float(res.grad_norm), float(res.scale)
    return math.isfinite(gn) and math.isfinite(scale) and gn <= math.sqrt(torch.finfo(problem.dtype).eps) * scale


def resolve_optimizer(
    name: str, optimizer: str, line_search: bool | None, problem: BilevelProblem, fixed_default: str
) -> tuple[str, bool]:
    """``(optimizer, line_search)`` on ``problem``: ``"auto"`` is L-BFGS with the Armijo search on deterministic
    problems without an ``x_set`` (projected gradient with the search with one), ``fixed_default`` on minibatches."""
    opt = optimizer
    if opt == "auto":
        if problem.stochastic:
            opt = fixed_default
        else:
            opt = "lbfgs" if problem.x_set is None else "gd"
    ls = line_search
    if ls is None:
        ls = opt in ("lbfgs", "gd")
    if ls and opt in ("adam", "normalized"):
        raise ValueError(f"{name}: line_search=True works with optimizer 'lbfgs', 'gd' or 'sgd', not {opt!r}")
    if opt == "sgd" and ls:
        opt = "gd"
    if opt in ("lbfgs", "gd") and not ls:
        raise ValueError(f"{name}: optimizer={opt!r} steps with the line search; use 'sgd' for fixed steps")
    return opt, bool(ls)


@options
class Composite(CompositeSolver):
    r"""A bilevel solver assembled from its pieces (see the module docstring).

    Args:
        estimator: ``"implicit"`` (implicit differentiation at the inner solution) or ``"unroll"``
            (reverse mode through ``K`` inner gradient steps).
        inner: inner solver of :func:`bilevel._inner.solve_inner`: ``None`` (Newton-CG; projected
            gradient with a ``y_set``), ``"newton"``, ``"gd"`` or a :class:`curvlab.solvers.Solver`.
        inner_steps: cap of inner iterations per solve (``None``: scales with the problem).
        inner_tol, inner_rtol: absolute / relative inner gradient tolerances (``None``: the
            dtype-aware default of ``solve_inner``).
        linear_solve: adjoint solve, a :func:`curvlab.linalg.solve` method or a callable.
        solve_tol, solve_maxiter: relative tolerance (``None``: :func:`curvlab.linalg.default_tol`)
            and cap (``None``: ``min(2 dy + 10, 1000)``) of the adjoint solve.
        solve_options: further options of the linear solve (``alpha``, ``K`` for ``"neumann"``, ...).
        warm_start: warm-start the adjoint (and the unroll) from the previous iterate.
        K: unrolled steps (``None``: adaptive, doubling while the truncation bias exceeds ``bias_tol``).
        inner_lr: unrolled / fixed inner step (``None``: ``1/L`` by an HVP power iteration).
        optimizer: ``"auto"``, ``"lbfgs"``, ``"gd"``, ``"adam"``, ``"normalized"``, ``"sgd"``.
        line_search: Armijo search on the outer value (``None``: on for ``"lbfgs"``/``"gd"``).
        lr: first trial step of the search (``None``: scale-free) or the fixed step (``None``: 1e-2).
        memory, c1, max_backtracks, betas: L-BFGS pairs, Armijo constant, trials per search, Adam's decays.
    """

    estimator: str = "implicit"
    inner: Any = None
    inner_steps: int | None = None
    inner_tol: float | None = None
    inner_rtol: float | None = None
    linear_solve: Any = "auto"
    solve_tol: float | None = None
    solve_maxiter: int | None = None
    solve_options: dict[str, Any] | None = None
    warm_start: bool = True
    K: int | None = None
    inner_lr: float | None = None
    optimizer: str = "auto"
    line_search: bool | None = None
    lr: float | None = None
    memory: int = 10
    c1: float = 1e-4
    max_backtracks: int = 10
    betas: tuple[float, float] = (0.9, 0.999)

    def default_rtol(self, problem: BilevelProblem) -> float:
        """Relative hypergradient tolerance: sqrt(eps) (implicit) or :func:`default_bias_tol` (unroll)."""
        eps = torch.finfo(problem.dtype).eps
        return math.sqrt(eps) if self.estimator == "implicit" else default_bias_tol(problem)

    def __post_init__(self) -> None:
        check_choice(self.estimator, "Composite.estimator", ("implicit", "unroll"))
        check_choice(self.optimizer, "Composite.optimizer", OUTER_OPTIMIZERS)
        validate_common(self, "Composite")

    def config(self, problem: BilevelProblem) -> Config:
        opt, ls = resolve_optimizer("Composite", self.optimizer, self.line_search, problem, "adam")
        return Config.on(
            problem,
            estimator=self.estimator,
            inner=self.inner,
            inner_steps=self.inner_steps,
            inner_tol=self.inner_tol,
            inner_rtol=self.inner_rtol,
            sgd_steps=None if not problem.stochastic else (self.inner_steps or 10),
            inner_lr=self.inner_lr,
            solve=self.linear_solve,
            solve_tol=self.solve_tol,
            solve_maxiter=self.solve_maxiter,
            solve_options=dict(self.solve_options or {}),
            warm_start=self.warm_start,
            K=self.K,
            optimizer=opt,
            line_search=ls,
            lr=self.lr,
            memory=self.memory,
            c1=self.c1,
            max_backtracks=self.max_backtracks,
            betas=self.betas,
        )


def adjoint_tol(problem: BilevelProblem) -> float:
    r"""Default relative residual of the adjoint solve: :math:`\varepsilon^{2/3}` in float64
    (:func:`curvlab.linalg.default_tol`), :math:`\sqrt\varepsilon` in float32 and below (what CG resolves on a
    network's Hessian there; the hypergradient needs no more than the outer test's :math:`\sqrt\varepsilon`)."""
    eps = torch.finfo(problem.dtype).eps
    return eps ** (2.0 / 3.0) if eps < 1e-10 else math.sqrt(eps)


def adjoint_maxiter(problem: BilevelProblem) -> int:
    """Default cap of the adjoint solve: ``min(2 dy + 10, 1000)`` in float64, ``min(2 dy + 10, 100)`` in float32
    (single-precision Krylov recurrences lose orthogonality within about a hundred steps)."""
    return min(2 * problem.dy + 10, 1000 if torch.finfo(problem.dtype).eps < 1e-10 else 100)


def k_max(problem: BilevelProblem) -> int:
    """The largest adaptive unroll: ``max(20, min(2000, 200000 // dy))`` steps (memory grows with ``K dy``)."""
    return max(20, min(2000, 200000 // max(problem.dy, 1)))


def default_bias_tol(problem: BilevelProblem) -> float:
    """Target truncation bias of the adaptive unroll: 1e-6 in float64, ``sqrt(eps)`` in float32."""
    return max(1e-6, math.sqrt(torch.finfo(problem.dtype).eps))


def validate_common(obj: Any, name: str) -> None:
    """Check the options every composite preset shares (those it has)."""
    for n in ("lr", "inner_lr", "inner_tol", "inner_rtol", "solve_tol"):
        v = getattr(obj, n, None)
        if v is not None:
            check_positive(v, f"{name}.{n}", allow_zero=n in ("inner_tol", "inner_rtol"))
    for n in ("inner_steps", "solve_maxiter", "K"):
        v = getattr(obj, n, None)
        if v is not None:
            check_int(v, f"{name}.{n}")
    for n in ("memory", "max_backtracks"):
        if hasattr(obj, n):
            check_int(getattr(obj, n), f"{name}.{n}")
    if hasattr(obj, "c1"):
        check_positive(obj.c1, f"{name}.c1")
        if not obj.c1 < 1:
            raise ValueError(f"{name}.c1 must lie in (0, 1), got {obj.c1!r}")
    ls = getattr(obj, "line_search", None)
    if ls not in (None, True, False):
        raise ValueError(f"{name}.line_search must be True, False or None (auto), got {ls!r}")
    s = getattr(obj, "linear_solve", "auto")
    from ._hypergradient import SOLVE_METHODS

    if not (callable(s) or (isinstance(s, str) and s in SOLVE_METHODS)):
        raise ValueError(
            f"{name}.linear_solve must be one of {list(SOLVE_METHODS)} or a callable solve(matvec, b, **options), "
            f"got {s!r}"
        )
