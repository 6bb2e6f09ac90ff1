r"""Saddle-free Newton (Dauphin et al. 2014): Newton steps with the absolute value of the Hessian."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..checks import int_fields, positive_fields
from ..linalg import lanczos, randomized_eigh
from ..problems import ALL, Problem
from ._base import Solver, options
from ._common import fresh_state, point, search_stop
from .line_search import Armijo, LineSearchResult

__all__ = ["SaddleFreeNewton", "abs_solve", "woodbury_abs_solve"]

#: Damping values searched by the Krylov variant when ``damping=None``, in units of the largest Ritz value
#: magnitude max|θ| of the step's Krylov space, so the steps do not depend on the scale of f (our choice: a log
#: grid; Dauphin et al. 2014, Alg. 1 line 6, search λ but do not list the candidates).
KRYLOV_DAMPING_GRID: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
#: γ of the low-rank variant when ``damping=None`` (O'Leary-Roseberry et al. 2020 use γ ≈ 1e-3).
LOWRANK_DAMPING = 1e-3


def abs_solve(V: Tensor, theta: Tensor, S: Tensor, g: Tensor, lam: float) -> Tensor:
    r""":math:`V S (|\Theta| + \lambda I)^{-1} S^\top V^\top g` — the subspace saddle-free solve.

    With :math:`T = V^\top H V = S\Theta S^\top` (the projected Hessian and its eigendecomposition),
    this is :math:`V(|T| + \lambda I)^{-1}V^\top g`; for ``V`` square orthogonal it is
    :math:`(|H| + \lambda I)^{-1} g`.
    """
    c = S.T @ (V.T @ g)
    return V @ (S @ (c / (theta.abs() + lam)))


def woodbury_abs_solve(U: Tensor, lam: Tensor, g: Tensor, gamma: float) -> Tensor:
    r""":math:`(U|\Lambda|U^\top + \gamma I)^{-1} g` for orthonormal ``U`` by Woodbury.

    :math:`= \frac1\gamma\big(g - U\,\mathrm{diag}\big(\tfrac{|\lambda_i|}{|\lambda_i| + \gamma}\big)U^\top g\big)`
    (O'Leary-Roseberry, Alger & Ghattas 2020, eq. 9).
    """
    a = lam.abs()
    return (g - U @ ((a / (a + gamma)) * (U.T @ g))) / gamma


def _failure(ls: LineSearchResult) -> dict[str, float]:
    """Log entries of a failed search (floats only: the torch.optim adapter logs them as floats)."""
    return {"nonfinite": float(ls.status == "nan"), "precision_limit": float(ls.precision_limit)}


class _Failed:
    """A failed search rebuilt from the log (for :func:`search_stop`)."""

    def __init__(self, log: dict[str, Any]) -> None:
        self.status = "line_search_failed"
        self.precision_limit = bool(log.get("precision_limit"))
        self.message = "Armijo line search found no sufficient decrease"


@options
class SaddleFreeNewton(Solver):
    r"""Saddle-free Newton: :math:`\Delta\theta = -|H|^{-1}\nabla f` (Dauphin et al. 2014, eq. 7).

    :math:`|H| = \sum_i |\lambda_i| v_i v_i^\top` rescales every eigendirection of the Hessian by
    the inverse of its curvature *magnitude*, so negative-curvature directions are descended
    instead of ascended (Newton's method is attracted to saddles; this is not). Two
    matrix-free approximations:

    * ``method="krylov"`` — the paper's Algorithm 1: ``k`` Lanczos vectors :math:`V` of
      :math:`H` started from the gradient (the Krylov space :math:`\mathcal K_k(H, g)`, full
      reorthogonalisation), the projected Hessian :math:`\hat H = V^\top H V` (tridiagonal)
      and :math:`|\hat H|` by its eigendecomposition; then ``inner_steps`` times (Alg. 1,
      inner loop): :math:`p(\lambda) = -V(|\hat H| + \lambda I)^{-1}V^\top\nabla f(\theta)`
      with :math:`\lambda` the value of the ``damping`` grid that gives the lowest loss
      :math:`f(\theta + p(\lambda))` (Alg. 1 line 6, "line search over λ"), followed by Armijo
      backtracking on :math:`p(\lambda)` (globalisation; accepts ``t = 1`` at once when the
      best trial already decreases enough). With ``k ≥ n`` the step is exactly
      :math:`-(|H| + \lambda I)^{-1}\nabla f`.
    * ``method="lowrank"`` — (O'Leary-Roseberry, Alger & Ghattas 2020, "low-rank saddle free
      Newton"): :math:`H \approx U\Lambda U^\top` of rank ``k`` (randomized eigensolver,
      Halko et al. 2011 Alg. 5.3, or Lanczos Ritz pairs), recomputed every ``refresh``
      iterations, and :math:`p = -(U|\Lambda|U^\top + \gamma I)^{-1} g` by Woodbury
      (:func:`woodbury_abs_solve`), :math:`\gamma` = ``damping``; Armijo backtracking from
      ``lr``.

    Deterministic: gradients, Hessian products and line searches use the whole dataset.

    Args:
        method: ``"krylov"`` or ``"lowrank"``.
        k: Krylov subspace size / rank. Default 20: ours (Alg. 1 leaves ``k`` free; O'Leary-Roseberry
            et al. use rank ≈ 20 for their low-rank variant).
        damping: λ (Krylov) or γ (low-rank). A float fixes it; a tuple of floats (Krylov) is the
            grid searched per step; ``None`` means :data:`KRYLOV_DAMPING_GRID` times the largest Ritz value
            magnitude (a scale-free grid) for ``"krylov"`` and
            :data:`LOWRANK_DAMPING` (1e-3, O'Leary-Roseberry et al.) for ``"lowrank"``.
        inner_steps: subspace steps per Lanczos basis (``m`` of Alg. 1; default 1).
        refresh: iterations between eigendecompositions of the low-rank variant (default 5; ours).
        eig: ``"randomized"`` (default) or ``"lanczos"`` for the low-rank eigendecomposition.
        lr: first trial step of the Armijo backtracking.
        line_search: Armijo backtracking on/off (off: the full step ``lr · p``).
        c1, shrink, max_backtracks: Armijo constants (Nocedal & Wright Alg. 3.1).
        seed: seed of the low-rank variant's random sketch.
        hessian_mode: product mode of :func:`curvlab.linops.hessian`.

    Raises:
        ValueError: on an unknown ``method`` / ``eig``, ``k`` / ``inner_steps`` / ``refresh`` not
            a positive integer, negative or non-finite dampings, or a damping grid with ``"lowrank"``.

    Example:
        >>> import torch, curvlab as cl
        >>> f = lambda z: z[0] ** 2 - z[1] ** 2 + z[1] ** 4 / 4      # saddle at 0, minima at (0, ±√2)
        >>> res = cl.solvers.SaddleFreeNewton().solve(cl.Minimize(f, torch.tensor([1.0, 1e-3])), tol=1e-10)
        >>> round(abs(res.params[0].item()), 4), round(res.params[1].item(), 4)
        (0.0, 1.4142)
    """

    method: str = "krylov"
    k: int = 20
    damping: float | tuple[float, ...] | None = None
    inner_steps: int = 1
    refresh: int = 5
    eig: str = "randomized"
    lr: float = 1.0
    line_search: bool = True
    c1: float = 1e-4
    shrink: float = 0.5
    max_backtracks: int = 40
    seed: int = 0
    hessian_mode: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in ("krylov", "lowrank"):
            raise ValueError(f"SaddleFreeNewton.method must be 'krylov' or 'lowrank', got {self.method!r}")
        if self.eig not in ("randomized", "lanczos"):
            raise ValueError(f"SaddleFreeNewton.eig must be 'randomized' or 'lanczos', got {self.eig!r}")
        int_fields(self, "k", "inner_steps", "refresh", "max_backtracks")
        positive_fields(self, "lr", "c1", "shrink")
        grid = self.dampings
        if not grid or not all(isinstance(d, (int, float)) and math.isfinite(d) and d >= 0 for d in grid):
            raise ValueError(
                f"SaddleFreeNewton.damping must be a finite number >= 0 or a tuple of them, got {self.damping!r}"
            )
        if self.method == "lowrank" and (len(grid) != 1 or grid[0] <= 0):
            raise ValueError(f"SaddleFreeNewton(method='lowrank').damping must be one number > 0, got {self.damping!r}")

    @property
    def dampings(self) -> tuple[float, ...]:
        """The damping values in use (one for a fixed damping, the grid for the Krylov search)."""
        if self.damping is None:
            return KRYLOV_DAMPING_GRID if self.method == "krylov" else (LOWRANK_DAMPING,)
        if isinstance(self.damping, (tuple, list)):
            return tuple(self.damping)
        return (self.damping,)

    # ------------------------------------------------------------------ state
    def init(self, problem: Problem) -> dict[str, Any]:
        return fresh_state(problem, U=None, eigvals=None, since_refresh=0, n_refresh=0)

    def step(self, problem: Problem, state: dict[str, Any]) -> dict[str, Any]:
        H = problem.hessian(state["x"], ALL, mode=self.hessian_mode)
        value_at = lambda z: problem.value(z, ALL)  # noqa: E731
        grad_at = lambda z: problem.value_and_grad(z, ALL)  # noqa: E731
        vars_ = {k: state[k] for k in ("U", "eigvals", "since_refresh", "n_refresh")}
        x, _, _, vars_, log, mv = self.update(state["x"], state["value"], state["grad"], H, value_at, grad_at, vars_)
        new = point(problem, x, ALL) if not log.get("failed") else {}
        out = {
            **state,
            **new,
            **vars_,
            "iter": state["iter"] + 1,
            "step_size": log.pop("t"),
            "matvecs": state["matvecs"] + mv,
            "log": log,
        }
        if log.get("nonfinite"):
            msg = "non-finite Hessian eigenpairs or trial values; returning the last finite parameters"
            out.update(status="nan", message=msg)
        elif log.get("failed"):
            out.update(search_stop(_Failed(log), "saddle-free Newton direction"))
        return out

    # ---------------------------------------------------------------- update
    def update(
        self,
        x: Tensor,
        f0: Tensor,
        g: Tensor,
        H: Any,
        value_at: Callable[[Tensor], Tensor],
        grad_at: Callable[[Tensor], tuple[Tensor, Tensor]] | None,
        vars_: dict[str, Any],
    ) -> tuple[Tensor, Tensor, Tensor | None, dict[str, Any], dict[str, Any], int]:
        """One saddle-free Newton iteration from ``x`` (shared by the solver and ``curvlab.optim``).

        Args:
            x, f0, g: the point, its value and gradient.
            H: the Hessian at ``x`` (a symmetric operator).
            value_at: ``z -> f(z)`` for the searches.
            grad_at: ``z -> (f(z), ∇f(z))`` for the Krylov inner steps after the first
                (``None`` allows only ``inner_steps = 1``).
            vars_: ``U``, ``eigvals``, ``since_refresh``, ``n_refresh`` of the low-rank variant.

        Returns:
            ``(x_new, f_new, g_new or None, vars, log, matvecs)``; ``log["failed"]`` is set
            when no trial decreased ``f`` (``x_new = x`` then).
        """
        if self.method == "krylov":
            return self._krylov(x, f0, g, H, value_at, grad_at, vars_)
        return self._lowrank(x, f0, g, H, value_at, vars_)

    def _search(
        self, x: Tensor, f0: Tensor, g: Tensor, d: Tensor, value_at: Callable[[Tensor], Tensor], f_full: Tensor | None
    ) -> LineSearchResult:
        """Armijo backtracking on ``d`` from ``lr`` (reusing ``f(x + lr·d)`` when already known)."""
        if not self.line_search:
            return LineSearchResult(self.lr, None, 0, True)
        slope = torch.dot(g, d)
        ls = Armijo(self.c1, self.shrink, self.max_backtracks)
        return ls.search(lambda t: value_at(x + t * d), f0, slope, self.lr, value_t0=f_full)

    def _krylov(
        self,
        x: Tensor,
        f0: Tensor,
        g: Tensor,
        H: Any,
        value_at: Callable[[Tensor], Tensor],
        grad_at: Any,
        vars_: dict[str, Any],
    ) -> Any:
        gn = g.norm()
        if not float(gn) > 0:
            return x, f0, g, vars_, {"t": 0.0, "damping": float("nan"), "k_used": 0}, 0
        res = lanczos(H, self.k, v0=g)
        assert res.Q is not None
        V = res.Q
        theta, S = res.ritz()
        log: dict[str, Any] = {
            "k_used": int(V.shape[1]),
            "min_ritz": float(theta.min()),
            "max_ritz": float(theta.max()),
        }
        f, g_cur = f0, g
        t = 0.0
        for j in range(self.inner_steps):
            if j > 0:
                if grad_at is None:
                    break
                f, g_cur = grad_at(x)
            best = None
            grid = self.dampings
            if self.damping is None:  # relative to the curvature scale of this Krylov space
                scale = float(theta.abs().max())
                grid = tuple(lam * scale for lam in grid) if scale > 0 and math.isfinite(scale) else grid
            for lam in grid:
                d = -abs_solve(V, theta, S, g_cur, lam)
                fv = value_at(x + self.lr * d) if (len(grid) > 1 or not self.line_search) else None
                if fv is not None and not bool(torch.isfinite(fv)):
                    continue
                if best is None or (fv is not None and float(fv) < float(best[1])):
                    best = (lam, fv, d)
            if best is None:  # every damping gave a non-finite trial
                if j > 0:
                    break
                log.update(failed=True, t=0.0, nonfinite=True)
                return x, f, None, vars_, log, res.n_matvecs
            lam, fv, d = best
            ls = self._search(x, f, g_cur, d, value_at, fv)
            if not ls.success:
                if j > 0:  # keep the progress of the earlier inner steps
                    break
                log.update(failed=True, t=0.0, **_failure(ls))
                return x, f, None, vars_, log, res.n_matvecs
            t = ls.t
            x = x + t * d
            f = ls.value if ls.value is not None else value_at(x)
            log["damping"] = float(lam)
        log["t"] = t
        return x, f, None, vars_, log, res.n_matvecs  # the caller recomputes the gradient

    def _lowrank(
        self, x: Tensor, f0: Tensor, g: Tensor, H: Any, value_at: Callable[[Tensor], Tensor], vars_: dict[str, Any]
    ) -> Any:
        gamma = self.dampings[0]
        mv = 0
        vars_ = dict(vars_)
        U, lam = vars_.get("U"), vars_.get("eigvals")
        if U is None or vars_.get("since_refresh", 0) >= self.refresh:
            n = g.shape[0]
            k = min(self.k, n)
            before = H.n_matvecs if hasattr(H, "n_matvecs") else 0
            try:
                if self.eig == "randomized":
                    gen = torch.Generator(device=g.device).manual_seed(self.seed + int(vars_.get("n_refresh", 0)))
                    lam, U = randomized_eigh(H, k, generator=gen)
                else:
                    gen = torch.Generator(device=g.device).manual_seed(self.seed)
                    v0 = torch.randn(n, generator=gen, dtype=g.dtype, device=g.device)
                    r = lanczos(H, k, v0=v0)
                    theta, S = r.ritz()
                    assert r.Q is not None
                    lam, U = theta, r.Q @ S
            except torch.linalg.LinAlgError:  # e.g. non-finite Hessian-vector products
                lam = None
            mv = (H.n_matvecs - before) if hasattr(H, "n_matvecs") else 0
            if lam is None or not (bool(torch.isfinite(lam).all()) and bool(torch.isfinite(U).all())):
                log = {"damping": gamma, "t": 0.0, "failed": True, "nonfinite": True}
                return x, f0, None, vars_, log, mv
            vars_.update(U=U, eigvals=lam, since_refresh=0, n_refresh=int(vars_.get("n_refresh", 0)) + 1)
        vars_["since_refresh"] = int(vars_["since_refresh"]) + 1
        d = -woodbury_abs_solve(U, lam, g, gamma)
        log: dict[str, Any] = {"damping": gamma, "min_eig": float(lam.min()), "max_eig": float(lam.max())}
        ls = self._search(x, f0, g, d, value_at, None)
        if not ls.success:
            log.update(failed=True, t=0.0, **_failure(ls))
            vars_["since_refresh"] = self.refresh  # refresh the eigendecomposition next time
            return x, f0, None, vars_, log, mv
        x_new = x + ls.t * d
        log["t"] = ls.t
        return x_new, ls.value if ls.value is not None else value_at(x_new), None, vars_, log, mv
