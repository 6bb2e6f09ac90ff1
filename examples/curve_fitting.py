"""Nonlinear least squares with curvlab's GaussNewton (Levenberg-Marquardt) versus scipy (MINPACK).

Two fits, each solved by ``curvlab.solvers.GaussNewton`` (Moré's trust-region
Levenberg-Marquardt, the algorithm of MINPACK's ``lmder``) and by
``scipy.optimize.least_squares(method="lm")`` (MINPACK itself), both printed:

1. a damped oscillation :math:`y = a e^{-bt}\\cos(\\omega t + \\varphi) + c` fitted to 200
   generated noisy points (5 parameters);
2. Meyer's thermistor data (resistance against temperature, 16 measurements; the
   Moré-Garbow-Hillstrom problem 10): :math:`y = x_1 e^{x_2/(t + x_3)}`, whose parameters
   differ by six orders of magnitude — Moré's variable scaling at work.

Run:  python examples/curve_fitting.py
"""

from __future__ import annotations

import time

import numpy as np
import scipy.optimize
import torch

import curvlab as cl

torch.manual_seed(0)
dtype = torch.float64

# --- 1. damped oscillation, generated data --------------------------------------------
t1 = torch.linspace(0, 10, 200, dtype=dtype)
truth = torch.tensor([2.0, 0.3, 1.7, 0.5, 0.2], dtype=dtype)  # a, b, omega, phi, c


def oscillation(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    a, b, w, phi, c = p
    return a * torch.exp(-b * t) * torch.cos(w * t + phi) + c


y1 = oscillation(truth, t1) + 0.05 * torch.randn(200, dtype=dtype)

# --- 2. Meyer's thermistor data (Meyer 1970; MGH 1981 problem 10) ---------------------
t2 = 45 + 5 * torch.arange(1, 17, dtype=dtype)
y2 = torch.tensor(
    [34780, 28610, 23650, 19630, 16370, 13720, 11540, 9744, 8261, 7030, 6005, 5147, 4427, 3820, 3307, 2872], dtype=dtype
)


def thermistor(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return p[0] * torch.exp(p[1] / (t + p[2]))


fits = [
    (
        "damped oscillation, 200 generated points",
        oscillation,
        (t1, y1),
        [1.0, 0.1, 1.5, 0.0, 0.0],
        ["a", "b", "omega", "phi", "c"],
    ),
    ("Meyer's thermistor data, 16 points", thermistor, (t2, y2), [0.02, 4000.0, 250.0], ["x1", "x2", "x3"]),
]

for title, model, (t, y), start, names in fits:
    print(f"\n=== {title} ===")

    def residuals(p: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor], model=model) -> torch.Tensor:
        tb, yb = batch
        return model(p, tb) - yb

    x0 = torch.tensor(start, dtype=dtype)
    problem = cl.LeastSquares(residuals, x0, data=(t, y))
    t0 = time.perf_counter()
    ours = cl.solvers.GaussNewton(xtol=1e-14).solve(problem, max_iter=1000, tol=1e-12)
    t_ours = time.perf_counter() - t0

    def f(p: np.ndarray, model=model, t=t, y=y) -> np.ndarray:
        return (model(torch.tensor(p), t) - y).numpy()

    def jac(p: np.ndarray, model=model, t=t) -> np.ndarray:
        return torch.func.jacrev(lambda q: model(q, t))(torch.tensor(p)).numpy()

    t0 = time.perf_counter()
    ref = scipy.optimize.least_squares(f, np.array(start), jac=jac, method="lm", xtol=1e-14, ftol=1e-14, gtol=1e-14)
    t_ref = time.perf_counter() - t0

    print(f"{'parameter':>10s} {'curvlab GaussNewton':>24s} {'scipy lm (MINPACK)':>24s} {'rel. difference':>16s}")
    for name, a, b in zip(names, ours.flat.tolist(), ref.x.tolist()):
        print(f"{name:>10s} {a:24.15g} {b:24.15g} {abs(a - b) / max(abs(b), 1e-300):16.2e}")
    ss_ours = float((residuals(ours.flat, (t, y)) ** 2).sum())
    print(f"{'sum sq.':>10s} {ss_ours:24.15g} {2 * ref.cost:24.15g}")
    print(
        f"curvlab: status={ours.status!r}, {ours.n_iter} iterations, ||grad||={ours.history['grad_norm'][-1]:.1e}, "
        f"{t_ours:.2f} s;  scipy: {ref.message!r}, {ref.nfev} evaluations, {t_ref:.2f} s"
    )
