r"""Low-rank matrix sensing instances: a test-problem family for factored solvers.

Recover a rank-:math:`r_\star` matrix :math:`M_\star` from :math:`m` linear
measurements :math:`y_i = \langle A_i, M_\star\rangle + \text{noise}` by minimising over
factors (Tong, Ma & Chi 2021, eq. 1.3 and §2.1; Xu, Shen, Ma & Chi 2023, eq. 3):

.. math::

    \text{symmetric:}\quad f(X) = \frac{1}{4m}\,\|\mathcal A(XX^\top) - y\|_2^2,
    \qquad
    \text{asymmetric:}\quad f(L, R) = \frac{1}{2m}\,\|\mathcal A(LR^\top) - y\|_2^2,

with :math:`\mathcal A(M)_i = \langle A_i, M\rangle`. The operator is normalised so that
:math:`\frac1m\mathbb E\|\mathcal A(M)\|^2 = \|M\|_F^2` (the "Gaussian design" with
i.i.d. :math:`\mathcal N(0, 1)` entries of :math:`A_i`), so the population losses are
:math:`\tfrac14\|XX^\top - M_\star\|_F^2` and :math:`\tfrac12\|LR^\top - M_\star\|_F^2`.

Two designs (argument ``design``):

* ``"gaussian"`` — the papers' setting: every :math:`A_i` has i.i.d. standard normal
  entries, stored densely as an ``(m, n1, n2)`` tensor. Memory ``m·n1·n2`` numbers: fine
  for small instances (``n = 30``, ``m = 450``: 0.4 M numbers), but ``n = 200``,
  ``m = 10 000`` would be 400 M numbers (3.2 GB in float64).
* ``"srht"`` — a structured equivalent for large instances: a subsampled randomized
  Hadamard transform :math:`\mathcal A(M) = \sqrt{N}\,P_\Omega H D\,\operatorname{vec}(M)`
  (``vec`` zero-padded to :math:`N = 2^{\lceil\log_2 n_1 n_2\rceil}`, :math:`D` random
  signs, :math:`H` the orthonormal Walsh–Hadamard matrix, :math:`P_\Omega` a uniformly
  random choice of :math:`m` distinct rows). It has the same normalisation
  :math:`\frac1m\mathbb E\|\mathcal A(M)\|^2 = \|M\|_F^2`, costs :math:`O(N\log N)` per
  product and :math:`O(m + N)` memory, and — like the Gaussian design — satisfies the
  rank-:math:`r` restricted isometry property with high probability once
  :math:`m \gtrsim r\,n\,\operatorname{polylog}(n)` (randomised orthonormal systems:
  Krahmer & Ward 2011; Oymak, Recht & Soltanolkotabi 2018), which is all the
  convergence theory of ScaledGD / ScaledGD(λ) uses.

``design="auto"`` (the default) picks Gaussian when ``m·n1·n2 <= 2·10⁷`` and SRHT otherwise.

The ground truth has singular values geometrically spaced from 1 to :math:`1/\kappa`
(so :math:`\sigma_{\max} = 1`, condition number :math:`\kappa`) and Haar-random singular
vectors; the symmetric case uses :math:`M_\star = U\Sigma U^\top` (PSD, :math:`X_\star =
U\Sigma^{1/2}`). Initialisations: ``"small_random"`` :math:`X_0 = \alpha G`,
:math:`G_{ij} \sim \mathcal N(0, 1/n)` (Xu et al. 2023, Alg. 1) and ``"spectral"``:
the best rank-:math:`r` PSD (symmetric) or SVD (asymmetric) approximation of
:math:`\frac1m\mathcal A^*(y)` split into balanced factors (Tong et al. 2021, Alg. 1 line 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .checks import check_choice, check_int, check_positive

__all__ = ["MatrixSensing", "matrix_sensing"]

_GAUSSIAN_BUDGET = 20_000_000


def _fwht(x: Tensor) -> Tensor:
    """Orthonormal fast Walsh–Hadamard transform along the last dimension (length a power of 2)."""
    N = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < N:
        y = x.reshape(*lead, N // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, N)
        h *= 2
    return x / math.sqrt(N)


@dataclass
class _Design:
    """The measurement operator ``𝒜`` and its adjoint."""

    kind: str
    shape: tuple[int, int]
    m: int
    A: Tensor | None = None  # gaussian: (m, n1, n2)
    signs: Tensor | None = None  # srht: (N,)
    rows: Tensor | None = None  # srht: (m,)

    def __call__(self, M: Tensor) -> Tensor:
        """``𝒜(M)``, shape ``(m,)``; differentiable."""
        if self.kind == "gaussian":
            assert self.A is not None
            return self.A.reshape(self.m, -1) @ M.reshape(-1)
        assert self.signs is not None and self.rows is not None
        N = self.signs.shape[0]
        v = torch.nn.functional.pad(M.reshape(-1), (0, N - M.numel())) * self.signs
        return math.sqrt(N) * _fwht(v)[self.rows]

    def adjoint(self, z: Tensor) -> Tensor:
        """``𝒜*(z) = Σᵢ zᵢ Aᵢ``, shape ``(n1, n2)``."""
        n1, n2 = self.shape
        if self.kind == "gaussian":
            assert self.A is not None
            return (z @ self.A.reshape(self.m, -1)).reshape(n1, n2)
        assert self.signs is not None and self.rows is not None
        N = self.signs.shape[0]
        v = torch.zeros(N, dtype=z.dtype, device=z.device).index_put((self.rows,), z)
        return (math.sqrt(N) * _fwht(v) * self.signs)[: n1 * n2].reshape(n1, n2)  # H symmetric, orthonormal

    def nbytes(self) -> int:
        ts = [t for t in (self.A, self.signs, self.rows) if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)


@dataclass
class MatrixSensing:
    r"""A matrix-sensing instance (see the module docstring for the model and the designs).

    Attributes:
        n1, n2: size of :math:`M_\star` (``n1 == n2 == n`` when symmetric).
        r: true rank :math:`r_\star`; ``r_model``: the factors' number of columns.
        kappa: condition number of :math:`M_\star`; ``sigma``: its nonzero singular values (descending).
        m: number of measurements; ``symmetric``; ``design`` (``"gaussian"`` or ``"srht"``).
        M_star: the ground truth; ``factors_star``: ``X⋆`` or ``(L⋆, R⋆)``.
        y: the measurements; ``noise``: their noise standard deviation.
        x0_random, x0_spectral: the two initialisations (a tensor or an ``(L, R)`` tuple).
        init: which one :attr:`x0` and :meth:`problem` use.
    """

    n1: int
    n2: int
    r: int
    r_model: int
    kappa: float
    m: int
    symmetric: bool
    sigma: Tensor
    M_star: Tensor
    factors_star: Any
    y: Tensor
    noise: float
    operator: _Design
    x0_random: Any
    x0_spectral: Any
    init: str = "small_random"
    design: str = field(default="gaussian")

    # ----------------------------------------------------------------- model
    def A(self, M: Tensor) -> Tensor:  # noqa: N802 - the paper's name
        r"""The measurements :math:`\mathcal A(M)` of an ``(n1, n2)`` matrix (differentiable)."""
        return self.operator(M)

    def A_adjoint(self, z: Tensor) -> Tensor:  # noqa: N802
        r"""The adjoint :math:`\mathcal A^*(z) = \sum_i z_i A_i`."""
        return self.operator.adjoint(z)

    def product(self, params: Any) -> Tensor:
        """``XXᵀ`` (symmetric) or ``LRᵀ`` (asymmetric) of factor ``params``."""
        if self.symmetric:
            X = params[0] if isinstance(params, (tuple, list)) else params
            return X @ X.T
        L, R = params
        return L @ R.T

    def loss(self, params: Any) -> Tensor:
        r""":math:`\frac1{4m}\|\mathcal A(XX^\top) - y\|^2` or :math:`\frac1{2m}\|\mathcal A(LR^\top) - y\|^2`."""
        res = self.operator(self.product(params)) - self.y
        return (res @ res) / ((4 if self.symmetric else 2) * self.m)

    def relative_error(self, params: Any) -> float:
        r""":math:`\|XX^\top - M_\star\|_F / \|M_\star\|_F` (or with :math:`LR^\top`)."""
        with torch.no_grad():
            return float(torch.linalg.norm(self.product(params) - self.M_star) / torch.linalg.norm(self.M_star))

    @property
    def sigma_min(self) -> float:
        r""":math:`\sigma_{r_\star}(M_\star) = 1/\kappa`."""
        return float(self.sigma[-1])

    @property
    def x0(self) -> Any:
        """The starting point chosen by :attr:`init` (a fresh copy)."""
        return self.start(self.init)

    def start(self, init: str) -> Any:
        """A fresh copy of the ``"small_random"`` or ``"spectral"`` initialisation."""
        if init not in ("small_random", "spectral"):
            raise ValueError(f"init must be 'small_random' or 'spectral', got {init!r}")
        x = self.x0_random if init == "small_random" else self.x0_spectral
        return x.clone() if isinstance(x, Tensor) else tuple(t.clone() for t in x)

    def problem(self, init: str | None = None) -> Any:
        """A :class:`curvlab.Minimize` of :meth:`loss` starting at the chosen initialisation."""
        from .problems import Minimize

        return Minimize(self.loss, self.start(init or self.init))


def _haar(n: int, r: int, g: torch.Generator, dtype: torch.dtype) -> Tensor:
    Q, R = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=dtype))
    return Q * torch.sign(torch.diagonal(R))


def matrix_sensing(
    n: int | tuple[int, int],
    r: int,
    kappa: float,
    m: int | None = None,
    *,
    symmetric: bool = True,
    r_model: int | None = None,
    init: str = "small_random",
    init_scale: float = 1e-3,
    noise: float = 0.0,
    design: str = "auto",
    seed: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> MatrixSensing:
    r"""Generate a low-rank matrix-sensing instance (Tong, Ma & Chi 2021 §5; Xu et al. 2023 §5).

    Args:
        n: matrix size ``n`` (square) or ``(n1, n2)`` (asymmetric only).
        r: true rank :math:`r_\star` (``1 <= r <= min(n1, n2)``).
        kappa: condition number :math:`\kappa \ge 1` of :math:`M_\star`.
        m: number of measurements (default ``5·n·r``, the papers' benchmark ``m = 5nr``).
        symmetric: PSD :math:`M_\star = X_\star X_\star^\top` and a single factor ``X``
            (else ``M⋆ = L⋆R⋆ᵀ`` and factors ``(L, R)``).
        r_model: columns of the factors (default ``r``; ``> r`` is the overparameterised
            setting of ScaledGD(λ)).
        init: ``"small_random"`` (:math:`\alpha G`, :math:`G_{ij}\sim\mathcal N(0,1/n)`) or
            ``"spectral"`` — which start :attr:`MatrixSensing.x0` and :meth:`MatrixSensing.problem`
            use; both are always computed.
        init_scale: :math:`\alpha` of the small random initialisation (relative to
            :math:`\|M_\star\| = 1`; Xu et al. need it small, polynomially in :math:`1/n, 1/\kappa`).
        noise: standard deviation of i.i.d. Gaussian noise added to ``y``.
        design: ``"gaussian"``, ``"srht"`` or ``"auto"`` (see the module docstring).
        seed: seed of every random draw (``None``: a fresh one from torch's global generator).
        dtype: floating dtype of everything.

    Returns:
        A :class:`MatrixSensing` instance.

    Raises:
        ValueError: on a non-positive size, ``r`` or ``r_model`` out of range, ``kappa < 1``,
            ``m`` out of range for the design, an unknown ``init`` / ``design``, or a
            rectangular ``n`` with ``symmetric=True``.

    Example:
        >>> inst = matrix_sensing(20, 2, kappa=10.0, seed=0)
        >>> inst.relative_error(inst.factors_star) < 1e-12
        True
    """
    if isinstance(n, tuple):
        if len(n) != 2:
            raise ValueError(f"n must be an int or a pair (n1, n2), got {n!r}")
        n1, n2 = (check_int(v, "n", 1) for v in n)
        if symmetric and n1 != n2:
            raise ValueError(f"a symmetric instance needs a square matrix, got n={n!r}")
    else:
        n1 = n2 = check_int(n, "n", 1)
    r = check_int(r, "r", 1)
    if r > min(n1, n2):
        raise ValueError(f"r must be <= min(n1, n2) = {min(n1, n2)}, got {r}")
    r_model = r if r_model is None else check_int(r_model, "r_model", 1)
    if r_model > min(n1, n2):
        raise ValueError(f"r_model must be <= min(n1, n2) = {min(n1, n2)}, got {r_model}")
    if not (check_positive(kappa, "kappa") >= 1):
        raise ValueError(f"kappa must be a finite number >= 1, got {kappa!r}")
    m = 5 * max(n1, n2) * r if m is None else check_int(m, "m", 1)
    check_choice(init, "init", ("small_random", "spectral"))
    check_choice(design, "design", ("auto", "gaussian", "srht"))
    check_positive(init_scale, "init_scale")
    check_positive(noise, "noise", allow_zero=True)
    if design == "auto":
        design = "gaussian" if m * n1 * n2 <= _GAUSSIAN_BUDGET else "srht"
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    g = torch.Generator().manual_seed(seed)

    sigma = kappa ** (-torch.arange(r, dtype=dtype) / max(r - 1, 1)) if r > 1 else torch.ones(1, dtype=dtype)
    U = _haar(n1, r, g, dtype)
    if symmetric:
        M_star = (U * sigma) @ U.T
        factors_star: Any = U * sigma.sqrt()
    else:
        V = _haar(n2, r, g, dtype)
        M_star = (U * sigma) @ V.T
        factors_star = (U * sigma.sqrt(), V * sigma.sqrt())

    if design == "gaussian":
        op = _Design("gaussian", (n1, n2), m, A=torch.randn(m, n1, n2, generator=g, dtype=dtype))
    else:
        N = 1 << max(0, math.ceil(math.log2(n1 * n2)))
        if m > N:
            raise ValueError(f"the srht design has at most {N} distinct measurements, got m={m}")
        signs = torch.randint(0, 2, (N,), generator=g).to(dtype) * 2 - 1
        op = _Design("srht", (n1, n2), m, signs=signs, rows=torch.randperm(N, generator=g)[:m])
    y = op(M_star)
    if noise > 0:
        y = y + noise * torch.randn(m, generator=g, dtype=dtype)

    # small random initialisation (Xu et al. 2023, Alg. 1): alpha * G, G_ij ~ N(0, 1/n)
    x_rand: Any = init_scale * torch.randn(n1, r_model, generator=g, dtype=dtype) / math.sqrt(n1)
    if not symmetric:
        x_rand = (x_rand, init_scale * torch.randn(n2, r_model, generator=g, dtype=dtype) / math.sqrt(n2))
    # spectral initialisation (Tong et al. 2021, Alg. 1): top-r part of (1/m) A*(y)
    Y = op.adjoint(y) / m
    k = min(r_model, n1, n2)
    if symmetric:
        w, Q = torch.linalg.eigh((Y + Y.T) / 2)
        w, Q = w.flip(0)[:k].clamp_min(0), Q.flip(1)[:, :k]
        x_spec: Any = torch.zeros(n1, r_model, dtype=dtype)
        x_spec[:, :k] = Q * w.sqrt()
    else:
        Us, s, Vh = torch.linalg.svd(Y, full_matrices=False)
        L0, R0 = torch.zeros(n1, r_model, dtype=dtype), torch.zeros(n2, r_model, dtype=dtype)
        L0[:, :k], R0[:, :k] = Us[:, :k] * s[:k].sqrt(), Vh[:k].T * s[:k].sqrt()
        x_spec = (L0, R0)
    return MatrixSensing(
        n1=n1,
        n2=n2,
        r=r,
        r_model=r_model,
        kappa=float(kappa),
        m=m,
        symmetric=symmetric,
        sigma=sigma,
        M_star=M_star,
        factors_star=factors_star,
        y=y,
        noise=float(noise),
        operator=op,
        x0_random=x_rand,
        x0_spectral=x_spec,
        init=init,
        design=design,
    )
