r"""Sven: Singular Value dEsceNt, the truncated Moore-Penrose step on per-sample residuals.

Bright-Thonney, Harvey, Lukas & Thaler, "Sven: Singular Value Descent as a Computationally
Efficient Natural Gradient Method" (arXiv:2604.01279, 2026); reference code: sambt/sven.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..checks import int_fields, positive_fields
from ..linalg import randomized_svd
from ..problems import LeastSquares, Problem, SupervisedLoss
from ._base import Solver, options
from ._common import fresh_state, point
from ._jacobians import JACOBIAN_MODES, next_batch, residual_rows, state_batch, supervised_losses

__all__ = ["Sven", "truncated_pinv", "sven_direction", "SVD_BACKENDS"]

#: accepted values of ``Sven.svd``
SVD_BACKENDS = ("auto", "exact", "randomized", "gram")


def _pick_backend(backend: str, rows: int, cols: int, k: int) -> str:
    if backend != "auto":
        return backend
    if cols >= 2 * rows:
        return "gram"
    if 4 * k <= min(rows, cols):
        return "randomized"
    return "exact"


def truncated_pinv(
    M: Tensor,
    k: int,
    rtol: float = 1e-3,
    atol: float = 1e-10,
    backend: str = "auto",
    n_oversample: int = 5,
    n_power: int = 1,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    r"""Factors of the truncated pseudoinverse :math:`M_k^+ = V_k \operatorname{diag}(1/\sigma) U_k^\top`.

    Keeps at most ``k`` singular triplets and drops :math:`\sigma_i \le \mathrm{rtol}\,\sigma_{\max}`
    and :math:`\sigma_i \le \mathrm{atol}` (Sven paper's truncation; reference code ``pinv``: rtol = 1e-3,
    atol = 1e-10). The pseudoinverse itself is never formed.

    Back-ends:

    * ``"exact"`` — thin SVD ``torch.linalg.svd(M, full_matrices=False)``.
    * ``"randomized"`` — Halko, Martinsson & Tropp (2011) Alg. 4.4 + 5.1 via
      :func:`curvlab.linalg.randomized_svd` (``n_oversample`` extra columns, ``n_power``
      power iterations; Sven's defaults 5 and 1).
    * ``"gram"`` — ``eigh`` of the ``rows × rows`` Gram matrix :math:`MM^\top = U\Sigma^2U^\top`
      (formed and factored in float64 for lower-precision inputs); :math:`V` is left
      implicit (:math:`V_k = M^\top U_k \Sigma_k^{-1}`) and returned as ``None``. The cheap
      one when there are many more columns (parameters) than rows (samples).
    * ``"auto"`` — ``"gram"`` when ``cols >= 2 rows``, else ``"randomized"`` when
      ``4k <= min(rows, cols)``, else ``"exact"``.

    Args:
        M: ``(rows, cols)`` matrix.
        k: maximum number of directions kept (``>= 1``).
        rtol: relative singular-value cut.
        atol: absolute singular-value cut.
        backend: see above.
        n_oversample: randomized sketch oversampling.
        n_power: randomized power iterations.
        generator: random generator of the randomized sketch.

    Returns:
        ``(U, S, V)``: ``U`` ``(rows, r)``, ``S`` ``(r,)`` descending, ``V`` ``(cols, r)`` or
        ``None`` (``"gram"``), with ``r <= k`` the number of kept directions.

    Raises:
        ValueError: on an unknown back-end.
    """
    if backend not in SVD_BACKENDS:
        raise ValueError(f"svd back-end must be one of {SVD_BACKENDS}, got {backend!r}")
    rows, cols = M.shape
    kk = max(1, min(k, rows, cols))
    backend = _pick_backend(backend, rows, cols, kk)
    V: Tensor | None
    if backend == "exact":
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        U, S, V = U[:, :kk], S[:kk], Vh[:kk].T
    elif backend == "randomized":
        U, S, Vh = randomized_svd(M, kk, n_oversample=n_oversample, n_power=n_power, generator=generator)
        V = Vh.T
    else:
        M64 = M if M.dtype == torch.float64 else M.to(torch.float64)
        w, E = torch.linalg.eigh(M64 @ M64.T)
        w, E = w.flip(0)[:kk], E.flip(1)[:, :kk]
        S = w.clamp_min(0).sqrt().to(M.dtype)
        U, V = E.to(M.dtype), None
    if S.numel() == 0 or not bool(S[0] > 0):
        return U[:, :0], S[:0], None if V is None else V[:, :0]
    keep = int(((S > rtol * S[0]) & (S > atol)).sum())
    return U[:, :keep], S[:keep], None if V is None else V[:, :keep]


def sven_direction(M: Tensor, R: Tensor, U: Tensor, S: Tensor, V: Tensor | None) -> Tensor:
    r""":math:`M_k^+ R = V_k \operatorname{diag}(1/\sigma) U_k^\top R` from the factors of :func:`truncated_pinv`.

    With ``V=None`` (Gram back-end) it is :math:`M^\top U_k \operatorname{diag}(1/\sigma^2) U_k^\top R`.

    Args:
        M: the ``(rows, cols)`` matrix the factors belong to.
        R: right-hand side ``(rows,)``.
        U, S, V: factors from :func:`truncated_pinv`.

    Returns:
        The ``(cols,)`` vector :math:`M_k^+ R` (the step before ``-lr``).
    """
    c = U.T @ R
    if V is None:
        return M.T @ (U @ (c / S**2))
    return V @ (c / S)


@options
class Sven(Solver):
    r"""Sven (Bright-Thonney, Harvey, Lukas & Thaler 2026): truncated-pseudoinverse steps on per-sample conditions.

    Each sample's loss is a condition to drive to zero: residuals
    :math:`R_i = \ell_i^{\kappa/2}` (:math:`\kappa = 2` by default, so :math:`R_i = \ell_i`), their
    Jacobian :math:`M = \partial R / \partial\theta` (``batch × params``), and the minimum-norm
    step that best satisfies all linearised conditions :math:`R + M\delta\theta = 0`,

    .. math::
        \delta\theta = -\eta\, M_k^+ R = -\eta\, V_k \operatorname{diag}(1/\sigma)\, U_k^\top R,

    with the truncated SVD kept as factors (at most ``k`` directions, dropping
    :math:`\sigma \le \mathrm{rtol}\,\sigma_{\max}`; :func:`truncated_pinv`). No damping and no
    line search (as in the paper). On :class:`~curvlab.LeastSquares` the residuals are the
    problem's own, :math:`R = r`, :math:`M = J` (a truncated Gauss-Newton step).

    Memory options from the paper's section on scaling: the Jacobian w.r.t. a random fraction of the
    parameters (``param_fraction``; of whole parameter tensors with ``param_blocks=True``),
    redrawn every step, with the step applied to those parameters only; micro-batch
    averaging (``microbatch``: the losses of ``microbatch`` consecutive samples are averaged
    into one condition before the power :math:`\kappa/2`). Optional RMSProp scaling as in the
    reference code: ``"pre"`` keeps :math:`v` = EMA of the squared mean gradient and solves
    in the scaled variables, :math:`\delta = D(MD)_k^+R` with
    :math:`D = \operatorname{diag}(1/(\sqrt v + \epsilon))` (the reference code omits the outer
    :math:`D`; keeping it makes :math:`\delta` still solve :math:`M\delta \approx R`); ``"post"``
    divides the step by the root of the EMA of its own square (then use an Adam-sized ``lr``).

    Per-sample Jacobians come from ``vmap`` of ``jacrev`` over the samples, chunked
    (:mod:`curvlab.solvers._jacobians`). Random choices (parameter subsets, sketches) are
    seeded from ``seed`` and the iteration count, so a resumed run is bit-identical.

    Args:
        lr: step size :math:`\eta` (paper's regression: 0.1).
        k: directions kept (``None``: half the number of conditions, the paper's suggestion).
        rtol: relative singular-value cut (paper: 1e-3).
        atol: absolute singular-value cut (reference code: 1e-10).
        kappa: exponent :math:`\kappa > 0` of :math:`R = \ell^{\kappa/2}` (paper: 2).
        svd: ``"auto"``, ``"exact"``, ``"randomized"`` or ``"gram"`` (see :func:`truncated_pinv`).
        n_oversample: randomized-SVD oversampling (paper: 5).
        n_power: randomized-SVD power iterations (paper: 1).
        param_fraction: fraction of the parameters in each step's Jacobian, in (0, 1].
        param_blocks: draw whole parameter tensors instead of single entries.
        microbatch: samples averaged into one condition (1: none).
        rmsprop: ``None``, ``"pre"`` or ``"post"``.
        rmsprop_alpha: EMA decay of the RMSProp second moment (0.99).
        rmsprop_eps: RMSProp denominator term (1e-8).
        rmsprop_momentum: momentum on the ``"post"``-scaled step.
        seed: seed of the step's random choices.
        jacobian: ``"auto"``, ``"per_sample"`` or ``"rows"`` (as :class:`~curvlab.solvers.EGN`).
        chunk_size: samples per vectorised Jacobian pass (``None``: by a memory budget).

    Example:
        >>> import torch, curvlab as cl
        >>> X = torch.linspace(-1, 1, 16, dtype=torch.float64)[:, None]
        >>> w0 = torch.zeros(2, dtype=torch.float64)
        >>> p = cl.LeastSquares(lambda w: X[:, 0] * w[0] + w[1] - (3 * X[:, 0] - 1), w0)
        >>> r = cl.solvers.Sven(lr=1.0).solve(p, max_iter=3, tol=1e-12)
        >>> [round(v, 8) for v in r.params.tolist()]
        [3.0, -1.0]
    """

    lr: float = 0.1
    k: int | None = None
    rtol: float = 1e-3
    atol: float = 1e-10
    kappa: float = 2.0
    svd: str = "auto"
    n_oversample: int = 5
    n_power: int = 1
    param_fraction: float = 1.0
    param_blocks: bool = False
    microbatch: int = 1
    rmsprop: str | None = None
    rmsprop_alpha: float = 0.99
    rmsprop_eps: float = 1e-8
    rmsprop_momentum: float = 0.0
    seed: int = 0
    jacobian: str = "auto"
    chunk_size: int | None = None

    problem_types = (SupervisedLoss, LeastSquares)

    def __post_init__(self) -> None:
        positive_fields(self, "lr", "rtol", "kappa", "param_fraction", "rmsprop_eps")
        positive_fields(self, "atol", "rmsprop_alpha", "rmsprop_momentum", allow_zero=True)
        int_fields(self, "k", "chunk_size", optional=True)
        if self.param_fraction > 1:
            raise ValueError(f"Sven.param_fraction must lie in (0, 1], got {self.param_fraction}")
        if self.rtol >= 1:
            raise ValueError(f"Sven.rtol must be < 1, got {self.rtol}")
        if self.svd not in SVD_BACKENDS:
            raise ValueError(f"Sven.svd must be one of {SVD_BACKENDS}, got {self.svd!r}")
        if self.rmsprop not in (None, "pre", "post"):
            raise ValueError(f"Sven.rmsprop must be None, 'pre' or 'post', got {self.rmsprop!r}")
        if not (self.rmsprop_alpha < 1 and self.rmsprop_momentum < 1):
            raise ValueError("Sven.rmsprop_alpha and Sven.rmsprop_momentum must be < 1")
        int_fields(self, "microbatch")
        int_fields(self, "n_oversample", "n_power", minimum=0)
        if self.jacobian not in JACOBIAN_MODES:
            raise ValueError(f"Sven.jacobian must be one of {JACOBIAN_MODES}, got {self.jacobian!r}")

    # ------------------------------------------------------------------ pieces
    def generator(self, iteration: int, device: torch.device) -> torch.Generator:
        """The random generator of step ``iteration`` (a function of ``seed`` and ``iteration`` only)."""
        return torch.Generator(device=device).manual_seed(int(self.seed) * 1_000_003 + int(iteration))

    def subset(self, numels: list[int], generator: torch.Generator, device: torch.device) -> Tensor | None:
        """Sorted flat indices of this step's parameter subset (``None``: all parameters).

        Entries: ``int(param_fraction · P)`` distinct indices, uniformly. Blocks: whole
        tensors in random order while they fit the budget (at least the smallest one), as in
        the reference code's ``mask_by_block``.
        """
        P = sum(numels)
        if self.param_fraction >= 1:
            return None
        if not self.param_blocks:
            n = max(1, int(self.param_fraction * P))
            return torch.randperm(P, generator=generator, device=device)[:n].sort().values
        starts = [0]
        for n in numels[:-1]:
            starts.append(starts[-1] + n)
        budget, used, chosen = int(self.param_fraction * P), 0, []
        for i in torch.randperm(len(numels), generator=generator, device=device).tolist():
            if used + numels[i] <= budget:
                chosen.append(i)
                used += numels[i]
        if not chosen:
            chosen = [min(range(len(numels)), key=lambda j: numels[j])]
        chosen.sort()
        return torch.cat([torch.arange(starts[i], starts[i] + numels[i], device=device) for i in chosen])

    def conditions(self, losses: Tensor, dlosses: Tensor) -> tuple[Tensor, Tensor]:
        r"""Residuals :math:`R = \bar\ell^{\kappa/2}` and :math:`M = \partial R/\partial\theta` from per-sample losses.

        :math:`\bar\ell` averages ``microbatch`` consecutive losses (the last group may be
        smaller); :math:`\partial R/\partial\theta = \tfrac\kappa2 \bar\ell^{\kappa/2-1}\,
        \partial\bar\ell/\partial\theta`
        (zero rows where :math:`\bar\ell = 0`, a condition already met).
        """
        losses, dlosses = self._group(losses, dlosses)
        if self.kappa == 2:
            return losses, dlosses
        h = self.kappa / 2
        pos = losses > 0
        safe = torch.where(pos, losses, torch.ones_like(losses))
        R = torch.where(pos, safe**h, torch.zeros_like(losses))
        coef = torch.where(pos, h * safe ** (h - 1), torch.zeros_like(losses))
        return R, coef[:, None] * dlosses

    def _group(self, vals: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        m = self.microbatch
        if m == 1:
            return vals, rows
        n = vals.shape[0]
        gid = torch.arange(n, device=vals.device) // m
        G = (n + m - 1) // m  # groups, computed on the host (no device sync)
        cnt = torch.zeros(G, dtype=vals.dtype, device=vals.device).index_add_(0, gid, torch.ones_like(vals))
        v = torch.zeros(G, dtype=vals.dtype, device=vals.device).index_add_(0, gid, vals) / cnt
        r = torch.zeros(G, rows.shape[1], dtype=rows.dtype, device=rows.device).index_add_(0, gid, rows)
        return v, r / cnt[:, None]

    def system(self, problem: Problem, x: Tensor, batch: Any, index: Tensor | None) -> tuple[Tensor, Tensor]:
        """Residuals ``R`` and their Jacobian ``M`` (columns restricted to ``index``) on one batch.

        Args:
            problem: a :class:`~curvlab.SupervisedLoss` or :class:`~curvlab.LeastSquares`.
            x: flat parameters.
            batch: the batch (``ALL`` for single-batch data).
            index: the step's parameter subset, or ``None``.

        Returns:
            ``(R, M)`` of shapes ``(conditions,)`` and ``(conditions, P')``.
        """
        if isinstance(problem, LeastSquares):
            r, J, _ = residual_rows(problem, x, batch, self.chunk_size, index, self.jacobian)
            return self._group(r, J)
        losses, dl = supervised_losses(problem, x, batch, self.jacobian, self.chunk_size, index)
        return self.conditions(losses, dl)

    def direction(
        self, M: Tensor, R: Tensor, index: Tensor | None, vars_: dict[str, Any], generator: torch.Generator
    ) -> tuple[Tensor, dict[str, Any], dict[str, Any]]:
        """The raw Sven update (before ``-lr``) on the parameters in ``index`` (also used by curvlab.optim.Sven).

        Args:
            M: ``(conditions, P')`` Jacobian of the conditions.
            R: ``(conditions,)`` residuals.
            index: the step's parameter subset (``None``: all ``P`` parameters).
            vars_: ``{"v": RMSProp second moment or None, "buf": momentum or None, "size": P}``.
            generator: random generator of the randomized SVD sketch.

        Returns:
            ``(delta, new_vars, log)``: the raw step on the parameters in ``index``, the updated
            RMSProp buffers, and ``{"rank", "sigma_max", "conditions"}``.
        """
        v, buf = vars_.get("v"), vars_.get("buf")
        k = self.k if self.k is not None else max(1, M.shape[0] // 2)
        D = None
        if self.rmsprop == "pre":
            g = M.mean(0)
            if v is None:
                v = torch.zeros(self._full_size(vars_, M), dtype=M.dtype, device=M.device)
            v = v.clone()
            sel = slice(None) if index is None else index
            v[sel] = self.rmsprop_alpha * v[sel] + (1 - self.rmsprop_alpha) * g**2
            D = 1.0 / (v[sel].sqrt() + self.rmsprop_eps)
            M = M * D
        U, S, V = truncated_pinv(M, k, self.rtol, self.atol, self.svd, self.n_oversample, self.n_power, generator)
        delta = sven_direction(M, R, U, S, V)
        if D is not None:
            delta = D * delta
        if self.rmsprop == "post":
            if v is None:
                v = torch.zeros(self._full_size(vars_, M), dtype=M.dtype, device=M.device)
            v = v.clone()
            sel = slice(None) if index is None else index
            v[sel] = self.rmsprop_alpha * v[sel] + (1 - self.rmsprop_alpha) * delta**2
            delta = delta / (v[sel].sqrt() + self.rmsprop_eps)
            if self.rmsprop_momentum > 0:
                if buf is None:
                    buf = torch.zeros_like(v)
                buf = buf.clone()
                buf[sel] = self.rmsprop_momentum * buf[sel] + delta
                delta = buf[sel]
        smax = float(S[0]) if S.numel() else 0.0
        log = {"rank": int(S.numel()), "sigma_max": smax, "conditions": int(M.shape[0])}
        return delta, {"v": v, "buf": buf}, log

    @staticmethod
    def _full_size(vars_: dict[str, Any], M: Tensor) -> int:
        return int(vars_.get("size", M.shape[1]))

    # ------------------------------------------------------------------ solver
    def init(self, problem: Problem) -> dict[str, Any]:
        return fresh_state(problem, v=None, buf=None)

    def step(self, problem: Problem, state: dict[str, Any]) -> dict[str, Any]:
        x = state["x"]
        batch = state_batch(problem, state)
        gen = self.generator(state["iter"], x.device)
        index = self.subset(problem.spec.numels, gen, x.device)
        R, M = self.system(problem, x, batch, index)
        matvecs = state["matvecs"] + M.shape[0]
        if not (bool(torch.isfinite(R).all()) and bool(torch.isfinite(M).all())):
            return {
                **state,
                "matvecs": matvecs,
                "status": "nan",
                "message": f"non-finite residuals or Jacobian at iteration {int(state['iter'])}; "
                "returning the last finite parameters",
            }
        vars_ = {"v": state["v"], "buf": state["buf"], "size": x.numel()}
        delta, new_vars, log = self.direction(M, R, index, vars_, gen)
        x_new = x - self.lr * delta if index is None else x.index_add(0, index, -self.lr * delta)
        nb, draws = next_batch(problem, state["draws"])
        new = point(problem, x_new, nb)
        log["update_norm"] = float(self.lr * delta.norm()) if math.isfinite(float(delta.norm())) else float("nan")
        return {
            **state,
            **new,
            **new_vars,
            "iter": state["iter"] + 1,
            "step_size": float(self.lr),
            "draws": draws,
            "matvecs": matvecs,
            "log": log,
        }
