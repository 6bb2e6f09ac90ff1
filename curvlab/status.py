"""One vocabulary for why a computation stopped: :class:`Status`.

Every result in curvlab and the packages above it (:class:`curvlab.Result`,
:class:`curvlab.linalg.KrylovResult`, :class:`curvlab.spectrum.EigshResult`,
``bilevel.BilevelResult``) carries a ``status`` from this enum. It is a ``str``
enum, so ``result.status == "converged"`` and ``result.status is Status.CONVERGED``
both hold, it prints as its value, and it survives ``torch.save`` / ``json``.

Example:
    >>> from curvlab import Status
    >>> Status("max_iter") is Status.MAX_ITER, Status.of("maxiter") is Status.MAX_ITER
    (True, True)
    >>> f"{Status.NAN}"
    'nan'
"""

from __future__ import annotations

from enum import Enum

__all__ = ["Status"]


class Status(str, Enum):
    """Why a solver, a Krylov solve, an eigensolver or a bilevel run stopped.

    Members (value in brackets):

    * ``CONVERGED`` (``"converged"``): the stopping test the result documents was met.
    * ``MAX_ITER`` (``"max_iter"``): the iteration cap was reached first.
    * ``NAN`` (``"nan"``): a non-finite value appeared; the last finite state is returned.
    * ``DIVERGED`` (``"diverged"``): the objective blew up (finite but huge).
    * ``LINE_SEARCH_FAILED`` (``"line_search_failed"``): no trial step gave a decrease.
    * ``CALLBACK`` (``"callback"``): the user's callback asked to stop.
    * ``TIME_LIMIT`` (``"time_limit"``): the wall-clock budget ran out.
    * ``STALLED`` (``"stalled"``): no progress over a window (e.g. at the limit of precision).
    * ``NEGATIVE_CURVATURE`` (``"negative_curvature"``): a Krylov solve met ``pᵀAp <= 0``.
    * ``BREAKDOWN`` (``"breakdown"``): a Krylov recurrence broke down.
    * ``FAILED`` (``"failed"``): any other failure (the result's message says which).
    """

    CONVERGED = "converged"
    MAX_ITER = "max_iter"
    NAN = "nan"
    DIVERGED = "diverged"
    LINE_SEARCH_FAILED = "line_search_failed"
    CALLBACK = "callback"
    TIME_LIMIT = "time_limit"
    STALLED = "stalled"
    NEGATIVE_CURVATURE = "negative_curvature"
    BREAKDOWN = "breakdown"
    FAILED = "failed"

    __str__ = str.__str__
    __format__ = str.__format__

    @classmethod
    def of(cls, value: str | Status) -> Status:
        """The member for ``value``, accepting the legacy spelling ``"maxiter"`` of ``"max_iter"``.

        Raises:
            ValueError: ``value`` names no status.
        """
        if isinstance(value, cls):
            return value
        if value == "maxiter":
            return cls.MAX_ITER
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown status {value!r}; expected one of {[m.value for m in cls]}") from None

    @property
    def ok(self) -> bool:
        """Whether this status means success (only ``CONVERGED``)."""
        return self is Status.CONVERGED


# States hold statuses; let ``torch.load(..., weights_only=True)`` (the default) read them back.
try:  # torch >= 2.4
    import torch.serialization as _ser

    _ser.add_safe_globals([Status])
except (ImportError, AttributeError):  # pragma: no cover - older torch
    pass
