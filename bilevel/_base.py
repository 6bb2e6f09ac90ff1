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
``status``            ``None`` or a reason the solver wants to stop (a :class:`curvlab.Status` value;
                      ``"converged"`` when a step itself detects convergence), ``message`` beside it,
``log``               dict of extra scalars recorded in the history.

:meth:`BilevelSolver.solve` adds ``hg_scale`` (the first hypergradient norm, the reference of
the relative test), ``f_window`` (recent ``(iter, outer_value)`` pairs of the no-progress test) and,
while running, ``deadline`` (removed from the returned state).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from curvlab import History
from curvlab.checks import check_int
from curvlab.checks import is_finite as _finite
from curvlab.checks import positive_fields as _check_positive
from curvlab.solvers import check_run_args, options, run_loop
from curvlab.status import Status

from ._problem import BilevelProblem

__all__ = ["BilevelSolver", "BilevelResult", "WINDOW", "options", "_check_positive", "_count", "base_state"]

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
        converged: whether ``status == "converged"`` (the stop rule of :meth:`BilevelSolver.solve`).
        status: a :class:`curvlab.Status`: ``"converged"``, ``"max_iter"``, ``"time_limit"``, ``"callback"``,
            ``"nan"``, ``"diverged"`` or solver-specific (``"line_search_failed"``, ...).
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


#: outer iterations over which "no progress of F" is judged (deterministic problems; see BilevelSolver.solve)
WINDOW = 10


def _noise(value: float, dtype: torch.dtype) -> float:
    """Rounding noise of a function value ``value`` in ``dtype`` (16 eps |value|, the line search's measure)."""
    fi = torch.finfo(dtype)
    return 16.0 * fi.eps * abs(value) + fi.tiny


