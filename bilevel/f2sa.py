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

Here ``z`` tracks the lower-level solution :math:`y^*(x)` and ``y`` the penalty minimiser
:math:`y^*_\lambda(x) = \arg\min_y f + \lambda g`. **What a run returns**: ``BilevelResult.y``
(``state["y"]``) is the paper's ``z`` — the lower-level iterate at ``x`` — and the penalty
iterate is ``state["y_lambda"]``; ``history["outer_value"]`` is :math:`f(x_k, z_{k+1})`, the outer
objective at that lower-level iterate (an estimate of :math:`F(x_k)` as good as ``z``);
``hypergrad_norm`` is the norm of the bracket above, the estimate the stop rule of
:meth:`~bilevel.BilevelSolver.solve` tests (relative to its first value; default ``rtol``
:math:`\max(10^{-4}, \sqrt\varepsilon)`).

Two schedules (``schedule=``):

``"paper"`` — Algorithm 1 as written, with the step-size design of Theorem 3.1 / Corollary 3.2 as we
read it: :math:`\alpha_k = \alpha_0 ((k + k_0)/k_0)^{-a}`, :math:`\gamma_k = \gamma_0 ((k + k_0)/k_0)^{-c}`,
:math:`\lambda_k = \lambda_0 ((k + k_0)/k_0)^{a - c}` (so :math:`\delta_k = \lambda_{k+1} - \lambda_k`),
the paper's coupling :math:`\lambda_0 = \gamma_0/(2\alpha_0)` (the ``y`` step on the penalty term,
:math:`\alpha_k\lambda_k = \gamma_k/2`, stays stable as :math:`\lambda_k` grows), ``T = n_inner_steps``
fixed. The exponents ``(a, c)`` per noise regime:

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
Defaults: ``T = 10``, ``ξ = 1``, ``k_0 = 1``, :math:`\gamma_0 = 1/L_g` (``lr_z=None``; :math:`L_g` from
:func:`bilevel.inner_lipschitz`, the one HVP power iteration, at ``(x0, y0)``: at most 20 products
once, every iteration is first order), :math:`\alpha_0 = \gamma_0/10`.

``"adaptive"`` — the deterministic default (``schedule="auto"`` on a problem without minibatches).
The paper's deterministic schedule cannot meet a tolerance in practice: its bias is
:math:`O(1/\lambda_k)` (Lemma 3.1: :math:`\|\nabla\mathcal L^*_\lambda - \nabla F\| = O(1/\lambda)`) with
:math:`\lambda_k \propto k^{1/3}`, and its x step :math:`\xi\alpha_k = \xi\gamma_k/(2\lambda_k)` shrinks
as :math:`\lambda_k` grows (measured on a condition-100 quadratic: relative error 2e-2 after 5000
iterations). Without noise the stochastic-approximation constraints are not needed, so the same
updates run with

* :math:`\lambda_{k+1} = \min(\rho\lambda_k, \lambda_{\max})` (``lmbda_growth`` :math:`\rho = 2`),
  :math:`\lambda_{\max}` = ``lmbda_max`` or :math:`\lambda_0\tau^{-1/2}`, :math:`\tau` the inner solves'
  relative accuracy (:func:`~bilevel._first_order.penalty_cap`: the bracket is a forward difference with
  step :math:`1/\lambda`, whose bias :math:`O(1/\lambda)` and amplified solve errors :math:`O(\lambda\tau)`
  balance there); before the first step :math:`\lambda` is doubled from :math:`\max(\lambda_0,
  \lambda_{\max}/16)` until the estimate at ``x0`` settles; when :math:`\lambda` grows, ``y`` is moved to
  :math:`z + (y - z)\lambda_k/\lambda_{k+1}`, the first-order prediction of :math:`y^*_{\lambda_{k+1}}`
  (:math:`y^*_\lambda - y^* = O(1/\lambda)`);
