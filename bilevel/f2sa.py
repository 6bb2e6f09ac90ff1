r"""F2SA: Fully First-order Stochastic Approximation (Kwon, Kwon, Wright, Nowak, ICML 2023).

J. Kwon, D. Kwon, S. Wright, R. Nowak, "A Fully First-Order Method for Stochastic
Bilevel Optimization", ICML 2023, arXiv:2301.10945.

The bilevel problem is replaced by the penalty (Lagrangian) problem, eq. (3)–(4) of the paper,

.. math::
    \min_{x, y}\ \mathcal L_\lambda(x, y) = f(x, y) + \lambda\big(g(x, y) - g^*(x)\big),
    \qquad g^*(x) = \min_z g(x, z),

whose x-gradient needs only gradients, because
:math:`\nabla g^*(x) = \nabla_x g(x, z^*(x))` (Danskin). Algorithm 1 (F²SA), step ``k``:

.. math::
    &\text{for } t = 0, \dots, T-1:\quad
      z \leftarrow z - \gamma_k \nabla_y g(x_k, z), \qquad
      y \leftarrow y - \alpha_k\big(\nabla_y f(x_k, y) + \lambda_k \nabla_y g(x_k, y)\big),\\
    &x_{k+1} = x_k - \xi\alpha_k\Big[\nabla_x f(x_k, y_{k+1})
      + \lambda_k\big(\nabla_x g(x_k, y_{k+1}) - \nabla_x g(x_k, z_{k+1})\big)\Big],\qquad
    \lambda_{k+1} = \lambda_k + \delta_k .

Schedules (the step-size design of Theorem 3.1 / Corollary 3.2 as we read it):
:math:`\alpha_k = \alpha_0 ((k + k_0)/k_0)^{-a}`, :math:`\gamma_k = \gamma_0 ((k + k_0)/k_0)^{-c}`
and :math:`\lambda_k = \lambda_0 ((k + k_0)/k_0)^{a - c}`, i.e. :math:`\delta_k = \lambda_{k+1} - \lambda_k`;
with the paper's coupling :math:`\lambda_k = \gamma_k / (2\alpha_k)` the default ``lmbda0`` is
``lr_z / (2 lr_y)``, so the ``y`` step on the penalty term, :math:`\alpha_k\lambda_k = \gamma_k/2`,
stays stable as :math:`\lambda_k` grows. The exponents ``(a, c)`` per noise regime:

==========================  =================  ==========================
regime                      ``(a, c)``         iterations to ε-stationary
==========================  =================  ==========================
``"deterministic"``         ``(1/3, 0)``       :math:`\epsilon^{-3/2}`
``"upper_stochastic"``      ``(3/5, 2/5)``     :math:`\epsilon^{-5/2}` (noise in ``f`` only)
``"stochastic"``            ``(5/7, 4/7)``     :math:`\epsilon^{-7/2}` (noise in ``f`` and ``g``)
==========================  =================  ==========================

(ε-stationary meaning :math:`\mathbb E\|\nabla F\|^2 \le \epsilon`). ``regime="auto"`` picks
``"stochastic"`` when the problem has minibatches, else ``"deterministic"``; ``exponents=(a, c)``
overrides the table. With ``momentum=True`` the x-direction uses the momentum-assisted
(STORM-type) estimator of Algorithm 2,
:math:`\tilde h_k = h_k(\xi_k) + (1 - \eta_k)\big(\tilde h_{k-1} - h_{k-1}(\xi_k)\big)`, where
:math:`h_{k-1}(\xi_k)` re-evaluates the previous direction on the new samples and
:math:`\eta_k = \min(1, c_\eta ((k + k_0)/k_0)^{-2a})`; the momentum regimes then use
``(a, c) = (3/5, 2/5)`` (both noisy) and ``(1/2, 1/4)`` (upper noise only).

Only gradients of ``f`` and ``g`` are used: the ``hvps`` counter stays 0. Lower-level
constraints are not supported (use :class:`~bilevel.LVHBA`); ``x`` is projected onto
``x_set`` and ``y``, ``z`` onto ``y_set`` when given.

Defaults: ``T = 10`` inner steps, ``ξ = 1``, ``k_0 = 1``, ``lr_z = 1/L_g`` estimated at the start from
gradients only, ``lr_y = lr_z/10``. The paper's theory asks for :math:`\gamma_k \le 1/(4 l_{g,1} T)`-type
bounds that depend on unknown constants, so no fixed step size is scale-free; the estimate makes the
defaults follow the inner problem's scale (``y`` is then stable while :math:`L_{f,y} \lesssim 15 L_g`).
Setting them by hand on a new problem (what we found works, e.g. ``examples/bilevel_compare.py``):

* ``lr_z`` :math:`\approx 1/L_g` (:math:`L_g` the smoothness of ``g`` in ``y``): the ``z`` loop is plain
  gradient descent on :math:`g(x, \cdot)`;
* ``lr_y`` (:math:`\alpha_0`) :math:`\lesssim 1/L_F`, the smoothness of :math:`F`, since the ``x`` step is
  :math:`\xi\alpha_k` (raise ``outer_ratio`` ξ, not ``lr_y``, when ``x`` moves too slowly: ``lr_y`` also
  sets :math:`\lambda_0 = \gamma_0/(2\alpha_0)`);
* the bias of the penalty method is :math:`O(1/\lambda_k)`, and :math:`\lambda_k` grows only like
  :math:`k^{a - c}` (:math:`k^{1/3}` deterministic), so F2SA approaches :math:`x^*` polynomially, not
  linearly: it needs many cheap iterations (no HVPs), e.g. 1500 on the 20 × 50 quadratic of the example
  to reach :math:`F - F^* \approx 7 \cdot 10^{-2}`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ._base import BilevelSolver, _check_positive, _count, base_state, options
from ._first_order import check_choice, check_int, draw, estimate_smoothness_fd, poly_decay
from ._problem import BilevelProblem

__all__ = ["F2SA"]

_EXPONENTS = {
    (False, "deterministic"): (1 / 3, 0.0),
    (False, "upper_stochastic"): (3 / 5, 2 / 5),
    (False, "stochastic"): (5 / 7, 4 / 7),
    (True, "deterministic"): (1 / 3, 0.0),
    (True, "upper_stochastic"): (1 / 2, 1 / 4),
    (True, "stochastic"): (3 / 5, 2 / 5),
}


@options
class F2SA(BilevelSolver):
    r"""Fully first-order bilevel solver (Kwon et al. 2023, Algorithm 1; Algorithm 2 with ``momentum=True``).

    Args:
        lr_y: :math:`\alpha_0`, step size of ``y`` on :math:`f + \lambda g` (and, times ``outer_ratio``, of ``x``);
            ``None`` (default) gives ``lr_z / 10`` (so :math:`\lambda_0 = 5`).
        lr_z: :math:`\gamma_0`, step size of ``z`` on ``g``; ``None`` (default) gives :math:`1/L_g` with
            :math:`L_g` estimated at ``(x0, y0)`` from 11 gradients of ``g`` (finite-difference power
            iteration — no Hessian products), stored in the state.
        lmbda0: :math:`\lambda_0`; ``None`` gives the paper's :math:`\gamma_0 / (2\alpha_0)`.
        outer_ratio: :math:`\xi`, the x step is :math:`\xi\alpha_k`.
        n_inner_steps: :math:`T`, inner ``y``/``z`` steps per outer step.
        regime: ``"auto"``, ``"deterministic"``, ``"upper_stochastic"`` or ``"stochastic"`` (schedule table).
        exponents: ``(a, c)`` overriding the regime's decay exponents of :math:`\alpha_k, \gamma_k`.
        k0: offset :math:`k_0 \ge 1` of the schedules.
        momentum: use the momentum-assisted x-gradient estimator (Algorithm 2).
        momentum_c: :math:`c_\eta` in :math:`\eta_k = \min(1, c_\eta ((k+k_0)/k_0)^{-2a})`.

    Example:
        >>> from bilevel.problems import quadratic
        >>> q = quadratic(dx=3, dy=4)
        >>> r = F2SA(lr_y=0.05, lr_z=0.5).solve(q.problem, max_iter=5)
        >>> r.state["hvps"]
        0
    """

    lr_y: float | None = None
    lr_z: float | None = None
    lmbda0: float | None = None
    outer_ratio: float = 1.0
    n_inner_steps: int = 10
    regime: str = "auto"
    exponents: tuple[float, float] | None = None
    k0: float = 1.0
    momentum: bool = False
    momentum_c: float = 1.0

    supports_constraints = False

    def __post_init__(self) -> None:
        _check_positive(self, "outer_ratio", "momentum_c")
        for name in ("lr_y", "lr_z"):
            if getattr(self, name) is not None:
                _check_positive(self, name)
        if self.lmbda0 is not None:
            _check_positive(self, "lmbda0")
        check_int(self, "n_inner_steps")
        check_choice(self, "regime", ("auto", "deterministic", "upper_stochastic", "stochastic"))
        check_choice(self, "momentum", (True, False))
        if not (isinstance(self.k0, (int, float)) and not isinstance(self.k0, bool) and self.k0 >= 1):
            raise ValueError(f"F2SA.k0 must be a number >= 1, got {self.k0!r}")
        if self.exponents is not None:
            ok = (
                isinstance(self.exponents, (tuple, list))
                and len(self.exponents) == 2
                and all(isinstance(e, (int, float)) and math.isfinite(e) and 0 <= e <= 1 for e in self.exponents)
                and self.exponents[1] <= self.exponents[0]
            )
            if not ok:
                raise ValueError(f"F2SA.exponents must be (a, c) with 0 <= c <= a <= 1, got {self.exponents!r}")

    # ------------------------------------------------------------------ #
    def schedule(self, problem: BilevelProblem) -> tuple[float, float]:
        """The decay exponents ``(a, c)`` of :math:`\\alpha_k` and :math:`\\gamma_k` used on ``problem``."""
        if self.exponents is not None:
            return float(self.exponents[0]), float(self.exponents[1])
        regime = self.regime
        if regime == "auto":
            regime = "stochastic" if problem.stochastic else "deterministic"
        return _EXPONENTS[(bool(self.momentum), regime)]

    def _lmbda0(self, state: dict[str, Any]) -> float:
        return state["lr_z"] / (2 * state["lr_y"]) if self.lmbda0 is None else float(self.lmbda0)

    def init(self, problem: BilevelProblem) -> dict[str, Any]:
        self.check_problem(problem)
        state = base_state(problem)
        lr_z = self.lr_z
        if lr_z is None:
            bi = problem.draw_inner(0)
            L, n = estimate_smoothness_fd(lambda v: problem.grad_g_y(state["x"], v, bi), state["y"])
            _count(state, grads=n)
            lr_z = 1.0 / L
        state["lr_z"] = float(lr_z)
        state["lr_y"] = float(self.lr_y) if self.lr_y is not None else state["lr_z"] / 10
        state["z"] = state["y"].clone()
        state["lmbda"] = self._lmbda0(state)
        if self.momentum:
            state["direction"] = None
            state["prev"] = None
        return state

    @staticmethod
    def _direction(
        problem: BilevelProblem, state: dict[str, Any], x: Tensor, y: Tensor, z: Tensor, lam: float, bo: Any, bi: Any
    ) -> tuple[Tensor, Tensor]:
        """:math:`\\nabla_x f(x, y) + \\lambda(\\nabla_x g(x, y) - \\nabla_x g(x, z))` and ``f(x, y)``."""
        fval, fx, _ = problem.f_and_grad(x, y, bo)
        gxy = problem.grad_g_x(x, y, bi)
        gxz = problem.grad_g_x(x, z, bi)
        _count(state, grads=3)
        return fx + lam * (gxy - gxz), fval

    def step(self, problem: BilevelProblem, state: dict[str, Any]) -> dict[str, Any]:
        new = dict(state)
        new["log"] = {}
        k = int(state["iter"])
        a, c = self.schedule(problem)
        alpha = poly_decay(state["lr_y"], k, a, self.k0)
        gamma = poly_decay(state["lr_z"], k, c, self.k0)
        lam = float(state["lmbda"])
        x, y, z = state["x"], state["y"], state["z"]
        gz = None
        for _ in range(self.n_inner_steps):
            bi, bo = draw(problem, new, "inner"), draw(problem, new, "outer")
            gz = problem.grad_g_y(x, z, bi)
            fy = problem.grad_f_y(x, y, bo)
            gy = problem.grad_g_y(x, y, bi)
            _count(new, grads=3)
            z = problem.project_y(z - gamma * gz)
            y = problem.project_y(y - alpha * (fy + lam * gy))
        bo, bi = draw(problem, new, "outer"), draw(problem, new, "inner")
        h, fval = self._direction(problem, new, x, y, z, lam, bo, bi)
        if self.momentum:
            prev = state.get("prev")
            if prev is not None:
                eta = min(1.0, self.momentum_c * ((k + self.k0) / self.k0) ** (-2 * a))
                h_old, _ = self._direction(problem, new, prev["x"], prev["y"], prev["z"], prev["lmbda"], bo, bi)
                h = h + (1 - eta) * (state["direction"] - h_old)
            new["direction"] = h
            new["prev"] = {"x": x, "y": y, "z": z, "lmbda": lam}
        new["x"] = problem.project_x(x - self.outer_ratio * alpha * h)
        new["y"], new["z"] = y, z
        lam0 = self._lmbda0(state)
        lam_next = lam0 * ((k + 1 + self.k0) / self.k0) ** (a - c)
        new["lmbda"] = lam + (lam_next - lam0 * ((k + self.k0) / self.k0) ** (a - c))  # + δ_k
        new["iter"] = k + 1
        new["outer_value"] = fval
        new["hypergrad_norm"] = float(torch.linalg.vector_norm(h))
        new["inner_residual"] = float(torch.linalg.vector_norm(gz)) if gz is not None else float("nan")
        new["log"] = {"lmbda": lam, "alpha": alpha, "gamma": gamma}
        return new
