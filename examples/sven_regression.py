"""Sven versus Adam versus L-BFGS on the Sven paper's 1-D regression (Bright-Thonney et al. 2026).

Target :math:`y = e^{-10x^2}\\sin 2x` on [-1, 1]; 10k training and 10k validation points
(generated, fixed seed); an MLP 1-16-16-16-1 with GELU; per-sample loss
:math:`\\ell_i = (f(x_i) - y_i)^2`. Sven (``curvlab.solvers.Sven``: lr 0.1, k 64) and Adam
(lr 1e-3) train on shuffled mini-batches of 128; L-BFGS
(``torch.optim.LBFGS``, strong Wolfe line search) on the full training set. Every method
gets the same wall-clock budget; the validation MSE is printed against training time
(evaluation time excluded) and the curves are saved as a PNG.

Run:  python examples/sven_regression.py [--seconds 30] [--png sven_regression.png]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import curvlab as cl

Curve = list[dict[str, float]]


def make_data(n_train: int = 10_000, n_val: int = 10_000, seed: int = 0) -> dict[str, Tensor]:
    """Uniform inputs on [-1, 1] and targets :math:`e^{-10x^2}\\sin 2x` (float32)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n_train + n_val, 1, generator=g) * 2 - 1
    y = torch.exp(-10 * x**2) * torch.sin(2 * x)
    return {"x": x[:n_train], "y": y[:n_train], "xv": x[n_train:], "yv": y[n_train:]}


