"""EGN (Korbit et al. 2024): the Duncan-Guttman direction against the dense GGN formula, options, solve contract."""

from __future__ import annotations

import io
import math
import os
import sys

import pytest
import torch
from torch.nn.functional import cross_entropy, one_hot

import curvlab as cl
from curvlab.solvers.egn import EGN, egn_direction, linearize

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests.conftest import make_mlp  # noqa: E402


def dense_egn(model, loss_fn, spec, X, Y, lam):
    """-(JᵀQJ + bλI)⁻¹ Jᵀ ∇_f ℓ with J, Q and ∇_f ℓ from torch.func on the dense matrices."""
    x = spec.flatten()
    J = torch.func.jacrev(lambda z: model(spec.unflatten(z), X).reshape(-1))(x)
    o = model(spec.unflatten(x), X).detach()
    b, c = o.shape
    Q = torch.zeros(b * c, b * c, dtype=x.dtype)
    g = torch.zeros(b * c, dtype=x.dtype)
    for i in range(b):
        li = lambda oi, i=i: loss_fn(oi[None], Y[i : i + 1])[0]  # noqa: E731
        Q[i * c : (i + 1) * c, i * c : (i + 1) * c] = torch.func.hessian(li)(o[i])
        g[i * c : (i + 1) * c] = torch.func.grad(li)(o[i])
    return -torch.linalg.solve(J.T @ Q @ J + b * lam * torch.eye(x.numel(), dtype=x.dtype), J.T @ g)


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("mode", ["per_sample", "rows"])
def test_direction_equals_dense_ggn(loss, mode):
    params, model, loss_fn, _, X, Y, spec = make_mlp(loss, n=9, c=4)
    prob = cl.SupervisedLoss(model, loss_fn, params, (X, Y))
    for lam in (1e-3, 0.7):
        d = egn_direction(linearize(prob, spec.flatten(), (X, Y), mode), lam)
        ref = dense_egn(model, loss_fn, spec, X, Y, lam)
        torch.testing.assert_close(d, ref, rtol=0, atol=1e-10 * max(1.0, float(ref.abs().max())))


def test_cross_entropy_q_is_the_exact_softmax_hessian():
    params, model, loss_fn, _, X, Y, spec = make_mlp("ce", n=5, c=3)
    lin = linearize(cl.SupervisedLoss(model, loss_fn, params, (X, Y)), spec.flatten(), (X, Y))
    p = torch.softmax(model(params, X), -1).detach()
    torch.testing.assert_close(lin.Q, torch.diag_embed(p) - p[:, :, None] * p[:, None, :])
    torch.testing.assert_close(lin.g, p - one_hot(Y, 3).to(p.dtype))


def test_least_squares_direction_and_one_step():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 10, generator=g, dtype=torch.float64)

    def res(x):
        return torch.tanh(A @ x) - 0.3

    x0 = torch.randn(10, generator=g, dtype=torch.float64)
    prob = cl.LeastSquares(res, x0)
    lam = 0.05
    d = egn_direction(linearize(prob, x0, cl.ALL), lam)
    J = torch.func.jacrev(res)(x0)
    ref = -torch.linalg.solve(J.T @ J + 6 * lam * torch.eye(10, dtype=torch.float64), J.T @ res(x0))
    torch.testing.assert_close(d, ref, rtol=0, atol=1e-12)
    r = EGN(lr=0.5, damping=lam).solve(prob, max_iter=1, tol=0.0)
    torch.testing.assert_close(r.flat, x0 + 0.5 * ref, rtol=0, atol=1e-12)
    assert r.history["damping"] == [lam] and r.history["step_size"] == [0.5]


def test_gauss_newton_limit_converges_fast_on_zero_residual_least_squares():
    t = torch.linspace(0, 1, 20, dtype=torch.float64)
    prob = cl.LeastSquares(lambda w: w[0] * torch.exp(w[1] * t) - 2 * torch.exp(-t), torch.ones(2, dtype=torch.float64))
    r = EGN(damping=1e-10).solve(prob, max_iter=30, tol=1e-14)
    assert r.converged and r.n_iter <= 10
    torch.testing.assert_close(r.flat, torch.tensor([2.0, -1.0], dtype=torch.float64))


def test_momentum_is_heavy_ball():
    params, model, loss_fn, _, X, Y, spec = make_mlp("mse", n=8, c=2)
    prob = cl.SupervisedLoss(model, loss_fn, params, (X, Y))
    lr, lam, beta = 0.5, 0.2, 0.6
    r = EGN(lr=lr, damping=lam, momentum=beta, adaptive_damping=False).solve(prob, max_iter=2, tol=0.0)
    x0 = spec.flatten()
    d0 = egn_direction(linearize(prob, x0, (X, Y)), lam)
    x1 = x0 + lr * d0
    d1 = egn_direction(linearize(prob, x1, (X, Y)), lam)
    x2 = x1 + beta * lr * d0 + lr * d1
    torch.testing.assert_close(r.flat, x2, rtol=0, atol=1e-12)


