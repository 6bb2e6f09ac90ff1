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
import math
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .. import distributed as _dist
from .._result import History, Result
from ..checks import check_positive, is_finite, is_number
from ..problems import Problem
from ..status import Status

__all__ = ["Solver", "options", "solve", "run_loop", "check_run_args", "default_rtol"]


def options(cls: type) -> type:
    """Make ``cls`` a dataclass whose constructor rejects unknown options by name and maps old names.

    ``GradientDescent(lrr=0.1)`` raises ``TypeError: GradientDescent got unknown option(s) ['lrr']; valid
    options: [...]`` instead of Python's generic message, and ``__post_init__`` validation runs as usual.

    Renamed options: a class attribute ``aliases = {"old": "new", ...}`` (kept in ``cls.aliases``, the
    torch.optim adapters read it too) lets ``Solver(old=v)`` work as ``Solver(new=v)`` with a
    ``DeprecationWarning``; giving both names is a ``TypeError``. The glossary of the names is in
    :mod:`curvlab.solvers`.
    """
    cls = dataclasses.dataclass(cls)
    init = cls.__init__
    names = [f.name for f in dataclasses.fields(cls)]
    aliases: dict[str, str] = dict(getattr(cls, "aliases", {}) or {})
    for old, new in aliases.items():
        if new not in names:  # pragma: no cover - a programming error in curvlab
            raise AssertionError(f"{cls.__name__}.aliases maps {old!r} to the unknown option {new!r}")

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kw: Any) -> None:  # noqa: N807
        for old in [k for k in kw if k in aliases]:
            new = aliases[old]
            if new in kw:
                raise TypeError(f"{cls.__name__} got both {old!r} and its new name {new!r}; pass only {new!r}")
            msg = f"{cls.__name__}({old}=...) is deprecated; use {new}=... (same meaning)"
            warnings.warn(msg, DeprecationWarning, stacklevel=2)
            kw[new] = kw.pop(old)
        unknown = sorted(set(kw) - set(names))
        if unknown:
            raise TypeError(f"{cls.__name__} got unknown option(s) {unknown}; valid options: {names}")
        init(self, *args, **kw)

    cls.__init__ = __init__  # type: ignore[method-assign]
    cls.aliases = aliases  # type: ignore[attr-defined]
    for old, new in aliases.items():  # read access under the old name, with the same warning
        setattr(cls, old, _alias_property(cls.__name__, old, new))
    return cls


def _alias_property(owner: str, old: str, new: str) -> property:
    def get(self: Any) -> Any:
        warnings.warn(f"{owner}.{old} is deprecated; use {owner}.{new}", DeprecationWarning, stacklevel=2)
        return getattr(self, new)

    return property(get, doc=f"Deprecated alias of :attr:`{new}`.")


def default_rtol(dtype: torch.dtype) -> float:
    """The default relative gradient tolerance of ``solve()``: ``sqrt(eps)`` of ``dtype`` (1.49e-8 in float64,
    3.45e-4 in float32; MINPACK's recommended tolerance)."""
    return math.sqrt(torch.finfo(dtype).eps)