def make_model(seed: int = 0) -> nn.Module:
    """The paper's MLP 1-16-16-16-1 with GELU activations."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(1, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 1)
    )


def per_sample_loss(out: Tensor, y: Tensor) -> Tensor:
    """Squared error of each sample, shape ``(batch,)``."""
    return ((out - y) ** 2).sum(-1)


@torch.no_grad()
def mse(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return float(per_sample_loss(model(x), y).mean())


class Clock:
    """Wall time of training only: evaluation runs with the clock paused."""

    def __init__(self) -> None:
        self.elapsed, self._t = 0.0, time.perf_counter()

    def pause(self) -> float:
        self.elapsed += time.perf_counter() - self._t
        return self.elapsed

    def resume(self) -> None:
        self._t = time.perf_counter()


def train_minibatch(
    model: nn.Module,
    step: Callable[[Tensor, Tensor], Any],
    data: dict[str, Tensor],
    seconds: float,
    batch: int = 128,
    seed: int = 0,
    evals_per_epoch: int = 4,
) -> Curve:
    """Shuffled mini-batch epochs until ``seconds`` of training time; returns the validation curve."""
    n = data["x"].shape[0]
    g = torch.Generator().manual_seed(seed)
    curve = [{"time": 0.0, "epoch": 0.0, "val": mse(model, data["xv"], data["yv"])}]
    steps_per_epoch = (n + batch - 1) // batch
    every = max(1, steps_per_epoch // evals_per_epoch)
    clock, k = Clock(), 0
    while True:
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, batch):
            idx = perm[s : s + batch]
            step(data["x"][idx], data["y"][idx])
            k += 1
            if k % every == 0:
                t = clock.pause()
                curve.append({"time": t, "epoch": k / steps_per_epoch, "val": mse(model, data["xv"], data["yv"])})
                if t >= seconds:
                    return curve
                clock.resume()


def train_sven(
    data: dict[str, Tensor],
    seconds: float,
    lr: float = 0.1,
    k: int = 64,
    batch: int = 128,
    seed: int = 0,
    evals_per_epoch: int = 4,
) -> Curve:
    """Sven through ``curvlab.solvers.Sven`` on a shuffling ``DataLoader`` (per-sample Jacobians by ``vmap``).

    (In a hand-written loop, ``curvlab.optim.Sven(model.parameters(), lr=lr, k=k)`` with
    ``opt.step(lambda: per_sample_loss(model(x), y))`` takes the same steps, with the
    Jacobian from batched vjps through the closure, which is slower.)
    """
    model = make_model(seed)
    loader = DataLoader(
        TensorDataset(data["x"], data["y"]),
        batch_size=batch,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    problem = cl.SupervisedLoss(model, per_sample_loss, None, loader)
    steps_per_epoch = len(loader)
    every = max(1, steps_per_epoch // evals_per_epoch)
    curve = [{"time": 0.0, "epoch": 0.0, "val": mse(model, data["xv"], data["yv"])}]
    clock = Clock()

    def callback(state: dict[str, Any]) -> bool:
        if state["iter"] % every:
            return False
        t = clock.pause()
        with torch.no_grad():
            val = float(per_sample_loss(problem.outputs(state["x"], data["xv"]), data["yv"]).mean())
        curve.append({"time": t, "epoch": state["iter"] / steps_per_epoch, "val": val})
        clock.resume()
        return t >= seconds

    cl.solvers.Sven(lr=lr, k=k).solve(problem, max_iter=10**9, tol=0.0, callback=callback)
    return curve


def train_adam(data: dict[str, Tensor], seconds: float, lr: float = 1e-3, batch: int = 128, seed: int = 0) -> Curve:
    """Adam on the mean squared error."""
    model = make_model(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def step(x: Tensor, y: Tensor) -> None:
        opt.zero_grad()
        per_sample_loss(model(x), y).mean().backward()
        opt.step()

    return train_minibatch(model, step, data, seconds, batch, seed)


def train_lbfgs(
    data: dict[str, Tensor], seconds: float, seed: int = 0, max_iter: int = 20, history_size: int = 50
) -> Curve:
    """Full-batch ``torch.optim.LBFGS`` with the strong Wolfe line search; an epoch is one loss evaluation."""
    model = make_model(seed)
    opt = torch.optim.LBFGS(
        model.parameters(),
        lr=1.0,
        max_iter=max_iter,
        history_size=history_size,
        line_search_fn="strong_wolfe",
        tolerance_grad=0.0,
        tolerance_change=0.0,
    )
    evals = [0]

    def closure() -> Tensor:
        evals[0] += 1
        opt.zero_grad()
        loss = per_sample_loss(model(data["x"]), data["y"]).mean()
        loss.backward()
        return loss

    curve = [{"time": 0.0, "epoch": 0.0, "val": mse(model, data["xv"], data["yv"])}]
    clock = Clock()
    while True:
        opt.step(closure)
        t = clock.pause()
        curve.append({"time": t, "epoch": float(evals[0]), "val": mse(model, data["xv"], data["yv"])})
        if t >= seconds or not torch.isfinite(torch.tensor(curve[-1]["val"])):
            return curve
        clock.resume()


def value_at(curve: Curve, t: float) -> float:
    """Validation loss of the last evaluation at or before training time ``t``."""
    v = curve[0]["val"]
    for p in curve:
        if p["time"] <= t:
            v = p["val"]
    return v


def plot(curves: dict[str, Curve], path: str, title: str = "Sven paper's 1-D regression") -> None:
    """Validation loss against training time (log scale), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, c in curves.items():
        ax.semilogy([p["time"] for p in c], [p["val"] for p in c], label=name)
    ax.set_xlabel("training wall time [s]")
    ax.set_ylabel("validation MSE")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=30.0, help="training wall time per method")
    ap.add_argument("--png", default="sven_regression.png", help="where to save the loss curves")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps timings stable on shared CPUs)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = make_data()
    runs = {
        "Sven (lr 0.1, k 64)": lambda s: train_sven(data, s),
        "Adam (lr 1e-3)": lambda s: train_adam(data, s),
        "L-BFGS (full batch)": lambda s: train_lbfgs(data, s),
    }
    for run in runs.values():  # warm-up (first calls of torch.func / LAPACK), not timed
        run(0.05)
    curves = {name: run(args.seconds) for name, run in runs.items()}
    checkpoints = [args.seconds * f for f in (0.1, 0.25, 0.5, 1.0)]
    print("validation MSE at training time:")
    print(f"{'method':24s}" + "".join(f"{t:>11.1f}s" for t in checkpoints) + "   epochs")
    for name, c in curves.items():
        print(f"{name:24s}" + "".join(f"{value_at(c, t):12.3e}" for t in checkpoints) + f"   {c[-1]['epoch']:.0f}")
    plot(curves, args.png)
    print(f"saved {args.png}")


if __name__ == "__main__":
    main()
