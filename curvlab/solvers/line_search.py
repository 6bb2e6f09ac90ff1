r"""The one Armijo backtracking line search of curvlab (used by every solver and by :mod:`bilevel`).

:class:`Armijo` holds the constants (``c1``, ``shrink``, ``max_trials``) and the rule that
picks the first trial of the next search (``grow``/``t_max``: EGN's
:math:`\alpha \leftarrow \min(1.5\alpha, \alpha_{\max})`); :meth:`Armijo.search` runs one search
and returns a :class:`LineSearchResult`. :func:`armijo` is the same search as a function.

Nocedal & Wright (2006), *Numerical Optimization*, Alg. 3.1: try
:math:`t = t_0, \rho t_0, \rho^2 t_0, \dots` and accept the first with

.. math::  \varphi(t) \le \varphi(0) + c_1\, t\, \varphi'(0), \qquad \varphi(t) = f(x + t d).

Beyond the textbook loop:

* a non-finite trial value fails the test (the step shrinks), so a search never accepts
  NaN/Inf; when *every* trial was non-finite the result's status is ``"nan"``;
* ``accept(t, value, aux)`` is an extra condition a trial must meet (e.g. "the inner solve
  converged" in a bilevel search);
* near a minimum :math:`\varphi(t) - \varphi(0)` is rounding noise: a trial within the noise
  level of :math:`\varphi(0)` is accepted when the caller's ``tie(t, value, aux)`` says it is
  better by another measure (e.g. a smaller gradient; Hager & Zhang 2005's approximate
  Armijo test);
* a failed search says whether the failure is explained by the limit of precision
  (:attr:`LineSearchResult.precision_limit`): the decrease the first trial predicts,
  :math:`t_0|\varphi'(0)|`, is below the rounding noise of :math:`f` — the line-search form of
  the Newton-decrement stopping test (Boyd & Vandenberghe 2004, §9.5.1) at the tolerance the
  dtype allows, so callers may stop as converged rather than failed.

Example:
    >>> import torch
    >>> from curvlab.solvers import Armijo
    >>> f = lambda t: torch.tensor((1.0 - 3 * t) ** 2)      # φ(0) = 1, φ'(0) = -6
    >>> res = Armijo(c1=1e-4, shrink=0.5).search(f, 1.0, -6.0, t0=1.0)
    >>> res.t, res.status, res.n_evals
    (0.5, <Status.CONVERGED: 'converged'>, 2)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..checks import check_int, check_positive, check_unit
from ..status import Status

__all__ = ["Armijo", "LineSearchResult", "armijo"]

#: noise level of a function value, in units of its dtype's machine epsilon times ``|f(x)|``
NOISE_EPS = 16.0


@dataclass
class LineSearchResult:
    """Outcome of a line search.

    Attributes:
        t: the accepted step (on failure: the last trial, or 0 when no trial was made).
        value: :math:`\\varphi(t)` at the accepted step (on failure: the last finite trial value or ``None``).
        n_evals: evaluations of :math:`\\varphi` used.
        success: whether a step was accepted (``status == "converged"``).
        status: ``"converged"`` (accepted), ``"line_search_failed"`` (no trial passed, or not a
            descent direction) or ``"nan"`` (every trial value, or the slope, was non-finite).
        precision_limit: on failure, whether it is explained by the limit of precision: the
            first trial predicts a decrease below the rounding noise of :math:`f(x)`.
        n_nonfinite: trials whose value was not finite.
        aux: what ``phi`` returned beside the value at the accepted step (``None`` when it
            returns a value only).
        message: one sentence on the outcome.
    """

    t: float
    value: Tensor | None
    n_evals: int
    success: bool
    status: Status = Status.CONVERGED
    precision_limit: bool = False
    n_nonfinite: int = 0
    aux: Any = None
    message: str = ""


def _noise(f0: float, ref: Any) -> float:
    dtype = ref.dtype if isinstance(ref, Tensor) and ref.is_floating_point() else torch.float64
    fi = torch.finfo(dtype)
    return NOISE_EPS * fi.eps * abs(f0) + fi.tiny


@dataclass(frozen=True)
class Armijo:
    r"""Armijo backtracking: the constants and the reset rule of one solver's searches.

    Args:
        c1: sufficient-decrease constant in (0, 1) (Nocedal & Wright: 1e-4; EGN paper: 0.1).
        shrink: backtracking factor in (0, 1) (N&W: 0.5; EGN paper: 0.8).
        max_trials: evaluations per search (``>= 1``).
        grow: reset rule for the first trial of the next search,
            :math:`t_0 = \min(\text{grow}\cdot t_{\text{prev}}, t_{\max})` (EGN paper: 1.5); ``None``
            starts every search at :math:`t_{\max}`.
        noise: absolute rounding noise of :math:`f` for the approximate test and the
            precision-limit flag; ``None``: :data:`NOISE_EPS`·eps·|f(x)| in the dtype of ``f0``.

    Raises:
        ValueError: on constants out of range (naming the argument).
    """

    c1: float = 1e-4
    shrink: float = 0.5
    max_trials: int = 30
    grow: float | None = None
    noise: float | None = None

    def __post_init__(self) -> None:
        check_unit(self.c1, "Armijo.c1", open_left=True)
        check_unit(self.shrink, "Armijo.shrink", open_left=True)
        check_int(self.max_trials, "Armijo.max_trials")
        if self.grow is not None:
            check_positive(self.grow, "Armijo.grow")
        if self.noise is not None:
            check_positive(self.noise, "Armijo.noise", allow_zero=True)

    def first_trial(self, t_prev: float | None, t_max: float) -> float:
        r"""The first trial of the next search: :math:`\min(\text{grow}\cdot t_{\text{prev}}, t_{\max})`.

        ``t_max`` when ``grow`` is ``None`` or there is no previous step (``t_prev`` ``None`` or ``<= 0``).
        """
        if self.grow is None or t_prev is None or not t_prev > 0:
            return float(t_max)
        return float(min(self.grow * float(t_prev), t_max))

    def search(
        self,
        phi: Callable[[float], Any],
        f0: Tensor | float,
        slope: Tensor | float,
        t0: float = 1.0,
        *,
        accept: Callable[[float, Tensor, Any], bool] | None = None,
        tie: Callable[[float, Tensor, Any], bool] | None = None,
        value_t0: Any = None,
    ) -> LineSearchResult:
        r"""One backtracking search along a direction with directional derivative ``slope``.

        Args:
            phi: ``t -> f(x + t d)``: a scalar (tensor or float), or a pair ``(value, aux)``.
            f0: :math:`f(x)`.
            slope: :math:`\nabla f(x)^\top d` (negative for a descent direction).
            t0: first trial step (``> 0``).
            accept: ``accept(t, value, aux) -> bool``, an extra condition a finite trial must meet.
            tie: ``tie(t, value, aux) -> bool``: accept a trial within the noise of ``f0`` that this
                says is better (``None``: no approximate test).
            value_t0: ``phi(t0)`` when the caller already has it (saves one evaluation).

        Returns:
            A :class:`LineSearchResult`.
        """
        f0f, s = float(f0), float(slope)
        if not (math.isfinite(f0f) and math.isfinite(s)):
            return LineSearchResult(
                0.0, None, 0, False, Status.NAN, message="the value or the slope at the start is not finite"
            )
        if not s < 0:
            return LineSearchResult(
                0.0,
                None,
                0,
                False,
                Status.LINE_SEARCH_FAILED,
                precision_limit=s == 0,
                message=f"not a descent direction (slope {s:.3g} >= 0)",
            )
        noise = self.noise if self.noise is not None else _noise(f0f, f0 if isinstance(f0, Tensor) else slope)
        t = float(t0)
        last_val, last_aux, n_bad = None, None, 0
        for i in range(1, self.max_trials + 1):
            out = value_t0 if (i == 1 and value_t0 is not None) else phi(t)
            val, aux = (out[0], out[1]) if isinstance(out, tuple) else (out, None)
            fv = float(val)
            if not math.isfinite(fv):
                n_bad += 1
                t *= self.shrink
                continue
            last_val, last_aux = val, aux
            ok = accept is None or bool(accept(t, val, aux))
            if ok and fv <= f0f + self.c1 * t * s:
                return LineSearchResult(t, _tensor(val), i, True, Status.CONVERGED, n_nonfinite=n_bad, aux=aux)
            if ok and tie is not None and fv <= f0f + noise and bool(tie(t, val, aux)):
                return LineSearchResult(
                    t, _tensor(val), i, True, Status.CONVERGED, n_nonfinite=n_bad, aux=aux, message="within noise"
                )
            t *= self.shrink
        n = self.max_trials
        if n_bad == n:
            return LineSearchResult(
                t / self.shrink,
                None,
                n,
                False,
                Status.NAN,
                n_nonfinite=n_bad,
                message=f"the objective was not finite at any of the {n} trial points",
            )
        limit = float(t0) * abs(s) <= noise
        why = " (the predicted decrease is below the rounding noise of f: limit of precision)" if limit else ""
        return LineSearchResult(
            t / self.shrink,
            _tensor(last_val),
            n,
            False,
            Status.LINE_SEARCH_FAILED,
            precision_limit=limit,
            n_nonfinite=n_bad,
            aux=last_aux,
            message=f"Armijo line search found no sufficient decrease in {n} trials{why}",
        )

    __call__ = search


def _tensor(v: Any) -> Tensor | None:
    if v is None or isinstance(v, Tensor):
        return v
    return torch.as_tensor(float(v), dtype=torch.float64)


def armijo(
    phi: Callable[[float], Any],
    f0: Tensor | float,
    slope: Tensor | float,
    t0: float = 1.0,
    c1: float = 1e-4,
    shrink: float = 0.5,
    max_iter: int = 30,
    **kwargs: Any,
) -> LineSearchResult:
    r"""Armijo backtracking (Nocedal & Wright 2006, Alg. 3.1): ``Armijo(c1, shrink, max_iter).search(...)``.

    Tries :math:`t = t_0, \rho t_0, \rho^2 t_0, \dots` (:math:`\rho` = ``shrink``) and accepts the first
    with :math:`\varphi(t) \le f_0 + c_1 t\, \varphi'(0)`; a non-finite :math:`\varphi(t)` fails the test.

    Args:
        phi: ``t -> f(x + t d)`` (a scalar, or ``(value, aux)``).
        f0: ``f(x)``.
        slope: the directional derivative ``∇f(x)ᵀd`` (negative).
        t0: first trial step.
        c1: sufficient-decrease constant in (0, 1).
        shrink: backtracking factor in (0, 1).
        max_iter: maximum number of trials.
        **kwargs: ``accept``, ``tie``, ``value_t0`` of :meth:`Armijo.search`; ``noise`` of :class:`Armijo`.

    Returns:
        A :class:`LineSearchResult` (``success=False`` and a ``status`` saying why when no trial passed).

    Raises:
        ValueError: on constants out of range.
    """
    noise = kwargs.pop("noise", None)
    return Armijo(c1, shrink, max_iter, noise=noise).search(phi, f0, slope, t0, **kwargs)