class Solver:
    """Base class of every curvlab solver.

    Subclasses are decorated with :func:`options` and implement :meth:`init` and
    :meth:`step`; :meth:`solve` (the loop, stopping tests, non-finite handling,
    history, progress bar) is shared.
    """

    #: whether the solver accepts problems of these types (checked in :meth:`check_problem`)
    problem_types: tuple[type, ...] = (Problem,)
    #: renamed options ``{"old": "new"}`` (see :func:`options`)
    aliases: dict[str, str] = {}

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

    def default_rtol(self, dtype: torch.dtype) -> float | None:
        """The relative gradient tolerance :meth:`solve` uses when neither ``tol`` nor ``rtol`` is given.

        :func:`default_rtol` (``sqrt(eps)`` of the parameters' dtype); ``None`` for a solver whose own
        stopping tests are the defaults (:class:`~curvlab.solvers.GaussNewton`'s ``ftol/xtol/gtol``).
        """
        return default_rtol(dtype)

    # ------------------------------------------------------------------ #
    def _record(self, state: dict[str, Any], t0: float) -> dict[str, Any]:
        gn = state.get("grad_norm")
        rec = {
            "iter": int(state["iter"]),
            "value": float(state["value"]),
            "grad_norm": float(gn) if gn is not None else math.nan,
            "step_size": float(state.get("step_size", math.nan)),
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
        tol: float | None = None,
        callback: Any = None,
        progress: bool = False,
        state: dict[str, Any] | None = None,
        raise_on_nan: bool = False,
        *,
        rtol: float | None = None,
        time_limit: float | None = None,
    ) -> Result:
        """Run the solver until convergence, ``max_iter`` iterations, or a stop.

        Stopping (the first that holds ends the run; the result's ``status`` says which, from
        :class:`curvlab.Status`):

        * ``"converged"`` — the gradient test: ``‖g‖ <= rtol · ‖g₀‖`` with ``g₀`` the gradient at the
          start of the run (scipy-style; a resumed run keeps its ``g₀``), or ``‖g‖ <= tol``; or a
          solver's own convergence test (GaussNewton's MINPACK tests, a line search at the limit of
          the dtype's precision — the message says which). From a start near a stationary point (e.g.
          a tiny random init of a factorization) ``‖g₀‖`` is tiny and the relative test is not reached:
          such a run ends with ``"max_iter"`` (honest) unless an absolute ``tol`` is given;
        * ``"max_iter"``, ``"time_limit"``, ``"callback"``;
        * ``"nan"`` — a non-finite value (objective, gradient, parameters, every trial of a line
          search) stopped the run; the last finite parameters are returned (or
          ``FloatingPointError`` is raised with ``raise_on_nan=True``);
        * ``"diverged"`` (objective above 1e100), ``"line_search_failed"`` and solver-specific ones.

        Tolerances: with neither ``tol`` nor ``rtol`` given the test is relative, ``rtol`` =
        :meth:`default_rtol` (``sqrt(eps)`` of the parameters' dtype: 1.49e-8 in float64, 3.45e-4 in
        float32), so it does not depend on the scale of the loss or of the parameters. An explicit
        ``tol`` is an absolute gradient-norm tolerance (the meaning it always had; ``tol=0`` switches
        the gradient test off); ``rtol`` and ``tol`` together: either suffices. A tolerance the
        dtype cannot resolve (``rtol < eps``, or ``0 < tol < eps·‖g₀‖``) is raised to that limit with
        a ``UserWarning``.

        Args:
            problem: the problem (:class:`~curvlab.Minimize`, :class:`~curvlab.LeastSquares`,
                :class:`~curvlab.SupervisedLoss`, …).
            max_iter: iteration count at which to stop, counted from the start of the run
                (a resumed ``state`` continues up to it).
            tol: absolute gradient-norm tolerance (``None``: none unless ``rtol`` is also ``None``,
                then the relative default applies).
            callback: ``callback(state) -> bool | None`` after every iteration; returning
                ``True`` stops the run with status ``"callback"``.
            progress: show a tqdm progress bar with the current value (on rank 0 only in a
                data-parallel run, see :mod:`curvlab.distributed`).
            state: a state to resume from (as returned in :attr:`Result.state`).
            raise_on_nan: raise ``FloatingPointError`` instead of stopping with ``status="nan"``.
            rtol: relative gradient-norm tolerance (see above).
            time_limit: wall-clock budget in seconds (``"time_limit"`` when reached).

        Returns:
            A :class:`~curvlab.Result`.

        Raises:
            ValueError: on ``max_iter < 1``, a negative or non-numeric ``tol`` / ``rtol``, or a
                non-positive ``time_limit``.
            TypeError: if the problem type is not supported by this solver.
            FloatingPointError: on non-finite values when ``raise_on_nan=True``.
        """
        check_run_args(max_iter, tol, rtol=rtol, time_limit=time_limit)
        self.check_problem(problem)
        t0 = time.perf_counter()
        state = self.init(problem) if state is None else dict(state)
        x = state["x"]
        dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
        eps = torch.finfo(dtype).eps
        if tol is None and rtol is None:
            rtol = self.default_rtol(dtype)
        gn0 = state.get("grad_norm")
        gn0 = float(gn0) if gn0 is not None else math.nan
        if rtol is not None and 0 < rtol < eps or rtol == 0 and tol is None:
            if rtol > 0:
                warnings.warn(f"rtol={rtol:g} is below the {dtype} precision; using eps={eps:.3g}", stacklevel=2)
            rtol = max(rtol, eps)
        if tol is not None and tol > 0 and math.isfinite(gn0) and tol < eps * gn0:
            warnings.warn(
                f"tol={tol:g} is below what {dtype} resolves at this gradient scale (eps·‖g₀‖ = {eps * gn0:.3g}); "
                "using that",
                stacklevel=2,
            )
            tol = eps * gn0
        atol = float(tol) if tol is not None else None

        last: dict[str, Any] = {"id": None}

        def floats(st: dict[str, Any]) -> tuple[float, float]:
            """``(value, grad_norm)`` of ``st`` as floats, converted once per state (one host sync each)."""
            if last["id"] is not st:
                gn = st.get("grad_norm")
                last.update(id=st, value=float(st["value"]), gn=float(gn) if gn is not None else math.nan)
            return last["value"], last["gn"]

        def start(st: dict[str, Any]) -> str | None:
            v, gn = floats(st)
            ok = math.isfinite(v) and not (st.get("grad_norm") is not None and not math.isfinite(gn))
            return None if ok else "the objective or its gradient is not finite at the starting point"

        def converged(st: dict[str, Any]) -> str | None:
            _, gn = floats(st)
            if not math.isfinite(gn):
                return None
            scale = st.get("grad_scale")
            if scale is None:  # the initial gradient norm, kept in the state (a resumed run keeps its scale)
                scale = st["grad_scale"] = gn
            if atol is not None and gn <= atol:
                return f"gradient norm {gn:.3g} <= tol {atol:.3g}"
            if rtol is not None and gn <= rtol * scale:
                return f"gradient norm {gn:.3g} <= rtol {rtol:.3g} × its initial value {scale:.3g}"
            return None

        def nonfinite(st: dict[str, Any]) -> str | None:
            v, gn = floats(st)
            if math.isfinite(v) and (st.get("grad_norm") is None or math.isfinite(gn)) and _finite(st["x"]):
                return None
            return f"non-finite value at iteration {int(st['iter'])}; returning the last finite parameters"

        def blew_up(st: dict[str, Any]) -> str | None:
            v, _ = floats(st)
            return f"objective {v:.3g} blew up" if abs(v) > 1e100 else None

        def record(st: dict[str, Any], t: float) -> dict[str, Any]:
            v, gn = floats(st)
            rec = {
                "iter": int(st["iter"]),
                "value": v,
                "grad_norm": gn,
                "step_size": float(st.get("step_size", math.nan)),
                "time": time.perf_counter() - t,
                "matvecs": int(st.get("matvecs", 0)),
            }
            for k, val in st.get("log", {}).items():
                rec[k] = float(val) if isinstance(val, Tensor) else val
            return rec

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
            record=record if type(self)._record is Solver._record else self._record,
            postfix=lambda st: {"value": f"{floats(st)[0]:.4g}"},
            time_limit=time_limit,
        )
        return Result(
            params=problem.spec.to_user(state["x"]),
            value=float(state["value"]),
            n_iter=int(state["iter"]),
            converged=status == Status.CONVERGED,
            status=status,
            history=history,
            state=state,
            flat=state["x"].detach().clone(),
            message=message,
        )


