"""The :class:`Solver` base class and the shared solve loop.

A solver is a dataclass whose fields are its hyperparameters. All per-run state
lives in a plain ``dict`` of tensors and Python numbers returned by
:meth:`Solver.init` and :meth:`Solver.step`, so it can be ``torch.save``-d and
resumed. :meth:`Solver.step` never modifies the state it is given; it returns
a new one. Every state holds at least

``x``          the current flat parameter vector,
``value``      the objective at ``x`` (0-d tensor),
``grad``       its gradient (flat) — for solvers that keep it,
``grad_norm``  ``‖grad‖`` (0-d tensor), used by the stopping test,
``iter``       iterations taken,
``matvecs``    curvature products taken so far,
``step_size``  the last step size (float),
``draws``      batches drawn so far (stochastic solvers),
``status``     ``None`` or a reason the solver wants to stop (e.g. ``"line_search_failed"``).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

from torch import Tensor

from .. import distributed as _dist
from .._result import History, Result
from ..checks import is_finite, positive_fields
from ..problems import Problem
from ..status import Status

__all__ = ["Solver", "options", "solve"]


def options(cls: type) -> type:
    """Make ``cls`` a dataclass whose constructor rejects unknown options by name.

    ``GradientDescent(lrr=0.1)`` raises ``TypeError: GradientDescent got unknown
    option(s) ['lrr']; valid options: [...]`` instead of Python's generic message,
    and ``__post_init__`` validation runs as usual.
    """
    cls = dataclasses.dataclass(cls)
    init = cls.__init__
    names = [f.name for f in dataclasses.fields(cls)]

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kw: Any) -> None:  # noqa: N807
        unknown = sorted(set(kw) - set(names))
        if unknown:
            raise TypeError(f"{cls.__name__} got unknown option(s) {unknown}; valid options: {names}")
        init(self, *args, **kw)

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


def _check_positive(obj: Any, *names: str, allow_zero: bool = False) -> None:
    positive_fields(obj, *names, allow_zero=allow_zero)


_finite = is_finite


class Solver:
    """Base class of every curvlab solver.

    Subclasses are decorated with :func:`options` and implement :meth:`init` and
    :meth:`step`; :meth:`solve` (the loop, stopping tests, non-finite handling,
    history, progress bar) is shared.
    """

    #: whether the solver accepts problems of these types (checked in :meth:`check_problem`)
    problem_types: tuple[type, ...] = (Problem,)

    def check_problem(self, problem: Any) -> None:
        """Raise a clear ``TypeError`` if ``problem`` is not a type this solver handles."""
        if not isinstance(problem, self.problem_types):
            names = ", ".join(t.__name__ for t in self.problem_types)
            raise TypeError(f"{type(self).__name__} solves problems of type {names}; got {type(problem).__name__}")

    def init(self, problem: Problem) -> dict[str, Any]:
        """Create the state of a fresh run at ``problem.x0``."""
        raise NotImplementedError

    def step(self, problem: Problem, state: dict[str, Any]) -> dict[str, Any]:
        """One iteration: return the next state (``state`` itself is not modified)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ #
    def _record(self, state: dict[str, Any], t0: float) -> dict[str, Any]:
        rec = {
            "iter": int(state["iter"]),
            "value": float(state["value"]),
            "grad_norm": float(state["grad_norm"]) if state.get("grad_norm") is not None else float("nan"),
            "step_size": float(state.get("step_size", float("nan"))),
            "time": time.perf_counter() - t0,
            "matvecs": int(state.get("matvecs", 0)),
        }
        for k, v in state.get("log", {}).items():
            rec[k] = float(v) if isinstance(v, Tensor) else v
        return rec

    def solve(
        self,
        problem: Problem,
        max_iter: int = 100,
        tol: float = 1e-6,
        callback: Any = None,
        progress: bool = False,
        state: dict[str, Any] | None = None,
        raise_on_nan: bool = False,
    ) -> Result:
        """Run the solver until convergence, ``max_iter`` iterations, or a stop.

        Args:
            problem: the problem (:class:`~curvlab.Minimize`, :class:`~curvlab.LeastSquares`,
                :class:`~curvlab.SupervisedLoss`, …).
            max_iter: iteration count at which to stop, counted from the start of the run
                (a resumed ``state`` continues up to it).
            tol: stop when the gradient norm at the current point is ``<= tol``.
            callback: ``callback(state) -> bool | None`` after every iteration; returning
                ``True`` stops the run with status ``"callback"``.
            progress: show a tqdm progress bar with the current value (on rank 0 only in a
                data-parallel run, see :mod:`curvlab.distributed`).
            state: a state to resume from (as returned in :attr:`Result.state`).
            raise_on_nan: raise ``FloatingPointError`` instead of stopping with ``status="nan"``.

        Returns:
            A :class:`~curvlab.Result`.

        Raises:
            ValueError: if ``max_iter < 1`` or ``tol < 0``.
            TypeError: if the problem type is not supported by this solver.
            FloatingPointError: on non-finite values when ``raise_on_nan=True``.
        """
        check_run_args(max_iter, tol)
        self.check_problem(problem)
        t0 = time.perf_counter()
        if state is None:
            state = self.init(problem)

        def start(st: dict[str, Any]) -> str | None:
            ok = _finite(st["value"]) and _finite(st.get("grad_norm"))
            return None if ok else "the objective or its gradient is not finite at the starting point"

        def converged(st: dict[str, Any]) -> str | None:
            gn = st.get("grad_norm")
            return f"gradient norm {float(gn):.3g} <= tol {tol:.3g}" if gn is not None and float(gn) <= tol else None

        def nonfinite(st: dict[str, Any]) -> str | None:
            if _finite(st["value"]) and _finite(st.get("grad_norm")) and _finite(st["x"]):
                return None
            return f"non-finite value at iteration {int(st['iter'])}; returning the last finite parameters"

        def blew_up(st: dict[str, Any]) -> str | None:
            v = float(st["value"])
            return f"objective {v:.3g} blew up" if abs(v) > 1e100 else None

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
            postfix=lambda st: {"value": f"{float(st['value']):.4g}"},
        )
        return Result(
            params=problem.spec.to_user(state["x"]),
            value=float(state["value"]),
            n_iter=int(state["iter"]),
            converged=status == "converged",
            status=status,
            history=history,
            state=state,
            flat=state["x"].detach().clone(),
            message=message,
        )


