"""Bilevel solvers side by side: time and oracle calls to reach a target outer value.

Problems (float64, full batch, CPU):

* ``quadratic``   — :func:`bilevel.problems.quadratic` (dx=10, dy=20, cond=10), closed-form F and x*;
* ``logreg``      — L2 logistic regression on scikit-learn's breast cancer (standardised, 300 train /
  269 validation), one penalty exp(x_j) per feature (30 hyperparameters);
* ``hyperclean``  — data hyper-cleaning on scikit-learn's digits: 600 training images with 50 % of the
  labels replaced at random, per-example weights sigmoid(x_i) (600 hyperparameters), multinomial
  logistic regression (64x10 weights) with 1e-3 ||W||^2 as inner problem, validation cross-entropy
  (600 images) as outer objective.

Contestants: bilevel.IFT, AID, ITD (when present), F2SA, BOREP, LVHBA (unconstrained problems, so it
runs as a plain value-function method), and jaxopt (implicit differentiation of a warm-started
jaxopt.LBFGS inner solve with solve_cg, inside the same fixed-step outer gradient-descent loop, jax.jit,
compiled before the clock starts). Every run gets the same wall-clock budget; the outer value
F(x) = f(x, y*(x)) of recorded iterates is evaluated afterwards with an exact inner solve (Newton),
outside the timing. Target: F(x0) - 0.99 (F(x0) - F_ref), with F_ref = F(x*) for the quadratic and the
best value any contestant reached otherwise.

Run:  python benchmarks/bilevel.py [--budget 6] [--problems quadratic logreg hyperclean]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

# this script is named like the package it benchmarks: keep its own folder off the import path
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import bilevel  # noqa: E402
from bilevel.aid import AID  # noqa: E402
from bilevel.borep import BOREP  # noqa: E402
from bilevel.f2sa import F2SA  # noqa: E402
from bilevel.ift import IFT  # noqa: E402
from bilevel.lvhba import LVHBA  # noqa: E402

torch.set_num_threads(1)
torch.set_default_dtype(torch.float64)
HERE = _HERE


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=3.0, help="wall-clock seconds per run")
    p.add_argument("--problems", nargs="*", default=["quadratic", "logreg", "hyperclean"])
    p.add_argument("--points", type=int, default=20, help="iterates evaluated per run")
    p.add_argument("--solvers", nargs="*", default=None, help="only contestants whose name contains one of these")
    p.add_argument("--no-jaxopt", action="store_true")
    return p.parse_args()


# --------------------------------------------------------------------------- problems
class Bench:
    """A problem: torch BilevelProblem, jax (outer, inner) on the same data, exact F, solver settings."""

    name: str
    problem: bilevel.BilevelProblem
    jax_fns: tuple[Callable, Callable]
    solvers: dict[str, Any]
    outer_lr: float
    F_ref: float | None = None

    def y_star(self, x: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
        """Damped Newton on g(x, .) from y0 (exact inner solution for evaluation; falls back to y = 0 starts)."""
        p = self.problem
        y = y0.clone()
        if not bool(torch.isfinite(p.g(x, y))):
            y = torch.zeros_like(y0)
        for _ in range(100):
            gy = p.grad_g_y(x, y)
            if float(gy.norm()) < 1e-11:
                break
            H = torch.func.hessian(lambda v: p.g_diff(x, v))(y)
            d = -torch.linalg.solve(H, gy)
            g0, t = float(p.g(x, y)), 1.0
            while t > 1e-12 and not float(p.g(x, y + t * d)) <= g0 + 1e-4 * t * float(gy @ d):
                t *= 0.5
            y = y + t * d
        return y

    def hyper_objective(self, x: torch.Tensor, y0: torch.Tensor) -> tuple[float, torch.Tensor]:
        y = self.y_star(x, y0)
        return float(self.problem.f(x, y)), y


def quadratic_bench() -> Bench:
    from bilevel.problems import quadratic

    q = quadratic(dx=10, dy=20, cond=10.0)
    b = Bench()
    b.name, b.problem, b.outer_lr, b.F_ref = "quadratic", q.problem, 0.1, q.outer_star
    A, B, bb, yt = (t.numpy() for t in (q.A, q.B, q.b, q.y_target))
    reg = q.reg

    def j_outer(x: Any, y: Any) -> Any:
        import jax.numpy as jnp

        return 0.5 * jnp.sum((y - yt) ** 2) + 0.5 * reg * jnp.sum(x**2)

    def j_inner(y: Any, x: Any) -> Any:
        return 0.5 * y @ (A @ y) - y @ (B @ x + bb)

    b.jax_fns = (j_outer, j_inner)
    b.solvers = {
        "IFT (neumann K=20)": IFT(lr=0.1, inner_lr=1.0, T=5, K=20),
        "AID (gd inner, fixed step)": AID(lr=0.1, inner="gd", inner_lr=1.0, optimizer="sgd"),
        "F2SA": F2SA(lr_y=0.05, lr_z=1.0, outer_ratio=2.0, n_inner_steps=5),
        "BOREP": BOREP(lr=0.3, lr_decay=0.5, lr_z=0.5, lr_y=0.5, n_inner_steps=5),
        "LVHBA": LVHBA(lr=0.5, lr_inner=0.5, c_lower=1.0, p=0.5),
    }
    return b


def _logreg_data() -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_breast_cancer

    X, t = load_breast_cancer(return_X_y=True)
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(t))
    X = (X - X.mean(0)) / X.std(0)
    t = 2.0 * t - 1.0
    tr, va = idx[:300], idx[300:]
    return tuple(torch.tensor(a) for a in (X[tr], t[tr], X[va], t[va]))


def logreg_bench() -> Bench:
    Xtr, ttr, Xva, tva = _logreg_data()

    def outer(x: torch.Tensor, y: torch.Tensor, batch: Any) -> torch.Tensor:
        return torch.nn.functional.softplus(-tva * (Xva @ y)).mean()

    def inner(x: torch.Tensor, y: torch.Tensor, batch: Any) -> torch.Tensor:
        return torch.nn.functional.softplus(-ttr * (Xtr @ y)).mean() + 0.5 * (torch.exp(x) * y**2).sum()

    b = Bench()
    b.name, b.outer_lr = "logreg", 1.0
    b.problem = bilevel.BilevelProblem(outer, inner, torch.full((30,), -2.0), torch.zeros(30))
    Xtr_, ttr_, Xva_, tva_ = (a.numpy() for a in (Xtr, ttr, Xva, tva))

    def j_outer(x: Any, y: Any) -> Any:
        import jax

        return jax.nn.softplus(-tva_ * (Xva_ @ y)).mean()

    def j_inner(y: Any, x: Any) -> Any:
        import jax
        import jax.numpy as jnp

        return jax.nn.softplus(-ttr_ * (Xtr_ @ y)).mean() + 0.5 * jnp.sum(jnp.exp(x) * y**2)

    b.jax_fns = (j_outer, j_inner)
    b.solvers = {
        "IFT (neumann K=20)": IFT(lr=1.0, inner_lr=0.5, T=5, K=20),
        "AID (gd inner, fixed step)": AID(lr=1.0, inner="gd", inner_lr=0.5, optimizer="sgd"),
        "F2SA": F2SA(lr_y=0.05, lr_z=0.5, outer_ratio=20.0, n_inner_steps=5),
        "BOREP": BOREP(lr=0.1, lr_decay=0.3, lr_z=0.5, lr_y=0.5, n_inner_steps=5),
        "LVHBA": LVHBA(lr=0.5, lr_inner=0.5, c_lower=0.1, p=0.5),
    }
    return b


def hyperclean_bench() -> Bench:
    from sklearn.datasets import load_digits

    X, t = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(t))
    X = X / 16.0
    tr, va = idx[:600], idx[600:1200]
    ttr = t[tr].copy()
    flip = rng.random(600) < 0.5
    ttr[flip] = rng.integers(0, 10, flip.sum())
    Xtr, Ytr, Xva, Yva = (torch.tensor(a) for a in (X[tr], ttr, X[va], t[va]))
    reg = 1e-3

    def outer(x: torch.Tensor, y: torch.Tensor, batch: Any) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(Xva @ y.view(64, 10), Yva)

    def inner(x: torch.Tensor, y: torch.Tensor, batch: Any) -> torch.Tensor:
        ce = torch.nn.functional.cross_entropy(Xtr @ y.view(64, 10), Ytr, reduction="none")
        return (torch.sigmoid(x) * ce).mean() + reg * (y**2).sum()

    b = Bench()
    b.name, b.outer_lr = "hyperclean", 50.0
    b.problem = bilevel.BilevelProblem(outer, inner, torch.zeros(600), torch.zeros(640))
    Xtr_, Ytr_, Xva_, Yva_ = (a.numpy() for a in (Xtr, Ytr, Xva, Yva))

    def j_outer(x: Any, y: Any) -> Any:
        import jax

        lp = jax.nn.log_softmax(Xva_ @ y.reshape(64, 10))
        return -lp[np.arange(600), Yva_].mean()

    def j_inner(y: Any, x: Any) -> Any:
        import jax
        import jax.numpy as jnp

        lp = jax.nn.log_softmax(Xtr_ @ y.reshape(64, 10))
        return (jax.nn.sigmoid(x) * -lp[np.arange(600), Ytr_]).mean() + reg * jnp.sum(y**2)

    b.jax_fns = (j_outer, j_inner)
    b.solvers = {
        "IFT (neumann K=20)": IFT(lr=50.0, inner_lr=1.0, T=5, K=20),
        "AID (gd inner, fixed step)": AID(lr=50.0, inner="gd", inner_lr=1.0, inner_tol=1e-5, optimizer="sgd"),
        "F2SA": F2SA(lr_y=0.1, lr_z=1.0, outer_ratio=200.0, n_inner_steps=5),
        "BOREP": BOREP(lr=3.0, lr_decay=0.3, lr_z=1.0, lr_y=1.0, n_inner_steps=5),
        "LVHBA": LVHBA(lr=1.0, lr_inner=1.0, c_lower=0.02, p=0.5),
    }
    return b


def strong_aid() -> dict[str, Any]:
    """AID as a demanding user runs it: Newton inner solves, warm-started CG adjoint, L-BFGS outer + line search."""
    return {
        "AID (defaults: Newton + L-BFGS)": AID(),
        "AID (Newton-CG + L-BFGS)": AID(inner="newton_cg"),
    }


# --------------------------------------------------------------------------- runners
def run_ours(b: Bench, solver: Any, budget: float) -> list[tuple[float, int, int, torch.Tensor]]:
    """Run until the budget; record (time, grads, hvps, x) at every iteration (a clone, negligible)."""
    rec: list[tuple[float, int, int, torch.Tensor]] = []
    solver.solve(b.problem, max_iter=2)  # warm-up outside the clock (torch's lazy init, as jax compiles first)
    t0 = time.perf_counter()

    def cb(state: dict[str, Any]) -> bool:
        t = time.perf_counter() - t0
        rec.append((t, int(state["grads"]), int(state["hvps"]), state["x"].clone()))
        return t > budget

    solver.solve(b.problem, max_iter=10**7, callback=cb)
    return rec


def run_jaxopt(b: Bench, budget: float) -> list[tuple[float, int, int, torch.Tensor]]:
    """Outer gradient descent with jaxopt implicit differentiation (LBFGS inner solve, solve_cg), jitted."""
    import jax
    import jax.numpy as jnp
    import jaxopt

    jax.config.update("jax_enable_x64", True)
    j_outer, j_inner = b.jax_fns
    inner_solver = jaxopt.LBFGS(fun=j_inner, tol=1e-6, maxiter=100, implicit_diff=True)

    def value(x: Any, y_init: Any) -> tuple[Any, Any]:
        y = inner_solver.run(y_init, x).params
        return j_outer(x, y), y

    @jax.jit
    def step(x: Any, y: Any) -> tuple[Any, Any]:
        (_, y_new), g = jax.value_and_grad(value, has_aux=True)(x, y)
        return x - b.outer_lr * g, jax.lax.stop_gradient(y_new)

    x = jnp.asarray(b.problem.x0.numpy())
    y = jnp.asarray(b.problem.y0.numpy())
    jax.block_until_ready(step(x, y))  # compile outside the clock
    rec = []
    t0 = time.perf_counter()
    while True:
        x, y = step(x, y)
        x.block_until_ready()
        t = time.perf_counter() - t0
        rec.append((t, -1, -1, torch.tensor(np.asarray(x))))
        if t > budget:
            return rec


def evaluate(b: Bench, rec: list, points: int) -> list[tuple[float, int, int, float]]:
    """F at up to ``points`` iterates spread over the run (exact inner solves, warm-started)."""
    n = len(rec)
    idx = sorted({int(round(i)) for i in np.linspace(0, n - 1, min(points, n))}) if n else []
    # dense near the start too: log-spaced indices
    idx = sorted(set(idx) | {int(i) for i in np.unique(np.geomspace(1, max(n, 1), 10).astype(int) - 1)})
    out = []
    y = b.problem.y0.clone()
    for i in idx:
        t, gr, hv, x = rec[i]
        val, y = b.hyper_objective(x, y)
        out.append((t, gr, hv, val))
    return out


def main() -> None:
    args = parse()
    builders = {"quadratic": quadratic_bench, "logreg": logreg_bench, "hyperclean": hyperclean_bench}
    try:
        from bilevel.itd import ITD as itd  # noqa: N811
    except ImportError:
        itd = None
    print(
        f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, torch "
        f"{torch.__version__}, budget {args.budget:.1f} s per run, 1 thread"
    )
    all_tables = []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name in args.problems:
        b = builders[name]()
        solvers = dict(b.solvers)
        if itd is not None:
            solvers["ITD (K=20)"] = itd(lr=b.outer_lr, inner_lr=b.solvers["AID (gd inner, fixed step)"].inner_lr, K=20)
        solvers.update(strong_aid())
        if args.solvers:
            solvers = {k: v for k, v in solvers.items() if any(s.lower() in k.lower() for s in args.solvers)}
        F0, _ = b.hyper_objective(b.problem.x0, b.problem.y0)
        curves: dict[str, list] = {}
        for sname, solver in solvers.items():
            try:
                curves[sname] = evaluate(b, run_ours(b, solver, args.budget), args.points)
            except Exception as e:  # noqa: BLE001
                print(f"  {sname} failed on {name}: {type(e).__name__}: {e}")
        try:
            if args.no_jaxopt:
                raise RuntimeError("skipped (--no-jaxopt)")
            curves["jaxopt (LBFGS + implicit, jit)"] = evaluate(b, run_jaxopt(b, args.budget), args.points)
        except Exception as e:  # noqa: BLE001
            print(f"  jaxopt failed on {name}: {type(e).__name__}: {e}")
        best = min(v for c in curves.values() for (_, _, _, v) in c if math.isfinite(v))
        F_ref = b.F_ref if b.F_ref is not None else best
        target = F0 - 0.99 * (F0 - F_ref)
        rows = []
        for sname, c in curves.items():
            hit = next(((t, g, h, v) for (t, g, h, v) in c if v <= target), None)
            final = c[-1][3] if c else float("nan")
            rows.append((sname, hit, final))
        jax_hit = next((h for s, h, _ in rows if s.startswith("jaxopt")), None)
        jax_curve = next((c for s, c in curves.items() if s.startswith("jaxopt")), None)
        jax_final = jax_curve[-1][3] if jax_curve else float("nan")
        to_jax = {s: next((t for (t, _, _, v) in c if v <= jax_final), None) for s, c in curves.items()}
        lines = [
            f"**{name}** (F(x0) = {F0:.6g}, F_ref = {F_ref:.6g}, target F <= {target:.6g})",
            "",
            "| method | time to target | vs jaxopt | grads | HVPs | final F | time to jaxopt's final F |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for sname, hit, final in rows:
            tj = to_jax.get(sname)
            tj_s = "not reached" if tj is None else f"{tj:.3f} s"
            if hit is None:
                lines.append(f"| {sname} | not reached | | | | {final:.6g} | {tj_s} |")
                continue
            ratio = f"{hit[0] / jax_hit[0]:.2f}×" if jax_hit is not None else ""
            g = "" if hit[1] < 0 else str(hit[1])
            h = "" if hit[2] < 0 else str(hit[2])
            lines.append(f"| {sname} | {hit[0]:.3f} s | {ratio} | {g} | {h} | {final:.6g} | {tj_s} |")
        table = "\n".join(lines)
        print(table + "\n")
        all_tables.append(table)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for sname, c in curves.items():
            ts = [max(t, 1e-3) for (t, *_rest) in c]
            ax.semilogy(ts, [max(v - F_ref, 1e-12) for (*_r, v) in c], marker=".", label=sname)
        ax.axhline(target - F_ref, color="k", lw=0.8, ls="--", label="target")
        ax.set_xscale("log")
        ax.set_xlabel("wall time (s)")
        ax.set_ylabel("F(x) - F_ref")
        ax.set_title(f"bilevel: {name}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(HERE, f"bilevel_{name}.png"), dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main()
