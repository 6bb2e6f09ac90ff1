r"""LV-HBA: Lagrangian-Value-function-based Hessian-free Bi-level Algorithm (Yao et al., ICLR 2024).

W. Yao, C. Yu, S. Zeng, J. Zhang, "Constrained Bi-Level Optimization: Proximal Lagrangian
Value function Approach and Hessian-free Algorithm", ICLR 2024, arXiv:2401.16164
(code: github.com/SUSTech-Optimization/LV-HBA).

Problem (the paper's notation in brackets: upper ``F``, lower ``f``, constraints ``g``):

.. math::
    \min_{x \in X,\, y \in Y} f(x, y) \quad [F]\qquad \text{s.t. } y \in \arg\min_{y' \in Y}
    \{ g(x, y') \ [f] \ :\ c(x, y') \le 0 \ [g] \}.

The lower level is replaced by the proximal Lagrangian value function, eq. (4),

.. math::
    v_\gamma(x, y, z) = \min_{\theta \in Y} \max_{\lambda \in Z}\
      g(x, \theta) + \lambda^\top c(x, \theta) + \tfrac{1}{2\gamma_1}\|\theta - y\|^2
      - \tfrac{1}{2\gamma_2}\|\lambda - z\|^2,

and the penalized problem :math:`\min f(x, y)/c_k + g(x, y) - v_\gamma(x, y, z)` (with
:math:`c(x, y) \le 0` kept by the value function) is solved by the single loop of Algorithm 1.
Step ``k`` (eqs. (8)–(10)):

.. math::
    &d_\theta = \nabla_y g(x, \theta) + \nabla_y c(x, \theta)^\top \lambda + (\theta - y)/\gamma_1,\qquad
     d_\lambda = -c(x, \theta) + (\lambda - z)/\gamma_2,\\
    &\theta^{k+1} = \Pi_Y(\theta - \eta\, d_\theta),\qquad \lambda^{k+1} = \Pi_Z(\lambda - \eta\, d_\lambda),\\
    &d_x = \nabla_x f(x, y)/c_k + \nabla_x g(x, y) - \nabla_x g(x, \theta^{k+1})
      - \nabla_x c(x, \theta^{k+1})^\top \lambda^{k+1},\\
    &d_y = \nabla_y f(x, y)/c_k + \nabla_y g(x, y) - (y - \theta^{k+1})/\gamma_1,\qquad
     (x, y)^{k+1} = \Pi_{C}\big((x, y) - \alpha (d_x, d_y)\big),\\
    &z^{k+1} = \Pi_Z\big(z - \beta (z - \lambda^{k+1})/\gamma_2\big),\qquad c_k = \underline c\,(k+1)^p,

with :math:`Z = \{\lambda \ge 0,\ \|\lambda\| \le r\}` (the paper's compact multiplier set).
:math:`C = \{(x, y) \in X \times Y : c(x, y) \le 0\}` is the feasible set of problem (1), so every
iterate satisfies the lower-level constraints; :func:`project_feasible` computes this projection
(exactly for one affine constraint, approximately otherwise; ``feasibility_steps=0`` projects onto
:math:`X \times Y` only).
Only gradients are used (Hessian-free; ``hvps`` stays 0). Defaults are those of the
authors' toy experiment: :math:`\alpha = 0.008`, :math:`\beta = 0.02`, :math:`\eta = 0.01`,
:math:`\gamma_1 = \gamma_2 = 10`, :math:`\underline c = 0.025`, :math:`p = 0.3` (the theorem asks
:math:`p \in (0, 1/2)`), :math:`r = 1000`; the multipliers start at ``lmbda0 = 0``.

Two schedules (``schedule=``, ``"auto"`` by default):

``"adaptive"`` — the default on deterministic problems without lower-level constraints. Without
constraints the multipliers vanish (:math:`\lambda = z = 0`), the proximal value function's
minimiser :math:`\theta` tends to :math:`y^*(x)` as :math:`\gamma_1 \to \infty`, and the penalized
problem becomes F2SA's :math:`f + c_k(g - g^*)` with :math:`c_k` as the penalty weight; the run is
then :class:`~bilevel.F2SA`'s deterministic ``"adaptive"`` engine (exact warm-started lower-level solve
for :math:`\theta`, Newton-CG penalty solve for ``y``, :math:`c_k` grown geometrically from F2SA's
:math:`\lambda_0` to its cap :func:`~bilevel._first_order.penalty_cap`, a safeguarded nonmonotone
Barzilai–Borwein outer step), so no step size needs setting. :math:`\underline c` is not used there:
:math:`c_k` starting at 0.025 capped the penalty at 1.35 in float32 (the estimate's :math:`O(1/c_k)`
bias then dominated, and the digits MLP's weight decays walked to :math:`e^{-7}`). ``BilevelResult.y``
is :math:`\theta` (the lower-level solution at ``x``), and the result is the best accepted point.

``"paper"`` — Algorithm 1 as written (the default with constraints or minibatches). Its step sizes are
those of a toy problem with unit-scale curvature: like every single-loop penalty
method, LV-HBA has no scale-free defaults. ``lr`` and ``lr_inner`` should be about :math:`1/L` (the
smoothness of ``f/c_k + g`` and of the proximal Lagrangian), and since the hyper-objective's weight is
:math:`1/c_k`, a larger :math:`\underline c` trades bias for speed; the benchmark
(``benchmarks/bilevel.py``) uses ``lr = lr_inner = 0.5``, :math:`\underline c = 1`, ``p = 0.5`` on its
quadratic.

Every step logs ``violation`` :math:`= \max_i c_i(x, y)_+` at the new point (0 without constraints).
The reported ``hypergrad_norm`` is :math:`\|c_k d_x\|`, the x-gradient of
:math:`f + c_k (g - v_\gamma)`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from curvlab.checks import check_choice
from curvlab.checks import int_fields as _ci

from ._base import BilevelSolver, _check_positive, _count, base_state, options
from ._first_order import draw, project_nonneg_ball
from ._problem import BilevelProblem
from .f2sa import F2SA

__all__ = ["LVHBA", "project_feasible"]


def project_feasible(
    problem: BilevelProblem, x: Tensor, y: Tensor, max_steps: int = 50, tol: float = 1e-10
) -> tuple[Tensor, Tensor, int]:
    r"""Move ``(x, y)`` into :math:`C = \{(x, y) \in X \times Y : c(x, y) \le 0\}` (Algorithm 1's projection).

    Agmon–Motzkin relaxation: while some :math:`c_i(x, y) > \text{tol}`, project onto the
    linearisation :math:`\{w : c_i + \nabla c_i^\top (w - (x, y)) \le 0\}` of the most violated
    constraint, then onto :math:`X \times Y`. This is the exact Euclidean projection for one affine
    constraint (and no sets); for several or nonlinear convex constraints it returns a feasible point
    near :math:`(x, y)` rather than the nearest one.

    Returns:
        ``(x, y, n)`` with ``n`` the constraint-gradient evaluations used.
    """
    n = 0
    for _ in range(max_steps):
        cv = problem.c(x, y)
        if cv.numel() == 0:
            break
        i = int(torch.argmax(cv))
        if float(cv[i]) <= tol:
            break
        e = torch.zeros_like(cv)
        e[i] = 1.0
        gx, gy = problem.grad_c_dot(x, y, e)
        n += 1
        nrm2 = float((gx * gx).sum() + (gy * gy).sum())
        if nrm2 == 0.0:
            break
        s = float(cv[i]) / nrm2
        x, y = problem.project_x(x - s * gx), problem.project_y(y - s * gy)
    return x, y, n


@options
class LVHBA(BilevelSolver):
    r"""Single-loop Hessian-free solver for bilevel problems with coupled lower-level constraints (Algorithm 1).

    Args:
        lr: :math:`\alpha`, step size of ``(x, y)``.
        lr_z: :math:`\beta`, step size of the multiplier centre ``z``.
        lr_inner: :math:`\eta`, step size of ``(θ, λ)``.
        gamma1, gamma2: proximal parameters :math:`\gamma_1, \gamma_2` of :math:`v_\gamma`.
        c_lower: :math:`\underline c` in :math:`c_k = \underline c (k+1)^p`.
        p: exponent of the penalty schedule.
        multiplier_radius: :math:`r`, radius of the multiplier set :math:`Z`.
        lmbda0: starting value of every multiplier :math:`\lambda` and of :math:`z`.
        feasibility_steps: cap on the relaxation steps of :func:`project_feasible` (0: no projection onto C).
        feasibility_tol: constraint value accepted as feasible.
        schedule: ``"auto"`` (``"adaptive"`` on deterministic unconstrained problems, else ``"paper"``),
            ``"adaptive"`` or ``"paper"`` (see the module docstring).

    Example:
        >>> from bilevel.problems import quadratic
        >>> q = quadratic(dx=3, dy=4)
        >>> r = LVHBA().solve(q.problem, max_iter=5)
        >>> r.history[-1]["violation"]
        0.0
    """

    lr: float = 0.008
    lr_z: float = 0.02
    lr_inner: float = 0.01
    gamma1: float = 10.0
    gamma2: float = 10.0
    c_lower: float = 0.025
    p: float = 0.3
    multiplier_radius: float = 1000.0
    lmbda0: float = 0.0
    feasibility_steps: int = 50
    feasibility_tol: float = 1e-10
    schedule: str = "auto"

    supports_constraints = True

    def __post_init__(self) -> None:
        _check_positive(self, "lr", "lr_z", "lr_inner", "gamma1", "gamma2", "c_lower", "multiplier_radius")
        _check_positive(self, "p", "lmbda0", "feasibility_tol", allow_zero=True)
        _ci(self, "feasibility_steps", minimum=0)
        check_choice(self.schedule, "LVHBA.schedule", ("auto", "adaptive", "paper"))

    def adaptive(self, problem: BilevelProblem) -> bool:
        """Whether ``problem`` runs the deterministic ``"adaptive"`` schedule (no minibatches, no constraints)."""
        if self.schedule == "auto":
            return not problem.stochastic and not problem.constrained
        if self.schedule == "adaptive" and problem.constrained:
            raise ValueError("LVHBA(schedule='adaptive') handles unconstrained problems; use schedule='paper'")
        return self.schedule == "adaptive"

    def _engine(self) -> F2SA:
        return F2SA(schedule="adaptive")

    def init(self, problem: BilevelProblem) -> dict[str, Any]:
        self.check_problem(problem)
        if self.adaptive(problem):
            st = self._engine().init(problem)
            st["c"] = st.pop("lmbda")
            st["lmbda"] = torch.zeros(0, dtype=problem.dtype, device=problem.device)
            st["y_penalty"] = st.pop("y_lambda")
            return st
        state = base_state(problem)
        m = problem.n_constraints
        lam = torch.full((m,), float(self.lmbda0), dtype=problem.dtype, device=problem.device)
        state["theta"] = state["y"].clone()
        state["lmbda"] = project_nonneg_ball(lam, self.multiplier_radius)
        state["z"] = state["lmbda"].clone()
        return state

    def result_point(self, state: dict[str, Any]) -> tuple[Tensor, Tensor, Any]:
        """The ``"adaptive"`` engine's choice (its best accepted point); the state's own point otherwise."""
        return self._engine().result_point(state)

    def step(self, problem: BilevelProblem, state: dict[str, Any]) -> dict[str, Any]:
        if self.adaptive(problem):
            st = dict(state)
            st["lmbda"], st["y_lambda"] = st.pop("c"), st.pop("y_penalty")
            eng = self._engine()
            eng._hook = getattr(self, "_hook", None)
            new = eng.step(problem, st)
            new["c"], new["y_penalty"] = new.pop("lmbda"), new.pop("y_lambda")
            new["lmbda"] = state["lmbda"]
            new["log"] = {**new.get("log", {}), "violation": 0.0, "c_k": new["c"]}
            return new
        new = dict(state)
        k = int(state["iter"])
        ck = self.c_lower * (k + 1) ** self.p
        x, y, theta, lam, z = state["x"], state["y"], state["theta"], state["lmbda"], state["z"]
        con = problem.constrained
        # (θ, λ): one projected gradient descent-ascent step on the proximal Lagrangian
        bi = draw(problem, new, "inner")
        d_theta = problem.grad_g_y(x, theta, bi) + (theta - y) / self.gamma1
        _count(new, grads=1)
        if con:
            d_theta = d_theta + problem.grad_c_dot(x, theta, lam)[1]
            d_lam = -problem.c(x, theta) + (lam - z) / self.gamma2
            _count(new, grads=1)
            lam = project_nonneg_ball(lam - self.lr_inner * d_lam, self.multiplier_radius)
        theta = problem.project_y(theta - self.lr_inner * d_theta)
        # (x, y): gradient step on f/c_k + g - v_γ (same inner batch as the θ step, so that the
        # sampled g(x, y) - v_γ(x, y, z) stays >= 0)
        bo = draw(problem, new, "outer")
        fval, fx, fy = problem.f_and_grad(x, y, bo)
        gx, gy = problem.grad_g(x, y, bi)
        gx_theta = problem.grad_g_x(x, theta, bi)
        _count(new, grads=3)
        d_x = fx / ck + gx - gx_theta
        if con:
            d_x = d_x - problem.grad_c_dot(x, theta, lam)[0]
            _count(new, grads=1)
        d_y = fy / ck + gy - (y - theta) / self.gamma1
        x_new = problem.project_x(x - self.lr * d_x)
        y_new = problem.project_y(y - self.lr * d_y)
        if con and self.feasibility_steps:
            x_new, y_new, n_proj = project_feasible(problem, x_new, y_new, self.feasibility_steps, self.feasibility_tol)
            _count(new, grads=n_proj)
        # z: projected step towards λ
        z = project_nonneg_ball(z - self.lr_z * (z - lam) / self.gamma2, self.multiplier_radius) if con else z
        violation = self.violation(problem, x_new, y_new)
        new.update(
            x=x_new,
            y=y_new,
            theta=theta,
            lmbda=lam,
            z=z,
            iter=k + 1,
            outer_value=fval,
            hypergrad_norm=float(torch.linalg.vector_norm(ck * d_x)),
            inner_residual=float(torch.linalg.vector_norm(gy)),
            log={"violation": violation, "c_k": ck},
        )
        return new

    @staticmethod
    def violation(problem: BilevelProblem, x: Tensor, y: Tensor) -> float:
        """:math:`\\max_i c_i(x, y)_+` (0 for an unconstrained problem)."""
        if not problem.constrained or problem.n_constraints == 0:
            return 0.0
        return max(0.0, float(problem.c(x, y).max()))