def check_run_args(max_iter: Any, tol: Any) -> None:
    """Validate ``solve``'s ``max_iter`` and ``tol`` (shared by every solve loop)."""
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if isinstance(tol, bool) or not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")


Check = Callable[[dict[str, Any]], "str | None"]


def run_loop(
    solver: Any,
    problem: Any,
    state: dict[str, Any],
    *,
    t0: float,
    max_iter: int,
    callback: Any,
    progress: bool,
    raise_on_nan: bool,
    start: Check,
    converged: Check,
    nonfinite: Check,
    blew_up: Check,
    record: Callable[[dict[str, Any], float], dict[str, Any]],
    postfix: Callable[[dict[str, Any]], dict[str, str]],
    time_limit: float | None = None,
) -> tuple[dict[str, Any], Status, str, History]:
    """The iteration loop every ``solve`` shares (single-level here, bilevel in :mod:`bilevel`).

    Stops, in this order, when ``converged(state)`` gives a message, the state carries a
    ``status``, ``max_iter`` is reached, the next state is non-finite (``"nan"``: the last
    finite state is kept), blows up (``"diverged"``), the callback returns ``True``
    (``"callback"``) or ``time_limit`` seconds have passed since ``t0`` (``"time_limit"``). The
    check functions return ``None`` to go on or the sentence that explains the stop. Only
    the main process of a data-parallel run shows the tqdm bar.

    Returns:
        ``(final state, status, message, history)``.

    Raises:
        FloatingPointError: on a ``"nan"`` stop when ``raise_on_nan``.
    """
    history = History()
    status: Status | None = None
    message = start(state) or ""
    if message:
        status = Status.NAN
    bar = None
    if progress and _dist.is_main_process():
        from tqdm.auto import tqdm

        bar = tqdm(total=max_iter, initial=int(state["iter"]), desc=type(solver).__name__)
    try:
        while status is None:
            msg = converged(state)
            if msg:
                status, message = Status.CONVERGED, msg
                break
            if state.get("status"):
                status = Status.of(state["status"])
                message = state.get("message", status)
                break
            if state["iter"] >= max_iter:
                status, message = Status.MAX_ITER, f"reached max_iter={max_iter}"
                break
            new = solver.step(problem, state)
            msg = nonfinite(new)
            if msg:
                status, message = Status.NAN, msg
                break
            msg = blew_up(new)
            if msg:
                status, message, state = Status.DIVERGED, msg, new
                break
            state = new
            history.append(record(state, t0))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(**postfix(state))
            if callback is not None and callback(state):
                status, message = Status.CALLBACK, "stopped by the callback"
            elif time_limit is not None and time.perf_counter() - t0 >= time_limit:
                status, message = Status.TIME_LIMIT, f"time_limit={time_limit:g} s reached"
    finally:
        if bar is not None:
            bar.close()
    assert status is not None
    if status == Status.NAN and raise_on_nan:
        raise FloatingPointError(message)
    return state, status, message, history


def solve(problem: Problem, solver: Solver, **kwargs: Any) -> Result:
    """Solve ``problem`` with ``solver``: the same as ``solver.solve(problem, **kwargs)``.

    Args:
        problem: a curvlab problem.
        solver: a :class:`Solver` instance.
        **kwargs: ``max_iter``, ``tol``, ``callback``, ``progress``, ``state``, ``raise_on_nan``.

    Returns:
        The :class:`~curvlab.Result`.

    Raises:
        TypeError: if ``solver`` is not a curvlab solver.
    """
    if not isinstance(solver, Solver):
        raise TypeError(f"solver must be a curvlab solver instance, got {type(solver).__name__}")
    return solver.solve(problem, **kwargs)
