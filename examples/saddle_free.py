"""Saddle-free Newton on a deep autoencoder started near a saddle (Dauphin et al. 2014, §7).

A 4-layer tanh autoencoder 64-16-4-16-64 on scikit-learn's digits (500 images, pixels
scaled to [0, 1]), all weights initialised tiny (std 1e-3): the origin of weight space is a
saddle (every layer's gradient vanishes there) with negative curvature, the plateau that slows
first-order methods and attracts Newton's method. Full-batch mean squared reconstruction
error against wall time for

* SGD (mini-batches of 50, lr 0.5);
* damped Newton: x ← x − t (H + λI)⁻¹ g with λ = 1e-2 solved by MINRES (accepts indefinite H,
  so it is pulled towards saddles), Armijo on t when the step descends, else a gradient step;
* NewtonCG (curvlab.solvers.NewtonCG: truncated CG, Steihaug exit on negative curvature);
* saddle-free Newton (curvlab.solvers.SaddleFreeNewton, Krylov variant, k = 20).

Run: ``python examples/saddle_free.py`` (about 2 minutes on 2 CPU cores: 20 s of steps per method
plus the full-batch evaluations that are not timed); writes
``examples/saddle_free.png`` and prints the final training errors.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from sklearn.datasets import load_digits

import curvlab as cl
from curvlab.linalg import minres
from curvlab.solvers import armijo

torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "2"))))
SIZES = (64, 16, 4, 16, 64)


def init_params(scale: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = {}
    for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        p[f"W{i}"] = scale * torch.randn(b, a, generator=g, dtype=torch.float64)
        p[f"b{i}"] = torch.zeros(b, dtype=torch.float64)
    return p


def reconstruct(p: dict[str, torch.Tensor], X: torch.Tensor) -> torch.Tensor:
    h = X
    n_layers = len(SIZES) - 1
    for i in range(n_layers):
        h = h @ p[f"W{i}"].T + p[f"b{i}"]
        if i < n_layers - 1:
            h = torch.tanh(h)
    return h


def loss(p: dict[str, torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
    return ((reconstruct(p, batch) - batch) ** 2).sum(1).mean()


def damped_newton(problem: cl.Minimize, lam: float, seconds: float) -> tuple[list[float], list[float]]:
    """x ← x + t d, (H + λI) d = −g by MINRES; Armijo if d descends, else a gradient step."""
    x = problem.x0.clone()
    f, g = problem.value_and_grad(x)
    ts, fs, t0 = [0.0], [float(f)], time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        H = problem.hessian(x)
        d = minres(H, -g, shift=-lam, tol=1e-6, maxiter=100).x
        if not float(g @ d) < 0:
            d = -g
        ls = armijo(lambda t, x=x, d=d: problem.value(x + t * d), f, g @ d, 1.0)
        if not ls.success:
            break
        x = x + ls.t * d
        f, g = problem.value_and_grad(x)
        ts.append(time.perf_counter() - t0)
        fs.append(float(f))
    return ts, fs


def timed(solver: cl.solvers.Solver, problem: cl.Minimize, full: cl.Minimize, seconds: float) -> tuple[list, list]:
    """Run ``solver`` for ``seconds``; the full-batch error against wall time (evaluation time excluded)."""
    ts, fs = [0.0], [float(full.value(problem.x0))]
    state, spent = solver.init(problem), 0.0
    while spent < seconds and not state.get("status"):
        t = time.perf_counter()
        state = solver.step(problem, state)
        spent += time.perf_counter() - t
        ts.append(spent)
        fs.append(float(full.value(state["x"])))
    return ts, fs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="wall-time budget per method")
    ap.add_argument("--n", type=int, default=500, help="number of digits images")
    ap.add_argument("--init-scale", type=float, default=1e-3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "saddle_free.png"))
    args = ap.parse_args()
    X = torch.tensor(load_digits().data[: args.n], dtype=torch.float64) / 16.0
    p0 = init_params(args.init_scale, 0)
    full = cl.Minimize(loss, p0, data=X)
    batches = list(X.split(50))
    runs = {
        "SGD": timed(cl.solvers.GradientDescent(lr=0.5), cl.Minimize(loss, p0, data=batches), full, args.seconds),
        "damped Newton": damped_newton(full, 1e-2, args.seconds),
        "NewtonCG": timed(cl.solvers.NewtonCG(), full, full, args.seconds),
        "saddle-free Newton": timed(cl.solvers.SaddleFreeNewton(k=20), full, full, args.seconds),
    }
    print(
        f"digits autoencoder {'-'.join(map(str, SIZES))}, {args.n} images, init std {args.init_scale:g}, "
        f"{args.seconds:g} s per method"
    )
    print(f"{'method':<20} | {'steps':>6} | {'train MSE':>10}")
    for name, (_, fs) in runs.items():
        print(f"{name:<20} | {len(fs) - 1:>6} | {fs[-1]:>10.4f}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, (ts, fs) in runs.items():
        ax.plot(ts, fs, label=name)
    ax.set_xlabel("wall time [s]")
    ax.set_ylabel("training reconstruction error")
    ax.set_yscale("log")
    ax.set_title("digits autoencoder started near a saddle")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
