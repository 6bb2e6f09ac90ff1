r"""Stochastic estimation of the diagonal of a symmetric operator.

* **Hutchinson** (Bekas, Kokiopoulou & Saad 2007, "An estimator for the diagonal
  of a matrix", Appl. Numer. Math. 57; after Hutchinson 1989):
  :math:`\hat d = \frac1m\sum_i \omega_i \odot A\omega_i` with Rademacher
  :math:`\omega_i`; entry :math:`j` has variance :math:`\frac1m\sum_{k\ne j} A_{jk}^2`.
* **XDiag** (Epperly, Tropp & Webber 2024, "XTrace: Making the most of every
  sample in stochastic trace estimation", SIAM J. Matrix Anal. Appl. 45(1), §3):
  the exchangeable version of Diag++ (Baston & Nakatsukasa 2022). With
  :math:`A\Omega = QR` and :math:`Q_{(i)}` a basis of :math:`A\Omega` without
  column :math:`i`,

  .. math::
      \hat d = \frac1s\sum_{i=1}^s\Big[\operatorname{diag}(Q_{(i)}Q_{(i)}^\top A)
      + \omega_i \odot (I - Q_{(i)}Q_{(i)}^\top) A\omega_i\Big],

  exact on the dominant range of :math:`A` and Hutchinson only on the rest.

Standard errors are per entry: the sample standard deviation of the independent
(Hutchinson) or exchangeable (XDiag, as for XTrace in §2.4 of the paper)
per-probe estimates over :math:`\sqrt m`.
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
    find_spec,
    leave_one_out_basis,
    param_layout,
    products,
    rademacher,
)

__all__ = ["DiagResult", "diag"]

_METHODS = ("xdiag", "hutchinson")
_MIN_BUDGET = {"hutchinson": 2, "xdiag": 4}


@dataclass
class DiagResult:
    """A diagonal estimate with per-entry standard errors.

    Attributes:
        estimate: ``(n,)`` tensor on the operator's device; :meth:`as_params` gives it in the
            structure of the parameters.
        std_error: ``(n,)`` estimated standard deviations (zeros when exact).
        n_matvecs: products with the operator used.
        method: ``"xdiag"``, ``"hutchinson"`` or ``"exact"``.
        status: a :class:`~curvlab.Status`: ``"converged"`` (the budget was spent as
            documented) or ``"callback"`` (stopped early by the callback: the Hutchinson
            estimate of the probes done).
        layout: a light :class:`~curvlab.params.ParamSpec` of the operator's parameters
            (``None`` for a dense matrix or a matvec callable).
    """

    estimate: Tensor
    std_error: Tensor
    n_matvecs: int
    method: str
    status: Status = Status.CONVERGED
    layout: Any = field(default=None, repr=False)

    def as_params(self, which: str = "estimate") -> Any:
        """The estimate (or ``which="std_error"``) in the parameters' structure (a dict for a module).

        Raises:
            ValueError: the operator was not built over parameters, an unknown ``which``.
        """
        if which not in ("estimate", "std_error"):
            raise ValueError(f"which must be 'estimate' or 'std_error', got {which!r}")
        if self.layout is None:
            raise ValueError("DiagResult.as_params: the operator carries no parameter structure")
        return self.layout.unflatten(getattr(self, which).contiguous())


def _std_error(samples: Tensor) -> Tensor:
    if samples.shape[1] < 2:
        return torch.full_like(samples[:, 0], float("nan"))
    return samples.std(dim=1, correction=1) / math.sqrt(samples.shape[1])


def diag(
    op: Any,
    method: str = "xdiag",
    budget: int = 100,
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    block_size: int | None = None,
    progress: bool = False,
    callback: Callback | None = None,
) -> DiagResult:
    r"""Estimate :math:`\operatorname{diag}(A)` of a symmetric operator from ``budget`` products.

    The default XDiag is exact on the range its sketch captures, so on curvature
    matrices with a few dominant directions its error is far below Hutchinson's
    at the same budget (Epperly, Tropp & Webber 2024, §3); 100 products as for
    :func:`~curvlab.spectrum.trace`.

    Args:
        op: a symmetric ``(n, n)`` :class:`~curvlab.linops.LinearOperator` or dense tensor.
        method: ``"xdiag"`` or ``"hutchinson"``.
        budget: products to spend (at least 2 for Hutchinson, 4 for XDiag, which uses
            an even number). With ``budget >= n`` the diagonal is computed exactly.
        generator: :class:`torch.Generator` on the operator's device.
        seed: alternative to ``generator``: seed a fresh one.
        block_size: columns per batched product (default: 8 on CPU, 32 on accelerators,
            where batched Hessian-vector products pay off; each column holds its own
            intermediates).
        progress: show a tqdm bar of the products (on the main process of a data-parallel run).
        callback: ``callback(info) -> bool`` after every block of products (``info`` as for
            :func:`~curvlab.spectrum.trace`). Returning ``True`` stops early with the
            Hutchinson estimate of the Rademacher probes done (``status="callback"``); the
            exact computation (``budget >= n``) does not stop early.

    Returns:
        A :class:`DiagResult` with ``.estimate`` and ``.std_error`` of shape ``(n,)`` and
        ``.as_params()`` for the parameters' structure.

    Raises:
        ValueError: ``op`` not symmetric, an unknown ``method``, ``budget`` too small or not an
            int, an operator whose products are not finite.
        TypeError: a non-bool ``progress``, a non-callable ``callback``.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 201.0, dtype=torch.float64))
        >>> res = diag(A, "hutchinson", budget=10, seed=0)
        >>> torch.allclose(res.estimate, torch.arange(1.0, 201.0, dtype=torch.float64))
        True
    """
    A = as_symmetric_operator(op, "diag")
    mon = Monitor(A, progress, callback, "diag")
    try:
        return _diag(A, method, budget, generator, seed, block_size, mon)
    finally:
        mon.close()


def _diag(
    op: Any,
    method: str,
    budget: int,
    generator: torch.Generator | None,
    seed: int | None,
    block_size: int | None,
    mon: Monitor,
) -> DiagResult:
    A, budget, bs, gen = estimator_setup(op, "diag", method, _METHODS, budget, _MIN_BUDGET, block_size, generator, seed)
    n, dtype, device = A.shape[0], A.dtype, A.device
    start = A.n_matvecs
    layout = param_layout(A) if find_spec(A) is not None else None
    mon.set_stage(mon.stage, total=min(budget, n))

    def done(est: Tensor, se: Tensor, name: str, stopped: bool = False) -> DiagResult:
        status = Status.CALLBACK if stopped else Status.CONVERGED
        return DiagResult(est, se, A.n_matvecs - start, name, status, layout)

    def hutchinson(Z: Tensor, AZ: Tensor, stopped: bool) -> DiagResult:
        samples = Z[:, : AZ.shape[1]] * AZ  # ω ⊙ Aω; ω ⊙ ω = 1 for Rademacher probes
        return done(samples.mean(1), _std_error(samples), "hutchinson", stopped)

    if budget >= n:
        d = exact_diagonal(A, bs, mon, "diag")
        return done(d, torch.zeros_like(d), "exact")

    if method == "hutchinson":
        Z = rademacher(n, budget, dtype, device, gen)
        AZ, stopped = products(A, Z, bs, mon, "diag", "hutchinson")
        return hutchinson(Z, AZ, stopped and AZ.shape[1] < budget)

    s = budget // 2
    Om = rademacher(n, s, dtype, device, gen)
    Y, stopped = products(A, Om, bs, mon, "diag", "sketch")
    if stopped:
        return hutchinson(Om, Y, True)
    Q, R = torch.linalg.qr(Y)
    Z, stopped = products(A, Q, bs, mon, "diag", "low-rank part")
    if stopped and Z.shape[1] < Q.shape[1]:  # XDiag's last phase: a stop after it changes nothing
        return hutchinson(Om, Y, True)
    d_low = (Q * Z).sum(1)  # diag(Q Qᵀ A)
    S = leave_one_out_basis(R)
    if S is None:  # rank(A) < s: Q Qᵀ A = A
        return done(d_low, torch.zeros_like(d_low), "exact")
    QS = Q @ S
    c = (S * R).sum(0)  # s_iᵀ R e_i, so that (I - Q_(i) Q_(i)ᵀ) A ω_i = Q s_i c_i
    samples = d_low[:, None] - QS * (Z @ S) + Om * QS * c
    return done(samples.mean(1), _std_error(samples), "xdiag")
