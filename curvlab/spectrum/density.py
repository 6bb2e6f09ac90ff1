r"""Spectral density by stochastic Lanczos quadrature (SLQ).

The spectral density (density of states) of a symmetric :math:`A \in \mathbb R^{n\times n}`
with eigenpairs :math:`(\lambda_i, u_i)` is :math:`\phi(t) = \frac1n\sum_i \delta(t-\lambda_i)`.
For a unit vector :math:`v`, :math:`v^\top f(A) v = \sum_i (u_i^\top v)^2 f(\lambda_i)` is
a Riemann–Stieltjes integral that :math:`m` Lanczos steps from :math:`v` evaluate by
Gauss quadrature (Golub & Meurant, *Matrices, Moments and Quadrature*, 2010): the
nodes are the Ritz values :math:`\theta_j` (eigenvalues of the tridiagonal
:math:`T_m = S\Theta S^\top`) and the weights :math:`\tau_j^2 = (e_1^\top s_j)^2`, exact for
polynomials of degree :math:`< 2m`. With random :math:`v` (here Rademacher, scaled to
unit norm) :math:`\mathbb E[(u_i^\top v)^2] = 1/n`, so averaging over ``n_probes`` starts
and replacing each node by a Gaussian of width :math:`\sigma` gives

.. math::
    \hat\phi(t) = \frac{1}{n_v}\sum_{l=1}^{n_v}\sum_{j=1}^{m} (\tau_j^{(l)})^2\,
    \frac{1}{\sigma\sqrt{2\pi}} e^{-(t-\theta_j^{(l)})^2/(2\sigma^2)}

(Lin, Saad & Yang 2016, "Approximating spectral densities of large matrices", SIAM
Review 58(1); Ubaru, Chen & Saad 2017; Ghorbani, Krishnan & Xiao 2019, "An
investigation into neural net optimization via Hessian eigenvalue density", ICML).
The quadrature's moments :math:`\sum \tau_j^2\theta_j^p` are unbiased (Hutchinson)
estimates of :math:`\operatorname{tr}(A^p)/n` for :math:`p < 2m`, and the discrete measure
is within Wasserstein-1 distance :math:`O((\lambda_{\max}-\lambda_{\min})/m)` of
:math:`\phi` plus sampling error (Chen, Trogdon & Ubaru 2021, "Analysis of stochastic
Lanczos quadrature for spectrum approximation", ICML).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._common import as_symmetric_operator, check_int, check_positive, make_generator, rademacher

__all__ = ["Density", "density"]

_MATPLOTLIB_MISSING = (
    "plotting a Density needs matplotlib, an optional dependency of curvlab: "
    "pip install matplotlib (or pip install 'curvlab[plot]')"
)


def _gaussian_mixture(t: Tensor, nodes: Tensor, weights: Tensor, sigma: float, chunk: int = 4096) -> Tensor:
    """``sum_j weights_j N(t; nodes_j, sigma^2)`` at every point of ``t`` (1-D)."""
    out = torch.empty_like(t)
    c = 1.0 / (sigma * math.sqrt(2.0 * math.pi))
    for i in range(0, t.shape[0], chunk):
        d = (t[i : i + chunk, None] - nodes[None, :]) / sigma
        out[i : i + chunk] = c * (torch.exp(-0.5 * d * d) @ weights)
    return out


@dataclass
class Density:
    r"""An estimated spectral density :math:`\hat\phi` (integrates to 1), from :func:`density`.

    Attributes:
        grid: ``(G,)`` points (on the operator's device, its dtype).
        values: ``(G,)`` :math:`\hat\phi` on ``grid``.
        nodes: ``(N,)`` Ritz values of every probe (the quadrature nodes, unbroadened).
        weights: ``(N,)`` their weights :math:`\tau_j^2/n_v` (they sum to 1).
        probe: ``(N,)`` index of the probe each node came from.
        sigma: Gaussian broadening width.
        n: size of the operator.
        n_probes: number of random start vectors.
        n_lanczos: Lanczos steps per probe (a probe stops early at an invariant subspace).
        n_matvecs: products with the operator used.
    """

    grid: Tensor
    values: Tensor
    nodes: Tensor
    weights: Tensor
    probe: Tensor
    sigma: float
    n: int
    n_probes: int
    n_lanczos: int
    n_matvecs: int

    def __call__(self, t: Tensor | float) -> Tensor:
        """:math:`\\hat\\phi(t)` at arbitrary points ``t`` (a float or a tensor)."""
        tt = torch.as_tensor(t, dtype=self.nodes.dtype, device=self.nodes.device)
        flat = tt.reshape(-1)
        return _gaussian_mixture(flat, self.nodes, self.weights, self.sigma).reshape(tt.shape)

    @property
    def resolution(self) -> float:
        """Mean spacing of one probe's nodes, ``(max node - min node) / (n_lanczos - 1)``.

        Eigenvalues closer than this are not resolved by an ``n_lanczos``-node quadrature.
        """
        return float(self.nodes.max() - self.nodes.min()) / max(self.n_lanczos - 1, 1)

    # ---------------------------------------------------------------- statistics
    def _per_probe(self, values: Tensor) -> Tensor:
        """Sum ``weights * values`` per probe, rescaled to per-probe estimates (shape ``(n_probes,)``)."""
        out = torch.zeros(self.n_probes, dtype=values.dtype, device=values.device)
        out.index_add_(0, self.probe, self.weights * values)
        return out * self.n_probes

    def moment(self, p: int) -> float:
        r"""The ``p``-th moment :math:`\frac1n\operatorname{tr}(A^p)` of the spectrum, from the quadrature.

        Unbiased for ``p < 2 * n_lanczos`` (Gauss quadrature is exact there; only the
        random start vectors contribute error, see :meth:`moment_std_error`). The
        Gaussian broadening is not included (it would add :math:`\sigma^2` to the second
        moment).
        """
        p = check_int(p, "p", 0)
        return float((self.weights * self.nodes**p).sum())

    def moment_std_error(self, p: int) -> float:
        """Standard error of :meth:`moment` from the spread over probes (``nan`` with one probe)."""
        p = check_int(p, "p", 0)
        if self.n_probes < 2:
            return float("nan")
        return float(self._per_probe(self.nodes**p).std(correction=1) / math.sqrt(self.n_probes))

    def mass(self, lo: float = -math.inf, hi: float = math.inf) -> float:
        """Fraction of eigenvalues in ``[lo, hi)``, from the quadrature nodes (unbroadened)."""
        sel = (self.nodes >= lo) & (self.nodes < hi)
        return float(self.weights[sel].sum())

    def negative_mass(self, threshold: float = 0.0) -> float:
        """Fraction of eigenvalues below ``-threshold`` (``threshold >= 0`` ignores tiny negative ones).

        A node stands for all eigenvalues near it, so when many eigenvalues crowd around zero
        (often most of a trained network's bulk) the node nearest zero carries them all to one
        side, and the standard error over probes does not show that bias.
        :meth:`negative_mass_bounds` gives the interval the quadrature guarantees;
        :meth:`negative_spectral_mass` weighs eigenvalues by size and is robust to the effect.
        """
        return self.mass(hi=-abs(float(threshold)))

    def negative_mass_bounds(self, threshold: float = 0.0) -> tuple[float, float]:
        r"""Bounds on the fraction of eigenvalues below ``-threshold`` that the quadrature guarantees.

        For Gauss quadrature nodes :math:`\theta_1 < \dots < \theta_m` with weights :math:`w_j`
        of a measure :math:`\mu`, the Chebyshev–Markov–Stieltjes inequalities
        :math:`\sum_{j<k} w_j \le \mu((-\infty, \theta_k)) \le \mu((-\infty, \theta_k]) \le \sum_{j\le k} w_j`
        (Szegő, *Orthogonal Polynomials*, §3.41; Golub & Meurant 2010, §6.2) bracket
        :math:`\mu((-\infty, t))` between the mass of the nodes below the last node under
        :math:`t` and the mass up to the first node at or above it. Applied per probe and
        averaged, the bounds bracket the (unbiased) probe-weighted fraction; only the
        sampling error of the probes (:meth:`negative_mass_std_error`) remains outside.

        Returns:
            ``(lower, upper)``.
        """
        t = -abs(float(threshold))
        lo = hi = 0.0
        for i in range(self.n_probes):
            sel = self.probe == i
            th, w = self.nodes[sel], self.weights[sel]
            order = torch.argsort(th)
            th, w = th[order], w[order]
            below = int((th < t).sum())
            cum = torch.cumsum(w, 0)
            lo += float(cum[below - 2]) if below >= 2 else 0.0
            hi += float(cum[min(below, th.numel() - 1)])
        return lo, hi

    def negative_spectral_mass(self) -> float:
        r"""Share of the absolute spectral mass on negative eigenvalues.

        That is :math:`\sum_{\lambda_i<0}|\lambda_i| / \sum_i|\lambda_i|`, from the quadrature.

        Unlike the count of :meth:`negative_mass`, this weighs every eigenvalue by its size, so the
        many near-zero eigenvalues whose sign the quadrature cannot resolve (those within about
        :attr:`resolution` of zero) barely matter; 0 at a minimum, 1/2 for a spectrum symmetric about zero.
        """
        a = self.weights * self.nodes.abs()
        total = float(a.sum())
        return float(a[self.nodes < 0].sum()) / total if total > 0 else 0.0

    def negative_mass_std_error(self, threshold: float = 0.0) -> float:
        """Standard error of :meth:`negative_mass` over probes (``nan`` with one probe)."""
        if self.n_probes < 2:
            return float("nan")
        ind = (self.nodes < -abs(float(threshold))).to(self.weights.dtype)
        return float(self._per_probe(ind).std(correction=1) / math.sqrt(self.n_probes))

    def integral(self) -> float:
        """:math:`\\int\\hat\\phi` over the grid by the trapezoidal rule (about 1)."""
        return float(torch.trapezoid(self.values, self.grid))

    # ------------------------------------------------------------------ plotting
    def plot(self, ax: Any = None, log: bool = True, *, show_nodes: bool = False, **kwargs: Any) -> Any:
        """Draw :math:`\\hat\\phi` with matplotlib.

        Args:
            ax: a matplotlib ``Axes`` (default: a new figure via ``pyplot``).
            log: logarithmic density axis (the bulk-plus-outliers picture of Ghorbani
                et al. 2019 needs it: outliers carry mass ~1/n). Values below
                ``1e-12 * max`` are clipped so the axis stays readable.
            show_nodes: mark the Ritz nodes along the bottom.
            **kwargs: passed to ``ax.plot``.

        Returns:
            The ``Axes``.

        Raises:
            ImportError: matplotlib is not installed.
        """
        if ax is None:
            try:
                import matplotlib.pyplot as plt
            except ImportError as e:  # pragma: no cover - exercised by monkeypatching in tests
                raise ImportError(_MATPLOTLIB_MISSING) from e
            _, ax = plt.subplots(figsize=(6.4, 4.0))
        else:
            _require_matplotlib()
        x = self.grid.detach().cpu().double().numpy()
        y = self.values.detach().cpu().double().numpy()
        kwargs.setdefault("lw", 1.5)
        if log:
            floor = max(float(y.max()), 1e-300) * 1e-12
            y = y.clip(min=floor)
            ax.set_yscale("log")
            ax.set_ylim(bottom=floor)
        ax.plot(x, y, **kwargs)
        if show_nodes:
            nodes = self.nodes.detach().cpu().double().numpy()
            ax.plot(nodes, [y.min()] * len(nodes), "|", color="k", alpha=0.5, ms=8)
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density (log scale)" if log else "density")
        return ax

    def save(self, path: str, log: bool = True, *, dpi: int = 150, title: str | None = None) -> None:
        """Write the plot of :meth:`plot` to ``path`` (PNG, or any format matplotlib infers from the suffix).

        Uses matplotlib's object API (no ``pyplot`` state, works without a display). In a
        data-parallel run (:mod:`curvlab.distributed`) only rank 0 writes the file; the other
        ranks return without doing anything.

        Raises:
            ImportError: matplotlib is not installed.
        """
        from .. import distributed as _dist

        if not _dist.is_main_process():
            return
        _require_matplotlib()
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6.4, 4.0))
        ax = fig.add_subplot(1, 1, 1)
        self.plot(ax=ax, log=log)
        if title:
            ax.set_title(title)
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ImportError(_MATPLOTLIB_MISSING) from e


def density(
    op: Any,
    n_probes: int = 2,
    n_lanczos: int = 90,
    *,
    sigma: float | None = None,
    grid: Tensor | None = None,
    n_grid: int | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> Density:
    r"""Spectral density of a symmetric operator by stochastic Lanczos quadrature.

    Runs ``n_lanczos`` steps of Lanczos with full reorthogonalisation
    (:func:`curvlab.linalg.lanczos`) from each of ``n_probes`` normalised Rademacher
    vectors, takes the Ritz values as nodes and the squared first components of
    :math:`T_m`'s eigenvectors as weights, and broadens every node by a Gaussian
    (see the module docstring for the formula and the papers).

    Defaults: ``n_lanczos = 90`` as in Ghorbani et al. (2019); ``n_probes = 2``:
    in high dimension one probe's weights :math:`(u_i^\top v)^2` already concentrate
    around :math:`1/n` (the probe count bounds of Ubaru, Chen & Saad 2017 shrink with
    :math:`n`), and a second probe gives the spread behind
    :meth:`Density.moment_std_error`; ``sigma = h / sqrt(8 ln 3)`` with
    :math:`h = (\theta_{\max} - \theta_{\min}) / (m - 1)` the mean node spacing: the
    rule of Lin, Saad & Yang (2016) with Papyan's (2020, App. D.2) :math:`\kappa = 3`,
    which makes neighbouring nodes' bumps merge into a smooth bulk while leaving
    isolated outliers visible.

    Args:
        op: a symmetric ``(n, n)`` :class:`~curvlab.linops.LinearOperator` or dense tensor.
        n_probes: number of random start vectors (``n_probes * n_lanczos`` products).
        n_lanczos: Lanczos steps per start vector (at most ``n`` are taken).
        sigma: Gaussian broadening width (``> 0``); default above. Eigenvalues closer
            than about ``sigma`` are not told apart.
        grid: points to evaluate the density on (default: ``n_grid`` points spanning
            the nodes ± 5 sigma).
        n_grid: size of the default grid (default: enough for 10 points per sigma,
            at least 1000, at most 200 000).
        generator: :class:`torch.Generator` on the operator's device.
        seed: alternative to ``generator``: seed a fresh one.

    Returns:
        A :class:`Density` with ``grid``, ``values``, the raw ``nodes`` and ``weights``,
        and ``.plot()`` / ``.save(path)``.

    Raises:
        ValueError: ``op`` not symmetric, ``n_probes`` or ``n_lanczos`` < 1, ``sigma <= 0``,
            a ``grid`` that is not 1-D.
        TypeError: non-integer counts.

    Example:
        >>> A = torch.diag(torch.linspace(-1.0, 1.0, 400, dtype=torch.float64))
        >>> d = density(A, n_probes=2, n_lanczos=40, seed=0)
        >>> round(d.integral(), 3)
        1.0
    """
    from curvlab.linalg import lanczos

    A = as_symmetric_operator(op, "density")
    n_probes = check_int(n_probes, "n_probes", 1)
    n_lanczos = check_int(n_lanczos, "n_lanczos", 1)
    if sigma is not None:
        sigma = check_positive(sigma, "sigma")
    if n_grid is not None:
        n_grid = check_int(n_grid, "n_grid", 2)
    if grid is not None and (not isinstance(grid, Tensor) or grid.ndim != 1):
        raise ValueError(f"grid must be a 1-D tensor, got {getattr(grid, 'shape', type(grid).__name__)}")
    n, dtype, device = A.shape[0], A.dtype, A.device
    gen = make_generator(generator, seed, device, distributed=A.distributed)
    start = A.n_matvecs

    nodes, weights, probe = [], [], []
    for i in range(n_probes):
        v0 = rademacher(n, 1, dtype, device, gen)[:, 0] / math.sqrt(n)
        res = lanczos(A, n_lanczos, v0=v0, reorth="full", store_basis=False)
        theta, S = res.ritz()
        nodes.append(theta)
        weights.append(S[0, :] ** 2 / n_probes)
        probe.append(torch.full_like(theta, i, dtype=torch.long))
    nodes_t = torch.cat(nodes)
    weights_t = torch.cat(weights)
    weights_t = weights_t / weights_t.sum()  # exact to rounding; keeps the integral at 1
    lo, hi = float(nodes_t.min()), float(nodes_t.max())
    width = hi - lo
    if sigma is None:  # Lin, Saad & Yang (2016) with kappa = 3 (Papyan 2020); width 0: one narrow peak
        h = width / max(n_lanczos - 1, 1)
        sigma = h / math.sqrt(8.0 * math.log(3.0)) if width > 0 else 1e-3 * max(abs(hi), 1.0)
    if grid is None:
        span = width + 10.0 * sigma
        G = n_grid if n_grid is not None else int(min(200_000, max(1000, math.ceil(10.0 * span / sigma))))
        grid = torch.linspace(lo - 5.0 * sigma, hi + 5.0 * sigma, G, dtype=dtype, device=device)
    else:
        grid = grid.to(dtype=dtype, device=device)
    values = _gaussian_mixture(grid, nodes_t, weights_t, sigma)
    return Density(
        grid=grid,
        values=values,
        nodes=nodes_t,
        weights=weights_t,
        probe=torch.cat(probe),
        sigma=float(sigma),
        n=n,
        n_probes=n_probes,
        n_lanczos=n_lanczos,
        n_matvecs=A.n_matvecs - start,
    )
