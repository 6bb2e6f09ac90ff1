r"""Exact Gauss-Newton (EGN): the Levenberg-Marquardt GGN direction through a batch-sized system.

Korbit, Adeoye, Bemporad & Zanon, "Exact Gauss-Newton Optimization for Training Deep
Neural Networks" (arXiv:2405.14402, 2024; Neurocomputing 2025).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..checks import check_bool, check_unit, int_fields, positive_fields
from ..problems import LeastSquares, Problem, SupervisedLoss
from ._base import Solver, options
from ._common import fresh_state, point, search_stop
from ._jacobians import JACOBIAN_MODES, next_batch, residual_rows, state_batch, supervised_outputs
from .damping import PRESETS, RatioDamping, gain_ratio
from .line_search import Armijo

__all__ = ["EGN", "egn_direction", "Linearization"]


@dataclass
class Linearization:
    r"""The pieces of the GGN model of a batch loss :math:`\frac1b\sum_i \ell(f_i)` at a point.

    Attributes:
        J: ``(b·c, P)`` Jacobian of the (flattened) outputs :math:`f`.
        g: ``(b, c)`` per-sample gradients :math:`\nabla_f \ell_i`.
        Q: ``(b, c, c)`` per-sample loss Hessians :math:`\nabla^2_f \ell_i`, or ``None`` for the identity.
        b: the batch size (number of samples).
    """

    J: Tensor
    g: Tensor
    Q: Tensor | None
    b: int

    def apply_q(self, u: Tensor) -> Tensor:
        """:math:`Q u` for ``u`` of shape ``(b·c,)`` or ``(b·c, k)``."""
        if self.Q is None:
            return u
        b, c = self.g.shape
        U = u.reshape(b, c, -1)
        return torch.einsum("iac,ick->iak", self.Q, U).reshape(u.shape)


def linearize(
    problem: Problem, x: Tensor, batch: Any, mode: str = "auto", chunk_size: int | None = None
) -> Linearization:
    r"""The GGN pieces of ``problem`` on one batch.

    For :class:`~curvlab.SupervisedLoss`, :math:`f` are the model outputs and :math:`\ell` the
    per-sample loss. For :class:`~curvlab.LeastSquares` with residual rows :math:`r_i`
    (``n`` rows), :math:`f_i = r_i`, :math:`\ell_i = \tfrac12\|r_i\|^2`, so :math:`g = r`,
    :math:`Q = I`, and :math:`\frac1n\sum_i \ell_i` is the problem's objective.

    Args:
        problem: a :class:`~curvlab.SupervisedLoss` or :class:`~curvlab.LeastSquares`.
        x: flat parameters.
        batch: one batch (or ``ALL`` for single-batch data).
        mode: Jacobian mode (see :class:`EGN`'s ``jacobian``).
        chunk_size: Jacobian products per vectorised pass.

    Returns:
        The :class:`Linearization` at ``x`` on the batch.
    """
    if isinstance(problem, LeastSquares):
        r, J, n = residual_rows(problem, x, batch, chunk_size, mode=mode)
        return Linearization(J, r.reshape(n, -1), None, n)
    _, J, g, Q = supervised_outputs(problem, x, batch, mode, chunk_size)
    return Linearization(J, g, Q, g.shape[0])


def egn_direction(lin: Linearization, damping: float) -> Tensor:
    r"""The EGN direction :math:`d = -J^\top (Q J J^\top + b\lambda I)^{-1} \nabla_f \ell`.

    The Levenberg-Marquardt step on the GGN model of :math:`\frac1b\sum_i\ell_i`,
    :math:`d = -(\tfrac1b J^\top Q J + \lambda I)^{-1}\tfrac1b J^\top \nabla_f\ell`, rewritten by the
    Duncan-Guttman (push-through / Woodbury) identity
    :math:`(J^\top Q J + b\lambda I)^{-1}J^\top = J^\top(QJJ^\top + b\lambda I)^{-1}` (Korbit et al.
    2024, the paper's central identity), so only the ``b·c × b·c`` matrix :math:`QJJ^\top + b\lambda I` is factored
    (LU; it is not symmetric, but its eigenvalues are those of
    :math:`Q^{1/2}JJ^\top Q^{1/2} + b\lambda I`, all :math:`\ge b\lambda > 0`). ``Q`` is block
    diagonal with the exact per-sample loss Hessians (MSE: identity; softmax
    cross-entropy: :math:`\operatorname{diag}(p) - pp^\top`).

    Args:
        lin: the :class:`Linearization` at the point.
        damping: :math:`\lambda > 0`.

    Returns:
        The direction ``d`` (flat, size ``P``).
    """
    J, b = lin.J, lin.b
    K = J @ J.T
    A = lin.apply_q(K)
    A.diagonal().add_(b * damping)
    z = torch.linalg.solve(A, lin.g.reshape(-1))
    return -(J.T @ z)


@options
class EGN(Solver):
    r"""Exact Gauss-Newton (Korbit, Adeoye, Bemporad & Zanon 2024), with the paper's three improvements.

    On a batch of ``b`` samples with loss :math:`\frac1b\sum_i \ell(f(x_i; w), y_i)` the
    direction is the regularised generalized Gauss-Newton step computed through the
    Duncan-Guttman identity (see :func:`egn_direction`):

    .. math::
        d_k = -J^\top (Q J J^\top + b\lambda_k I)^{-1} \nabla_f \ell, \qquad
        w_{k+1} = w_k + \alpha_k d_k \;(+\; \beta (w_k - w_{k-1})).

    The paper's three improvements, each switchable:

    * ``line_search`` — stochastic Armijo backtracking on the current batch (Vaswani et al.
      2019; :class:`~curvlab.solvers.Armijo`): :math:`\ell(w + \alpha d) \le \ell(w) + c_1\alpha\,\nabla\ell^\top d`
      with :math:`c_1 = 0.1`,
      :math:`\alpha \leftarrow 0.8\,\alpha` for at most 15 trials, starting from
      :math:`\min(1.5\,\alpha_{k-1}, \alpha_{\max})` with :math:`\alpha_{\max}` = ``lr``. On a
      stochastic problem a batch whose search fails is skipped (no step, :math:`\alpha_{k-1}`
      kept, so one bad batch cannot shrink the steps for good); on a deterministic one the
      run stops with ``status="line_search_failed"``.
    * ``adaptive_damping`` — Levenberg-Marquardt ratio test (:class:`~curvlab.solvers.RatioDamping`)
      :math:`\rho = [\ell(w+\Delta) - \ell(w)] / [\nabla\ell^\top\Delta + \tfrac1{2b}(J\Delta)^\top Q (J\Delta)]`
      on the batch: :math:`\rho < 0.25 \Rightarrow \lambda \leftarrow 1.01\lambda`,
      :math:`\rho > 0.75 \Rightarrow \lambda \leftarrow 0.99\lambda` (paper's thresholds and
      factors; :math:`\lambda_0 = 1`).

    Defaults by problem (``None`` options): on **mini-batch data** (an iterable of batches) the paper's
    values — fixed :math:`\lambda = 1` (``adaptive_damping`` off) and, when switched on, the factors
    1.01 / 0.99 — which suit the noisy ratios of mini-batches. On a **deterministic** problem (one batch,
    or data closed over) the paper's fixed :math:`\lambda = 1` biases every step towards gradient descent
    (a zero-residual exponential fit: 1.9e-4 after 300 iterations), so there the adaptive damping is on by
    default with the trust-region factors of the authors' later code (somax, ``TrustRegionDamping``:
    increase 1.5, decrease 0.5, :math:`\lambda \ge 10^{-12}`), which drive :math:`\lambda \to 0` and give the
    Gauss-Newton rate (that fit: 11 iterations). Our choice of defaults; pass the options to override.
    * ``momentum`` — heavy ball :math:`v \leftarrow \beta v + \alpha d`, :math:`w \leftarrow w + v`.

    Works on :class:`~curvlab.SupervisedLoss` (``J`` is the Jacobian of the model outputs,
    ``Q`` the exact block-diagonal loss Hessian) and :class:`~curvlab.LeastSquares` (outputs =
    residual rows, ``Q = I``, so :math:`d = -J^\top(JJ^\top + n\lambda I)^{-1} r`). On an iterable
    of batches each step uses the next batch.

    Args:
        lr: step size :math:`\alpha` (the cap :math:`\alpha_{\max}` with a line search).
        damping: initial :math:`\lambda > 0` (paper: 1).
        line_search: Armijo backtracking on/off.
        c1: Armijo constant (paper's :math:`c` = 0.1; the old name ``c`` is a deprecated alias).
        shrink: backtracking factor (paper: 0.8).
        grow: step reset factor between iterations (paper: 1.5).
        max_backtracks: trials per search (paper: 15).
        adaptive_damping: LM ratio update of :math:`\lambda` on/off (``None``: on for deterministic problems,
            off — the paper's setting — on mini-batch data).
        rho_low: ratio below which :math:`\lambda` grows (paper: 0.25).
        rho_high: ratio above which :math:`\lambda` shrinks (paper: 0.75).
        damping_increase: growth factor (paper: 1.01; ``None``: 1.01 on mini-batches, 1.5 deterministic).
        damping_decrease: shrink factor (paper: 0.99; ``None``: 0.99 on mini-batches, 0.5 deterministic).
        min_damping: lower bound on :math:`\lambda`; ``None`` (default) gives ``1e-4`` on mini-batch data
            and ``1e-12`` on a deterministic problem. The paper's rule shrinks :math:`\lambda` by 0.99 whenever
            :math:`\rho > 0.75`, which on interpolating mini-batch training holds at nearly every step, so
            :math:`\lambda` falls geometrically; below ~1e-6 the batch-sized system turns ill-conditioned and
            one batch's step wrecks the others (digits MLP, batch 32: test accuracy 0.969 → 0.47 after
            ~48 epochs with a 1e-12 floor; stays 0.96 with 1e-4). Our safeguard, not the paper's.
        momentum: heavy-ball :math:`\beta \in [0, 1)`.
        jacobian: ``"auto"``, ``"per_sample"`` or ``"rows"``: how the Jacobian is taken (see
            :mod:`curvlab.solvers._jacobians`). On a SupervisedLoss ``"auto"`` is per-sample
            ``vmap`` (falling back to batched vjps); on a LeastSquares it is forward or reverse
            mode by shape, and ``"per_sample"`` must be asked for (residual rows = samples).
        chunk_size: Jacobian products per vectorised pass (``None``: by a memory budget).

    Example:
        >>> import torch, curvlab as cl
        >>> X = torch.linspace(0, 1, 20, dtype=torch.float64)
        >>> w0 = torch.ones(2, dtype=torch.float64)
        >>> p = cl.LeastSquares(lambda w: w[0] * torch.exp(w[1] * X) - 2 * torch.exp(-X), w0)
        >>> r = cl.solvers.EGN().solve(p, max_iter=50)
        >>> str(r.status), r.n_iter <= 20, [round(v, 6) for v in r.params.tolist()]
        ('converged', True, [2.0, -1.0])
    """

    lr: float = 1.0
    damping: float = 1.0
    line_search: bool = False
    c1: float = 0.1
    shrink: float = 0.8
    grow: float = 1.5
    max_backtracks: int = 15
    adaptive_damping: bool | None = None
    rho_low: float = 0.25
    rho_high: float = 0.75
    damping_increase: float | None = None
    damping_decrease: float | None = None
    min_damping: float | None = None
    momentum: float = 0.0
    jacobian: str = "auto"
    chunk_size: int | None = None

    problem_types = (SupervisedLoss, LeastSquares)
    aliases = {"c": "c1"}

    def __post_init__(self) -> None:
        positive_fields(self, "lr", "damping", "grow")
        positive_fields(self, "damping_increase", "damping_decrease", optional=True)
        positive_fields(self, "momentum", "rho_low", "rho_high", allow_zero=True)
        positive_fields(self, "min_damping", allow_zero=True, optional=True)
        check_unit(self.momentum, "EGN.momentum")
        int_fields(self, "max_backtracks")
        int_fields(self, "chunk_size", optional=True)
        if self.adaptive_damping is not None:
            check_bool(self.adaptive_damping, "EGN.adaptive_damping")
        check_bool(self.line_search, "EGN.line_search")
        self.armijo_rule()  # validates c1 and shrink (Armijo's checks)
        self.damping_rule(True)  # validates the ratio rule (RatioDamping's checks)
        self.damping_rule(False)
        if self.jacobian not in JACOBIAN_MODES:
            raise ValueError(f"EGN.jacobian must be one of {JACOBIAN_MODES}, got {self.jacobian!r}")

    # ------------------------------------------------------------------ core
    def update(
        self,
        x: Tensor,
        f0: Tensor,
        grad: Tensor,
        lin: Linearization,
        value_at: Any,
        vars_: dict[str, Any],
        stochastic: bool,
    ) -> tuple[Tensor, dict[str, Any], dict[str, Any], dict[str, str] | None]:
        """One EGN update from the linearization at ``x`` (shared by the solver and :class:`curvlab.optim.EGN`).

        Args:
            x: current flat parameters.
            f0: batch loss at ``x``.
            grad: batch-loss gradient at ``x``.
            lin: the :class:`Linearization` at ``x`` on the batch.
            value_at: ``z -> batch loss at z`` (same batch; used by the line search and the ratio test).
            vars_: ``{"damping": λ, "alpha": last step, "buf": momentum buffer or None}``.
            stochastic: whether a failed line search skips the batch (``True``) or stops the run.

        Returns:
            ``(x_new, new_vars, log, stop)``; ``stop`` is ``None`` or the ``{"status", "message"}`` of a
            failed line search on a deterministic problem (``"line_search_failed"``, ``"nan"`` when every
            trial was non-finite, ``"converged"`` at the limit of precision).
        """
        lam = float(vars_["damping"])
        alpha_prev = float(vars_["alpha"])
        buf = vars_["buf"]
        d = egn_direction(lin, lam)
        slope = torch.dot(grad, d)
        log: dict[str, Any] = {"damping": lam, "alpha": 0.0, "rho": float("nan"), "ls_evals": 0}
        t = self.lr
        f_new: Tensor | None = None
        if self.line_search:
            search = self.armijo_rule()
            ls = search.search(lambda s: value_at(x + s * d), f0, slope, search.first_trial(alpha_prev, self.lr))
            log["ls_evals"] = ls.n_evals
            if not ls.success:
                if not stochastic:
                    return x, vars_, log, search_stop(ls, "EGN direction")
                return x, vars_, log, None  # skip this batch; α stays (no collapse to the last trial)
            t, f_new = ls.t, ls.value
        step = t * d
        if self.momentum > 0:
            buf = step.clone() if buf is None else self.momentum * buf + step
            step = buf
            f_new = None
        x_new = x + step
        if self.adaptive(stochastic):
            if f_new is None:
                f_new = value_at(x_new)
            Js = lin.J @ step
            pred = -float(torch.dot(grad, step) + 0.5 * torch.dot(Js, lin.apply_q(Js)) / lin.b)
            rho = gain_ratio(float(f0) - float(f_new), pred)
            lam = self.damping_rule(stochastic).update(lam, rho)
            log["rho"] = rho if math.isfinite(rho) else float("nan")
        log["alpha"] = t
        return x_new, {"damping": lam, "alpha": t, "buf": buf}, log, None

    def armijo_rule(self) -> Armijo:
        """This solver's :class:`~curvlab.solvers.Armijo` search (``c``, ``shrink``, ``max_backtracks``, ``grow``)."""
        try:
            return Armijo(self.c1, self.shrink, self.max_backtracks, grow=self.grow)
        except ValueError as e:
            raise ValueError(str(e).replace("Armijo.", "EGN.").replace("max_trials", "max_backtracks")) from None

    def adaptive(self, stochastic: bool) -> bool:
        """Whether the damping adapts on this kind of problem (``adaptive_damping``, or its default)."""
        return (not stochastic) if self.adaptive_damping is None else bool(self.adaptive_damping)

    def damping_rule(self, stochastic: bool) -> RatioDamping:
        """The :class:`~curvlab.solvers.RatioDamping` rule of the adaptive damping on this kind of problem.

        Unset factors: the paper's 1.01 / 0.99 on mini-batch data, the trust-region 1.5 / 0.5 otherwise.
        """
        floor = self.min_damping if self.min_damping is not None else (1e-4 if stochastic else 1e-12)
        preset = PRESETS["egn" if stochastic else "trust_region"]
        inc = self.damping_increase if self.damping_increase is not None else preset["increase"]
        dec = self.damping_decrease if self.damping_decrease is not None else preset["decrease"]
        try:
            return RatioDamping(self.rho_low, self.rho_high, inc, dec, floor=floor)
        except ValueError as e:
            msg = str(e).replace("RatioDamping.increase", "EGN.damping_increase")
            msg = msg.replace("RatioDamping.decrease", "EGN.damping_decrease").replace("RatioDamping.", "EGN.")
            raise ValueError(msg) from None

    # ------------------------------------------------------------------ solver
    def init(self, problem: Problem) -> dict[str, Any]:
        return fresh_state(
            problem, damping=float(self.damping), alpha=float(self.lr), buf=None, log={"damping": float(self.damping)}
        )

    def step(self, problem: Problem, state: dict[str, Any]) -> dict[str, Any]:
        x = state["x"]
        batch = state_batch(problem, state)
        lin = linearize(problem, x, batch, self.jacobian, self.chunk_size)
        vars_ = {"damping": state["damping"], "alpha": state["alpha"], "buf": state["buf"]}
        x_new, vars_, log, status = self.update(
            x, state["value"], state["grad"], lin, lambda z: problem.value(z, batch), vars_, problem.stochastic
        )
        matvecs = state["matvecs"] + lin.J.shape[0]
        if status is not None:
            return {**state, **vars_, "matvecs": matvecs, "log": log, **status}
        nb, draws = next_batch(problem, state["draws"])
        new = point(problem, x_new, nb)
        return {
            **state,
            **new,
            **vars_,
            "iter": state["iter"] + 1,
            "step_size": float(log["alpha"]),
            "draws": draws,
            "matvecs": matvecs,
            "log": log,
        }
