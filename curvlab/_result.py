"""The :class:`Result` of a solver run and its per-iteration :class:`History`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .status import Status

__all__ = ["Result", "History"]


class History:
    """Per-iteration records of a run.

    Each record is a dict (``iter``, ``value``, ``grad_norm``, ``step_size``, ``time``,
    ``matvecs`` and solver-specific keys). Index by position for a record or by key
    for a column: ``history[-1]["value"] == history["value"][-1]``.
    """

    def __init__(self, records: list[dict[str, Any]] | None = None) -> None:
        self.records: list[dict[str, Any]] = list(records or [])

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records)

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, str):
            if self.records and key not in self.records[0]:
                raise KeyError(f"no column {key!r} in history; columns: {sorted(self.records[0])}")
            return [r.get(key) for r in self.records]
        return self.records[key]

    def keys(self) -> list[str]:
        """Column names."""
        return list(self.records[0]) if self.records else []

    def __repr__(self) -> str:
        return f"History({len(self)} records, columns={self.keys()})"


@dataclass
class Result:
    """What a solver run returns (field names follow the architecture contract;
    ``x``, ``fun``, ``nit``, ``success`` and ``message`` give the ``scipy.optimize`` view).

    Attributes:
        params: final parameters in the structure that went in (a new module for modules).
        value: final objective value (on the last batch seen for stochastic solvers).
        n_iter: iterations taken in total (a resumed run counts from the original start).
        converged: whether a convergence test was met (``status == "converged"``).
        status: why the run stopped, a :class:`curvlab.Status` (a ``str`` enum, so it compares equal
            to its string): ``"converged"`` (the gradient test of :meth:`~curvlab.solvers.Solver.solve`
            or a solver's own convergence test; :attr:`message` says which), ``"max_iter"``,
            ``"time_limit"``, ``"callback"``, ``"nan"`` (a non-finite value stopped the run; the last
            finite parameters are returned), ``"diverged"`` (the objective blew up),
            ``"line_search_failed"`` (no trial step decreased the objective), ``"stalled"``. Strings
            are accepted and converted (``"maxiter"`` → ``"max_iter"``).
        history: per-iteration :class:`History`.
        state: the final solver state (``torch.save`` it and pass ``state=`` to resume).
        flat: final parameters as a flat vector.
        message: a human-readable sentence on why the run stopped.
    """

    params: Any
    value: float
    n_iter: int
    converged: bool
    status: Status
    history: History = field(default_factory=History)
    state: dict[str, Any] | None = None
    flat: Any = None
    message: str = ""

    def __post_init__(self) -> None:
        self.status = Status.of(self.status)

    @property
    def x(self) -> Any:
        """Alias of :attr:`params` (scipy's name)."""
        return self.params

    @property
    def fun(self) -> float:
        """Alias of :attr:`value` (scipy's name)."""
        return self.value

    @property
    def nit(self) -> int:
        """Alias of :attr:`n_iter` (scipy's name)."""
        return self.n_iter

    @property
    def success(self) -> bool:
        """Alias of :attr:`converged` (scipy's name)."""
        return self.converged

    def __repr__(self) -> str:
        return (
            f"Result(status={self.status!r}, value={self.value:.6g}, n_iter={self.n_iter}, converged={self.converged})"
        )
