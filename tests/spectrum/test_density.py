"""SLQ spectral density against dense eigenvalues: normalisation, moments, Wasserstein-1, plotting."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance

import curvlab as cl
from curvlab.spectrum import Density, density
from curvlab.spectrum._common import rademacher
from tests.conftest import dense_hessian, make_mlp


def _bulk_plus_outliers(n: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A rotated diagonal matrix: a Marchenko-Pastur-like bulk near zero, 10% negative, 6 outliers."""
    g = torch.Generator().manual_seed(seed)
    bulk = torch.randn(n - 6, generator=g, dtype=torch.float64) ** 2 * 0.2
    bulk[: (n - 6) // 10] *= -1.0
    ev = torch.cat([torch.tensor([30.0, 22.0, 15.0, 11.0, 8.0, 6.0], dtype=torch.float64), bulk])
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    A = Q @ torch.diag(ev) @ Q.T
    return 0.5 * (A + A.T), torch.sort(ev).values


def _w1_broadened(d: Density, eig: torch.Tensor) -> float:
    """W1 between the broadened density (its CDF on the grid) and the empirical eigenvalue distribution."""
    x = d.grid.double().numpy()
    cdf_hat = np.concatenate([[0.0], np.cumsum(0.5 * (d.values[1:] + d.values[:-1]).double().numpy() * np.diff(x))])
    cdf = np.searchsorted(np.sort(eig.numpy()), x, side="right") / eig.numel()
    return float(np.trapezoid(np.abs(cdf_hat - cdf), x))


def test_integrates_to_one_and_weights():
    A, _ = _bulk_plus_outliers()
    d = density(A, n_probes=3, n_lanczos=60, seed=0)
    assert d.integral() == pytest.approx(1.0, abs=1e-4)
    assert float(d.weights.sum()) == pytest.approx(1.0, abs=1e-12)
    assert d.nodes.shape == d.weights.shape == d.probe.shape == (180,)
    assert d.n_matvecs == 180 and d.n_probes == 3 and d.n_lanczos == 60 and d.n == 400
    assert bool((d.values >= 0).all())
    torch.testing.assert_close(d(d.grid[::50]), d.values[::50])
    assert d(0.0).ndim == 0


def test_moments_match_dense():
    A, eig = _bulk_plus_outliers()
    d = density(A, n_probes=30, n_lanczos=40, seed=1)
    for p in (1, 2, 3):
        exact = float((eig**p).mean())
        se = d.moment_std_error(p)
        assert abs(d.moment(p) - exact) <= 4 * se, (p, d.moment(p), exact, se)
    assert d.moment(0) == pytest.approx(1.0)


def test_quadrature_moments_are_exact_hutchinson_estimates():
    # Gauss quadrature with m nodes integrates polynomials of degree < 2m exactly:
    # sum_j tau_j^2 theta_j^p = v^T A^p v for the (normalised Rademacher) start vector v
    A, _ = _bulk_plus_outliers(120)
    d = density(A, n_probes=1, n_lanczos=10, generator=torch.Generator().manual_seed(7))
    v = rademacher(120, 1, torch.float64, torch.device("cpu"), torch.Generator().manual_seed(7))
    v = v[:, 0] / math.sqrt(120)
    for p in range(0, 20):
        exact = float(v @ torch.linalg.matrix_power(A, p) @ v)
        assert d.moment(p) == pytest.approx(exact, rel=1e-8, abs=1e-12)


def test_wasserstein_distance_to_dense_is_small():
    A, eig = _bulk_plus_outliers()
    width = float(eig[-1] - eig[0])
    d = density(A, n_probes=4, n_lanczos=80, seed=0)
    w1_nodes = wasserstein_distance(d.nodes.numpy(), eig.numpy(), d.weights.numpy())
    assert w1_nodes < 0.01 * width
    assert _w1_broadened(d, eig) < 0.02 * width


def test_hessian_of_mlp():
    params, model, loss_fn, f, X, Y, spec = make_mlp("ce", n=40, d=6, h=12, c=5)
    H = cl.linops.hessian(f, params, data=(X, Y))
    eig = torch.linalg.eigvalsh(dense_hessian(f, spec, (X, Y)))
    d = density(H, n_probes=8, n_lanczos=40, seed=0)
    width = float(eig[-1] - eig[0])
    assert d.integral() == pytest.approx(1.0, abs=1e-4)
    w1 = wasserstein_distance(d.nodes.numpy(), eig.numpy(), d.weights.numpy())
    assert w1 < 0.02 * width
    assert abs(d.moment(1) - float(eig.mean())) <= 4 * d.moment_std_error(1)
    # Lanczos finds the extreme eigenvalues: the nodes span the spectrum
    assert float(d.nodes.max()) == pytest.approx(float(eig[-1]), rel=1e-6)
    assert float(d.nodes.min()) == pytest.approx(float(eig[0]), rel=1e-3)


def test_negative_mass():
    A, eig = _bulk_plus_outliers()
    d = density(A, n_probes=10, n_lanczos=80, seed=0)
    true_frac = float((eig < 0).double().mean())
    assert abs(d.negative_mass() - true_frac) <= 4 * d.negative_mass_std_error() + 0.03
    lo, hi = d.negative_mass_bounds()
    assert lo - 0.03 <= true_frac <= hi + 0.03 and hi - lo < 0.3
    true_spec = float(eig[eig < 0].abs().sum() / eig.abs().sum())
    assert d.negative_spectral_mass() == pytest.approx(true_spec, abs=0.02)
    assert d.negative_mass(threshold=100.0) == 0.0
    assert d.mass() == pytest.approx(1.0)
    one = density(A, n_probes=1, n_lanczos=20, seed=0)
    assert math.isnan(one.negative_mass_std_error()) and math.isnan(one.moment_std_error(1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_negative_mass_bounds_contain_the_truth(seed):
    # 60% of the eigenvalues sit exactly at zero: the quadrature cannot tell their sign, the bounds say so
    g = torch.Generator().manual_seed(seed)
    ev = torch.cat([-torch.rand(80, generator=g), torch.zeros(300), 2 * torch.rand(120, generator=g)]).double()
    Q, _ = torch.linalg.qr(torch.randn(500, 500, generator=g, dtype=torch.float64))
    A = Q @ torch.diag(ev) @ Q.T
    d = density(0.5 * (A + A.T), n_probes=6, n_lanczos=40, seed=seed)
    lo, hi = d.negative_mass_bounds()
    true_frac = float((ev < 0).double().mean())
    slack = 4 * d.negative_mass_std_error()
    assert lo - slack <= true_frac <= hi + slack
    assert hi - lo > 0.3  # the unresolved zero cluster shows as a wide interval
    lo_t, hi_t = d.negative_mass_bounds(threshold=1e9)
    assert lo_t == 0.0 and hi_t <= 0.5


def test_sigma_grid_and_small_operator():
    A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    d = density(A, n_probes=2, n_lanczos=10, seed=0, sigma=0.05)
    assert d.sigma == 0.05 and d.n_matvecs <= 6  # Lanczos stops at the invariant subspace
    torch.testing.assert_close(torch.sort(torch.unique(d.nodes.round(decimals=8))).values, torch.diag(A))
    grid = torch.linspace(0.0, 4.0, 801, dtype=torch.float64)
    d2 = density(A, n_probes=1, n_lanczos=3, seed=0, grid=grid)
    torch.testing.assert_close(d2.grid, grid)
    d3 = density(torch.eye(5, dtype=torch.float64), 1, 5, seed=0)  # one distinct eigenvalue
    assert d3.integral() == pytest.approx(1.0, abs=1e-4)


@pytest.fixture(scope="module")
def outlier_density():
    A, eig = _bulk_plus_outliers(400)
    return density(A, n_probes=2, n_lanczos=60, seed=0), eig


def test_log_plot_shows_whole_peaks_above_a_sensible_floor(outlier_density):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    d, eig = outlier_density
    ax = Figure().add_subplot(1, 1, 1)
    d.plot(ax=ax)
    lo, hi = ax.get_ylim()
    top = float(d.values.max())
    assert ax.get_yscale() == "log"
    assert hi >= 2.0 * top  # the tallest peak is inside the axis (the old plot cut it at the first autoscale)
    assert max(float(np.nanmax(line.get_ydata())) for line in ax.lines) <= hi
    one_eigenvalue = 1.0 / (d.n * d.sigma * math.sqrt(2 * math.pi))  # the peak of one isolated eigenvalue
    assert lo == pytest.approx(d.floor()) and lo <= 0.1 * one_eigenvalue * 1.0001
    assert lo >= 1e-12 * top and math.log10(hi / lo) <= 8.0  # not 12+ decades of Gaussian tails
    # every outlier's peak reaches well above the floor
    for ev in eig[-6:]:
        assert float(d(float(ev))) > 3 * lo
    # the eigenvalue axis covers the spectrum, and stops where the density vanishes below the floor
    x0, x1 = ax.get_xlim()
    assert x0 <= float(eig[0]) and x1 >= float(eig[-1]) and x1 <= float(d.grid[-1]) + 1e-12


def test_outliers_found_and_marked(outlier_density):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    d, eig = outlier_density
    found = d.outliers()
    true = eig[-6:]
    assert found.numel() == 6
    torch.testing.assert_close(found, true, atol=3 * d.sigma, rtol=0)
    ax = Figure().add_subplot(1, 1, 1)
    d.plot(ax=ax, label="SLQ")
    marks = [ln for ln in ax.lines if ln.get_label() == "outliers"]
    assert len(marks) == 1
    xs, ys = marks[0].get_xdata(), marks[0].get_ydata()
    np.testing.assert_allclose(xs, found.numpy())
    assert all(y > float(d(float(x))) for x, y in zip(xs, ys))  # above each peak
    ax2 = Figure().add_subplot(1, 1, 1)
    d.plot(ax=ax2, outliers=[10.0, 20.0])  # the user's eigenvalues (e.g. eigsh)
    np.testing.assert_allclose([ln for ln in ax2.lines if ln.get_label() == "outliers"][0].get_xdata(), [10, 20])
    ax3 = Figure().add_subplot(1, 1, 1)
    d.plot(ax=ax3, outliers=None)
    assert len(ax3.lines) == 1
    with pytest.raises(ValueError, match="outliers must be"):
        d.plot(ax=ax3, outliers="some")


def test_linear_inset_of_the_bulk_and_linear_plot(outlier_density):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    d, eig = outlier_density
    ax = Figure().add_subplot(1, 1, 1)
    d.plot(ax=ax, inset=True)
    assert len(ax.child_axes) == 1
    sub = ax.child_axes[0]
    assert sub.get_yscale() == "linear"
    bulk = eig[:-6]
    x0, x1 = sub.get_xlim()
    assert x0 <= float(bulk.min()) and float(bulk.max()) <= x1 < float(eig[-6])  # the bulk, no outlier
    bulk_max = float(d.values[(d.grid >= x0) & (d.grid <= x1)].max())
    assert sub.get_ylim()[0] == 0.0 and bulk_max <= sub.get_ylim()[1] <= 1.1 * bulk_max
    axl = Figure().add_subplot(1, 1, 1)
    d.plot(ax=axl, log=False, show_nodes=True)
    assert axl.get_yscale() == "linear" and axl.get_ylim()[0] == 0.0 and axl.get_ylim()[1] >= float(d.values.max())
    assert axl.get_ylabel() == "density"
    with pytest.raises(ValueError, match="inset must be"):
        d.plot(ax=axl, inset=(0.1, 0.2))


def test_save_with_labels_and_short_repr(outlier_density, tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d, _ = outlier_density
    ax = d.plot(title="T", xlabel="λ", ylabel="φ", label="curve")
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == ("T", "λ", "φ")
    plt.close("all")
    path = tmp_path / "density.png"
    assert d.save(str(path), title="test", label="SLQ", inset=True, xlabel="eigenvalue of H") == str(path)
    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    r = repr(d)
    assert "tensor" not in r and len(r) < 250 and "n_probes=2" in r and "status='converged'" in r


def test_matplotlib_missing_gives_clear_error(monkeypatch, tmp_path):
    A, _ = _bulk_plus_outliers(50)
    d = density(A, n_probes=1, n_lanczos=10, seed=0)
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        d.save(str(tmp_path / "x.png"))
    with pytest.raises(ImportError, match="pip install matplotlib"):
        d.plot()


def test_errors():
    A, _ = _bulk_plus_outliers(30)
    with pytest.raises(ValueError, match="n_probes must be an integer >= 1"):
        density(A, n_probes=0)
    with pytest.raises(ValueError, match="n_lanczos must be an integer >= 1"):
        density(A, n_lanczos=0)
    with pytest.raises(ValueError, match="sigma"):
        density(A, sigma=0.0)
    with pytest.raises(ValueError, match="grid"):
        density(A, grid=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="not symmetric"):
        density(torch.triu(torch.ones(6, 6, dtype=torch.float64)))
