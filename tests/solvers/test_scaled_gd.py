"""ScaledGD / ScaledGD(λ) and the matrix-sensing generator."""

from __future__ import annotations

import pytest
import torch

import curvlab as cl
from curvlab.problems import MatrixSensing, matrix_sensing

D = torch.float64


def _grad(f, params):
    ps = [p.detach().clone().requires_grad_(True) for p in params]
    return torch.autograd.grad(f(ps[0] if len(ps) == 1 else tuple(ps)), ps)


@pytest.mark.parametrize("lam", [0.0, 0.3])
def test_symmetric_step_equals_dense_formula(lam):
    inst = matrix_sensing(8, 2, 5.0, symmetric=True, r_model=3, init="spectral", seed=1)
    X = inst.x0
    solver = cl.solvers.ScaledGD(lr=0.3, damping=lam, adaptive_damping=False)
    p = inst.problem()
    st = solver.step(p, solver.init(p))
    (G,) = _grad(inst.loss, [X])
    ref = X - 0.3 * G @ torch.linalg.inv(X.T @ X + lam * torch.eye(3, dtype=D))
    torch.testing.assert_close(p.spec.unflatten(st["x"]), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("lam", [0.0, 0.2])
def test_asymmetric_step_equals_dense_formula(lam):
    inst = matrix_sensing((7, 6), 2, 5.0, symmetric=False, init="spectral", seed=2)
    L, R = inst.x0
    solver = cl.solvers.ScaledGD(lr=0.5, damping=lam, adaptive_damping=False)
    p = inst.problem()
    st = solver.step(p, solver.init(p))
    GL, GR = _grad(inst.loss, [L, R])
    eye = torch.eye(2, dtype=D)
    L1 = L - 0.5 * GL @ torch.linalg.inv(R.T @ R + lam * eye)
    R1 = R - 0.5 * GR @ torch.linalg.inv(L.T @ L + lam * eye)
    L_new, R_new = p.spec.unflatten(st["x"])
    torch.testing.assert_close(L_new, L1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(R_new, R1, rtol=1e-10, atol=1e-12)


def test_generic_factor_problem_not_only_sensing():
    # matrix factorization min ¼‖XXᵀ − M‖² on a list of one tensor and on a dict pair
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(10, 2, generator=g, dtype=D))[0]
    M = U @ torch.diag(torch.tensor([1.0, 0.01], dtype=D)) @ U.T
    X0 = torch.randn(10, 2, generator=g, dtype=D) * 0.1
    res = cl.solvers.ScaledGD(lr=0.5).solve(
        cl.Minimize(lambda X: 0.25 * ((X @ X.T - M) ** 2).sum(), X0), max_iter=200, tol=1e-13
    )
    assert torch.linalg.norm(res.params @ res.params.T - M) < 1e-10
    pair = {"L": torch.randn(10, 2, generator=g, dtype=D), "R": torch.randn(10, 2, generator=g, dtype=D)}
    res = cl.solvers.ScaledGD(lr=0.5).solve(
        cl.Minimize(lambda p: 0.5 * ((p["L"] @ p["R"].T - M) ** 2).sum(), pair), max_iter=200, tol=1e-13
    )
    assert torch.linalg.norm(res.params["L"] @ res.params["R"].T - M) < 1e-10


def test_kappa_100_scaledgd_lambda_beats_gd():
    """κ = 100, n = 30, r⋆ = 3, overparameterized r = 5, m = 5nr⋆, small random init."""
    inst = matrix_sensing(30, 3, 100.0, r_model=5, init_scale=1e-7, seed=0)
    budget = 300

    def run(solver):
        p = inst.problem()
        errs = []

        def cb(s):
            errs.append(inst.relative_error(p.spec.unflatten(s["x"])))
            return errs[-1] < 1e-8

        solver.solve(p, max_iter=budget, tol=0.0, callback=cb)
        return errs

    sgd = run(cl.solvers.ScaledGD(lr=0.5, damping=1e-6 * inst.sigma_min))
    assert sgd[-1] < 1e-8 and len(sgd) < budget
    # GD with the best of a small grid of fixed steps (larger steps diverge): still far off
    best = min(run(cl.solvers.GradientDescent(lr=lr))[-1] for lr in (0.2, 0.5, 0.8))
    assert best > 1e-4


def test_adaptive_damping_is_precgd_capped_by_lambda():
    """λ_t = min(λ, sqrt(2 f(X_t))) (PrecGD, Zhang, Fattahi & Zhang 2021), checked against the dense formula."""
    inst = matrix_sensing(8, 2, 5.0, r_model=3, init="spectral", seed=1)
    p = inst.problem()
    X = inst.x0
    f = float(inst.loss(X))
    for lam in (10.0, 1e-3):
        solver = cl.solvers.ScaledGD(lr=0.3, damping=lam)
        st = solver.step(p, solver.init(p))
        lam_t = min(lam, (2 * f) ** 0.5)
        assert st["log"]["damping"] == pytest.approx(lam_t, rel=1e-12)
        (G,) = _grad(inst.loss, [X])
        ref = X - 0.3 * G @ torch.linalg.inv(X.T @ X + lam_t * torch.eye(3, dtype=D))
        torch.testing.assert_close(p.spec.unflatten(st["x"]), ref, rtol=1e-10, atol=1e-12)
    assert cl.solvers.ScaledGD(damping=0.5).damping_at(-1.0) == 0.5  # a negative objective: fixed λ
    assert cl.solvers.ScaledGD().damping_at(3.0) == 0.0
    with pytest.raises(TypeError, match="adaptive_damping"):
        cl.solvers.ScaledGD(adaptive_damping=1)


def test_kappa_1000_overparameterized_no_false_convergence_and_no_tail():
    """The issue's case: ScaledGD(λ = 0.1 σ_min), κ = 1000, r = 5 > r⋆ = 3, small init, default stopping."""
    inst = matrix_sensing(30, 3, 1000.0, r_model=5, init_scale=1e-7, seed=0)
    lam = 0.1 * inst.sigma_min
    fixed = cl.solvers.ScaledGD(damping=lam, adaptive_damping=False).solve(inst.problem(), max_iter=300)
    err_fixed = inst.relative_error(fixed.params)
    assert err_fixed > 1e-7  # the λ/(ηt) tail of a fixed λ ...
    assert fixed.status != "converged"  # ... is not reported as convergence
    res = cl.solvers.ScaledGD(damping=lam).solve(inst.problem(), max_iter=300)
    assert inst.relative_error(res.params) < 1e-12  # adaptive λ_t: no tail
    assert res.status == "max_iter" or inst.relative_error(res.params) < 1e-12


def test_state_save_resume(tmp_path):
    inst = matrix_sensing(10, 2, 10.0, init="spectral", seed=3)
    solver = cl.solvers.ScaledGD(lr=0.5, damping=1e-3)
    full = solver.solve(inst.problem(), max_iter=10, tol=0.0)
    half = solver.solve(inst.problem(), max_iter=5, tol=0.0)
    torch.save(half.state, tmp_path / "s.pt")
    st = torch.load(tmp_path / "s.pt", weights_only=False)
    resumed = solver.solve(inst.problem(), max_iter=10, tol=0.0, state=st)
    torch.testing.assert_close(resumed.flat, full.flat, rtol=0, atol=0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="lr"):
        cl.solvers.ScaledGD(lr=0.0)
    with pytest.raises(ValueError, match="damping"):
        cl.solvers.ScaledGD(damping=-1.0)
    with pytest.raises(TypeError, match="unknown option"):
        cl.solvers.ScaledGD(lamda=1.0)
    for params in (torch.zeros(5), (torch.zeros(4, 2), torch.zeros(4, 3)), (torch.ones(2, 2),) * 3):
        p = cl.Minimize(lambda x: sum((t**2).sum() for t in (x if isinstance(x, tuple) else (x,))), params)
        with pytest.raises(ValueError, match="factor parameters"):
            cl.solvers.ScaledGD().init(p)
    with pytest.raises(ValueError, match="kappa"):
        matrix_sensing(10, 2, 0.5)
    with pytest.raises(ValueError, match="r must be"):
        matrix_sensing(10, 11, 2.0)
    with pytest.raises(ValueError, match="square"):
        matrix_sensing((10, 8), 2, 2.0, symmetric=True)
    with pytest.raises(ValueError, match="init"):
        matrix_sensing(10, 2, 2.0, init="zeros")


@pytest.mark.parametrize("design", ["gaussian", "srht"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_matrix_sensing_instance(design, symmetric):
    inst = matrix_sensing(12, 2, 50.0, design=design, symmetric=symmetric, r_model=3, seed=0)
    assert isinstance(inst, MatrixSensing) and inst.design == design and inst.m == 5 * 12 * 2
    s = torch.linalg.svdvals(inst.M_star)
    torch.testing.assert_close(s[0] / s[1], torch.tensor(50.0, dtype=D))
    assert float(s[2]) < 1e-12
    assert inst.relative_error(inst.factors_star) < 1e-12 and float(inst.loss(inst.factors_star)) < 1e-25
    # adjoint and normalisation of the design
    g = torch.Generator().manual_seed(1)
    M, z = torch.randn(12, 12, generator=g, dtype=D), torch.randn(inst.m, generator=g, dtype=D)
    torch.testing.assert_close(inst.A(M) @ z, (M * inst.A_adjoint(z)).sum())
    # the loss is (1/4m)‖A(XXᵀ) − y‖² (sym.) or (1/2m)‖A(LRᵀ) − y‖²
    x = inst.x0_spectral
    res = inst.A(inst.product(x)) - inst.y
    torch.testing.assert_close(inst.loss(x), res @ res / ((4 if symmetric else 2) * inst.m))
    # spectral init is informative, small random init is small
    assert inst.relative_error(inst.x0_spectral) < 1.0
    assert abs(inst.relative_error(inst.x0_random) - 1) < 1e-4
    assert isinstance(inst.problem(), cl.Minimize)
