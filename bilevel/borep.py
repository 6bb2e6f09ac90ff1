r"""BO-REP: Bilevel Optimization with lower-level initialization REfinement and Periodic updates.

J. Hao, X. Gong, M. Liu, "Bilevel Optimization under Unbounded Smoothness: A New Algorithm
and Convergence Analysis", ICLR 2024
(code: github.com/MingruiLiu-ML-Lab/Bilevel-Optimization-under-Unbounded-Smoothness).

For upper-level objectives whose smoothness grows with the gradient ((L_{x,0}, L_{x,1}, ...)-smoothness,
e.g. RNNs), BO-REP moves ``x`` by *normalized momentum* and refreshes ``y`` only
periodically. Algorithm 1, iteration ``t``:

.. math::
    &\text{if } t \bmod I = 0:\quad y_t = \text{UpdateLower}(x_t, y_{t-1})
      \quad (N \text{ SGD steps } y \leftarrow \Pi_Y(y - \gamma \nabla_y g(x_t, y; \pi)),\ \text{Algorithm 3}),\\
    &\hat\nabla f(x_t, y_t, z_t) = \nabla_x f(x_t, y_t; \xi) - \nabla^2_{xy} g(x_t, y_t; \zeta)\, z_t,\\
    &z_{t+1} = \Pi_{\mathcal Z}\big(z_t - \nu\,(\nabla^2_{yy} g(x_t, y_t; \zeta)\, z_t
      - \nabla_y f(x_t, y_t; \xi))\big),
      \qquad \mathcal Z = \{\|z\| \le \rho\},\\
    &m_{t} = \beta m_{t-1} + (1 - \beta)\,\hat\nabla f(x_t, y_t, z_t), \qquad
      x_{t+1} = x_t - \eta\, m_t / \|m_t\| .

The ``z`` step is one stochastic gradient step on
:math:`\tfrac12 z^\top \nabla^2_{yy} g\, z - \nabla_y f^\top z`, whose minimiser
:math:`z^* = (\nabla^2_{yy} g)^{-1}\nabla_y f` makes :math:`\hat\nabla f` the hypergradient; the paper
keeps it in the ball of radius :math:`\rho = l_{f,0}/\mu` (a bound on :math:`\|z^*\|`).

Before the first iteration, *initialization refinement* (Algorithm 2, epoch-SGD) solves the
lower level at :math:`x_0` well: ``init_epochs`` epochs of SGD on :math:`g(x_0, \cdot)`,
epoch ``j`` running ``init_steps * 2**j`` steps at step size ``lr_y / 2**j`` and restarting from the
average of the previous epoch's iterates; the output is the last epoch's average.

Two schedules (``schedule=``, ``"auto"`` by default):

``"adaptive"`` — the default on deterministic problems (no minibatches). Without noise, UpdateLower is
the warm-started lower-level solve of :func:`bilevel.solve_inner` at every iteration (so ``y`` is
:math:`y^*(x)` at the reported ``x``), ``z`` solves :math:`\nabla^2_{yy} g\, z = \nabla_y f` by CG
warm-started from the previous ``z`` (instead of one step ``ν``), and the normalized-momentum step keeps
the paper's update direction with a length that follows the problem: it grows by 1.2 while ``f``
decreases and the new estimate agrees with the momentum, and halves otherwise (the step overshot), so a
constant length's :math:`O(\eta)` oscillation does not prevent convergence and no ``lr`` needs setting
(``lr`` is the first length). Ours: the paper analyses the stochastic algorithm only.

``"paper"`` — Algorithm 1 as written (the default on minibatches), below.

Defaults follow the authors' code (``beta = 0.9``, ``nu = 1e-2``, ``interval = I = 2``,
``n_inner_steps = N = 10``, outer and inner learning rates ``5e-2``). The analysis (Theorem 4.1) uses a
constant ``η`` chosen from the target accuracy ε, and a normalized step of constant length *cannot*
converge exactly: the iterates end in an :math:`O(\eta)` oscillation around a solution. ``lr_decay = p > 0``
uses :math:`\eta_t = \eta (t+1)^{-p}` instead (the default stays ``0``, the paper's choice); with
:math:`p \in [0.5, 0.75]` the steps settle while :math:`\sum_t \eta_t` still covers
:math:`\|x_0 - x^*\|`. The other steps are scale-dependent: ``lr_y`` and ``lr_z`` about :math:`1/L_g`
(the paper's :math:`\gamma, \nu \le 1/l_{g,1}`), and ``N`` large enough that ``y`` tracks :math:`y^*(x)`
on ill-conditioned inner problems. On the 20 × 50 quadratic of ``examples/bilevel_compare.py``
(inner condition number 20) ``BOREP(lr=1, lr_decay=0.7, momentum=0.5, lr_y=1/L, lr_z=1/L,
n_inner_steps=20)`` reaches :math:`F - F^* \approx 2.5 \cdot 10^{-2}` in 1500 iterations, where the
defaults stay at :math:`\approx 10^2`. ``z_radius=None`` skips the ball projection (pass ``ρ`` when a bound on
:math:`\|z^*\|` is known). Each iteration costs one gradient of ``f``, one second-order product of ``g``
(``∇²_xy g·z`` and ``∇²_yy g·z`` from one double-backward pass, counted as one HVP) and, every
``I`` iterations, ``N`` gradients of ``g``. Lower-level constraints are not supported.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from curvlab.checks import check_choice, check_unit
from curvlab.checks import int_fields as _ci
from curvlab.linalg import solve
from curvlab.linops import MatvecOperator

from ._base import BilevelSolver, _check_positive, _count, base_state, options
from ._first_order import draw, inner_lr, norm
from ._inner import default_inner_rtol, solve_inner
from ._problem import BilevelProblem

__all__ = ["BOREP"]

#: the authors' code's defaults for the lower-level and linear-system step sizes
_LR_Y, _LR_Z = 5e-2, 1e-2  # (the defaults now follow 1/L_g; kept for reference)


@options
class BOREP(BilevelSolver):
    r"""Normalized-momentum bilevel solver with periodic lower-level updates (Hao, Gong, Liu 2024, Algorithm 1).

    Args:
        lr: :math:`\eta`, length of each normalized x step.
        momentum: :math:`\beta` of the momentum :math:`m_t`.
        lr_z: :math:`\nu`, step size of the linear-system variable ``z``; ``None`` (default) gives the
            authors' 1e-2 capped at :math:`1/L_g` (:math:`L_g` estimated at ``(x0, y0)`` by 20 Hessian-vector
            power iterations), so the ``z`` recursion cannot diverge on a stiff lower level.
        lr_y: :math:`\gamma`, SGD step size of the lower-level updates; ``None`` (default) gives the authors'
            5e-2 capped at :math:`1/L_g` in the same way.
        interval: :math:`I`, update ``y`` every ``I`` iterations.
        n_inner_steps: :math:`N`, SGD steps per lower-level update.
        init_epochs: epochs of the initialization refinement (0 skips it).
        init_steps: length of its first epoch (doubling every epoch, step size halving).
        z_radius: :math:`\rho`, radius of the ball ``z`` is projected on (``None``: no projection).
        lr_decay: :math:`p \ge 0` in :math:`\eta_t = \eta (t+1)^{-p}` (0, the paper's constant step, by default).
        schedule: ``"auto"`` (``"adaptive"`` without minibatches, else ``"paper"``), ``"adaptive"`` or
            ``"paper"`` (see the module docstring).

    Example:
        >>> from bilevel.problems import quadratic
        >>> q = quadratic(dx=3, dy=4)
        >>> r = BOREP(lr=0.05).solve(q.problem, max_iter=5)
        >>> r.n_iter
        5
    """

    lr: float = 5e-2
    momentum: float = 0.9
    lr_z: float | None = None
    lr_y: float | None = None
    interval: int = 2
    n_inner_steps: int = 10
    init_epochs: int = 3
    init_steps: int = 10
    z_radius: float | None = None
    lr_decay: float = 0.0
    schedule: str = "auto"

    supports_constraints = False

    def __post_init__(self) -> None:
        _check_positive(self, "lr")
        for name in ("lr_z", "lr_y"):
            if getattr(self, name) is not None:
                _check_positive(self, name)
        _check_positive(self, "lr_decay", allow_zero=True)
        check_unit(self.momentum, "BOREP.momentum")
        check_choice(self.schedule, "BOREP.schedule", ("auto", "adaptive", "paper"))
        _ci(self, "interval", "n_inner_steps", "init_steps")
        _ci(self, "init_epochs", minimum=0)
        if self.z_radius is not None:
            _check_positive(self, "z_radius")

    # ------------------------------------------------------------------ #
    def _sgd(self, problem: BilevelProblem, state: dict[str, Any], x: Tensor, y: Tensor, n: int, lr: float) -> tuple:
        """``n`` projected SGD steps on ``g(x, ·)`` from ``y``; returns the last iterate, the average, ``‖∇_y g‖``."""
        avg = torch.zeros_like(y)
        gy = None
        for _ in range(n):
            gy = problem.grad_g_y(x, y, draw(problem, state, "inner"))
            y = problem.project_y(y - lr * gy)
            avg = avg + y
        _count(state, grads=n)
        res = float(torch.linalg.vector_norm(gy)) if gy is not None else float("nan")
        return y, avg / max(n, 1), res

    def refine(self, problem: BilevelProblem, state: dict[str, Any], x: Tensor, y: Tensor) -> Tensor:
        """Initialization refinement (Algorithm 2, epoch-SGD): ``y`` close to :math:`y^*(x)`; counts into ``state``."""
        for j in range(self.init_epochs):
            _, y, res = self._sgd(problem, state, x, y, self.init_steps * 2**j, state["lr_y"] / 2**j)
            state["inner_residual"] = res
        return y

    def init(self, problem: BilevelProblem) -> dict[str, Any]:
        self.check_problem(problem)
        state = base_state(problem)
        lr_y, lr_z = self.lr_y, self.lr_z
        if lr_y is None or lr_z is None:
            step = inner_lr(problem, state, state["x"], state["y"], problem.draw_inner(0))
            lr_y = step if lr_y is None else lr_y
            lr_z = step if lr_z is None else lr_z
        state["lr_y"], state["lr_z"] = float(lr_y), float(lr_z)
        state["y"] = self.refine(problem, state, state["x"], state["y"])
        state["z"] = torch.zeros_like(state["y"])
        state["m"] = torch.zeros_like(state["x"])
        state["eta"] = float(self.lr)
        return state

    def adaptive(self, problem: BilevelProblem) -> bool:
        """Whether ``problem`` runs the deterministic ``"adaptive"`` step length."""
        return not problem.stochastic if self.schedule == "auto" else self.schedule == "adaptive"

    def step(self, problem: BilevelProblem, state: dict[str, Any]) -> dict[str, Any]:
        new = dict(state)
        t = int(state["iter"])
        adaptive = self.adaptive(problem)
        x = state["x_next"] if adaptive and state.get("x_next") is not None else state["x"]
        y, z = state["y"], state["z"]
        if adaptive:
            # deterministic: UpdateLower is the warm-started inner solve of bilevel at every x (so y is the
            # lower-level solution at the returned x) and z solves ∇²_yy g z = ∇_y f by warm-started CG
            res = solve_inner(problem, x, y, deadline=self.deadline(state), scale=state.get("inner_scale"))
            y = res.y
            _count(new, grads=res.grads, hvps=res.hvps)
            if res.status == "nan":  # non-finite g at x: stop with status "nan" at the last finite state
                return {**state, "outer_value": torch.tensor(float("nan"), dtype=problem.dtype)}
            new["inner_scale"] = state.get("inner_scale") or res.scale
            new["inner_residual"] = res.grad_norm
            fval, fx, fy = problem.f_and_grad(x, y)
            op = MatvecOperator(
                problem.hvp_yy_operator(x, y), problem.dy, problem.dtype, problem.device, symmetric=True
            )
            kr = solve(op, fy, "cg", x0=z, tol=default_inner_rtol(problem.dtype), maxiter=10 * problem.dy + 10)
            z = kr.x.detach()
            jxz = problem.jvp_xy_g(x, y, z)
            _count(new, grads=1, hvps=op.n_matvecs + 1)
            ghat = fx - jxz
        elif t % self.interval == 0:  # periodic lower-level update (Algorithm 3)
            y, _, new["inner_residual"] = self._sgd(problem, new, x, y, self.n_inner_steps, state["lr_y"])
        if not adaptive:
            bo, bi = draw(problem, new, "outer"), draw(problem, new, "inner")
            fval, fx, fy = problem.f_and_grad(x, y, bo)
            jxz, hz = problem.second_g(x, y, z, bi)
            _count(new, grads=1, hvps=1)
            ghat = fx - jxz
            z = z - state["lr_z"] * (hz - fy)
        if self.z_radius is not None:
            n = torch.linalg.vector_norm(z)
            z = z * torch.clamp(self.z_radius / n.clamp_min(torch.finfo(z.dtype).tiny), max=1.0)
        m = self.momentum * state["m"] + (1 - self.momentum) * ghat
        if self.adaptive(problem):
            # deterministic: the step length follows the problem — it grows (x 1.2) while the new estimate
            # still agrees with the last direction and f decreased, and halves otherwise (the step overshot)
            eta = float(state.get("eta", self.lr))
            if t > 0:
                better = float(fval) < float(state["outer_value"])
                eta = eta * (1.2 if better and float(ghat @ state["m"]) > 0 else 0.5)
        else:
            eta = self.lr * (t + 1) ** (-self.lr_decay)
        mn = torch.linalg.vector_norm(m)
        step = m / mn if float(mn) > 0 else torch.zeros_like(m)
        x_next = problem.project_x(x - eta * step)
        if adaptive:
            new["x_next"] = x_next
        new.update(
            x=x if adaptive else x_next,
            y=y,
            z=z,
            m=m,
            eta=eta,
            iter=t + 1,
            outer_value=fval,
            hypergrad_norm=norm(ghat),
            log={"lr": eta, "momentum_norm": float(mn)},
        )
        return new
