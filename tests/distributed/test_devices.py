"""Device- and dtype-clean code paths, deferred host checks (``check_every``) and compiled products.

Device-parametrised tests run on CUDA when it is available and are skipped cleanly otherwise;
every result must stay on the input's device and dtype.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

import curvlab as cl

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


def _mlp(device: str, dtype: torch.dtype, n: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    params = {
        "W1": 0.7 * torch.randn(6, 4, generator=g, dtype=dtype).to(device),
        "b1": 0.1 * torch.randn(6, generator=g, dtype=dtype).to(device),
        "W2": 0.7 * torch.randn(3, 6, generator=g, dtype=dtype).to(device),
    }
    X = torch.randn(n, 4, generator=g, dtype=dtype).to(device)
    y = torch.randint(0, 3, (n,), generator=g).to(device)

    def model(p, x):
        return torch.tanh(x @ p["W1"].T + p["b1"]) @ p["W2"].T

    def ce(o, t):
        return F.cross_entropy(o, t, reduction="none")

    def loss(p, batch):
        return ce(model(p, batch[0]), batch[1]).mean()

    return params, model, ce, loss, X, y


def _on(t: torch.Tensor, device: str, dtype: torch.dtype) -> None:
    assert t.device.type == device and t.dtype == dtype, (t.device, t.dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_operators_spectra_and_solvers_stay_on_device(device, dtype):
    params, model, ce, loss, X, y = _mlp(device, dtype)
    batches = [(X[:12], y[:12]), (X[12:], y[12:])]
    H = cl.linops.hessian(loss, params, data=batches)
    G = cl.linops.ggn(model, ce, params, batches)
    P = H.shape[0]
    v = torch.randn(P, dtype=dtype, device=device)
    for out in (H @ v, G @ v, H @ torch.stack([v, v], 1), H.gradient, G.value):
        _on(out, device, dtype)
    _on(cl.linalg.cg(G.damped(0.1), v, tol=1e-4, check_every=4).x, device, dtype)
    _on(cl.linalg.minres(H.damped(1.0), v, tol=1e-4, check_every=3).x, device, dtype)
    _on(cl.linalg.lanczos(G, 6, check_every=2, generator=torch.Generator(device).manual_seed(0)).alpha, device, dtype)
    _on(cl.spectrum.eigsh(G, 2, seed=0).eigenvalues, device, dtype)
    _on(torch.as_tensor(cl.spectrum.trace(G, "hutchinson", budget=4, seed=0).estimate), device, dtype)
    prob = cl.SupervisedLoss(model, ce, params, batches)
    for solver in (cl.solvers.EGN(damping=0.5), cl.solvers.Sven(lr=0.1), cl.solvers.GradientDescent(lr=0.1)):
        r = solver.solve(prob, max_iter=2, tol=0.0)
        _on(r.flat, device, dtype)
        _on(r.params["W1"], device, dtype)


def _spd_and_indefinite(n: int = 30):
    g = torch.Generator().manual_seed(3)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    U = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return [A @ A.T + 0.1 * torch.eye(n, dtype=torch.float64), A + A.T, U @ U.T]


@pytest.mark.parametrize("check_every", [2, 3, 50])
def test_check_every_leaves_results_unchanged(check_every):
    for A in _spd_and_indefinite():
        b = torch.randn(A.shape[0], 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        m1 = cl.linalg.minres(A, b, tol=1e-10)
        m2 = cl.linalg.minres(A, b, tol=1e-10, check_every=check_every)
        assert m1.status == m2.status and m1.converged == m2.converged
        torch.testing.assert_close(m2.x, m1.x, rtol=1e-12, atol=0)
        torch.testing.assert_close(m2.residual_norm, m1.residual_norm, rtol=1e-10, atol=1e-30)
        for k in (12, 40):
            l1 = cl.linalg.lanczos(A, k, generator=torch.Generator().manual_seed(1))
            l2 = cl.linalg.lanczos(A, k, generator=torch.Generator().manual_seed(1), check_every=check_every)
            assert l1.breakdown == l2.breakdown
            assert torch.equal(l1.alpha, l2.alpha) and torch.equal(l1.beta, l2.beta) and torch.equal(l1.Q, l2.Q)
            assert torch.equal(l1.info["beta_last"], l2.info["beta_last"])
    with pytest.raises(ValueError, match="check_every"):
        cl.linalg.minres(A, b, check_every=0)
    with pytest.raises(ValueError, match="check_every"):
        cl.linalg.lanczos(A, 3, check_every=0)


# ---------------------------------------------------------------------------- torch.compile
def _compile_or_skip():
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is unavailable")


def _compiled_vs_eager(options):
    params, model, ce, loss, X, y = _mlp("cpu", torch.float64, n=16)
    batches = [(X[:8], y[:8]), (X[8:], y[8:])]
    P = sum(p.numel() for p in params.values())
    g = torch.Generator().manual_seed(5)
    v, V = torch.randn(P, generator=g, dtype=torch.float64), torch.randn(P, 3, generator=g, dtype=torch.float64)
    H, Hc = (cl.linops.hessian(loss, params, data=batches, compile=c) for c in (False, options))
    G, Gc = (cl.linops.ggn(model, ce, params, batches, compile=c) for c in (False, options))
    F, Fc = (cl.linops.fisher(model, ce, params, batches, compile=c) for c in (False, options))
    for A, B in ((H, Hc), (G, Gc), (F, Fc)):
        torch.testing.assert_close(B @ v, A @ v, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(B @ V, A @ V, rtol=1e-10, atol=1e-12)


def test_compiled_products_match_eager_aot_eager():
    """The compile plumbing with a fast backend (tracing, functional products, vmapped blocks)."""
    _compile_or_skip()
    try:
        _compiled_vs_eager({"backend": "aot_eager"})
    except Exception as e:  # a torch build whose dynamo cannot run here
        if "dynamo" in type(e).__module__ or "Unsupported" in type(e).__name__:
            pytest.skip(f"torch.compile cannot run here: {e}")
        raise


@pytest.mark.slow
def test_compiled_products_match_eager_inductor():
    """The default backend (inductor; tens of seconds of C++ compilation on a CPU)."""
    _compile_or_skip()
    _compiled_vs_eager(True)


def test_compile_option_validation():
    with pytest.raises(TypeError, match="compile"):
        cl.linops.hessian(lambda x: (x**2).sum(), torch.ones(2), compile="yes")
    with pytest.raises(TypeError, match="compile"):
        cl.linops.fisher(
            lambda p, x: x @ p, lambda o, y: (o - y) ** 2, torch.ones(2), (torch.ones(3, 2), torch.ones(3)), compile=1
        )
