"""Acceptance tests of the issue-3 contract (``curvlab.spectrum`` and per-layer restriction).

Operators a user would build (the Hessian of an ``nn.Module`` MLP, GGNs, damped and restricted
operators, dense matrices with clustered and repeated eigenvalues) are checked against dense
``torch.linalg.eigvalsh`` / exact traces and diagonals.
"""

from __future__ import annotations

import math

import matplotlib
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.func import functional_call

from curvlab import linops, spectrum

matplotlib.use("Agg")

D64 = torch.float64


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh())
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        return self.out(self.body(x))


@pytest.fixture(scope="module")
def mlp_hessian():
    torch.manual_seed(0)
    net = MLP().double()
    X = torch.randn(40, 4, dtype=D64)
    y = torch.randint(0, 3, (40,))

    def f(p, batch):
        return F.cross_entropy(functional_call(net, p, (batch[0],)), batch[1])

    H = linops.hessian(f, net, data=[(X[:25], y[:25]), (X[25:], y[25:])], cache=True)
    spec = H.spec
    Hd = torch.func.hessian(lambda z: f(spec.unflatten(z), (X, y)))(spec.flatten())
    G = linops.ggn(net, lambda o, t: F.cross_entropy(o, t, reduction="none"), None, (X, y))
    return net, H, Hd, G, (X, y), f


def _sym_with(ev, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = ev.numel()
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D64))
    A = (Q * ev) @ Q.T
    return 0.5 * (A + A.T)


