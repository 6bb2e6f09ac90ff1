"""Small helpers shared by the solvers (points, batches, state bookkeeping)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..problems import ALL, Problem


def batch_for(problem: Problem, draws: int) -> tuple[Any, int]:
    """The batch a stochastic solver uses next (and the new draw count); ``ALL`` when deterministic."""
    if problem.stochastic:
        return problem.draw(draws), draws + 1
    return ALL, draws


def point(problem: Problem, x: Tensor, batch: Any) -> dict[str, Any]:
    """Value, gradient and gradient norm at ``x`` on ``batch``."""
    value, grad = problem.value_and_grad(x, batch)
    return {"x": x, "value": value, "grad": grad, "grad_norm": grad.norm()}


def fresh_state(problem: Problem, **extra: Any) -> dict[str, Any]:
    """The common part of every solver's initial state, evaluated at ``problem.x0``."""
    batch, draws = batch_for(problem, 0)
    state = point(problem, problem.x0.clone(), batch)
    state.update(iter=0, matvecs=0, step_size=0.0, draws=draws, status=None, log={})
    state.update(extra)
    return state


def current_batch(problem: Problem, state: dict[str, Any]) -> Any:
    """The batch the state's value and gradient were computed on (``ALL`` when deterministic)."""
    return problem.draw(state["draws"] - 1) if problem.stochastic else ALL


def search_stop(ls: Any, what: str = "") -> dict[str, Any]:
    """``status``/``message`` entries for a state whose line search ``ls`` (a failed
    :class:`~curvlab.solvers.LineSearchResult`) ends the run.

    ``"nan"`` when every trial was non-finite; ``"converged"`` when the failure is the limit
    of precision (the first trial predicted a decrease below the rounding noise of ``f``: no
    step can decrease ``f`` measurably, the Newton-decrement test at the dtype's
    tolerance); ``"line_search_failed"`` otherwise.
    """
    along = f" along the {what}" if what else ""
    if ls.status == "nan":
        return {"status": "nan", "message": f"{ls.message}{along}; returning the last finite parameters"}
    if ls.precision_limit:
        return {
            "status": "converged",
            "message": f"no decrease of f resolvable in this precision{along} "
            "(the predicted decrease is below the rounding noise of f)",
        }
    return {"status": "line_search_failed", "message": f"{ls.message}{along}"}
