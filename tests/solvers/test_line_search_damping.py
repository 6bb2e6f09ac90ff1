"""The one Armijo line search and the one ratio-damping rule (curvlab.solvers.Armijo / RatioDamping)."""

from __future__ import annotations

import math

import pytest
import torch

import curvlab as cl
from curvlab.solvers import Armijo, LineSearchResult, RatioDamping, armijo, gain_ratio, interpolated_increase


def _quadratic(a: float, b: float):
    """phi(t) = (a - b t)^2 as a float64 tensor, with phi(0) = a^2 and phi'(0) = -2ab."""
    return lambda t: torch.tensor((a - b * t) ** 2, dtype=torch.float64)


def test_accepts_the_first_step_with_sufficient_decrease_by_hand():
    phi = _quadratic(1.0, 3.0)  # phi(1) = 4 > 1, phi(0.5) = 0.25 <= 1 - 1e-4 * 0.5 * 6
    res = Armijo().search(phi, 1.0, -6.0, t0=1.0)
    assert isinstance(res, LineSearchResult)
    assert res.success and res.status == "converged" and res.t == 0.5 and res.n_evals == 2
    assert float(res.value) == 0.25
    # c1 = 0.9 rejects 0.5 (0.25 > 1 - 0.9 * 0.5 * 6 = -1.7) and 0.25 (0.0625 > 1 - 0.9*0.25*6=-0.35);
    # accepts 0.125: 0.390625 <= 1 - 0.675 = 0.325? no -> 0.0625: 0.660156 <= 0.6625 yes
    res = Armijo(c1=0.9).search(phi, 1.0, -6.0, t0=1.0)
    assert res.t == 0.0625 and res.n_evals == 5


def test_function_form_matches_the_class_and_keeps_the_old_signature():
    phi = _quadratic(2.0, 1.0)
    a = armijo(phi, 4.0, -4.0, 8.0, 1e-4, 0.5, 30)
    b = Armijo(1e-4, 0.5, 30).search(phi, 4.0, -4.0, 8.0)
    assert (a.t, a.n_evals, a.success, a.status) == (b.t, b.n_evals, b.success, b.status)
    assert a.t == 2.0 or a.t == 4.0  # phi(4) = 4 (no decrease), phi(2) = 0


def test_non_finite_trials_shrink_and_all_non_finite_is_nan():
    seen = []

    def phi(t):
        seen.append(t)
        return torch.tensor(float("nan") if t > 0.3 else (1 - t) ** 2, dtype=torch.float64)

    res = Armijo().search(phi, 1.0, -2.0, t0=1.0)
    assert res.success and res.t == 0.25 and res.n_nonfinite == 2 and seen == [1.0, 0.5, 0.25]
    res = Armijo(max_trials=5).search(lambda t: torch.tensor(float("inf")), 1.0, -2.0)
    assert not res.success and res.status == "nan" and res.n_evals == 5 and res.value is None
    res = Armijo().search(_quadratic(1, 1), float("nan"), -1.0)
    assert res.status == "nan" and res.n_evals == 0


def test_not_a_descent_direction_fails_without_evaluations():
    calls = []
    res = Armijo().search(lambda t: calls.append(t) or torch.tensor(0.0), 1.0, 0.5)
    assert res.status == "line_search_failed" and res.n_evals == 0 and not calls and not res.precision_limit
    assert Armijo().search(lambda t: torch.tensor(1.0), 1.0, 0.0).precision_limit  # zero slope: stationary


def test_precision_limit_flag_tells_rounding_from_a_real_failure():
    f0 = torch.tensor(1.0, dtype=torch.float64)
    # a decrease of 1e-20 per unit step: far below the float64 rounding of f0 = 1
    flat = Armijo(max_trials=4).search(lambda t: f0 + 1e-15, f0, -1e-20, t0=1.0)
    assert not flat.success and flat.status == "line_search_failed" and flat.precision_limit
    # a real failure: the slope promises a measurable decrease that never comes
    bad = Armijo(max_trials=4).search(lambda t: f0 + 1.0, f0, -1.0, t0=1.0)
    assert not bad.success and not bad.precision_limit and "4 trials" in bad.message
    # in float32 the noise level is float32's
    f32 = torch.tensor(1.0)
    assert Armijo(max_trials=2).search(lambda t: f32 + 1e-6, f32, -1e-7).precision_limit
    assert not Armijo(max_trials=2).search(lambda t: f32 + 1e-6, f32, -1e-4).precision_limit


def test_accept_and_tie_hooks_and_aux():
    phi = lambda t: (torch.tensor((1 - t) ** 2, dtype=torch.float64), {"t": t})  # noqa: E731
    res = Armijo().search(phi, 1.0, -2.0, t0=1.0, accept=lambda t, v, aux: t < 0.3)
    assert res.t == 0.25 and res.aux == {"t": 0.25}
    # within noise of f0 and "better" by the tie test: accepted although Armijo's test fails
    f0 = torch.tensor(1.0, dtype=torch.float64)
    res = Armijo().search(lambda t: f0 + 1e-15, f0, -1.0, t0=1e-20, tie=lambda t, v, aux: True)
    assert res.success and res.message == "within noise" and res.n_evals == 1
    res = Armijo(max_trials=3).search(lambda t: f0 + 1e-15, f0, -1.0, t0=1e-20, tie=lambda t, v, aux: False)
    assert not res.success


