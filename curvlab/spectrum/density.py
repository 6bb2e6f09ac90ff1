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

from curvlab.checks import check_int, check_positive
from curvlab.status import Status

from ._common import Callback, Monitor, as_symmetric_operator, make_generator, nonfinite_error, rademacher

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
        status: a :class:`~curvlab.Status`: ``"converged"`` (every probe ran as requested) or
            ``"callback"`` (the callback stopped the run: the probes finished so far).
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
    status: Status = Status.CONVERGED

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
    def clusters(self, gap: float = 4.0) -> list[tuple[float, float, float, float]]:
        r"""Groups of quadrature nodes (all probes pooled) closer than ``gap * sigma`` to a neighbour.

        Broadened by :math:`\sigma`, such a group is one connected piece of the plotted
        density: the bulk, or an outlier (or a group of outliers) standing apart.

        Returns:
            ``[(centre, mass, lo, hi), ...]`` in increasing order: the weighted mean of the
            group's nodes, its share of the eigenvalues, its lowest and its highest node.
        """
        order = torch.argsort(self.nodes)
        th = self.nodes[order].detach().double().cpu()
        w = self.weights[order].detach().double().cpu()
        out: list[tuple[float, float, float, float]] = []
        start = 0
        cut = gap * self.sigma
        for i in range(1, th.numel() + 1):
            if i == th.numel() or float(th[i] - th[i - 1]) > cut:
                tw = w[start:i]
                mass = float(tw.sum())
                centre = float((tw * th[start:i]).sum() / mass) if mass > 0 else float(th[start:i].mean())
                out.append((centre, mass, float(th[start]), float(th[i - 1])))
                start = i
        return out

    def outliers(self, max_mass: float = 0.05) -> Tensor:
        """Centres of the node groups (:meth:`clusters`) that stand apart from the bulk.

        The bulk is the heaviest group; an outlier is a group outside its range that holds
        less than ``max_mass`` of the eigenvalues (a trained network's outliers hold a few
        eigenvalues each: about ``1/n`` of the mass; Sagun et al. 2017, Papyan 2020). SLQ
        locates them to within :attr:`sigma`; :func:`~curvlab.spectrum.eigsh` gives their
        exact values.

        Returns:
            ``(n_outliers,)`` float64 tensor, increasing.
        """
        cl = self.clusters()
        bulk = max(cl, key=lambda c: c[1])
        keep = [c[0] for c in cl if c is not bulk and c[1] < max_mass and (c[0] > bulk[3] or c[0] < bulk[2])]
        return torch.tensor(keep, dtype=torch.float64)

    def floor(self) -> float:
        r"""The lower end of the log-scale density axis: a tenth of the smallest peak worth showing.

        One eigenvalue carries mass :math:`1/n`, broadened into a peak of height
        :math:`1/(n\sigma\sqrt{2\pi})`; an outlier group found by the probes may carry less
        (the quadrature weight of an outlier fluctuates with the probe). The floor is a tenth
        of the lower of the two, so that every peak shows whole and the axis does not spend
        decades on the Gaussian tails (at least :math:`10^{-12}` of the maximum).
        """
        peak = 1.0 / (self.sigma * math.sqrt(2.0 * math.pi))
        masses = [c[1] for c in self.clusters() if c[1] > 0]
        smallest = min([1.0 / self.n, *masses])
        top = float(self.values.max())
        return max(0.1 * smallest * peak, 1e-12 * top) if top > 0 else 1e-300

    def plot(
        self,
        ax: Any = None,
        log: bool = True,
        *,
        show_nodes: bool = False,
        outliers: Any = "auto",
        inset: bool | tuple[float, float, float, float] = False,
        floor: float | None = None,
        xlabel: str | None = "eigenvalue",
        ylabel: str | None = None,
        title: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Draw :math:`\\hat\\phi` with matplotlib, every peak whole.

        The axis limits are set after the curve is drawn: the top leaves room above the
        highest peak; on the log scale the bottom is :meth:`floor` (a tenth of the smallest
        peak that matters, instead of the ``1e-12`` of the maximum Gaussian tails reach) and
        the eigenvalue axis ends where the density drops below it.

        Args:
            ax: a matplotlib ``Axes`` (default: a new figure via ``pyplot``).
            log: logarithmic density axis (the bulk-plus-outliers picture of Ghorbani
                et al. 2019 needs it: outliers carry mass ~1/n).
            show_nodes: mark the Ritz nodes along the bottom.
            outliers: ``"auto"`` marks the node groups standing apart from the bulk
                (:meth:`outliers`) with a triangle above their peak; a tensor / list of
                eigenvalues (e.g. from :func:`~curvlab.spectrum.eigsh`) marks those; ``None``
                marks nothing.
            inset: add a linear-scale inset of the bulk (``True``: upper right; or the inset's
                ``(x0, y0, width, height)`` in axes coordinates).
            floor: the bottom of the log axis (default :meth:`floor`).
            xlabel, ylabel, title: axis labels and title (``ylabel`` default: ``"density (log
                scale)"`` or ``"density"``; ``None`` leaves the axis unlabelled).
            **kwargs: passed to ``ax.plot`` (``label=``, ``color=``, ``lw=``, ...).

        Returns:
            The ``Axes`` (the inset, if any, is in ``ax.child_axes``).

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
        import numpy as np

        x = self.grid.detach().cpu().double().numpy()
        y = self.values.detach().cpu().double().numpy()
        kwargs.setdefault("lw", 1.5)
        top = float(y.max()) if y.size and float(y.max()) > 0 else 1.0
        if log:
            lo_y = float(floor) if floor is not None else self.floor()
            lo_y = min(max(lo_y, 1e-300), 0.5 * top)
            yp = np.where(y >= lo_y, y, np.nan)  # nothing drawn below the floor (Gaussian tails)
            ax.set_yscale("log")
        else:
            lo_y, yp = 0.0, y
        (line,) = ax.plot(x, yp, **kwargs)
        if log:
            above = np.nonzero(y >= lo_y)[0]
            pad = 2.0 * self.sigma
            xlim = (max(x[0], x[above[0]] - pad), min(x[-1], x[above[-1]] + pad)) if above.size else (x[0], x[-1])
        else:
            xlim = (x[0], x[-1])
        pts = np.zeros(0)
        if outliers is not None:
            if isinstance(outliers, str) and outliers != "auto":
                raise ValueError(f"outliers must be 'auto', None or a list of eigenvalues, got {outliers!r}")
            chosen = self.outliers() if isinstance(outliers, str) else outliers
            pts = np.asarray(torch.as_tensor(chosen).detach().double().cpu().reshape(-1))
        at = np.interp(pts, x, y)
        marks = np.maximum(at, lo_y) * 1.8 if log else at + 0.04 * top
        if pts.size:
            color = kwargs.get("color", line.get_color())
            ax.plot(pts, marks, "v", color=color, ms=5, ls="none", label="outliers")
        hi_y = 3.0 * top if log else 1.08 * top
        box = None
        if inset is not False:
            box, hi_y = self._inset_box(inset, x, yp, pts, marks, xlim, lo_y, hi_y, log)
        ax.set_xlim(*xlim)
        ax.set_ylim(lo_y, hi_y)
        if show_nodes:
            nodes = self.nodes.detach().cpu().double().numpy()
            ax.plot(nodes, [lo_y * 1.5 if log else 0.0] * len(nodes), "|", color="k", alpha=0.5, ms=8)
        if xlabel:
            ax.set_xlabel(xlabel)
        ylab = ylabel if ylabel is not None else ("density (log scale)" if log else "density")
        if ylab:
            ax.set_ylabel(ylab)
        if title:
            ax.set_title(title)
        if box is not None:
            self._inset(ax, box, x, y, line.get_color())
        return ax

    def _inset_box(
        self, where: Any, x: Any, yp: Any, pts: Any, marks: Any, xlim: Any, lo_y: float, hi_y: float, log: bool
    ) -> tuple[tuple[float, float, float, float], float]:
        """Where the bulk inset goes, and the top of the density axis that leaves room for it.

        The inset takes the upper 45 % of the axes on the side (left or right) where the curve
        is lower; the density axis is raised until the curve and the outlier marks under the
        inset stay below it.
        """
        import numpy as np

        if where is True:
            w, h = 0.44, 0.42
            cands = [(0.535, 0.555, w, h), (0.025, 0.555, w, h)]
        else:
            box = tuple(float(v) for v in where)
            if len(box) != 4:
                raise ValueError(f"inset must be True or (x0, y0, width, height), got {where!r}")
            cands = [box]  # type: ignore[list-item]

        def height_under(b: tuple[float, ...]) -> float:
            x0 = xlim[0] + (xlim[1] - xlim[0]) * (b[0] - 0.03)
            x1 = xlim[0] + (xlim[1] - xlim[0]) * (b[0] + b[2] + 0.03)
            sel = (x >= x0) & (x <= x1)
            hs = [float(np.nanmax(yp[sel]))] if sel.any() and not np.isnan(yp[sel]).all() else []
            hs += [float(m) for p, m in zip(pts, marks) if x0 <= p <= x1]
            return max(hs) if hs else lo_y

        box = min(cands, key=height_under)
        under = height_under(box)
        bottom = box[1] - 0.1  # the curve stays below the inset and its tick labels
        if log:
            lo, u = math.log10(lo_y), math.log10(max(under, lo_y))
            need = 10 ** (lo + (u - lo) / bottom)
        else:
            need = under / bottom
        return box, max(hi_y, need)

    def _inset(self, ax: Any, box: tuple[float, float, float, float], x: Any, y: Any, color: Any) -> Any:
        """A linear-scale inset of the bulk (the heaviest node group ± 3 sigma)."""
        import numpy as np

        bulk = max(self.clusters(), key=lambda c: c[1])
        lo, hi = bulk[2] - 3.0 * self.sigma, bulk[3] + 3.0 * self.sigma
        sel = (x >= lo) & (x <= hi)
        sub = ax.inset_axes(list(box))
        sub.plot(x[sel], y[sel], color=color, lw=1.0)
        sub.set_xlim(lo, hi)
        sub.set_ylim(0.0, 1.08 * float(np.max(y[sel])) if sel.any() else 1.0)
        sub.set_yscale("linear")
        sub.text(0.03, 0.95, "bulk, linear scale", transform=sub.transAxes, va="top", fontsize=7)
        sub.tick_params(labelsize=6)
        return sub

    def save(
        self,
        path: str,
        log: bool = True,
        *,
        dpi: int = 150,
        title: str | None = None,
        xlabel: str | None = "eigenvalue",
        ylabel: str | None = None,
        label: str | None = None,
        outliers: Any = "auto",
        inset: bool | tuple[float, float, float, float] = False,
        figsize: tuple[float, float] = (6.4, 4.0),
    ) -> str:
        """Write the plot of :meth:`plot` to ``path`` (PNG, or any format matplotlib infers from the suffix).

        Uses matplotlib's object API (no ``pyplot`` state, works without a display). In a
        data-parallel run (:mod:`curvlab.distributed`) only rank 0 writes the file; the other
        ranks return without doing anything.

        Args:
            path: the file to write.
            log, outliers, inset: as in :meth:`plot`.
            dpi: resolution of a raster image.
            title, xlabel, ylabel: labels of the figure.
            label: legend entry of the curve (a legend is drawn when it or outlier marks are given).
            figsize: figure size in inches.

        Returns:
            ``path``.

        Raises:
            ImportError: matplotlib is not installed.
        """
        from .. import distributed as _dist

        if not _dist.is_main_process():
            return path
        _require_matplotlib()
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize)
        ax = fig.add_subplot(1, 1, 1)
        self.plot(
            ax=ax, log=log, outliers=outliers, inset=inset, xlabel=xlabel, ylabel=ylabel, title=title, label=label
        )
        if label is not None or ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=8, loc="upper left" if inset is not False else "best")
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
        return path

    def __repr__(self) -> str:
        lo, hi = float(self.nodes.min()), float(self.nodes.max())
        return (
            f"Density(n={self.n}, n_probes={self.n_probes}, n_lanczos={self.n_lanczos}, nodes in [{lo:.4g}, {hi:.4g}], "
            f"sigma={self.sigma:.3g}, grid={self.grid.numel()} points, n_matvecs={self.n_matvecs}, "
            f"status={self.status.value!r})"
        )


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
    progress: bool = False,
    callback: Callback | None = None,
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
        progress: show a tqdm bar of the products (on the main process of a data-parallel run).
        callback: ``callback(info) -> bool`` after every probe, with ``info = {"probe": i,
            "n_matvecs": ..., "nodes": ..., "weights": ...}`` (that probe's quadrature). Returning
            ``True`` stops: the density of the probes done (``status="callback"``).

    Returns:
        A :class:`Density` with ``grid``, ``values``, the raw ``nodes`` and ``weights``,
        and ``.plot()`` / ``.save(path)``.

    Raises:
        ValueError: ``op`` not symmetric, ``n_probes`` or ``n_lanczos`` not an int >= 1,
            ``sigma <= 0``, a ``grid`` that is not 1-D, an operator whose products are not finite.
        TypeError: a non-bool ``progress``, a non-callable ``callback``.

    Example:
        >>> A = torch.diag(torch.linspace(-1.0, 1.0, 400, dtype=torch.float64))
        >>> d = density(A, n_probes=2, n_lanczos=40, seed=0)
        >>> round(d.integral(), 3)
        1.0
    """
    A = as_symmetric_operator(op, "density")
    mon = Monitor(A, progress, callback, "density")
    try:
        return _density(A, n_probes, n_lanczos, sigma, grid, n_grid, generator, seed, mon)
    finally:
        mon.close()


def _density(
    A: Any,
    n_probes: int,
    n_lanczos: int,
    sigma: float | None,
    grid: Tensor | None,
    n_grid: int | None,
    generator: torch.Generator | None,
    seed: int | None,
    mon: Monitor,
) -> Density:
    """:func:`density` on a validated operator, reporting to ``mon`` (shared with :func:`summary`)."""
    from curvlab.linalg import lanczos

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
    step_hook = (lambda info: mon.update()) if mon.bar is not None else None

    nodes, weights, probe = [], [], []
    status = Status.CONVERGED
    for i in range(n_probes):
        v0 = rademacher(n, 1, dtype, device, gen)[:, 0] / math.sqrt(n)
        res = lanczos(A, n_lanczos, v0=v0, reorth="full", store_basis=False, callback=step_hook)
        if res.status is Status.NAN:
            raise nonfinite_error("density", f"Lanczos step {res.alpha.numel()} of probe {i}")
        theta, S = res.ritz()
        nodes.append(theta)
        weights.append(S[0, :] ** 2)
        probe.append(torch.full_like(theta, i, dtype=torch.long))
        mon.update(probe=i + 1)
        if i + 1 < n_probes and mon.stop({"probe": i, "nodes": theta, "weights": S[0, :] ** 2}):
            status = Status.CALLBACK
            break
    used = len(nodes)
    nodes_t = torch.cat(nodes)
    weights_t = torch.cat(weights) / used
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
        n_probes=used,
        n_lanczos=n_lanczos,
        n_matvecs=A.n_matvecs - start,
        status=status,
    )
