"""Problems, the solve loop, Result, save/resume and non-finite handling."""

from __future__ import annotations

import io

import numpy as np
import pytest
import scipy.optimize
import torch

import curvlab as cl


def rosen(x):
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


@pytest.mark.parametrize("x0", [[-1.2, 1.0], [-1.2, 1.0] * 5], ids=["2d", "10d"])
def test_newton_cg_rosenbrock_reaches_a_certified_minimum_like_scipy(x0):
    x0 = torch.tensor(x0, dtype=torch.float64)
    r = cl.solve(cl.Minimize(rosen, x0), cl.solvers.NewtonCG(), max_iter=500, tol=1e-10)
    assert r.converged and r.status == "converged"
    g = torch.func.grad(rosen)(r.params)
    assert g.norm() <= 1e-10
    assert bool((torch.linalg.eigvalsh(torch.func.hessian(rosen)(r.params)) > 0).all())  # a strict local minimum
    # scipy's Newton-CG started at our solution stays there; from x0 in 2-D (one minimum) it finds the same
    ref = scipy.optimize.minimize(
        scipy.optimize.rosen,
        (x0 if x0.numel() == 2 else r.params).numpy(),
        jac=scipy.optimize.rosen_der,
        hess=scipy.optimize.rosen_hess,
        method="Newton-CG",
        options={"xtol": 1e-14},
    )
    assert ref.success
    np.testing.assert_allclose(r.params.numpy(), ref.x, atol=1e-8)
    assert r.history["grad_norm"][-1] <= 1e-10 and r.history["matvecs"][-1] > 0
    assert torch.equal(x0, torch.tensor(x0.tolist(), dtype=torch.float64))  # input untouched


def test_newton_cg_iterates_do_not_depend_on_the_scale_of_the_loss():
    """The issue's case: the loss ×1e-8 must not "converge" at iteration 0 under the default tolerance."""
    x0 = torch.tensor([-1.2, 1.0] * 3, dtype=torch.float64)
    runs = [cl.solvers.NewtonCG().solve(cl.Minimize(lambda x, c=c: c * rosen(x), x0), max_iter=300) for c in (1, 1e-8)]
    for r in runs:
        assert r.status == "converged" and r.n_iter > 10 and "rtol" in r.message
        assert float(torch.func.grad(rosen)(r.params).norm()) < 1e-5
    torch.testing.assert_close(runs[0].flat, runs[1].flat, rtol=0, atol=1e-9)
    assert runs[0].n_iter == runs[1].n_iter


def test_newton_cg_logistic_regression_breast_cancer_matches_scipy():
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    Xt, yt = torch.tensor(X), torch.tensor(y, dtype=torch.float64)
    lam = 1e-2

    def loss(params, batch):
        w, b = params["w"], params["b"]
        Xb, yb = batch
        z = Xb @ w + b
        return torch.nn.functional.binary_cross_entropy_with_logits(z, yb) + 0.5 * lam * (w @ w)

    params = {"w": torch.zeros(30, dtype=torch.float64), "b": torch.zeros((), dtype=torch.float64)}
    r = cl.solve(cl.Minimize(loss, params, data=(Xt, yt)), cl.solvers.NewtonCG(), max_iter=100, tol=1e-10)
    assert r.converged

    def fnp(theta):
        z = X @ theta[:30] + theta[30]
        return np.mean(np.logaddexp(0, z) - y * z) + 0.5 * lam * theta[:30] @ theta[:30]

    def gnp(theta):
        z = X @ theta[:30] + theta[30]
        s = 1 / (1 + np.exp(-z)) - y
        return np.concatenate([X.T @ s / len(y) + lam * theta[:30], [s.mean()]])

    ref = scipy.optimize.minimize(fnp, np.zeros(31), jac=gnp, method="BFGS", options={"gtol": 1e-11})
    np.testing.assert_allclose(r.params["w"].numpy(), ref.x[:30], atol=1e-7)
    assert abs(r.value - ref.fun) < 1e-12
    # same problem over several batches gives the same optimum
    batches = [(Xt[i : i + 100], yt[i : i + 100]) for i in range(0, len(yt), 100)]
    r2 = cl.solve(cl.Minimize(loss, params, data=batches), cl.solvers.NewtonCG(), max_iter=100, tol=1e-10)
    np.testing.assert_allclose(r2.params["w"].numpy(), r.params["w"].numpy(), atol=1e-9)


