"""Every bilevel solver on the same problems, one line each: switch algorithms by changing one line.

1. The quadratic bilevel problem with closed-form solution (benchopt's design): gap
   ``F(x) − F*`` against wall time and oracle calls.
2. Per-feature L2-regularised logistic regression on scikit-learn's digits (64
   hyperparameters λ_j = exp(x_j)): validation loss and validation / test accuracy.

Prints a table per problem and saves ``bilevel_compare.png``. Runs in about a minute on CPU.
Solvers: IFT, AID (defaults and the classical gradient-descent variant), ITD, F2SA, BO-REP.
"""

from __future__ import annotations

import os
import time

import torch

import bilevel as bl
from bilevel.problems import logreg, quadratic

torch.set_num_threads(1)
torch.manual_seed(0)


def solvers_for(kind: str, q=None) -> dict:
    """``{name: (solver, max_iter)}``: the single-loop F2SA and BO-REP take cheaper, more numerous steps."""
    if kind == "quadratic":
        lr = 1.0 / q.L_outer
        L = q.L_inner  # inner smoothness: the first-order methods' inner steps are 1/L
        return {
            "IFT": (bl.IFT(lr=lr, inner_lr=1.0 / L, T=10, K=50), 200),
            "AID": (bl.AID(), 50),  # defaults: Newton inner solves, L-BFGS outer with a line search
            "AID-GD": (bl.AID(lr=lr, inner="gd", optimizer="sgd"), 200),  # the classical fixed-step AID
            "ITD": (bl.ITD(lr=lr, K=50), 200),
            # x step ξα = 0.05 ≈ 3/L_F; z step γ = 1/L; T = 5 inner steps per outer step
            "F2SA": (bl.F2SA(lr_y=0.05, lr_z=1.0 / L, n_inner_steps=5), 1500),
            # decaying normalized step (η_t = η (t+1)^-0.7) so that it settles; y, z steps 1/L
            "BO-REP": (
                bl.BOREP(lr=1.0, lr_decay=0.7, momentum=0.5, lr_z=1.0 / L, lr_y=1.0 / L, n_inner_steps=20),
                1500,
            ),
        }
    return {
        "IFT": (bl.IFT(lr=0.1, optimizer="adam", T=10, K=20), 60),
        # inexact AID: the per-feature penalties drive some λ_j towards 0, which makes exact (Newton) inner
        # solves of the 650-variable softmax regression expensive; gradient steps to 1e-4 suffice here
        "AID-GD": (bl.AID(lr=0.1, inner="gd", optimizer="adam", inner_steps=50, solve_maxiter=30, solve_tol=1e-4), 60),
        "ITD": (bl.ITD(lr=0.1, optimizer="adam", K=30), 60),
        "F2SA": (bl.F2SA(outer_ratio=10.0), 300),
        "BO-REP": (bl.BOREP(lr=0.1, lr_decay=0.5), 300),
    }


def run(problem, solver, max_iter: int, evaluate) -> dict:
    rec = {"time": [], "oracles": [], "metric": []}
    t0 = time.perf_counter()
    paused = [0.0]

    def callback(state):
        t = time.perf_counter()
        rec["time"].append(t - t0 - paused[0])
        rec["oracles"].append(state["grads"] + state["hvps"])
        rec["metric"].append(evaluate(state))
        paused[0] += time.perf_counter() - t

    result = solver.solve(problem, max_iter=max_iter, callback=callback)
    rec["result"] = result
    return rec


# --------------------------------------------------------------- quadratic
q = quadratic(dx=20, dy=50, cond=20.0, reg=0.5)
print(q, f"F* = {q.outer_star:.6f}")
print(f"{'solver':<8}{'F(x) - F*':>12}{'|x-x*|/|x*|':>13}{'time [s]':>10}{'grads':>8}{'hvps':>8}")
quad_curves = {}
for name, (solver, iters) in solvers_for("quadratic", q).items():
    rec = run(q.problem, solver, iters, lambda s: q.outer_value(s["x"]) - q.outer_star)
    r = rec["result"]
    rel = float((r.x_flat - q.x_star).norm() / q.x_star.norm())
    print(
        f"{name:<8}{rec['metric'][-1]:>12.3e}{rel:>13.3e}{rec['time'][-1]:>10.2f}"
        f"{r.state['grads']:>8d}{r.state['hvps']:>8d}"
    )
    quad_curves[name] = rec

# ------------------------------------------------------------------ logreg
lg = logreg("digits", per_feature=True, x0=0.0)
print(f"\n{lg} (64 hyperparameters)")
print(f"{'solver':<8}{'val loss':>10}{'val acc':>9}{'test acc':>9}{'time [s]':>10}{'grads':>8}{'hvps':>8}")
log_curves = {}
for name, (solver, iters) in solvers_for("logreg").items():
    rec = run(lg.problem, solver, iters, lambda s: lg.loss(s["y"], "val"))
    r = rec["result"]
    print(
        f"{name:<8}{lg.loss(r.y, 'val'):>10.4f}{lg.val_accuracy(r.y):>9.3f}{lg.test_accuracy(r.y):>9.3f}"
        f"{rec['time'][-1]:>10.2f}{r.state['grads']:>8d}{r.state['hvps']:>8d}"
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
