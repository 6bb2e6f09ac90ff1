r"""Stochastic trace estimation from matrix-vector products.

Three estimators, all with Rademacher probes :math:`\omega \in \{\pm 1\}^n`
(:math:`\mathbb E[\omega\omega^\top] = I`) and all unbiased:

* **Hutchinson** (Girard 1989; Hutchinson 1989, "A stochastic estimator of the
  trace of the influence matrix for Laplacian smoothing splines", Commun.
  Stat. Simul. Comput. 18(3)): :math:`\hat t = \frac1m\sum_i \omega_i^\top A\omega_i`,
  variance :math:`\frac2m(\|A\|_F^2 - \sum_i A_{ii}^2)`.
* **Hutch++** (Meyer, Musco, Musco & Woodruff 2021, "Hutch++: Optimal stochastic
  trace estimation", SOSA, Algorithm 1): a third of the budget sketches
  :math:`Q = \operatorname{orth}(AS)`, a third takes :math:`\operatorname{tr}(Q^\top AQ)`
  exactly, and a third runs Hutchinson on the deflated
  :math:`(I-QQ^\top)A(I-QQ^\top)`. Relative error :math:`\varepsilon` with
  :math:`O(1/\varepsilon)` products for PSD matrices, against :math:`O(1/\varepsilon^2)`
  for Hutchinson; a large gain whenever the spectrum decays (curvature matrices
  of trained networks: a few outliers over a bulk near zero).
* **XTrace** (Epperly, Tropp & Webber 2024, "XTrace: Making the most of every
  sample in stochastic trace estimation", SIAM J. Matrix Anal. Appl. 45(1),
  §2): every probe serves both purposes. With :math:`Y = A\Omega = QR` and
  :math:`Q_{(i)}` a basis of :math:`Y` without column :math:`i`,
  :math:`\hat t = \frac1s\sum_i \big[\operatorname{tr}(Q_{(i)}^\top AQ_{(i)})
  + \omega_i^\top(I-Q_{(i)}Q_{(i)}^\top)A(I-Q_{(i)}Q_{(i)}^\top)\omega_i\big]`,
  each term unbiased because :math:`Q_{(i)}` does not depend on :math:`\omega_i`.

Standard errors: Hutchinson and Hutch++ report the sample standard deviation
of their independent quadratic forms over :math:`\sqrt m` (for Hutch++,
conditional on the sketch; the exact low-rank part has no variance). XTrace
reports :math:`\operatorname{std}(t_1,\dots,t_s)/\sqrt s` over its exchangeable
estimates, the error estimate Epperly, Tropp & Webber recommend (§2.4). When
the budget reaches :math:`n` (or the sketch finds that :math:`A` has rank below
it) the trace is computed exactly and the standard error is zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from curvlab.status import Status

from ._common import (
    Callback,
    Monitor,
    as_symmetric_operator,
    estimator_setup,
    exact_diagonal,
    leave_one_out_basis,
    products,
    rademacher,
)

__all__ = ["TraceResult", "trace"]

_METHODS = ("hutch++", "hutchinson", "xtrace")
_MIN_BUDGET = {"hutchinson": 2, "hutch++": 4, "xtrace": 4}


@dataclass
class TraceResult:
    """A trace estimate and how sure it is. ``float(result)`` is the estimate.

    Attributes:
        estimate: 0-dim tensor on the operator's device.
        std_error: 0-dim tensor, the estimated standard deviation of ``estimate``
            (zero when the trace was computed exactly).
        n_matvecs: products with the operator used.
        method: ``"hutchinson"``, ``"hutch++"``, ``"xtrace"``, or ``"exact"`` when
            the budget sufficed for the exact trace.
        samples: the independent (Hutchinson, Hutch++) or exchangeable (XTrace)
            per-probe estimates the standard error comes from; ``None`` when exact.
        status: a :class:`~curvlab.Status`: ``"converged"`` (the budget was spent as
            documented) or ``"callback"`` (the callback stopped it early: the estimate of
            ``method`` from the products taken).
    """

    estimate: Tensor
    std_error: Tensor
    n_matvecs: int
    method: str
    samples: Tensor | None = field(default=None, repr=False)
    status: Status = Status.CONVERGED

    def __float__(self) -> float:
        return float(self.estimate)

    def confidence_interval(self, z: float = 1.96) -> tuple[float, float]:
        """``estimate ± z·std_error`` (normal approximation; ``z = 1.96`` for 95 %)."""
        e, s = float(self.estimate), float(self.std_error)
        return e - z * s, e + z * s


def _std_error(samples: Tensor) -> Tensor:
    if samples.shape[-1] < 2:
        return torch.full_like(samples.sum(-1), float("nan"))
    return samples.std(dim=-1, correction=1) / math.sqrt(samples.shape[-1])


def _as_hutchinson(Z: Tensor, AZ: Tensor) -> tuple[Tensor, Tensor, str, Tensor]:
    """The Hutchinson estimate of the Rademacher probes ``Z[:, :j]`` whose products ``AZ`` were taken."""
    samples = (Z[:, : AZ.shape[1]] * AZ).sum(0)
    return samples.mean(), _std_error(samples), "hutchinson", samples


def trace(
    op: Any,
    method: str = "hutch++",
    budget: int = 100,
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    block_size: int | None = None,
    progress: bool = False,
    callback: Callback | None = None,
) -> TraceResult:
    r"""Estimate :math:`\operatorname{tr}(A)` of a symmetric operator from ``budget`` products.

    See the module docstring for the estimators and their papers. The default,
    Hutch++ with 100 products, has the optimal :math:`O(1/\varepsilon)` rate of
    Meyer et al. (2021); at 100 products it spends as much as PyHessian's default
    Hutchinson run (``maxIter=100``). Prefer ``"xtrace"`` for the smallest error
    at a given budget on matrices with decaying spectra (Epperly et al. 2024, §4).

    Args:
        op: a symmetric ``(n, n)`` :class:`~curvlab.linops.LinearOperator` or dense tensor.
        method: ``"hutch++"``, ``"hutchinson"`` or ``"xtrace"``.
        budget: the number of products to spend (at least 2 for Hutchinson, 4 for
            Hutch++ and XTrace; XTrace uses an even number). With ``budget >= n``
            the trace is computed exactly from ``n`` unit vectors.
        generator: :class:`torch.Generator` on the operator's device.
        seed: alternative to ``generator``: seed a fresh one.
        block_size: products are taken ``block_size`` columns at a time (default: 8 on
            CPU, 32 on accelerators, where batched Hessian-vector products pay off; each
            column holds its own intermediates).
        progress: show a tqdm bar of the products (on the main process of a data-parallel run).
        callback: ``callback(info) -> bool`` after every block of products, with
            ``info = {"phase": ..., "columns_done": ..., "columns": ..., "n_matvecs": ...}``.
            Returning ``True`` stops early (``status="callback"``) with the estimate the
            products so far allow: the Hutchinson estimate of the Rademacher probes done (the
            sketch probes of Hutch++ and XTrace are Rademacher too), or Hutch++ with fewer
            deflated probes. The exact computation (``budget >= n``) does not stop early.

    Returns:
        A :class:`TraceResult` (``.estimate``, ``.std_error``, ``.n_matvecs``, ``.status``;
        ``float(result)`` gives the estimate).

    Raises:
        ValueError: ``op`` not symmetric, an unknown ``method``, ``budget`` too small or not an
            int, ``generator`` on another device, an operator whose products are not finite.
        TypeError: a non-bool ``progress``, a non-callable ``callback``.

    Example:
        >>> A = torch.diag(torch.linspace(0.0, 1.0, 500, dtype=torch.float64))
        >>> res = trace(A, "hutch++", budget=60, seed=0)
        >>> abs(float(res) - 250.0) < 4 * float(res.std_error) + 1e-9
        True
    """
    A = as_symmetric_operator(op, "trace")
    mon = Monitor(A, progress, callback, "trace")
    try:
        return _trace(A, method, budget, generator, seed, block_size, mon)
    finally:
        mon.close()


def _trace(
    op: Any,
    method: str,
    budget: int,
    generator: torch.Generator | None,
    seed: int | None,
    block_size: int | None,
    mon: Monitor,
) -> TraceResult:
    """:func:`trace` on a validated operator, reporting to ``mon`` (shared with :func:`summary`)."""
    A, budget, bs, gen = estimator_setup(
        op, "trace", method, _METHODS, budget, _MIN_BUDGET, block_size, generator, seed
    )
    n, dtype, device = A.shape[0], A.dtype, A.device
    start = A.n_matvecs
    zero = torch.zeros((), dtype=dtype, device=device)
    mon.set_stage(mon.stage, total=min(budget, n))

    def done(est: Tensor, se: Tensor, name: str, samples: Tensor | None, stopped: bool = False) -> TraceResult:
        status = Status.CALLBACK if stopped else Status.CONVERGED
        return TraceResult(est, se, A.n_matvecs - start, name, samples, status)

    if budget >= n:
        return done(exact_diagonal(A, bs, mon, "trace").sum(), zero, "exact", None)

    if method == "hutchinson":
        Z = rademacher(n, budget, dtype, device, gen)
        AZ, stopped = products(A, Z, bs, mon, "trace", "hutchinson")
        return done(*_as_hutchinson(Z, AZ), stopped and AZ.shape[1] < budget)

    if method == "hutch++":
        s = budget // 3
        g = budget - 2 * s
        S = rademacher(n, s, dtype, device, gen)
        AS, stopped = products(A, S, bs, mon, "trace", "sketch")
        if stopped:
            return done(*_as_hutchinson(S, AS), True)
        Q, _ = torch.linalg.qr(AS)
        AQ, stopped = products(A, Q, bs, mon, "trace", "low-rank part")
        if stopped:
            return done(*_as_hutchinson(S, AS), True)
        t_low = (Q * AQ).sum()
        G = rademacher(n, g, dtype, device, gen)
        G = G - Q @ (Q.T @ G)
        AG, stopped = products(A, G, bs, mon, "trace", "deflated Hutchinson")
        samples = (G[:, : AG.shape[1]] * AG).sum(0)
        stopped = stopped and AG.shape[1] < g
        return done(t_low + samples.mean(), _std_error(samples), method, samples, stopped)

    # XTrace (Epperly, Tropp & Webber 2024, Algorithm 2 specialised to symmetric A)
    s = budget // 2
    Om = rademacher(n, s, dtype, device, gen)
    Y, stopped = products(A, Om, bs, mon, "trace", "sketch")
    if stopped:
        return done(*_as_hutchinson(Om, Y), True)
    Q, R = torch.linalg.qr(Y)
    Z, stopped = products(A, Q, bs, mon, "trace", "low-rank part")
    if stopped and Z.shape[1] < Q.shape[1]:  # XTrace's last phase: a stop after it changes nothing
        return done(*_as_hutchinson(Om, Y), True)
    Hq = Q.T @ Z
    Hq = 0.5 * (Hq + Hq.T)
    S = leave_one_out_basis(R)
    if S is None:  # rank(A) < s: range(Q) contains range(A) and tr(Qᵀ A Q) is exact
        return done(torch.trace(Hq), zero, "exact", None)
    W = Q.T @ Om
    c = (S * W).sum(0)  # s_iᵀ Qᵀ ω_i
    low = torch.trace(Hq) - (S * (Hq @ S)).sum(0)  # tr(Q_(i)ᵀ A Q_(i))
    U = Om - Q @ W + (Q @ S) * c  # (I - Q_(i) Q_(i)ᵀ) ω_i
    AU = Y - Z @ W + (Z @ S) * c  # A (I - Q_(i) Q_(i)ᵀ) ω_i
    samples = low + (U * AU).sum(0)
    return done(samples.mean(), _std_error(samples), method, samples)