@pytest.mark.parametrize(
    "solver",
    [
        cl.solvers.GradientDescent(lr=1e-3, momentum=0.9),
        cl.solvers.Adam(lr=1e-2),
        cl.solvers.NewtonCG(),
        cl.solvers.GradientDescent(lr=1.0, line_search=True),
    ],
)
def test_save_resume_bit_identical(solver):
    torch.manual_seed(0)
    X, y = torch.randn(40, 3, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
    batches = [(X[i : i + 10], y[i : i + 10]) for i in range(0, 40, 10)]

    def loss(w, batch):
        return ((torch.tanh(batch[0] @ w) - batch[1]) ** 2).mean() + (w**4).sum()

    problem = cl.Minimize(loss, torch.ones(3, dtype=torch.float64), data=batches)
    full = solver.solve(problem, max_iter=12, tol=0.0)
    part = solver.solve(problem, max_iter=5, tol=0.0)
    buf = io.BytesIO()
    torch.save(part.state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=False)
    rest = solver.solve(problem, max_iter=12, tol=0.0, state=state)
    assert rest.n_iter == full.n_iter == 12
    assert torch.equal(rest.flat, full.flat)
    assert rest.history["value"] == full.history["value"][5:]


def test_nan_stops_with_last_finite_params():
    def loss(x):
        return torch.where(x.sum() > 2.5, torch.tensor(float("nan"), dtype=x.dtype), ((x - 3) ** 2).sum())

    r = cl.solve(
        cl.Minimize(loss, torch.zeros(1, dtype=torch.float64)), cl.solvers.GradientDescent(lr=0.4), max_iter=50
    )
    assert r.status == "nan" and not r.converged
    assert torch.isfinite(r.flat).all() and r.flat.item() <= 2.5
    with pytest.raises(FloatingPointError):
        cl.solve(
            cl.Minimize(loss, torch.zeros(1, dtype=torch.float64)),
            cl.solvers.GradientDescent(lr=0.4),
            max_iter=50,
            raise_on_nan=True,
        )
    r0 = cl.solve(cl.Minimize(lambda x: x.sum() / 0 * 0, torch.zeros(1)), cl.solvers.NewtonCG())
    assert r0.status == "nan" and r0.n_iter == 0


def test_line_search_never_accepts_nan():
    def loss(x):  # NaN beyond 1, minimum at 0.9
        return torch.where(x > 1, torch.full_like(x, float("nan")), (x - 0.9) ** 2).sum()

    r = cl.solve(cl.Minimize(loss, torch.zeros(1, dtype=torch.float64)), cl.solvers.NewtonCG(), max_iter=20)
    assert r.converged and abs(r.flat.item() - 0.9) < 1e-8


def test_result_fields_history_callback_progress():
    p = cl.Minimize(lambda x: ((x - 1) ** 2).sum(), torch.zeros(3))
    seen = []
    r = cl.solvers.GradientDescent(lr=0.1).solve(
        p, max_iter=30, callback=lambda s: seen.append(s["iter"]) or s["iter"] >= 7, progress=True
    )
    assert r.status == "callback" and r.n_iter == 7 and seen == list(range(1, 8))
    assert len(r.history) == 7 and set(r.history.keys()) >= {"value", "grad_norm", "step_size", "time", "matvecs"}
    assert r.history[-1]["value"] == r.history["value"][-1] == r.value
    assert r.fun == r.value and r.nit == r.n_iter and r.success is False
    r = cl.solvers.GradientDescent(lr=0.5).solve(p, max_iter=100, tol=1e-6)
    assert r.converged and r.status == "converged"


def test_module_params_come_back_as_a_module():
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 1).double()
    X = torch.randn(20, 2, dtype=torch.float64)
    Y = X @ torch.tensor([[1.0], [-2.0]], dtype=torch.float64) + 0.5
    prob = cl.SupervisedLoss(net, lambda o, y: ((o - y) ** 2).sum(-1), None, (X, Y))
    r = cl.solve(prob, cl.solvers.NewtonCG(), max_iter=20, tol=1e-10)
    assert isinstance(r.params, torch.nn.Linear)
    torch.testing.assert_close(r.params.weight.detach(), torch.tensor([[1.0, -2.0]], dtype=torch.float64))
    assert not torch.allclose(net.weight.detach(), r.params.weight.detach())


