"""Data hyper-cleaning on scikit-learn's digits with 50 % of the training labels corrupted.

Each training example i gets a weight σ(x_i); the inner problem trains a multinomial
logistic regression on the weighted corrupted set, the outer problem is the loss on a
clean validation set (Franceschi et al. 2017; Kwon et al. 2023, §6). Every bilevel solver
runs on the same problem; the script prints test accuracy, the mean weight on corrupted
and clean examples, wall time and oracle calls, and saves ``hyper_cleaning.png``.

Run: ``python examples/hyper_cleaning.py`` (about two minutes on a laptop CPU).
"""

from __future__ import annotations

import os
import time

import torch

import bilevel as bl
from bilevel.problems import hyper_cleaning

torch.set_num_threads(1)
torch.manual_seed(0)

h = hyper_cleaning("digits", corruption=0.5)
baseline = h.test_accuracy(h.solve_inner(None))
oracle = h.test_accuracy(h.solve_inner(torch.where(h.corrupted_mask, -10.0, 10.0).double()))
print(h)
print(f"test accuracy, unweighted training on corrupted labels: {baseline:.3f}")
print(f"test accuracy, training on the clean examples only:      {oracle:.3f}\n")

# every solver with its defaults: no step size to tune (per-example weights get steps that follow the
# problem's scale); each run stops by itself, here at the latest after TIME_LIMIT seconds
solvers = {name: getattr(bl, name)() for name in ("IFT", "AID", "ITD", "F2SA", "BOREP", "LVHBA")}

MAX_ITER, TIME_LIMIT = 1000, 20.0
curves = {}
print(f"{'solver':<14}{'test acc':>9}{'w corrupt':>10}{'w clean':>9}{'time [s]':>9}{'grads':>8}{'hvps':>8}  status")
for name, solver in solvers.items():
    rec = {"time": [], "acc": [], "oracles": []}
    t0 = time.perf_counter()
    eval_time = 0.0

    def callback(state, rec=rec, t0=t0):
        global eval_time
        t = time.perf_counter()
        if not state.get("partial") and state["iter"] % 5 == 0:
            rec["time"].append(t - t0 - eval_time)
            rec["acc"].append(h.test_accuracy(state["y"]))
            rec["oracles"].append(state["grads"] + state["hvps"])
        eval_time += time.perf_counter() - t

    try:
        r = solver.solve(h.problem, max_iter=MAX_ITER, time_limit=TIME_LIMIT, callback=callback)
    except Exception as e:  # noqa: BLE001 - keep comparing the other solvers
        print(f"{name:<14} failed: {e}")
        continue
    wc, wk = h.mean_weights(r.x)
    print(
        f"{name:<14}{h.test_accuracy(r.y):>9.3f}{wc:>10.3f}{wk:>9.3f}{r.history['time'][-1]:>9.2f}"
        f"{r.state['grads']:>8d}{r.state['hvps']:>8d}  {r.status}"
    )
    curves[name] = rec

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, rec in curves.items():
        axes[0].plot(rec["time"], rec["acc"], label=name)
        axes[1].plot(rec["oracles"], rec["acc"], label=name)
    for ax, xl in zip(axes, ("wall time [s]", "oracle calls (gradients + HVPs)")):
        ax.axhline(baseline, color="gray", ls="--", label="unweighted")
        ax.axhline(oracle, color="k", ls=":", label="clean only")
        ax.set_xlabel(xl)
        ax.set_ylabel("test accuracy")
    axes[1].set_xscale("log")
    axes[0].legend()
    fig.suptitle("Data hyper-cleaning, digits, 50 % corrupted labels")
    fig.tight_layout()
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hyper_cleaning.png")
    fig.savefig(out, dpi=110)
    print(f"\nsaved {out}")
except ImportError:
    print("matplotlib not installed; no plot")