def test_line_search_armijo_and_reset():
    params, model, loss_fn, _, X, Y, spec = make_mlp("ce", n=10, c=3)
    prob = cl.SupervisedLoss(model, loss_fn, params, (X, Y))
    s = EGN(lr=1.0, damping=1e-3, line_search=True, adaptive_damping=False)
    st = s.init(prob)
    assert st["alpha"] == 1.0
    new = s.step(prob, st)
    t = new["step_size"]
    assert 0 < t < 1.0 and new["value"] <= st["value"] + 0.1 * t * float(
        st["grad"] @ egn_direction(linearize(prob, st["x"], (X, Y)), 1e-3)
    )
    k = math.log(t) / math.log(0.8)  # t = 0.8^k: backtracked k times from lr
    assert math.isclose(k, round(k), abs_tol=1e-9) and new["log"]["ls_evals"] == round(k) + 1
    new2 = s.step(prob, new)  # the next search starts from min(1.5 t, lr)
    k2 = math.log(new2["step_size"] / (1.5 * t)) / math.log(0.8)
    assert math.isclose(k2, round(k2), abs_tol=1e-9) and new2["log"]["ls_evals"] == round(k2) + 1


def test_adaptive_damping_follows_the_ratio_test():
    params, model, loss_fn, _, X, Y, spec = make_mlp("mse", n=10, c=2)
    prob = cl.SupervisedLoss(model, loss_fn, params, (X, Y))
    paper = dict(adaptive_damping=True, damping_increase=1.01, damping_decrease=0.99)
    r = EGN(lr=1.0, damping=0.5, **paper).solve(prob, max_iter=8, tol=0.0)
    lams, rhos = r.history["damping"], r.history["rho"]
    for k in range(len(lams) - 1):
        expected = lams[k] * (1.01 if rhos[k] < 0.25 else 0.99 if rhos[k] > 0.75 else 1.0)
        assert math.isclose(lams[k + 1], expected, rel_tol=1e-12)
    assert r.history["value"][-1] < r.history["value"][0]
    # a step far too long gives a ratio < 0.25, so λ grows
    r = EGN(lr=3.0, damping=0.5, **paper).solve(prob, max_iter=1, tol=0.0)
    assert r.history["rho"][0] < 0.25 and r.state["damping"] == pytest.approx(0.5 * 1.01)