def test_least_squares_objective_scaling():
    A = torch.randn(6, 3, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    prob = cl.LeastSquares(lambda x: A @ x - b, torch.zeros(3, dtype=torch.float64))
    x = torch.randn(3, dtype=torch.float64)
    torch.testing.assert_close(prob.value(x), 0.5 * ((A @ x - b) ** 2).sum() / 6)
    torch.testing.assert_close(prob.jacobian(x).to_dense(), A)
    r = cl.solve(prob, cl.solvers.NewtonCG(), tol=1e-12)
    torch.testing.assert_close(r.params, torch.linalg.lstsq(A, b[:, None]).solution[:, 0])


def test_bad_input_errors():
    with pytest.raises(ValueError, match="scalar"):
        cl.Minimize(lambda x: x * 2, torch.zeros(3))
    with pytest.raises(TypeError, match="loss must be callable"):
        cl.Minimize("loss", torch.zeros(3))
    with pytest.raises(TypeError, match="floating"):
        cl.Minimize(lambda x: x.sum(), torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="data"):
        cl.Minimize(lambda w, b: (b[0] @ w).sum(), torch.zeros(3), data=(torch.zeros(5, 4), torch.zeros(5)))
    with pytest.raises(ValueError, match="max_iter"):
        cl.solvers.NewtonCG().solve(cl.Minimize(lambda x: x.sum(), torch.zeros(1)), max_iter=0)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['lrr'\]"):
        cl.solvers.GradientDescent(lrr=0.1)
    with pytest.raises(ValueError, match="lr"):
        cl.solvers.Adam(lr=-1.0)
    with pytest.raises(ValueError, match="per-sample"):  # a sum is neither per-sample losses nor their mean
        cl.SupervisedLoss(
            lambda p, x: x @ p, lambda o, y: ((o - y) ** 2).sum(), torch.zeros(2), (torch.ones(4, 2), torch.ones(4))
        )
    with pytest.raises(ValueError, match="per-sample"):  # elementwise losses of another shape
        cl.SupervisedLoss(
            lambda p, x: x @ p, lambda o, y: (o - y)[:, None] ** 2, torch.zeros(2), (torch.ones(4, 2), torch.ones(4))
        )
    with pytest.raises(ValueError, match="one-shot"):
        cl.Minimize(lambda w, b: w.sum(), torch.zeros(1), data=iter([torch.zeros(1)]))
    with pytest.raises(TypeError, match="solver"):
        cl.solve(cl.Minimize(lambda x: x.sum(), torch.zeros(1)), "NewtonCG")


def test_adam_matches_torch_optim():
    torch.manual_seed(0)
    w0 = torch.randn(4, dtype=torch.float64)

    def loss(w):
        return ((w - torch.arange(4.0, dtype=torch.float64)) ** 4).sum()

    r = cl.solvers.Adam(lr=0.05).solve(cl.Minimize(loss, w0), max_iter=25, tol=0.0)
    w = w0.clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=0.05)
    for _ in range(25):
        opt.zero_grad()
        loss(w).backward()
        opt.step()
    torch.testing.assert_close(r.params, w.detach(), atol=1e-14, rtol=0)


def test_sgd_draws_batches_in_order():
    batches = [torch.full((2,), float(i + 1)) for i in range(3)]
    seen = []

    def loss(w, b):
        seen.append(float(b[0]))
        return ((w - b) ** 2).mean()

    prob = cl.Minimize(loss, torch.zeros(2), data=batches)
    seen.clear()
    cl.solvers.GradientDescent(lr=0.1).solve(prob, max_iter=5, tol=0.0)
    assert seen == [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]


# --------------------------------------------------------------------------- honest, scale-free stopping (issue 13)
def _nan_away_from(x0, f):
    """f at x0, NaN at every other point: every line-search trial is non-finite."""
    return lambda x: torch.where((x - x0).abs().sum() > 0, torch.tensor(float("nan"), dtype=x.dtype), f(x))


@pytest.mark.parametrize(
    "make",
    [
        lambda: cl.solvers.NewtonCG(),
        lambda: cl.solvers.GradientDescent(lr=0.1, line_search=True),
        lambda: cl.solvers.SaddleFreeNewton(k=3),
        lambda: cl.solvers.SaddleFreeNewton(method="lowrank", k=2),
    ],
    ids=["NewtonCG", "GD", "SFN", "SFN_lowrank"],
)
def test_line_search_solvers_stop_with_nan_and_raise_on_nan(make):
    x0 = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    p = cl.Minimize(_nan_away_from(x0, lambda x: ((x - 1) ** 2).sum() + (x**4).sum()), x0)
    r = make().solve(p, max_iter=5)
    assert r.status == "nan" and not r.converged and torch.equal(r.flat, x0), r.message
    with pytest.raises(FloatingPointError):
        make().solve(p, max_iter=5, raise_on_nan=True)


def test_egn_all_nan_trials_is_nan():
    x0 = torch.tensor([0.3, -0.2], dtype=torch.float64)

    def res(w):
        r = torch.stack([w[0] - 1, 2 * w[1] + w[0] ** 2])
        return torch.where((w - x0).abs().sum() > 0, torch.full_like(r, float("nan")), r)

    r = cl.solvers.EGN(line_search=True, max_backtracks=4).solve(cl.LeastSquares(res, x0), max_iter=5)
    assert r.status == "nan" and torch.equal(r.flat, x0)
    with pytest.raises(FloatingPointError):
        cl.solvers.EGN(line_search=True, max_backtracks=4).solve(cl.LeastSquares(res, x0), raise_on_nan=True)