* the ``z`` and ``y`` loops are solves, not ``T`` gradient steps: ``z`` = :math:`y^*(x)` by
  :func:`bilevel.solve_inner` (warm-started Newton-CG to its dtype-aware tolerance) and ``y`` =
  :math:`y^*_\lambda(x)` by the same Newton-CG on :math:`f + \lambda g`
  (:func:`~bilevel._first_order.penalty_solve`), each capped at ``max_inner_steps`` Newton iterations per
  outer iteration (so an outer iteration's cost stays bounded where a far step makes a warm start poor);
* the x step :math:`\eta_k` is a safeguarded nonmonotone Barzilai–Borwein step on the bracket
  (:func:`~bilevel._first_order.bb_step`) instead of :math:`\xi\alpha_k`, so it follows the
  curvature of :math:`F` (per-example hyperparameters get :math:`O(n)` steps) rather than
  :math:`1/\lambda_k`; ``lr_x`` fixes it instead. A trial ``x`` where the lower level fails (non-finite
  ``g``, e.g. :math:`e^{x}` overflowing) is rejected like one without decrease;
* what a run reports: ``x``, ``y`` = ``z``, ``outer_value`` = :math:`f(x, z) = F(x)` and the estimate's
  norm at the last *accepted* point (a rejected trial is not a result), and the
  :class:`~bilevel.BilevelResult` is the best accepted point.

Lower-level constraints are not supported (use :class:`~bilevel.LVHBA`); ``x`` is projected onto
``x_set`` and ``y``, ``z`` onto ``y_set`` when given.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from curvlab.checks import check_bool, check_choice, int_fields, is_number, positive_fields

from ._base import BilevelSolver, _count, base_state, options
from ._first_order import bb_step, draw, inner_lr, norm, penalty_cap, penalty_solve, poly_decay
from ._inner import default_inner_rtol, solve_inner
from ._problem import ALL, BilevelProblem

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
        lr_y: :math:`\alpha_0`, step size of ``y`` on :math:`f + \lambda g` (``"paper"``: times ``outer_ratio``
            also of ``x``); ``None`` (default) gives ``lr_z / 10`` (so :math:`\lambda_0 = 5`).
        lr_z: :math:`\gamma_0`, step size of ``z`` on ``g``; ``None`` (default) gives :math:`1/L_g` from
            :func:`bilevel.inner_lipschitz` at ``(x0, y0)``, stored in the state.
        lmbda0: :math:`\lambda_0`; ``None`` gives the paper's :math:`\gamma_0 / (2\alpha_0)`.
        outer_ratio: :math:`\xi`, the ``"paper"`` x step is :math:`\xi\alpha_k`.
        n_inner_steps: :math:`T`, inner ``y``/``z`` steps per outer step (``"adaptive"``: the minimum).
        regime: ``"auto"``, ``"deterministic"``, ``"upper_stochastic"`` or ``"stochastic"`` (``"paper"`` table).
        exponents: ``(a, c)`` overriding the regime's decay exponents of :math:`\alpha_k, \gamma_k`.
        k0: offset :math:`k_0 \ge 1` of the schedules.
        momentum: use the momentum-assisted x-gradient estimator (Algorithm 2).
        momentum_c: :math:`c_\eta` in :math:`\eta_k = \min(1, c_\eta ((k+k_0)/k_0)^{-2a})`.
        schedule: ``"auto"`` (``"adaptive"`` without minibatches, else ``"paper"``), ``"adaptive"`` or
            ``"paper"`` (see the module docstring).
        lr_x: ``"adaptive"`` only: a fixed x step instead of the Barzilai–Borwein one.
        lmbda_growth: ``"adaptive"``: factor :math:`\rho > 1` of the penalty per outer iteration.
        lmbda_max: ``"adaptive"``: cap of :math:`\lambda` (``None``: :math:`\lambda_0/\sqrt\varepsilon`).
        max_inner_steps: ``"adaptive"``: cap of Newton iterations of each lower-level / penalty solve per
            outer iteration.
        inner_rtol: ``"adaptive"``: relative accuracy of the inner loops (see the module docstring).
        probe: ``"adaptive"``: length of the first x step relative to :math:`\max(1, \|x_0\|)`.

    Example:
        >>> from bilevel.problems import quadratic
        >>> q = quadratic(dx=3, dy=4)
        >>> r = F2SA().solve(q.problem, max_iter=2000)
        >>> r.status, bool((r.x_flat - q.x_star).norm() < 1e-3 * q.x_star.norm())
        ('converged', True)
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
    schedule: str = "auto"
    lr_x: float | None = None
    lmbda_growth: float = 2.0
    lmbda_max: float | None = None
    max_inner_steps: int = 10
    inner_rtol: float = 0.1
    probe: float = 1e-2
    accelerate: bool = True

    supports_constraints = False

    def __post_init__(self) -> None:
        positive_fields(self, "outer_ratio", "momentum_c", "inner_rtol", "probe")
        positive_fields(self, "lr_y", "lr_z", "lmbda0", "lr_x", "lmbda_max", optional=True)
        int_fields(self, "n_inner_steps", "max_inner_steps")
        check_choice(self.regime, "F2SA.regime", ("auto", "deterministic", "upper_stochastic", "stochastic"))
        check_choice(self.schedule, "F2SA.schedule", ("auto", "adaptive", "paper"))
        if not isinstance(self.momentum, bool):
            raise ValueError(f"F2SA.momentum must be True or False, got {self.momentum!r}")
        check_bool(self.momentum, "F2SA.momentum")
        if not (is_number(self.k0) and self.k0 >= 1 and math.isfinite(self.k0)):
            raise ValueError(f"F2SA.k0 must be a number >= 1, got {self.k0!r}")
        if not (is_number(self.lmbda_growth) and 1 < self.lmbda_growth < math.inf):
            raise ValueError(f"F2SA.lmbda_growth must be a finite number > 1, got {self.lmbda_growth!r}")
        if self.max_inner_steps < self.n_inner_steps:
            raise ValueError(
                f"F2SA.max_inner_steps must be >= n_inner_steps ({self.n_inner_steps}), got {self.max_inner_steps}"
            )
        if self.exponents is not None:
            ok = (
                isinstance(self.exponents, (tuple, list))
                and len(self.exponents) == 2
                and all(is_number(e) and math.isfinite(e) and 0 <= e <= 1 for e in self.exponents)
                and self.exponents[1] <= self.exponents[0]
            )
            if not ok:
                raise ValueError(f"F2SA.exponents must be (a, c) with 0 <= c <= a <= 1, got {self.exponents!r}")

    # ------------------------------------------------------------------ #
    def adaptive(self, problem: BilevelProblem) -> bool:
        """Whether ``problem`` runs the ``"adaptive"`` (deterministic) schedule."""
        if self.schedule == "auto":
            return not problem.stochastic
        return self.schedule == "adaptive"

    def schedule_exponents(self, problem: BilevelProblem) -> tuple[float, float]:
        """The decay exponents ``(a, c)`` of :math:`\\alpha_k` and :math:`\\gamma_k` of the ``"paper"`` schedule."""
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
            lr_z = inner_lr(problem, state, state["x"], state["y"], problem.draw_inner(0))
        state["lr_z"] = float(lr_z)
        state["lr_y"] = float(self.lr_y) if self.lr_y is not None else state["lr_z"] / 10
        state["y_lambda"] = state["y"].clone()
        state["lmbda"] = self._lmbda0(state)
        if self.adaptive(problem):
            self._warm_penalty(problem, state)
        if self.momentum:
            state["direction"] = None
            state["prev"] = None
        return state

    @staticmethod
    def _direction(
        problem: BilevelProblem, state: dict[str, Any], x: Tensor, y: Tensor, z: Tensor, lam: float, bo: Any, bi: Any
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The bracket :math:`\\nabla_x f(x, y) + \\lambda(\\nabla_x g(x, y) - \\nabla_x g(x, z))`, its penalty
        part and :math:`\\nabla_y f(x, y)`."""
        _, fx, fy = problem.f_and_grad(x, y, bo)
        gxy = problem.grad_g_x(x, y, bi)
        gxz = problem.grad_g_x(x, z, bi)
        _count(state, grads=3)
        pen = lam * (gxy - gxz)
        return fx + pen, pen, fy

    def step(self, problem: BilevelProblem, state: dict[str, Any]) -> dict[str, Any]:
        if self.adaptive(problem):
            return self._step_adaptive(problem, state)
        return self._step_paper(problem, state)

    # ------------------------------------------------------------------ "paper"
    def _step_paper(self, problem: BilevelProblem, state: dict[str, Any]) -> dict[str, Any]:
        new = dict(state)
        new["log"] = {}
        k = int(state["iter"])
        a, c = self.schedule_exponents(problem)
        alpha = poly_decay(state["lr_y"], k, a, self.k0)
        gamma = poly_decay(state["lr_z"], k, c, self.k0)
        lam = float(state["lmbda"])
        x, y, z = state["x"], state["y_lambda"], state["y"]
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
        h, _, _ = self._direction(problem, new, x, y, z, lam, bo, bi)
        if self.momentum:
            prev = state.get("prev")
            if prev is not None:
                eta = min(1.0, self.momentum_c * ((k + self.k0) / self.k0) ** (-2 * a))
                h_old, _, _ = self._direction(problem, new, prev["x"], prev["y"], prev["z"], prev["lmbda"], bo, bi)
                h = h + (1 - eta) * (state["direction"] - h_old)
            new["direction"] = h
            new["prev"] = {"x": x, "y": y, "z": z, "lmbda": lam}
        new["x"] = problem.project_x(x - self.outer_ratio * alpha * h)
        new["y_lambda"], new["y"] = y, z
        lam0 = self._lmbda0(state)
        lam_next = lam0 * ((k + 1 + self.k0) / self.k0) ** (a - c)
        new["lmbda"] = lam + (lam_next - lam0 * ((k + self.k0) / self.k0) ** (a - c))  # + δ_k
        new["iter"] = k + 1
        new["outer_value"] = problem.f(x, z, bo)
        new["hypergrad_norm"] = norm(h)
        new["inner_residual"] = norm(gz) if gz is not None else float("nan")
        new["log"] = {"lmbda": lam, "alpha": alpha, "gamma": gamma}
        return new

    # ------------------------------------------------------------------ "adaptive"
    def _lmbda_max(self, state: dict[str, Any], problem: BilevelProblem) -> float:
        if self.lmbda_max is not None:
            return float(self.lmbda_max)
        return self._lmbda0(state) * penalty_cap(problem.dtype)

    def _penalty_y(self, problem: BilevelProblem, state: dict[str, Any], x: Tensor, y: Tensor, lam: float) -> Tensor:
        rtol_y = max(default_inner_rtol(problem.dtype), 100.0 * lam * torch.finfo(problem.dtype).eps)
        y, ng, nh, _ = penalty_solve(
            problem,
            x,
            y,
            lam,
            rtol_y,
            self.deadline(state),
            max_iter=self.max_inner_steps,
            inner_scale=state.get("inner_scale"),
        )
        _count(state, grads=ng, hvps=nh)
        return y

    def _warm_penalty(self, problem: BilevelProblem, state: dict[str, Any]) -> None:
        r"""``"adaptive"``: double :math:`\lambda` at ``x0`` until the estimate settles (< 1 % change).

        The bias of the estimate is :math:`O(1/\lambda)`, so a too small :math:`\lambda_0` would make the first
        hypergradient — the reference of the relative stop test — too small or wrong; each doubling costs one
        warm-started penalty solve at ``x0``. The doublings start at :math:`\max(\lambda_0,
        \lambda_{\max}/16)` (at most four of them: on the float32 digits MLP the six doublings from
        :math:`\lambda_0` took 5 s, the noise of float32 solves keeping the estimate from settling).
        """
        x = state["x"]
        res = solve_inner(problem, x, state["y"])
        _count(state, grads=res.grads, hvps=res.hvps)
        state["inner_scale"] = res.scale
        lam_max = self._lmbda_max(state, problem)
        z, lam = res.y, min(max(float(state["lmbda"]), lam_max / 16.0), lam_max)
        y = self._penalty_y(problem, state, x, z, lam)
        h, _, _ = self._direction(problem, state, x, y, z, lam, ALL, ALL)
        while lam < lam_max:
            lam2 = min(2.0 * lam, lam_max)
            y2 = self._penalty_y(problem, state, x, problem.project_y(z + (y - z) * (lam / lam2)), lam2)
            h2, _, _ = self._direction(problem, state, x, y2, z, lam2, ALL, ALL)
            done = norm(h2 - h) <= 1e-2 * norm(h2)
            lam, y, h = lam2, y2, h2
            if done:
                break
        state.update(y=z, y_lambda=y, lmbda=lam)

    def result_point(self, state: dict[str, Any]) -> tuple[Tensor, Tensor, Any]:
        """``"adaptive"``: the best accepted point (lowest :math:`F`) rather than the last one."""
        best = state.get("bb_best")
        if best is not None and float(best["outer_value"]) < float(state["outer_value"]):
            return best["x"], best["y"], best["outer_value"]
        return super().result_point(state)

    def _back_off(
        self, problem: BilevelProblem, state: dict[str, Any], new: dict[str, Any], why: str
    ) -> dict[str, Any]:
        r"""``"adaptive"``: a trial ``x`` where the lower level or the estimate is not finite (e.g. ``e^x``
        overflowed after a long Barzilai–Borwein step) is rejected like a trial without decrease: the step from
        the last accepted point is retried at a quarter of its length (the state keeps its finite ``x``, ``y``).
        Without an accepted point, or once the step is below :math:`\sqrt\varepsilon\max(1, \|x\|)`, the run
        stops with status ``"nan"`` at the last finite state."""
        xa, ha, eta = state.get("bb_x"), state.get("bb_h"), state.get("bb_eta")
        nan = {**state, "grads": new["grads"], "hvps": new["hvps"]}
        if self.lr_x is not None or xa is None or ha is None or eta is None:
            return {**nan, "outer_value": torch.tensor(math.nan, dtype=problem.dtype)}
        eta = 0.25 * float(eta)
        if eta * norm(ha) <= math.sqrt(torch.finfo(problem.dtype).eps) * max(1.0, norm(xa)):
            return {**nan, "outer_value": torch.tensor(math.nan, dtype=problem.dtype)}
        return {
            **nan,
            "x_next": problem.project_x(xa - eta * ha),
            "bb_eta": eta,
            "iter": int(state["iter"]) + 1,
            "log": {**dict(state.get("log") or {}), "accepted": False, "lr_x": eta, "rejected": why},
        }

    def _step_adaptive(self, problem: BilevelProblem, state: dict[str, Any]) -> dict[str, Any]:
        new = dict(state)
        k = int(state["iter"])
        # state["x"] is the last point evaluated (its z, F and h are in the state); the step waits in x_next
        x = state["x_next"] if state.get("x_next") is not None else state["x"]
        y, z = state["y_lambda"], state["y"]
        lam = float(state["lmbda"])
        lam_max = self._lmbda_max(state, problem)
        if k > 0 and lam < lam_max:  # geometric growth, y moved to the first-order prediction of y*_λ
            lam_new = min(lam * self.lmbda_growth, lam_max)
            y = problem.project_y(z + (y - z) * (lam / lam_new))
            lam = lam_new
        # z: the lower-level solution at x (the one inner solve of bilevel, warm-started)
        dl = self.deadline(state)
        res = solve_inner(problem, x, z, deadline=dl, scale=state.get("inner_scale"), max_iter=self.max_inner_steps)
        z = res.y
        _count(new, grads=res.grads, hvps=res.hvps)
        if res.status == "nan" or not res.grad_norm <= max(res.scale, res.tol):
            # non-finite g at the trial x, or a solve that ended worse than its reference gradient (curvatures
            # beyond the dtype's range): reject the trial, else stop with status "nan"
            return self._back_off(problem, state, new, f"the lower-level solve failed there ({res.message})")
        new["inner_scale"] = res.scale if state.get("inner_scale") is None else state["inner_scale"]
        zn = res.grad_norm
        # y: the penalty minimiser y*_λ(x), same Newton-CG, warm-started at the prediction
        y = self._penalty_y(problem, new, x, y, lam)
        n_in = res.n_iter
        stop = self.interrupted(state, "inner loops")
        if stop is not None:
            return self.stop_inside(state, stop)
        h, _, _ = self._direction(problem, new, x, y, z, lam, ALL, ALL)
        hn = norm(h)
        fval = problem.f(x, z)
        if not (math.isfinite(hn) and math.isfinite(float(fval)) and bool(torch.isfinite(y).all())):
            return self._back_off(problem, state, new, "the estimate or f is not finite there")
        if self.lr_x is not None:
            x_next = x - float(self.lr_x) * h
        else:
            x_next = bb_step(state, new, x, h, float(fval), self.probe)
        eta = float(new.get("bb_eta", self.lr_x or 0.0))
        report = {"x": x, "y": z, "outer_value": fval, "hypergrad_norm": hn, "inner_residual": zn}
        if self.lr_x is None:
            # the run reports (and the stop test sees) the last accepted point: a rejected trial is not a result;
            # the best accepted one is kept for the result (the nonmonotone search may accept points above it)
            best = state.get("bb_best")
            if new.get("bb_x") is x:
                new["bb_report"] = report
                if best is None or float(fval) <= float(best["outer_value"]):
                    new["bb_best"] = report
            elif state.get("bb_report") is not None:
                report = state["bb_report"]
        new.update(
            **report,
            x_next=problem.project_x(x_next),
            y_lambda=y,
            lmbda=lam,
            iter=k + 1,
            log={"lmbda": lam, "lr_x": eta, "inner_steps": n_in, "accepted": report["x"] is x},
        )
        return new