def _expected(ev_sorted_asc, k, which):
    ev = ev_sorted_asc
    if which == "LA":
        sel = ev[-k:]
    elif which == "SA":
        sel = ev[:k]
    elif which == "BE":
        sel = torch.cat([ev[: k // 2], ev[len(ev) - (k - k // 2) :]])
    else:
        sel = ev[torch.argsort(ev.abs(), descending=True)[:k]]
    return torch.sort(sel, descending=True).values


# --------------------------------------------------------------------------- eigsh
@pytest.mark.parametrize("which", ["LA", "SA", "BE", "LM"])
def test_eigsh_mlp_hessian_all_which(mlp_hessian, which):
    _, H, Hd, _, _, _ = mlp_hessian
    ev = torch.linalg.eigvalsh(Hd)
    k = 5
    res = spectrum.eigsh(H, k, which=which, seed=1)
    vals, vecs = res
    assert res.converged and vals.shape == (k,) and vecs.shape == (H.shape[0], k)
    assert bool((vals[:-1] >= vals[1:]).all())  # sorted descending
    torch.testing.assert_close(vals, _expected(ev, k, which), rtol=1e-8, atol=1e-8 * float(ev.abs().max()))
    resid = torch.linalg.vector_norm(Hd @ vecs - vecs * vals, dim=0)
    assert float(resid.max()) < 1e-6 * float(ev.abs().max())
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(k, dtype=D64), atol=1e-8, rtol=0)
    assert res.n_matvecs > 0 and res.which == which


def test_eigsh_reproducible_with_seed_and_generator(mlp_hessian):
    _, H, _, _, _, _ = mlp_hessian
    a = spectrum.eigsh(H, 3, seed=7)
    b = spectrum.eigsh(H, 3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.eigenvalues, b.eigenvalues) and a.n_matvecs == b.n_matvecs


_MISSED_COPY = pytest.mark.xfail(
    strict=True,
    reason="known limitation of the default (as in ARPACK): single-vector thick-restart Lanczos converges before a "
    "third copy of a repeated eigenvalue emerges from rounding; finds 10, 10, 9 — check_multiplicity=True fixes it",
)


@pytest.mark.parametrize(
    "which", ["LA", "SA", pytest.param("BE", marks=_MISSED_COPY), pytest.param("LM", marks=_MISSED_COPY)]
)
def test_eigsh_repeated_and_clustered(which):
    # repeated top eigenvalue (multiplicity 3), a tight cluster at the bottom, a bulk in between
    ev = torch.cat(
        [
            torch.full((3,), 10.0, dtype=D64),
            torch.tensor([9.0], dtype=D64),
            torch.linspace(0.5, 2.0, 70, dtype=D64),
            -5.0 + 1e-3 * torch.arange(4, dtype=D64),
            torch.full((2,), -7.0, dtype=D64),
        ]
    )
    A = _sym_with(ev, seed=2)
    evs = torch.sort(ev).values
    k = 6
    vals, vecs = spectrum.eigsh(A, k, which=which, seed=0)
    torch.testing.assert_close(vals, _expected(evs, k, which), rtol=0, atol=1e-8)
    torch.testing.assert_close(A @ vecs, vecs * vals, rtol=0, atol=1e-6)


@pytest.mark.parametrize("which", ["LA", "SA", "BE", "LM"])
@pytest.mark.parametrize("seed", [0, 1])
def test_eigsh_check_multiplicity_finds_every_copy(which, seed):
    # the case above, where one start vector misses the third copy of 10 for BE / LM
    ev = torch.cat(
        [
            torch.full((3,), 10.0, dtype=D64),
            torch.tensor([9.0], dtype=D64),
            torch.linspace(0.5, 2.0, 70, dtype=D64),
            -5.0 + 1e-3 * torch.arange(4, dtype=D64),
            torch.full((2,), -7.0, dtype=D64),
        ]
    )
    A = _sym_with(ev, seed=2 + seed)
    k = 6
    r = spectrum.eigsh(A, k, which=which, seed=seed, check_multiplicity=True)
    assert r.converged
    torch.testing.assert_close(r.eigenvalues, _expected(torch.sort(ev).values, k, which), rtol=0, atol=1e-8)
    torch.testing.assert_close(A @ r.eigenvectors, r.eigenvectors * r.eigenvalues, rtol=0, atol=1e-6)
    plain = spectrum.eigsh(A, k, which=which, seed=seed)
    assert r.n_matvecs > plain.n_matvecs  # the extra verification cycle is paid for


def test_eigsh_float32_and_operators():
    ev = torch.linspace(-1.0, 4.0, 60, dtype=D64)
    A = _sym_with(ev, seed=3)
    op = linops.aslinearoperator(A.float())
    assert op.is_symmetric  # numerically symmetric float32 matrix is recognised as such
    vals, _ = spectrum.eigsh(op, 2, which="LA", seed=0)
    assert vals.dtype == torch.float32
    torch.testing.assert_close(vals.double(), ev[-2:].flip(0), rtol=1e-4, atol=1e-4)
    # damped and scaled operators
    vals_d, _ = spectrum.eigsh((2.0 * linops.aslinearoperator(A)).damped(1.0), 2, which="SA", seed=0)
    torch.testing.assert_close(vals_d, (2 * ev[:2] + 1).flip(0), rtol=0, atol=1e-8)


def test_eigsh_bad_input():
    A = torch.eye(5, dtype=D64)
    with pytest.raises(ValueError, match="which"):
        spectrum.eigsh(A, 2, which="XX")
    with pytest.raises(ValueError, match="k"):
        spectrum.eigsh(A, 5)
    with pytest.raises(ValueError, match="symmetric"):
        spectrum.eigsh(torch.triu(torch.ones(5, 5, dtype=D64)), 1)
    with pytest.raises(ValueError, match="symmetric"):
        spectrum.eigsh(linops.aslinearoperator(torch.ones(5, 5, dtype=D64)) @ linops.aslinearoperator(A), 1)
    with pytest.raises(ValueError, match="square"):
        spectrum.eigsh(torch.ones(4, 5, dtype=D64), 1)


# --------------------------------------------------------------------------- trace / diag
@pytest.mark.parametrize("method", ["hutch++", "hutchinson", "xtrace"])
def test_trace_reproducible_unbiased_and_standard_error(method):
    ev = torch.cat(
        [
            torch.tensor([50.0, 20.0, 10.0], dtype=D64),
            torch.rand(197, dtype=D64, generator=torch.Generator().manual_seed(0)),
        ]
    )
    A = _sym_with(ev, seed=4)
    exact = float(ev.sum())
    r1 = spectrum.trace(A, method, budget=40, seed=3)
    r2 = spectrum.trace(A, method, budget=40, seed=3)
    assert float(r1) == float(r2) and torch.equal(r1.std_error, r2.std_error)
    assert r1.n_matvecs <= 40 and r1.method == method
    errs, ses = [], []
    for s in range(30):
        r = spectrum.trace(A, method, budget=40, seed=100 + s)
        errs.append(float(r) - exact)
        ses.append(float(r.std_error))
    errs_t, ses_t = torch.tensor(errs), torch.tensor(ses)
    assert (ses_t > 0).all()
    # unbiased: the mean error is within a few standard errors of the mean
    assert abs(float(errs_t.mean())) < 4 * float(errs_t.std()) / math.sqrt(30) + 1e-9
    # the reported standard error is the right size (within a factor 3 of the observed spread)
    ratio = float(errs_t.std()) / float(ses_t.mean())
    assert 1 / 3 < ratio < 3, ratio
    # and 95 % intervals cover the truth most of the time
    cover = sum(
        lo <= exact <= hi
        for lo, hi in (spectrum.trace(A, method, 40, seed=200 + s).confidence_interval() for s in range(20))
    )
    assert cover >= 15


def test_trace_exact_when_budget_covers_n(mlp_hessian):
    _, H, Hd, _, _, _ = mlp_hessian
    r = spectrum.trace(H, "hutch++", budget=H.shape[0] + 5)
    assert r.method == "exact" and float(r.std_error) == 0.0
    assert abs(float(r) - float(torch.trace(Hd))) < 1e-10


def test_hutchpp_beats_hutchinson_on_decaying_spectrum():
    ev = 1.0 / torch.arange(1, 301, dtype=D64) ** 2
    A = _sym_with(ev, seed=5)
    exact = float(ev.sum())
    e_pp = [abs(float(spectrum.trace(A, "hutch++", 60, seed=s)) - exact) for s in range(10)]
    e_h = [abs(float(spectrum.trace(A, "hutchinson", 60, seed=s)) - exact) for s in range(10)]
    assert sum(e_pp) < 0.5 * sum(e_h)


@pytest.mark.parametrize("method", ["xdiag", "hutchinson"])
def test_diag_reproducible_and_sensible(mlp_hessian, method):
    _, H, Hd, _, _, _ = mlp_hessian
    exact = torch.diagonal(Hd)
    r1 = spectrum.diag(H, method, budget=30, seed=5)
    r2 = spectrum.diag(H, method, budget=30, seed=5)
    assert torch.equal(r1.estimate, r2.estimate) and r1.estimate.shape == exact.shape
    assert r1.std_error.shape == exact.shape and bool((r1.std_error >= 0).all())
    err = (r1.estimate - exact).abs()
    # most entries within 4 standard errors (errors are not exactly normal; allow a few outliers)
    frac = float((err <= 4 * r1.std_error + 1e-10).double().mean())
    assert frac > 0.85, frac
    # exact when the budget covers n; also works per layer through the spec
    rex = spectrum.diag(H, method, budget=H.shape[0])
    assert rex.method == "exact"
    torch.testing.assert_close(rex.estimate, exact, rtol=1e-10, atol=1e-12)
    per = H.spec.unflatten(rex.estimate)
    assert set(per) == set(H.spec.keys)


def test_trace_diag_bad_input():
    A = torch.eye(20, dtype=D64)
    with pytest.raises(ValueError, match="method"):
        spectrum.trace(A, "hutch--")
    with pytest.raises(ValueError, match="budget"):
        spectrum.trace(A, "hutch++", budget=1)
    with pytest.raises(ValueError, match="budget must be an integer"):
        spectrum.diag(A, budget=2.5)


# --------------------------------------------------------------------------- density
def test_density_integrates_moments_and_plots(mlp_hessian, tmp_path):
    _, H, Hd, _, _, _ = mlp_hessian
    ev = torch.linalg.eigvalsh(Hd)
    d = spectrum.density(H, n_probes=3, n_lanczos=30, seed=0)
    assert abs(d.integral() - 1.0) < 1e-3
    assert abs(float(d.weights.sum()) - 1.0) < 1e-12
    assert d.n_matvecs <= 3 * 30
    # first two moments of the spectrum, within a few standard errors
    for p in (1, 2):
        m_true = float((ev**p).mean())
        assert abs(d.moment(p) - m_true) < 5 * d.moment_std_error(p) + 1e-10
    # density values are non-negative and evaluate at arbitrary points
    assert bool((d.values >= 0).all())
    assert d(torch.tensor([0.0, 1.0])).shape == (2,)
    import matplotlib.pyplot as plt

    ax = d.plot()
    assert ax.get_yscale() == "log"
    plt.close("all")
    fig, ax2 = plt.subplots()
    assert d.plot(ax=ax2, log=False) is ax2
    plt.close(fig)
    path = tmp_path / "dens.png"
    d.save(str(path))
    assert path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_density_on_dense_matrix_wasserstein():
    ev = torch.cat([torch.linspace(0.0, 1.0, 300, dtype=D64), torch.tensor([5.0, 8.0], dtype=D64)])
    A = _sym_with(ev, seed=6)
    d = spectrum.density(A, n_probes=16, n_lanczos=60, seed=1)
    assert abs(d.integral() - 1.0) < 1e-3
    # Wasserstein-1 between the quadrature measure and the true eigenvalue measure (1-D: integral of |CDF diff|)
    grid = torch.linspace(-0.5, 8.5, 20001, dtype=D64)
    cdf_true = (ev[None, :] <= grid[:, None]).double().mean(1)
    cdf_est = ((d.nodes[None, :] <= grid[:, None]).double() * d.weights[None, :]).sum(1)
    w1 = float(torch.trapezoid((cdf_true - cdf_est).abs(), grid))
    assert w1 < 0.03  # probe noise ~ 0.1 / sqrt(n_probes) here (0.008-0.016 over seeds)
    assert d.mass(4.0, 10.0) == pytest.approx(2 / 302, abs=0.01)


# --------------------------------------------------------------------------- summary
def test_summary_indefinite_and_psd(mlp_hessian):
    _, H, Hd, G, _, _ = mlp_hessian
    ev = torch.linalg.eigvalsh(Hd)
    s = spectrum.summary(H, seed=0, k_top=5)
    assert s.top_eigenvalue == pytest.approx(float(ev[-1]), rel=1e-6)
    assert s.smallest_eigenvalue == pytest.approx(float(ev[0]), rel=1e-4, abs=1e-6 * float(ev[-1]))
    assert s.n == H.shape[0]
    tr = float(torch.trace(Hd))
    assert abs(float(s.trace.estimate) - tr) <= max(5 * float(s.trace.std_error), 1e-8)
    lo, hi = s.negative_mass_bounds
    true_neg = float((ev < 0).double().mean())
    assert lo - 1e-9 <= s.negative_mass <= hi + 1e-9
    if ev[0] < -1e-6 * ev[-1]:
        assert hi > 0
    assert 0.0 <= true_neg <= 1.0
    text = str(s)
    assert "top eigenvalue" in text and "trace" in text
    sg = spectrum.summary(G, seed=0, k_top=4)
    assert sg.negative_mass == 0.0  # the GGN is tagged PSD
    Gd = G.to_dense()
    assert sg.top_eigenvalue == pytest.approx(float(torch.linalg.eigvalsh(Gd)[-1]), rel=1e-6)


def test_summary_outliers_vs_bulk():
    ev = torch.cat([torch.tensor([100.0, 60.0, 30.0], dtype=D64), torch.linspace(0.0, 1.0, 200, dtype=D64)])
    A = _sym_with(ev, seed=7)
    s = spectrum.summary(A, seed=0)
    assert s.n_outliers == 3
    torch.testing.assert_close(s.outliers, torch.tensor([100.0, 60.0, 30.0], dtype=D64), rtol=1e-8, atol=1e-8)
    assert s.bulk_edge == pytest.approx(1.0, abs=1e-6)


# --------------------------------------------------------------------------- restrict / blocks
def test_blocks_per_layer_equal_dense_subblocks(mlp_hessian):
    net, H, Hd, G, _, _ = mlp_hessian
    spec = H.spec
    offs = {}
    o = 0
    for key, numel in zip(spec.keys, spec.numels):
        offs[key] = (o, o + numel)
        o += numel
    blk = linops.blocks(H)
    assert list(blk) == ["body.0", "body.2", "out"]
    for name, B in blk.items():
        idx = torch.cat([torch.arange(*offs[k]) for k in spec.keys if k.startswith(name + ".")])
        torch.testing.assert_close(B.to_dense(), Hd[idx][:, idx], rtol=1e-10, atol=1e-12)
        assert B.is_symmetric
        # per-layer spectrum through eigsh equals the dense sub-block's
        top = spectrum.eigsh(B, 1, seed=0).eigenvalues
        torch.testing.assert_close(top, torch.linalg.eigvalsh(Hd[idx][:, idx])[-1:], rtol=1e-8, atol=1e-10)
    per_param = linops.blocks(H, by="param")
    assert list(per_param) == list(spec.keys)
    # select by module name, by a list of names, by a parameter name, by indices
    body = linops.restrict(H, "body")
    idx = torch.cat([torch.arange(*offs[k]) for k in spec.keys if k.startswith("body.")])
    torch.testing.assert_close(body.to_dense(), Hd[idx][:, idx], rtol=1e-10, atol=1e-12)
    two = linops.restrict(H, ["out.bias", "body.0.weight"])
    idx2 = torch.cat([torch.arange(*offs["body.0.weight"]), torch.arange(*offs["out.bias"])])
    torch.testing.assert_close(two.to_dense(), Hd[idx2][:, idx2], rtol=1e-10, atol=1e-12)
    sel = torch.tensor([3, 0, 17, 9])
    torch.testing.assert_close(linops.restrict(H, sel).to_dense(), Hd[sel][:, sel], rtol=1e-10, atol=1e-12)
    # on a damped GGN, names still resolve; the block stays PSD-tagged
    Gb = linops.restrict(G.damped(0.1), "out")
    assert Gb.is_psd
    Gd = G.to_dense() + 0.1 * torch.eye(G.shape[0], dtype=D64)
    io = torch.arange(*offs["out.weight"]).tolist() + torch.arange(*offs["out.bias"]).tolist()
    torch.testing.assert_close(Gb.to_dense(), Gd[io][:, io], rtol=1e-10, atol=1e-12)
    # trace of a block
    r = spectrum.trace(blk["out"], budget=10_000)
    assert abs(float(r) - float(torch.trace(Hd[io][:, io]))) < 1e-10
    with pytest.raises(ValueError, match="bod"):
        linops.restrict(H, "bod")


def test_restrict_on_tuple_params_names():
    x = (torch.randn(3, dtype=D64), torch.randn(2, dtype=D64))
    H = linops.hessian(lambda p: (p[0] ** 3).sum() * (p[1] ** 2).sum(), x)
    blk = linops.blocks(H)
    assert len(blk) == 2
    Hd = H.to_dense()
    first = list(blk.values())[0]
    torch.testing.assert_close(first.to_dense(), Hd[:3, :3])


def test_restrict_lone_tensor_by_block_name():
    x = torch.randn(4, dtype=D64)
    H = linops.hessian(lambda p: (p**4).sum(), x)
    assert list(linops.blocks(H)) == ["param"]
    torch.testing.assert_close(linops.restrict(H, "param").to_dense(), H.to_dense())
