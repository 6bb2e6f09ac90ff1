r"""Randomized low-rank approximation: range finder, truncated SVD, eigh and Nyström.

The randomized range finder (Halko, Martinsson & Tropp, 2011, "Finding
structure with randomness", SIAM Review 53(2)) sketches ``A`` with a Gaussian
test matrix :math:`\Omega \in \mathbb R^{n \times \ell}`,
:math:`\ell = k + p`, and orthonormalises :math:`Y = (A A^\top)^q A \Omega`
(Algorithm 4.4, randomized subspace iteration: a QR after every product
keeps the columns from collapsing onto the top singular vector). With
:math:`Q` an orthonormal basis of :math:`Y`, :math:`A \approx Q Q^\top A`,
and small factorisations of :math:`Q^\top A` (Algorithm 5.1, truncated SVD)
or :math:`Q^\top A Q` (Algorithm 5.3, symmetric eigendecomposition) give the
low-rank factors. For positive semidefinite ``A`` the Nyström approximation
:math:`A \approx (A\Omega)(\Omega^\top A \Omega)^{+}(A\Omega)^\top` is more
accurate for the same number of products; :func:`nystrom` implements the
numerically stable version with a small shift of Tropp, Yurtsever, Udell &
Cevher (2017), "Fixed-rank approximation of a positive-semidefinite matrix
from streaming data", NeurIPS, Algorithm 3.

All products are block products (``A.matmat`` / ``A.rmatmat``) on ``A``'s
device and dtype. Products that are not finite (nan / inf) raise a ``ValueError`` that
says so, before any factorisation sees them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from curvlab import distributed as _dist
from curvlab.checks import check_int
from curvlab.linops._base import LinearOperator, aslinearoperator

from ._result import _check_n, _default_dtype_device, _symmetric_operator

__all__ = ["randomized_range_finder", "randomized_svd", "randomized_eigh", "nystrom", "NonFiniteError"]


class NonFiniteError(ValueError, torch.linalg.LinAlgError):
    """An operator's products are not finite (nan / inf): raised before any factorisation sees them.

    A ``ValueError`` (the operator handed in is bad) and a :class:`torch.linalg.LinAlgError` — the
    error torch's factorisations raise on such input — so code that catches either keeps working.
    :func:`curvlab.spectrum.trace`, :func:`~curvlab.spectrum.diag`, :func:`~curvlab.spectrum.density`
    and :func:`~curvlab.spectrum.summary` raise it too.
    """


def _finite(Y: Tensor, what: str) -> Tensor:
    """``Y`` (products with ``A``), checked to be finite.

    Raises:
        NonFiniteError: it holds nan or inf.
    """
    if not bool(torch.isfinite(Y).all()):
        raise NonFiniteError(
            f"{what}: the products with A are not finite (nan or inf); A is not finite at this point "
            "(check the loss / model / matrix for nan or inf)"
        )
    return Y


def _check_rank(k: Any, limit: int, shape: tuple[int, int]) -> int:
    k = check_int(k, "k", 1)
    if k > limit:
        raise ValueError(f"k must be at most {limit} for A of shape {shape}, got {k}")
    return k


def _general_operator(A: Any, n: int | None, generator: torch.Generator | None) -> LinearOperator:
    n_call = _check_n(A, n)
    dtype, device = _default_dtype_device(None, generator)
    return aslinearoperator(A, shape=n_call, dtype=dtype, device=device, symmetric=False, name="A")


def _orth(Y: Tensor) -> Tensor:
    return torch.linalg.qr(Y, mode="reduced").Q


def _range(
    op: LinearOperator, ell: int, n_power: int, generator: torch.Generator | None, what: str = "randomized"
) -> Tensor:
    """Halko et al. Algorithm 4.4 with an ``ell``-column Gaussian sketch (the same on every rank if data-parallel)."""
    if op.distributed:
        generator = _dist.synced_generator(generator, op.device)
    Omega = torch.randn(op.shape[1], ell, generator=generator, dtype=op.dtype, device=op.device)
    Q = _orth(_finite(op.matmat(Omega), what))
    for _ in range(n_power):
        Q = _orth(_finite(op.rmatmat(Q), what))
        Q = _orth(_finite(op.matmat(Q), what))
    return Q


def randomized_range_finder(
    A: Any,
    k: int,
    *,
    n_oversample: int = 5,
    n_power: int = 1,
    generator: torch.Generator | None = None,
    n: int | None = None,
) -> Tensor:
    r"""Orthonormal basis ``Q`` of an approximate range of ``A`` (Halko et al., 2011, Algorithm 4.4).

    Draws :math:`\Omega \sim \mathcal N(0, 1)^{n \times (k+p)}` and returns an
    orthonormal basis of :math:`(A A^\top)^q A\Omega`, re-orthonormalising
    (QR) after every product. For :math:`\sigma_{k+1}` the
    :math:`(k+1)`-st singular value, :math:`\mathbb E\|A - QQ^\top A\|` is
    within a modest factor of :math:`\sigma_{k+1}`, the factor shrinking
    like :math:`(\cdot)^{1/(2q+1)}` with the power count ``q``.

    Args:
        A: ``(m, n)`` operator: :class:`~curvlab.linops.LinearOperator`, dense
            2-D tensor, or a square callable ``v -> A v`` (needs ``n``; a callable
            has no transpose, so it only works with ``n_power=0``).
        k: target rank (``1 <= k <= min(m, n)``).
        n_oversample: extra columns ``p`` (``k + p`` is capped at ``min(m, n)``).
        n_power: power (subspace) iterations ``q``; each costs ``k + p``
            products with ``A`` and with ``Aᵀ``.
        generator: :class:`torch.Generator` for :math:`\Omega` (on ``A``'s device).
        n: size of a callable ``A``.

    Returns:
        ``Q`` of shape ``(m, min(k + p, m, n))`` with orthonormal columns.

    Raises:
        ValueError: ``k`` out of range, ``n_oversample < 0``, ``n_power < 0``,
            a callable without ``n``.
        NonFiniteError: the products with ``A`` are not finite (a ``ValueError``).

    Example:
        >>> A = torch.randn(30, 4, dtype=torch.float64) @ torch.randn(4, 20, dtype=torch.float64)
        >>> Q = randomized_range_finder(A, 4, generator=torch.Generator().manual_seed(0))
        >>> torch.allclose(Q @ (Q.T @ A), A)
        True
    """
    op = _general_operator(A, n, generator)
    k = _check_rank(k, min(op.shape), op.shape)
    p = check_int(n_oversample, "n_oversample", 0)
    q = check_int(n_power, "n_power", 0)
    return _range(op, min(k + p, *op.shape), q, generator, "randomized_range_finder")


def randomized_svd(
    A: Any,
    k: int,
    *,
    n_oversample: int = 5,
    n_power: int = 1,
    generator: torch.Generator | None = None,
    n: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Rank-``k`` truncated SVD :math:`A \approx U \operatorname{diag}(S) V^\top` (Halko et al., 2011, Alg. 5.1).

    :math:`Q` from :func:`randomized_range_finder`, then the small SVD
    :math:`Q^\top A = \tilde U S V^\top` (formed as :math:`(A^\top Q)^\top`
    with ``rmatmat``) and :math:`U = Q\tilde U`.

    Args:
        A: ``(m, n)`` operator with transposed products (a
            :class:`~curvlab.linops.LinearOperator` implementing ``rmatmat``,
            or a dense 2-D tensor); a callable is treated as square without a
            transpose and fails.
        k: rank (``1 <= k <= min(m, n)``).
        n_oversample: extra sketch columns ``p``.
        n_power: power iterations ``q``.
        generator: :class:`torch.Generator` for the sketch.
        n: size of a callable ``A``.

    Returns:
        ``(U, S, Vh)`` with ``U`` ``(m, k)`` orthonormal columns, ``S`` ``(k,)``
        descending, ``Vh`` ``(k, n)`` orthonormal rows.

    Raises:
        ValueError: as :func:`randomized_range_finder` (non-finite products: :class:`NonFiniteError`).
        NotImplementedError: ``A`` has no transposed product.

    Example:
        >>> A = torch.randn(30, 3, dtype=torch.float64) @ torch.randn(3, 20, dtype=torch.float64)
        >>> U, S, Vh = randomized_svd(A, 3, generator=torch.Generator().manual_seed(0))
        >>> torch.allclose(U @ torch.diag(S) @ Vh, A)
        True
    """
    op = _general_operator(A, n, generator)
    k = _check_rank(k, min(op.shape), op.shape)
    p = check_int(n_oversample, "n_oversample", 0)
    q = check_int(n_power, "n_power", 0)
    Q = _range(op, min(k + p, *op.shape), q, generator, "randomized_svd")
    B = _finite(op.rmatmat(Q), "randomized_svd").T  # (ell, n) = Qᵀ A
    Ub, S, Vh = torch.linalg.svd(B, full_matrices=False)
    return Q @ Ub[:, :k], S[:k], Vh[:k]


def randomized_eigh(
    A: Any,
    k: int,
    *,
    n_oversample: int = 5,
    n_power: int = 1,
    which: str = "LM",
    generator: torch.Generator | None = None,
    n: int | None = None,
) -> tuple[Tensor, Tensor]:
    r"""``k`` eigenpairs of symmetric ``A`` by a randomized sketch (Halko et al., 2011, Algorithm 5.3).

    :math:`Q` from the range finder, then the Rayleigh–Ritz step
    :math:`Q^\top A Q = S \Theta S^\top`, eigenpairs :math:`(\theta_i, Q s_i)`.
    The sketch captures the eigenvalues of largest magnitude. For
    ``which="LA"`` (largest algebraic) or ``"SA"`` (smallest algebraic) on a
    matrix not known to be PSD, a first ``"LM"`` sketch :math:`Q_1` estimates
    :math:`c \approx \|A\|_2`, a second sketch :math:`Q_2` is taken of
    :math:`A + cI` (``LA``) or :math:`cI - A` (``SA``), whose dominant
    eigenvectors are the wanted ones, and Rayleigh–Ritz runs on
    :math:`\operatorname{span}[Q_1, Q_2]` (a larger space can only improve the
    extreme Ritz values). This costs about three times the products of ``LM``.
    (``SA`` on a PSD operator also does this; ``LA`` on a PSD operator is ``LM``.)

    Args:
        A: symmetric ``(n, n)`` operator: a :class:`~curvlab.linops.LinearOperator`
            tagged symmetric, a dense 2-D tensor, or a callable (needs ``n``).
        k: number of eigenpairs (``1 <= k <= n``).
        n_oversample: extra sketch columns ``p``.
        n_power: power iterations ``q``.
        which: ``"LM"`` (largest magnitude), ``"LA"`` or ``"SA"``.
        generator: :class:`torch.Generator` for the sketch.
        n: size of a callable ``A``.

    Returns:
        ``(eigenvalues, eigenvectors)``: ``(k,)`` in descending order and
        ``(n, k)`` orthonormal columns.

    Raises:
        ValueError: ``A`` a LinearOperator not tagged symmetric, ``k`` out of
            range, unknown ``which``, negative ``n_oversample`` / ``n_power``; non-finite
            products (:class:`NonFiniteError`).

    Example:
        >>> A = torch.diag(torch.tensor([5.0, -4.0, 1e-3, 0.0, 0.0], dtype=torch.float64))
        >>> w, U = randomized_eigh(A, 2, generator=torch.Generator().manual_seed(0))
        >>> torch.allclose(w, torch.tensor([5.0, -4.0], dtype=torch.float64))
        True
    """
    if which not in ("LM", "LA", "SA"):
        raise ValueError(f"which must be 'LM', 'LA' or 'SA', got {which!r}")
    n_call = _check_n(A, n)
    dtype, device = _default_dtype_device(None, generator)
    op = _symmetric_operator(A, n_call, dtype, device, "randomized_eigh")
    size = op.shape[0]
    k = _check_rank(k, size, op.shape)
    p = check_int(n_oversample, "n_oversample", 0)
    q = check_int(n_power, "n_power", 0)
    ell = min(k + p, size)

    what = "randomized_eigh"
    if which == "LM" or (which == "LA" and op.is_psd):
        Q = _range(op, ell, q, generator, what)
    else:
        Q_lm = _range(op, ell, q, generator, what)
        w0, _ = _rayleigh_ritz(op, Q_lm)
        c = w0.abs().max()
        shifted = op.damped(c) if which == "LA" else (-op).damped(c)
        Q = _orth(torch.cat([Q_lm, _range(shifted, ell, q, generator, what)], dim=1))
    w, U = _rayleigh_ritz(op, Q)
    if which == "LM":
        order = torch.argsort(w.abs(), descending=True)[:k]
        order = order[torch.argsort(w[order], descending=True)]
    elif which == "LA":
        order = torch.argsort(w, descending=True)[:k]
    else:
        order = torch.argsort(w)[:k].flip(0)
    return w[order], U[:, order]


def _rayleigh_ritz(op: LinearOperator, Q: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenpairs of ``Qᵀ A Q`` lifted by ``Q`` (ascending)."""
    T = Q.T @ _finite(op.matmat(Q), "randomized_eigh")
    w, S = torch.linalg.eigh((T + T.T) / 2)
    return w, Q @ S


def nystrom(
    A: Any,
    k: int,
    *,
    n_oversample: int = 5,
    generator: torch.Generator | None = None,
    n: int | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Rank-``k`` Nyström approximation :math:`A \approx U \operatorname{diag}(\lambda) U^\top` of PSD ``A``.

    Tropp, Yurtsever, Udell & Cevher (2017), Algorithm 3 (stable Nyström):
    with an orthonormalised Gaussian :math:`\Omega` (``n × ℓ``, ``ℓ = k + p``)
    and :math:`Y = A\Omega`, shift :math:`\nu = \sqrt n\,\varepsilon\,\|Y\|_F`,
    :math:`Y_\nu = Y + \nu\Omega`, :math:`B = \Omega^\top Y_\nu = C C^\top`
    (Cholesky), :math:`F = Y_\nu C^{-\top}`, the thin SVD
    :math:`F = U \Sigma W^\top`, and :math:`\lambda = \max(\Sigma^2 - \nu, 0)`.
    Then :math:`U \operatorname{diag}(\lambda) U^\top \approx Y_\nu B^{-1}
    Y_\nu^\top - \nu I` restricted to the range, exact when ``rank(A) <= ℓ``
    up to :math:`O(\nu)`. If the Cholesky factorisation fails (``A`` not
    numerically PSD), ``ν`` is increased and the factorisation retried.

    Args:
        A: symmetric positive semidefinite ``(n, n)`` operator: a
            :class:`~curvlab.linops.LinearOperator` tagged symmetric, a dense
            2-D tensor, or a callable (needs ``n``).
        k: rank (``1 <= k <= n``).
        n_oversample: extra sketch columns ``p`` (``k + p`` capped at ``n``).
        generator: :class:`torch.Generator` for the sketch.
        n: size of a callable ``A``.

    Returns:
        ``(U, lam)``: ``U`` ``(n, k)`` orthonormal columns and ``lam`` ``(k,)``
        descending, ``>= 0``.

    Raises:
        ValueError: ``A`` a LinearOperator not tagged symmetric, ``k`` out of
            range, negative ``n_oversample``, or ``A`` too far from PSD for
            the shifted Cholesky factorisation; non-finite products (:class:`NonFiniteError`).

    Example:
        >>> G = torch.randn(20, 3, dtype=torch.float64)
        >>> U, lam = nystrom(G @ G.T, 3, generator=torch.Generator().manual_seed(0))
        >>> torch.allclose(U @ torch.diag(lam) @ U.T, G @ G.T)
        True
    """
    n_call = _check_n(A, n)
    dtype, device = _default_dtype_device(None, generator)
    op = _symmetric_operator(A, n_call, dtype, device, "nystrom")
    size = op.shape[0]
    k = _check_rank(k, size, op.shape)
    p = check_int(n_oversample, "n_oversample", 0)
    ell = min(k + p, size)
    eps = torch.finfo(op.dtype).eps
    if op.distributed:
        generator = _dist.synced_generator(generator, op.device)
    Omega = _orth(torch.randn(size, ell, generator=generator, dtype=op.dtype, device=op.device))
    Y = _finite(op.matmat(Omega), "nystrom")
    nu = math.sqrt(size) * eps * torch.linalg.matrix_norm(Y)
    nu = torch.clamp(nu, min=torch.finfo(op.dtype).tiny)
    for _attempt in range(4):
        Ynu = Y + nu * Omega
        Bm = Omega.T @ Ynu
        L, info = torch.linalg.cholesky_ex((Bm + Bm.T) / 2)
        if int(info) == 0:
            break
        # not numerically PSD: move the shift past the most negative eigenvalue of the core matrix
        lam_min = torch.linalg.eigvalsh((Bm + Bm.T) / 2)[0]
        nu = nu + 2 * torch.clamp(-lam_min, min=0) + 10 * nu
    else:
        raise ValueError(
            "nystrom: A does not look positive semidefinite (the shifted core matrix has no Cholesky factor)"
        )
    F = torch.linalg.solve_triangular(L, Ynu.T, upper=False).T  # Y_nu L^{-T}
    U, S, _ = torch.linalg.svd(F, full_matrices=False)
    lam = torch.clamp(S**2 - nu, min=0)
    return U[:, :k], lam[:k]
