"""Issue 13/15 workflow of the spectrum routines: status, non-finite operators, any scale, progress, callbacks,
eigenvectors in the parameters' structure, rounding-level eigenvalues as zero — against dense float64 references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

import curvlab as cl
from curvlab import Status
from curvlab.linalg import lanczos, nystrom, randomized_eigh, randomized_range_finder, randomized_svd
from curvlab.linops import DenseOperator, MatvecOperator
from curvlab.spectrum import density, diag, eigsh, summary, trace
from curvlab.spectrum._common import rademacher

D64 = torch.float64


def _sym(ev: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(ev.numel(), ev.numel(), generator=g, dtype=D64))
    A = (Q * ev.double()) @ Q.T
    return (0.5 * (A + A.T)).to(ev.dtype)


@pytest.fixture(scope="module")
def spectrum_matrix():
    ev = torch.cat([torch.tensor([9.0, 7.5, 6.0]), torch.linspace(-1.0, 2.0, 117)]).to(D64)
    return _sym(ev), torch.sort(ev, descending=True).values


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _breaking(A: torch.Tensor, after: int, value: float = float("nan")) -> MatvecOperator:
    """A symmetric operator whose products turn non-finite after ``after`` products."""
    calls = {"n": 0}

    def mv(v):
        calls["n"] += 1
        out = A @ v
        if calls["n"] > after:
            out = out.clone()
            out[3] = value
        return out

    return MatvecOperator(mv, A.shape[0], A.dtype, symmetric=True)


# --------------------------------------------------------------------------- eigsh: status
def test_eigsh_status_values(spectrum_matrix):
    A, ev = spectrum_matrix
    res = eigsh(A, k=3, seed=0)
    assert res.status is Status.CONVERGED and res.converged and "tol" in res.message
    torch.testing.assert_close(res.eigenvalues, ev[:3], atol=1e-10, rtol=0)
    hard = eigsh(A, k=3, which="SA", ncv=6, maxiter=0, seed=0)  # one short cycle in the bulk cannot converge
    assert hard.status is Status.MAX_ITER and not hard.converged and "maxiter" in hard.message
    assert isinstance(res.status, Status) and res.status == "converged"


@pytest.mark.parametrize("after", [0, 5, 12])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_eigsh_non_finite_operator_gives_status_nan(spectrum_matrix, after, value):
    A, _ = spectrum_matrix
    res = eigsh(_breaking(A, after, value), k=3, seed=0)
    assert res.status is Status.NAN and not res.converged and "not finite" in res.message
    assert torch.isnan(res.eigenvalues).all() and torch.isnan(res.eigenvectors).all()
    assert res.n_matvecs == after + 1  # stops at the first bad product


def test_eigsh_nan_in_a_dense_matrix():
    A = torch.eye(30, dtype=D64)
    A[2, 2] = float("nan")
    assert eigsh(A, k=2, seed=0).status is Status.NAN


@pytest.mark.parametrize(
    ("dtype", "scale", "rtol"),
    [
        (D64, 1e-200, 1e-12),
        (D64, 1e-165, 1e-12),
        (D64, 1e200, 1e-12),
        (torch.float32, 1e-30, 1e-5),
        (torch.float32, 1e30, 1e-5),
    ],
)
def test_eigsh_any_scale(spectrum_matrix, dtype, scale, rtol):
    """Below 1e-160 (f64) / 1e-25 (f32) the squared norms underflowed: 'converged' with 50 % error."""
    A, ev = spectrum_matrix
    res = eigsh((A * scale).to(dtype), k=3, seed=0)
    assert res.status is Status.CONVERGED
    torch.testing.assert_close(res.eigenvalues.double() / scale, ev[:3], rtol=rtol, atol=0)
    assert float(res.residual_norms.max()) <= res.tol * res.anorm * 1.0001
    assert res.anorm / scale == pytest.approx(9.0, rel=1e-3)


def test_eigsh_scaling_by_a_power_of_two_is_exact(spectrum_matrix):
    A, _ = spectrum_matrix
    a = eigsh(A, k=4, seed=3)
    b = eigsh(A * 2.0**-900, k=4, seed=3)
    assert torch.equal(b.eigenvalues, a.eigenvalues * 2.0**-900) and torch.equal(b.eigenvectors, a.eigenvectors)
    assert a.n_matvecs == b.n_matvecs


# --------------------------------------------------------------------------- eigsh: progress / callback
def test_eigsh_callback_stops_and_sees_the_iteration(spectrum_matrix):
    A, ev = spectrum_matrix
    seen = []

    def cb(info):
        seen.append(info)
        return len(seen) == 2

    res = eigsh(A, k=3, which="SA", seed=0, callback=cb)
    assert res.status is Status.CALLBACK and not res.converged and len(seen) == 2
    assert {"n_matvecs", "n_restarts", "eigenvalues", "residual_norms", "tol", "stage"} <= set(seen[0])
    assert seen[1]["n_matvecs"] > seen[0]["n_matvecs"] and res.n_matvecs == seen[1]["n_matvecs"]
    torch.testing.assert_close(res.eigenvalues, seen[1]["eigenvalues"])  # the pairs the callback saw
    # the returned Ritz pairs are honest: their residuals hold against the dense matrix
    for i in range(3):
        x = res.eigenvectors[:, i]
        r = torch.linalg.vector_norm(A @ x - res.eigenvalues[i] * x)
        assert float(r) == pytest.approx(float(res.residual_norms[i]), rel=1e-6, abs=1e-12)
    # a callback that never stops changes nothing
    plain = eigsh(A, k=3, seed=0)
    other = eigsh(A, k=3, seed=0, callback=lambda info: False)
    assert torch.equal(plain.eigenvalues, other.eigenvalues) and other.status is Status.CONVERGED


def test_progress_bars(spectrum_matrix, capsys):
    A, _ = spectrum_matrix
    eigsh(A, k=2, seed=0, progress=True)
    trace(A, budget=12, seed=0, progress=True)
    diag(A, budget=12, seed=0, progress=True)
    density(A, 2, 10, seed=0, progress=True)
    err = capsys.readouterr().err
    for name in ("eigsh", "trace", "diag", "density"):
        assert name in err and "matvec" in err
    summary(A, seed=0, k_top=4, trace_budget=8, n_lanczos=10, progress=True)
    err = capsys.readouterr().err
    assert "summary: density" in err
    eigsh(A, k=2, seed=0)
    assert capsys.readouterr().err == ""
    with pytest.raises(TypeError, match="progress must be True or False"):
        eigsh(A, k=2, progress="yes")
    with pytest.raises(TypeError, match="callback must be callable"):
        trace(A, callback=3)


# --------------------------------------------------------------------------- eigenvectors as parameters
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def test_eigenvectors_in_the_parameters_structure():
    torch.manual_seed(0)
    net = _Net().double()
    X, y = torch.randn(20, 3, dtype=D64), torch.randint(0, 2, (20,))

    def f(p, batch):
        return F.cross_entropy(torch.func.functional_call(net, p, (batch[0],)), batch[1])

    H = cl.linops.hessian(f, net, data=(X, y))
    Hd = H.to_dense()
    res = eigsh(H, k=2, seed=0)
    vecs = res.as_params()
    assert isinstance(vecs, list) and len(vecs) == 2
    shapes = {k: v.shape for k, v in net.named_parameters()}
    for j, v in enumerate(vecs):
        assert list(v) == list(shapes) and {k: t.shape for k, t in v.items()} == shapes
        flat = torch.cat([t.reshape(-1) for t in v.values()])
        torch.testing.assert_close(flat, res.eigenvectors[:, j])
        torch.testing.assert_close(Hd @ flat, res.eigenvalues[j] * flat, atol=1e-8, rtol=0)  # a true eigenvector
    one = res.as_params(1)
    one["fc1.weight"].zero_()  # a copy: the result keeps its vectors
    assert float(res.eigenvectors[:, 1].abs().sum()) > 0
    assert res.as_params(-1).keys() == vecs[0].keys()
    # a tuple of tensors comes back as a tuple; a restricted block gives its own parameters
    tup = (torch.randn(3, dtype=D64), torch.randn(2, 2, dtype=D64))
    Ht = cl.linops.hessian(lambda p: (p[0] ** 4).sum() + (p[1] ** 3).sum() * p[0].sum(), tup)
    vt = eigsh(Ht, k=1, seed=0).as_params(0)
    assert isinstance(vt, tuple) and vt[0].shape == (3,) and vt[1].shape == (2, 2)
    vb = eigsh(cl.linops.restrict(H, "fc2"), k=1, seed=0).as_params(0)
    assert list(vb) == ["fc2.weight", "fc2.bias"]
    d = diag(H, budget=100)
    parts = d.as_params()
    torch.testing.assert_close(
        torch.cat([t.reshape(-1) for t in parts.values()]), torch.diagonal(Hd), atol=1e-10, rtol=0
    )
    with pytest.raises(ValueError, match="no parameter structure"):
        eigsh(torch.eye(5, dtype=D64), k=1).as_params(0)
    with pytest.raises(ValueError, match="i must be an int"):
        res.as_params(2)


# --------------------------------------------------------------------------- lanczos
def test_lanczos_status_scale_and_non_finite():
    ev = torch.linspace(1.0, 5.0, 50, dtype=D64)
    A = _sym(ev)
    g = torch.Generator().manual_seed(0)
    v0 = torch.randn(50, generator=g, dtype=D64)
    base = lanczos(A, 20, v0=v0)
    assert base.status is Status.MAX_ITER and not base.breakdown
    tiny = lanczos(A * 2.0**-1000, 20, v0=v0)  # subnormal-range entries would underflow every norm
    assert torch.equal(tiny.alpha, base.alpha * 2.0**-1000) and torch.equal(tiny.beta, base.beta * 2.0**-1000)
    f32 = lanczos((A * 1e-30).float(), 20, v0=v0.float())
    torch.testing.assert_close(f32.alpha.double() / 1e-30, base.alpha, rtol=1e-4, atol=1e-4)
    small = _sym(torch.tensor([1.0, 2.0, 3.0], dtype=D64))
    assert lanczos(small, 10, v0=torch.ones(3, dtype=D64)).status is Status.BREAKDOWN
    bad = lanczos(_breaking(A, 4), 20, v0=v0)
    assert bad.status is Status.NAN and bad.alpha.numel() == 5 and not torch.isfinite(bad.alpha[-1])
    assert torch.isfinite(bad.alpha[:-1]).all()
    stop = lanczos(A, 20, v0=v0, callback=lambda info: info["step"] == 6)
    assert stop.status is Status.CALLBACK and stop.alpha.numel() == 7
    torch.testing.assert_close(stop.alpha, base.alpha[:7])


# --------------------------------------------------------------------------- trace / diag / density
@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace"])
def test_trace_callback_stops_with_an_honest_estimate(spectrum_matrix, method):
    A, ev = spectrum_matrix
    calls = []
    res = trace(A, method, 60, seed=0, block_size=4, callback=lambda info: calls.append(info) or len(calls) == 3)
    assert res.status is Status.CALLBACK and res.n_matvecs == 12
    assert calls[-1]["columns_done"] == 12 and calls[-1]["phase"] in ("hutchinson", "sketch")
    assert res.method == "hutchinson" and res.samples.numel() == 12
    # the partial estimate is the Hutchinson estimate of the 12 probes done (the first columns of the probe draw)
    Z = rademacher(
        A.shape[0], 60 if method == "hutchinson" else (20 if method == "hutch++" else 30), D64, "cpu", _gen()
    )
    torch.testing.assert_close(res.estimate, (Z[:, :12] * (A @ Z[:, :12])).sum(0).mean())
    assert abs(float(res) - float(ev.sum())) <= 5 * float(res.std_error)
    done = trace(A, method, 60, seed=0, callback=lambda info: False)
    assert done.status is Status.CONVERGED and done.n_matvecs == 60


def test_hutchpp_stopped_in_its_last_phase(spectrum_matrix):
    A, ev = spectrum_matrix
    calls = []

    def cb(info):
        calls.append(info["phase"])
        return info["phase"] == "deflated Hutchinson"

    res = trace(A, "hutch++", 60, seed=0, block_size=4, callback=cb)
    assert res.status is Status.CALLBACK and res.method == "hutch++" and res.n_matvecs == 44
    assert abs(float(res) - float(ev.sum())) <= 5 * float(res.std_error) + 1e-8


def test_diag_and_density_callbacks(spectrum_matrix):
    A, _ = spectrum_matrix
    res = diag(A, "xdiag", 40, seed=0, block_size=5, callback=lambda info: info["columns_done"] >= 10)
    assert res.status is Status.CALLBACK and res.method == "hutchinson" and res.n_matvecs == 10
    Z = rademacher(A.shape[0], 20, D64, "cpu", _gen())[:, :10]
    torch.testing.assert_close(res.estimate, (Z * (A @ Z)).mean(1))
    seen = []
    d = density(A, 4, 20, seed=0, callback=lambda info: seen.append(info) or info["probe"] == 1)
    assert d.status is Status.CALLBACK and d.n_probes == 2 and d.n_matvecs == 40 and d.nodes.numel() == 40
    assert d.integral() == pytest.approx(1.0, abs=1e-3) and float(d.weights.sum()) == pytest.approx(1.0)
    assert seen[0]["nodes"].shape == (20,) and seen[0]["stage"] == "density"
    assert density(A, 2, 20, seed=0).status is Status.CONVERGED


@pytest.mark.parametrize(
    "run",
    [
        lambda A: trace(A, "hutch++", 30, seed=0),
        lambda A: trace(A, "xtrace", 30, seed=0),
        lambda A: diag(A, budget=30, seed=0),
        lambda A: density(A, 2, 20, seed=0),
        lambda A: summary(A, seed=0, k_top=4, trace_budget=8, n_lanczos=10),
    ],
)
def test_estimators_refuse_non_finite_operators(spectrum_matrix, run):
    A, _ = spectrum_matrix
    with pytest.raises(ValueError, match="not finite"):
        run(_breaking(A, 2))


@pytest.mark.parametrize(
    "run",
    [
        lambda A: randomized_svd(A, 3),
        lambda A: randomized_eigh(A, 3),
        lambda A: randomized_eigh(A, 3, which="SA"),
        lambda A: randomized_range_finder(A, 3),
        lambda A: nystrom(A, 3),
    ],
)
def test_randomized_refuse_non_finite_operators(spectrum_matrix, run):
    A, _ = spectrum_matrix
    B = A.clone()
    B[5, 7] = B[7, 5] = float("inf")
    with pytest.raises(ValueError, match="not finite"):
        run(DenseOperator(B, symmetric=True))
    with pytest.raises(torch.linalg.LinAlgError):  # what torch's factorisations raise: callers catching it still do
        run(DenseOperator(B, symmetric=True))


# --------------------------------------------------------------------------- summary
def _ce_ggn(dtype: torch.dtype):
    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).to(dtype)
    X, y = torch.randn(300, 6).to(dtype), torch.randint(0, 4, (300,))
    return cl.linops.ggn(net, lambda o, t: F.cross_entropy(o, t, reduction="none"), None, (X, y))


def test_summary_rounding_level_eigenvalues_are_zero():
    """A cross-entropy GGN is singular (logit shift). In float32 the smallest computed eigenvalue was
    1e-7·λmax > its residual, and the condition number came out as 1.5e8."""
    G32 = _ce_ggn(torch.float32)
    s = summary(G32, seed=7, k_top=4, trace_budget=8, n_lanczos=10, n_probes=1)
    ev = torch.linalg.eigvalsh(_ce_ggn(D64).to_dense())
    assert float(ev[0]) == pytest.approx(0.0, abs=1e-12 * float(ev[-1]))  # truly singular
    assert abs(s.smallest_eigenvalue) <= s.zero_tol
    assert s.zero_tol == pytest.approx(math.sqrt(G32.shape[0]) * 2.0**-23 * s.top_eigenvalue, rel=1e-6)
    assert s.condition == math.inf and s.negative_ratio == 0.0 and s.negative_mass == 0.0
    s64 = summary(_ce_ggn(D64), seed=7, k_top=4, trace_budget=8, n_lanczos=10, n_probes=1)
    assert s64.condition == math.inf and s64.zero_tol < 1e-13 * s64.top_eigenvalue
    # a regular operator keeps its finite condition number (float32 and float64)
    for G, ref in ((G32, ev), (_ce_ggn(D64), ev)):
        sd = summary(G.damped(0.05), seed=0, k_top=4, trace_budget=8, n_lanczos=10, n_probes=1)
        assert sd.condition == pytest.approx(float((ref[-1] + 0.05) / (ref[0] + 0.05)), rel=1e-4)
    # the user's threshold wins
    assert summary(G32.damped(0.05), seed=0, k_top=4, trace_budget=8, n_lanczos=10, zero_tol=1.0).condition == math.inf
    assert "zero below" in str(s)


def test_summary_callback_and_status(spectrum_matrix):
    A, ev = spectrum_matrix
    stages = []

    def cb(info):
        stages.append(info["stage"])
        return info["stage"] == "summary: trace"

    s = summary(A, seed=0, k_top=6, trace_budget=24, callback=cb)
    assert s.status is Status.CALLBACK and s.density is None and math.isnan(s.negative_mass)
    assert "summary: top eigenvalues" in stages and "summary: smallest eigenvalue" in stages
    assert s.top_eigenvalue == pytest.approx(9.0, rel=1e-8) and s.smallest_eigenvalue == pytest.approx(-1.0, abs=1e-5)
    assert s.trace.status is Status.CALLBACK
    str(s)  # prints with NaN fields
    full = summary(A, seed=0, k_top=6, trace_budget=24)
    assert full.status is Status.CONVERGED and full.density is not None
    assert full.n_matvecs == s.n_matvecs + (full.n_matvecs - s.n_matvecs) and full.n_matvecs > s.n_matvecs
