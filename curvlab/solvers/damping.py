r"""The one Levenberg–Marquardt / trust-region ratio rule of curvlab: :class:`RatioDamping`.

A damped (or trust-region) step :math:`p` is judged by the ratio of the actual to the
predicted decrease of the objective,

.. math::  \rho = \frac{f(x) - f(x + p)}{m(0) - m(p)},

with :math:`m` the local quadratic model. A poor step (:math:`\rho <` ``rho_low``) increases
the damping :math:`\lambda` (equivalently shrinks the trust radius :math:`\Delta`), a very good
one (:math:`\rho >` ``rho_high``) decreases it; :math:`\lambda` stays in [``floor``, ``ceiling``].
The same rule serves two parametrisations:

* :meth:`RatioDamping.update` — the damping itself, :math:`\lambda \leftarrow \lambda\cdot`
  ``increase`` or :math:`\lambda\cdot` ``decrease`` (Levenberg 1944 / Marquardt 1963; EGN);
* :meth:`RatioDamping.radius` — Moré's trust-region form (Moré 1978, the step-bound update
  of MINPACK's ``lmder``): on a poor step :math:`\Delta \leftarrow \Delta'\min(\Delta, \|Dp\|/0.1)`
  with :math:`\Delta' = 1/\text{increase}`; on a good one (or when the undamped step was
  taken) :math:`\Delta \leftarrow \|Dp\|/\text{decrease}`.

:func:`interpolated_increase` gives Moré's step-dependent factor on a poor step (the
minimiser of the quadratic interpolation of :math:`f` along the step, clipped to [0.1, 0.5]).

Presets (the values of the papers, see :data:`PRESETS`):

=====================  ========  =========  ==========  ==========  =============================
preset                 rho_low   rho_high   increase    decrease    source
=====================  ========  =========  ==========  ==========  =============================
``"more"``             0.25      0.75       2 (2–10)    0.5         Moré 1978 / MINPACK ``lmder``
``"egn"``              0.25      0.75       1.01        0.99        Korbit et al. 2024 (EGN), §3
``"trust_region"``     0.25      0.75       1.5         0.5         the EGN authors' later code
                                                                    (somax, ``TrustRegionDamping``)
=====================  ========  =========  ==========  ==========  =============================

Example:
    >>> from curvlab.solvers import RatioDamping
    >>> rule = RatioDamping.preset("trust_region", floor=1e-12)
    >>> rule.update(1.0, rho=0.9), rule.update(1.0, rho=0.1), rule.update(1.0, rho=0.5)
    (0.5, 1.5, 1.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from ..checks import check_choice, check_positive

__all__ = ["RatioDamping", "PRESETS", "gain_ratio", "interpolated_increase"]

#: the factor presets of :class:`RatioDamping` (see the module docstring)
PRESETS: dict[str, dict[str, float]] = {
    "more": {"rho_low": 0.25, "rho_high": 0.75, "increase": 2.0, "decrease": 0.5},
    "egn": {"rho_low": 0.25, "rho_high": 0.75, "increase": 1.01, "decrease": 0.99},
    "trust_region": {"rho_low": 0.25, "rho_high": 0.75, "increase": 1.5, "decrease": 0.5},
}


def gain_ratio(actual: float, predicted: float) -> float:
    r""":math:`\rho = \text{actual} / \text{predicted}` decrease; ``-inf`` for a non-finite ``actual`` (failed trial).

    A zero predicted decrease gives 0 (no information: the damping grows).
    """
    a, p = float(actual), float(predicted)
    if not math.isfinite(a):
        return -math.inf
    if p == 0 or not math.isfinite(p):
        return 0.0
    return a / p


def interpolated_increase(actual: float, predicted_slope: float, blowup: bool = False) -> float:
    r"""Moré's damping increase on a poor step: :math:`1/\gamma`, :math:`\gamma \in [0.1, 0.5]`.

    :math:`\gamma` minimises the quadratic that interpolates :math:`\varphi(0) = 1`,
    :math:`\varphi'(0) = 2\,\text{predicted\_slope}`, :math:`\varphi(1) = 1 - \text{actual}` along the step
    (the sum of squares, normalised by its value at :math:`x`): :math:`\gamma = \tfrac12 s/(s + \tfrac12 a)`;
    0.5 when the step decreased :math:`f` (``actual >= 0``), 0.1 when it blew up (``blowup``, MINPACK:
    ``‖r(x+p)‖ >= 10‖r(x)‖``, or a non-finite trial) or when :math:`\gamma < 0.1` (Moré 1978; MINPACK ``lmder``).

    Args:
        actual: relative actual reduction :math:`1 - f(x+p)/f(x)`.
        predicted_slope: the normalised directional derivative :math:`\nabla f^\top p / (2 f(x))` (negative).
        blowup: whether the trial blew up.

    Returns:
        The factor ``1/γ`` in [2, 10] by which the damping grows (the radius shrinks by γ).
    """
    if blowup or not math.isfinite(actual):
        return 10.0
    if actual >= 0:
        return 2.0
    s = float(predicted_slope)
    gamma = 0.5 * s / (s + 0.5 * actual)
    if not gamma >= 0.1:
        gamma = 0.1
    return 1.0 / min(gamma, 0.5)


@dataclass(frozen=True)
class RatioDamping:
    r"""The Levenberg–Marquardt / trust-region ratio rule (see the module docstring).

    Args:
        rho_low: ratio below which the damping grows (the step was poor).
        rho_high: ratio above which the damping shrinks (the model was good).
        increase: factor ``> 1`` on :math:`\lambda` after a poor step.
        decrease: factor in (0, 1) on :math:`\lambda` after a good step.
        floor: lower bound on :math:`\lambda` (``>= 0``).
        ceiling: upper bound on :math:`\lambda` (``> floor``, may be ``inf``).

    Raises:
        ValueError: on thresholds or factors out of range (naming the argument).
    """

    rho_low: float = 0.25
    rho_high: float = 0.75
    increase: float = 2.0
    decrease: float = 0.5
    floor: float = 0.0
    ceiling: float = math.inf

    def __post_init__(self) -> None:
        check_positive(self.rho_low, "RatioDamping.rho_low", allow_zero=True)
        check_positive(self.rho_high, "RatioDamping.rho_high", allow_zero=True)
        if self.rho_low > self.rho_high:
            raise ValueError(f"RatioDamping.rho_low must be <= rho_high, got {self.rho_low} > {self.rho_high}")
        check_positive(self.increase, "RatioDamping.increase")
        if not self.increase >= 1:
            raise ValueError(f"RatioDamping.increase must be >= 1, got {self.increase!r}")
        check_positive(self.decrease, "RatioDamping.decrease")
        if not self.decrease <= 1:
            raise ValueError(f"RatioDamping.decrease must lie in (0, 1], got {self.decrease!r}")
        check_positive(self.floor, "RatioDamping.floor", allow_zero=True)
        check_positive(self.ceiling, "RatioDamping.ceiling", allow_inf=True)
        if not self.ceiling >= self.floor:
            raise ValueError(f"RatioDamping.ceiling must be >= floor, got {self.ceiling} < {self.floor}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> RatioDamping:
        """The rule of a paper (``"more"``, ``"egn"``, ``"trust_region"``; see :data:`PRESETS`), fields overridable.

        Raises:
            ValueError: on an unknown preset.
        """
        check_choice(name, "preset", PRESETS)
        return cls(**{**PRESETS[name], **overrides})

    def with_(self, **changes: Any) -> RatioDamping:
        """A copy with some fields changed."""
        return replace(self, **changes)

    def verdict(self, rho: float) -> int:
        """``+1`` (poor step: damp more), ``-1`` (good step: damp less) or ``0`` (keep); NaN counts as poor."""
        if not rho >= self.rho_low:  # also NaN
            return 1
        return -1 if rho > self.rho_high else 0

    def clip(self, lam: float) -> float:
        """:math:`\\lambda` clipped to [``floor``, ``ceiling``]."""
        return min(max(float(lam), self.floor), self.ceiling)

    def update(self, lam: float, rho: float, increase: float | None = None) -> float:
        r"""The next damping after a step with gain ratio ``rho``.

        Args:
            lam: the damping :math:`\lambda` the step used.
            rho: its gain ratio (:func:`gain_ratio`).
            increase: this step's factor on a poor step (e.g. :func:`interpolated_increase`);
                ``None``: the rule's ``increase``.

        Returns:
            :math:`\lambda\cdot` increase, :math:`\lambda\cdot` decrease or :math:`\lambda`, clipped.
        """
        v = self.verdict(rho)
        if v > 0:
            return self.clip(lam * (self.increase if increase is None else increase))
        if v < 0:
            return self.clip(lam * self.decrease)
        return self.clip(lam)

    def radius(
        self, delta: float, step_norm: float, rho: float, increase: float | None = None, undamped: bool = False
    ) -> float:
        r"""Moré's trust-radius update (Moré 1978; MINPACK ``lmder``), the radius form of :meth:`update`.

        Args:
            delta: the radius :math:`\Delta` the step was computed for.
            step_norm: the (scaled) step length :math:`\|Dp\|`.
            rho: its gain ratio.
            increase: this step's damping factor on a poor step (the radius shrinks by its inverse).
            undamped: whether the step was the undamped (:math:`\lambda = 0`) one; then a fair step
                (``rho_low <= rho <= rho_high``) also resets the radius to ``step_norm/decrease``.

        Returns:
            The next radius.
        """
        v = self.verdict(rho)
        if v > 0:
            shrink = 1.0 / (self.increase if increase is None else increase)
            return shrink * min(delta, step_norm / 0.1)
        if v < 0 or undamped:
            return step_norm / self.decrease
        return delta