def test_status_is_the_shared_enum_and_result_accepts_legacy_strings():
    r = cl.solvers.GradientDescent(lr=0.1).solve(cl.Minimize(lambda x: (x**2).sum(), torch.ones(2)), max_iter=3)
    assert isinstance(r.status, cl.Status) and r.status is cl.Status.MAX_ITER and r.status == "max_iter"
    assert cl.Result(params=None, value=0.0, n_iter=0, converged=False, status="maxiter").status is cl.Status.MAX_ITER


def test_tolerances_semantics_rtol_tol_and_clipping():
    x0 = torch.tensor([3.0, -2.0], dtype=torch.float64)
    p = cl.Minimize(lambda x: (x**2 * torch.tensor([1.0, 10.0], dtype=x.dtype)).sum(), x0)
    g0 = float(torch.func.grad(p.loss)(x0).norm())
    gd = cl.solvers.GradientDescent(lr=0.05)
    r = gd.solve(p, max_iter=2000, rtol=1e-3)
    assert r.converged and r.history["grad_norm"][-1] <= 1e-3 * g0 < r.history["grad_norm"][-2]
    r = gd.solve(p, max_iter=2000, tol=1e-3)  # absolute
    assert r.converged and r.history["grad_norm"][-1] <= 1e-3 < r.history["grad_norm"][-2]
    r = gd.solve(p, max_iter=2000, tol=1e-3, rtol=1e-1)  # either test suffices
    assert r.converged and "rtol" in r.message
    assert gd.solve(p, max_iter=50, tol=0.0).status == "max_iter"  # tol=0: no gradient test
    r = gd.solve(p, max_iter=3000)  # default: rtol = sqrt(eps)
    assert r.converged and r.history["grad_norm"][-1] <= 1.5e-8 * g0
    with pytest.warns(UserWarning, match="rtol"):
        gd.solve(p, max_iter=2, rtol=1e-20)
    with pytest.warns(UserWarning, match="tol"):
        gd.solve(p, max_iter=2, tol=1e-30)
    p32 = cl.Minimize(lambda x: (x**2).sum(), torch.ones(2))
    with pytest.warns(UserWarning, match="float32"):
        gd.solve(p32, max_iter=2, rtol=1e-9)


@pytest.mark.parametrize(
    "kw, name",
    [({"rtol": -1.0}, "rtol"), ({"tol": float("nan")}, "tol"), ({"time_limit": 0.0}, "time_limit"),
     ({"rtol": "small"}, "rtol"), ({"max_iter": 2.0}, "max_iter")],
)  # fmt: skip
def test_bad_run_arguments_name_the_argument(kw, name):
    with pytest.raises(ValueError, match=name):
        cl.solvers.NewtonCG().solve(cl.Minimize(lambda x: (x**2).sum(), torch.ones(2)), **kw)


def test_time_limit_in_solve():
    p = cl.Minimize(lambda x: ((x - 1) ** 2).sum(), torch.zeros(3))
    r = cl.solvers.GradientDescent(lr=1e-3).solve(p, max_iter=10**6, tol=0.0, time_limit=0.05)
    assert r.status == "time_limit" and 0 < r.n_iter < 10**6 and "time_limit" in r.message


def test_limit_of_precision_ends_as_converged_not_failed():
    """A failed search that the rounding of f explains ends as converged (with the reason); a real failure does not."""
    from curvlab.solvers import Armijo
    from curvlab.solvers._common import search_stop

    f0 = torch.tensor(1.0, dtype=torch.float64)
    flat = Armijo(max_trials=3).search(lambda t: f0 + 1e-15, f0, -1e-20)
    assert search_stop(flat)["status"] == "converged" and "precision" in search_stop(flat)["message"]
    bad = Armijo(max_trials=3).search(lambda t: f0 + 1.0, f0, -1.0)
    assert search_stop(bad)["status"] == "line_search_failed"
    # while a search that fails for a real reason (a step cap far too long, one trial) says so
    q = cl.Minimize(lambda x: ((x - 1) ** 2).sum(), torch.zeros(3, dtype=torch.float64))
    r = cl.solvers.GradientDescent(lr=1e3, line_search=True, max_backtracks=1).solve(q, max_iter=10)
    assert r.status == "line_search_failed"


def test_deprecated_option_aliases():
    @cl.solvers.options
    class Toy(cl.solvers.Solver):
        step_size: float = 1.0
        aliases = {"lr": "step_size"}

    with pytest.warns(DeprecationWarning, match="step_size"):
        t = Toy(lr=0.5)
    assert t.step_size == 0.5 and Toy.aliases == {"lr": "step_size"}
    with pytest.warns(DeprecationWarning):
        assert t.lr == 0.5
    with pytest.raises(TypeError, match="both"):
        Toy(lr=0.5, step_size=0.2)
    with pytest.raises(TypeError, match="unknown option"):
        Toy(lrr=1.0)
