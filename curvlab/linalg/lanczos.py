r"""The symmetric Lanczos process with optional full reorthogonalisation.

For symmetric ``A`` and a unit start vector :math:`q_1`, Lanczos (1950)
builds an orthonormal basis :math:`Q_m = [q_1, \dots, q_m]` of the Krylov
space :math:`\mathcal K_m(A, q_1)` with the three-term recurrence

.. math::

    \beta_j q_{j+1} = A q_j - \alpha_j q_j - \beta_{j-1} q_{j-1}, \qquad
    \alpha_j = q_j^\top A q_j,

so that :math:`Q_m^\top A Q_m = T_m`, the symmetric tridiagonal matrix with
diagonal :math:`\alpha` and off-diagonal :math:`\beta`. The eigenvalues of
:math:`T_m` (Ritz values) approximate the extreme eigenvalues of ``A``
(Golub & Van Loan, *Matrix Computations*, 4th ed., §10.1). In floating point
the basis loses orthogonality as Ritz values converge; full
reorthogonalisation (here: classical Gram–Schmidt against all previous
vectors, applied twice, "CGS2") keeps it orthonormal to working precision
at :math:`O(n m^2)` cost (Golub & Van Loan §10.3.1).

The recurrence runs on :math:`A/s`, with :math:`s` a power of two near the size of the
first product (exact, so the digits are those of :math:`A`), and :math:`T_m` is scaled
back: an operator of any magnitude (:math:`10^{-170}` in float64, :math:`10^{-30}` in
float32, where the squares inside the vector norms would underflow) gives the same
relative accuracy. A non-finite product stops the run (``status="nan"``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import distributed as _dist
from ..checks import check_int
from ..status import Status
from ._result import _check_n, _default_dtype_device, _symmetric_operator

__all__ = ["LanczosResult", "lanczos"]


@dataclass
class LanczosResult:
    r"""Output of :func:`lanczos`: the tridiagonal :math:`T_m = Q_m^\top A Q_m` and the basis.

    Attributes:
        alpha: ``(m,)`` diagonal of :math:`T_m`.
        beta: ``(m-1,)`` off-diagonal of :math:`T_m`.
        Q: ``(n, m)`` orthonormal basis, or ``None`` when ``store_basis=False``.
        n_matvecs: products with ``A`` used (``m``).
        breakdown: an invariant subspace was found before ``k`` steps
            (:math:`\beta_j` negligible, or ``k > n``), so ``m < k``.
        status: a :class:`~curvlab.Status`: ``"max_iter"`` (``k`` steps taken), ``"breakdown"``
            (an invariant subspace: :math:`T_m` holds exact eigenvalues of ``A``), ``"nan"``
            (product ``m`` was not finite: ``alpha[-1]`` is non-finite, the earlier entries are
            those of the finite steps) or ``"callback"`` (the callback stopped the run).
        info: extras: ``"beta_last"`` (:math:`\beta_m = \|A q_m - \ldots\|`, the
            residual norm that bounds the Ritz pairs' residuals:
            :math:`\|A Q s - \theta Q s\| = \beta_m |s_m|`; negligible at breakdown)
            and ``"anorm"`` (the largest :math:`\|A q_j\|` seen, a lower
            bound on :math:`\|A\|_2`).
    """

    alpha: Tensor
    beta: Tensor
    Q: Tensor | None
    n_matvecs: int
    breakdown: bool
    info: dict = field(default_factory=dict)
    status: Status = Status.MAX_ITER

    def tridiagonal(self) -> Tensor:
        """The dense ``(m, m)`` symmetric tridiagonal matrix :math:`T_m`."""
        return torch.diag(self.alpha) + torch.diag(self.beta, 1) + torch.diag(self.beta, -1)

    def ritz(self) -> tuple[Tensor, Tensor]:
        """Ritz values (ascending) and the eigenvectors ``S`` of :math:`T_m` (``(m, m)``, columns).

        The Ritz vectors of ``A`` are ``Q @ S``.
        """
        return torch.linalg.eigh(self.tridiagonal())


def lanczos(
    A: Any,
    k: int,
    *,
    v0: Tensor | None = None,
    n: int | None = None,
    generator: torch.Generator | None = None,
    reorth: str = "full",
    store_basis: bool = True,
    check_every: int = 1,
    callback: Callable[[dict[str, Any]], Any] | None = None,
) -> LanczosResult:
    r"""Run ``k`` steps of symmetric Lanczos on ``A`` (Lanczos, 1950; Golub & Van Loan §10.1).

    Produces :math:`Q_m` (orthonormal) and :math:`T_m = Q_m^\top A Q_m`
    (tridiagonal). With ``reorth="full"`` every new vector is
    reorthogonalised against all previous ones by classical Gram–Schmidt
    applied twice; with ``reorth="none"`` the plain three-term recurrence is
    used (cheaper, :math:`O(n)` memory when ``store_basis=False``, but the
    basis loses orthogonality and ``T`` grows spurious copies of converged
    Ritz values). The process stops early (``breakdown=True``) when the
    Krylov space is invariant to working precision, i.e. when
    :math:`\beta_j \le \sqrt{\varepsilon}\,\|A q_j\|` (``A q_j`` lies in the
    span of the basis up to the rounding that the recurrence amplifies) or
    :math:`\beta_j \le n\,\varepsilon\,\max_i \|A q_i\|`, and always after
    :math:`n` steps.

    Args:
        A: symmetric ``(n, n)`` operator: a
            :class:`~curvlab.linops.LinearOperator` tagged symmetric, a dense
            2-D tensor, or a callable ``v -> A v`` (needs ``n``; dtype and
            device from ``v0``, else the default dtype on ``generator``'s
            device, else CPU).
        k: number of steps (``>= 1``; at most ``n`` are taken).
        v0: start vector ``(n,)`` (normalised here). Default: a standard
            Gaussian drawn with ``generator`` on ``A``'s device.
        n: the size, required when ``A`` is a callable.
        generator: :class:`torch.Generator` for ``v0`` (on ``A``'s device).
        reorth: ``"full"`` or ``"none"``.
        check_every: evaluate the breakdown test on the host (one device
            synchronisation) only every ``check_every`` steps; a breakdown found
            late truncates the run at the step where it happened, so the result
            is the same as with ``check_every=1`` (the steps after it are wasted
            work). Larger values suit GPUs.
        store_basis: return ``Q`` (``False`` saves the ``(n, m)`` output; with
            ``reorth="full"`` the basis is still kept while running).
        callback: ``callback(info) -> bool`` after every step, with ``info = {"step": j,
            "n_matvecs": ..., "alpha": alpha_j, "beta": beta_j}`` (0-dim tensors: reading them
            synchronises the host). Returning ``True`` stops after that step
            (``status="callback"``). In a data-parallel run its answer must be the same on
            every rank.

    Returns:
        A :class:`LanczosResult` with ``m <= k`` steps and its ``status``.

    Raises:
        ValueError: ``A`` a :class:`~curvlab.linops.LinearOperator` not tagged
            symmetric, ``A`` not square, ``k < 1``, a callable without ``n``,
            ``v0`` of the wrong shape or zero, an unknown ``reorth``, ``check_every`` not a
            positive int.
        TypeError: a non-callable ``callback``.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
        >>> res = lanczos(A, 10, generator=torch.Generator().manual_seed(0))
        >>> torch.allclose(res.ritz()[0], torch.arange(1.0, 11.0, dtype=torch.float64))
        True
    """
    check_every = check_int(check_every, "check_every", 1)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable (info dict -> bool), got {type(callback).__name__}")
    if reorth not in ("full", "none"):
        raise ValueError(f"reorth must be 'full' or 'none', got {reorth!r}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or int(k) < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    n_call = _check_n(A, n)
    dtype, device = _default_dtype_device(v0, generator)
    op = _symmetric_operator(A, n_call, dtype, device, "lanczos")
    size = op.shape[0]
    dtype, device = op.dtype, op.device
    if v0 is None:
        if op.distributed:  # the same start vector on every rank
            generator = _dist.synced_generator(generator, device)
        v0 = torch.randn(size, generator=generator, dtype=dtype, device=device)
    elif not isinstance(v0, Tensor) or v0.shape != (size,):
        raise ValueError(f"v0 must be a tensor of shape ({size},), got {getattr(v0, 'shape', type(v0).__name__)}")
    elif v0.dtype != dtype or v0.device != device:
        raise ValueError(f"v0 must have A's dtype {dtype} and device {device}, got {v0.dtype} on {v0.device}")
    v0 = v0 / _pow2_scale(v0)  # a norm that neither underflows nor overflows
    v0norm = torch.linalg.vector_norm(v0)
    if not bool(torch.isfinite(v0norm)) or float(v0norm) == 0.0:
        raise ValueError("v0 must be a nonzero finite vector")

    m_max = min(int(k), size)
    full = reorth == "full"
    keep_basis = full or store_basis
    Q = torch.zeros(size, m_max, dtype=dtype, device=device) if keep_basis else None
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    q = v0 / v0norm
    q_prev: Tensor | None = None
    beta_prev: Tensor | None = None
    anorm = torch.zeros((), dtype=dtype, device=device)
    eps = torch.finfo(dtype).eps
    rel_tol, abs_tol = eps**0.5, max(size, 10) * eps
    start = op.n_matvecs
    beta = torch.zeros((), dtype=dtype, device=device)
    scale: float | None = None  # the recurrence runs on A / scale (a power of two: exact)
    pending: list[Tensor] = []  # stop flags (breakdown or non-finite) of the steps not yet tested on the host
    anorms: list[Tensor] = []
    finite: list[Tensor] = []
    stopped = False
    for j in range(m_max):
        if Q is not None:
            Q[:, j] = q
        w = op.matvec(q)
        if scale is None:
            scale = _pow2_scale(w)
        w = w / scale
        wnorm = torch.linalg.vector_norm(w)
        anorm = torch.maximum(anorm, wnorm)
        anorms.append(anorm)
        alpha = torch.dot(q, w)
        w = w - alpha * q
        if beta_prev is not None and q_prev is not None:
            w = w - beta_prev * q_prev
        if full and Q is not None:
            Qj = Q[:, : j + 1]
            for _ in range(2):  # CGS2
                w = w - Qj @ (Qj.T @ w)
        beta = torch.linalg.vector_norm(w)
        alphas.append(alpha)
        ok = torch.isfinite(wnorm) & torch.isfinite(beta)
        finite.append(ok)
        if callback is not None and callback(
            {"step": j, "n_matvecs": op.n_matvecs - start, "alpha": alpha * scale, "beta": beta * scale}
        ):
            stopped = True
            betas.append(beta)
            pending.append(~ok | (beta <= rel_tol * wnorm) | (beta <= abs_tol * anorm))
            break
        if j == m_max - 1:
            pending.append(~ok)
            betas.append(beta)
            break
        # invariant subspace: A q_j (almost) inside span(Q); or a non-finite product. One host sync per
        # `check_every` steps.
        betas.append(beta)
        pending.append(~ok | (beta <= rel_tol * wnorm) | (beta <= abs_tol * anorm))
        if (j + 1) % check_every == 0 and _first_breakdown(pending, j) >= 0:
            break
        q_prev, beta_prev = q, beta
        q = w / beta
    # betas holds beta_0 .. beta_{m-1}; the last one is the residual norm beta_m, not part of T
    status = Status.CALLBACK if stopped else Status.MAX_ITER
    last = len(alphas) - 1
    if pending and (i := _first_breakdown(pending, last)) >= 0:
        # stop at step i: keep alpha_0..alpha_i, beta_0..beta_{i-1}; beta_i is the last beta
        del alphas[i + 1 :]
        del betas[i + 1 :]
        anorms = anorms[: i + 1]
        status = Status.NAN if not bool(finite[i]) else (Status.CALLBACK if stopped and i == last else Status.BREAKDOWN)
    m = len(alphas)
    if status is Status.MAX_ITER and m < int(k):  # k > n: the whole space is invariant
        status = Status.BREAKDOWN
    beta = betas[-1]
    anorm = anorms[m - 1]
    s_ = 1.0 if scale is None else scale
    alpha_t = torch.stack(alphas) * s_
    beta_t = torch.stack(betas[:-1]) * s_ if m > 1 else torch.zeros(0, dtype=dtype, device=device)
    return LanczosResult(
        alpha=alpha_t,
        beta=beta_t,
        Q=(Q[:, :m] if (store_basis and Q is not None) else None),
        n_matvecs=op.n_matvecs - start,
        breakdown=status is Status.BREAKDOWN,
        info={"beta_last": beta * s_, "anorm": anorm * s_},
        status=status,
    )


def _pow2_scale(w: Tensor) -> float:
    """A power of two near ``max |w_i|`` (1 for a zero or non-finite ``w``): dividing by it is exact."""
    m = float(w.abs().max()) if w.numel() else 0.0
    if not (m > 0.0 and math.isfinite(m)):
        return 1.0
    return math.ldexp(1.0, math.frexp(m)[1] - 1)


def _first_breakdown(pending: list[Tensor], j: int) -> int:
    """The first step among the pending ones whose breakdown flag is set, or -1 (one host sync).

    ``pending`` holds the flags of steps ``j - len(pending) + 1 … j``. The flags stay pending
    when one is set (the caller truncates the run at that step after the loop) and are
    cleared otherwise.
    """
    flags = torch.stack(pending).tolist()
    for offset, hit in enumerate(flags):
        if hit:
            return j - len(pending) + 1 + offset
    pending.clear()
    return -1
