"""Every bilevel solver on the same problems, one line each: switch algorithms by changing one line.

1. The quadratic bilevel problem with closed-form solution (benchopt's design): gap
   ``F(x) − F*`` against wall time and oracle calls.
2. Per-feature L2-regularised logistic regression on scikit-learn's digits (64
   hyperparameters λ_j = exp(x_j)): validation loss and validation / test accuracy.

Prints a table per problem and saves ``bilevel_compare.png``. Runs in a few minutes on CPU.
Solvers: IFT, AID, ITD, F2SA, BO-REP, LV-HBA — every one with its defaults (no step size set by hand).
"""

from __future__ import annotations

import os
import time

import torch

import bilevel as bl
from bilevel.problems import logreg, quadratic

torch.set_num_threads(1)
torch.manual_seed(0)


def solvers() -> dict:
    """Every solver with its defaults: no step size to tune; each run stops by itself (or at ``TIME_LIMIT``)."""
    return {name: getattr(bl, name)() for name in ("IFT", "AID", "ITD", "F2SA", "BOREP", "LVHBA")}


MAX_ITER, TIME_LIMIT = 1000, 20.0


def run(problem, solver, evaluate) -> dict:
    rec = {"time": [], "oracles": [], "metric": []}
    t0 = time.perf_counter()
    paused = [0.0]

    def callback(state):
        t = time.perf_counter()
        rec["time"].append(t - t0 - paused[0])
        rec["oracles"].append(state["grads"] + state["hvps"])
        rec["metric"].append(evaluate(state))
        paused[0] += time.perf_counter() - t

    result = solver.solve(problem, max_iter=MAX_ITER, time_limit=TIME_LIMIT, callback=callback)
    rec["result"] = result
    return rec


# --------------------------------------------------------------- quadratic
q = quadratic(dx=20, dy=50, cond=20.0, reg=0.5)
print(q, f"F* = {q.outer_star:.6f}")
print(f"{'solver':<8}{'F(x) - F*':>12}{'|x-x*|/|x*|':>13}{'time [s]':>10}{'grads':>8}{'hvps':>8}  status")
quad_curves = {}
for name, solver in solvers().items():
    rec = run(q.problem, solver, lambda s: q.outer_value(s["x"]) - q.outer_star)
    r = rec["result"]
    rel = float((r.x_flat - q.x_star).norm() / q.x_star.norm())
    print(
        f"{name:<8}{rec['metric'][-1]:>12.3e}{rel:>13.3e}{rec['time'][-1]:>10.2f}"
        f"{r.state['grads']:>8d}{r.state['hvps']:>8d}  {r.status}"
    )
    quad_curves[name] = rec

# ------------------------------------------------------------------ logreg
lg = logreg("digits", per_feature=True, x0=0.0)
print(f"\n{lg} (64 hyperparameters)")
print(f"{'solver':<8}{'val loss':>10}{'val acc':>9}{'test acc':>9}{'time [s]':>10}{'grads':>8}{'hvps':>8}  status")
log_curves = {}
for name, solver in solvers().items():
    rec = run(lg.problem, solver, lambda s: lg.loss(s["y"], "val"))
    r = rec["result"]
    print(
        f"{name:<8}{lg.loss(r.y, 'val'):>10.4f}{lg.val_accuracy(r.y):>9.3f}{lg.test_accuracy(r.y):>9.3f}"
        f"{rec['time'][-1]:>10.2f}{r.state['grads']:>8d}{r.state['hvps']:>8d}  {r.status}"
    )
    log_curves[name] = rec

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for row, (curves, ylabel, log) in enumerate(
        ((quad_curves, "F(x) − F*  (quadratic)", True), (log_curves, "validation loss (logreg, digits)", False))
    ):
        for name, rec in curves.items():
            axes[row, 0].plot(rec["time"], rec["metric"], label=name)
            axes[row, 1].plot(rec["oracles"], rec["metric"], label=name)
        for col, xl in enumerate(("wall time [s]", "oracle calls (gradients + HVPs)")):
            ax = axes[row, col]
            ax.set_xlabel(xl)
            ax.set_ylabel(ylabel)
            ax.set_xscale("log" if col == 1 else "linear")
            if log:
                ax.set_yscale("log")
        axes[row, 0].legend()
    fig.tight_layout()
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bilevel_compare.png")
    fig.savefig(out, dpi=110)
    print(f"\nsaved {out}")
except ImportError:
    print("matplotlib not installed; no plot")
