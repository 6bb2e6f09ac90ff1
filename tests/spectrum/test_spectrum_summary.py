"""summary() and the outliers-versus-bulk split against known spectra."""

from __future__ import annotations

import pytest
import torch

import curvlab as cl
from curvlab.spectrum import SpectrumSummary, split_outliers, summary


def _matrix(ev: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(ev.numel(), ev.numel(), generator=g, dtype=torch.float64))
    A = Q @ torch.diag(ev) @ Q.T
    return 0.5 * (A + A.T)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        # spectra of a digits MLP trained in different ways (top 16 Hessian eigenvalues)
        ([4.54, 3.78, 2.60, 2.37, 2.26, 1.92, 1.62, 1.38, 1.17, 0.268, 0.243, 0.222, 0.204, 0.195, 0.192, 0.190], 9),
        ([6.65, 2.99, 2.21, 1.99, 1.82, 1.61, 1.41, 1.22, 0.880, 0.855, 0.845, 0.835, 0.833, 0.828, 0.818, 0.814], 8),
        ([1.05, 0.93, 0.75, 0.72, 0.52, 0.50, 0.46, 0.42, 0.39, 0.34, 0.31, 0.28, 0.23, 0.22, 0.20, 0.19], 0),
        ([5.0, 4.0, 3.0, -0.1, -0.2, -0.3, -0.4, -0.5], 3),  # bulk below zero
        ([2.0, 1.0, 0.5, 0.25, 0.125, 0.0625], 0),  # geometric decay: no bulk, no split
    ],
)
def test_split_outliers(values, expected):
    assert split_outliers(torch.tensor(values)) == expected


def test_split_outliers_errors():
    with pytest.raises(ValueError, match="at least 4"):
        split_outliers(torch.tensor([3.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match="descending"):
        split_outliers(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    with pytest.raises(ValueError, match="factor"):
        split_outliers(torch.tensor([4.0, 3.0, 2.0, 1.0]), factor=0.0)


def test_summary_on_a_known_spectrum():
    g = torch.Generator().manual_seed(0)
    n = 300
    outliers = torch.tensor([40.0, 31.0, 25.0, 18.0, 14.0, 11.0, 9.0], dtype=torch.float64)
    bulk = 0.5 * torch.rand(n - 7, generator=g, dtype=torch.float64) - 0.1  # [-0.1, 0.4]: 20% negative
    ev = torch.cat([outliers, bulk])
    A = _matrix(ev)
    s = summary(A, n_classes=7, seed=0)
    assert isinstance(s, SpectrumSummary) and s.converged and s.n == n
    assert s.top_eigenvalue == pytest.approx(40.0, rel=1e-8)
    assert s.smallest_eigenvalue == pytest.approx(float(bulk.min()), abs=1e-6 * 40)  # tol * ||A||
    assert s.top_eigenvalues.shape == (20,)
    assert s.n_outliers == 7
    torch.testing.assert_close(s.outliers, outliers, atol=1e-8, rtol=0)
    assert s.bulk_edge == pytest.approx(float(bulk.max()), abs=1e-6 * 40)
    assert abs(float(s.trace.estimate) - float(ev.sum())) <= 5 * float(s.trace.std_error) + 1e-8
    true_neg = float((ev < 0).double().mean())
    assert abs(s.negative_mass - true_neg) <= 4 * s.negative_mass_std_error + 0.05
    lo, hi = s.negative_mass_bounds
    assert lo - 0.05 <= true_neg <= hi + 0.05
    true_spec = float(ev[ev < 0].abs().sum() / ev.abs().sum())
    assert s.negative_spectral_mass == pytest.approx(true_spec, abs=0.01)
    assert s.negative_ratio == pytest.approx(float(-bulk.min()) / 40.0, rel=1e-3)
    assert s.condition == float("inf")
    assert s.n_matvecs == s.details["top"].n_matvecs + s.details["bottom"].n_matvecs + 100 + 180
    text = str(s)
    assert "outliers" in text and "7:" in text and "trace" in text


def test_summary_psd_condition_and_small():
    ev = torch.linspace(1.0, 10.0, 30, dtype=torch.float64)
    s = summary(_matrix(ev), k_top=5, n_lanczos=30, seed=1)
    assert s.condition == pytest.approx(10.0, rel=1e-5)
    assert s.negative_mass == 0.0 and s.negative_mass_bounds == (0.0, 0.0) and s.n_outliers == 0
    # a PSD operator with a null space: no negative mass, infinite condition number, bounded cost
    U = torch.randn(40, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    G = cl.linops.DenseOperator(U @ U.T, symmetric=True, psd=True)
    s = summary(G, k_top=4, n_lanczos=20, seed=0)
    assert s.negative_mass == 0.0 and s.condition == float("inf") and abs(s.smallest_eigenvalue) < 1e-5
    with pytest.raises(ValueError, match="not symmetric"):
        summary(torch.triu(torch.ones(5, 5, dtype=torch.float64)))


def _example():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "examples" / "hessian_spectrum.py"
    spec = importlib.util.spec_from_file_location("hessian_spectrum_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, path


def test_example_writes_beside_itself_from_any_directory(tmp_path, monkeypatch):
    """Run from inside examples/ it used to look for 'examples/hessian_spectrum.png' and crash."""
    pytest.importorskip("sklearn")
    monkeypatch.chdir(tmp_path)
    module, path = _example()
    out = module.parse_args([]).out
    assert out == str(path.parent / "hessian_spectrum.png")


@pytest.mark.slow
def test_example_script_runs(tmp_path, monkeypatch):
    """examples/hessian_spectrum.py end to end (trains the digits MLP, about 10 s)."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    import sys

    module, _ = _example()
    out = tmp_path / "spectrum.png"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["hessian_spectrum.py", "--out", str(out), "--epochs", "5", "--grid", "5"])
    module.main()
    for name in ("spectrum.png", "spectrum_layers.png", "spectrum_landscape.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