def test_value_t0_saves_an_evaluation():
    calls = []
    phi = lambda t: calls.append(t) or torch.tensor((1 - t) ** 2, dtype=torch.float64)  # noqa: E731
    res = Armijo().search(phi, 1.0, -2.0, t0=2.0, value_t0=torch.tensor(1.0, dtype=torch.float64))
    assert res.t == 1.0 and calls == [1.0] and res.n_evals == 2


def test_reset_rule_of_egn():
    ls = Armijo(c1=0.1, shrink=0.8, max_trials=15, grow=1.5)
    assert ls.first_trial(0.2, 1.0) == pytest.approx(0.3)
    assert ls.first_trial(0.9, 1.0) == 1.0
    assert ls.first_trial(None, 1.0) == 1.0 and Armijo().first_trial(0.01, 2.0) == 2.0


@pytest.mark.parametrize(
    "kw, name",
    [
        ({"c1": 0.0}, "Armijo.c1"),
        ({"c1": 1.0}, "Armijo.c1"),
        ({"shrink": 1.5}, "Armijo.shrink"),
        ({"max_trials": 0}, "Armijo.max_trials"),
        ({"max_trials": 2.5}, "Armijo.max_trials"),
        ({"grow": -1.0}, "Armijo.grow"),
    ],
)
def test_armijo_bad_constants_name_the_argument(kw, name):
    with pytest.raises(ValueError, match=name):
        Armijo(**kw)


def test_ratio_damping_rule_by_hand():
    rule = RatioDamping(0.25, 0.75, increase=3.0, decrease=0.5, floor=1e-3, ceiling=10.0)
    assert rule.update(1.0, 0.9) == 0.5 and rule.update(1.0, 0.1) == 3.0 and rule.update(1.0, 0.5) == 1.0
    assert rule.update(1e-3, 0.9) == 1e-3 and rule.update(8.0, -1.0) == 10.0  # floor / ceiling
    assert rule.update(1.0, float("nan")) == 3.0  # a failed trial counts as poor
    assert rule.update(1.0, 0.1, increase=7.0) == 7.0
    # the trust-radius form: poor -> (1/increase) * min(delta, 10 |p|); good or undamped -> |p| / decrease
    assert rule.radius(2.0, 0.1, 0.1) == pytest.approx(1.0 / 3.0)
    assert rule.radius(2.0, 1.0, 0.1) == pytest.approx(2.0 / 3.0)
    assert rule.radius(2.0, 1.0, 0.9) == 2.0 and rule.radius(5.0, 1.0, 0.5) == 5.0
    assert rule.radius(5.0, 1.0, 0.5, undamped=True) == 2.0


def test_presets_are_the_papers_values():
    assert RatioDamping.preset("egn") == RatioDamping(0.25, 0.75, 1.01, 0.99)
    assert RatioDamping.preset("trust_region") == RatioDamping(0.25, 0.75, 1.5, 0.5)
    assert RatioDamping.preset("more", floor=1.0).floor == 1.0
    with pytest.raises(ValueError, match="preset"):
        RatioDamping.preset("nope")


@pytest.mark.parametrize(
    "kw, name",
    [
        ({"rho_low": 0.8, "rho_high": 0.5}, "rho_low"),
        ({"increase": 0.5}, "increase"),
        ({"decrease": 1.5}, "decrease"),
        ({"decrease": 0.0}, "decrease"),
        ({"floor": -1.0}, "floor"),
        ({"floor": 2.0, "ceiling": 1.0}, "ceiling"),
        ({"increase": float("nan")}, "increase"),
    ],
)
def test_ratio_damping_bad_values_name_the_argument(kw, name):
    with pytest.raises(ValueError, match=name):
        RatioDamping(**kw)


def test_gain_ratio_and_more_interpolation():
    assert gain_ratio(1.0, 2.0) == 0.5 and gain_ratio(float("nan"), 1.0) == -math.inf and gain_ratio(1.0, 0.0) == 0.0
    assert interpolated_increase(0.1, -0.5) == 2.0  # a decrease: gamma = 0.5
    assert interpolated_increase(-1.0, -0.5, blowup=True) == 10.0
    # gamma = 0.5 s / (s + 0.5 a) minimises the interpolating quadratic q(t) = 1 + 2 s t + (-a - 2 s) t^2
    a, s = -0.6, -0.4
    g = 0.5 * s / (s + 0.5 * a)
    tt = torch.linspace(0, 1, 100001, dtype=torch.float64)
    q = 1 + 2 * s * tt + (-a - 2 * s) * tt**2
    assert abs(float(tt[q.argmin()]) - g) < 1e-4
    assert interpolated_increase(a, s) == pytest.approx(1 / max(min(g, 0.5), 0.1))
    assert interpolated_increase(-100.0, -0.5) == 10.0  # gamma < 0.1 is clipped


def test_solvers_share_the_one_line_search(monkeypatch):
    calls = []
    orig = Armijo.search

    def spy(self, *a, **k):
        calls.append(type(self).__name__)
        return orig(self, *a, **k)

    monkeypatch.setattr(Armijo, "search", spy)
    p = cl.Minimize(lambda x: ((x - 1) ** 4).sum() + (x**2).sum(), torch.zeros(3, dtype=torch.float64))
    lsq = cl.LeastSquares(lambda w: w**2 - 2.0, torch.ones(2, dtype=torch.float64))
    for solver, prob in [
        (cl.solvers.GradientDescent(lr=0.1, line_search=True), p),
        (cl.solvers.NewtonCG(), p),
        (cl.solvers.SaddleFreeNewton(), p),
        (cl.solvers.EGN(line_search=True), lsq),
    ]:
        calls.clear()
        solver.solve(prob, max_iter=2)
        assert calls, type(solver).__name__
