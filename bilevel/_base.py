"""The :class:`BilevelSolver` base class, the shared solve loop and :class:`BilevelResult`.

A bilevel solver is a dataclass of hyperparameters (decorate subclasses with
:func:`curvlab.solvers._base.options`). All per-run state lives in a plain
``dict`` returned by :meth:`BilevelSolver.init` and :meth:`BilevelSolver.step`
(``step`` returns a new dict and never modifies the one it is given), so a
state can be ``torch.save``-d and passed back as ``state=`` to resume. Every
state holds at least

``x``, ``y``          current flat upper- and lower-level variables,
``iter``              outer iterations taken,
``outer_value``       0-d tensor: ``f(x, y)`` on the current outer batch (all data when deterministic),
``hypergrad_norm``    norm of the hypergradient estimate used in the last step (``nan`` before any step),
``inner_residual``    ``‖∇_y g(x, y)‖`` where the solver knows it (else ``nan``),
``grads``             gradient oracle calls so far (each ``∇f`` or ``∇g`` evaluation counts 1),
``hvps``              Hessian- / Jacobian-vector products so far,
``draws_outer``, ``draws_inner``   batches drawn so far (stochastic data),
``status``            ``None`` or a reason the solver wants to stop,
``log``               dict of extra scalars recorded in the history.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from curvlab import History
from curvlab.checks import is_finite as _finite
from curvlab.checks import positive_fields as _check_positive
from curvlab.solvers import check_run_args, options, run_loop

from ._problem import BilevelProblem

__all__ = ["BilevelSolver", "BilevelResult", "options", "_check_positive", "_count", "base_state"]

NAN = float("nan")


def _count(state: dict[str, Any], grads: int = 0, hvps: int = 0) -> dict[str, Any]:
    """Add oracle calls to ``state`` in place (on a state being built by ``step``) and return it."""
    state["grads"] = int(state.get("grads", 0)) + int(grads)
    state["hvps"] = int(state.get("hvps", 0)) + int(hvps)
    return state


def base_state(problem: BilevelProblem, x: Tensor | None = None, y: Tensor | None = None, **extra: Any) -> dict:
    """A fresh state with every common key (``x``/``y`` default to the problem's projected starting points)."""
    x = problem.project_x(problem.x0.clone()) if x is None else x
    y = problem.project_y(problem.y0.clone()) if y is None else y
    state: dict[str, Any] = {
        "x": x,
        "y": y,
        "iter": 0,
        "outer_value": torch.tensor(NAN, dtype=problem.dtype, device=problem.device),
        "hypergrad_norm": NAN,
        "inner_residual": NAN,
        "grads": 0,
        "hvps": 0,
        "draws_outer": 0,
        "draws_inner": 0,
        "status": None,
        "log": {},
    }
    state.update(extra)
    return state


@dataclass
class BilevelResult:
    """What a bilevel solver run returns.

    Attributes:
        x: final upper-level variable in the structure of ``x0`` (a new module for modules).
        y: final lower-level variable in the structure of ``y0``.
        outer_value: ``f(x, y)`` at the end, on the last outer batch seen (all data when deterministic).
        n_iter: outer iterations taken in total (a resumed run counts from the original start).
        converged: whether the hypergradient-norm test ``<= tol`` was met.
        status: ``"converged"``, ``"max_iter"``, ``"nan"``, ``"diverged"``, ``"callback"`` or solver-specific.
        history: per-iteration :class:`curvlab.History` (``iter``, ``outer_value``, ``hypergrad_norm``,
            ``inner_residual``, ``time``, ``grads``, ``hvps`` and solver-specific keys).
        state: the final solver state (``torch.save`` it and pass ``state=`` to resume).
        message: why the run stopped.
        x_flat, y_flat: final variables as flat vectors.
    """

    x: Any
    y: Any
    outer_value: float
    n_iter: int
    converged: bool
    status: str
    history: History = field(default_factory=History)
    state: dict[str, Any] | None = None
    message: str = ""
    x_flat: Any = None
    y_flat: Any = None

    def __repr__(self) -> str:
        return (
            f"BilevelResult(status={self.status!r}, outer_value={self.outer_value:.6g}, n_iter={self.n_iter}, "
            f"converged={self.converged})"
        )


class BilevelSolver:
    """Base class of the bilevel solvers: ``init`` / ``step`` per solver, one shared :meth:`solve` loop."""

    #: whether the solver handles lower-level constraints ``c(x, y) <= 0``
    supports_constraints: bool = False

    def check_problem(self, problem: Any) -> None:
        """Raise ``TypeError`` for a non-:class:`BilevelProblem`, ``ValueError`` for unsupported constraints."""
        if not isinstance(problem, BilevelProblem):
            raise TypeError(f"{type(self).__name__} solves a bilevel.BilevelProblem, got {type(problem).__name__}")
        if problem.constrained and not self.supports_constraints:
            raise ValueError(
                f"{type(self).__name__} cannot handle lower-level constraints (the problem has constraints=...); "
                "use bilevel.LVHBA"
            )

    def init(self, problem: BilevelProblem) -> dict[str, Any]:
        """The state of a fresh run at the problem's starting point."""
        raise NotImplementedError

    def step(self, problem: BilevelProblem, state: dict[str, Any]) -> dict[str, Any]:
        """One outer iteration: return the next state (``state`` itself is not modified)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ #
    @staticmethod
    def _record(state: dict[str, Any], t0: float) -> dict[str, Any]:
        rec = {
            "iter": int(state["iter"]),
            "outer_value": float(state["outer_value"]),
            "hypergrad_norm": float(state.get("hypergrad_norm", NAN)),
            "inner_residual": float(state.get("inner_residual", NAN)),
            "time": time.perf_counter() - t0,
            "grads": int(state.get("grads", 0)),
            "hvps": int(state.get("hvps", 0)),
        }
        for k, v in state.get("log", {}).items():
            rec[k] = float(v) if isinstance(v, Tensor) and v.numel() == 1 else v
        return rec

    def solve(
        self,
        problem: BilevelProblem,
        max_iter: int = 100,
        tol: float = 0.0,
        callback: Any = None,
        progress: bool = False,
        state: dict[str, Any] | None = None,
        raise_on_nan: bool = False,
    ) -> BilevelResult:
        """Run outer iterations until ``max_iter``, a small hypergradient, or a stop.

        Args:
            problem: the :class:`~bilevel.BilevelProblem`.
            max_iter: outer iteration count at which to stop, counted from the start of the run
                (a resumed ``state`` continues up to it).
            tol: stop with ``"converged"`` when the hypergradient norm of the last step is ``<= tol``
                (``0`` never stops early).
            callback: ``callback(state) -> bool | None`` after every iteration; ``True`` stops the run
                with status ``"callback"``.
            progress: show a tqdm progress bar with the outer value.
            state: a state to resume from (:attr:`BilevelResult.state`).
            raise_on_nan: raise ``FloatingPointError`` instead of stopping with ``status="nan"``.

        Returns:
            A :class:`BilevelResult`.

        Raises:
            ValueError: ``max_iter < 1``, ``tol < 0``, or a constrained problem given to a solver
                without constraint support.
            TypeError: ``problem`` not a :class:`~bilevel.BilevelProblem`.
            FloatingPointError: non-finite values with ``raise_on_nan=True``.
        """
        check_run_args(max_iter, tol)
        self.check_problem(problem)
        t0 = time.perf_counter()
        if state is None:
            state = self.init(problem)

        def start(st: dict[str, Any]) -> str | None:
            return None if _finite(st["x"]) and _finite(st["y"]) else "the starting point is not finite"

        def converged(st: dict[str, Any]) -> str | None:
            hg = float(st.get("hypergrad_norm", NAN))
            if tol > 0 and int(st["iter"]) > 0 and math.isfinite(hg) and hg <= tol:
                return f"hypergradient norm {hg:.3g} <= tol {tol:.3g}"
            return None

        def nonfinite(st: dict[str, Any]) -> str | None:
            if _finite(st["x"]) and _finite(st["y"]) and _finite(st["outer_value"]):
                return None
            return f"non-finite x, y or outer value at iteration {int(st['iter'])}; returning the last finite state"

        def blew_up(st: dict[str, Any]) -> str | None:
            if abs(float(st["outer_value"])) > 1e100 or float(st["x"].abs().max()) > 1e100:
                return f"outer value {float(st['outer_value']):.3g} blew up"
            return None

        state, status, message, history = run_loop(
            self,
            problem,
            state,
            t0=t0,
            max_iter=max_iter,
            callback=callback,
            progress=progress,
            raise_on_nan=raise_on_nan,
            start=start,
            converged=converged,
            nonfinite=nonfinite,
            blew_up=blew_up,
            record=self._record,
            postfix=lambda st: {"outer": f"{float(st['outer_value']):.4g}"},
        )
        return BilevelResult(
            x=problem.to_user_x(state["x"]),
            y=problem.to_user_y(state["y"]),
            outer_value=float(state["outer_value"]),
            n_iter=int(state["iter"]),
            converged=status == "converged",
            status=status,
            history=history,
            state=state,
            message=message,
            x_flat=state["x"].detach().clone(),
            y_flat=state["y"].detach().clone(),
        )
