r"""Gauss-Newton with Levenberg-Marquardt damping chosen by Moré's trust-region rule.

J. J. Moré, "The Levenberg-Marquardt algorithm: implementation and theory", in Numerical
Analysis (G. A. Watson, ed.), Lecture Notes in Mathematics 630, Springer 1978, pp. 105-116
(the algorithm of MINPACK's ``lmder``).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

from ..checks import int_fields, positive_fields
from ..linalg import cg
from ..linops import gram
from ..problems import ALL, LeastSquares, Problem
from ._base import Solver, options
from ._jacobians import JACOBIAN_MODES, residual_rows
from .damping import RatioDamping, interpolated_increase

__all__ = ["GaussNewton", "lm_parameter", "DEFAULT_TOL"]

_METHODS = ("auto", "dense", "gram", "cg")
#: Moré's (MINPACK ``lmder``) ratio rule: thresholds 0.25 / 0.75, λ halved on a good step, multiplied by
#: the interpolated factor in [2, 10] on a poor one (radius: the inverse)
_MORE = RatioDamping.preset("more")
_DWARF = 1e-300
#: default ftol, xtol and gtol: MINPACK's recommended sqrt(float64 eps), scipy.optimize.leastsq's defaults
DEFAULT_TOL = math.sqrt(torch.finfo(torch.float64).eps)


def _qnorm(S: Any, c: Any, lam: float, cut: Any) -> tuple[float, float]:
    r"""``‖q(λ)‖`` and :math:`w = \sum s^2c^2/(s^2+λ)^3` for :math:`q_i = s_ic_i/(s_i^2+λ)`.

    ``S``, ``c``, ``cut`` are tensors, or Python lists for small systems (no per-call tensor overhead).
    """
    if isinstance(S, list):
        qq = w = 0.0
        for s_, c_, k in zip(S, c, cut):
            if lam == 0:
                if k:
                    qq += (c_ / s_) ** 2
                    w += c_ * c_ / s_**4
            else:
                den = s_ * s_ + lam
                sc = s_ * c_
                qq += (sc / den) ** 2
                w += sc * sc / den**3
        return math.sqrt(qq), w
    if lam == 0:
        Sk, ck = S[cut], c[cut]
        q = ck / Sk
        w = float(((ck**2) / Sk**4).sum())
    else:
        den = S**2 + lam
        q = S * c / den
        w = float(((S * c) ** 2 / den**3).sum())
    return float(q.norm()), w


#: each restart after parameter evaporation divides the initial radius factor by this
_RESTART_SHRINK = 0.01


def _lost_words(lost: list[int]) -> str:
    return f"parameter(s) {lost} no longer changing the residuals (Jacobian column <= sqrt(eps) of its largest norm)"


#: systems up to this size run Moré's parameter iteration on Python floats (one host transfer, no tensor calls)
_SMALL = 64


def lm_parameter(S: Tensor, c: Tensor, delta: float, par0: float, full_rank: bool) -> float:
    r"""Moré's Levenberg-Marquardt parameter for the trust region ``‖q‖ <= Δ`` (Moré 1978; MINPACK ``lmpar``).

    With the (scaled) Jacobian :math:`J_s = U\operatorname{diag}(s)V^\top` and :math:`c = U^\top r`,
    the step :math:`q(\lambda) = -(J_s^\top J_s + \lambda I)^{-1}J_s^\top r` has
    :math:`\|q(\lambda)\|^2 = \sum_i s_i^2c_i^2/(s_i^2+\lambda)^2`. Returns :math:`\lambda = 0` when the
    Gauss-Newton step (minimum norm for rank-deficient :math:`J_s`) satisfies
    :math:`\|q(0)\| \le 1.1\Delta`, otherwise a :math:`\lambda > 0` with
    :math:`|\|q(\lambda)\| - \Delta| \le 0.1\Delta` from Hebden's safeguarded Newton iteration on
    :math:`1/\|q(\lambda)\| - 1/\Delta` (at most 10 iterations, as MINPACK), started from ``par0``.

    Args:
        S: singular values of :math:`J_s`, descending.
        c: :math:`U^\top r`.
        delta: trust-region radius :math:`\Delta > 0`.
        par0: the previous parameter (initial guess).
        full_rank: whether :math:`J_s` has full column rank (enables the lower bound).

    Returns:
        :math:`\lambda \ge 0`.
    """
    return _lm_parameter(S, c, delta, par0, full_rank)[0]


def _lm_parameter(
    S: Any, c: Any, delta: float, par0: float, full_rank: bool, eps: float | None = None
) -> tuple[float, float, float]:
    r""":func:`lm_parameter`, the length :math:`\|q(0)\|` of the (minimum-norm) Gauss-Newton step and the
    decrease of :math:`\|r\|^2` it predicts, :math:`\sum_{s_i > 0} c_i^2`.

    ``S`` and ``c`` may be Python lists (then ``eps``, the precision, is required)."""
    n = len(S) if isinstance(S, list) else S.numel()
    if n == 0:
        return 0.0, 0.0, 0.0
    if eps is None:
        eps = torch.finfo(S.dtype).eps
    if n <= _SMALL:
        Sl, cl_ = (S, c) if isinstance(S, list) else (S.tolist(), c.tolist())
        cutl = [v > eps * Sl[0] * n for v in Sl] if Sl[0] > 0 else [False] * n
        any_cut, all_cut = any(cutl), all(cutl)
        gnorm = math.sqrt(sum((a * b) ** 2 for a, b in zip(Sl, cl_)))
        gn_model = sum(v * v for v, k in zip(cl_, cutl) if k)
        S, c, cut = Sl, cl_, cutl  # type: ignore[assignment]
    else:
        cut = S > eps * S[0] * n if S[0] > 0 else torch.zeros_like(S, dtype=torch.bool)
        any_cut, all_cut = bool(cut.any()), bool(cut.all())
        gnorm = float((S * c).norm())
        gn_model = float((c[cut] ** 2).sum())
    if not any_cut:
        return 0.0, 0.0, 0.0
    dxnorm, w0 = _qnorm(S, c, 0.0, cut)
    gn_norm = dxnorm
    fp = dxnorm - delta
    if fp <= 0.1 * delta:
        return 0.0, gn_norm, gn_model
    parl = fp / delta * dxnorm**2 / w0 if (full_rank and all_cut and w0 > 0) else 0.0
    paru = gnorm / delta
    if paru == 0:
        paru = _DWARF / min(delta, 0.1)
    par = min(max(par0, parl), paru)
    if par == 0:
        par = gnorm / dxnorm
    for it in range(1, 11):
        if par == 0:
            par = max(_DWARF, 0.001 * paru)
        dxnorm, w = _qnorm(S, c, par, cut)
        temp, fp = fp, dxnorm - delta
        if abs(fp) <= 0.1 * delta or (parl == 0 and fp <= temp < 0) or it == 10:
            break
        parc = fp / delta * dxnorm**2 / w if w > 0 else 0.0
        if fp > 0:
            parl = max(parl, par)
        if fp < 0:
            paru = min(paru, par)
        par = max(parl, par + parc)
    return par, gn_norm, gn_model


def _step_coefficients(S: list[float], c: list[float], par: float, eps: float) -> list[float]:
    """:math:`w_i = s_ic_i/(s_i^2+λ)`; for λ = 0 the minimum-norm :math:`c_i/s_i` (0 below ``eps·s_1·n``)."""
    n = len(S)
    if par == 0:
        thr = eps * S[0] * n if n and S[0] > 0 else math.inf
        return [ci / si if si > thr else 0.0 for si, ci in zip(S, c)]
    return [si * ci / (si * si + par) for si, ci in zip(S, c)]


@options
class GaussNewton(Solver):
    r"""Gauss-Newton with Levenberg-Marquardt damping for :class:`~curvlab.LeastSquares` (Moré 1978).

    Each iteration solves the damped Gauss-Newton system for the residuals :math:`r(x)` and
    their Jacobian :math:`J`,

    .. math::
        (J^\top J + \lambda D^2)\,p = -J^\top r \quad\Longleftrightarrow\quad
        p = -D^{-2}J^\top (J D^{-2} J^\top + \lambda I)^{-1} r \;\text{(Duncan-Guttman)},

    and accepts :math:`x + p` when the ratio :math:`\rho` of actual to predicted reduction of
    :math:`\|r\|^2` is at least :math:`10^{-4}`. The damping follows Moré's trust-region rule
    (Moré 1978, the step-bound update; MINPACK ``lmder``): a radius :math:`\Delta` (initially
    ``factor``·:math:`\|Dx_0\|`) shrinks by a factor in [0.1, 0.5] when :math:`\rho \le 0.25` and is
    set to :math:`2\|Dp\|` when :math:`\rho \ge 0.75` (or :math:`\lambda = 0`), and :math:`\lambda` is
    the Levenberg-Marquardt parameter of that radius (:func:`lm_parameter`; :math:`\lambda = 0`,
    a pure Gauss-Newton step, whenever it fits, so convergence is quadratic on
    zero-residual problems). :math:`D` holds the running maxima of the column norms of
    :math:`J` (Moré's scale invariance; ``scale=False`` uses :math:`D = I`).

    The linear algebra picks the cheaper exact form (``method="auto"``):

    * ``"dense"`` — :math:`J` materialised (forward mode when there are fewer parameters
      than residuals, batched vjps otherwise) and the thin SVD of :math:`JD^{-1}` taken once
      per Jacobian; it solves the parameter-sized system when :math:`m \ge n` and the
      residual-sized (Duncan-Guttman) one when :math:`m < n`, without forming
      :math:`J^\top J` (whose condition number is squared), and gives Moré's :math:`\lambda`
      for any :math:`\Delta` in closed form. Chosen when :math:`n \le` ``dense_max``.
    * ``"gram"`` — fewer residuals than parameters, many parameters: the ``m × m`` Gram
      matrix :math:`JJ^\top` is formed by ``m`` vjps of the matrix-free
      :class:`~curvlab.linops.JacobianOperator` and factored by ``eigh``;
      :math:`p = -J^\top U\operatorname{diag}(1/(s^2+\lambda))U^\top r` (one more vjp), Moré's
      rule with :math:`D = I`. Chosen when :math:`m \le` ``gram_max`` :math:`< n`.
    * ``"cg"`` — both large: :math:`(J^\top J + \lambda I)p = -J^\top r` by conjugate gradients
      on the matrix-free operators (:math:`Jv` by a double vjp, :math:`J^\top u` by a vjp), and
      :math:`\lambda` itself updated with Moré's factors (divided by the radius shrink factor
      on a poor step, halved on a good one, at least ``damping`` after a poor step).

    Stopping: MINPACK's three tests (``lmder``; Moré, Garbow & Hillstrom, *User Guide for
    MINPACK-1*, 1980, §2.3), each ending the run with ``status="converged"`` and a message naming it:

    * ``ftol`` — the actual and the predicted relative reductions of :math:`\|r\|^2` in one step are
      both at most ``ftol`` (and :math:`\rho \le 2`): the sum of squares is within about ``ftol``
      (relative) of its minimum — for nonzero-residual problems the parameters are then accurate to
      about :math:`\sqrt{\text{ftol}}` only;
    * ``xtol`` — the trust radius :math:`\Delta \le` ``xtol``·:math:`\|Dx\|`: the relative step is at most
      ``xtol``;
    * ``gtol`` — the largest cosine between the residual vector and a column of :math:`J`,
      :math:`\max_j |(J^\top r)_j| / (\|J_{:,j}\|\,\|r\|) \le` ``gtol`` (checked after every new Jacobian,
      including the first; ``"dense"`` only);

    defaults :data:`DEFAULT_TOL` = 1.49e-8 (MINPACK's recommended :math:`\sqrt{\varepsilon}` of float64,
    scipy's ``leastsq`` defaults), raised to the dtype's :math:`\varepsilon` when that is coarser (float32:
    1.19e-7); explicit values below :math:`\varepsilon` are raised to it with a warning (MINPACK would end
    with "tolerance too small"); ``ftol=0`` / ``gtol=0`` switch a test off. ``solve()``'s gradient test
    (``tol`` / ``rtol`` on :math:`\|J^\top r\|/n`) applies only when given explicitly. A zero residual stops
    at once. Trial points with non-finite residuals are never accepted (the radius shrinks); if they persist
    until the radius collapses, the run stops with ``status="nan"``.

    Where MINPACK can report success away from a minimum, the ``ftol`` and ``xtol`` tests count only at a
    point that is nearly stationary (``"dense"`` / ``"gram"``): the full (minimum-norm) Gauss-Newton step's
    relative length :math:`\|Dp_{GN}\|/\|Dx\|` (for ``xtol``) or its predicted relative reduction
    :math:`\|Jp_{GN}\|^2/\|r\|^2` (for ``ftol``), or else the gtol cosine, is at most the square root of that
    tolerance. A radius that collapsed only because the model was poor at every radius tried (MINPACK's
    false ``info=2`` on NIST MGH17 from start 1, along a near-null direction of :math:`J` with a tiny scale
    :math:`D`) keeps shrinking until a step is accepted; if it reaches :math:`\varepsilon\|Dx\|` first the run
    ends ``status="stalled"`` (e.g. a wrong hand-written derivative). Near every minimum the NIST and MGH
    problems reach, these extra conditions hold with orders of magnitude to spare: the stops there are MINPACK's.

    Parameter evaporation (Transtrum, Machta & Sethna, *Geometry of nonlinear least squares with applications
    to sloppy models and optimization*, Phys. Rev. E 83, 036701, 2011): a run can end on a plateau
    where some parameter no longer affects the model (NIST BoxBOD from start 1: MINPACK's first step sends
    :math:`b_2` to 111, where :math:`e^{-b_2x}` vanishes, and every test holds there). When a convergence
    stop finds Jacobian columns at most :math:`\sqrt\varepsilon` times their largest norm in the run, the run
    restarts from ``x0`` with ``factor`` divided by 100 (1 after the default 100, inside the interval [0.1, 100]
    the MINPACK-1 User Guide recommends for it), up to ``restarts`` times, and returns the end with the
    smaller :math:`\|r\|`; the message says so and names evaporated parameters that remain (the status is
    still ``"converged"``: the gradient vanishes there, a stationary point at infinity).

    Beyond MINPACK, when ``ftol`` is set below :math:`\sqrt\varepsilon` (tighter than function values
    resolve; with the defaults the run is MINPACK's): once the model predicts a relative reduction below
    :math:`\sqrt\varepsilon` (near a
    nonzero-residual minimum, where :math:`\rho` is rounding noise) a step is accepted iff it lowers the
    scaled gradient :math:`\|D^{-1}J^\top r\|` without raising :math:`\|r\|^2` by more than 1e-10 relative,
    and an ``ftol`` below :math:`\sqrt\varepsilon` counts only once such steps stop; with tight tolerances the
    iterates reach the accuracy the gradient resolves (about :math:`\varepsilon\cdot\kappa`) rather than the
    :math:`\sqrt\varepsilon` that function values resolve (``benchmarks/nist.py``: NIST StRD).

    Args:
        factor: initial radius factor (MINPACK: 100).
        scale: Moré's variable scaling :math:`D` (MINPACK ``mode=1``).
        ftol: relative reduction tolerance (``None``: :data:`DEFAULT_TOL`, at least the dtype's eps).
        xtol: relative step tolerance (``None``: the same).
        gtol: cosine (scaled gradient) tolerance (``None``: the same). ``ftol=0`` or ``gtol=0``
            switches that test off; ``xtol`` is at least eps (a radius collapsed to eps·‖Dx‖ always ends the run).
        method: ``"auto"``, ``"dense"``, ``"gram"`` or ``"cg"``.
        dense_max: largest parameter count for ``"dense"`` under ``"auto"``.
        gram_max: largest residual count for ``"gram"`` under ``"auto"``.
        damping: initial :math:`\lambda` of ``"cg"`` (and its floor after a rejected step).
        cg_tol: relative CG tolerance.
        cg_maxiter: CG iteration cap.
        jacobian: how ``"dense"`` materialises :math:`J`: ``"auto"`` (forward or reverse mode by
            shape, exact for any residuals) or ``"per_sample"`` (``vmap`` over the samples of each
            batch, much cheaper for data fitting, where residual row ``i`` belongs to sample ``i``).
        chunk_size: Jacobian products per vectorised pass (``None``: by a memory budget).
        restarts: how many restarts from ``x0`` with a 100× smaller ``factor`` a convergence stop with
            evaporated parameters triggers (``"dense"``; 0: MINPACK's behaviour, a single run).

    Example:
        >>> import torch, curvlab as cl
        >>> rosen = cl.LeastSquares(lambda x: torch.stack([10 * (x[1] - x[0] ** 2), 1 - x[0]]),
        ...                         torch.tensor([-1.2, 1.0], dtype=torch.float64))
        >>> r = cl.solvers.GaussNewton().solve(rosen, max_iter=100)
        >>> str(r.status), [round(v, 10) for v in r.params.tolist()]
        ('converged', [1.0, 1.0])
    """

    factor: float = 100.0
    scale: bool = True
    xtol: float | None = None
    ftol: float | None = None
    gtol: float | None = None
    method: str = "auto"
    dense_max: int = 2000
    gram_max: int = 4000
    damping: float = 1e-3
    cg_tol: float = 1e-6
    cg_maxiter: int = 250
    jacobian: str = "auto"
    chunk_size: int | None = None
    restarts: int = 1

    problem_types = (LeastSquares,)

    def __post_init__(self) -> None:
        positive_fields(self, "factor", "damping", "cg_tol")
        positive_fields(self, "xtol", "ftol", "gtol", allow_zero=True, optional=True)
        if self.jacobian not in JACOBIAN_MODES:
            raise ValueError(f"GaussNewton.jacobian must be one of {JACOBIAN_MODES}, got {self.jacobian!r}")
        if self.method not in _METHODS:
            raise ValueError(f"GaussNewton.method must be one of {_METHODS}, got {self.method!r}")
        int_fields(self, "dense_max", "gram_max", "cg_maxiter")
        int_fields(self, "restarts", minimum=0)
        int_fields(self, "chunk_size", optional=True)

    # ------------------------------------------------------------------ helpers
    def _method(self, problem: LeastSquares, m: int) -> str:
        if self.method != "auto":
            return self.method
        n = problem.spec.size
        if n <= self.dense_max:
            return "dense"
        if m < n and m <= self.gram_max:
            return "gram"
        return "cg"

    def default_rtol(self, dtype: torch.dtype) -> float | None:
        """``None``: MINPACK's ``ftol/xtol/gtol`` are GaussNewton's default stopping tests."""
        return None

    def tolerances(self, dtype: torch.dtype, warn: bool = False) -> tuple[float, float, float]:
        """``(ftol, xtol, gtol)`` in use for parameters of ``dtype``: defaults :data:`DEFAULT_TOL`, at least ``eps``."""
        eps = torch.finfo(dtype).eps
        out = []
        for name in ("ftol", "xtol", "gtol"):
            v = getattr(self, name)
            if v is None:
                v = max(DEFAULT_TOL, eps)
            elif 0 < v < eps or (v == 0 and name == "xtol"):
                if warn and v > 0:
                    warnings.warn(
                        f"GaussNewton.{name}={v:g} is below the {dtype} precision; using eps={eps:.3g}", stacklevel=3
                    )
                v = eps
            out.append(float(v))
        return out[0], out[1], out[2]

    def _at(
        self,
        problem: LeastSquares,
        x: Tensor,
        method: str,
        n: int,
        diag: Tensor | None,
        colmax: Tensor | None = None,
    ) -> dict[str, Any]:
        """Residuals, value and gradient at ``x`` (``n`` residual rows), with the factorisation of the new Jacobian.

        ``"dense"``: the thin SVD of :math:`JD^{-1}`, :math:`D` updated to the running maxima of the
        column norms (MINPACK ``mode=1``), and MINPACK's scaled-gradient cosine ``gnorm``; ``"gram"``: the
        eigenpairs of :math:`JJ^\top`. Both are kept in the state for the trial steps of the same Jacobian
        (a rejected step costs one residual evaluation, as in MINPACK).
        """
        gnorm = fnorm = math.nan
        small: tuple[Tensor, float] | None = None
        if method == "dense":
            if self.jacobian == "auto" and not problem.distributed and self.chunk_size is None:
                # the matrix-free Jacobian operator materialised from its cheaper side (P double-vjp products
                # over one recorded graph when there are fewer parameters than residuals): the same J as
                # residual_rows' forward mode, measured 1.3-2x cheaper on small CPU problems (NIST StRD)
                Jop = problem.jacobian(x, ALL)
                r, J = Jop.residuals.reshape(-1), Jop.to_dense()
            else:
                r, J, _ = residual_rows(problem, x, ALL, self.chunk_size, mode=self.jacobian)
            g = J.T @ r
            col = J.norm(dim=0)
            if not self.scale:
                diag = torch.ones_like(col)
            elif diag is None:
                diag = torch.where(col > 0, col, torch.ones_like(col))
            else:
                diag = torch.maximum(diag, col)
            colmax = col if colmax is None else torch.maximum(colmax, col)
            extra: dict[str, Any] = {"svd": None, "diag": diag, "col": col, "colmax": colmax}
            rn = r.norm()
            # one host sync for the finiteness check and the gtol cosine (MINPACK lmder: max_j |J_jᵀr| / (‖J_j‖‖r‖));
            # J is finite iff its column norms are (an overflowing norm counts as non-finite)
            tiny = torch.finfo(r.dtype).tiny
            if g.numel() <= _SMALL:
                vals = torch.cat([g, col, rn.reshape(1)]).tolist()
                k = g.numel()
                gl, coll, fnorm = vals[:k], vals[k : 2 * k], vals[2 * k]
                finite_J = all(math.isfinite(v) for v in coll)
                cosmax = max((abs(a) / max(b * fnorm, tiny) for a, b in zip(gl, coll) if b > 0), default=0.0)
                small = (r.new_tensor(0.5 * fnorm * fnorm / n), math.sqrt(sum(a * a for a in gl)) / n)
            else:
                cos = torch.where(col > 0, g.abs() / (col * rn).clamp_min(tiny), torch.zeros_like(g))
                fin_gn = torch.stack([col.isfinite().all().to(r.dtype), cos.max() if cos.numel() else rn * 0, rn])
                finite_J, cosmax, fnorm = fin_gn.tolist()
                finite_J = finite_J == 1.0
            if finite_J:  # else the loop stops on the non-finite gradient
                # a plain tuple, not torch.return_types.linalg_svd: the state must load with torch.load's
                # default weights_only=True
                extra["svd"] = tuple(torch.linalg.svd(J / diag, full_matrices=False))
                gnorm = cosmax
        else:
            Jop = problem.jacobian(x, ALL)
            r = Jop.residuals
            g = Jop.rmatvec(r)
            extra = {"svd": None, "diag": torch.ones_like(x) if diag is None else diag}
            if method == "gram":
                K = gram(Jop).to_dense()
                if bool(torch.isfinite(K).all()):
                    w, U = torch.linalg.eigh(0.5 * (K + K.T))
                    extra["svd"] = (U.flip(1), w.flip(0).clamp_min(0).sqrt(), None)
        grad = g / n
        if small is not None:
            value, grad_norm = small[0], r.new_tensor(small[1])
        else:
            value, grad_norm = 0.5 * torch.dot(r, r) / n, grad.norm()
        if not math.isfinite(fnorm):
            fnorm = float(r.norm())
        out = {"x": x, "res": r, "value": value, "grad": grad, "grad_norm": grad_norm, "gnorm": gnorm, **extra}
        out["fnorm"] = fnorm
        return out

    def _gtol_stop(self, state: dict[str, Any], gtol: float) -> None:
        """MINPACK's gtol test on a state with a new Jacobian (sets ``status`` in place)."""
        gn = state.get("gnorm", math.nan)
        if gtol > 0 and gn <= gtol:
            state.update(
                status="converged",
                message=f"the cosine of the residuals and the Jacobian columns {gn:.3g} <= gtol={gtol:.3g}",
            )

    def _lost(self, state: dict[str, Any]) -> list[int]:
        """Parameters that no longer change the residuals: Jacobian column <= √eps of its largest norm in the run."""
        col, colmax = state.get("col"), state.get("colmax")
        if col is None or colmax is None:
            return []
        eps = torch.finfo(col.dtype).eps
        return torch.nonzero((colmax > 0) & (col <= math.sqrt(eps) * colmax)).flatten().tolist()

    def _settle(self, problem: LeastSquares, new: dict[str, Any]) -> dict[str, Any]:
        """A convergence stop: restart from ``x0`` with a smaller radius if parameters evaporated, keep the best end."""
        lost = self._lost(new)
        best, k = new.get("best"), int(new.get("restarts", 0))
        end = {"x": new["x"], "fnorm": new["fnorm"], "message": new["message"], "lost": lost}
        end.update(diag=new["diag"], colmax=new.get("colmax"))
        if lost and k < self.restarts:
            if best is None or end["fnorm"] < best["fnorm"]:
                best = end
            new.update(self._at(problem, problem.x0.clone(), new["method"], new["n_rows"], None))
            new.update(status=None, message=None, delta=None, par=0.0, accepted=0, restarts=k + 1, best=best)
            new["log"]["restart"] = k + 1
            return new
        note = ""
        if best is not None:
            if best["fnorm"] < end["fnorm"]:
                new.update(self._at(problem, best["x"], new["method"], new["n_rows"], best["diag"], best["colmax"]))
                note = f"; {k} restart(s) from x0 with smaller initial radii ended higher (‖r‖={end['fnorm']:.6g})"
                end = best
            else:
                f_k = self.factor * _RESTART_SHRINK**k
                note = (
                    f" (after restart {k} from x0 with factor={f_k:g}: an earlier run had ended at "
                    f"‖r‖={best['fnorm']:.6g} with {_lost_words(best['lost'])})"
                )
        if end["lost"]:
            note += f"; {_lost_words(end['lost'])}: a stationary point at infinity (parameter evaporation)"
        new.update(status="converged", message=end["message"] + note)
        return new

    @staticmethod
    def _tensor_step(
        problem: LeastSquares,
        x: Tensor,
        r: Tensor,
        method: str,
        U: Tensor,
        S: Tensor,
        Vh: Tensor | None,
        c: Tensor,
        delta: float,
        par: float,
        full_rank: bool,
        diag: Tensor,
        matvecs: int,
        eps: float,
    ) -> tuple[float, float, float, Tensor, float, float, int]:
        """The damped step from the factorisation on tensors (large ``"dense"`` systems and ``"gram"``).

        Returns ``(λ, ‖q(0)‖, GN-predicted decrease, p, ‖Dp‖, ‖Jp‖, matvecs)``.
        """
        par, gn_norm, gn_model = _lm_parameter(S, c, delta, par, full_rank)
        if par == 0:
            cut = S > eps * S[0] * S.numel() if S.numel() and S[0] > 0 else torch.zeros_like(S, dtype=torch.bool)
            coef = torch.where(cut, 1.0 / torch.where(cut, S, torch.ones_like(S)), torch.zeros_like(S))
        else:
            coef = S / (S**2 + par)
        if method == "dense":
            assert Vh is not None
            q = -(Vh.T @ (coef * c))  # scaled step D p
            p = q / diag
            Jp = U @ (S * (Vh @ q))
        else:  # gram: p = -Jᵀz, Jp = -JJᵀz
            z = U @ (coef / torch.where(S > 0, S, torch.ones_like(S)) * c)
            p = -problem.jacobian(x, ALL).rmatvec(z)
            Jp = -(U @ (S**2 * (U.T @ z)))
            matvecs += 1
            q = p
        jpnorm, pnorm = torch.stack([Jp.norm(), q.norm()]).tolist()
        return par, gn_norm, gn_model, p, pnorm, jpnorm, matvecs

    @staticmethod
    def _near_stationary(state: dict[str, Any], gn_measure: float, tol: float) -> bool:
        """Whether MINPACK's ``xtol`` / ``ftol`` test may count: the full Gauss-Newton step's relative length /
        predicted relative reduction (``gn_measure``) or the gradient cosine at most ``√tol``."""
        root = math.sqrt(tol)
        return gn_measure <= root or state.get("gnorm", math.nan) <= root

    # ------------------------------------------------------------------ solver
    def init(self, problem: Problem) -> dict[str, Any]:
        assert isinstance(problem, LeastSquares)
        x = problem.x0.clone()
        n = problem.n_rows(ALL)
        m = problem.residuals(x, ALL).numel() if self.method == "auto" else n
        method = self._method(problem, m)
        ftol, xtol, gtol = self.tolerances(x.dtype, warn=True)
        state = self._at(problem, x, method, n, None)
        state.update(
            iter=0,
            matvecs=0,
            step_size=0.0,
            draws=0,
            status=None,
            log={},
            method=method,
            n_rows=n,
            delta=None,
            par=0.0 if method != "cg" else float(self.damping),
            accepted=0,
            nonfinite=0,
            restarts=0,
            best=None,
        )
        if float(state["value"]) == 0.0:
            state.update(status="converged", message="zero residual")
        else:
            self._gtol_stop(state, gtol)
        return state

    def step(self, problem: Problem, state: dict[str, Any]) -> dict[str, Any]:
        assert isinstance(problem, LeastSquares)
        x, r = state["x"], state["res"]
        fnorm = state["fnorm"] if "fnorm" in state else float(r.norm())
        ftol, xtol, gtol = self.tolerances(x.dtype)
        eps = torch.finfo(x.dtype).eps
        method = state["method"]
        par, delta, diag = float(state["par"]), state["delta"], state["diag"]
        matvecs = state["matvecs"]
        if fnorm == 0.0:
            return {**state, "status": "converged", "message": "zero residual"}

        gn_norm = gn_model = 0.0
        if method == "cg":
            Jop = problem.jacobian(x, ALL)
            A = lambda v: Jop.rmatvec(Jop.matvec(v)) + par * v  # noqa: E731
            res = cg(A, -Jop.rmatvec(r), tol=self.cg_tol, maxiter=self.cg_maxiter)
            p = res.x
            matvecs += 2 * res.n_matvecs + 1
            Jp = Jop.matvec(p)
            jpnorm, pnorm = torch.stack([Jp.norm(), p.norm()]).tolist()
        else:
            U, S, Vh = tuple(state["svd"])
            full_rank = method == "dense" and S.numel() == x.numel()
            c = U.T @ r
            if delta is None:  # first iteration: MINPACK's initial radius
                xn = float((diag * x).norm())
                factor = self.factor * _RESTART_SHRINK ** state.get("restarts", 0)
                delta = factor * xn if xn > 0 else factor
            if method == "dense" and S.numel() <= _SMALL:
                # small systems: Moré's parameter, the step's coefficients and both norms on Python floats (one host
                # transfer); ‖Dp‖ = ‖w‖ and ‖Jp‖ = ‖s·w‖ for q = -Vᵀw, w = s·c/(s²+λ), V orthonormal
                Sl, cl_ = S.tolist(), c.tolist()
                par, gn_norm, gn_model = _lm_parameter(Sl, cl_, delta, par, full_rank, eps)
                w = _step_coefficients(Sl, cl_, par, eps)
                pnorm = math.sqrt(sum(v * v for v in w))
                jpnorm = math.sqrt(sum((a * v) ** 2 for a, v in zip(Sl, w)))
                q = -(Vh.T @ torch.tensor(w, dtype=S.dtype, device=S.device))
                p = q / diag
            else:
                par, gn_norm, gn_model, p, pnorm, jpnorm, matvecs = self._tensor_step(
                    problem, x, r, method, U, S, Vh, c, delta, par, full_rank, diag, matvecs, eps
                )
            if state["accepted"] == 0:
                delta = min(delta, pnorm)
        x_new = x + p
        with torch.no_grad():
            r_new = problem.residuals(x_new, ALL)
        fnorm1 = float(r_new.norm())
        finite_trial = math.isfinite(fnorm1)
        if not finite_trial:
            fnorm1 = math.inf
        actred = 1.0 - (fnorm1 / fnorm) ** 2 if 0.1 * fnorm1 < fnorm else -1.0
        t1 = jpnorm / fnorm
        t2 = math.sqrt(par) * pnorm / fnorm
        prered = t1**2 + t2**2 / 0.5
        dirder = -(t1**2 + t2**2)
        ratio = actred / prered if prered != 0 else 0.0

        # When the model predicts a negligible relative reduction of ‖r‖² (<= sqrt(eps), near a minimum with
        # nonzero residuals) the ratio is dominated by rounding: there a step is accepted iff it decreases the
        # gradient without increasing ‖r‖² beyond 1e-10 relative, so the iterates converge to the accuracy the
        # gradient allows (~eps·cond) rather than the ~sqrt(eps) that function values resolve.
        trial, by_gradient = None, False
        if finite_trial and prered <= math.sqrt(eps) and ftol < math.sqrt(eps):
            if actred >= -1e-10:  # (else rejected without the trial's Jacobian)
                trial = self._at(problem, x_new, method, state["n_rows"], diag, state.get("colmax"))
                # the gradient in the scaled variables D⁻¹g (scale-free, like every test here)
                g_old, g_new = (state["grad"] / diag).norm(), (trial["grad"] / diag).norm()
            if trial is not None and bool(g_new < g_old):
                ratio, by_gradient = max(ratio, 1.0), True
            else:
                ratio, trial = min(ratio, 0.0), None

        poor = _MORE.verdict(ratio) > 0
        inc = interpolated_increase(actred, dirder, blowup=0.1 * fnorm1 >= fnorm) if poor else None
        if method != "cg":
            delta = _MORE.radius(delta, pnorm, ratio, inc, undamped=par == 0)
        par = _MORE.update(par, ratio, inc)
        if method == "cg" and poor:
            par = max(par, self.damping)

        log = {"damping": par, "ratio": ratio, "radius": float(delta) if delta is not None else math.nan}
        new = {
            **state,
            "par": par,
            "delta": delta,
            "diag": diag,
            "matvecs": matvecs,
            "iter": state["iter"] + 1,
            "log": log,
            "nonfinite": 0 if finite_trial else state["nonfinite"] + 1,
        }
        accepted = ratio >= 1e-4
        if accepted:
            new.update(
                trial
                if trial is not None
                else self._at(problem, x_new, method, state["n_rows"], diag, state.get("colmax"))
            )
            new["accepted"] = state["accepted"] + 1
            new["step_size"] = pnorm if method == "cg" else float(p.norm())
        else:
            new["step_size"] = 0.0
        log["accepted"] = bool(accepted)

        # MINPACK's convergence tests (lmder): ftol, xtol, then gtol at the new Jacobian
        xnorm = float((new["diag"] * new["x"]).norm())
        if not finite_trial:
            small = delta is not None and delta <= xtol * xnorm if method != "cg" else par > 1e30
            if small or new["nonfinite"] >= 60:
                new.update(
                    status="nan",
                    message="the residuals are not finite at any trial point near x; "
                    "returning the last finite parameters",
                )
            return new
        if float(new["value"]) == 0.0:
            new.update(status="converged", message="zero residual")
        elif (
            ftol > 0
            and abs(actred) <= ftol
            and prered <= ftol
            and 0.5 * ratio <= 1
            and not by_gradient
            and self._near_stationary(new, gn_model / fnorm**2, ftol)
        ):
            # (below sqrt(eps) the reductions are rounding noise and certify nothing; while the gradient still
            # falls the run goes on; with ftol >= sqrt(eps) this is MINPACK's test, plus: the full Gauss-Newton
            # step must not promise a reduction above sqrt(ftol) unless the gradient cosine is below it: a small
            # predicted reduction only because the radius collapsed where the model is wrong is no convergence)
            new.update(status="converged", message=f"relative reduction of the sum of squares <= ftol={ftol:.3g}")
        elif (
            method != "cg" and delta <= xtol * xnorm and self._near_stationary(new, gn_norm / max(xnorm, _DWARF), xtol)
        ):
            # the radius collapsed and the model's own (Gauss-Newton) step or the gradient cosine is small as well:
            # the iterate sits at a stationary point. A collapsed radius with neither says only that the model was
            # poor at every radius tried (e.g. along a near-null direction of J with a tiny scale D): the radius
            # keeps shrinking until a step is accepted, or the run ends "stalled" at eps·‖Dx‖
            new.update(status="converged", message=f"relative step size <= xtol={xtol:.3g}")
        elif method != "cg" and not accepted and delta <= eps * xnorm:
            new.update(
                status="stalled",
                message=f"the trust radius collapsed to {delta:.3g} (eps·‖Dx‖) without an acceptable step while the "
                f"Gauss-Newton step is still {gn_norm / max(xnorm, _DWARF):.3g}·‖Dx‖ long (is the Jacobian right?)",
            )
        elif method == "cg" and accepted and pnorm <= xtol * xnorm:
            new.update(status="converged", message=f"relative step size <= xtol={xtol:.3g}")
        elif accepted:
            self._gtol_stop(new, gtol)
        if new.get("status") == "converged" and float(new["value"]) > 0:
            new = self._settle(problem, new)
        return new
