r"""IFT: hyperparameter optimization by implicit differentiation with a Neumann-series inverse.

Lorraine, Vicol & Duvenaud 2020, "Optimizing Millions of Hyperparameters by
Implicit Differentiation" (AISTATS). Algorithm 1 alternates ``T`` steps of the
inner optimizer on the training loss :math:`g` (``w ← w − α ∂g/∂w``) with one
hyperparameter step along the approximate hypergradient of Algorithm 2:

.. math::
    \hat\nabla F = \nabla_x f - \big(\alpha \textstyle\sum_{j=0}^{K-1} (I - \alpha \nabla^2_{yy} g)^j
    \nabla_y f\big)^\top \nabla^2_{yx} g \qquad \text{(eq. (3) with the Neumann series, eq. (5))}.

Only Hessian-/Jacobian-vector products on flat vectors are used, so it scales
to millions of hyperparameters (one per weight, one per training example).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ._base import BilevelSolver, _check_positive, base_state, options
from ._common import check_solve, implicit_hypergradient, inner_gd, outer_update, set_inner_lr
from ._problem import BilevelProblem

__all__ = ["IFT"]


@options
class IFT(BilevelSolver):
    r"""IFT hyperparameter optimization (Lorraine et al. 2020, Algorithms 1 and 2).

    Per outer iteration: ``T`` inner SGD steps :math:`y \leftarrow y - \alpha \nabla_y g(x, y)` (each on the next
    inner batch; Algorithm 1, lines 3–4), then the hypergradient with a ``K``-term Neumann
    approximation of :math:`[\nabla^2_{yy} g]^{-1}\nabla_y f` (Algorithm 2; step ``alpha``, by
    default the inner learning rate as in the paper) — or any :mod:`implicit` linear solve
    (``linear_solve="cg"``) — and an outer step with SGD or Adam.

    Args:
        lr: outer (hyperparameter) step size.
        inner_lr: :math:`\alpha`, the inner SGD step; ``None`` uses ``1/L`` with ``L`` the largest
            eigenvalue of :math:`\nabla^2_{yy} g` at the start, estimated by 20 power iterations.
        T: inner optimizer steps per hyperparameter step (Algorithm 1's inner loop).
        K: Neumann terms (the paper uses ``K ∈ {1, 3, 20}``; 20 here).
        linear_solve: ``"neumann"`` (the paper) or any :data:`implicit.SOLVES` name / callable
            ``solve(matvec, b, **options)``.
        alpha: Neumann step; ``None`` means ``inner_lr`` (the paper's choice).
        solve_options: extra options of the solve (``tol``, ``maxiter`` for CG).
        optimizer: outer optimizer, ``"sgd"`` (Algorithm 1) or ``"adam"`` (as in the paper's experiments).
        betas: Adam's moment decay rates.

    The inner variable is carried from one outer step to the next (warm start), as in Algorithm 1.

    Raises:
        ValueError: a non-positive step size or count, an unknown solve or optimizer.
    """

    lr: float = 1e-2
    inner_lr: float | None = None
    T: int = 5
    K: int = 20
    linear_solve: str | Callable[..., Any] = "neumann"
    alpha: float | None = None
    solve_options: dict[str, Any] | None = None
    optimizer: str = "sgd"
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        _check_positive(self, "lr")
        if self.inner_lr is not None:
            _check_positive(self, "inner_lr")
        if self.alpha is not None:
            _check_positive(self, "alpha")
        for n in ("T", "K"):
            v = getattr(self, n)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if n == "T" else 1):
                raise ValueError(f"IFT.{n} must be an integer >= {0 if n == 'T' else 1}, got {v!r}")
        check_solve(self, "linear_solve")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"IFT.optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")

    def default_rtol(self, problem: BilevelProblem) -> float:
        """Relative hypergradient tolerance of the default stop rule (tight: exact hypergradients)."""
        return 1e-8

    def init(self, problem: BilevelProblem) -> dict[str, Any]:
        state = base_state(problem, adam_m=None, adam_v=None, adam_t=0)
        set_inner_lr(problem, state, self.inner_lr)
        state["outer_value"] = problem.f(state["x"], state["y"], problem.draw_outer(0))
        return state

    def _solve_options(self, state: dict[str, Any]) -> dict[str, Any]:
        opts = dict(self.solve_options or {})
        if self.linear_solve == "neumann":
            opts.setdefault("alpha", self.alpha if self.alpha is not None else state["inner_lr"])
            opts.setdefault("K", self.K)
        return opts

    def step(self, problem: BilevelProblem, state: dict[str, Any]) -> dict[str, Any]:
        new = dict(state)
        x = state["x"]
        y, res = inner_gd(problem, x, state["y"], state["inner_lr"], self.T, new)
        ob = problem.draw_outer(new["draws_outer"])
        ib = problem.draw_inner(new["draws_inner"])
        new["draws_outer"] += 1
        new["draws_inner"] += 1
        hg, _, _, info = implicit_hypergradient(
            problem, x, y, ob, ib, self.linear_solve, new, **self._solve_options(state)
        )
        x = problem.project_x(outer_update(x, hg, state, new, self.lr, self.optimizer, self.betas))
        new.update(
            x=x.detach(),
            y=y.detach(),
            iter=state["iter"] + 1,
            outer_value=problem.f(x, y, ob),
            hypergrad_norm=float(torch.linalg.vector_norm(hg)),
            inner_residual=res,
            log={"solve_iters": info.n_iter if info is not None else float("nan")},
        )
        return new
