r"""One call for the numbers a practitioner asks about a curvature spectrum.

Trained networks' Hessians have a bulk of eigenvalues near zero and a few large
outliers, roughly as many as there are classes (Sagun, Bottou & LeCun 2017,
"Eigenvalues of the Hessian in deep learning: singularity and beyond";
Sagun et al. 2018; Papyan 2020, "Traces of class/cross-class structure pervade
deep learning spectra", JMLR 21). Negative eigenvalues measure how far the
point is from a minimum (Ghorbani, Krishnan & Xiao 2019 report the negative
mass and :math:`|\lambda_{\min}|/\lambda_{\max}`). :func:`summary` computes all of it:

* top eigenvalues and the smallest eigenvalue by thick-restart Lanczos (:func:`eigsh`);
* the trace with a standard error (:func:`trace`);
* the spectral density by SLQ (:func:`density`), and from it the fraction of
  negative eigenvalues (with a standard error and the bounds the quadrature
  guarantees) and the share of the spectrum's absolute mass that is negative;
* the outliers-versus-bulk split (see :func:`split_outliers`).

Every estimate carries its accuracy statement: eigenvalues their Lanczos
residuals and a convergence flag, the trace a standard error, the negative mass a
standard error over SLQ probes and Chebyshev–Markov–Stieltjes bounds
(:meth:`~curvlab.spectrum.Density.negative_mass_bounds`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from curvlab.checks import check_int, check_positive
from curvlab.status import Status

from ._common import Callback, Monitor, as_symmetric_operator, make_generator, nonfinite_error, zero_threshold
from .density import Density, _density
from .eigsh import EigshResult, _eigsh
from .trace import TraceResult, _trace

__all__ = ["SpectrumSummary", "summary", "split_outliers"]


def split_outliers(top_eigenvalues: Tensor, *, factor: float = 10.0, min_gap: float = 0.2) -> int:
    r"""Number of outliers among the top eigenvalues (descending): the last gap much wider than the bulk's.

    A trained network's curvature spectrum has a dense bulk and a few outliers,
    roughly one per class (Sagun et al. 2017; Papyan 2020). With relative gaps
    :math:`g_i = \lambda_i/\lambda_{i+1} - 1` between consecutive eigenvalues
    (:math:`\infty` where :math:`\lambda_{i+1} \le 0 < \lambda_i`), the typical gap at
    the bulk's top edge is the median :math:`\bar g` of the gaps in the lower half of
    the list. The outliers are :math:`\lambda_1, \dots, \lambda_{i^*}`, with :math:`i^*`
    the last :math:`i` whose gap satisfies
    :math:`g_i \ge \max(\text{factor}\cdot\bar g,\ \text{min\_gap})`; zero when none does.
    The typical gap is measured where the bulk is, so pass about twice as many
    eigenvalues as the outliers you expect (:func:`summary` does).

    Args:
        top_eigenvalues: ``(K,)`` largest eigenvalues in descending order, ``K >= 4``.
        factor: how many typical bulk gaps wide the outlier gap must be.
        min_gap: the smallest relative gap accepted (guards against a degenerate bulk).

    Returns:
        The number of outliers :math:`i^*`.

    Raises:
        ValueError: fewer than 4 eigenvalues, not 1-D or not in descending order,
            non-positive ``factor`` / ``min_gap``.
    """
    factor = check_positive(factor, "factor")
    min_gap = check_positive(min_gap, "min_gap")
    lam = top_eigenvalues.detach().double().cpu()
    if lam.ndim != 1 or lam.numel() < 4:
        raise ValueError(f"split_outliers needs a 1-D tensor of at least 4 eigenvalues, got shape {tuple(lam.shape)}")
    if bool((lam[1:] > lam[:-1]).any()):
        raise ValueError("top_eigenvalues must be sorted in descending order")
    K = lam.numel()
    gaps = []
    for i in range(K - 1):
        a, b = float(lam[i]), float(lam[i + 1])
        gaps.append(0.0 if a <= 0 else (math.inf if b <= 0 else a / b - 1.0))
    tail = [g for g in gaps[K // 2 :] if math.isfinite(g)]
    typical = float(torch.tensor(tail).median()) if tail else 0.0
    threshold = max(factor * typical, min_gap)
    hits = [i for i in range(K - 1) if gaps[i] >= threshold]
    return hits[-1] + 1 if hits else 0


@dataclass
class SpectrumSummary:
    r"""What :func:`summary` found. ``print(s)`` gives a readable table.

    Attributes:
        top_eigenvalues: ``(K,)`` largest eigenvalues, descending.
        top_eigenvalue: :math:`\lambda_{\max}`.
        smallest_eigenvalue: :math:`\lambda_{\min}`.
        trace: a :class:`~curvlab.spectrum.TraceResult` (estimate and standard error).
        negative_mass: estimated fraction of eigenvalues below zero (SLQ quadrature; 0 for an
            operator tagged PSD or whose smallest eigenvalue is certainly positive); biased
            when many eigenvalues crowd around zero, see :attr:`negative_mass_bounds`.
        negative_mass_bounds: ``(lower, upper)`` bounds on that fraction guaranteed by the
            quadrature (:meth:`~curvlab.spectrum.Density.negative_mass_bounds`); a wide
            interval means the near-zero bulk is not resolved.
        negative_mass_std_error: the sampling standard error over SLQ probes (``nan`` with one probe).
        negative_spectral_mass: :math:`\sum_{\lambda<0}|\lambda| / \sum|\lambda|` (SLQ), robust to
            that resolution limit.
        negative_ratio: :math:`|\min(\lambda_{\min}, 0)| / \lambda_{\max}` (Ghorbani et al. 2019);
            0 when :math:`\lambda_{\min}` is zero to rounding (see :attr:`zero_tol`).
        condition: :math:`\lambda_{\max}/\lambda_{\min}` when :math:`\lambda_{\min}` is positive
            beyond its error bound (the Lanczos residual) and beyond :attr:`zero_tol`, else
            ``inf`` (a singular operator).
        zero_tol: eigenvalues this small in magnitude count as zero: :math:`\sqrt n\,\varepsilon\,
            \|A\|` of the operator's dtype (the rounding level of a product, see
            :func:`summary`), or the ``zero_tol`` passed.
        n_outliers: number of outliers above the bulk (:func:`split_outliers`).
        outliers: ``(n_outliers,)`` their values.
        bulk_edge: the largest eigenvalue attributed to the bulk (``nan`` if unknown).
        density: the SLQ :class:`~curvlab.spectrum.Density` (``None`` when the callback stopped
            the run before it).
        converged: both eigenvalue runs met their tolerance.
        status: a :class:`~curvlab.Status`: ``"converged"`` (both eigenvalue runs met their
            tolerance, the estimators spent their budgets), ``"max_iter"`` (an eigenvalue run
            did not converge) or ``"callback"`` (the callback stopped the run: the stages not
            reached are NaN).
        n_matvecs: products with the operator used in total.
        n: size of the operator.
    """

    top_eigenvalues: Tensor
    top_eigenvalue: float
    smallest_eigenvalue: float
    trace: TraceResult
    negative_mass: float
    negative_mass_bounds: tuple[float, float]
    negative_mass_std_error: float
    negative_spectral_mass: float
    negative_ratio: float
    condition: float
    n_outliers: int
    outliers: Tensor
    bulk_edge: float
    density: Density | None = field(repr=False)
    converged: bool
    n_matvecs: int
    n: int
    details: dict = field(default_factory=dict, repr=False)
    status: Status = Status.CONVERGED
    zero_tol: float = 0.0

    def __str__(self) -> str:
        t, se = float(self.trace.estimate), float(self.trace.std_error)
        lo, hi = self.negative_mass_bounds
        nse = 0.0 if math.isnan(self.negative_mass_std_error) else self.negative_mass_std_error
        if hi - lo > max(0.05, 4 * nse):  # the near-zero bulk is not resolved: the bounds are the answer
            nm = f"between {lo:.2%} and {hi:.2%} (near-zero bulk unresolved)"
        else:
            nm = f"{self.negative_mass:.2%}" + ("" if nse == 0.0 else f" ± {nse:.2%}") + f" in [{lo:.2%}, {hi:.2%}]"
        outl = ", ".join(f"{float(v):.4g}" for v in self.outliers)
        rows = [
            ("operator size", f"{self.n}"),
            ("top eigenvalue", f"{self.top_eigenvalue:.6g}"),
            ("smallest eigenvalue", f"{self.smallest_eigenvalue:.6g}"),
            (f"trace ({self.trace.method})", f"{t:.6g} ± {se:.2g}"),
            ("negative eigenvalues", nm),
            ("negative spectral mass", f"{self.negative_spectral_mass:.3%}"),
            ("|λ_min| / λ_max", f"{self.negative_ratio:.3g}"),
            ("condition (PSD only)", f"{self.condition:.3g}"),
            ("outliers", f"{self.n_outliers}" + (f": {outl}" if outl else "")),
            ("bulk edge", f"{self.bulk_edge:.4g}"),
            ("zero below", f"{self.zero_tol:.2g} (rounding level)"),
            ("status", f"{self.status.value}"),
            ("matvecs", f"{self.n_matvecs}"),
        ]
        w = max(len(r[0]) for r in rows)
        return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)


def summary(
    op: Any,
    *,
    k_top: int | None = None,
    n_classes: int | None = None,
    trace_method: str = "hutch++",
    trace_budget: int = 100,
    n_probes: int = 2,
    n_lanczos: int = 90,
    tol: float = 1e-6,
    maxiter: int = 200,
    zero_tol: float | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    progress: bool = False,
    callback: Callback | None = None,
) -> SpectrumSummary:
    r"""Top and bottom eigenvalues, trace, negative mass and outliers-versus-bulk of a symmetric operator.

    Eigenvalues at the rounding level of the operator's products count as zero: with
    :math:`\|A\|` estimated by the largest absolute eigenvalue, anything within
    :math:`\sqrt n\,\varepsilon\,\|A\|` of zero (``eps`` of the operator's dtype; see
    ``zero_tol``) cannot be told apart from zero by products in that dtype. A float32 GGN
    with a null space then reports ``condition = inf`` (not :math:`\sim 1/\varepsilon`) and
    no negative mass from rounding noise.

    Args:
        op: a symmetric :class:`~curvlab.linops.LinearOperator` (Hessian, GGN, ...) or dense tensor.
        k_top: how many top eigenvalues to compute for the outlier split (default
            ``max(20, 2 * n_classes + 2)``; capped at ``n - 1``).
        n_classes: the number of classes of a classifier, if any (Sagun et al.: about
            that many outliers); only sets the default ``k_top``.
        trace_method, trace_budget: passed to :func:`trace`.
        n_probes, n_lanczos: passed to :func:`density`.
        tol, maxiter: passed to :func:`eigsh`. ``tol = 1e-6`` (residuals below
            :math:`10^{-6}\|A\|`) is plenty for a summary — an isolated eigenvalue is then
            accurate to about :math:`10^{-12}\|A\|^2/\text{gap}` — and keeps the cost bounded
            when an end of the spectrum is a tight cluster (the null space of a GGN or
            Fisher); ``converged`` reports whether both runs met it.
        zero_tol: eigenvalues with :math:`|\lambda|` at most this count as zero (default
            :math:`\sqrt n\,\varepsilon\,\|A\|`, the probabilistic rounding-error bound of a
            length-:math:`n` inner product: Higham & Mary 2019, Thm. 3.1).
        generator, seed: for reproducibility (one stream drives every estimator).
        progress: one tqdm bar over all the products, named by stage (main process only).
        callback: ``callback(info) -> bool``, handed the ``info`` of every stage
            (:func:`eigsh`, :func:`trace`, :func:`density`) with ``info["stage"]`` naming it.
            Returning ``True`` stops: the running stage ends early as documented there, the
            stages after it are skipped (their fields NaN) and ``status="callback"``.

    Returns:
        A :class:`SpectrumSummary`.

    Raises:
        ValueError: ``op`` not symmetric, invalid counts, an operator whose products are not
            finite (nan / inf).
    """
    A = as_symmetric_operator(op, "summary")
    n = A.shape[0]
    if n < 2:
        raise ValueError(f"summary needs an operator of size >= 2, got {n}")
    if k_top is None:
        k_top = 20 if n_classes is None else max(20, 2 * check_int(n_classes, "n_classes", 1) + 2)
    k_top = min(check_int(k_top, "k_top", 1), n - 1)
    if zero_tol is not None:
        zero_tol = check_positive(zero_tol, "zero_tol", allow_zero=True)
    gen = make_generator(generator, seed, A.device, distributed=A.distributed)
    mon = Monitor(A, progress, callback, "summary: top eigenvalues")
    try:
        return _summary(A, k_top, trace_method, trace_budget, n_probes, n_lanczos, tol, maxiter, zero_tol, gen, mon)
    finally:
        mon.close()


def _checked(res: EigshResult) -> EigshResult:
    if res.status is Status.NAN:
        raise nonfinite_error("summary", f"eigsh (which={res.which!r}): {res.message}")
    return res


def _summary(
    A: Any,
    k_top: int,
    trace_method: str,
    trace_budget: int,
    n_probes: int,
    n_lanczos: int,
    tol: float,
    maxiter: int,
    zero_tol: float | None,
    gen: torch.Generator | None,
    mon: Monitor,
) -> SpectrumSummary:
    n = A.shape[0]
    start = A.n_matvecs
    nan = float("nan")
    top = _checked(_eigsh(A, k_top, "LA", tol, maxiter, None, None, gen, None, False, mon))
    stopped = top.status is Status.CALLBACK
    bottom = tr = dens = None
    if not stopped:
        mon.set_stage("summary: smallest eigenvalue")
        bottom = _checked(_eigsh(A, 1, "SA", tol, maxiter, None, None, gen, None, False, mon))
        stopped = bottom.status is Status.CALLBACK
    if not stopped:
        mon.set_stage("summary: trace")
        tr = _trace(A, trace_method, trace_budget, gen, None, None, mon)
        stopped = tr.status is Status.CALLBACK
    if not stopped:
        mon.set_stage("summary: density", total=n_probes * min(n_lanczos, n))
        dens = _density(A, n_probes, n_lanczos, None, None, None, gen, None, mon)
        stopped = dens.status is Status.CALLBACK
    if tr is None:
        z = torch.tensor(nan, dtype=A.dtype, device=A.device)
        tr = TraceResult(z, z.clone(), 0, trace_method, None, Status.CALLBACK)

    vals = top.eigenvalues
    lmax = float(vals[0])
    lmin = float(bottom.eigenvalues[0]) if bottom is not None else nan
    lmin_err = float(bottom.residual_norms[0]) if bottom is not None else nan  # |lmin - eigenvalue| <= residual
    anorm = max(abs(lmax), abs(lmin)) if bottom is not None else abs(lmax)
    ztol = zero_threshold(anorm, n, A.dtype) if zero_tol is None else zero_tol
    n_out = split_outliers(vals) if vals.numel() >= 4 else 0
    bulk_edge = float(vals[n_out]) if n_out < vals.numel() else nan
    margin = max(lmin_err, ztol) if bottom is not None else nan
    no_negative = A.is_psd or (bottom is not None and bottom.converged and lmin + margin >= 0)
    if no_negative:  # no negative eigenvalue beyond rounding
        neg, neg_bounds, neg_se, neg_spec = 0.0, (0.0, 0.0), 0.0, 0.0
    elif dens is None:
        neg, neg_bounds, neg_se, neg_spec = nan, (nan, nan), nan, nan
    else:
        neg, neg_bounds = dens.negative_mass(ztol), dens.negative_mass_bounds(ztol)
        neg_se, neg_spec = dens.negative_mass_std_error(ztol), dens.negative_spectral_mass()
    if bottom is None:
        condition = neg_ratio = nan
    else:
        condition = lmax / lmin if lmin - margin > 0 else float("inf")
        neg_ratio = (abs(min(lmin, 0.0)) if lmin < -margin else 0.0) / lmax if lmax > 0 else nan
    converged = bool(top.converged and bottom is not None and bottom.converged)
    if stopped:
        status = Status.CALLBACK
    else:
        status = Status.CONVERGED if converged else Status.MAX_ITER
    return SpectrumSummary(
        top_eigenvalues=vals,
        top_eigenvalue=lmax,
        smallest_eigenvalue=lmin,
        trace=tr,
        negative_mass=neg,
        negative_mass_bounds=neg_bounds,
        negative_mass_std_error=neg_se,
        negative_spectral_mass=neg_spec,
        negative_ratio=neg_ratio,
        condition=condition,
        n_outliers=n_out,
        outliers=vals[:n_out],
        bulk_edge=bulk_edge,
        density=dens,
        converged=converged,
        n_matvecs=A.n_matvecs - start,
        n=n,
        details={"top": top, "bottom": bottom},
        status=status,
        zero_tol=ztol,
    )