class BilevelSolver:
    """Base class of the bilevel solvers: ``init`` / ``step`` per solver, one shared :meth:`solve` loop.

    The stop rule (the same for every solver) is documented in :meth:`solve`; a solver tunes it only
    through :meth:`default_rtol` (and :meth:`default_window`). Inside a long outer iteration a solver
    calls :meth:`interrupted` between its phases (inner solve, adjoint solve, line-search trials) and
    passes :meth:`deadline` down to inner and adjoint solves, so ``time_limit`` and the callback can
    stop a run inside an iteration.
    """

    #: whether the solver handles lower-level constraints ``c(x, y) <= 0``
    supports_constraints: bool = False
    #: seconds between two calls of the callback from *inside* an outer iteration (see :meth:`solve`)
    callback_interval: float = 1.0

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

    # ------------------------------------------------------------------ stop rule
    def default_rtol(self, problem: BilevelProblem) -> float:
        r"""The relative hypergradient tolerance :meth:`solve` uses when neither ``tol`` nor ``rtol`` is given.

        Base default (first-order single-loop methods, whose hypergradient estimates carry an
        :math:`O(\text{step})` bias): :math:`\max(10^{-4}, \sqrt{\varepsilon})` of the problem's dtype
        (1e-4 in float64, 3.45e-4 in float32). Solvers with exact hypergradients tighten it.
        """
        return max(1e-4, math.sqrt(torch.finfo(problem.dtype).eps))

    def default_window(self, problem: BilevelProblem) -> int:
        """Outer iterations without progress of ``F`` that end a run as converged (0: never).

        :data:`WINDOW` (10) on deterministic problems, where ``outer_value`` is ``F`` on all the
        data; 0 on stochastic ones (minibatch values are noise, not progress).
        """
        return 0 if problem.stochastic else WINDOW

    def result_point(self, state: dict[str, Any]) -> tuple[Tensor, Tensor, Any]:
        """``(x, y, outer_value)`` the :class:`BilevelResult` reports for the final ``state`` (the state's own;
        a solver whose search may end above its best point returns that one). The state itself, for resuming,
        is left as it is."""
        return state["x"], state["y"], state["outer_value"]

    def deadline(self, state: dict[str, Any]) -> float | None:
        """The ``time.perf_counter()`` value after which inner and adjoint solves return what they have."""
        d = state.get("deadline")
        return None if d is None else float(d)

    def interrupted(self, state: dict[str, Any], phase: str = "") -> tuple[str, str] | None:
        """Whether the run must stop *inside* the current outer iteration: ``(status, message)`` or ``None``.

        Checks the deadline of ``time_limit`` and, at most every :attr:`callback_interval`
        seconds, calls the callback with a partial view of the iteration: the state of the last
        completed iteration (every key a callback reads between iterations: ``iter``, ``x``, ``y``,
        ``outer_value``, ``grads``, ``hvps``, ...) plus ``"partial": True``, ``"phase"`` and ``"elapsed"``.
        A step that gets a stop returns its input state with the ``status`` and ``message`` set (the
        variables of the last completed iteration).
        """
        now = time.perf_counter()
        d = self.deadline(state)
        if d is not None and now >= d:
            return Status.TIME_LIMIT.value, f"time_limit reached inside outer iteration {int(state['iter']) + 1}"
        hook = getattr(self, "_hook", None)
        if hook is not None and now - hook["last"] >= self.callback_interval:
            hook["last"] = now
            view = {**state, "partial": True, "phase": phase, "iter": int(state["iter"]), "elapsed": now - hook["t0"]}
            if hook["callback"](view):
                return Status.CALLBACK.value, f"stopped by the callback inside outer iteration {int(state['iter']) + 1}"
        return None

    def stop_inside(self, state: dict[str, Any], stop: tuple[str, str]) -> dict[str, Any]:
        """``state`` (the input of the step) with the stop ``(status, message)`` of :meth:`interrupted` set."""
        new = dict(state)
        new["status"], new["message"] = stop
        return new

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
        max_iter: int = 1000,
        tol: float | None = None,
        callback: Any = None,
        progress: bool = False,
        state: dict[str, Any] | None = None,
        raise_on_nan: bool = False,
        *,
        rtol: float | None = None,
        time_limit: float | None = None,
        window: int | None = None,
    ) -> BilevelResult:
        r"""Run outer iterations until the stop rule holds (the same rule for every bilevel solver).

        Stops, the first that holds (``status`` from :class:`curvlab.Status`):

        * ``"converged"`` —
          (a) the hypergradient test :math:`\|\hat\nabla F\| \le \max(\text{tol}, \text{rtol}\cdot
          \|\hat\nabla F_0\|)` with :math:`\hat\nabla F_0` the first nonzero hypergradient of the run (kept in
          the state as ``hg_scale``: a resumed run keeps it). With neither ``tol`` nor ``rtol``
          given, ``rtol`` is the solver's :meth:`default_rtol` (scale-free and dtype-aware); an
          explicit ``tol`` alone is the absolute test it always was (``tol=0`` switches the test off);
          (b) no progress of ``F``: over the last ``window`` outer iterations the recorded
          ``outer_value`` stayed within its rounding noise (:math:`16\varepsilon|F|`) — deterministic
          problems only (``window`` defaults to :meth:`default_window`: 10 there, off on minibatches;
          ``window=0`` switches it off);
          (c) a step reports convergence itself (e.g. a line search that finds no decrease where
          the predicted decrease is below the precision of ``F``), with a message saying so;
        * ``"max_iter"``; ``"time_limit"`` — ``time_limit`` seconds passed, checked between
          iterations *and inside* them: :meth:`deadline` is passed to inner and adjoint solves,
          which then return what they have, and the iteration stops keeping the last completed
          iterate;
        * ``"callback"`` — ``callback(state)`` returned ``True`` after an iteration, or, inside a long
          iteration, ``callback(view)`` returned ``True`` for a partial view (``view["partial"]`` is
          ``True``; called at most every :attr:`callback_interval` seconds, between inner solve,
          adjoint solve and line-search trials);
        * ``"nan"`` (non-finite x, y or outer value: the last finite state is returned),
          ``"diverged"`` (outer value or x above 1e100), and solver-specific ones
          (``"line_search_failed"``, ...).

        Args:
            problem: the :class:`~bilevel.BilevelProblem`.
            max_iter: outer iteration count at which to stop, counted from the start of the run
                (a resumed ``state`` continues up to it).
            tol: absolute hypergradient-norm tolerance (see above; ``None``: none).
            callback: ``callback(state) -> bool | None`` (see above).
            progress: show a tqdm progress bar with the outer value.
            state: a state to resume from (:attr:`BilevelResult.state`).
            raise_on_nan: raise ``FloatingPointError`` instead of stopping with ``status="nan"``.
            rtol: hypergradient tolerance relative to the first hypergradient norm.
            time_limit: wall-clock budget in seconds.
            window: iterations of the no-progress test (``None``: :meth:`default_window`; 0: off).

        Returns:
            A :class:`BilevelResult`.

        Raises:
            ValueError: ``max_iter < 1``, a negative ``tol``/``rtol``/``window``, a non-positive
                ``time_limit``, or a constrained problem given to a solver without constraint support.
            TypeError: ``problem`` not a :class:`~bilevel.BilevelProblem`.
            FloatingPointError: non-finite values with ``raise_on_nan=True``.
        """
        check_run_args(max_iter, tol, rtol=rtol, time_limit=time_limit)
        self.check_problem(problem)
        window = self.default_window(problem) if window is None else check_int(window, "window", minimum=0)
        if tol is None and rtol is None:
            rtol = self.default_rtol(problem)
        eps = torch.finfo(problem.dtype).eps
        if rtol is not None and 0 < rtol < eps:
            rtol = eps
        atol = float(tol) if tol is not None else 0.0
        t0 = time.perf_counter()
        state = self.init(problem) if state is None else dict(state)
        deadline = None if time_limit is None or math.isinf(time_limit) else t0 + float(time_limit)
        state["deadline"] = deadline

        def start(st: dict[str, Any]) -> str | None:
            return None if _finite(st["x"]) and _finite(st["y"]) else "the starting point is not finite"

        def converged(st: dict[str, Any]) -> str | None:
            st["deadline"] = deadline
            hg = float(st.get("hypergrad_norm", NAN))
            if math.isfinite(hg):
                if st.get("hg_scale") is None and hg > 0:  # the first nonzero hypergradient is the reference
                    st["hg_scale"] = hg
                scale = st.get("hg_scale")
                if atol > 0 and hg <= atol:
                    return f"hypergradient norm {hg:.3g} <= tol {atol:.3g}"
                if rtol and scale is not None and hg <= rtol * float(scale) and int(st["iter"]) > 0:
                    return f"hypergradient norm {hg:.3g} <= rtol {rtol:.3g} × its first value {scale:.3g}"
            if window > 0:
                it, fv = int(st["iter"]), float(st["outer_value"])
                hist = list(st.get("f_window") or [])
                if math.isfinite(fv) and (not hist or hist[-1][0] < it):
                    hist = (hist + [(it, fv)])[-(window + 1) :]
                    st["f_window"] = hist
                if len(hist) == window + 1 and hist[-1][0] - hist[0][0] == window:
                    vals = [v for _, v in hist]
                    if max(vals) - min(vals) <= _noise(max(abs(v) for v in vals), problem.dtype):
                        return f"no progress of F over the last {window} outer iterations (within rounding noise)"
            return None

        def nonfinite(st: dict[str, Any]) -> str | None:
            if _finite(st["x"]) and _finite(st["y"]) and _finite(st["outer_value"]):
                return None
            return f"non-finite x, y or outer value at iteration {int(st['iter'])}; returning the last finite state"

        def blew_up(st: dict[str, Any]) -> str | None:
            if abs(float(st["outer_value"])) > 1e100 or float(st["x"].abs().max()) > 1e100:
                return f"outer value {float(st['outer_value']):.3g} blew up"
            return None

        self._hook = None if callback is None else {"callback": callback, "last": t0, "t0": t0}
        try:
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
                time_limit=time_limit,
            )
        finally:
            self._hook = None
        state = dict(state)
        state.pop("deadline", None)
        if status in (Status.TIME_LIMIT, Status.CALLBACK):  # a stop inside an iteration: resumable state
            state["status"], state["message"] = None, ""
        x, y, fv = self.result_point(state)
        return BilevelResult(
            x=problem.to_user_x(x),
            y=problem.to_user_y(y),
            outer_value=float(fv),
            n_iter=int(state["iter"]),
            converged=status == Status.CONVERGED,
            status=status,
            history=history,
            state=state,
            message=message,
            x_flat=x.detach().clone(),
            y_flat=y.detach().clone(),
        )