def test_defaults_by_problem_kind():
    """Deterministic: adaptive λ with the trust-region factors 1.5 / 0.5; mini-batches: the paper's fixed λ = 1."""
    s = EGN()
    assert s.adaptive(stochastic=False) and not s.adaptive(stochastic=True)
    det, mb = s.damping_rule(False), s.damping_rule(True)
    assert (det.increase, det.decrease, det.floor) == (1.5, 0.5, 1e-12)
    assert (mb.increase, mb.decrease, mb.floor) == (1.01, 0.99, 1e-4)
    params, model, loss_fn, _, X, Y, spec = make_mlp("mse", n=10, c=2)
    r = EGN(damping=0.5).solve(cl.SupervisedLoss(model, loss_fn, params, (X, Y)), max_iter=6, tol=0.0)
    lams, rhos = r.history["damping"], r.history["rho"]
    for k in range(len(lams) - 1):
        expected = lams[k] * (1.5 if rhos[k] < 0.25 else 0.5 if rhos[k] > 0.75 else 1.0)
        assert math.isclose(lams[k + 1], max(expected, 1e-12), rel_tol=1e-12)
    batches = [(X[:5], Y[:5]), (X[5:], Y[5:])]
    r = EGN().solve(cl.SupervisedLoss(model, loss_fn, params, batches), max_iter=4, tol=0.0)
    assert r.history["damping"] == [1.0] * 4 and all(math.isnan(v) for v in r.history["rho"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_zero_residual_fits_converge_in_twenty_iterations_by_default(seed):
    """The issue's case (paper defaults: 1.9e-4 after 300 iterations) and random zero-residual curve fits."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 2, 15 + 5 * seed, dtype=torch.float64)
    star = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64) + 0.3 * torch.randn(3, generator=g, dtype=torch.float64)
    model = lambda w: w[0] * torch.exp(w[1] * t) + w[2] * t  # noqa: E731
    y = model(star)
    r = EGN().solve(cl.LeastSquares(lambda w: model(w) - y, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)))
    assert r.status == "converged" and r.n_iter <= 20, (r.n_iter, r.message)
    torch.testing.assert_close(r.flat, star, rtol=1e-6, atol=1e-6)
    X = torch.linspace(0, 1, 20, dtype=torch.float64)
    p = cl.LeastSquares(lambda w: w[0] * torch.exp(w[1] * X) - 2 * torch.exp(-X), torch.ones(2, dtype=torch.float64))
    r = EGN().solve(p, max_iter=300)
    assert r.converged and r.n_iter <= 20
    torch.testing.assert_close(r.flat, torch.tensor([2.0, -1.0], dtype=torch.float64), rtol=1e-6, atol=1e-7)


def test_minibatch_training_and_bit_identical_resume():
    params, model, loss_fn, _, X, Y, spec = make_mlp("ce", n=48, c=3)
    batches = [(X[i : i + 12], Y[i : i + 12]) for i in range(0, 48, 12)]
    prob = cl.SupervisedLoss(model, loss_fn, params, batches)
    full_prob = cl.SupervisedLoss(model, loss_fn, params, (X, Y))
    s = EGN(lr=1.0, damping=1.0, line_search=True, adaptive_damping=True, momentum=0.3)
    full = s.solve(prob, max_iter=16, tol=0.0)
    assert float(full_prob.value(full.flat)) < 0.8 * float(full_prob.value(spec.flatten()))
    part = s.solve(prob, max_iter=6, tol=0.0)
    buf = io.BytesIO()
    torch.save(part.state, buf)
    buf.seek(0)
    rest = s.solve(prob, max_iter=16, tol=0.0, state=torch.load(buf, weights_only=False))
    assert torch.equal(rest.flat, full.flat) and rest.history["value"] == full.history["value"][6:]
    assert set(full.history.keys()) >= {"damping", "alpha", "rho", "ls_evals", "step_size"}


def test_non_finite_values_stop_with_nan_and_line_search_never_accepts_them():
    def res(x):  # NaN beyond x = 1; zero residual at 0.9
        r = torch.stack([x[0] - 0.9, 2 * (x[0] - 0.9)])
        return torch.where(x[0] > 1, torch.full_like(r, float("nan")), r)

    x0 = torch.tensor([0.0], dtype=torch.float64)
    r = EGN(lr=3.0, damping=1e-6).solve(cl.LeastSquares(res, x0), max_iter=10)
    assert r.status == "nan" and torch.equal(r.flat, x0)  # the full step lands at 2.7: NaN, not taken
    r = EGN(lr=3.0, damping=1e-6, line_search=True).solve(cl.LeastSquares(res, x0), max_iter=50, tol=1e-12)
    assert r.status in ("converged", "max_iter") and abs(r.flat.item() - 0.9) < 1e-10
    assert all(math.isfinite(v) for v in r.history["value"])
    r = EGN().solve(cl.LeastSquares(lambda x: x * float("nan"), x0), max_iter=5)
    assert r.status == "nan" and r.n_iter == 0


def test_deterministic_failed_line_search_stops():
    params, model, loss_fn, _, X, Y, spec = make_mlp("mse", n=6, c=2)
    prob = cl.SupervisedLoss(model, loss_fn, params, (X, Y))
    r = EGN(line_search=True, max_backtracks=1, lr=1e6, damping=1e-9).solve(prob, max_iter=5)
    assert r.status == "line_search_failed" and torch.equal(r.flat, spec.flatten())


def test_stochastic_failed_line_search_skips_the_batch():
    params, model, loss_fn, _, X, Y, spec = make_mlp("mse", n=12, c=2)
    prob = cl.SupervisedLoss(model, loss_fn, params, [(X[:6], Y[:6]), (X[6:], Y[6:])])
    r = EGN(line_search=True, max_backtracks=1, lr=1e6, damping=1e-9).solve(prob, max_iter=3, tol=0.0)
    assert r.status == "max_iter" and torch.equal(r.flat, spec.flatten())
    assert r.state["alpha"] == 1e6 and r.history["alpha"] == [0.0] * 3 and r.state["draws"] == 4


def test_options_are_checked():
    with pytest.raises(TypeError, match="unknown option"):
        EGN(dampng=1.0)
    for bad, name in (
        ({"damping": 0.0}, "EGN.damping"),
        ({"momentum": 1.0}, "EGN.momentum"),
        ({"c1": 1.5}, "EGN.c1"),
        ({"jacobian": "fast"}, "EGN.jacobian"),
        ({"max_backtracks": 0}, "EGN.max_backtracks"),
        ({"damping_increase": 0.5}, "EGN.damping_increase"),
        ({"damping_decrease": 2.0}, "EGN.damping_decrease"),
    ):
        with pytest.raises(ValueError, match=name):
            EGN(**bad)
    with pytest.raises(TypeError, match="adaptive_damping"):
        EGN(adaptive_damping="yes")
    with pytest.warns(DeprecationWarning, match="c1"):
        assert EGN(c=0.3).c1 == 0.3
    with pytest.raises(TypeError, match="both"):
        EGN(c=0.3, c1=0.2)
    with pytest.raises(TypeError, match="SupervisedLoss"):
        EGN().solve(cl.Minimize(lambda x: (x**2).sum(), torch.ones(2)))


def test_float32_and_module_parameters():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    X, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    prob = cl.SupervisedLoss(net, lambda o, t: cross_entropy(o, t, reduction="none"), None, (X, y))
    r = EGN(damping=0.1, line_search=True).solve(prob, max_iter=10, tol=0.0)
    assert isinstance(r.params, torch.nn.Sequential) and r.flat.dtype == torch.float32
    assert r.value < 0.6 * float(prob.value(prob.x0))