_finite = is_finite


def check_run_args(max_iter: Any, tol: Any, *, rtol: Any = None, time_limit: Any = None, tol_name: str = "tol") -> None:
    """Validate ``solve``'s ``max_iter``, ``tol`` (``None`` allowed), ``rtol`` and ``time_limit`` (every loop's).

    Raises:
        ValueError: ``max_iter`` not an integer >= 1, ``tol`` / ``rtol`` not a number >= 0 (or ``None``),
            ``time_limit`` not a number > 0 (or ``None``); the message names the argument.
    """
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    for name, v in ((tol_name, tol), ("rtol", rtol)):
        if v is not None and not (is_number(v) and v >= 0 and not math.isnan(v)):
            raise ValueError(f"{name} must be a number >= 0 or None, got {v!r}")
    if time_limit is not None:
        check_positive(time_limit, "time_limit", allow_inf=True)


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
    ``status`` (a :class:`~curvlab.Status` value or its string; ``message`` beside it), ``max_iter``
    is reached, the next state is non-finite (``"nan"``: the last finite state is kept), blows up
    (``"diverged"``), the callback returns ``True`` (``"callback"``) or ``time_limit`` seconds have
    passed since ``t0`` (``"time_limit"``). The check functions return ``None`` to go on or the
    sentence that explains the stop. Only the main process of a data-parallel run shows the tqdm bar.

    Returns:
        ``(final state, status, message, history)``.

    Raises:
        FloatingPointError: on a ``"nan"`` stop (from a check or from the state) when ``raise_on_nan``.
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
    step = solver.step
    append = history.append
    try:
        while status is None:
            msg = converged(state)
            if msg:
                status, message = Status.CONVERGED, msg
                break
            if state.get("status"):
                status = Status.of(state["status"])
                message = state.get("message") or str(status)
                break
            if state["iter"] >= max_iter:
                status, message = Status.MAX_ITER, f"reached max_iter={max_iter}"
                break
            new = step(problem, state)
            msg = nonfinite(new)
            if msg:
                status, message = Status.NAN, msg
                break
            msg = blew_up(new)
            if msg:
                status, message, state = Status.DIVERGED, msg, new
                break
            state = new
            append(record(state, t0))
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
        **kwargs: ``max_iter``, ``tol``, ``rtol``, ``callback``, ``progress``, ``state``, ``raise_on_nan``,
            ``time_limit`` (see :meth:`Solver.solve`).

    Returns:
        The :class:`~curvlab.Result`.

    Raises:
        TypeError: if ``solver`` is not a curvlab solver.
    """
    if not isinstance(solver, Solver):
        raise TypeError(f"solver must be a curvlab solver instance, got {type(solver).__name__}")
    return solver.solve(problem, **kwargs)
